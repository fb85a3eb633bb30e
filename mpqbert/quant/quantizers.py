"""Quantizers: pure functions `(w, qparams...) -> w_hat` over any array, per sub-group.

Sub-groups split the LAST axis (a Dense kernel's output neurons, `[in, out]`) into `G`
contiguous blocks of ceil(out / G) columns, the last one what remains (`grid.group_widths`):
`[..., out] -> [..., G, ceil(out / G)]`, the uneven last block padded in the view and left out of
every per-group statistic (`grid.group_sum` etc.). A per-group quantity (scale, range, bits)
has shape `[G]`. G = 1 is per-tensor, G = out is per-neuron; with Hugging Face's head-major layout
G = num_heads makes one group per attention head of Q, K and V.

Each quantizer's forward value is its `grid.QArray` dequantized (the integer grids, and the codes
an exported checkpoint stores, are written once, in `grid`); this module adds the gradients:
  symmetric  s * clip(round(w / s), -2^(b-1), 2^(b-1) - 1), b in 2..8, learned s (LSQ);
             s * sign(w) in {-s, +s}, sign(0) = +1, b = 1, learned s (codes +-1)
  index      AQ-BERT's asymmetric grid on [lo, hi] (learned or min-max)
  sign       sign(w) in {-1, +1}, no scale (SensiMix's 1-bit value quantization)
  xnor       mean|w| * sign(w) per group (XNOR-Net)
  prune      0 (0 bits), no gradient to w
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from mpqbert.quant import grid
from mpqbert.quant.grid import (MIN_SCALE, group_max, group_mean, group_min, group_sum,
                                group_view, group_widths, per_group, symmetric_levels, ungroup)
from mpqbert.quant.ste import round_ste, scale_grad, sign_ste

Array = jax.Array


def _lsq_code_max(bits: int) -> float:
  """LSQ's Q_P in the step size's gradient scale 1/sqrt(n * Q_P): the largest positive code,
  2^(b-1) - 1 for b >= 2 and 1 for the 1-bit grid {-1, +1}."""
  return 1.0 if bits == 1 else symmetric_levels(bits)[1]


def quantize_symmetric(w: Array, scale: Array, bits: int, *, lsq_grad: bool = True) -> Array:
  """Symmetric uniform b-bit quantization with a learned step size per sub-group (LSQ).

  Args:
    w: any array; sub-groups split its last axis.
    scale: `[G]` positive step sizes.
    bits: 1..8. 1 bit is `s * sign(w)` with sign(0) = +1 (`_scaled_sign`): the codes {-1, +1}
      of the sign / xnor quantizers, with a learned scale like the other widths.
    lsq_grad: scale the step size's gradient by 1/sqrt(n * Q_P), n = elements of the group (its
      own count in an uneven last group), Q_P the largest positive code (`_lsq_code_max`; 1 at
      1 bit) (LSQ).
  Gradients, 2..8 bits (`_lsq_bwd`): to `w` identity inside the grid range, 0 outside; to `scale`
  LSQ's `round(w/s) - w/s` inside, `-q_neg` / `q_pos` outside, summed over the group.
  1 bit (`_scaled_sign_bwd`): to `w` identity where |w| <= s, 0 outside; to `scale` the exact
  derivative of s * sign(w), i.e. sign(w), summed over the group.
  """
  if not 1 <= bits <= 8:
    raise ValueError(f"symmetric quantization supports 1..8 bits, got {bits}; use prune for 0.")
  groups = scale.shape[-1]
  if lsq_grad:
    scale = scale_grad(scale, _lsq_grad_factor(w.shape, groups, bits))
  scale = positive_step(scale)
  return _scaled_sign(w, scale) if bits == 1 else _lsq(w, scale, bits)


def _lsq_grad_factor(shape: tuple[int, ...], groups: int, bits: int) -> float | np.ndarray:
  """LSQ's 1/sqrt(n * Q_P) per sub-group: one float when the groups are equal, else `[G]`."""
  widths = group_widths(shape[-1], groups)
  rows = math.prod(shape[:-1])
  if len(set(widths)) == 1:
    return 1.0 / math.sqrt(rows * widths[0] * _lsq_code_max(bits))
  return (1.0 / np.sqrt(rows * np.asarray(widths, np.float64) * _lsq_code_max(bits))
          ).astype(np.float32)


@jax.custom_vjp
def positive_step(scale: Array) -> Array:
  """`max(scale, MIN_SCALE)` with the gradient of the identity: a learned step size that an
  update pushed to or below 0 still quantizes (never a division by <= 0), and its gradient can
  bring it back (`max`'s own gradient would be 0 there, and the step stuck)."""
  return jnp.maximum(scale, MIN_SCALE)


positive_step.defvjp(lambda scale: (positive_step(scale), None), lambda _, g: (g,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _lsq(w: Array, scale: Array, bits: int) -> Array:
  """`grid.symmetric(w, scale, bits)` dequantized: `s * clip(round(w / s), -q_neg, q_pos)`."""
  return grid.symmetric(w, scale, bits).dequantize()


def _lsq_fwd(w, scale, bits):
  # Only the inputs are kept; the backward recomputes w / s (cheaper than storing masks).
  return _lsq(w, scale, bits), (w, scale)


def _lsq_bwd(bits, residuals, g):
  w, scale = residuals
  q_neg, q_pos = symmetric_levels(bits)
  wg, gg = group_view(w, scale.shape[-1]), group_view(g, scale.shape[-1])
  v = wg / per_group(scale)
  inside = (v >= -q_neg) & (v <= q_pos)
  code = jnp.round(jnp.clip(v, -q_neg, q_pos))
  grad_w = ungroup(jnp.where(inside, gg, 0.0), w.shape[-1])
  per_element = gg * jnp.where(inside, code - v, code)
  grad_s = group_sum(per_element, w.shape[-1])
  return grad_w.astype(w.dtype), grad_s.astype(scale.dtype)


_lsq.defvjp(_lsq_fwd, _lsq_bwd)


@jax.custom_vjp
def _scaled_sign(w: Array, scale: Array) -> Array:
  """`grid.signs(w, scale)` dequantized, `s * sign(w)`: the 1-bit symmetric quantizer."""
  return grid.signs(w, scale).dequantize()


def _scaled_sign_fwd(w, scale):
  return _scaled_sign(w, scale), (w, scale)


def _scaled_sign_bwd(residuals, g):
  # To w: straight through where |w| <= s, the 1-bit analogue of the other widths' clipped grid
  # range (the hard-tanh STE of BinaryConnect, in units of s). To s: d(s sign(w))/ds = sign(w).
  w, scale = residuals
  wg, gg, s = group_view(w, scale.shape[-1]), group_view(g, scale.shape[-1]), per_group(scale)
  grad_w = ungroup(jnp.where(jnp.abs(wg) <= s, gg, 0.0), w.shape[-1])
  grad_s = group_sum(gg * grid.sign_codes(wg), w.shape[-1])
  return grad_w.astype(w.dtype), grad_s.astype(scale.dtype)


_scaled_sign.defvjp(_scaled_sign_fwd, _scaled_sign_bwd)


def quantize_index(w: Array, lo: Array, hi: Array, bits: int) -> Array:
  """AQ-BERT's asymmetric ("index") quantization with range [lo, hi] per sub-group.

  `q = (2^b - 1) / (hi - lo)`, code `round(q * (clip(w, lo, hi) - lo))` in 0..2^b - 1, value
  `code / q + lo`. Gradient to `w` is identity inside [lo, hi]; `lo` / `hi` get gradients too, so
  they can be learned (pass `jax.lax.stop_gradient` ranges to keep them fixed).
  """
  if not 1 <= bits <= 8:
    raise ValueError(f"index quantization supports 1..8 bits, got {bits}.")
  return _index(w, lo, hi, bits)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _index(w: Array, lo: Array, hi: Array, bits: int) -> Array:
  """`grid.index(w, lo, hi, bits)` dequantized."""
  return grid.index(w, lo, hi, bits).dequantize()


def _index_surrogate(w: Array, lo: Array, hi: Array, bits: int) -> Array:
  """The function whose gradient the index quantizer uses: its grid with rounding as identity
  (`round_ste`), so the range gets the rounding residual's gradient too."""
  wg = group_view(w, lo.shape[-1])
  lo_g, hi_g = per_group(lo), per_group(hi)
  q = (2.0**bits - 1.0) / jnp.maximum(hi_g - lo_g, MIN_SCALE)
  return ungroup(round_ste(q * (jnp.clip(wg, lo_g, hi_g) - lo_g)) / q + lo_g, w.shape[-1])


def _index_fwd(w, lo, hi, bits):
  return _index(w, lo, hi, bits), (w, lo, hi)


def _index_bwd(bits, residuals, g):
  w, lo, hi = residuals
  return jax.vjp(lambda *args: _index_surrogate(*args, bits), w, lo, hi)[1](g)


_index.defvjp(_index_fwd, _index_bwd)


def minmax_range(w: Array, groups: int) -> tuple[Array, Array]:
  """Per-group (min, max) of `w`, without gradient: the range of min-max index quantization."""
  wg = jax.lax.stop_gradient(group_view(w, groups))
  return group_min(wg, w.shape[-1]), group_max(wg, w.shape[-1])


def binarize_sign(w: Array, clip: float = 1.0) -> Array:
  """sign(w) in {-1, +1}, no scale (SensiMix); gradient identity for |w| <= clip (every w for
  clip = inf)."""
  return sign_ste(w, clip)


def xnor_scale(w: Array, groups: int) -> Array:
  """The XNOR-Net scale mean|w| per sub-group `[G]`, its mantissa cut so that the product with
  any count of +-1 terms along the reduction axis is exact in float32.

  Then a float matmul of binary inputs with `scale * sign(w)` (training) and the XNOR-popcount
  integer times `scale` (inference) agree bit for bit: with sign inputs downstream, a last-bit
  difference could otherwise flip a sign and the prediction. The cut keeps
  `24 - ceil(log2(K + 1))` significant bits (12 for K = 1536); the gradient is straight-through.
  """
  alpha = group_mean(jnp.abs(group_view(w, groups)), w.shape[-1])
  length = math.prod(w.shape[:-1])
  bits = 24 - math.ceil(math.log2(length + 1))
  mantissa, exponent = jnp.frexp(jax.lax.stop_gradient(alpha))
  cut = jnp.ldexp(jnp.round(mantissa * 2.0**bits) / 2.0**bits, exponent)
  return alpha + jax.lax.stop_gradient(cut - alpha)


def binarize_xnor(w: Array, groups: int, clip: float = 1.0) -> Array:
  """`xnor_scale` * sign(w) per sub-group (XNOR-Net); the scale's gradient flows to `w` too."""
  wg = group_view(w, groups)
  # The forward value is grid.signs(w, xnor_scale) dequantized: sign_ste's codes times the scale.
  return ungroup(per_group(xnor_scale(w, groups)) * sign_ste(wg, clip), w.shape[-1])


def prune(w: Array) -> Array:
  """0 bits: exactly zero, and no gradient reaches `w`."""
  return jnp.zeros_like(w)


def quantize_activation(x: Array, scale: Array, bits: int = 8, *, learned: bool = True) -> Array:
  """Per-tensor symmetric b-bit quantization of a Dense input.

  `scale` is a scalar step size: learned (LSQ gradient) or, with `learned=False`, a tracked
  statistic (max|x| / q_pos, moving average) that gets no gradient. A scale of exactly 0 (its
  initial value) means "not calibrated yet" and passes `x` through unchanged, so the first
  calibration pass sees real activations; a learned scale trained to below 0 still quantizes,
  at `positive_step`'s floor.
  """
  scale = jnp.asarray(scale, jnp.float32)
  if not learned:
    scale = jax.lax.stop_gradient(scale)
  # An elementwise select on the scalar "calibrated" flag, not `lax.cond`: a conditional on a
  # GPU copies its predicate to the host, once per quantized input per step. XLA fuses the select
  # into the quantizer's own pass; on CPU it timed as fast as the branch, with identical values
  # and gradients (the uncalibrated side takes a dummy step of 1). The grid is computed in float32
  # and returned in x's dtype (bfloat16 runs).
  calibrated = scale != 0
  x_hat = quantize_symmetric(x, jnp.where(calibrated, scale, 1.0).reshape(1), bits,
                             lsq_grad=learned).astype(x.dtype)
  return jnp.where(calibrated, x_hat, x)


def absmax_scale(x: Array, bits: int) -> Array:
  """max|x| / q_pos: the scale under which the largest |x| lands on the top of the grid."""
  _, q_pos = symmetric_levels(bits)
  return jnp.maximum(jnp.max(jnp.abs(x)) / q_pos, MIN_SCALE)


@functools.partial(jax.jit, static_argnames=("groups", "bits", "method"))
def init_symmetric_scale(w: Array, groups: int, bits: int, method: str = "mse") -> Array:
  """Initial step sizes `[G]` for `quantize_symmetric`, from the weights (compiled once per
  weight shape and setting: run op by op, the MSE search took ~12 s per BERT-sized spec).

  method:
    "lsq"     2 * mean|w| / sqrt(q_pos) (the LSQ paper's rule);
    "absmax"  max|w| / q_pos (no clipping);
    "mse"     the scale among 100 fractions of absmax that minimises the squared error per group
              (best for post-training quantization at low bit-widths).
  At 1 bit every method gives mean|w| per group, the exact minimiser of sum (w - s sign(w))^2
  (closed form; XNOR-Net's scale): with no grid to fit, "absmax" (max|w|) and "lsq" (2 mean|w|)
  would only start above that optimum.
  """
  if method not in ("lsq", "absmax", "mse"):
    raise ValueError(f"unknown scale init {method!r}; use 'lsq', 'absmax' or 'mse'.")
  out = w.shape[-1]
  wg = jax.lax.stop_gradient(group_view(w, groups))
  if bits == 1:
    return jnp.maximum(group_mean(jnp.abs(wg), out), MIN_SCALE)
  _, q_pos = symmetric_levels(bits)
  absmax = group_max(jnp.abs(wg), out)
  if method == "lsq":
    return jnp.maximum(2.0 * group_mean(jnp.abs(wg), out) / math.sqrt(q_pos), MIN_SCALE)
  if method == "absmax":
    return jnp.maximum(absmax / q_pos, MIN_SCALE)
  # "mse": a grid search over fractions of the absmax scale.
  fractions = jnp.linspace(0.01, 1.0, 100)
  w_fixed = jax.lax.stop_gradient(w)

  def error(fraction):
    scale = jnp.maximum(fraction * absmax / q_pos, MIN_SCALE)
    w_hat = quantize_symmetric(w_fixed, scale, bits, lsq_grad=False)
    return group_sum(jnp.square(group_view(w_hat - w_fixed, groups)), out)

  errors = jax.lax.map(error, fractions)  # [100, G]
  return jnp.maximum(fractions[jnp.argmin(errors, axis=0)] * absmax / q_pos, MIN_SCALE)
