"""The model's contractions in a compute dtype, accumulated in float32, forward and backward.

`einsum(spec, a, b, dtype)` is every matmul of the BERT: Dense layers and both attention
products. With `dtype=float32` it is a plain float32 einsum. With `dtype=bfloat16` both operands
are cast to bfloat16 and multiplied with float32 accumulation and a float32 result, and the
backward pass does the same: the incoming gradient is cast to bfloat16 and each operand's
gradient is a bfloat16 x bfloat16 -> float32 product, returned in that operand's own dtype (a
float32 weight gets a float32 gradient).

Why a custom gradient: XLA:CPU runs a bfloat16 matmul on its fast path (AMX / AVX-512 BF16
through YNNPACK) only when both operands are bfloat16 and the result is float32. A bfloat16
result, or JAX's own transpose of a float32-accumulated product (which multiplies the float32
gradient by a bfloat16 operand), is converted to a float32 matmul: 2.6-4.9x slower on this
project's CPU. See experiments/results/pipeline_throughput.md.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
DType = Any


def _parse(spec: str) -> tuple[str, str, str]:
  inputs, out = spec.replace(" ", "").split("->")
  lhs, rhs = inputs.split(",")
  for name, operand in (("first", lhs), ("second", rhs)):
    if set(operand) - set(out) - set(lhs if operand is rhs else rhs):
      raise ValueError(f"einsum {spec!r}: the {name} operand has an index found in no other "
                       "term; sum it out before the product.")
  return lhs, rhs, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _low_precision_einsum(spec: str, a: Array, b: Array, dtype: DType) -> Array:
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _forward(spec, a, b, dtype):
  a_low, b_low = a.astype(dtype), b.astype(dtype)
  out = jnp.einsum(spec, a_low, b_low, preferred_element_type=jnp.float32)
  # Residuals: the low-precision operands (half the memory) and zero-size dtype carriers.
  return out, (a_low, b_low, jnp.zeros((0,), a.dtype), jnp.zeros((0,), b.dtype))


def _backward(spec, dtype, residuals, g):
  a_low, b_low, a_like, b_like = residuals
  lhs, rhs, out = _parse(spec)
  g_low = g.astype(dtype)
  grad_a = jnp.einsum(f"{out},{rhs}->{lhs}", g_low, b_low, preferred_element_type=jnp.float32)
  grad_b = jnp.einsum(f"{lhs},{out}->{rhs}", a_low, g_low, preferred_element_type=jnp.float32)
  return grad_a.astype(a_like.dtype), grad_b.astype(b_like.dtype)


_low_precision_einsum.defvjp(_forward, _backward)


def einsum(spec: str, a: Array, b: Array, dtype: DType = jnp.float32) -> Array:
  """`jnp.einsum(spec, a, b)` computed in `dtype` with float32 accumulation; float32 result.

  Every index of one operand must appear in the other operand or the output (true of a matmul
  or a batched matmul), so that both gradients are einsums of the same kind.
  """
  if jnp.dtype(dtype) == jnp.float32:
    return jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32))
  _parse(spec)
  return _low_precision_einsum(spec, a, b, jnp.dtype(dtype))
