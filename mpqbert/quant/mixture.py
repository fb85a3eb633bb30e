"""Gumbel-softmax precision selection and the searched (mixed) weight.

Per (matrix, sub-group) the search holds logits over a tuple of bit choices. A sample
`p = gumbel_softmax(logits, key, tau)` weighs the quantized versions of the weight:
`w_hat = sum_k p_k * Q_{b_k}(w)`, computed on the weight (small) so the layer still runs one
matmul. A fixed policy is the same formula with one-hot `p`, so search, fine-tuning under a
policy and post-training quantization share one code path.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from mpqbert.quant.grid import group_view, ungroup

Array = jax.Array


def gumbel_softmax(logits: Array, key: jax.Array | None, tau: float | Array = 1.0,
                   hard: bool = False) -> Array:
  """softmax((logits + Gumbel noise) / tau) over the last axis.

  `key=None` drops the noise (the deterministic relaxation, for evaluation). `hard=True` returns
  the one-hot argmax in the forward pass with the soft sample's gradient (straight-through).
  """
  if key is not None:
    logits = logits + jax.random.gumbel(key, logits.shape, logits.dtype)
  soft = jax.nn.softmax(logits / tau, axis=-1)
  if not hard:
    return soft
  one_hot = jax.nn.one_hot(jnp.argmax(soft, axis=-1), soft.shape[-1], dtype=soft.dtype)
  return one_hot + (soft - jax.lax.stop_gradient(soft))  # exactly one-hot forward


def one_hot_bits(bits: Array, bit_choices: Sequence[int]) -> Array:
  """`[G]` bit-widths -> `[G, K]` one-hot over `bit_choices`.

  A bit-width outside `bit_choices` would give an all-zero row (a zero weight): policies are
  checked against the spec before they get here (`Policy.check_matches`).
  """
  return (jnp.asarray(bits)[..., None] == jnp.asarray(bit_choices)[None, :]).astype(jnp.float32)


def mix(w: Array, probs: Array, quantize_choice: Callable[[Array, int], Array]) -> Array:
  """`sum_k probs[g, k] * quantize_choice(w, k)`, per sub-group g of `w`'s last axis.

  `probs` is `[G, K]`; `quantize_choice(w, k)` returns `w` quantized with the k-th bit choice.
  A one-hot row reproduces that quantizer exactly (the other terms add exact zeros).
  """
  groups, choices = probs.shape
  mixed = 0.0
  for k in range(choices):
    mixed = mixed + group_view(quantize_choice(w, k), groups) * probs[:, k, None]
  return ungroup(mixed, w.shape[-1])


def expected_bits(probs: Array, choice_bits: Any) -> Array:
  """Expected storage in bits of one matrix: `sum_g sum_k p_gk * choice_bits[g, k]`, with
  `choice_bits` each sub-group's storage per bit choice `[G, K]` (`MatrixSpec.choice_bits`;
  sub-groups of different widths store different bits), or `[K]` shared by every sub-group.

  Differentiable in `probs`; with one-hot `probs` it equals the policy's exact size.
  """
  return jnp.sum(probs * jnp.asarray(choice_bits, jnp.float32))
