"""From per-sub-group scores to a `Policy` of exact size: the multiple-choice knapsack.

Every method derives its policy the same way: one bit choice per sub-group, `size_mb` (weights
plus scales, exactly as `quant.size_report` counts it) inside the window `[(1 - eps) V, V]`,
the largest sum of per-group scores. AutoMPQ's score is the searched log-probability of each
choice; a sensitivity baseline's is minus its estimated loss increase.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from mpqbert.quant import FULL_PRECISION, Plan, Policy
from mpqbert.search import knapsack
from mpqbert.quant import BITS_PER_MB
from mpqbert.search.size import SizeBand, choice_bits_per_group


def exact_choices(scores: Mapping[str, np.ndarray], plan: Plan, band: SizeBand, *,
                  fixed_bits: int = 0, max_pruned_fraction: float | None = None
                  ) -> dict[str, np.ndarray]:
  """Choice indices `[G]` per matrix maximizing the summed `scores[path]` `[G, K]` with the
  total size (plus `fixed_bits`) in `band`.

  `max_pruned_fraction`: at most this share of each matrix's sub-groups at 0 bits (0: none;
  anything below 1 also keeps every matrix alive). Raises naming the band when it is out of
  reach (a tolerance smaller than the smallest move, or limits that forbid it).
  """
  paths = list(plan)
  sizes = choice_bits_per_group(plan, paths)
  values = np.concatenate([np.asarray(scores[p], np.float64) for p in paths])
  limits, start = [], 0
  for p in paths:
    matrix = plan[p]
    if max_pruned_fraction is not None and 0 in matrix.bit_choices:
      limits.append(knapsack.CountLimit(items=np.arange(start, start + matrix.groups),
                                        choice=matrix.bit_choices.index(0),
                                        max_count=int(np.floor(max_pruned_fraction
                                                               * matrix.groups))))
    start += matrix.groups
  lower = band.lower * BITS_PER_MB - fixed_bits
  upper = band.upper * BITS_PER_MB - fixed_bits
  try:
    chosen = knapsack.solve(sizes, values, np.ceil(lower), np.floor(upper), limits=limits)
  except ValueError as e:
    raise ValueError(f"cannot derive a policy in the size band {band.describe()}: {e} Raise "
                     "search.tolerance, use more sub-groups (quant.groups) or other bit "
                     "choices.") from None
  out, start = {}, 0
  for p in paths:
    out[p] = chosen[start:start + plan[p].groups]
    start += plan[p].groups
  return out


def log_probabilities(arch: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """log softmax of each matrix's architecture logits `[G, K]`, in float64."""
  out = {}
  for path, logits in arch.items():
    shifted = np.asarray(logits, np.float64)
    shifted = shifted - shifted.max(-1, keepdims=True)
    out[path] = shifted - np.log(np.sum(np.exp(shifted), -1, keepdims=True))
  return out


def derive_policy(arch: Mapping[str, Any], plan: Plan, band: SizeBand, *, fixed_bits: int = 0,
                  max_pruned_fraction: float | None = None,
                  activation_bits: int = FULL_PRECISION,
                  embedding_bits: int = FULL_PRECISION) -> Policy:
  """The most probable policy under softmax(logits) whose size is in `band` (exact knapsack).

  When the argmax policy is in the band it is the answer; otherwise the groups whose search was
  least decided give way first, as the log-probabilities say.
  """
  choice = exact_choices(log_probabilities(arch), plan, band, fixed_bits=fixed_bits,
                         max_pruned_fraction=max_pruned_fraction)
  return policy_from_choices(choice, plan, activation_bits=activation_bits,
                             embedding_bits=embedding_bits)


def policy_from_choices(choice: Mapping[str, np.ndarray], plan: Plan, *,
                        activation_bits: int = FULL_PRECISION,
                        embedding_bits: int = FULL_PRECISION) -> Policy:
  """The `Policy` whose sub-group g of matrix p has bit choice `choice[p][g]` (an index)."""
  bits = {p: np.asarray(m.bit_choices, np.int32)[np.asarray(choice[p])] for p, m in plan.items()}
  return Policy(bits=bits, matrices=tuple(plan.values()), embedding_bits=embedding_bits,
                activation_bits=activation_bits).validate()
