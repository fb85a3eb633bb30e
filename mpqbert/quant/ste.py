"""Straight-through estimators, defined once at module level.

Each one has an exact forward (the true rounding / sign) and a hand-written backward, so the
forward value is bit-for-bit the quantized value (no `x + stop_gradient(q - x)` round-off) and the
gradient rule is visible in one place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mpqbert.quant.grid import sign_codes

Array = jax.Array


@jax.custom_vjp
def round_ste(x: Array) -> Array:
  """`round(x)` (half to even) forward; identity gradient backward."""
  return jnp.round(x)


def _round_fwd(x):
  return jnp.round(x), None


def _round_bwd(_, g):
  return (g,)


round_ste.defvjp(_round_fwd, _round_bwd)


@jax.custom_vjp
def sign_ste(x: Array, clip: float | Array = 1.0) -> Array:
  """`sign(x)` with sign(0) = +1 (so exactly two values) forward; clipped identity backward.

  The gradient is `g` where |x| <= clip and 0 outside (the hard-tanh straight-through estimator
  of BinaryConnect / XNOR-Net). `clip` gets no gradient.
  """
  return sign_codes(x)


def _sign_fwd(x, clip):
  return sign_codes(x), (x, clip)


def _sign_bwd(residuals, g):
  x, clip = residuals
  return jnp.where(jnp.abs(x) <= clip, g, 0.0).astype(g.dtype), jnp.zeros_like(clip)


sign_ste.defvjp(_sign_fwd, _sign_bwd)


@jax.custom_vjp
def scale_grad(x: Array, factor: float | Array) -> Array:
  """Identity forward; multiplies the incoming gradient by `factor` (LSQ's step-size gradient
  scale 1/sqrt(n * q_max)). `factor` gets no gradient."""
  return x


def _scale_grad_fwd(x, factor):
  return x, factor


def _scale_grad_bwd(factor, g):
  return (g * factor).astype(g.dtype), jnp.zeros_like(factor)


scale_grad.defvjp(_scale_grad_fwd, _scale_grad_bwd)
