"""From search results to a `Policy` inside the size band.

The argmax of the architecture logits need not land in the band (the size loss acts on the
expected size, not on the argmax). `fit_to_band` then moves single sub-groups one bit choice at
a time, always the move that costs least per MB, until the size is in the band. The Hessian
baseline uses the same function with its own costs, starting from the largest bits.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from mpqbert.quant import FULL_PRECISION, Plan, Policy
from mpqbert.search.size import BITS_PER_MB, SizeBand


def _group_bits(matrix) -> np.ndarray:
  """Storage bits of one sub-group for each bit choice `[K]`."""
  choices = np.asarray(matrix.bit_choices, np.int64)
  return choices * matrix.group_size + np.where(choices > 0, 32 * matrix.scale_floats, 0)


def fit_to_band(choice: Mapping[str, np.ndarray], costs: Mapping[str, np.ndarray], plan: Plan,
                band: SizeBand, fixed_bits: int = 0) -> dict[str, np.ndarray]:
  """Greedy repair of per-sub-group choice indices `[G]` until `size_mb` is inside `band`.

  Above the band it moves one sub-group to its next smaller bit choice, below it to the next
  larger one, each time the move with the least cost change per bit of size among moves that do
  not jump over the band. `costs[path]` is `[G, K]` (lower is better). Returns new indices.
  Raises if a single move always jumps over the band (tolerance too small for the sub-groups).
  """
  paths = list(plan)
  order = {p: np.argsort(_group_bits(plan[p]), kind="stable") for p in paths}  # by size
  rank = {p: np.argsort(order[p]) for p in paths}  # choice index -> position in size order
  pos = {p: rank[p][np.asarray(choice[p], np.int64)] for p in paths}
  sizes = {p: _group_bits(plan[p])[order[p]] for p in paths}  # [K] in size order
  cost = {p: np.asarray(costs[p], np.float64)[:, order[p]] for p in paths}  # [G, K] size order
  lower, upper = band.lower * BITS_PER_MB, band.upper * BITS_PER_MB

  def total() -> float:
    return fixed_bits + sum(int(sizes[p][pos[p]].sum()) for p in paths)

  current = total()
  while not lower <= current <= upper:
    direction = -1 if current > upper else 1
    best = None
    for p in paths:
      nxt = pos[p] + direction
      ok = (nxt >= 0) & (nxt < len(sizes[p]))
      if not ok.any():
        continue
      groups = np.nonzero(ok)[0]
      delta_size = sizes[p][nxt[groups]] - sizes[p][pos[p][groups]]
      delta_cost = cost[p][groups, nxt[groups]] - cost[p][groups, pos[p][groups]]
      new_total = current + delta_size
      keeps = (new_total >= lower) if direction < 0 else (new_total <= upper)
      if not keeps.any():
        continue
      score = np.where(keeps, delta_cost / np.abs(delta_size), np.inf)
      g = int(np.argmin(score))
      if best is None or score[g] < best[0]:
        best = (score[g], p, groups[g], int(delta_size[g]))
    if best is None:
      raise ValueError(
          f"cannot reach the size band {band.describe()} from {current / BITS_PER_MB:.4f} MB: "
          "every remaining move of one sub-group jumps over the band. Raise search.tolerance or "
          "use more sub-groups (quant.groups).")
    _, p, g, delta = best
    pos[p][g] += direction
    current += delta
  return {p: order[p][pos[p]] for p in paths}


def derive_policy(arch: Mapping[str, Any], plan: Plan, band: SizeBand, *, fixed_bits: int = 0,
                  activation_bits: int = FULL_PRECISION,
                  embedding_bits: int = FULL_PRECISION) -> Policy:
  """Argmax bits per sub-group of the architecture logits, repaired into `band`.

  The repair cost of a choice is its negative log-probability under softmax(logits), so the
  groups whose search was least decided move first.
  """
  costs, argmax = {}, {}
  for path, matrix in plan.items():
    logits = np.asarray(arch[path], np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    costs[path] = np.log(np.sum(np.exp(shifted), -1, keepdims=True)) - shifted  # -log softmax
    argmax[path] = np.argmax(logits, axis=-1)
  choice = fit_to_band(argmax, costs, plan, band, fixed_bits)
  return policy_from_choices(choice, plan, activation_bits=activation_bits,
                             embedding_bits=embedding_bits)


def policy_from_choices(choice: Mapping[str, np.ndarray], plan: Plan, *,
                        activation_bits: int = FULL_PRECISION,
                        embedding_bits: int = FULL_PRECISION) -> Policy:
  """The `Policy` whose sub-group g of matrix p has bit choice `choice[p][g]` (an index)."""
  bits = {p: np.asarray(m.bit_choices, np.int32)[np.asarray(choice[p])] for p, m in plan.items()}
  return Policy(bits=bits, matrices=tuple(plan.values()), embedding_bits=embedding_bits,
                activation_bits=activation_bits).validate()
