"""Pictures of a policy: the bit-width heat map (layers x matrices x sub-groups)."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import colors  # noqa: E402

from mpqbert.quant import Policy  # noqa: E402

MATRIX_ORDER = (("attention/self/query", "Q"), ("attention/self/key", "K"),
                ("attention/self/value", "V"), ("attention/output/dense", "O"),
                ("intermediate/dense", "FFN in"), ("output/dense", "FFN out"))
_LAYER = re.compile(r"encoder/layer/(\d+)/(.+)/kernel$")


def bit_grid(policy: Policy) -> tuple[np.ndarray, list[str]]:
  """`[layers, matrices * G]` bits (NaN where a matrix is not quantized) and matrix labels."""
  cells, groups = {}, 1
  for path in policy.plan:
    match = _LAYER.search(path)
    if match:
      cells[(int(match.group(1)), match.group(2))] = np.asarray(policy.bits[path])
      groups = max(groups, len(cells[(int(match.group(1)), match.group(2))]))
  layers = 1 + max(layer for layer, _ in cells)
  grid = np.full((layers, len(MATRIX_ORDER) * groups), np.nan)
  for (layer, name), bits in cells.items():
    m = [n for n, _ in MATRIX_ORDER].index(name)
    grid[layer, m * groups:(m + 1) * groups] = np.repeat(bits, groups // len(bits))
  return grid, [label for _, label in MATRIX_ORDER]


def plot_bit_map(policy: Policy, path: str | Path, title: str = "") -> Path:
  """Heat map of bits per sub-group: a row per layer, a block of columns per matrix kind."""
  grid, labels = bit_grid(policy)
  levels = sorted({int(b) for m in policy.matrices for b in m.bit_choices})
  cmap = plt.get_cmap("viridis", len(levels))
  norm = colors.BoundaryNorm([levels[0] - 0.5] + [b + 0.5 for b in levels], cmap.N) if len(
      levels) > 1 else None
  block = grid.shape[1] // len(labels)
  fig, ax = plt.subplots(figsize=(min(16, 2 + 0.05 * grid.shape[1] + 6), 1 + 0.45 * grid.shape[0]))
  image = ax.imshow(grid, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
  for m in range(1, len(labels)):
    ax.axvline(m * block - 0.5, color="white", linewidth=2)
  ax.set_xticks([(m + 0.5) * block - 0.5 for m in range(len(labels))], labels)
  ax.set_yticks(range(grid.shape[0]), [f"layer {i}" for i in range(grid.shape[0])])
  bar = fig.colorbar(image, ax=ax, ticks=levels)
  bar.set_label("bits (0 = pruned)")
  ax.set_title(title or "bits per sub-group")
  fig.tight_layout()
  path = Path(path)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
