"""AutoMPQ search pieces: size band and loss, derivation into the band, and a search on a tiny
BERT that must prune the sub-groups its task does not need (the Hessian baselines:
test_hessian.py)."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from mpqbert import models, quant, search

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)
TINY = models.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=32, max_position_embeddings=16)


@pytest.fixture(scope="module")
def encoder_params():
  return models.init_params(models.build_model(TINY), seed=0)


def _plan(params, groups=4, bit_choices=(0, 2, 4, 8)):
  return models.bert_encoder_spec(groups=groups, bit_choices=bit_choices).plan(params)


def test_size_loss_is_squared_log_ratio_with_its_minimum_at_the_target():
  lam, target = 0.7, 2.0
  loss = lambda c: search.size_loss(c, target, lam)
  grad = jax.grad(loss)
  for c in (0.5, 1.9, 2.0, 3.0):  # lam * log(c / V)^2 and its derivative 2 lam log(c / V) / c
    assert float(loss(c)) == pytest.approx(lam * math.log(c / target) ** 2, abs=1e-7)
    assert float(grad(c)) == pytest.approx(2 * lam * math.log(c / target) / c, abs=1e-6)
  assert float(grad(3.0)) > 0 > float(grad(1.0))  # pushes down above V, up below it


def test_expected_size_of_one_hot_probabilities_is_the_policy_size(encoder_params):
  plan = _plan(encoder_params, groups=4)
  rng = np.random.default_rng(0)
  policy = search.policy_from_choices(
      {p: rng.integers(0, 4, m.groups) for p, m in plan.items()}, plan)
  one_hot = {p: quant.one_hot_bits(policy.bits[p], m.bit_choices) for p, m in plan.items()}
  exact = quant.size_report(encoder_params, policy, layout=models.BERT_LAYOUT)["size_mb"]
  assert float(search.expected_size_mb(one_hot, plan)) == pytest.approx(exact, rel=1e-6)
  # Uniform probabilities: the mean over choices of each group's storage, by hand.
  uniform = {p: jnp.full((m.groups, 4), 0.25) for p, m in plan.items()}
  by_hand = sum(m.groups * np.mean([b * m.group_sizes[0] + (32 if b else 0)
                                    for b in (0, 2, 4, 8)]) for m in plan.values()) / (8 * 2**20)
  assert float(search.expected_size_mb(uniform, plan)) == pytest.approx(by_hand, rel=1e-6)


def test_band_from_compression_uniform_bits_and_unreachable_targets(encoder_params):
  plan = _plan(encoder_params, groups=4, bit_choices=(2, 4, 8))
  fp32 = quant.size_report(encoder_params, layout=models.BERT_LAYOUT)["size_mb"]
  band = search.make_band(encoder_params, plan, target_compression=8.0, tolerance=0.05,
                          layout=models.BERT_LAYOUT)
  assert band.target_mb == pytest.approx(fp32 / 8) and band.contains(fp32 / 8)
  assert band.upper == band.target_mb and band.lower == pytest.approx(0.95 * fp32 / 8)
  # The exact size of the uniform 2-bit policy, scales included.
  uniform2 = quant.size_report(encoder_params, quant.uniform_policy(plan, 2),
                               layout=models.BERT_LAYOUT)["size_mb"]
  by_uniform = search.make_band(encoder_params, plan, target_uniform_bits=2, tolerance=0.01,
                                layout=models.BERT_LAYOUT)
  assert by_uniform.target_mb == pytest.approx(uniform2, rel=1e-12)
  with pytest.raises(ValueError, match="no policy can reach"):
    search.make_band(encoder_params, plan, target_compression=2.0, tolerance=0.05,
                     layout=models.BERT_LAYOUT)  # 4x at best
  with pytest.raises(ValueError, match="exactly one"):
    search.make_band(encoder_params, plan, target_size_mb=1.0, target_compression=8.0,
                     tolerance=0.05, layout=models.BERT_LAYOUT)


def _brute_force(sizes, scores, lower, upper, limit=None):
  """Best (score, choices) over every selection, by enumeration (float64 NumPy)."""
  best = (-np.inf, None)
  for combo in itertools.product(*(range(len(row)) for row in sizes)):
    combo = np.array(combo)
    size = sizes[np.arange(len(combo)), combo].sum()
    if not lower <= size <= upper:
      continue
    if limit is not None and np.sum(combo[limit[0]] == limit[1]) > limit[2]:
      continue
    total = scores[np.arange(len(combo)), combo].sum()
    if total > best[0] + 1e-12:
      best = (total, combo)
  return best


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), items=st.integers(1, 7), choices=st.integers(3, 6),
       width=st.floats(0.0, 0.3), use_limit=st.booleans())
def test_knapsack_matches_brute_force(seed, items, choices, width, use_limit):
  rng = np.random.default_rng(seed)
  sizes = rng.integers(0, 40, (items, choices)).astype(np.int64)
  scores = rng.normal(size=(items, choices))
  scores[rng.random((items, choices)) < 0.1] = -np.inf  # some forbidden choices
  scores[np.arange(items), rng.integers(0, choices, items)] = rng.normal(size=items)  # >=1 allowed
  total = sizes[np.arange(items), rng.integers(0, choices, items)].sum()
  lower, upper = np.floor((1 - width) * total), total
  limit = (np.arange(0, items, 2), 0, 1) if use_limit else None
  expected, combo = _brute_force(sizes, scores, lower, upper, limit)
  limits = ([search.knapsack.CountLimit(items=limit[0], choice=limit[1], max_count=limit[2])]
            if use_limit else [])
  if combo is None:
    with pytest.raises(ValueError, match="no selection"):
      search.knapsack.solve(sizes, scores, lower, upper, limits=limits)
    return
  got = search.knapsack.solve(sizes, scores, lower, upper, limits=limits)
  got_size = sizes[np.arange(items), got].sum()
  assert lower <= got_size <= upper
  assert scores[np.arange(items), got].sum() == pytest.approx(expected, abs=1e-9)


def _derived_in_band(encoder_params, plan, seed: int, position: float, tolerance: float):
  """Random logits derived into the band at `position` of the plan's size range: (logits, band,
  policy, its size), the size checked inside the band; None where no policy fits the window (the error
  must say so)."""
  low, high = search.size_range_mb(encoder_params, plan, layout=models.BERT_LAYOUT)
  band = search.SizeBand(low + position * (high - low), tolerance)
  rng = np.random.default_rng(seed)
  arch = {p: rng.normal(size=(m.groups, 5)) * rng.uniform(0.1, 5) for p, m in plan.items()}
  try:
    policy = search.derive_policy(arch, plan, band)
  except ValueError as e:
    assert "cannot derive" in str(e)
    return None
  size = quant.size_report(encoder_params, policy, layout=models.BERT_LAYOUT)["size_mb"]
  assert band.lower <= size <= band.target_mb
  return arch, band, policy, size


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), position=st.floats(0.05, 0.95),
       tolerance=st.floats(0.001, 0.05), groups=st.sampled_from([4, 8, 16]))
def test_derived_policy_never_exceeds_the_target_and_lands_within_tolerance(
    encoder_params, seed, position, tolerance, groups):
  plan = _plan(encoder_params, groups=groups, bit_choices=(0, 2, 3, 4, 8))
  derived = _derived_in_band(encoder_params, plan, seed, position, tolerance)
  if derived is None:
    return
  arch, band, policy, size = derived
  # When the argmax already fits, it is the answer (it maximizes the log-probability).
  argmax = quant.policy_from_logits(arch, plan)
  if band.contains(quant.size_report(encoder_params, argmax, layout=models.BERT_LAYOUT)["size_mb"]):
    for p in plan:
      np.testing.assert_array_equal(policy.bits[p], argmax.bits[p])


def test_derivation_gives_way_where_the_search_was_least_decided(encoder_params):
  plan = _plan(encoder_params, groups=4)
  # Everything confidently at 8 bits except one group that barely prefers 8 over 4.
  arch = {p: jnp.tile(jnp.array([0.0, 0.0, 0.0, 10.0]), (m.groups, 1)) for p, m in plan.items()}
  undecided = next(iter(plan))
  arch[undecided] = arch[undecided].at[1].set(jnp.array([0.0, 0.0, 9.9, 10.0]))
  all8 = quant.size_report(encoder_params, quant.uniform_policy(plan, 8),
                           layout=models.BERT_LAYOUT)["size_mb"]
  shrink = plan[undecided].group_sizes[0] * 4 / (8 * 2**20)  # one group from 8 to 4 bits
  band = search.SizeBand(all8 - shrink, tolerance=0.3 * shrink / all8)
  policy = search.derive_policy(arch, plan, band)
  assert np.asarray(policy.bits[undecided]).tolist() == [8, 4, 8, 8]
  assert all(np.all(np.asarray(policy.bits[p]) == 8) for p in plan if p != undecided)


UNEVEN_GROUPS = {"qkv": 3, "attention_output": 6, "ffn_in": 5, "ffn_out": 6}


def _storage_by_hand(k: int, columns: int, bits: int) -> int:
  """One sub-group of `columns` output columns and K rows: ceil(K / floor(32 / b)) 32-bit words
  per column plus a 32-bit scale; nothing when pruned."""
  return 0 if bits == 0 else columns * -(-k // (32 // bits)) * 32 + 32


def _widths_by_hand(n: int, groups: int) -> list[int]:
  """Columns of sub-group g: [g * w, min((g + 1) * w, n)), w = ceil(n / groups)."""
  width = -(-n // groups)
  return [min((g + 1) * width, n) - g * width for g in range(groups)]


def test_uneven_groups_size_range_uniform_and_expected_sizes_by_hand(encoder_params):
  """Hidden 16 and FFN 32 in 6 groups: 5 of 3 columns and 1, or 5 of 6 and 2."""
  choices = (0, 2, 3, 4, 8)
  plan = _plan(encoder_params, groups=6, bit_choices=choices)
  ffn_in = "encoder/layer/0/intermediate/dense/kernel"  # [16, 32]
  assert plan[ffn_in].group_widths == (6, 6, 6, 6, 6, 2)
  np.testing.assert_array_equal(plan[ffn_in].choice_bits[-1],  # 2 columns of K = 16
                                [0, 2 * 1 * 32 + 32, 2 * 2 * 32 + 32, 2 * 2 * 32 + 32,
                                 2 * 4 * 32 + 32])
  # 8 and 3 bits: 8 bits per weight; 2 (K = 16) or 4 (K = 32) words per column at 3 bits. Two
  # layers of 4 * 16 * 16 + 16 * 32 + 32 * 16 = 2048 weights and 6 * 6 = 36 sub-groups.
  low, high = search.size_range_mb(encoder_params, plan, layout=models.BERT_LAYOUT)
  assert low == 0.0 and high * 8 * 2**20 == 8 * 4096 + 72 * 32
  per_layer_3 = 4 * 16 * 2 * 32 + 32 * 2 * 32 + 16 * 4 * 32
  assert search.uniform_size_mb(encoder_params, plan, 3,
                                layout=models.BERT_LAYOUT) * 8 * 2**20 == 2 * per_layer_3 + 72 * 32
  uniform = {p: jnp.full((m.groups, len(choices)), 1 / len(choices)) for p, m in plan.items()}
  by_hand = sum(np.mean([_storage_by_hand(m.shape[0], c, b) for b in choices])
                for m in plan.values() for c in _widths_by_hand(m.shape[1], m.groups))
  assert float(search.expected_size_mb(uniform, plan)) * 8 * 2**20 == pytest.approx(by_hand,
                                                                                  rel=1e-6)


def test_derivation_moves_the_short_group_when_only_its_size_fits(encoder_params):
  """All 8 bits but for a move of 64 bits: the 1-column last group of an attention output
  (16 columns in 6 groups) from 8 to 4 bits (4 -> 2 words). A full group's move, 192 bits, would
  leave the band, so the short one gives way although a full group is less decided."""
  plan = _plan(encoder_params, groups=6, bit_choices=(0, 2, 3, 4, 8))
  matrix = "encoder/layer/0/attention/output/dense/kernel"
  assert plan[matrix].group_widths == (3, 3, 3, 3, 3, 1)
  arch = {p: jnp.tile(jnp.array([0.0, 0.0, 0.0, 0.0, 10.0]), (m.groups, 1))
          for p, m in plan.items()}
  arch[matrix] = (arch[matrix].at[0].set(jnp.array([0.0, 0.0, 0.0, 9.95, 10.0]))
                  .at[5].set(jnp.array([0.0, 0.0, 0.0, 9.9, 10.0])))
  all8 = quant.size_report(encoder_params, quant.uniform_policy(plan, 8),
                           layout=models.BERT_LAYOUT)["size_mb"]
  band = search.SizeBand(all8 - 64 / (8 * 2**20), tolerance=32 / (8 * 2**20) / all8)
  policy = search.derive_policy(arch, plan, band)
  assert np.asarray(policy.bits[matrix]).tolist() == [8, 8, 8, 8, 8, 4]
  assert all(np.all(np.asarray(policy.bits[p]) == 8) for p in plan if p != matrix)
  assert quant.size_report(encoder_params, policy,
                           layout=models.BERT_LAYOUT)["size_mb"] == band.target_mb


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), position=st.floats(0.05, 0.95),
       tolerance=st.floats(0.001, 0.05), groups=st.sampled_from([3, 6, UNEVEN_GROUPS]))
def test_derived_policy_on_uneven_groups_lands_in_the_band(encoder_params, seed, position,
                                                           tolerance, groups):
  plan = _plan(encoder_params, groups=groups, bit_choices=(0, 2, 3, 4, 8))
  assert any(len(set(m.group_widths)) > 1 for m in plan.values())
  derived = _derived_in_band(encoder_params, plan, seed, position, tolerance)
  if derived is None:
    return
  arch, band, policy, size = derived
  one_hot = {p: quant.one_hot_bits(policy.bits[p], m.bit_choices) for p, m in plan.items()}
  assert float(search.expected_size_mb(one_hot, plan)) == pytest.approx(size, rel=1e-6)


def test_pruning_limit_keeps_every_matrix_alive(encoder_params):
  plan = _plan(encoder_params, groups=4)
  arch = {p: jnp.tile(jnp.array([10.0, 0.0, 0.0, 0.0]), (m.groups, 1)) for p, m in plan.items()}
  low, high = search.size_range_mb(encoder_params, plan, layout=models.BERT_LAYOUT)
  band = search.SizeBand(low + 0.2 * (high - low), 0.05)
  free = search.derive_policy(arch, plan, band)
  assert any(np.all(np.asarray(free.bits[p]) == 0) for p in plan)  # whole matrices pruned
  limited = search.derive_policy(arch, plan, band, max_pruned_fraction=0.5)
  for p in plan:
    assert np.sum(np.asarray(limited.bits[p]) == 0) <= 2, p
  assert band.contains(quant.size_report(encoder_params, limited,
                                         layout=models.BERT_LAYOUT)["size_mb"])


def test_too_narrow_band_is_a_clear_error(encoder_params):
  plan = _plan(encoder_params, groups=1, bit_choices=(2, 8))
  all8 = quant.size_report(encoder_params, quant.uniform_policy(plan, 8),
                           layout=models.BERT_LAYOUT)["size_mb"]
  with pytest.raises(ValueError, match="Raise search.tolerance"):
    search.derive_policy({p: jnp.array([[0.0, 1.0]]) for p in plan}, plan,
                         search.SizeBand(all8 * 0.999, 1e-5))


def test_prior_logits_put_the_least_sensitive_groups_lowest_and_fit_the_target(encoder_params):
  plan = _plan(encoder_params, groups=4)
  rng = np.random.default_rng(0)
  # Cost of choice k for group g: sensitivity s_g * (2^-bits)^2 (0 bits: s_g); s spans decades.
  sens = {p: 10.0 ** rng.uniform(-3, 3, m.groups) for p, m in plan.items()}
  costs = {p: sens[p][:, None] * np.array([1.0, 2.0**-4, 2.0**-8, 2.0**-16])[None]
           for p in plan}
  low, high = search.size_range_mb(encoder_params, plan, layout=models.BERT_LAYOUT)
  band = search.SizeBand(low + 0.4 * (high - low), 0.05)
  logits = search.prior_logits(costs, plan, band, strength=2.0)
  argmax = quant.policy_from_logits(logits, plan)
  assert quant.size_report(encoder_params, argmax,
                           layout=models.BERT_LAYOUT)["size_mb"] <= band.target_mb
  # Within a matrix (equal group sizes) a more sensitive group never gets fewer bits: the
  # Lagrangian argmin is monotone in s.
  for p in plan:
    order = np.argsort(sens[p])
    assert np.all(np.diff(np.asarray(argmax.bits[p])[order]) >= 0), p
  bits = np.concatenate([np.asarray(argmax.bits[p]) for p in plan])
  assert len(set(bits.tolist())) >= 3  # a mixed policy, not a uniform one
  assert all(np.all(v >= -8.0 - 1e-6) and np.all(v <= 0) for v in logits.values())


def test_temperature_schedule():
  tau = lambda step: float(search.temperature(step, 100, tau_start=5.0, tau_decay=0.5,
                                              warmup_epochs=1.0))
  assert tau(0) == tau(100) == 5.0
  assert tau(300) == pytest.approx(5.0 * math.exp(-0.5 * 2.0))
  assert tau(150) == pytest.approx(5.0 * math.exp(-0.25))


def test_search_prunes_the_sub_groups_the_task_does_not_need():
  """Only 2 of the 8 FFN-in sub-groups feed the output (the FFN-out rows of the other 6 are 0).

  The task is to reproduce the float model's output (regression), weights frozen, so only the
  logits learn: the size penalty pushes every group down, the task loss holds the 2 useful ones.
  """
  config = TINY.replace(num_hidden_layers=1, initializer_range=0.5, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
  model = models.build_model(config, num_labels=1)
  params = models.init_params(model, seed=1)
  ffn_out = params["bert"]["encoder"]["layer"]["0"]["output"]["dense"]["kernel"]  # [32, 16]
  groups, useful = 8, (1, 5)
  neuron_group = np.arange(ffn_out.shape[0]) // (ffn_out.shape[0] // groups)
  params["bert"]["encoder"]["layer"]["0"]["output"]["dense"]["kernel"] = jnp.where(
      np.isin(neuron_group, useful)[:, None], ffn_out, 0.0)
  spec = quant.QuantSpec(rules=(quant.Rule(pattern=models.BERT_MATRIX_KINDS["ffn_in"],
                                           groups=groups, bit_choices=(0, 2, 4, 8)),),
                         activation_bits=32, layout=models.BERT_LAYOUT)
  plan = spec.plan(params)
  (path, matrix), = plan.items()
  fixed = search.float_matrix_bits(params, plan, layout=models.BERT_LAYOUT)
  group_bits = lambda b: matrix.group_sizes[0] * b + (32 if b else 0)
  band = search.SizeBand((fixed + len(useful) * group_bits(8)) / quant.BITS_PER_MB, 0.002)

  rng = np.random.default_rng(0)
  ids = rng.integers(1, config.vocab_size, (64, 8))
  batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones_like(jnp.asarray(ids)),
           "token_type_ids": jnp.zeros_like(jnp.asarray(ids)), "weights": jnp.ones(64)}
  batch["labels"] = model.apply({"params": params}, ids)[:, 0] * 1.0
  qapply = quant.transform(model.apply, spec)
  weight_optimizer, arch_optimizer = optax.sgd(0.0), optax.adam(0.05)
  state = search.SearchState.create(params, quant.init_qparams(spec, params),
                                    quant.init_arch(spec, params), weight_optimizer,
                                    arch_optimizer)
  step = search.make_search_step(
      search.label_loss(qapply, is_regression=True), plan=plan, target_mb=band.target_mb,
      fixed_bits=fixed, size_weight=1.0, hard=False,
      weight_optimizer=weight_optimizer, arch_optimizer=arch_optimizer,
      tau_fn=lambda s: search.temperature(s, 50, tau_start=2.0, tau_decay=0.5,
                                          warmup_epochs=0.0),
      arch_start_step=0)
  for _ in range(300):
    state, metrics = step.at(0)(state, (batch, batch))
  bits = np.asarray(quant.policy_from_logits(state.arch, plan).bits[path])
  useless = [g for g in range(groups) if g not in useful]
  assert np.all(bits[useless] == 0), bits
  assert np.all(bits[list(useful)] > 0), bits
  derived = search.derive_policy(state.arch, plan, band, fixed_bits=fixed)
  assert np.all(np.asarray(derived.bits[path])[useless] == 0)


def _one_search_step(second_order: bool, inner_lr: float):
  config = TINY.replace(num_hidden_layers=1, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, initializer_range=0.3)
  model = models.build_model(config, num_labels=2)
  params = models.init_params(model, seed=2)
  spec = models.bert_encoder_spec(groups=2, bit_choices=(2, 4, 8), activation_bits=32)
  plan = spec.plan(params)
  rng = np.random.default_rng(3)
  batch = lambda: {"input_ids": jnp.asarray(rng.integers(1, 50, (8, 6))),
                   "attention_mask": jnp.ones((8, 6), jnp.int32),
                   "token_type_ids": jnp.zeros((8, 6), jnp.int32),
                   "labels": jnp.asarray(rng.integers(0, 2, 8)), "weights": jnp.ones(8)}
  batches = (batch(), batch())
  weight_optimizer, arch_optimizer = optax.sgd(0.5), optax.sgd(1.0)
  state = search.SearchState.create(params, quant.init_qparams(spec, params),
                                    quant.init_arch(spec, params), weight_optimizer,
                                    arch_optimizer)
  step = search.make_search_step(  # size_weight 0: only the task loss moves the logits
      search.label_loss(quant.transform(model.apply, spec), is_regression=False), plan=plan,
      target_mb=1.0, fixed_bits=0, size_weight=0.0, hard=False,
      weight_optimizer=weight_optimizer, arch_optimizer=arch_optimizer,
      tau_fn=lambda s: jnp.float32(1.0), arch_start_step=0, second_order=second_order,
      inner_lr=inner_lr)
  return jax.device_get(step.at(0)(state, batches)[0].arch)


def test_second_order_step_runs_on_the_quantized_model_and_reduces_to_first_order():
  """On the quantized tiny BERT (STEs differentiated twice), a second-order step without an
  inner step is the first-order step: the math of the inner step is checked against finite
  differences on a small problem below."""
  first = _one_search_step(False, 0.0)
  assert all(np.abs(v).max() > 0 for v in first.values())  # the logits moved
  same = _one_search_step(True, 0.0)
  for p in first:
    np.testing.assert_allclose(same[p], first[p], rtol=1e-5, atol=1e-7)


# The small bilevel problem: G = 2 sub-groups of D = 2 weights, K = 3 choices. The logits pick
# each group's factor s_g = sum_k softmax(a_g / tau)_k LEVELS_k; the model is X v with
# v = ((w + b) * s)[g, d] flattened, b a per-group offset in the quantizer parameters; the loss
# is the mean squared error.
LEVELS = np.array([0.25, 0.6, 1.0])
TAU, ENTROPY_WEIGHT = 0.7, 0.05


def _small_problem_loss(weights: dict, arch: dict, batch: dict, dropout_key: jax.Array,
                        gumbel_key: jax.Array, tau: jax.Array, hard: bool, teacher: None
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """A `LossFn` (float32 JAX) of the small problem; the keys are unused: it is deterministic."""
  del dropout_key, gumbel_key, hard, teacher
  s = jax.nn.softmax(arch["m"] / tau, axis=-1) @ jnp.asarray(LEVELS, jnp.float32)
  v = ((weights["params"]["w"] + weights["qparams"]["b"][:, None]) * s[:, None]).reshape(-1)
  loss = jnp.mean(jnp.square(batch["x"] @ v - batch["y"]))
  return loss, {"task_loss": loss}


def _small_problem_reference(a: np.ndarray, w: np.ndarray, b: np.ndarray, train: dict,
                             search_batch: dict, inner_lr: float) -> float:
  """The architecture objective in float64 NumPy: L_search(w', b', a) + entropy term, with
  (w', b') = (w, b) - inner_lr * grad L_train(w, b, a) (gradient by hand)."""

  def factors(a):
    p = np.exp(a / TAU - np.max(a / TAU, -1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ LEVELS

  def residual(w, b, batch):
    return batch["x"] @ ((w + b[:, None]) * factors(a)[:, None]).reshape(-1) - batch["y"]

  r = residual(w, b, train)
  dv = (2.0 / len(r) * train["x"].T @ r).reshape(w.shape)  # dL/dv
  grad_w = dv * factors(a)[:, None]
  grad_b = grad_w.sum(-1)
  r = residual(w - inner_lr * grad_w, b - inner_lr * grad_b, search_batch)
  p = np.exp(a - np.max(a, -1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  entropy = np.mean(-np.sum(p * np.log(p), -1))  # arch_entropy: softmax of the logits, no tau
  return float(np.mean(r**2) + ENTROPY_WEIGHT * entropy)


def _record_gradients() -> optax.GradientTransformation:
  """An 'optimizer' that leaves the parameters alone and keeps the last gradient as its state."""
  zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
  return optax.GradientTransformation(init=zeros,
                                      update=lambda g, state, params=None: (zeros(g), g))


@pytest.mark.parametrize("second_order,inner_lr", [(False, 0.0), (True, 0.0), (True, 0.4)])
def test_architecture_gradient_matches_float64_finite_difference(second_order: bool,
                                                                 inner_lr: float):
  """The architecture step's gradient in a (deterministic) small bilevel problem against a
  central finite difference of the float64 objective L_search(w - xi grad_w L_train(w, a), a)
  + entropy: first order (xi = 0 in the reference), second order without and with an inner
  step. Train and search batches differ, so swapping them or dropping the inner step fails."""
  rng = np.random.default_rng(7)
  w, b = rng.normal(size=(2, 2)), rng.normal(size=2) * 0.5
  a = rng.normal(size=(2, 3))
  train, search_batch = ({"x": rng.normal(size=(6, 4)), "y": rng.normal(size=6)}
                         for _ in range(2))
  f32 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
  weight_optimizer, arch_optimizer = optax.sgd(0.1), _record_gradients()
  state = search.SearchState.create(f32({"w": w}), f32({"b": b}), f32({"m": a}),
                                    weight_optimizer, arch_optimizer)
  step = search.make_search_step(
      _small_problem_loss, plan={}, target_mb=1.0, fixed_bits=quant.BITS_PER_MB,
      size_weight=0.0, weight_optimizer=weight_optimizer, arch_optimizer=arch_optimizer,
      tau_fn=lambda s: jnp.float32(TAU), arch_start_step=0, entropy_weight=ENTROPY_WEIGHT,
      second_order=second_order, inner_lr=inner_lr)
  new_state, _ = step.at(0)(state, (f32(train), f32(search_batch)))
  got = np.asarray(new_state.arch_opt_state["m"], np.float64)

  def finite_difference(xi: float) -> np.ndarray:
    f = lambda x: _small_problem_reference(x, w, b, train, search_batch, xi)
    grad, h = np.zeros_like(a), 1e-6
    for index in np.ndindex(a.shape):
      delta = np.zeros_like(a)
      delta[index] = h
      grad[index] = (f(a + delta) - f(a - delta)) / (2 * h)
    return grad

  want = finite_difference(inner_lr if second_order else 0.0)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
  if inner_lr:  # the inner step matters here: the first-order gradient is far from it
    first = finite_difference(0.0)
    assert np.abs(first - want).max() > 0.1 * np.abs(want).max()


def test_warm_up_steps_leave_the_logits_and_the_bilevel_steps_move_them():
  """`make_search_step(..., arch_start_step=2)`: the host picks the weights-only program for
  steps 0 and 1 (logits untouched, the reported loss the task loss of the weights it was given),
  the bilevel one from step 2; neither program holds a conditional."""
  rng = np.random.default_rng(8)
  w, b, a = rng.normal(size=(2, 2)), rng.normal(size=2) * 0.5, rng.normal(size=(2, 3))
  batch = {"x": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32),
           "y": jnp.asarray(rng.normal(size=6), jnp.float32)}
  f32 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
  weight_optimizer, arch_optimizer = optax.sgd(0.1), optax.sgd(1.0)
  state = search.SearchState.create(f32({"w": w}), f32({"b": b}), f32({"m": a}),
                                    weight_optimizer, arch_optimizer)
  step = search.make_search_step(
      _small_problem_loss, plan={}, target_mb=1.0, fixed_bits=quant.BITS_PER_MB,
      size_weight=0.0, weight_optimizer=weight_optimizer, arch_optimizer=arch_optimizer,
      tau_fn=lambda s: jnp.float32(TAU), arch_start_step=2)
  assert step.at(0) is step.at(1) and step.at(2) is step.at(5) and step.at(1) is not step.at(2)
  for program in (step.at(0), step.at(2)):
    text = program.jitted.lower(state, (batch, batch)).as_text()
    assert "stablehlo.case" not in text and "stablehlo.if" not in text
  for i in range(4):
    before = jax.device_get(state)
    state, metrics = step.at(i)(state, (batch, batch))
    moved = not np.allclose(np.asarray(state.arch["m"]), before.arch["m"])
    assert moved == (i >= 2), i
    if i < 2:
      loss = lambda w, b: float(_small_problem_loss(
          {"params": {"w": w}, "qparams": {"b": b}}, before.arch, batch, None, None, TAU,
          False, None)[0])
      assert float(metrics["loss"]) == pytest.approx(loss(before.weights["params"]["w"],
                                                          before.weights["qparams"]["b"]))
      assert float(metrics["search_loss"]) == 0.0
