"""Binary (1-bit) matmul: sign bits packed into uint32 words, XNOR-popcount products.

For a, b in {-1, +1}^K, `a . b = K - 2 * popcount(bits(a) XOR bits(b))`, where bit 1 stands for
+1 (sign(0) = +1, as `mpqbert.quant.sign_ste`). Signs use the 1-bit layout of `packing`
(plane-major along K): activations `[M, K] -> [M, K_w]` packed along their last axis, weights
`[K, N] -> [K_w, N]` along their first. Codes past K are 0 bits in both operands, so they XOR to 0
and add nothing to the popcount.

`xnor_matmul` is a Pallas kernel (grid over output tiles, a loop over the words of K in which
each step XORs a column of activation words with a row of weight words and adds the popcounts)
with `xnor_matmul_reference` (pure jnp) as its reference and its "reference" backend.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mpqbert.kernels import compat, packing

Array = jax.Array


def pack_signs(x: Array, axis: int = -1) -> Array:
  """Real values -> uint32 words of their sign bits (1: x >= 0), packed along `axis`."""
  signs = jnp.where(jnp.moveaxis(jnp.asarray(x), axis, 0) >= 0, 1, -1).astype(jnp.int32)
  return jnp.moveaxis(packing.pack(signs, 1, signed=True), 0, axis)


def _check(x_words: Array, w_words: Array, length: int, scale: Array | None,
           bias: Array | None) -> None:
  if x_words.dtype != jnp.uint32 or w_words.dtype != jnp.uint32:
    raise TypeError(f"xnor_matmul takes uint32 sign words (pack_signs), got {x_words.dtype} and "
                    f"{w_words.dtype}.")
  if x_words.ndim != 2 or w_words.ndim != 2 or x_words.shape[1] != w_words.shape[0]:
    raise ValueError(f"xnor_matmul multiplies [M, K_w] by [K_w, N] words; got "
                     f"{list(x_words.shape)} and {list(w_words.shape)}: pack activations along "
                     "their last axis and weights along their first, for the same K.")
  if packing.word_rows(length, 1) != x_words.shape[1]:
    raise ValueError(f"length {length} does not fit {x_words.shape[1]} words per row "
                     f"(K={length} takes {packing.word_rows(length, 1)}).")
  n = w_words.shape[1]
  for name, v in (("scale", scale), ("bias", bias)):
    if v is not None and v.shape != (n,):
      raise ValueError(f"{name} must have shape ({n},) (one per output), got {v.shape}.")


def _epilogue(counts: Array, scale: Array | None, bias: Array | None) -> Array:
  if scale is None and bias is None:
    return counts
  y = counts.astype(jnp.float32)
  y = y if scale is None else y * scale
  return y if bias is None else y + bias


def xnor_matmul_reference(x_words: Array, w_words: Array, length: int, *,
                          scale: Array | None = None, bias: Array | None = None,
                          block: int = 256) -> Array:
  """Pure-jnp `[M, K_w] x [K_w, N]`: int32 `K - 2 popcount(xor)`, or float32 `* scale + bias`.

  Computes `block` outputs at a time so that the `[M, K_w, block]` XOR stays small.
  """
  _check(x_words, w_words, length, scale, bias)
  n = w_words.shape[1]
  blocks = jnp.pad(w_words, ((0, 0), (0, -n % block))).reshape(w_words.shape[0], -1, block)

  def one_block(w_block):  # [K_w, block]
    ones = jax.lax.population_count(x_words[:, :, None] ^ w_block[None, :, :])
    return length - 2 * jnp.sum(ones.astype(jnp.int32), axis=1)

  out = jax.lax.map(one_block, jnp.moveaxis(blocks, 1, 0))  # [n_blocks, M, block]
  counts = jnp.moveaxis(out, 0, 1).reshape(x_words.shape[0], -1)[:, :n]
  return _epilogue(counts, scale, bias)


def popcount32(v: Array) -> Array:
  """Set bits of each uint32 by shifts, masks and one multiply (SWAR).

  The kernel's popcount: Pallas's Triton lowering (JAX 0.11) cannot lower `lax.population_count`
  (`math.ctpop` is left illegal), and these integer ops lower everywhere. The reference keeps
  `lax.population_count`, so the tests compare two independent counts.
  """
  v = v - ((v >> 1) & jnp.uint32(0x55555555))
  v = (v & jnp.uint32(0x33333333)) + ((v >> 2) & jnp.uint32(0x33333333))
  v = (v + (v >> 4)) & jnp.uint32(0x0F0F0F0F)
  return ((v * jnp.uint32(0x01010101)) >> 24).astype(jnp.int32)


def _xnor_kernel(x_ref, w_ref, o_ref, *, length: int, words: int):
  """One output tile: for each word, XOR a column of x words with a row of w words."""
  def body(c, acc):
    x_col = x_ref[:, pl.ds(c, 1)]  # [block_m, 1]
    w_row = w_ref[pl.ds(c, 1), :]  # [1, block_n]
    return acc + popcount32(x_col ^ w_row)

  ones = jax.lax.fori_loop(0, words, body, jnp.zeros(o_ref.shape, jnp.int32))
  o_ref[...] = length - 2 * ones


@functools.partial(jax.jit, static_argnames=("length", "backend", "block_m", "block_n"))
def xnor_matmul(x_words: Array, w_words: Array, length: int, *, scale: Array | None = None,
                bias: Array | None = None, backend: str = "auto", block_m: int | None = None,
                block_n: int | None = None) -> Array:
  """`x_words [M, K_w] x w_words [K_w, N]`, both from `pack_signs` for the same K = `length`.

  Returns the int32 ±1 dot products `K - 2 popcount(x XOR w)`, or, given `scale` and/or `bias`
  (`[N]`), float32 `products * scale + bias`. `backend`: see `compat`.
  """
  _check(x_words, w_words, length, scale, bias)
  backend = compat.resolve_backend(backend)
  if backend == "reference":
    return xnor_matmul_reference(x_words, w_words, length, scale=scale, bias=bias)
  (m, words), n = x_words.shape, w_words.shape[1]
  if m == 0:
    return _epilogue(jnp.zeros((0, n), jnp.int32), scale, bias)
  tpu = backend in ("mosaic_tpu", "tpu_interpret")
  block_m = block_m or min(compat.power_of_two_at_least(m, 8 if tpu else 16), 64)
  block_n = block_n or min(compat.power_of_two_at_least(n, 128 if tpu else 16), 128)
  xp = jnp.pad(x_words, ((0, -m % block_m), (0, 0)))
  wp = jnp.pad(w_words, ((0, 0), (0, -n % block_n)))
  counts = pl.pallas_call(
      functools.partial(_xnor_kernel, length=length, words=words),
      out_shape=jax.ShapeDtypeStruct((xp.shape[0], wp.shape[1]), jnp.int32),
      grid=(xp.shape[0] // block_m, wp.shape[1] // block_n),
      in_specs=[pl.BlockSpec((block_m, words), lambda i, j: (i, 0)),
                pl.BlockSpec((words, block_n), lambda i, j: (0, j))],
      out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
      name="xnor_matmul",
      **compat.pallas_call_options(backend),
  )(xp, wp)
  return _epilogue(counts[:m, :n], scale, bias)
