"""A sensitivity prior for the architecture logits: start the search near a good policy.

With `cost[g, k]` the estimated loss increase of sub-group g at bit choice k (Fisher-weighted
quantization error, `hessian.quantization_errors`) and `bits[g, k]` its storage, the Lagrangian
of the size-constrained problem, `cost + mu * bits`, is minimized per group independently; the
multiplier mu is the smallest one whose per-group minimizers fit the target size. The logits are
minus that Lagrangian, scaled so that the median gap between a group's two best choices is
`strength` nats (and at least -4 strength): the prior says which way to go and how sure it
is, the search corrects it.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from mpqbert.quant import Plan
from mpqbert.quant import BITS_PER_MB
from mpqbert.search.size import SizeBand, choice_bits_per_group


def _multiplier(costs: np.ndarray, bits: np.ndarray, budget: float) -> float:
  """The smallest mu >= 0 with sum_g bits[g, argmin_k(costs + mu bits)] <= budget (bisection)."""
  size = lambda mu: bits[np.arange(len(bits)), np.argmin(costs + mu * bits, axis=1)].sum()
  if size(0.0) <= budget:
    return 0.0
  low, high = 0.0, 1.0
  while size(high) > budget:
    low, high = high, high * 4.0
    if high > 1e30:
      return high  # The budget is below the smallest policy; the largest mu comes closest.
  for _ in range(100):
    mid = 0.5 * (low + high)
    low, high = (mid, high) if size(mid) > budget else (low, mid)
  return high


def prior_logits(costs: Mapping[str, np.ndarray], plan: Plan, band: SizeBand, *,
                 fixed_bits: int = 0, strength: float = 2.0) -> dict[str, np.ndarray]:
  """Logits `[G, K]` per matrix from per-group costs `[G, K]` and the target size of `band`."""
  if strength <= 0:
    raise ValueError(f"search.prior_strength={strength} must be positive.")
  paths = list(plan)
  bits = choice_bits_per_group(plan, paths)
  cost = np.concatenate([np.asarray(costs[p], np.float64) for p in paths])
  bits = bits.astype(np.float64)
  mu = _multiplier(cost, bits, band.target_mb * BITS_PER_MB - fixed_bits)
  lagrangian = cost + mu * bits
  ordered = np.sort(lagrangian, axis=1)
  gap = float(np.median(ordered[:, 1] - ordered[:, 0])) if ordered.shape[1] > 1 else 1.0
  # Floored at -4 strength, so that no choice starts so improbable that it gets no gradient.
  logits = np.maximum(-strength * (lagrangian - ordered[:, :1]) / max(gap, 1e-30), -4 * strength)
  out, start = {}, 0
  for p in paths:
    out[p] = logits[start:start + plan[p].groups].astype(np.float32)
    start += plan[p].groups
  return out
