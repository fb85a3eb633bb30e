"""The model-size side of the search: target band, expected size and the AQ-BERT size loss.

Sizes are in MB of the encoder weight matrices, the `size_mb` convention of `mpqbert.quant`
(weights at their bits plus 32-bit scales of kept sub-groups; encoder matrices that the plan
leaves out count at 32 bits).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mpqbert.quant import (ENCODER_MATRIX, FULL_PRECISION, Plan, expected_bits, flatten_params,
                           size_report)

Array = jax.Array
BITS_PER_MB = 8 * 2**20


@dataclasses.dataclass(frozen=True)
class SizeBand:
  """Target size V (MB) and tolerance eps: the band is [(1 - eps) V, (1 + eps) V]."""

  target_mb: float
  tolerance: float

  @property
  def lower(self) -> float:
    return (1.0 - self.tolerance) * self.target_mb

  @property
  def upper(self) -> float:
    return (1.0 + self.tolerance) * self.target_mb

  def contains(self, size_mb: float) -> bool:
    return self.lower <= size_mb <= self.upper

  def describe(self) -> str:
    return f"[{self.lower:.4f}, {self.upper:.4f}] MB (target {self.target_mb:.4f} MB)"


def fixed_bits(params: Any, plan: Plan) -> int:
  """Bits of the encoder matrices the plan leaves at full precision (a constant of the search)."""
  return sum(FULL_PRECISION * int(np.size(v)) for p, v in flatten_params(params).items()
             if ENCODER_MATRIX.search(p) and p not in plan)


def size_range_mb(params: Any, plan: Plan) -> tuple[float, float]:
  """The smallest and largest `size_mb` any policy over `plan` can have."""
  low = high = fixed_bits(params, plan)
  for matrix in plan.values():
    per_group = [b * matrix.group_size + (32 * matrix.scale_floats if b else 0)
                 for b in matrix.bit_choices]
    low += matrix.groups * min(per_group)
    high += matrix.groups * max(per_group)
  return low / BITS_PER_MB, high / BITS_PER_MB


def make_band(params: Any, plan: Plan, *, target_size_mb: float | None,
              target_compression: float | None, tolerance: float) -> SizeBand:
  """The band from `search.target_size_mb` or `search.target_compression` (exactly one).

  Compression is relative to the float32 encoder matrices. Raises if no policy over `plan`
  can land in the band, naming what to change.
  """
  if (target_size_mb is None) == (target_compression is None):
    raise ValueError("set exactly one of search.target_size_mb and search.target_compression "
                     f"(got {target_size_mb} and {target_compression}).")
  if not 0.0 <= tolerance < 1.0:
    raise ValueError(f"search.tolerance={tolerance} must be in [0, 1).")
  fp32_mb = size_report(params)["size_mb"]
  if target_size_mb is None:
    if target_compression <= 0:
      raise ValueError(f"search.target_compression={target_compression} must be > 0.")
    target_size_mb = fp32_mb / target_compression
  if target_size_mb <= 0:
    raise ValueError(f"search.target_size_mb={target_size_mb} must be > 0.")
  band = SizeBand(float(target_size_mb), float(tolerance))
  low, high = size_range_mb(params, plan)
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

  With one-hot probabilities it is the policy's exact `size_mb` (`fixed` = `fixed_bits`).
  """
  total = jnp.asarray(float(fixed))
  for path, matrix in plan.items():
    total = total + expected_bits(probs[path], matrix.bit_choices, matrix.group_size,
                                  matrix.scale_floats)
  return total / BITS_PER_MB


def size_loss(size_mb: Array, band: SizeBand, weight: float) -> Array:
  """AQ-BERT's size penalty: weight * (log C above the band, 0 inside, -log C below).

  Its gradient pulls the expected size back toward the band from either side and vanishes
  inside it, so inside the band only the task loss steers the architecture.
  """
  log_size = jnp.log(size_mb)
  return weight * jnp.where(size_mb > band.upper, log_size,
                            jnp.where(size_mb < band.lower, -log_size, 0.0))
