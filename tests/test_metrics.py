"""Tests for mpqbert.data.metrics against scikit-learn and SciPy."""

import math
import warnings

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from mpqbert.data import metrics

_SETTINGS = settings(max_examples=60, deadline=None)

# sklearn warns when only one class occurs; that case is tested on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:A single label was found")


def _sk_f1(preds, labels):
  return skm.f1_score(labels, preds, pos_label=1, zero_division=0.0)


def _scipy(fn, x, y):
  """SciPy correlation, NaN for constant input (silencing its warning)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return float(fn(x, y)[0])


def _same(a: float, b: float, tol: float = 1e-9) -> bool:
  if math.isnan(a) or math.isnan(b):
    return math.isnan(a) and math.isnan(b)
  return abs(a - b) <= tol


# --- Hand-computed cases. ---


def test_accuracy_hand():
  assert metrics.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5


def test_f1_hand():
  # tp=2, fp=1, fn=1 -> 2*2 / (4 + 1 + 1) = 2/3.
  assert metrics.f1_binary([1, 1, 1, 0, 0], [1, 1, 0, 1, 0]) == pytest.approx(2 / 3)


def test_f1_no_positives_is_zero():
  assert metrics.f1_binary([0, 0, 0], [0, 0, 0]) == 0.0


def test_mcc_hand():
  # tp=2, tn=1, fp=1, fn=1: (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6.
  assert metrics.matthews_corrcoef(
      [1, 1, 1, 0, 0], [1, 1, 0, 1, 0]
  ) == pytest.approx(1 / 6)


def test_mcc_perfect_inverse_and_undefined():
  assert metrics.matthews_corrcoef([0, 1, 1], [0, 1, 1]) == pytest.approx(1.0)
  assert metrics.matthews_corrcoef([1, 0, 0], [0, 1, 1]) == pytest.approx(-1.0)
  assert metrics.matthews_corrcoef([1, 1, 1], [0, 1, 0]) == 0.0


def test_pearson_hand():
  assert metrics.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
  assert metrics.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
  # x centred: -1,0,1; y centred: -1,-1,2 -> 3 / sqrt(2 * 6) = sqrt(3)/2.
  assert metrics.pearson([1, 2, 3], [0, 0, 3]) == pytest.approx(math.sqrt(3) / 2)


def test_pearson_constant_is_nan():
  assert math.isnan(metrics.pearson([1, 1, 1], [1, 2, 3]))


def test_spearman_hand_with_ties():
  # ranks x: 1, 2.5, 2.5, 4; y: 1, 2, 3, 4 -> pearson of ranks.
  expected = np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1]
  assert metrics.spearman([1, 5, 5, 9], [10, 20, 30, 40]) == pytest.approx(expected)


def test_rank_average():
  np.testing.assert_array_equal(
      metrics.rank_average([10, 30, 20, 30, 10]), [1.5, 4.5, 3.0, 4.5, 1.5]
  )


def test_shape_mismatch_raises():
  with pytest.raises(ValueError, match="equal length"):
    metrics.accuracy([1, 0], [1])
  with pytest.raises(ValueError, match="at least 2"):
    metrics.pearson([1.0], [2.0])


# --- Agreement with sklearn / scipy on random inputs. ---


def test_random_classification_agrees_with_sklearn():
  rng = np.random.default_rng(0)
  for _ in range(20):
    n = int(rng.integers(1, 200))
    preds = rng.integers(0, 2, n)
    labels = rng.integers(0, 2, n)
    assert metrics.accuracy(preds, labels) == pytest.approx(
        skm.accuracy_score(labels, preds)
    )
    assert metrics.f1_binary(preds, labels) == pytest.approx(_sk_f1(preds, labels))
    assert metrics.matthews_corrcoef(preds, labels) == pytest.approx(
        skm.matthews_corrcoef(labels, preds), abs=1e-12
    )


def test_random_regression_agrees_with_scipy():
  rng = np.random.default_rng(1)
  for _ in range(20):
    n = int(rng.integers(2, 200))
    x = rng.normal(size=n)
    y = 0.5 * x + rng.normal(size=n)
    assert metrics.pearson(x, y) == pytest.approx(_scipy(stats.pearsonr, x, y))
    assert metrics.spearman(x, y) == pytest.approx(_scipy(stats.spearmanr, x, y))


binary = st.lists(st.integers(0, 1), min_size=1, max_size=40)


@_SETTINGS
@given(st.data())
def test_classification_property(data):
  labels = data.draw(binary)
  preds = data.draw(st.lists(st.integers(0, 1), min_size=len(labels),
                             max_size=len(labels)))
  assert _same(metrics.accuracy(preds, labels), skm.accuracy_score(labels, preds))
  assert _same(metrics.f1_binary(preds, labels), _sk_f1(preds, labels))
  assert _same(
      metrics.matthews_corrcoef(preds, labels),
      skm.matthews_corrcoef(labels, preds),
      tol=1e-12,
  )


@_SETTINGS
@given(st.integers(1, 30), st.integers(0, 1), st.integers(0, 1))
def test_all_one_class(n, pred_class, label_class):
  preds, labels = [pred_class] * n, [label_class] * n
  assert _same(metrics.f1_binary(preds, labels), _sk_f1(preds, labels))
  assert _same(
      metrics.matthews_corrcoef(preds, labels), skm.matthews_corrcoef(labels, preds)
  )


# Few distinct values -> many ties (and sometimes constant vectors).
tied_floats = st.sampled_from([-2.0, 0.0, 0.5, 1.0, 3.25])
any_floats = st.floats(-1e3, 1e3, allow_nan=False)


@_SETTINGS
@given(st.data(), st.sampled_from([tied_floats, any_floats]))
def test_correlations_property(data, elements):
  x = data.draw(st.lists(elements, min_size=2, max_size=30))
  y = data.draw(st.lists(elements, min_size=len(x), max_size=len(x)))
  x, y = np.asarray(x), np.asarray(y)
  assert _same(metrics.pearson(x, y), _scipy(stats.pearsonr, x, y), tol=1e-7)
  assert _same(metrics.spearman(x, y), _scipy(stats.spearmanr, x, y), tol=1e-7)


@_SETTINGS
@given(st.lists(st.floats(-10, 10, allow_nan=False), min_size=1, max_size=30))
def test_rank_average_matches_scipy(x):
  np.testing.assert_allclose(metrics.rank_average(x), stats.rankdata(x))


@_SETTINGS
@given(st.integers(2, 30), st.floats(-5, 5, allow_nan=False))
def test_constant_vectors_are_nan(n, value):
  rng = np.random.default_rng(n)
  x, y = np.full(n, value), rng.normal(size=n)
  for fn in (metrics.pearson, metrics.spearman):
    assert math.isnan(fn(x, y)) and math.isnan(fn(y, x))


# --- glue_metrics. ---


def test_glue_metrics_per_task():
  preds = np.array([1, 0, 1, 1])
  labels = np.array([1, 1, 1, 0])
  assert set(metrics.glue_metrics("cola", preds, labels)) == {"mcc"}
  mrpc = metrics.glue_metrics("MRPC", preds, labels)
  assert mrpc == pytest.approx({"accuracy": 0.5, "f1": 2 / 3})
  assert metrics.glue_metrics("sst-2", preds, labels) == {"accuracy": 0.5}
  sts = metrics.glue_metrics("stsb", [0.1, 2.0, 4.5], [0.0, 2.5, 5.0])
  assert set(sts) == {"pearson", "spearman"}
  assert sts["spearman"] == pytest.approx(1.0)
  assert all(isinstance(v, float) for v in sts.values())


def test_glue_metrics_rejects_logits():
  with pytest.raises(ValueError, match="argmax"):
    metrics.glue_metrics("rte", np.zeros((4, 2)), np.zeros(4))
