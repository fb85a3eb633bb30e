"""Second-order sensitivities of the Hessian baselines, and their bits under a size target.

Q-BERT (Shen et al., AAAI 2020): per layer, the top eigenvalue of the loss Hessian's diagonal
block over that layer's matrices, measured on each of several batches; the layer's sensitivity
is |mean| + std of those eigenvalues (`qbert_sensitivity`).

HAWQ-V3 (Yao et al., ICML 2021): per matrix (or sub-group), the trace of the Hessian's diagonal
block by Hutchinson's estimator, divided by its number of weights: the average curvature
(`average_traces`).

Both price sub-group g of matrix W at b bits as `sensitivity * ||Q_b(W_g) - W_g||^2` (the
second-order loss increase) and the exact knapsack (`derive.exact_choices`) picks the bits with
the least total inside the size band (`sensitivity_policy`); the bit choices (no pruning for
Q-BERT) come from the method's config.

Hessian-vector products are forward-over-reverse. One `jax.linearize` per batch keeps the
residuals of the gradient's forward and backward pass, so every further product on that batch
is one tangent pass; several tangents go through one call (vmap). The linearized function is a
`jax.tree_util.Partial` whose residuals are arrays: both compiled functions take them as
arguments, so each compiles once, whatever the batch.
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

LossFn = Callable[[Any, Any], jax.Array]  # (params, batch) -> scalar loss


def _flat(tree: Any) -> dict[str, Any]:
  return traverse_util.flatten_dict(tree, sep="/")


def _linearized_gradient(loss_fn: LossFn) -> tuple[Jit, Jit]:
  """(linearize(params, batch) -> v |-> H v, products(linearized, tangents[n, ...]) -> H v[n])."""
  def linearize(params, batch):
    return jax.linearize(lambda p: jax.grad(loss_fn)(p, batch), params)[1]

  def products(hvp, tangents):
    return jax.vmap(hvp)(tangents)

  return Jit(linearize, "hessian_linearize"), Jit(products, "hessian_vector_products")


def _stacked_tangents(flat_params: Mapping[str, jax.Array],
                      vectors: Sequence[Mapping[str, jax.Array]]) -> Any:
  """Tangent trees `[len(vectors), ...]`: vector i on its paths, zero on every other one."""
  out = {}
  for path, value in flat_params.items():
    zero = jnp.zeros(value.shape, value.dtype)
    out[path] = jnp.stack([v.get(path, zero).astype(value.dtype) for v in vectors])
  return traverse_util.unflatten_dict(out, sep="/")


def _key(key: jax.Array, batch: int, vector: int, path: str, flat: Mapping[str, Any]
         ) -> jax.Array:
  """An independent key per (batch, vector, parameter): parameters must not share random bits,
  or the vector's entries across matrices would be correlated and the estimates biased."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, batch), vector),
                            list(flat).index(path))


def _dot(a: Mapping[str, jax.Array], b: Mapping[str, jax.Array]) -> float:
  return float(sum(jnp.vdot(a[p], b[p]) for p in a))


def _unit(v: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  norm = max(np.sqrt(_dot(v, v)), 1e-30)
  return {p: x / norm for p, x in v.items()}


def block_top_eigenvalues(loss_fn: LossFn, params: Any, batches: Sequence[Any],
                          blocks: Mapping[str, Sequence[str]], *, iterations: int,
                          tolerance: float = 0.0, seed: int = 0) -> dict[str, np.ndarray]:
  """Top (largest-magnitude) eigenvalue of the Hessian block of each set of parameter paths
  `blocks[name]`, on each batch separately: `{name: [len(batches)]}`.

  Power iteration, every block at once (one vmapped call per iteration): `H_bb v` is the block
  of `H v` for a tangent v that is zero outside the block. It stops after `iterations` products,
  or once every block's Rayleigh quotient changes by at most `tolerance` relative to its
  previous value (as PyHessian does).
  """
  if iterations < 1 or not batches:
    raise ValueError(f"power iteration needs at least 1 product on at least 1 batch, got "
                     f"{iterations} on {len(batches)}; raise hessian.power_iterations / "
                     "hessian.num_batches.")
  flat = _flat(params)
  names = list(blocks)
  linearize, products = _linearized_gradient(loss_fn)
  key = jax.random.key(seed)
  out = {name: np.zeros(len(batches)) for name in names}
  for b, batch in enumerate(batches):
    hvp = linearize(params, batch)
    vectors = [_unit({p: jax.random.normal(_key(key, b, i, p, flat), flat[p].shape, jnp.float32)
                      for p in blocks[name]}) for i, name in enumerate(names)]
    previous = None
    for step in range(1, iterations + 1):
      hv = _flat(products(hvp, _stacked_tangents(flat, vectors)))
      hv = [{p: hv[p][i] for p in blocks[name]} for i, name in enumerate(names)]
      values = np.array([_dot(v, h) for v, h in zip(vectors, hv)])
      vectors = [_unit(h) for h in hv]
      if previous is not None and np.all(np.abs(values - previous)
                                         <= tolerance * np.abs(previous)):
        break
      previous = values
    for name, value in zip(names, values):
      out[name][b] = value
    logging.info("hessian top eigenvalues on batch %d (%d products each): %s", b, step,
                 ", ".join(f"{n}={v:.4g}" for n, v in zip(names, values)))
  return out


def qbert_sensitivity(eigenvalues: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Q-BERT's layer sensitivity: |mean| + standard deviation (over batches) of the top
  eigenvalue, so a layer whose curvature is large on some batches counts as sensitive."""
  return {name: float(abs(np.mean(v)) + np.std(v)) for name, v in eigenvalues.items()}


def _group_sums(x: jax.Array, groups: int) -> jax.Array:
  """`[..., out] -> [groups]`: the sum over each sub-group of output columns."""
  return quant.grid.group_sum(quant.group_view(x, groups), x.shape[-1])


def hutchinson_traces(loss_fn: LossFn, params: Any, batches: Sequence[Any], plan: Plan, *,
                      samples: int, seed: int = 0, chunk: int = 4) -> dict[str, np.ndarray]:
  """Hutchinson estimates of the trace of each sub-group's Hessian block, `{path: [n, G]}` with
  one row per Rademacher vector (`samples` per batch, n = samples * len(batches)).

  A row is `v_g . (H v)_g` for one Rademacher v over every planned matrix at once: its mean is
  the trace of the block of sub-group g, since E[v_i v_j] = 0 for i != j. A matrix's trace is
  the sum over its sub-groups. `chunk` vectors go through one call.
  """
  if samples < 1 or not batches:
    raise ValueError(f"Hutchinson's estimator needs at least 1 vector on at least 1 batch, got "
                     f"{samples} on {len(batches)}; raise hessian.trace_samples / "
                     "hessian.num_batches.")
  flat = _flat(params)
  linearize, products = _linearized_gradient(loss_fn)
  key = jax.random.key(seed)
  rows: dict[str, list[np.ndarray]] = {p: [] for p in plan}
  for b, batch in enumerate(batches):
    hvp = linearize(params, batch)
    for start in range(0, samples, chunk):
      vectors = [{p: jax.random.rademacher(_key(key, b, start + i, p, flat), flat[p].shape,
                                           jnp.float32) for p in plan}
                 for i in range(min(chunk, samples - start))]
      hv = _flat(products(hvp, _stacked_tangents(flat, vectors)))
      for i, v in enumerate(vectors):
        for path, matrix in plan.items():
          rows[path].append(np.asarray(_group_sums(v[path] * hv[path][i], matrix.groups),
                                       np.float64))
  traces = {p: np.stack(r) for p, r in rows.items()}
  total = sum(float(t.sum(-1).mean()) for t in traces.values())
  logging.info("hutchinson: %d vectors on %d batches, total trace of the planned blocks %.4g",
               samples * len(batches), len(batches), total)
  return traces


def average_traces(traces: Mapping[str, np.ndarray], plan: Plan, *,
                   per_group: bool = False) -> dict[str, np.ndarray]:
  """HAWQ's sensitivity: the mean Hutchinson trace (`hutchinson_traces`) divided by the number
  of weights, per matrix `[1]` (HAWQ-V3) or per sub-group `[G]` (`per_group`, noisier)."""
  out = {}
  for path, matrix in plan.items():
    trace = np.asarray(traces[path], np.float64).mean(0)
    out[path] = (trace / matrix.group_sizes if per_group
                 else np.array([trace.sum() / matrix.group_sizes.sum()]))
  return out


NEGATIVE_TRACES = ("abs", "zero")


def price_negative_traces(sensitivity: Mapping[str, np.ndarray],
                          negative: str) -> dict[str, np.ndarray]:
  """HAWQ's sensitivities with each negative trace estimate priced by its magnitude ("abs") or
  as free ("zero").

  HAWQ-V3's quadratic model holds at a minimum of the loss, where a negative trace is noise and
  "zero" is its reading. At a teacher that is not at a minimum (MiniLM on CoLA: 23 of 36 matrix
  traces negative) "zero" prices whole matrices as free and the knapsack prunes them to the cap;
  "abs" prices curvature by its size, as Q-BERT prices eigenvalues (|mean| + std).
  """
  if negative not in NEGATIVE_TRACES:
    raise ValueError(f"hessian.negative_traces={negative!r} is not one of {NEGATIVE_TRACES}: "
                     "'abs' prices a negative trace by its magnitude, 'zero' as free.")
  price = np.abs if negative == "abs" else (lambda t: np.maximum(t, 0.0))
  return {path: price(np.asarray(t, np.float64)) for path, t in sensitivity.items()}


def quantization_errors(params: Any, plan: Plan, qparams: Mapping[str, Any],
                        weights: Mapping[str, jax.Array] | None = None) -> dict[str, np.ndarray]:
  """`sum_i f_i (Q_b(W)_i - W_i)^2` per sub-group and bit choice `[G, K]` of every planned
  matrix, with elementwise weights `f = weights[path]` (e.g. `fisher_diagonal`), or 1."""
  flat = quant.flatten_params(params)
  errors = {}
  for path, matrix in plan.items():
    w = jnp.asarray(flat[path], jnp.float32)
    f = 1.0 if weights is None else jnp.asarray(weights[path], jnp.float32)
    per_choice = [_group_sums(f * jnp.square(quant.quantize_choice(w, matrix, qparams[path], k)
                                             - w), matrix.groups)
                  for k in range(len(matrix.bit_choices))]
    errors[path] = np.asarray(jnp.stack(per_choice, axis=-1), np.float64)
  return errors


def fisher_diagonal(loss_fn: LossFn, params: Any, batches: Sequence[Any],
                    paths: Sequence[str]) -> dict[str, jax.Array]:
  """The empirical Fisher's diagonal, mean over `batches` of the squared batch gradient, for
  each parameter in `paths`: a cheap curvature estimate (one backward pass per batch)."""
  grad = Jit(jax.grad(loss_fn), "fisher_gradient")
  total = None
  for batch in batches:
    flat = _flat(grad(params, batch))
    squares = {p: jnp.square(flat[p]) for p in paths}
    total = squares if total is None else {p: total[p] + squares[p] for p in paths}
  return {p: v / len(batches) for p, v in total.items()}


def sensitivity_policy(sensitivity: Mapping[str, Any], errors: Mapping[str, np.ndarray],
                       plan: Plan, band: SizeBand, *, fixed_bits: int = 0,
                       max_pruned_fraction: float | None = None,
                       activation_bits: int = quant.FULL_PRECISION) -> Policy:
  """The bits in `band` with the least total `sensitivity[path] * ||Q_b(W_g) - W_g||^2`.

  `sensitivity[path]` is a scalar or one value per sub-group `[G]`; a negative one counts as 0
  (HAWQ decides how to price its negative traces first: `price_negative_traces`).
  """
  scores = {}
  for path in plan:
    weight = np.maximum(np.asarray(sensitivity[path], np.float64).reshape(-1, 1), 0.0)
    scores[path] = -weight * errors[path]
  choice = exact_choices(scores, plan, band, fixed_bits=fixed_bits,
                         max_pruned_fraction=max_pruned_fraction)
  return policy_from_choices(choice, plan, activation_bits=activation_bits)
