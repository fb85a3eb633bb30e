"""The integer grid of every weight quantizer: one `QArray` from training to disk.

A `QArray` holds integer codes with a scale and a zero point per sub-group (the last axis split
into `G` equal column blocks, as everywhere in `quant`):

    value = scale * (codes - zero)

  symmetric  codes round(clip(w / s, -2^(b-1), 2^(b-1) - 1)), zero 0 (b = 2..8);
             codes sign(w) in {-1, +1} (sign(0) = +1), zero 0 (b = 1)
  index      codes round((clip(w, lo, hi) - lo) / scale) in 0..2^b - 1,
             scale (hi - lo) / (2^b - 1), zero -lo / scale
  signs      codes sign(w), scale given (XNOR-Net's mean|w|) or 1, zero 0

Training computes its quantized weights as `QArray.dequantize()` (the quantizers wrap it in their
straight-through gradients) and the export packs `QArray.codes`: the codes a model trained with
are, by construction, the codes on disk, and a new quantizer writes its grid once, here.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

Array = jax.Array

# Smallest step size (a normal float32): an all-zero group gets this instead of a 0 that would
# divide to NaN.
MIN_SCALE = 1e-12


def group_view(w: Array, groups: int) -> Array:
  """`[..., out] -> [..., groups, out // groups]`; the inverse is a reshape to `w.shape`."""
  out = w.shape[-1]
  if groups < 1 or out % groups:
    raise ValueError(f"cannot split the last axis of size {out} into {groups} equal sub-groups; "
                     f"choose a group count that divides {out}.")
  return w.reshape(*w.shape[:-1], groups, out // groups)


def per_group(values: Array) -> Array:
  """`[G]` -> `[G, 1]`, broadcastable against a group view."""
  return jnp.asarray(values)[..., None]


def symmetric_levels(bits: int) -> tuple[float, float]:
  """(q_neg, q_pos) = (2^(b-1), 2^(b-1) - 1): the signed b-bit integer grid [-q_neg, q_pos].

  Only for b >= 2: the 1-bit symmetric grid is {-1, +1} (no 0), which no integer range
  `[-q_neg, q_pos]` describes (b = 1 would give [-1, 0]).
  """
  if int(bits) < 2:
    raise ValueError(f"symmetric_levels takes 2..8 bits, got {bits}; the 1-bit symmetric grid is "
                     "{-1, +1} (sign(w), sign(0) = +1), handled by quantize_symmetric itself.")
  half = 2.0 ** (int(bits) - 1)
  return half, half - 1.0


@functools.partial(jax.tree_util.register_dataclass, data_fields=["codes", "scale", "zero"],
                   meta_fields=["bits", "signed"])
@dataclasses.dataclass(frozen=True)
class QArray:
  """Integer codes (float32 holding integers, `w`'s shape) on a per-sub-group grid.

  `scale`, `zero`: `[G]`; `bits`: the code width; `signed`: codes in the signed range (symmetric,
  signs) or 0..2^b - 1 (index), which is how `kernels.pack` stores them.
  """

  codes: Array
  scale: Array
  zero: Array
  bits: int
  signed: bool

  @property
  def groups(self) -> int:
    return self.scale.shape[-1]

  def dequantize(self) -> Array:
    """`scale * (codes - zero)` per sub-group, `codes`' shape."""
    cg = group_view(self.codes, self.groups)
    return (per_group(self.scale) * (cg - per_group(self.zero))).reshape(self.codes.shape)

  def int_codes(self) -> Array:
    """The codes as int32 (what `kernels.pack` takes)."""
    return self.codes.astype(jnp.int32)


def sign_codes(x: Array) -> Array:
  """sign(x) in {-1, +1} with sign(0) = +1 (exactly two values), x's dtype: the 1-bit codes of
  every quantizer, of `ste.sign_ste`'s forward and of the packed sign bits."""
  return jnp.where(x >= 0, 1.0, -1.0).astype(x.dtype)


def signs(w: Array, scale: Array | None = None, groups: int = 1) -> QArray:
  """Codes sign(w), times `scale` `[G]` (default 1 in each of `groups`)."""
  scale = jnp.ones((groups,), jnp.float32) if scale is None else jnp.asarray(scale)
  return QArray(sign_codes(w), scale, jnp.zeros_like(scale), 1, True)


def symmetric(w: Array, scale: Array, bits: int) -> QArray:
  """The signed b-bit grid of step `scale` `[G]` (positive): sign codes at 1 bit."""
  if bits == 1:
    return signs(w, scale)
  q_neg, q_pos = symmetric_levels(bits)
  wg = group_view(w, scale.shape[-1])
  codes = jnp.round(jnp.clip(wg / per_group(scale), -q_neg, q_pos)).reshape(w.shape)
  return QArray(codes, scale, jnp.zeros_like(scale), bits, True)


def index(w: Array, lo: Array, hi: Array, bits: int) -> QArray:
  """AQ-BERT's asymmetric grid: 2^b levels from `lo` to `hi` `[G]` per sub-group."""
  span = jnp.maximum(hi - lo, MIN_SCALE)
  scale = span / (2.0**bits - 1.0)
  wg = group_view(w, lo.shape[-1])
  codes = jnp.round((jnp.clip(wg, per_group(lo), per_group(hi)) - per_group(lo)) /
                    per_group(scale)).reshape(w.shape)
  return QArray(codes, scale, -lo / scale, bits, False)
