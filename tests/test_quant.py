"""Quantizers, STEs, Gumbel-softmax and size accounting against float64 NumPy / hand counts."""

from __future__ import annotations

import json
from typing import Callable

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpqbert import kernels, models, quant

# Derandomized so CI runs the same examples every time; raise max_examples locally to search more
# (400 examples per property passed when this was written).
SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)


# ---------------------------------------------------------------- float64 NumPy references


def ref_symmetric(w: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
  """s * clip(round(w / s), -2^(b-1), 2^(b-1) - 1) per group of the last axis, in float64."""
  groups = scale.shape[-1]
  wg = w.astype(np.float64).reshape(*w.shape[:-1], groups, -1)
  s = scale.astype(np.float64)[:, None]
  codes = np.clip(np.round(wg / s), -2.0 ** (bits - 1), 2.0 ** (bits - 1) - 1)
  return (codes * s).reshape(w.shape)


def ref_index(w: np.ndarray, groups: int, bits: int) -> np.ndarray:
  """AQ-BERT: q = (2^b - 1) / (max - min), round(q (w - min)) / q + min, per group, float64."""
  wg = w.astype(np.float64).reshape(*w.shape[:-1], groups, -1)
  axes = tuple(i for i in range(wg.ndim) if i != wg.ndim - 2)
  lo, hi = wg.min(axis=axes, keepdims=True), wg.max(axis=axes, keepdims=True)
  q = (2**bits - 1) / np.maximum(hi - lo, 1e-300)
  return (np.round(q * (wg - lo)) / q + lo).reshape(w.shape)


def ref_index_range(w: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
  """Index quantization with a given range per group: round(q (clip(w) - lo)) / q + lo, float64."""
  groups = lo.shape[-1]
  wg = w.astype(np.float64).reshape(*w.shape[:-1], groups, -1)
  lo, hi = lo.astype(np.float64)[:, None], hi.astype(np.float64)[:, None]
  q = (2**bits - 1) / (hi - lo)
  return (np.round(q * (np.clip(wg, lo, hi) - lo)) / q + lo).reshape(w.shape)


def near_ties(v: np.ndarray) -> np.ndarray:
  """Where float32 and float64 may round w/s differently (within 1e-3 of a .5 tie)."""
  return np.abs(np.abs(v - np.floor(v)) - 0.5) < 1e-3


@st.composite
def grouped_weights(draw, max_groups: int = 6):
  """(w, groups): a float32 array whose last axis splits into `groups` equal sub-groups."""
  groups = draw(st.integers(1, max_groups))
  per_group = draw(st.integers(1, 5))
  lead = draw(st.lists(st.integers(1, 4), min_size=0, max_size=2))
  shape = (*lead, groups * per_group)
  w = draw(hnp.arrays(np.float32, shape,
                      elements=st.floats(-3, 3, width=32, allow_nan=False, allow_subnormal=False)))
  return w, groups


def per_group_values(w_hat: np.ndarray, groups: int) -> list[np.ndarray]:
  wg = np.moveaxis(np.asarray(w_hat).reshape(*w_hat.shape[:-1], groups, -1), -2, 0)
  return [np.unique(g) for g in wg]


# ---------------------------------------------------------------- straight-through estimators


def test_round_ste_forward_exact_and_identity_gradient():
  x = jnp.array([-2.5, -1.49, -0.5, 0.2, 0.5, 1.5, 3.7])
  np.testing.assert_array_equal(quant.round_ste(x), np.round(np.asarray(x)))
  cotangent = jnp.arange(1.0, 8.0)
  grad = jax.grad(lambda v: jnp.sum(quant.round_ste(v) * cotangent))(x)
  np.testing.assert_array_equal(grad, cotangent)


# Subnormals excluded: XLA on CPU flushes them to zero, so sign(-1e-45) is +1 there.
@given(hnp.arrays(np.float32, st.integers(1, 50),
                  elements=st.floats(-4, 4, width=32, allow_subnormal=False)),
       st.floats(0.25, 3.0))
@SETTINGS
def test_sign_ste_values_and_clipped_gradient(x, clip):
  y = np.asarray(quant.sign_ste(jnp.asarray(x), clip))
  np.testing.assert_array_equal(y, np.where(x >= 0, 1.0, -1.0))
  grad = np.asarray(jax.grad(lambda v: jnp.sum(quant.sign_ste(v, clip) * 3.0))(jnp.asarray(x)))
  np.testing.assert_array_equal(grad, np.where(np.abs(x) <= np.float32(clip), 3.0, 0.0))


def test_scale_grad_is_identity_forward_and_scales_gradient():
  x = jnp.array([1.0, -2.0, 3.0])
  assert np.array_equal(quant.scale_grad(x, 0.25), x)
  grad = jax.grad(lambda v: jnp.sum(quant.scale_grad(v, 0.25) * jnp.array([1.0, 2.0, 4.0])))(x)
  np.testing.assert_allclose(grad, [0.25, 0.5, 1.0])


# ---------------------------------------------------------------- symmetric (LSQ) quantizer


@given(grouped_weights(), st.integers(2, 8))
@SETTINGS
def test_symmetric_matches_float64_reference(w_and_groups, bits):
  w, groups = w_and_groups
  scale = np.asarray(quant.init_symmetric_scale(jnp.asarray(w), groups, bits, "lsq"))
  got = np.asarray(quant.quantize_symmetric(jnp.asarray(w), jnp.asarray(scale), bits))
  want = ref_symmetric(w, scale, bits)
  step = np.repeat(scale, w.shape[-1] // groups)
  ok = np.isclose(got, want, rtol=1e-6, atol=1e-6 * np.max(step)) | near_ties(w / step)
  assert ok.all()


@given(grouped_weights(), st.integers(2, 8), st.sampled_from(["absmax", "mse", "lsq"]))
@SETTINGS
def test_symmetric_error_at_most_half_a_step_in_range(w_and_groups, bits, init):
  w, groups = w_and_groups
  scale = np.asarray(quant.init_symmetric_scale(jnp.asarray(w), groups, bits, init))
  got = np.asarray(quant.quantize_symmetric(jnp.asarray(w), jnp.asarray(scale), bits))
  step = np.broadcast_to(np.repeat(scale, w.shape[-1] // groups), w.shape).astype(np.float64)
  q_neg, q_pos = 2.0 ** (bits - 1), 2.0 ** (bits - 1) - 1
  tol = 1e-6 * (step + np.abs(w))
  in_range = (w >= -q_neg * step - tol) & (w <= q_pos * step + tol)
  error = np.abs(got.astype(np.float64) - w)
  assert np.all(error[in_range] <= step[in_range] * 0.5 + tol[in_range])
  if init == "absmax":  # max-abs scales put every value in range
    assert in_range.all()


@given(grouped_weights(), st.integers(1, 8), st.sampled_from(["symmetric", "index", "sign",
                                                              "xnor"]))
@SETTINGS
def test_b_bit_quantizer_has_at_most_2_to_the_b_values_per_group(w_and_groups, bits, kind):
  w, groups = w_and_groups
  wj = jnp.asarray(w)
  if kind == "symmetric":
    w_hat = quant.quantize_symmetric(wj, quant.init_symmetric_scale(wj, groups, bits), bits)
  elif kind == "index":
    w_hat = quant.quantize_index(wj, *quant.minmax_range(wj, groups), bits)
  elif kind == "sign":
    bits, w_hat = 1, quant.binarize_sign(wj)
  else:
    bits, w_hat = 1, quant.binarize_xnor(wj, groups)
  for values in per_group_values(np.asarray(w_hat), groups):
    assert len(values) <= 2**bits


def central_difference(f: Callable[[np.ndarray], float], x: np.ndarray,
                       h: float = 1e-6) -> np.ndarray:
  """The float64 central finite difference of a scalar function f at every entry of x."""
  x = np.asarray(x, np.float64)
  grad = np.zeros_like(x)
  for index in np.ndindex(x.shape):
    step = np.zeros_like(x)
    step[index] = h
    grad[index] = (f(x + step) - f(x - step)) / (2 * h)
  return grad


def lsq_surrogate(w: np.ndarray, cotangent: np.ndarray, s: np.ndarray, frozen: np.ndarray,
                  bits: int) -> float:
  """sum(c * Q(w; s)) with round(v) replaced by v + (round(v0) - v0), v0 = w / frozen: the
  function whose gradient the straight-through estimator is at s = frozen (clip kept exact)."""
  q_neg, q_pos = 2.0 ** (bits - 1), 2.0 ** (bits - 1) - 1
  per_group = w.shape[-1] // s.shape[-1]
  w64 = w.astype(np.float64)
  step, step0 = (np.repeat(np.asarray(v, np.float64), per_group) for v in (s, frozen))
  v0 = w64 / step0
  inside = (v0 >= -q_neg) & (v0 <= q_pos)
  residual = np.where(inside, np.round(v0) - v0, 0.0)
  return float(np.sum(cotangent * step * (np.clip(w64 / step, -q_neg, q_pos) + residual)))


def test_lsq_scale_gradient_matches_float64_finite_difference():
  """d/ds of sum(c * Q(w; s)) under the straight-through surrogate, times LSQ's 1/sqrt(n q_pos)."""
  rng = np.random.default_rng(0)
  groups, bits = 3, 3
  w = rng.normal(size=(5, 12)).astype(np.float32)
  cotangent = rng.normal(size=w.shape)
  scale = np.asarray([0.3, 0.45, 0.6], np.float32)  # some |w| / s beyond the grid: clipped terms
  grad = jax.grad(lambda s: jnp.sum(quant.quantize_symmetric(jnp.asarray(w), s, bits)
                                    * jnp.asarray(cotangent, jnp.float32)))(jnp.asarray(scale))
  q_pos = 2.0 ** (bits - 1) - 1
  want = central_difference(lambda s: lsq_surrogate(w, cotangent, s, scale, bits), scale)
  want /= np.sqrt(w.size / groups * q_pos)
  np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-6)
  assert np.all(np.abs(want) > 1e-3)  # a real check, not 0 == 0


def test_symmetric_weight_gradient_is_identity_inside_zero_outside():
  w = jnp.array([[-1.0, -0.2, 0.1, 0.35, 0.8, 2.0]])
  scale = jnp.array([0.1])  # 3 bits: grid [-0.4, 0.3]
  grad = jax.grad(lambda v: jnp.sum(quant.quantize_symmetric(v, scale, 3)))(w)
  np.testing.assert_array_equal(grad, [[0.0, 1.0, 1.0, 0.0, 0.0, 0.0]])


def test_symmetric_rejects_unsupported_bits():
  for bits in (0, 9):
    with pytest.raises(ValueError, match="1..8 bits"):
      quant.quantize_symmetric(jnp.ones((2, 4)), jnp.ones((1,)), bits)
  with pytest.raises(ValueError, match="1-bit symmetric grid"):
    quant.symmetric_levels(1)  # {-1, +1} is no integer range [-q_neg, q_pos]


# ---------------------------------------------------------------- 1-bit symmetric: s * sign(w)


def ref_scaled_sign(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
  """s * sign(w) per group of the last axis, sign(0) = +1, in float64."""
  groups = scale.shape[-1]
  wg = w.astype(np.float64).reshape(*w.shape[:-1], groups, -1)
  return (scale.astype(np.float64)[:, None] * np.where(wg >= 0, 1.0, -1.0)).reshape(w.shape)


@given(grouped_weights(), st.data())
@SETTINGS
def test_one_bit_symmetric_is_scale_times_sign(w_and_groups, data):
  w, groups = w_and_groups
  scale = np.asarray(data.draw(st.lists(st.floats(0.0625, 4.0, width=32), min_size=groups,
                                        max_size=groups)), np.float32)
  got = np.asarray(quant.quantize_symmetric(jnp.asarray(w), jnp.asarray(scale), 1))
  np.testing.assert_array_equal(got, ref_scaled_sign(w, scale))  # s * +-1 is exact


def test_one_bit_symmetric_hand_case_sign_of_zero_is_plus():
  w = jnp.array([[0.0, -0.0, -0.3, 2.0], [-1e-3, 5.0, 0.0, -7.0]])
  got = quant.quantize_symmetric(w, jnp.array([0.5, 2.0]), 1)
  np.testing.assert_array_equal(got, [[0.5, 0.5, -2.0, 2.0], [-0.5, 0.5, 2.0, -2.0]])


def test_one_bit_symmetric_scale_gradient_matches_formula_and_finite_difference():
  """d/ds sum(c * s sign(w)) = sum_group(c * sign(w)), times LSQ's 1/sqrt(n * 1)."""
  rng = np.random.default_rng(3)
  groups = 3
  w = rng.normal(size=(2, 5, 12)).astype(np.float32)
  w[0, 0, 0] = 0.0  # sign(0) = +1 in the gradient too
  cotangent = rng.normal(size=w.shape)
  scale = np.asarray([0.3, 0.8, 1.7], np.float32)

  def loss(s, lsq_grad):
    return jnp.sum(quant.quantize_symmetric(jnp.asarray(w), s, 1, lsq_grad=lsq_grad)
                   * jnp.asarray(cotangent, jnp.float32))

  per_group = w.shape[-1] // groups
  signs = np.where(w >= 0, 1.0, -1.0).reshape(2, 5, groups, per_group)
  formula = np.sum(cotangent.reshape(signs.shape) * signs, axis=(0, 1, 3))

  def f64(s: np.ndarray) -> float:
    return float(np.sum(cotangent * ref_scaled_sign(w, s)))

  finite = np.zeros(groups)
  for g in range(groups):
    h = np.zeros(groups)
    h[g] = 1e-6
    finite[g] = (f64(scale + h) - f64(scale - h)) / 2e-6
  np.testing.assert_allclose(formula, finite, rtol=1e-6, atol=1e-8)
  plain = jax.grad(loss)(jnp.asarray(scale), False)
  np.testing.assert_allclose(plain, formula, rtol=1e-5, atol=1e-6)
  lsq = jax.grad(loss)(jnp.asarray(scale), True)
  np.testing.assert_allclose(lsq, formula / np.sqrt(w.size / groups), rtol=1e-5, atol=1e-6)
  assert np.all(np.abs(formula) > 1e-3)


def test_one_bit_symmetric_weight_gradient_is_identity_inside_the_scale_zero_outside():
  w = jnp.array([[-1.0, -0.5, -0.2, 0.0, 0.5, 0.6, 3.0, -0.05, 0.05, 0.25]])
  scale = jnp.array([0.5, 0.1])  # groups of 5: |w| <= 0.5, then |w| <= 0.1
  cotangent = jnp.arange(1.0, 11.0)
  grad = jax.grad(lambda v: jnp.sum(quant.quantize_symmetric(v, scale, 1) * cotangent))(w)
  np.testing.assert_array_equal(grad, [[0.0, 2.0, 3.0, 4.0, 5.0, 0.0, 0.0, 8.0, 9.0, 0.0]])


@given(grouped_weights(), st.sampled_from(["mse", "absmax", "lsq"]))
@SETTINGS
def test_one_bit_init_scale_is_group_mean_abs(w_and_groups, method):
  w, groups = w_and_groups
  got = np.asarray(quant.init_symmetric_scale(jnp.asarray(w), groups, 1, method))
  wg = np.abs(w.astype(np.float64)).reshape(*w.shape[:-1], groups, -1)
  want = np.maximum(np.moveaxis(wg, -2, 0).reshape(groups, -1).mean(axis=1), 1e-12)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)


def test_one_bit_init_scale_minimises_squared_error_against_a_brute_force_grid():
  rng = np.random.default_rng(4)
  groups = 4
  w = (rng.standard_t(3, size=(16, 32)) * rng.uniform(0.1, 2.0, size=32)).astype(np.float32)
  got = np.asarray(quant.init_symmetric_scale(jnp.asarray(w), groups, 1, "mse"), np.float64)
  wg = np.moveaxis(w.astype(np.float64).reshape(16, groups, -1), 1, 0).reshape(groups, -1)
  signs = np.where(wg >= 0, 1.0, -1.0)
  for g in range(groups):
    candidates = np.linspace(0.0, np.abs(wg[g]).max(), 20001)  # [C]
    errors = np.sum((wg[g][None, :] - candidates[:, None] * signs[g][None, :]) ** 2, axis=1)
    error_at_init = np.sum((wg[g] - got[g] * signs[g]) ** 2)
    assert error_at_init <= errors.min() * (1 + 1e-7)
    grid_step = candidates[1] - candidates[0]
    assert abs(candidates[np.argmin(errors)] - got[g]) <= grid_step
  with pytest.raises(ValueError, match="unknown scale init"):
    quant.init_symmetric_scale(jnp.asarray(w), groups, 1, "minmax")


def test_one_and_three_bit_groups_cost_their_packed_words_plus_a_scale():
  params = abstract_params(TINY)
  spec = models.bert_encoder_spec(groups=4, bit_choices=(0, 1, 2, 3, 4, 8))
  plan = spec.plan(params)
  query = "bert/encoder/layer/0/attention/self/query/kernel"  # [32, 32]: 4 groups of 256
  bits = {p: np.zeros((4,), np.int32) for p in plan}
  bits[query] = np.array([1, 1, 0, 3], np.int32)
  policy = quant.Policy(bits=bits, matrices=tuple(plan.values())).validate()
  # Each group is 8 columns of K = 32 rows: 1 bit, one word per column; 3 bits, 10 codes to a
  # word, ceil(32 / 10) = 4 words per column; + one 32-bit scale per kept group.
  hand_bits = 2 * (8 * 32 + 32) + (8 * 4 * 32 + 32)
  assert quant.size_report(params, policy,
                           layout=models.BERT_LAYOUT)["size_mb"] * 8 * 2**20 == hand_bits
  assert quant.Rule(pattern="x", bit_choices=(0, 1, 2, 3, 4, 8)).bit_choices == (0, 1, 2, 3, 4, 8)


# ---------------------------------------------------------------- index, binary, prune


@given(grouped_weights(), st.integers(1, 8))
@SETTINGS
def test_index_matches_aqbert_formula_and_half_step_error(w_and_groups, bits):
  w, groups = w_and_groups
  wj = jnp.asarray(w)
  got = np.asarray(quant.quantize_index(wj, *quant.minmax_range(wj, groups), bits))
  want = ref_index(w, groups, bits)
  wg = w.astype(np.float64).reshape(*w.shape[:-1], groups, -1)
  axes = tuple(i for i in range(wg.ndim) if i != wg.ndim - 2)
  span = (wg.max(axis=axes, keepdims=True) - wg.min(axis=axes, keepdims=True))
  step = np.broadcast_to(span / (2**bits - 1), wg.shape).reshape(w.shape)
  tol = 1e-5 * np.maximum(np.max(np.abs(w)), 1e-6)
  assert np.all(np.abs(got - w) <= step / 2 + tol)
  codes = (w - np.broadcast_to(wg.min(axis=axes, keepdims=True), wg.shape).reshape(w.shape)) / \
      np.where(step > 0, step, 1)
  assert np.all(np.isclose(got, want, rtol=0, atol=tol) | near_ties(codes))


def index_surrogate(w: np.ndarray, cotangent: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                    frozen: tuple[np.ndarray, np.ndarray, np.ndarray], bits: int) -> float:
  """sum(c * Q_index(w; lo, hi)) with round(u) replaced by u + (round(u0) - u0), u0 the codes at
  the point `frozen` = (w0, lo0, hi0): the straight-through surrogate (float64; clip kept exact).
  At (w, lo, hi) = frozen it is the quantizer's value."""

  def codes(w, lo, hi):
    groups = lo.shape[-1]
    wg = np.asarray(w, np.float64).reshape(*w.shape[:-1], groups, -1)
    lo, hi = np.asarray(lo, np.float64)[:, None], np.asarray(hi, np.float64)[:, None]
    q = (2.0**bits - 1) / (hi - lo)
    return q, q * (np.clip(wg, lo, hi) - lo), lo

  _, u0, _ = codes(*frozen)
  q, u, lo_g = codes(w, lo, hi)
  return float(np.sum(cotangent.reshape(u.shape) * ((u + np.round(u0) - u0) / q + lo_g)))


def test_index_learned_range_and_weight_gradients_match_float64_finite_difference():
  """Gradients of a learned (lo, hi) and of w against a float64 central difference of the STE's
  surrogate; the forward value (clipped to [lo, hi]) against the float64 quantizer."""
  rng = np.random.default_rng(5)
  groups, bits = 2, 3
  w = rng.normal(size=(4, 8)).astype(np.float32)
  lo, hi = np.asarray([-0.8, -0.5], np.float32), np.asarray([0.7, 1.1], np.float32)
  lo_w, hi_w = (np.repeat(v, w.shape[-1] // groups) for v in (lo, hi))
  u0 = (2.0**bits - 1) / (hi_w - lo_w) * (np.clip(w, lo_w, hi_w) - lo_w)
  # The data is generic: no weight on a clip boundary or a rounding tie, some clipped each side.
  assert np.min(np.abs(w - lo_w)) > 1e-3 and np.min(np.abs(w - hi_w)) > 1e-3
  assert not np.any(near_ties(u0)) and np.any(w < lo_w) and np.any(w > hi_w)
  cotangent = rng.normal(size=w.shape)
  loss = lambda v, a, b: jnp.sum(quant.quantize_index(v, a, b, bits)
                                 * jnp.asarray(cotangent, jnp.float32))
  got = jax.grad(loss, (0, 1, 2))(jnp.asarray(w), jnp.asarray(lo), jnp.asarray(hi))

  surrogate = lambda v, a, b: index_surrogate(v, cotangent, a, b, (w, lo, hi), bits)
  out = np.asarray(quant.quantize_index(jnp.asarray(w), jnp.asarray(lo), jnp.asarray(hi), bits))
  np.testing.assert_allclose(out, ref_index_range(w, lo, hi, bits), atol=1e-6)
  assert np.all((out >= lo_w - 1e-6) & (out <= hi_w + 1e-6))  # clipped to the learned range
  np.testing.assert_allclose(np.sum(out * cotangent), surrogate(w, lo, hi), rtol=1e-5)
  want = (central_difference(lambda v: surrogate(v, lo, hi), w),
          central_difference(lambda a: surrogate(w, a, hi), lo),
          central_difference(lambda b: surrogate(w, lo, b), hi))
  for name, g, ref in zip(("w", "lo", "hi"), got, want):
    np.testing.assert_allclose(np.asarray(g), ref, rtol=1e-4, atol=1e-5, err_msg=name)
  # Identity inside [lo, hi], 0 outside, for w; clipped weights feed the range ends.
  np.testing.assert_allclose(want[0], np.where((w >= lo_w) & (w <= hi_w), cotangent, 0.0),
                             atol=1e-6)
  assert np.all(np.abs(want[1]) > 1e-2) and np.all(np.abs(want[2]) > 1e-2)


def test_xnor_scale_is_group_mean_abs():
  w = np.array([[1.0, -3.0, 0.5, -0.5]], np.float32)
  got = np.asarray(quant.binarize_xnor(jnp.asarray(w), 2))
  np.testing.assert_allclose(got, [[2.0, -2.0, 0.5, -0.5]])


def test_prune_is_exact_zero_without_gradient():
  w = jnp.arange(6.0).reshape(2, 3)
  assert not np.any(quant.prune(w))
  assert not np.any(jax.grad(lambda v: jnp.sum(quant.prune(v) + 0.0))(w))


def test_group_view_rejects_an_empty_last_group():
  with pytest.raises(ValueError, match=r"9 columns into 4 sub-groups.*Use 3 or 5 groups"):
    quant.group_view(jnp.ones((4, 9)), 4)
  with pytest.raises(ValueError, match=r"3 columns into 5 sub-groups.*Use 3 groups"):
    quant.group_view(jnp.ones((4, 3)), 5)  # more groups than columns
  with pytest.raises(ValueError, match=r"^m: cannot split 9 columns into 4 sub-groups"):
    quant.MatrixSpec(path="m", shape=(4, 9), groups=4, quantizer="symmetric", bit_choices=(2,))


# ---------------------------------------------------------------- uneven sub-groups


def column_blocks(out: int, groups: int) -> list[slice]:
  """The sub-groups as the issue defines them: block g holds the columns
  [g * w, min((g + 1) * w, out)), w = ceil(out / groups)."""
  width = -(-out // groups)
  return [slice(g * width, min((g + 1) * width, out)) for g in range(groups)]


UNEVEN = [((5, 10), 4), ((2, 3, 80), 12), ((4, 11), 3)]  # last blocks of 1, 3 and 3 columns


@pytest.mark.parametrize("out,groups", [(10, 4), (10, 3), (80, 12), (11, 6), (13, 5)])
def test_uneven_groups_are_ceil_width_blocks_and_reductions_skip_the_padding(out, groups):
  blocks = column_blocks(out, groups)
  assert quant.grid.group_widths(out, groups) == tuple(b.stop - b.start for b in blocks)
  rng = np.random.default_rng(out * groups)
  x = rng.normal(size=(2, 3, out)).astype(np.float32)
  view = quant.group_view(jnp.asarray(x), groups)
  assert view.shape == (2, 3, groups, blocks[0].stop)
  for g, b in enumerate(blocks):
    np.testing.assert_array_equal(view[..., g, :b.stop - b.start], x[..., b])
  np.testing.assert_array_equal(quant.grid.ungroup(view, out), x)
  # All of one sign: a padded 0 would be the short group's max (or min) and lower its mean.
  for x in (rng.uniform(1, 2, (2, 3, out)), -rng.uniform(1, 2, (2, 3, out))):
    view = quant.group_view(jnp.asarray(x, jnp.float32), groups)
    for name, reduce in (("sum", np.sum), ("max", np.max), ("min", np.min), ("mean", np.mean)):
      got = getattr(quant.grid, f"group_{name}")(view, out)
      want = [reduce(x[..., b]) for b in blocks]
      np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("shape,groups", UNEVEN)
@pytest.mark.parametrize("kind", ["symmetric", "symmetric_init", "index", "xnor", "sign"])
def test_uneven_groups_quantize_each_column_block_as_float64(shape, groups, kind):
  """Every quantizer and scale init on an uneven split against float64 NumPy over each column
  block on its own (the references of the even tests, with one group per block)."""
  rng = np.random.default_rng(7)
  w = rng.normal(size=shape).astype(np.float32)
  wj, blocks = jnp.asarray(w), column_blocks(shape[-1], groups)
  w64 = w.astype(np.float64)
  if kind == "symmetric":
    scale = rng.uniform(0.05, 0.4, groups).astype(np.float32)  # some |w| / s beyond the grid
    for bits in (1, 2, 3, 8):
      got = np.asarray(quant.quantize_symmetric(wj, jnp.asarray(scale), bits))
      for g, b in enumerate(blocks):
        if bits == 1:
          np.testing.assert_array_equal(got[..., b], ref_scaled_sign(w[..., b], scale[g:g + 1]))
        else:
          want = ref_symmetric(w[..., b], scale[g:g + 1], bits)
          ok = np.isclose(got[..., b], want, rtol=1e-6, atol=1e-7) | near_ties(w[..., b] / scale[g])
          assert ok.all(), (bits, g)
  elif kind == "symmetric_init":
    for bits in (1, 2, 4):
      q_pos = 1.0 if bits == 1 else 2.0 ** (bits - 1) - 1
      for method in ("absmax", "lsq", "mse"):
        got = np.asarray(quant.init_symmetric_scale(wj, groups, bits, method), np.float64)
        for g, b in enumerate(blocks):
          block = w64[..., b]
          if bits == 1:  # mean|w| whatever the method
            want = np.abs(block).mean()
          elif method == "absmax":
            want = np.abs(block).max() / q_pos
          elif method == "lsq":
            want = 2 * np.abs(block).mean() / np.sqrt(q_pos)
          else:  # The best of the 100 fractions of the block's own absmax scale.
            fractions = np.linspace(0.01, 1.0, 100) * np.abs(block).max() / q_pos
            errors = [np.sum((ref_symmetric(block, np.array([s]), bits) - block) ** 2)
                      for s in fractions]
            error = np.sum((ref_symmetric(block, np.array([got[g]]), bits) - block) ** 2)
            assert error <= min(errors) * (1 + 1e-5) + 1e-12, (bits, g)
            assert np.min(np.abs(fractions - got[g])) <= 1e-5 * got[g], (bits, g)
            continue
          np.testing.assert_allclose(got[g], want, rtol=1e-5, err_msg=f"{method} {bits} {g}")
  elif kind == "index":
    lo, hi = (np.asarray(v) for v in quant.minmax_range(wj, groups))
    np.testing.assert_array_equal(lo, [w[..., b].min() for b in blocks])
    np.testing.assert_array_equal(hi, [w[..., b].max() for b in blocks])
    for bits in (1, 3, 8):
      got = np.asarray(quant.quantize_index(wj, jnp.asarray(lo), jnp.asarray(hi), bits))
      grid = quant.grid.index(wj, jnp.asarray(lo), jnp.asarray(hi), bits)
      for g, b in enumerate(blocks):
        want = ref_index(w[..., b], 1, bits)
        step = (hi[g] - lo[g]) / (2**bits - 1)
        codes = (w64[..., b] - lo[g]) / step
        assert np.all(np.isclose(got[..., b], want, atol=1e-5) | near_ties(codes)), (bits, g)
        assert np.all((np.asarray(grid.codes)[..., b] == np.round(codes)) | near_ties(codes))
  elif kind == "xnor":
    got = np.asarray(quant.binarize_xnor(wj, groups))
    scale = np.asarray(quant.xnor_scale(wj, groups))
    for g, b in enumerate(blocks):
      alpha = np.abs(w64[..., b]).mean()
      np.testing.assert_allclose(scale[g], alpha, rtol=1e-5)
      np.testing.assert_allclose(got[..., b], alpha * np.where(w[..., b] >= 0, 1.0, -1.0),
                                 rtol=1e-5)
  else:
    grid = quant.grid.signs(wj, groups=groups)
    assert grid.scale.shape == (groups,)
    np.testing.assert_array_equal(grid.dequantize(), np.where(w >= 0, 1.0, -1.0))


def test_uneven_groups_gradients_count_each_group_over_its_own_columns():
  """LSQ's step-size gradient (1/sqrt(n * q_pos) with n the short group's own count), the 1-bit
  scale's sum(c * sign(w)), a learned index range's and XNOR's mean|w| gradients, each against
  float64 per column block; 10 columns in 4 groups leave the last one a single column."""
  rng = np.random.default_rng(11)
  groups, blocks = 4, column_blocks(10, 4)
  w = rng.normal(size=(5, 10)).astype(np.float32)
  cotangent = rng.normal(size=w.shape)
  c32 = jnp.asarray(cotangent, jnp.float32)
  counts = np.array([w[:, b].size for b in blocks])
  assert counts.tolist() == [15, 15, 15, 5]

  scale = np.asarray([0.3, 0.45, 0.6, 0.2], np.float32)
  bits, q_pos = 3, 3.0
  loss = lambda v, s, b: jnp.sum(quant.quantize_symmetric(v, s, b) * c32)
  grad_w, grad_s = jax.grad(loss, (0, 1))(jnp.asarray(w), jnp.asarray(scale), bits)
  for g, b in enumerate(blocks):
    want = central_difference(lambda s: lsq_surrogate(w[:, b], cotangent[:, b], s,
                                                      scale[g:g + 1], bits), scale[g:g + 1])
    np.testing.assert_allclose(grad_s[g], want[0] / np.sqrt(counts[g] * q_pos), rtol=1e-4)
    v = w[:, b] / scale[g]
    np.testing.assert_allclose(grad_w[:, b], np.where((v >= -4) & (v <= 3), cotangent[:, b], 0),
                               rtol=1e-6)
  assert np.all(np.abs(grad_s) > 1e-3)

  one_bit = jax.grad(loss, 1)(jnp.asarray(w), jnp.asarray(scale), 1)
  want = [np.sum(cotangent[:, b] * np.where(w[:, b] >= 0, 1.0, -1.0)) / np.sqrt(counts[g])
          for g, b in enumerate(blocks)]
  np.testing.assert_allclose(one_bit, want, rtol=1e-5)

  lo = np.asarray([-0.8, -0.5, -1.0, -0.3], np.float32)
  hi = np.asarray([0.7, 1.1, 0.9, 0.4], np.float32)
  index_loss = lambda v, a, h: jnp.sum(quant.quantize_index(v, a, h, bits) * c32)
  got = jax.grad(index_loss, (0, 1, 2))(jnp.asarray(w), jnp.asarray(lo), jnp.asarray(hi))
  for g, b in enumerate(blocks):
    frozen = (w[:, b], lo[g:g + 1], hi[g:g + 1])
    surrogate = lambda v, a, h: index_surrogate(v, cotangent[:, b], a, h, frozen, bits)
    want = (central_difference(lambda v: surrogate(v, *frozen[1:]), w[:, b]),
            central_difference(lambda a: surrogate(w[:, b], a, hi[g:g + 1]), lo[g:g + 1]),
            central_difference(lambda h: surrogate(w[:, b], lo[g:g + 1], h), hi[g:g + 1]))
    for name, have, ref in zip(("w", "lo", "hi"), (got[0][:, b], got[1][g:g + 1],
                                                   got[2][g:g + 1]), want):
      np.testing.assert_allclose(np.asarray(have), ref, rtol=1e-4, atol=1e-5,
                                 err_msg=f"{name} {g}")

  # XNOR: d/dw sum(c * alpha_g sign(w)) = c alpha_g [|w| <= 1] + sign(w) sum_g(c sign(w)) / n_g.
  xnor = jax.grad(lambda v: jnp.sum(quant.binarize_xnor(v, groups) * c32))(jnp.asarray(w))
  for g, b in enumerate(blocks):
    signs = np.where(w[:, b] >= 0, 1.0, -1.0)
    alpha = np.abs(w[:, b].astype(np.float64)).mean()
    want = (cotangent[:, b] * alpha * (np.abs(w[:, b]) <= 1)
            + signs * np.sum(cotangent[:, b] * signs) / counts[g])
    np.testing.assert_allclose(xnor[:, b], want, rtol=1e-4, atol=1e-6)


def test_uneven_mixture_weighs_each_column_block_by_its_groups_probabilities():
  rng = np.random.default_rng(12)
  w = jnp.asarray(rng.normal(size=(3, 80)), jnp.float32)
  probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(12, 3)), jnp.float32))
  quantize = lambda v, k: v * (k + 1.0)  # stand-ins whose mixture is known in closed form
  mixed = np.asarray(quant.mix(w, probs, quantize))
  grad = jax.grad(lambda p: jnp.sum(quant.mix(w, p, quantize)))(probs)
  p64, w64 = np.asarray(probs, np.float64), np.asarray(w, np.float64)
  for g, b in enumerate(column_blocks(80, 12)):
    np.testing.assert_allclose(mixed[:, b], w64[:, b] * (p64[g] @ [1.0, 2.0, 3.0]), rtol=1e-6)
    np.testing.assert_allclose(grad[g], w64[:, b].sum() * np.array([1.0, 2.0, 3.0]), rtol=1e-5,
                               atol=1e-5)


# ---------------------------------------------------------------- activation quantizer


def test_activation_quantizer_learned_and_moving():
  """Values against float64; the learned scale's gradient against a float64 central difference
  of the straight-through surrogate times LSQ's 1/sqrt(n q_pos) (n: every element, one group);
  a tracked (moving) scale gets none."""
  x = jnp.linspace(-2.0, 2.0, 17)
  scale = quant.absmax_scale(x, 8)
  np.testing.assert_allclose(scale, 2.0 / 127)
  out = np.asarray(quant.quantize_activation(x, scale, 8))
  np.testing.assert_allclose(out, ref_symmetric(np.asarray(x)[None], np.asarray([scale]), 8)[0],
                             atol=1e-6)
  rng = np.random.default_rng(6)
  acts = rng.normal(size=(3, 2, 8)).astype(np.float32)  # [batch, tokens, features]
  cotangent = rng.normal(size=acts.shape)
  bits, step = 4, np.float32(0.3)  # some |x| / s beyond the 4-bit grid [-8, 7]: clipped terms
  loss = lambda s, learned: jnp.sum(quant.quantize_activation(jnp.asarray(acts), s, bits,
                                                              learned=learned)
                                    * jnp.asarray(cotangent, jnp.float32))
  learned = jax.grad(loss)(jnp.float32(step), True)
  flat = lambda s: lsq_surrogate(acts.reshape(1, -1), cotangent.reshape(1, -1), s,
                                 np.asarray([step]), bits)
  want = central_difference(flat, np.asarray([step]))[0] / np.sqrt(acts.size * (2**(bits - 1) - 1))
  assert float(learned) == pytest.approx(want, rel=1e-4, abs=1e-6) and abs(want) > 1e-2
  moving = jax.grad(loss)(jnp.float32(step), False)
  assert float(moving) == 0.0
  # Not calibrated yet (scale 0): pass-through.
  np.testing.assert_array_equal(quant.quantize_activation(x, 0.0, 8), x)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_activation_quantizer_keeps_half_precision_inputs_half(dtype):
  """A bfloat16 run (train.dtype=bfloat16) feeds half-precision activations: both branches
  (calibrated and not) return x's dtype, the grid values of the float32 reference."""
  x = jnp.linspace(-2.0, 2.0, 17).astype(dtype)
  scale = quant.absmax_scale(x.astype(jnp.float32), 8)
  out = quant.quantize_activation(x, scale, 8)
  assert out.dtype == dtype and quant.quantize_activation(x, 0.0, 8).dtype == dtype
  expected = ref_symmetric(np.asarray(x, np.float64)[None], np.asarray([scale], np.float64), 8)[0]
  np.testing.assert_allclose(np.asarray(out, np.float64), expected, rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------- mixture and Gumbel-softmax


@given(grouped_weights(), st.data())
@SETTINGS
def test_one_hot_mixture_equals_the_plain_quantizers(w_and_groups, data):
  w, groups = w_and_groups
  wj = jnp.asarray(w)
  choices = (0, 2, 4, 8)
  scales = jnp.stack([quant.init_symmetric_scale(wj, groups, max(b, 2), "lsq") for b in choices])
  picks = np.asarray(data.draw(st.lists(st.integers(0, 3), min_size=groups, max_size=groups)))
  probs = jax.nn.one_hot(picks, len(choices))

  def plain(v, k):
    return quant.prune(v) if choices[k] == 0 else quant.quantize_symmetric(v, scales[k],
                                                                           choices[k])

  mixed = np.asarray(quant.mix(wj, probs, plain))
  per_group = w.shape[-1] // groups
  for g in range(groups):
    cols = slice(g * per_group, (g + 1) * per_group)
    np.testing.assert_array_equal(mixed[..., cols], np.asarray(plain(wj, picks[g]))[..., cols])
  pruned = np.repeat(picks == 0, per_group)
  assert not np.any(mixed[..., pruned])


def test_mixture_gradient_to_probs_is_the_quantized_weight():
  w = jnp.array([[0.3, -0.7, 1.1, 0.05]])
  scales = jnp.array([[0.2, 0.2], [0.05, 0.05]])
  probs = jnp.array([[0.3, 0.7], [0.5, 0.5]])
  quantize = lambda v, k: quant.quantize_symmetric(v, scales[k], (2, 4)[k])
  grad = jax.grad(lambda p: jnp.sum(quant.mix(w, p, quantize)))(probs)
  want = [[float(jnp.sum(quantize(w, k)[:, 2 * g:2 * g + 2])) for k in range(2)]
          for g in range(2)]
  np.testing.assert_allclose(grad, want, rtol=1e-6)


def ref_softmax(z: np.ndarray) -> np.ndarray:
  """softmax over the last axis in float64."""
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("tau", [0.5, 1.0, 3.0])
def test_hard_gumbel_frequencies_match_softmax_at_any_temperature(tau: float):
  """argmax((l + G) / tau) = argmax(l + G) is distributed as softmax(l) for every tau > 0 (the
  Gumbel-max trick); scaling the logits but not the noise (or the reverse) would not be."""
  logits = jnp.array([[1.0, 0.0, -1.0, 0.5], [-2.0, 2.0, 0.0, 0.0]])
  n = 20000
  keys = jax.random.split(jax.random.key(0), n)
  samples = jax.vmap(lambda k: quant.gumbel_softmax(logits, k, tau=tau, hard=True))(keys)
  samples = np.asarray(samples)
  assert set(np.unique(samples)) <= {0.0, 1.0} and np.all(samples.sum(-1) == 1)
  freq = samples.mean(0)
  p = ref_softmax(logits)
  sigma = np.sqrt(p * (1 - p) / n)
  assert np.all(np.abs(freq - p) < 5 * sigma + 1e-9), (freq, p)


@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_gumbel_soft_sample_and_gradients_match_float64_from_the_same_noise(tau: float):
  """The soft sample is softmax((l + G) / tau) in float64 NumPy, with G the key's Gumbel noise;
  its gradient is the softmax Jacobian / tau (by hand), and the hard sample is the one-hot
  argmax with that same gradient (straight-through)."""
  logits = jnp.array([[0.2, -0.1, 0.4], [1.5, -0.7, 0.0]])
  weights = np.array([1.0, -2.0, 3.0])
  for seed in range(4):
    key = jax.random.key(seed)
    noise = np.asarray(jax.random.gumbel(key, logits.shape, logits.dtype), np.float64)
    p = ref_softmax((np.asarray(logits, np.float64) + noise) / tau)
    soft = np.asarray(quant.gumbel_softmax(logits, key, tau))
    np.testing.assert_allclose(soft, p, rtol=1e-5, atol=1e-7)
    hard = np.asarray(quant.gumbel_softmax(logits, key, tau, True))
    np.testing.assert_array_equal(hard, np.eye(3)[np.argmax(p, -1)])
    # d/dl_j sum_k w_k p_k = p_j (w_j - sum_k w_k p_k) / tau
    want = p * (weights - (p * weights).sum(-1, keepdims=True)) / tau
    for hard_flag in (False, True):
      got = jax.grad(lambda l: jnp.sum(quant.gumbel_softmax(l, key, tau, hard_flag)
                                       * jnp.asarray(weights, jnp.float32)))(logits)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(quant.gumbel_softmax(logits, None, tau),
                             ref_softmax(np.asarray(logits) / tau), rtol=1e-6)


def test_gumbel_soft_sample_mean_matches_numpy_monte_carlo_at_tau_one_half():
  """E[softmax((l + G) / tau)] at tau = 0.5 from JAX's sampler against a Monte-Carlo estimate
  from NumPy's Gumbel noise, within 5 standard errors; the test checks that it can tell: the
  means with tau ignored or applied as l * tau are many standard errors away."""
  logits = np.array([1.0, 0.0, -1.0, 0.5])
  tau, n = 0.5, 50000
  keys = jax.random.split(jax.random.key(1), n)
  ours = np.asarray(jax.vmap(lambda k: quant.gumbel_softmax(jnp.asarray(logits, jnp.float32),
                                                            k, tau))(keys), np.float64)
  noise = np.random.default_rng(0).gumbel(size=(n, logits.size))
  reference = ref_softmax((logits + noise) / tau)
  se = np.sqrt(ours.var(0) / n + reference.var(0) / n)
  assert np.all(np.abs(ours.mean(0) - reference.mean(0)) < 5 * se), (ours.mean(0),
                                                                     reference.mean(0), se)
  for wrong in (ref_softmax(logits + noise), ref_softmax(logits * tau + noise)):
    assert np.max(np.abs(wrong.mean(0) - reference.mean(0)) / se) > 10


def test_expected_bits_is_exact_for_one_hot_and_linear_in_probs():
  choice_bits = (0, 20 + 32, 40 + 32, 80 + 32)  # a group's storage at 0, 2, 4, 8 bits, by hand
  probs = jax.nn.one_hot(jnp.array([0, 3, 2]), 4)
  assert float(quant.expected_bits(probs, choice_bits)) == (0 + 80 + 32) + (40 + 32)
  uniform = jnp.full((3, 4), 0.25)
  want = 3 * 0.25 * ((0) + (20 + 32) + (40 + 32) + (80 + 32))
  assert float(quant.expected_bits(uniform, choice_bits)) == pytest.approx(want)
  grad = jax.grad(lambda p: quant.expected_bits(p, choice_bits))(uniform)
  np.testing.assert_allclose(grad, np.tile(choice_bits, (3, 1)))


def test_storage_bits_count_packed_words_and_scales_by_hand():
  """A [384, 1536] kernel in 12 sub-groups of 128 columns: b-bit codes pack floor(32 / b) to a
  32-bit word along K = 384, so 3 bits take ceil(384 / 10) = 39 words per column, not 36."""
  matrix = quant.MatrixSpec(path="k", shape=(384, 1536), groups=12, quantizer="symmetric",
                            bit_choices=(0, 1, 2, 3, 4, 8))
  by_hand = {0: 0, 1: 12 * 32 * 128 + 32, 2: 24 * 32 * 128 + 32, 3: 39 * 32 * 128 + 32,
             4: 48 * 32 * 128 + 32, 8: 96 * 32 * 128 + 32}
  np.testing.assert_array_equal(matrix.choice_bits,  # [G, K]: every sub-group alike here
                                np.tile([by_hand[b] for b in (0, 1, 2, 3, 4, 8)], (12, 1)))
  for b in (1, 2, 4, 8):  # exactly b bits per weight when the word count divides K
    np.testing.assert_array_equal(matrix.code_bits(b), np.full(12, b * 384 * 128))
  tiny = quant.MatrixSpec(path="k", shape=(32, 8), groups=2, quantizer="index",
                          bit_choices=(3,))
  # ceil(32 / 10) = 4 words per column, 4 columns; (lo, hi) floats.
  np.testing.assert_array_equal(tiny.storage_bits(3), [4 * 32 * 4 + 2 * 32] * 2)
  policy = quant.Policy(bits={"k": np.array([3, 0, 1, 8, 2, 4, 3, 3, 0, 0, 1, 8], np.int32)},
                        matrices=(matrix,)).validate()
  bits = [3, 0, 1, 8, 2, 4, 3, 3, 0, 0, 1, 8]
  assert policy.matrix_bits("k") == sum(by_hand[b] for b in bits)


# ---------------------------------------------------------------- policy and size accounting

TINY = models.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64, max_position_embeddings=16,
                         type_vocab_size=2)


def abstract_params(config: models.BertConfig, num_labels: int | None = 2):
  model = models.build_model(config, num_labels)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))[
      "params"]


def test_the_size_accounting_of_a_model_that_is_not_a_bert():
  """The core takes any model's layout: two Dense layers, the first's kernel `[10, 6]` quantized
  in 3 sub-groups at (4, 0, 2) bits, the second's `[6, 3]` counted at 32 bits, the biases and an
  8-bit "table" outside the counted matrices. Counted by hand: 4-bit codes 8 to a word, so the
  10 rows take 2 words per column; 2-bit codes 16 to a word, 1 word."""
  params = {"first": {"kernel": np.zeros((10, 6)), "bias": np.zeros(6)},
            "second": {"kernel": np.zeros((6, 3)), "bias": np.zeros(3)},
            "lookup": {"table": np.zeros((5, 4))}}
  layout = quant.ModelLayout(name="two Dense", matrices=r"(first|second)/kernel$",
                             embedding_tables=r"lookup/table$")
  spec = quant.QuantSpec(rules=(quant.Rule(pattern="first/kernel$", groups=3,
                                           bit_choices=(0, 2, 4)),), layout=layout)
  policy = quant.Policy(bits={"first/kernel": np.array([4, 0, 2], np.int32)},
                        matrices=tuple(spec.plan(params).values()), embedding_bits=8).validate()
  report = quant.size_report(params, policy, layout=layout)
  first = 2 * (2 * 32) + 32 + 0 + 2 * (1 * 32) + 32  # per group: 2 columns of words + a scale
  second = 6 * 3 * 32
  assert report["size_mb"] * quant.BITS_PER_MB == first + second
  other = (6 + 3) * 32 + 5 * 4 * 8 + 5 * 32  # biases; the table at 8 bits with a scale per row
  assert report["size_mb_other"] * quant.BITS_PER_MB == other
  assert report["compression"] == pytest.approx((60 + 18) * 32 / (first + second))
  with pytest.raises(ValueError, match="no weight matrices of the 'two Dense' layout"):
    quant.size_report({"other": {"kernel": np.zeros((2, 2))}}, layout=layout)


def test_bert_base_fp32_encoder_matrices_are_324_mb():
  base = models.BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                           num_attention_heads=12, intermediate_size=3072)
  report = quant.size_report(abstract_params(base), layout=models.BERT_LAYOUT)
  assert report["size_mb"] == 324.0  # 12 * (4 * 768^2 + 2 * 768 * 3072) * 4 bytes / 2^20
  assert report["compression"] == 1.0 and report["avg_bits"] == 32.0


def test_size_accounting_equals_hand_count_on_a_tiny_model():
  params = abstract_params(TINY)
  spec = models.bert_encoder_spec(groups="head", num_heads=4)
  plan = spec.plan(params)
  assert len(plan) == 12
  policy = quant.uniform_policy(plan, 4)
  # 2 layers x (4 * 32*32 + 2 * 32*64) = 16384 weights at 4 bits, + 12 matrices x 4 groups x 32.
  hand_bits = 16384 * 4 + 12 * 4 * 32
  report = quant.size_report(params, policy, layout=models.BERT_LAYOUT)
  assert report["size_mb"] * 8 * 2**20 == hand_bits
  assert report["avg_bits"] == 4.0
  assert report["compression"] == pytest.approx(16384 * 32 / hand_bits)

  # Prune groups and mix bits in one matrix: per group 32*8 (Q: 32 in x 8 out) weights.
  query = "bert/encoder/layer/0/attention/self/query/kernel"
  bits = {**policy.bits, query: np.array([0, 2, 8, 0], np.int32)}
  mixed = quant.Policy(bits=bits, matrices=policy.matrices).validate()
  mixed_bits = hand_bits - 4 * 256 * 4 - 4 * 32 + (2 * 256 + 8 * 256 + 2 * 32)
  assert quant.size_report(params, mixed,
                           layout=models.BERT_LAYOUT)["size_mb"] * 8 * 2**20 == mixed_bits

  # Other parameters at 32 bits; embeddings at 8 bits plus one float per row.
  flat = quant.flatten_params(params)
  other = sum(int(np.prod(v.shape)) for k, v in flat.items() if k not in plan)
  assert quant.size_report(params, policy,
                           layout=models.BERT_LAYOUT)["size_mb_other"] * 8 * 2**20 == other * 32
  emb8 = quant.uniform_policy(plan, 4, embedding_bits=8)
  tables = [(100, 32), (16, 32), (2, 32)]
  saved = sum(r * c * (32 - 8) - r * 32 for r, c in tables)
  emb8_other = quant.size_report(params, emb8, layout=models.BERT_LAYOUT)["size_mb_other"]
  assert emb8_other * 8 * 2**20 == other * 32 - saved


def test_uneven_groups_size_accounting_equals_hand_count():
  """An FFN of 80 (12 groups: 11 of 7 columns and 3) and FFN outputs of 32 (5 groups: 4 of 7
  and 4): each sub-group stores its own columns' packed words plus one scale."""
  config = models.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=4, intermediate_size=80,
                             max_position_embeddings=16, type_vocab_size=2)
  params = abstract_params(config)
  spec = models.bert_encoder_spec(groups={"qkv": 4, "attention_output": 3, "ffn_in": 12,
                                         "ffn_out": 5}, bit_choices=(0, 1, 2, 3, 4, 8))
  plan = spec.plan(params)
  ffn_in = "bert/encoder/layer/0/intermediate/dense/kernel"  # [32, 80]
  ffn_out = "bert/encoder/layer/1/output/dense/kernel"  # [80, 32]
  attention_output = "bert/encoder/layer/1/attention/output/dense/kernel"  # [32, 32]: 11, 11, 10
  assert plan[ffn_in].group_widths == (7,) * 11 + (3,)
  assert plan[ffn_out].group_widths == (7, 7, 7, 7, 4)
  assert plan[attention_output].group_widths == (11, 11, 10)
  # 32-bit words per column: K = 32 rows at 1, 2, 3, 4, 8 bits take 1, 2, 4, 4, 8 words; K = 80
  # rows take 3, 5, 8, 10, 20 (32, 16, 10, 8 and 4 codes to a word).
  words_32 = {0: 0, 1: 1, 2: 2, 3: 4, 4: 4, 8: 8}
  choices = (0, 1, 2, 3, 4, 8)
  group = lambda columns, words: 0 if words == 0 else columns * words * 32 + 32
  np.testing.assert_array_equal(plan[ffn_in].choice_bits,
                                [[group(7, words_32[b]) for b in choices]] * 11
                                + [[group(3, words_32[b]) for b in choices]])

  bits = {p: np.zeros((m.groups,), np.int32) for p, m in plan.items()}
  bits[ffn_in] = np.array([8] + [0] * 10 + [3], np.int32)
  bits[ffn_out] = np.array([0, 2, 0, 0, 1], np.int32)
  bits[attention_output] = np.array([0, 0, 4], np.int32)
  policy = quant.Policy(bits=bits, matrices=tuple(plan.values())).validate()
  codes = 7 * 8 * 32 + 3 * 4 * 32 + 7 * 5 * 32 + 4 * 3 * 32 + 10 * 4 * 32
  report = quant.size_report(params, policy, layout=models.BERT_LAYOUT)
  assert report["size_mb"] * 8 * 2**20 == codes + 5 * 32
  weights = 2 * (4 * 32 * 32 + 2 * 32 * 80)
  assert report["avg_bits"] * weights == codes
  # Uniform 2 bits: 2 bits per weight (16 codes to a word divide K = 32 and 80), and one scale
  # per group: 4 * 3 (Q, K, V) + 3 + 12 + 5 = 32 groups per layer.
  uniform = quant.size_report(params, quant.uniform_policy(plan, 2), layout=models.BERT_LAYOUT)
  assert uniform["size_mb"] * 8 * 2**20 == 2 * weights + 2 * 32 * 32


def test_policy_json_round_trip_and_validation(tmp_path):
  params = abstract_params(TINY)
  plan = models.bert_encoder_spec(groups=2).plan(params)
  logits = {p: jax.random.normal(jax.random.key(i), (m.groups, 4)) for i, (p, m) in
            enumerate(plan.items())}
  policy = quant.policy_from_logits(logits, plan, activation_bits=8)
  for path, m in plan.items():
    np.testing.assert_array_equal(policy.bits[path],
                                  np.asarray((0, 2, 4, 8))[np.argmax(logits[path], -1)])
  loaded = quant.Policy.load(policy.save(tmp_path / "policy.json"), plan)
  assert loaded.activation_bits == 8 and loaded.matrices == policy.matrices
  for path in plan:
    np.testing.assert_array_equal(loaded.bits[path], policy.bits[path])
  assert jax.tree.structure(loaded) == jax.tree.structure(policy)

  other_plan = models.bert_encoder_spec(groups=2).plan(
      abstract_params(models.BertConfig(**{**TINY.__dict__, "hidden_size": 16})))
  with pytest.raises(ValueError, match="another model"):
    quant.Policy.load(tmp_path / "policy.json", other_plan)
  deeper = models.bert_encoder_spec(groups=2).plan(
      abstract_params(models.BertConfig(**{**TINY.__dict__, "num_hidden_layers": 3})))
  with pytest.raises(ValueError, match="another model"):
    loaded.check_matches(deeper)

  bad = json.loads((tmp_path / "policy.json").read_text())
  first = sorted(bad["matrices"])[0]
  bad["matrices"][first]["bits"][0] = 3
  (tmp_path / "bad.json").write_text(json.dumps(bad))
  with pytest.raises(ValueError, match=r"bit-width\(s\) \[3\] are not supported"):
    quant.Policy.load(tmp_path / "bad.json")
  with pytest.raises(ValueError, match="not supported"):
    quant.uniform_policy(plan, 3)
  (tmp_path / "junk.json").write_text("{}")
  with pytest.raises(ValueError, match="not an mpqbert policy"):
    quant.Policy.load(tmp_path / "junk.json")
  with pytest.raises(FileNotFoundError):
    quant.Policy.load(tmp_path / "missing.json")


def test_spec_errors_name_the_problem():
  with pytest.raises(ValueError, match="unknown quantizer"):
    quant.Rule(pattern="x", quantizer="ternary")
  with pytest.raises(ValueError, match="bit_choices"):
    quant.Rule(pattern="x", quantizer="sign", bit_choices=(0, 1, 4))
  with pytest.raises(ValueError, match="bit_choices"):
    quant.Rule(pattern="x", bit_choices=(0, 1, 9))
  with pytest.raises(ValueError, match="num_heads"):
    models.bert_encoder_spec(groups="head")
  # 12 groups of 32 columns: 11 of ceil(32 / 12) = 3 take 33, the last would be empty.
  with pytest.raises(ValueError, match=r"output/dense/kernel: cannot split 32 columns into 12 "
                                       r"sub-groups.*last one empty\. Use 11 or 16 groups"):
    models.bert_encoder_spec(groups=12).plan(abstract_params(TINY))
  with pytest.raises(ValueError, match="no kernel of the model matches"):
    quant.QuantSpec(rules=(quant.Rule(pattern="decoder"),),
                    layout=models.BERT_LAYOUT).plan(abstract_params(TINY))
  with pytest.raises(ValueError, match="activation_bits=9"):
    quant.QuantSpec(rules=(), activation_bits=9, layout=models.BERT_LAYOUT)


def test_a_step_size_trained_below_zero_still_quantizes_and_its_gradient_can_lift_it():
  w = jnp.array([[0.3], [-0.7], [1.2], [-0.05]], jnp.float32)  # one sub-group of 4 weights
  negative = jnp.array([-0.05], jnp.float32)  # an LSQ update overshot 0
  out = quant.quantize_symmetric(w, negative, 4, lsq_grad=False)
  # At the floor s = 1e-12 every weight clips to the grid's end: codes 7, -8, 7, -8 (by hand).
  np.testing.assert_allclose(np.asarray(out)[:, 0], np.array([7, -8, 7, -8]) * 1e-12, rtol=1e-5)
  # d sum(Q(w)) / ds = sum of the clipped codes = -2: gradient descent on this loss raises s.
  grad = jax.grad(lambda s: jnp.sum(quant.quantize_symmetric(w, s, 4, lsq_grad=False)))(negative)
  np.testing.assert_allclose(np.asarray(grad), [-2.0])
  # An activation scale trained below 0 still quantizes; only the initial 0 passes x through.
  x = jnp.array([0.3, -1.0], jnp.float32)
  assert float(jnp.max(jnp.abs(quant.quantize_activation(x, jnp.float32(-0.5), 8)))) < 1e-9
  np.testing.assert_array_equal(np.asarray(quant.quantize_activation(x, jnp.float32(0.0), 8)),
                                np.asarray(x))


@pytest.mark.parametrize("quantizer,bits,learn_range", [
    ("symmetric", 1, False), ("symmetric", 3, False), ("symmetric", 8, False),
    ("index", 2, False), ("index", 4, True), ("sign", 1, False), ("xnor", 1, False)])
def test_training_dequantizes_the_grid_the_export_packs(quantizer: str, bits: int,
                                                        learn_range: bool):
  """The weight training uses (`quantize_choice`) is bit for bit its `QArray`
  (`weight_grid`) dequantized, whose codes are NumPy's float64 codes of the format; so what is
  packed (`kernels.pack` of those codes) is what was trained. A negative learned step size is
  floored as in training."""
  rng = np.random.default_rng(bits)
  k, n, groups = 40, 12, 3
  w = rng.standard_normal((k, n)).astype(np.float32)
  matrix = quant.MatrixSpec(path="m", shape=(k, n), groups=groups, quantizer=quantizer,
                            bit_choices=(0, bits), learn_range=learn_range)
  step = np.array([0.3, -0.2, 0.05], np.float32)  # -0.2: a step size trained below 0
  lo = np.array([-1.0, -0.5, -2.0], np.float32)
  hi = np.array([1.5, 0.4, 2.0], np.float32)
  qparams = {"scale": jnp.asarray(np.stack([step, step])), "lo": jnp.asarray(np.stack([lo, lo])),
             "hi": jnp.asarray(np.stack([hi, hi]))}
  trained = quant.quantize_choice(jnp.asarray(w), matrix, qparams, 1)
  qarray = quant.weight_grid(jnp.asarray(w), matrix, qparams, 1)
  np.testing.assert_array_equal(np.asarray(trained), np.asarray(qarray.dequantize()))

  w64, width = w.astype(np.float64), n // groups
  rep = lambda v: np.repeat(np.asarray(v, np.float64), width)  # per group -> per column
  if quantizer in ("sign", "xnor") or bits == 1:
    want = np.where(w64 >= 0, 1, -1)
  elif quantizer == "symmetric":
    half = 2.0**(bits - 1)
    want = np.round(np.clip(w64 / rep(np.maximum(step, 1e-12)), -half, half - 1))
  else:
    if not learn_range:
      wg = w64.reshape(k, groups, width)
      lo, hi = wg.min(axis=(0, 2)), wg.max(axis=(0, 2))
    span = (rep(hi) - rep(lo)) / (2**bits - 1)
    want = np.round((np.clip(w64, rep(lo), rep(hi)) - rep(lo)) / span)
  np.testing.assert_array_equal(np.asarray(qarray.codes), want)
  words = kernels.pack(qarray.int_codes(), bits, signed=qarray.signed)
  np.testing.assert_array_equal(
      np.asarray(kernels.unpack(words, bits, k=k, signed=qarray.signed)), want)
