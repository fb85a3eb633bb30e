"""Pictures of results: the bit-width heat map of a policy (layers x matrices x sub-groups) and
the size / accuracy Pareto plot of a task.

The figures are `matplotlib.figure.Figure`s built without pyplot, so they neither pick nor change
a backend: a script saves them, a notebook displays them.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib import colormaps, colors
from matplotlib.figure import Figure

from mpqbert import files
from mpqbert.quant import Policy

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


def bit_map_figure(policy: Policy, title: str = "") -> Figure:
  """Heat map of bits per sub-group: a row per layer, a block of columns per matrix kind."""
  grid, labels = bit_grid(policy)
  levels = sorted({int(b) for m in policy.matrices for b in m.bit_choices})
  cmap = colormaps["viridis"].resampled(len(levels))
  norm = colors.BoundaryNorm([levels[0] - 0.5] + [b + 0.5 for b in levels], cmap.N) if len(
      levels) > 1 else None
  block = grid.shape[1] // len(labels)
  fig = Figure(figsize=(min(16, 2 + 0.05 * grid.shape[1] + 6), 1 + 0.45 * grid.shape[0]))
  ax = fig.subplots()
  image = ax.imshow(grid, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
  for m in range(1, len(labels)):
    ax.axvline(m * block - 0.5, color="white", linewidth=2)
  ax.set_xticks([(m + 0.5) * block - 0.5 for m in range(len(labels))], labels)
  ax.set_yticks(range(grid.shape[0]), [f"layer {i}" for i in range(grid.shape[0])])
  bar = fig.colorbar(image, ax=ax, ticks=levels)
  bar.set_label("bits (0 = pruned)")
  ax.set_title(title or "bits per sub-group")
  fig.tight_layout()
  return fig


def plot_bit_map(policy: Policy, path: str | Path, title: str = "") -> Path:
  """`bit_map_figure` saved as a PNG."""
  png = io.BytesIO()
  bit_map_figure(policy, title).savefig(png, format="png", dpi=120)
  return files.write_atomic(path, png.getvalue())


_PARETO_STYLES = {"full precision": ("k", "*"), "uniform": ("tab:blue", "o"),
                  "hessian": ("tab:gray", "x"), "qbert": ("tab:orange", "s"),
                  "hawq": ("tab:red", "v"), "automp": ("tab:green", "D"),
                  "sensimix": ("tab:purple", "^")}


def _variant_label(variant: str) -> str:
  """'no_pt' -> 'no PT': a variant's words, its abbreviations (all but the first word) upper."""
  first, *rest = variant.split("_")
  return " ".join([first] + [w.upper() for w in rest])


def pareto_figure(rows: Sequence[dict[str, Any]], task: str, title: str = "") -> Figure:
  """Dev metric against encoder-matrix size (log scale) for every method of `task`.

  `rows` are results-table rows: `task`, `run` (a method name, e.g. "uniform4", "automp16",
  "full precision"; "ablation*" runs are left out), `size_mb`, `dev` and `metric`, and
  optionally `dev_std` (an error bar: the standard deviation over seeds). A run named
  `<method>_<variant>` (e.g. "sensimix_no_pt", an ablation) is an open marker of its method's
  colour, off the method's line, which joins the method's own sizes only.
  """
  fig = Figure(figsize=(6.5, 4.2))
  ax = fig.subplots()
  for name, (color, marker) in _PARETO_STYLES.items():
    pts = sorted((r["size_mb"], r["dev"], r["run"], r.get("dev_std") or 0.0) for r in rows
                 if r["task"] == task and r["run"].startswith(name)
                 and not r["run"].startswith("ablation"))
    own = [p for p in pts if not p[2].startswith(name + "_")]
    variants = [p for p in pts if p[2].startswith(name + "_")]
    if own:
      ax.errorbar([p[0] for p in own], [p[1] for p in own], yerr=[p[3] for p in own],
                  marker=marker, color=color, label=name, capsize=3,
                  linestyle="-" if len(own) > 1 else "none")
    for i, (x, y, _, std) in enumerate(variants):  # the legend names a method without own runs
      ax.errorbar([x], [y], yerr=[std], marker=marker, color=color, markerfacecolor="none",
                  capsize=3, linestyle="none", label=name if not own and i == 0 else None)
    for x, y, run, _ in pts:
      suffix = run.replace(name, "", 1).strip()
      label = (_variant_label(suffix[1:]) if suffix.startswith("_") else
               suffix if not suffix.isdigit() else
               f"{suffix}-bit" if name == "uniform" else f"{suffix}x")
      ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
  ax.set_xscale("log")
  sizes = [r["size_mb"] for r in rows if r["task"] == task]
  ticks = [t for t in (0.5, 1, 2, 3, 5, 10, 20, 40, 80) if min(sizes) / 1.5 <= t <= max(sizes) * 1.5]
  ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
  ax.minorticks_off()
  ax.set_xlabel("encoder matrices size (MB, log scale)")
  metric = next(r["metric"] for r in rows if r["task"] == task)
  ax.set_ylabel(f"dev {metric}")
  ax.set_title(title or f"{task}: size vs accuracy")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  return fig
