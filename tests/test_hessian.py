"""The Hessian baselines' measurements against float64 NumPy on losses with explicit Hessians:
Q-BERT's per-layer top eigenvalues and |mean| + std, HAWQ's Hutchinson traces, and their
knapsack policies (more bits where the curvature is, inside the size band)."""

from __future__ import annotations

import logging
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mpqbert import models, quant, search
from mpqbert.methods.pipelines import layer_blocks
from mpqbert.quant.spec import MatrixSpec

# Three "matrices" of two "layers": the loss is 0.5 theta^T H theta with theta their
# concatenated (row-major) entries and H the batch, so every Hessian block is known exactly.
SHAPES = {"layer/0/a/kernel": (3, 2), "layer/0/b/kernel": (2, 2), "layer/1/a/kernel": (2, 4)}
OFFSETS = np.cumsum([0] + [int(np.prod(s)) for s in SHAPES.values()])
DIM = int(OFFSETS[-1])
BLOCKS = {"layer/0": ["layer/0/a/kernel", "layer/0/b/kernel"], "layer/1": ["layer/1/a/kernel"]}


def _params(rng):
  return traverse_util.unflatten_dict(
      {p: jnp.asarray(rng.normal(size=s), jnp.float32) for p, s in SHAPES.items()}, sep="/")


def _quadratic_loss(params, hessian):
  flat = traverse_util.flatten_dict(params, sep="/")
  theta = jnp.concatenate([flat[p].reshape(-1) for p in SHAPES])
  return 0.5 * theta @ hessian @ theta


def _indices(paths):
  names = list(SHAPES)
  return np.concatenate([np.arange(OFFSETS[names.index(p)], OFFSETS[names.index(p) + 1])
                         for p in paths])


def _hessian(rng, tops):
  """A symmetric H whose layer blocks have the well separated top eigenvalues `tops`, with
  cross-layer terms (which the blocks must ignore)."""
  h = 0.3 * rng.normal(size=(DIM, DIM))
  h = 0.5 * (h + h.T)
  for (name, paths), top in zip(BLOCKS.items(), tops):
    idx = _indices(paths)
    q, _ = np.linalg.qr(rng.normal(size=(len(idx), len(idx))))
    h[np.ix_(idx, idx)] = (q * np.r_[top, rng.uniform(-1.0, 1.0, len(idx) - 1)]) @ q.T
  return h


def _top_by_magnitude(matrix):
  values = np.linalg.eigvalsh(matrix)
  return values[np.argmax(np.abs(values))]


def test_qbert_block_eigenvalues_and_sensitivity_match_numpy(caplog):
  rng = np.random.default_rng(0)
  params = _params(rng)
  hessians = [_hessian(rng, tops) for tops in ((8.0, -4.0), (6.0, -7.0), (9.0, -5.0))]
  caplog.set_level(logging.INFO)
  values = search.block_top_eigenvalues(_quadratic_loss, params,
                                        [jnp.asarray(h, jnp.float32) for h in hessians], BLOCKS,
                                        iterations=200, tolerance=1e-7)
  for name, paths in BLOCKS.items():
    idx = _indices(paths)
    expected = np.array([_top_by_magnitude(h[np.ix_(idx, idx)]) for h in hessians])
    np.testing.assert_allclose(values[name], expected, rtol=1e-3)
    sensitivity = search.qbert_sensitivity(values)[name]
    assert sensitivity == pytest.approx(abs(expected.mean()) + expected.std(), rel=1e-3)
  # One compilation of each function serves every batch and iteration.
  assert len(re.findall(r"compiled hessian_linearize", caplog.text)) == 1
  assert len(re.findall(r"compiled hessian_vector_products", caplog.text)) == 1


def test_qbert_sensitivity_is_abs_mean_plus_std():
  out = search.qbert_sensitivity({"x": np.array([-2.0, -4.0]), "y": np.array([3.0, 3.0])})
  assert out == {"x": pytest.approx(3.0 + 1.0), "y": pytest.approx(3.0)}


def _plan(groups):
  return {p: MatrixSpec(path=p, shape=s, groups=groups[p], quantizer="symmetric",
                        bit_choices=(2, 4)) for p, s in SHAPES.items()}


def _group_traces(h, plan):
  """Exact trace of each sub-group's block: sub-group g of [K, N] holds columns g*N/G.."""
  out = {}
  for path, matrix in plan.items():
    idx = _indices([path]).reshape(matrix.shape)
    cols = matrix.shape[-1] // matrix.groups
    out[path] = np.array([np.trace(h[np.ix_(i, i)]) for i in
                          (idx[:, g * cols:(g + 1) * cols].reshape(-1)
                           for g in range(matrix.groups))])
  return out


def test_hutchinson_is_exact_for_a_diagonal_hessian():
  rng = np.random.default_rng(1)
  h = np.diag(rng.normal(size=DIM))
  plan = _plan({"layer/0/a/kernel": 2, "layer/0/b/kernel": 1, "layer/1/a/kernel": 4})
  traces = search.hutchinson_traces(_quadratic_loss, _params(rng), [jnp.asarray(h, jnp.float32)],
                                    plan, samples=3)
  for path, exact in _group_traces(h, plan).items():
    assert traces[path].shape == (3, plan[path].groups)
    np.testing.assert_allclose(traces[path], np.tile(exact, (3, 1)), rtol=1e-5, atol=1e-6)


def test_hutchinson_matches_the_exact_trace_within_its_standard_error():
  rng = np.random.default_rng(2)
  h = rng.normal(size=(DIM, DIM))
  h = 0.5 * (h + h.T) + np.diag(rng.uniform(1, 3, DIM))
  plan = _plan({"layer/0/a/kernel": 2, "layer/0/b/kernel": 2, "layer/1/a/kernel": 2})
  batches = [jnp.asarray(h, jnp.float32)] * 2
  traces = search.hutchinson_traces(_quadratic_loss, _params(rng), batches, plan, samples=200,
                                    chunk=50)
  for path, exact in _group_traces(h, plan).items():
    matrix = plan[path]
    idx = _indices([path]).reshape(matrix.shape)
    cols = matrix.shape[-1] // matrix.groups
    for g in range(matrix.groups):
      rows = np.zeros(DIM, bool)
      rows[idx[:, g * cols:(g + 1) * cols].reshape(-1)] = True
      # v_S . (H v)_S = tr(H_SS) + sum_{i<j} (H_ij [i in S] + H_ji [j in S]) v_i v_j.
      coef = h * rows[:, None] + (h * rows[:, None]).T
      std = np.sqrt(np.sum(np.triu(coef, 1) ** 2))
      n = traces[path].shape[0]
      assert n == 400
      assert abs(traces[path][:, g].mean() - exact[g]) < 4.5 * std / np.sqrt(n), (path, g)
      assert traces[path][:, g].std() == pytest.approx(std, rel=0.2)


def test_average_traces_divide_by_the_weights_counted():
  plan = _plan({"layer/0/a/kernel": 2, "layer/0/b/kernel": 1, "layer/1/a/kernel": 4})
  traces = {p: np.arange(2 * plan[p].groups, dtype=float).reshape(2, -1) for p in plan}
  per_matrix = search.average_traces(traces, plan)
  per_group = search.average_traces(traces, plan, per_group=True)
  # layer/0/a: 6 weights in 2 groups of 3; mean rows [1, 2] -> 3 / 6 per matrix, [1/3, 2/3].
  np.testing.assert_allclose(per_matrix["layer/0/a/kernel"], [0.5])
  np.testing.assert_allclose(per_group["layer/0/a/kernel"], [1 / 3, 2 / 3])
  # layer/1/a: 8 weights in 4 groups of 2, mean rows [2, 3, 4, 5].
  np.testing.assert_allclose(per_matrix["layer/1/a/kernel"], [14 / 8])
  np.testing.assert_allclose(per_group["layer/1/a/kernel"], [1.0, 1.5, 2.0, 2.5])


def test_uneven_groups_traces_errors_and_averages_count_their_own_columns():
  """A [3, 5] matrix in 2 sub-groups of 3 and 2 columns: Hutchinson's traces (exact for a
  diagonal Hessian), the Fisher-weighted quantization errors against float64 per column block,
  and the averages over each group's own 9 and 6 weights."""
  rng = np.random.default_rng(6)
  path, blocks = "m/kernel", (slice(0, 3), slice(3, 5))
  curvature = rng.uniform(0.5, 2.0, size=(3, 5))
  w = rng.normal(size=(3, 5)).astype(np.float32)
  params = {"m": {"kernel": jnp.asarray(w)}}
  loss = lambda p, d: 0.5 * jnp.sum(d * p["m"]["kernel"] ** 2)
  plan = {path: MatrixSpec(path=path, shape=(3, 5), groups=2, quantizer="symmetric",
                           bit_choices=(2, 4))}
  assert plan[path].group_widths == (3, 2)
  traces = search.hutchinson_traces(loss, params, [jnp.asarray(curvature, jnp.float32)], plan,
                                    samples=2)
  exact = [curvature[:, b].sum() for b in blocks]
  np.testing.assert_allclose(traces[path], [exact, exact], rtol=1e-5)
  np.testing.assert_allclose(search.average_traces(traces, plan, per_group=True)[path],
                             [exact[0] / 9, exact[1] / 6], rtol=1e-5)
  np.testing.assert_allclose(search.average_traces(traces, plan)[path], [sum(exact) / 15],
                             rtol=1e-5)

  scale = np.array([[0.3, 0.2], [0.05, 0.1]], np.float32)  # [bit choice, group]
  errors = search.quantization_errors(params, plan, {path: {"scale": jnp.asarray(scale)}},
                                      {path: jnp.asarray(curvature, jnp.float32)})
  for k, bits in enumerate((2, 4)):
    q_neg, q_pos = 2.0 ** (bits - 1), 2.0 ** (bits - 1) - 1
    for g, b in enumerate(blocks):
      block = w[:, b].astype(np.float64)
      w_hat = scale[k, g] * np.clip(np.round(block / scale[k, g]), -q_neg, q_pos)
      np.testing.assert_allclose(errors[path][g, k], np.sum(curvature[:, b] * (w_hat - block) ** 2),
                                 rtol=1e-5)


TINY = models.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=32, max_position_embeddings=16)


@pytest.fixture(scope="module")
def encoder_params():
  return models.init_params(models.build_model(TINY), seed=0)


@pytest.mark.parametrize("bit_choices, target", [((2, 3, 4, 8), 3), ((0, 1, 2, 4, 8), 2)])
def test_sensitivity_policy_gives_sensitive_matrices_more_bits_in_the_band(encoder_params,
                                                                           bit_choices, target):
  spec = models.bert_encoder_spec(groups=4, bit_choices=bit_choices)
  plan = spec.plan(encoder_params)
  errors = search.quantization_errors(encoder_params, plan,
                                      quant.init_qparams(spec, encoder_params))
  for p, e in errors.items():  # Fewer bits, larger error, per sub-group.
    assert np.all(np.diff(e, axis=-1) < 0), p
  sensitive = set(list(layer_blocks(plan).values())[-1])  # The last layer's six matrices.
  sensitivity = {p: (100.0 if p in sensitive else 0.01) for p in plan}
  band = search.make_band(encoder_params, plan, target_uniform_bits=target, tolerance=0.05,
                          layout=models.BERT_LAYOUT)
  policy = search.sensitivity_policy(sensitivity, errors, plan, band,
                                     max_pruned_fraction=0.5)
  size = quant.size_report(encoder_params, policy, layout=models.BERT_LAYOUT)["size_mb"]
  assert band.lower <= size <= band.upper
  mean_bits = {p: float(np.mean(policy.bits[p])) for p in plan}
  assert min(mean_bits[p] for p in sensitive) > max(mean_bits[p] for p in plan
                                                     if p not in sensitive)


def test_negative_traces_priced_by_magnitude_or_as_free(encoder_params):
  # Hand case: -2 is worth 2 ("abs") or nothing ("zero"); positive traces stay as they are.
  traces = {"a": np.array([-2.0]), "b": np.array([0.5, -0.25])}
  np.testing.assert_array_equal(search.price_negative_traces(traces, "abs")["b"], [0.5, 0.25])
  np.testing.assert_array_equal(search.price_negative_traces(traces, "zero")["a"], [0.0])
  with pytest.raises(ValueError, match="negative_traces='clip'.*'abs'"):
    search.price_negative_traces(traces, "clip")
  # In the knapsack: the last layer's strongly negative curvature gets the most bits with "abs"
  # and the fewest with "zero" (free, like CoLA's 23 matrices that HAWQ-V3 pruned to the cap).
  spec = models.bert_encoder_spec(groups=4, bit_choices=(0, 1, 2, 4, 8))
  plan = spec.plan(encoder_params)
  errors = search.quantization_errors(encoder_params, plan,
                                      quant.init_qparams(spec, encoder_params))
  negative = set(list(layer_blocks(plan).values())[-1])
  raw = {p: np.array([-100.0 if p in negative else 0.01]) for p in plan}
  band = search.make_band(encoder_params, plan, target_uniform_bits=2, tolerance=0.05,
                          layout=models.BERT_LAYOUT)
  for pricing, most in (("abs", True), ("zero", False)):
    policy = search.sensitivity_policy(search.price_negative_traces(raw, pricing), errors, plan,
                                       band, max_pruned_fraction=0.5)
    bits = {p: float(np.mean(policy.bits[p])) for p in plan}
    inside = [bits[p] for p in negative]
    outside = [bits[p] for p in plan if p not in negative]
    assert (min(inside) > max(outside)) if most else (max(inside) < min(outside)), (pricing, bits)


def test_layer_blocks_group_the_six_matrices_of_each_layer(encoder_params):
  blocks = layer_blocks(_plan_of(encoder_params))
  assert [name.split("encoder/")[-1] for name in blocks] == ["layer/0", "layer/1"]
  assert all(len(paths) == 6 for paths in blocks.values())
  with pytest.raises(ValueError, match="no encoder layer"):
    layer_blocks({"bert/pooler/dense/kernel": None})


def _plan_of(params):
  return models.bert_encoder_spec(groups=4).plan(params)


def test_no_product_or_no_vector_is_a_clear_error():
  params, hessian = _params(np.random.default_rng(0)), jnp.eye(DIM)
  with pytest.raises(ValueError, match="hessian.power_iterations"):
    search.block_top_eigenvalues(_quadratic_loss, params, [hessian], BLOCKS, iterations=0)
  with pytest.raises(ValueError, match="hessian.trace_samples"):
    search.hutchinson_traces(_quadratic_loss, params, [hessian], _plan(
        {"layer/0/a/kernel": 1, "layer/0/b/kernel": 1, "layer/1/a/kernel": 1}), samples=0)
