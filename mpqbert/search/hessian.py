"""Q-BERT-style baseline: Hessian sensitivity per matrix, bits per sub-group to meet a size band.

Sensitivity of a weight matrix W is the top eigenvalue of the loss Hessian restricted to W (its
diagonal block), by power iteration on exact Hessian-vector products (forward-over-reverse).
Quantizing sub-group g of W to b bits then costs `lambda_W * ||Q_b(W_g) - W_g||^2`, the
second-order loss increase along the top eigen-direction, and the exact knapsack
(`derive.exact_choices`) picks the bits with the least total cost inside the size band.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from mpqbert import quant
from mpqbert.quant import Plan, Policy
from mpqbert.search.derive import exact_choices, policy_from_choices
from mpqbert.search.size import SizeBand
from mpqbert.train.compiled import Jit


def _unit(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x), 1e-30)


def block_top_eigenvalues(loss_fn: Callable[[Any, Any], jax.Array], params: Any,
                          batches: Sequence[Any], paths: Sequence[str], *, iterations: int,
                          tolerance: float = 0.0, seed: int = 0) -> dict[str, float]:
  """Top (largest-magnitude) eigenvalue of the Hessian block of each parameter in `paths`.

  `loss_fn(params, batch)` is the scalar loss; the Hessian is that of its mean over `batches`.
  One compiled HVP serves every block: the tangent is zero outside the block and the block of
  the product is kept, which is exactly `H_bb v`. Power iteration on a block stops after
  `iterations` products, or earlier once the Rayleigh quotient changes by at most `tolerance`
  relative to its previous value (as PyHessian does), which halves the cost on BERT.
  """
  flat = traverse_util.flatten_dict(params, sep="/")
  zeros = {k: jnp.zeros_like(v) for k, v in flat.items()}

  def hvp(params, tangent, batch):
    grad = jax.grad(loss_fn)
    return jax.jvp(lambda p: grad(p, batch), (params,), (tangent,))[1]

  hvp = Jit(hvp, "hessian_vector_product")

  def block_hvp(path: str, v: jax.Array) -> jax.Array:
    tangent = traverse_util.unflatten_dict({**zeros, path: v}, sep="/")
    products = [traverse_util.flatten_dict(hvp(params, tangent, b), sep="/")[path]
                for b in batches]
    return sum(products) / len(products)

  eigenvalues = {}
  key = jax.random.key(seed)
  for i, path in enumerate(paths):
    v = _unit(jax.random.normal(jax.random.fold_in(key, i), flat[path].shape, jnp.float32))
    eigenvalue, previous = 0.0, None
    for step in range(1, iterations + 1):
      hv = block_hvp(path, v)
      eigenvalue = float(jnp.vdot(v, hv))
      v = _unit(hv)
      if previous is not None and abs(eigenvalue - previous) <= tolerance * abs(previous):
        break
      previous = eigenvalue
    eigenvalues[path] = eigenvalue
    logging.info("hessian top eigenvalue %s = %.5g (%d products)", path, eigenvalue, step)
  return eigenvalues


def fisher_diagonal(loss_fn: Callable[[Any, Any], jax.Array], params: Any,
                    batches: Sequence[Any], paths: Sequence[str]) -> dict[str, jax.Array]:
  """The empirical Fisher's diagonal, mean over `batches` of the squared batch gradient, for
  each parameter in `paths`: a cheap curvature estimate (one backward pass per batch)."""
  grad = Jit(jax.grad(loss_fn), "fisher_gradient")
  total = None
  for batch in batches:
    flat = traverse_util.flatten_dict(grad(params, batch), sep="/")
    squares = {p: jnp.square(flat[p]) for p in paths}
    total = squares if total is None else {p: total[p] + squares[p] for p in paths}
  return {p: v / len(batches) for p, v in total.items()}


def quantization_errors(params: Any, plan: Plan, qparams: Mapping[str, Any],
                        weights: Mapping[str, jax.Array] | None = None) -> dict[str, np.ndarray]:
  """`sum_i f_i (Q_b(W)_i - W_i)^2` per sub-group and bit choice `[G, K]` of every planned
  matrix, with elementwise weights `f = weights[path]` (e.g. `fisher_diagonal`), or 1."""
  flat = quant.flatten_params(params)
  errors = {}
  for path, matrix in plan.items():
    w = jnp.asarray(flat[path], jnp.float32)
    f = 1.0 if weights is None else jnp.asarray(weights[path], jnp.float32)
    per_choice = []
    for k in range(len(matrix.bit_choices)):
      diff = quant.quantize_choice(w, matrix, qparams[path], k) - w
      per_choice.append(jnp.sum(quant.group_view(f * jnp.square(diff), matrix.groups),
                                axis=tuple(i for i in range(diff.ndim + 1) if i != diff.ndim - 1)))
    errors[path] = np.asarray(jnp.stack(per_choice, axis=-1), np.float64)
  return errors


def hessian_policy(eigenvalues: Mapping[str, float], errors: Mapping[str, np.ndarray], plan: Plan,
                   band: SizeBand, *, fixed_bits: int = 0,
                   max_pruned_fraction: float | None = None,
                   activation_bits: int = quant.FULL_PRECISION) -> Policy:
  """The bits in `band` with the least total |lambda_W| * ||Q_b(W_g) - W_g||^2."""
  scores = {p: -abs(eigenvalues[p]) * errors[p] for p in plan}
  choice = exact_choices(scores, plan, band, fixed_bits=fixed_bits,
                         max_pruned_fraction=max_pruned_fraction)
  return policy_from_choices(choice, plan, activation_bits=activation_bits)
