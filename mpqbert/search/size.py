"""The model-size side of the search: the size window, expected size and the size loss.

Sizes are in MB of the layout's weight matrices (BERT: the encoder's), the `size_mb` convention
of `mpqbert.quant` (packed codes plus 32-bit scales of kept sub-groups, `MatrixSpec.storage_bits`;
matrices that the plan leaves out count at 32 bits).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mpqbert.quant import (BITS_PER_MB, FULL_PRECISION, ModelLayout, Plan, expected_bits,
                           flatten_params, size_report)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SizeBand:
  """Target size V (MB) and tolerance eps: a derived policy's size lies in [(1 - eps) V, V].

  Never above the target, so every method compared at V is at most V; eps is how far below V
  the exact derivation may land (0.2% by default: closer than one sub-group's move).
  """

  target_mb: float
  tolerance: float

  @property
  def lower(self) -> float:
    return (1.0 - self.tolerance) * self.target_mb

  @property
  def upper(self) -> float:
    return self.target_mb

  def contains(self, size_mb: float) -> bool:
    return self.lower <= size_mb <= self.upper

  def describe(self) -> str:
    return f"[{self.lower:.4f}, {self.upper:.4f}] MB (target {self.target_mb:.4f} MB)"


def float_matrix_bits(params: Any, plan: Plan, *, layout: ModelLayout) -> int:
  """Bits of the layout's matrices the plan leaves at full precision (a constant of the search)."""
  return sum(FULL_PRECISION * int(np.size(v)) for p, v in flatten_params(params).items()
             if layout.is_matrix(p) and p not in plan)


def choice_bits_per_group(plan: Plan, paths: list[str]) -> np.ndarray:
  """`[sub-groups, K]`: the storage bits of every sub-group of `paths` (in order) at each of its
  matrix's bit choices (`MatrixSpec.choice_bits`, per sub-group: widths may differ)."""
  return np.concatenate([plan[p].choice_bits for p in paths])


def size_range_mb(params: Any, plan: Plan, *, layout: ModelLayout) -> tuple[float, float]:
  """The smallest and largest `size_mb` any policy over `plan` can have."""
  low = high = float_matrix_bits(params, plan, layout=layout)
  for matrix in plan.values():
    low += int(matrix.choice_bits.min(axis=1).sum())
    high += int(matrix.choice_bits.max(axis=1).sum())
  return low / BITS_PER_MB, high / BITS_PER_MB


def uniform_size_mb(params: Any, plan: Plan, bits: int, *, layout: ModelLayout) -> float:
  """`size_mb` of the policy with every sub-group of `plan` at `bits` (scales included)."""
  total = float_matrix_bits(params, plan, layout=layout) + sum(
      int(m.storage_bits(bits).sum()) for m in plan.values())
  return total / BITS_PER_MB


def make_band(params: Any, plan: Plan, *, layout: ModelLayout, target_size_mb: float | None = None,
              target_compression: float | None = None, target_uniform_bits: int | None = None,
              tolerance: float) -> SizeBand:
  """The window from exactly one of `search.target_size_mb`, `search.target_compression` and
  `search.target_uniform_bits` (the exact size of uniform b-bit quantization over the same
  sub-groups: the equal-size rival of a mixed policy).

  Compression is relative to the float32 encoder matrices. Raises if no policy over `plan`
  can land in the window, naming what to change.
  """
  given = [v is not None for v in (target_size_mb, target_compression, target_uniform_bits)]
  if sum(given) != 1:
    raise ValueError("set exactly one of search.target_size_mb, search.target_compression and "
                     f"search.target_uniform_bits (got {target_size_mb}, {target_compression}, "
                     f"{target_uniform_bits}).")
  if not 0.0 <= tolerance < 1.0:
    raise ValueError(f"search.tolerance={tolerance} must be in [0, 1).")
  fp32_mb = size_report(params, layout=layout)["size_mb"]
  if target_uniform_bits is not None:
    target_size_mb = uniform_size_mb(params, plan, int(target_uniform_bits), layout=layout)
  elif target_size_mb is None:
    if target_compression <= 0:
      raise ValueError(f"search.target_compression={target_compression} must be > 0.")
    target_size_mb = fp32_mb / target_compression
  if target_size_mb <= 0:
    raise ValueError(f"search.target_size_mb={target_size_mb} must be > 0.")
  band = SizeBand(float(target_size_mb), float(tolerance))
  low, high = size_range_mb(params, plan, layout=layout)
  if high < band.lower or low > band.upper:
    raise ValueError(
        f"no policy can reach the size band {band.describe()}: with these bit choices and "
        f"sub-groups the encoder matrices take {low:.4f} to {high:.4f} MB (float32: "
        f"{fp32_mb:.4f} MB, so compression {fp32_mb / high:.1f}x to "
        f"{fp32_mb / max(low, 1e-12):.1f}x). Change search.target_compression / target_size_mb "
        "or quant.bit_choices.")
  return band


def expected_size_mb(probs: Mapping[str, Array], plan: Plan, fixed: int = 0) -> Array:
  """E[size_mb] under per-sub-group bit-choice probabilities `[G, K]` (differentiable).

  With one-hot probabilities it is the policy's exact `size_mb` (`fixed` = `float_matrix_bits`).
  """
  total = jnp.asarray(float(fixed))
  for path, matrix in plan.items():
    total = total + expected_bits(probs[path], matrix.choice_bits)
  return total / BITS_PER_MB


def size_loss(size_mb: Array, target_mb: float, weight: float) -> Array:
  """weight * log(C / V)^2: pulls the (sampled) size C to the target V from both sides.

  AQ-BERT's penalty (log C above a band, 0 inside) let the expected size park at the band's
  upper edge while the derived policy landed far below it; a penalty with its minimum at V
  makes the search's size and the exactly derived size agree.
  """
  return weight * jnp.square(jnp.log(size_mb / target_mb))
