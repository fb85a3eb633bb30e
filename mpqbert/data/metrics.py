"""GLUE metrics in plain NumPy (float64), matching scikit-learn and SciPy.

Kept dependency-free so evaluation needs neither sklearn nor scipy at runtime;
tests check agreement with both.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from mpqbert.data.glue import GlueTask, get_task


def _pair(
    a: np.ndarray, b: np.ndarray, names: tuple[str, str], min_len: int = 1
) -> tuple[np.ndarray, np.ndarray]:
  """Validates two 1-D arrays of equal length >= min_len."""
  a, b = np.asarray(a), np.asarray(b)
  if a.ndim != 1 or b.ndim != 1 or len(a) != len(b):
    raise ValueError(
        f"{names[0]} and {names[1]} must be 1-D arrays of equal length, got "
        f"shapes {a.shape} and {b.shape}."
    )
  if len(a) < min_len:
    raise ValueError(f"Need at least {min_len} element(s), got {len(a)}.")
  return a, b


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
  """Fraction of predictions equal to the labels."""
  preds, labels = _pair(preds, labels, ("preds", "labels"))
  return float(np.mean(preds == labels, dtype=np.float64))


def f1_binary(preds: np.ndarray, labels: np.ndarray) -> float:
  """F1 of the positive class 1; 0.0 when there are no positives at all."""
  preds, labels = _pair(preds, labels, ("preds", "labels"))
  pred_pos, true_pos = preds == 1, labels == 1
  tp = np.sum(pred_pos & true_pos, dtype=np.float64)
  fp = np.sum(pred_pos & ~true_pos, dtype=np.float64)
  fn = np.sum(~pred_pos & true_pos, dtype=np.float64)
  denom = 2.0 * tp + fp + fn
  return float(2.0 * tp / denom) if denom > 0 else 0.0


def matthews_corrcoef(preds: np.ndarray, labels: np.ndarray) -> float:
  """Matthews correlation (multiclass form); 0.0 when undefined, as sklearn."""
  preds, labels = _pair(preds, labels, ("preds", "labels"))
  classes, codes = np.unique(np.concatenate([labels, preds]), return_inverse=True)
  k, n = len(classes), len(labels)
  confusion = np.zeros((k, k), np.float64)
  np.add.at(confusion, (codes[:n], codes[n:]), 1.0)
  t_sum, p_sum = confusion.sum(axis=1), confusion.sum(axis=0)
  total = float(n)
  cov_tp = np.trace(confusion) * total - t_sum @ p_sum
  cov_pp = total**2 - p_sum @ p_sum
  cov_tt = total**2 - t_sum @ t_sum
  if cov_pp * cov_tt == 0:
    return 0.0
  return float(cov_tp / np.sqrt(cov_tt * cov_pp))


def pearson(x: np.ndarray, y: np.ndarray) -> float:
  """Pearson correlation; NaN if either input is constant (as SciPy)."""
  x, y = _pair(x, y, ("x", "y"), min_len=2)
  x, y = x.astype(np.float64), y.astype(np.float64)
  if np.all(x == x[0]) or np.all(y == y[0]):
    return float("nan")
  xm, ym = x - x.mean(), y - y.mean()
  # Scale by the max first to avoid overflow/underflow in the norms.
  xm /= np.max(np.abs(xm))
  ym /= np.max(np.abs(ym))
  r = np.dot(xm / np.linalg.norm(xm), ym / np.linalg.norm(ym))
  return float(np.clip(r, -1.0, 1.0))


def rank_average(x: np.ndarray) -> np.ndarray:
  """1-based ranks of a 1-D array, ties given their average rank."""
  x = np.asarray(x)
  order = np.argsort(x, kind="stable")
  sorted_x = x[order]
  new_group = np.concatenate([[True], sorted_x[1:] != sorted_x[:-1]])
  group_of_sorted = np.cumsum(new_group) - 1
  starts = np.flatnonzero(new_group)
  ends = np.concatenate([starts[1:], [len(x)]])  # Exclusive.
  group_rank = (starts + 1 + ends) / 2.0  # Mean of ranks starts+1 .. ends.
  ranks = np.empty(len(x), np.float64)
  ranks[order] = group_rank[group_of_sorted]
  return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
  """Spearman rank correlation (average ranks for ties, as SciPy)."""
  x, y = _pair(x, y, ("x", "y"), min_len=2)
  return pearson(rank_average(x), rank_average(y))


_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy,
    "f1": f1_binary,
    "mcc": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
}


def glue_metrics(
    task: GlueTask | str, predictions: np.ndarray, labels: np.ndarray
) -> dict[str, float]:
  """All of `task.metric_names` for the given predictions.

  Args:
    task: A `GlueTask` or task name.
    predictions: Class ids [N] (classification) or scores [N] (regression);
      take the argmax of logits first.
    labels: Gold class ids or scores [N].

  Returns:
    {metric_name: value} for every metric of the task.
  """
  task = get_task(task)
  predictions, labels = np.asarray(predictions), np.asarray(labels)
  if predictions.ndim == 2 and predictions.shape[1] == 1 and task.is_regression:
    predictions = predictions[:, 0]
  if predictions.ndim != 1:
    raise ValueError(
        f"predictions for {task.name!r} must be 1-D, got shape "
        f"{predictions.shape}. Fix: pass class ids (logits.argmax(-1)) for "
        "classification or scores [N] for regression."
    )
  return {m: _METRICS[m](predictions, labels) for m in task.metric_names}
