"""The multiple-choice knapsack behind every derived policy: one choice per item, total size in a
window, the largest total score.

    maximize    sum_i score[i, c_i]
    subject to  lower <= sum_i size[i, c_i] <= upper,  and optional count limits
                (at most m of the items in a set take a given choice, e.g. "prune at most half
                of this matrix's sub-groups").

Solved exactly as a 0/1 integer program by HiGHS (`scipy.optimize.milp`): x[i, k] in {0, 1},
one per item. The linear relaxation of a multiple-choice knapsack has at most two fractional
items, so branch and bound closes quickly: about a second for 432 items x 6 choices and a few
for 4608 x 6 (36 matrices x 128 sub-groups). A score of -inf forbids a choice.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from scipy import optimize, sparse


@dataclasses.dataclass(frozen=True)
class CountLimit:
  """At most `max_count` of the items `items` may take choice `choice`."""

  items: np.ndarray
  choice: int
  max_count: int


def solve(sizes: np.ndarray, scores: np.ndarray, lower: float, upper: float, *,
          limits: Sequence[CountLimit] = (), time_limit_s: float = 120.0) -> np.ndarray:
  """The choice index per item `[N]` of the best-scoring selection whose size is in the window.

  `sizes` and `scores` are `[N, K]`; sizes are exact integers (bits), so the window is exact.
  Raises a ValueError naming the reachable sizes when no selection fits the window, and when
  HiGHS stops at its time limit without proving its selection best.
  """
  sizes = np.asarray(sizes, np.float64)
  scores = np.asarray(scores, np.float64)
  if sizes.shape != scores.shape or sizes.ndim != 2:
    raise ValueError(f"sizes {sizes.shape} and scores {scores.shape} must both be [items, "
                     "choices].")
  if np.isnan(scores).any() or np.isposinf(scores).any():
    raise ValueError("scores must be finite or -inf (a forbidden choice); got NaN or +inf.")
  items, choices = sizes.shape
  allowed = np.isfinite(scores)
  if not allowed.any(axis=1).all():
    raise ValueError(f"item {int(np.argmin(allowed.any(axis=1)))} has no allowed choice.")
  low = float(np.where(allowed, sizes, np.inf).min(1).sum())
  high = float(np.where(allowed, sizes, -np.inf).max(1).sum())
  if high < lower or low > upper:
    raise ValueError(f"no selection has a size in [{lower:.0f}, {upper:.0f}]: the allowed "
                     f"choices give {low:.0f} to {high:.0f}.")
  n = items * choices
  one_each = sparse.csr_array((np.ones(n), (np.repeat(np.arange(items), choices), np.arange(n))),
                              shape=(items, n))
  base = [optimize.LinearConstraint(one_each, 1, 1)]
  for limit in limits:
    row = np.zeros((items, choices))
    row[np.asarray(limit.items), limit.choice] = 1.0
    base.append(optimize.LinearConstraint(row.reshape(1, n), 0, limit.max_count))
  # Forbidden choices are fixed at 0; their score term is then irrelevant (0 avoids inf * 0).
  bounds = optimize.Bounds(0, np.where(allowed, 1.0, 0.0).reshape(n))
  objective = -np.where(allowed, scores, 0.0).reshape(n)

  def best(lowest: float):
    size = optimize.LinearConstraint(sizes.reshape(1, n), lowest, upper)
    return optimize.milp(objective, constraints=base + [size], integrality=np.ones(n),
                         bounds=bounds,
                         options={"mip_rel_gap": 1e-9, "time_limit": time_limit_s})

  # Only the upper bound first: an easy knapsack. Its answer, when it lands in the window, is
  # the window's answer too (the window only removes selections); otherwise the window's lower
  # edge binds, a subset-sum-like problem that can be slow to prove when the window is narrow.
  result = best(-np.inf)
  if result.status == 0 and result.x is not None and sizes.reshape(n) @ np.round(result.x) < lower:
    result = best(lower)
  if result.status == 2:
    raise ValueError(f"no selection has a size in [{lower:.0f}, {upper:.0f}] under the count "
                     "limits; loosen the limits or widen the window.")
  if result.status != 0 or result.x is None:
    raise ValueError(f"the knapsack solver stopped without a proven best selection "
                     f"({result.message}); widen the window or use fewer sub-groups.")
  x = np.round(result.x).reshape(items, choices)
  return np.argmax(x, axis=1)
