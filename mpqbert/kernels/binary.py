"""Binary (1-bit) matmul: sign bits packed into uint32 words, XNOR-popcount products.

For a, b in {-1, +1}^K, `a . b = K - 2 * popcount(bits(a) XOR bits(b))`, where bit 1 stands for
+1 (sign(0) = +1, as `mpqbert.quant.sign_ste`). Vectors are packed along their last axis, 32
entries per word, entry `32 * i + j` in bit `j` of word `i`; a length that is not a multiple of 32
is padded with 0 bits in both operands, which XOR to 0 and so add nothing to the popcount.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
WORD_BITS = 32


def packed_words(length: int) -> int:
  """uint32 words holding `length` sign bits."""
  return -(-length // WORD_BITS)


def pack_signs(x: Array) -> Array:
  """`[..., K]` real values -> `[..., ceil(K / 32)]` uint32 words of their sign bits (1: x >= 0)."""
  k = x.shape[-1]
  pad = packed_words(k) * WORD_BITS - k
  bits = jnp.pad((x >= 0).astype(jnp.uint32), [(0, 0)] * (x.ndim - 1) + [(0, pad)])
  bits = bits.reshape(*x.shape[:-1], -1, WORD_BITS)
  shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32)
  return jnp.sum(bits << shifts, axis=-1, dtype=jnp.uint32)


def xnor_matmul(x_words: Array, w_words: Array, length: int, *, block: int = 256) -> Array:
  """Products of packed sign vectors: `[M, W] x [N, W] -> [M, N]` int32, `K - 2 popcount(xor)`.

  `w_words` holds one packed row per output (the transposed `[K, N]` kernel, packed along K);
  `length` is K. The reference computes `block` outputs at a time so that the `[M, block, W]`
  XOR stays small.
  """
  if x_words.shape[-1] != w_words.shape[-1]:
    raise ValueError(f"packed operands disagree on words per row: {x_words.shape[-1]} vs "
                     f"{w_words.shape[-1]}; pack both along the same contraction length.")
  if packed_words(length) != x_words.shape[-1]:
    raise ValueError(f"length {length} does not fit {x_words.shape[-1]} words per row.")
  n = w_words.shape[0]
  pad = -n % block
  blocks = jnp.pad(w_words, ((0, pad), (0, 0))).reshape(-1, block, w_words.shape[-1])

  def one_block(w_block):
    ones = jax.lax.population_count(x_words[:, None, :] ^ w_block[None, :, :])
    return length - 2 * jnp.sum(ones.astype(jnp.int32), axis=-1)

  out = jax.lax.map(one_block, blocks)  # [n_blocks, M, block]
  return jnp.moveaxis(out, 0, 1).reshape(x_words.shape[0], -1)[:, :n]
