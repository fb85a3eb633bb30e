"""The integer grid of every weight quantizer: one `QArray` from training to disk.

A `QArray` holds integer codes with a scale and a zero point per sub-group (the last axis split
into `G` contiguous column blocks, as everywhere in `quant`; `group_widths`):

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
import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Smallest step size (a normal float32): an all-zero group gets this instead of a 0 that would
# divide to NaN.
MIN_SCALE = 1e-12


def group_widths(out: int, groups: int) -> tuple[int, ...]:
  """Columns of each of `groups` sub-groups of `out` columns: ceil(out / groups) each, the last
  one what remains (smaller when `groups` does not divide `out`).

  Raises when the last sub-group would be empty (e.g. 9 columns in 4 groups of 3), naming the
  nearest counts that work.
  """
  out, groups = int(out), int(groups)
  if groups < 1 or out < 1:
    raise ValueError(f"cannot split {out} columns into {groups} sub-groups; use a count from 1 "
                     f"to {max(out, 1)}.")
  width = -(-out // groups)
  last = out - (groups - 1) * width
  if last <= 0:
    fits = lambda g: out - (g - 1) * -(-out // g) > 0
    below = max(g for g in range(1, groups) if fits(g))
    above = next((g for g in range(groups + 1, out + 1) if fits(g)), None)
    nearest = f"{below}" + ("" if above is None else f" or {above}")
    raise ValueError(f"cannot split {out} columns into {groups} sub-groups: the first "
                     f"{groups - 1}, of ceil({out} / {groups}) = {width} columns each, take "
                     f"{(groups - 1) * width} >= {out} and leave the last one empty. Use {nearest} "
                     f"groups (any count G with (G - 1) * ceil({out} / G) < {out}, e.g. a divisor "
                     f"of {out}).")
  return (width,) * (groups - 1) + (last,)


def group_view(w: Array, groups: int) -> Array:
  """`[..., out] -> [..., groups, width]`, width = ceil(out / groups); the inverse is `ungroup`.

  A reshape when `groups` divides `out`; otherwise the last sub-group is zero-padded to `width`
  columns, which elementwise work may touch but per-group reductions (`group_sum`, `group_max`,
  `group_min`, `group_mean`) skip and `ungroup` drops.
  """
  out = w.shape[-1]
  width = group_widths(out, groups)[0]
  if groups * width != out:
    w = jnp.pad(w, [(0, 0)] * (w.ndim - 1) + [(0, groups * width - out)])
  return w.reshape(*w.shape[:-1], groups, width)


def ungroup(view: Array, out: int) -> Array:
  """A group view back to `[..., out]`, without the padding of an uneven last sub-group."""
  flat = view.reshape(*view.shape[:-2], view.shape[-2] * view.shape[-1])
  return flat if flat.shape[-1] == out else flat[..., :out]


def per_group(values: Array) -> Array:
  """`[G]` -> `[G, 1]`, broadcastable against a group view."""
  return jnp.asarray(values)[..., None]


def _reduce_axes(view: Array) -> tuple[int, ...]:
  """Axes of a group view that a per-group reduction runs over (all but the group axis)."""
  return tuple(i for i in range(view.ndim) if i != view.ndim - 2)


def _padding(view: Array, out: int) -> np.ndarray | None:
  """`[G, width]` True on the padding of a group view of `out` columns; None when there is none."""
  groups, width = view.shape[-2:]
  if groups * width == out:
    return None
  return (np.arange(groups * width) >= out).reshape(groups, width)


def group_sum(view: Array, out: int) -> Array:
  """`[G]`: the sum of each sub-group of a group view of `out` columns (padding excluded)."""
  pad = _padding(view, out)
  return jnp.sum(view if pad is None else jnp.where(pad, 0.0, view), axis=_reduce_axes(view))


def group_max(view: Array, out: int) -> Array:
  """`[G]`: the max of each sub-group; the padding takes a real value of its group (its first
  column, never padding), so it cannot win."""
  pad = _padding(view, out)
  return jnp.max(view if pad is None else jnp.where(pad, view[..., :1], view),
                 axis=_reduce_axes(view))


def group_min(view: Array, out: int) -> Array:
  """`[G]`: the min of each sub-group (padding as in `group_max`)."""
  pad = _padding(view, out)
  return jnp.min(view if pad is None else jnp.where(pad, view[..., :1], view),
                 axis=_reduce_axes(view))


def group_mean(view: Array, out: int) -> Array:
  """`[G]`: the mean of each sub-group over its own element count (padding excluded)."""
  if _padding(view, out) is None:
    return jnp.mean(view, axis=_reduce_axes(view))
  rows = math.prod(view.shape[:-2])
  count = rows * np.asarray(group_widths(out, view.shape[-2]), np.float32)
  return group_sum(view, out) / count


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
    return ungroup(per_group(self.scale) * (cg - per_group(self.zero)), self.codes.shape[-1])

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
  codes = ungroup(jnp.round(jnp.clip(wg / per_group(scale), -q_neg, q_pos)), w.shape[-1])
  return QArray(codes, scale, jnp.zeros_like(scale), bits, True)


def index(w: Array, lo: Array, hi: Array, bits: int) -> QArray:
  """AQ-BERT's asymmetric grid: 2^b levels from `lo` to `hi` `[G]` per sub-group."""
  span = jnp.maximum(hi - lo, MIN_SCALE)
  scale = span / (2.0**bits - 1.0)
  wg = group_view(w, lo.shape[-1])
  codes = ungroup(jnp.round((jnp.clip(wg, per_group(lo), per_group(hi)) - per_group(lo)) /
                            per_group(scale)), w.shape[-1])
  return QArray(codes, scale, -lo / scale, bits, False)
