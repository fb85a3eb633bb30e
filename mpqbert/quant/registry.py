"""The weight quantizers by name (`Rule.quantizer`): one `QuantizerKind` entry each.

A new quantizer is one entry here (and, for a new kind of integer grid, a function in `grid`):
the transform (`quantize_choice`, `weight_grid`, `init_qparams`), the rules' validation, the size
accounting and the packed export all read this table.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from mpqbert.quant import grid, quantizers

Array = jax.Array

QParams = Mapping[str, Array]  # One matrix's learned quantizer parameters (`init_qparams`).


@dataclasses.dataclass(frozen=True)
class QuantizerKind:
  """Everything the rest of the project needs of one weight quantizer (`Rule.quantizer`).

  `bits`: the widths it supports (0 = pruned, handled for every kind by `prune`);
  `scales_per_group`: float32 values stored per kept sub-group (the size accounting reads it);
  `grid(w, matrix, qparams, k)`: the `grid.QArray` at the k-th bit choice (the export packs it);
  `quantize(w, matrix, qparams, k)`: the training forward, that grid dequantized with the
  quantizer's straight-through gradients; `init(w, matrix, scale_init)`: its learned parameters
  `{name: [K, G]}` (one row per bit choice).
  """

  bits: tuple[int, ...]
  scales_per_group: int
  grid: Callable[[Array, Any, QParams, int], grid.QArray]
  quantize: Callable[[Array, Any, QParams, int], Array]
  init: Callable[[Array, Any, str], dict[str, Array]] = lambda w, matrix, scale_init: {}


def _symmetric_init(w: Array, matrix: Any, scale_init: str) -> dict[str, Array]:
  return {"scale": jnp.stack([jnp.ones((matrix.groups,), jnp.float32) if b == 0 else
                              quantizers.init_symmetric_scale(w, matrix.groups, b, scale_init)
                              for b in matrix.bit_choices])}


def _index_range(w: Array, matrix: Any, qparams: QParams, k: int) -> tuple[Array, Array]:
  """The k-th choice's learned (lo, hi), or the min-max range of `w` without `learn_range`."""
  if matrix.learn_range:
    return qparams["lo"][k], qparams["hi"][k]
  return quantizers.minmax_range(w, matrix.groups)


def _index_init(w: Array, matrix: Any, scale_init: str) -> dict[str, Array]:
  del scale_init
  if not matrix.learn_range:
    return {}
  lo, hi = quantizers.minmax_range(w, matrix.groups)
  k = len(matrix.bit_choices)
  return {"lo": jnp.tile(lo, (k, 1)), "hi": jnp.tile(hi, (k, 1))}


QUANTIZERS: dict[str, QuantizerKind] = {
    "symmetric": QuantizerKind(
        bits=(0, 1, 2, 3, 4, 5, 6, 7, 8), scales_per_group=1,  # the step size s
        grid=lambda w, m, qp, k: grid.symmetric(w, quantizers.positive_step(qp["scale"][k]),
                                                m.bit_choices[k]),
        quantize=lambda w, m, qp, k: quantizers.quantize_symmetric(w, qp["scale"][k],
                                                                   m.bit_choices[k]),
        init=_symmetric_init),
    "index": QuantizerKind(
        bits=(0, 1, 2, 3, 4, 5, 6, 7, 8), scales_per_group=2,  # (lo, hi)
        grid=lambda w, m, qp, k: grid.index(w, *_index_range(w, m, qp, k), m.bit_choices[k]),
        quantize=lambda w, m, qp, k: quantizers.quantize_index(w, *_index_range(w, m, qp, k),
                                                               m.bit_choices[k]),
        init=_index_init),
    "sign": QuantizerKind(
        bits=(0, 1), scales_per_group=0,
        grid=lambda w, m, qp, k: grid.signs(w, groups=m.groups),
        quantize=lambda w, m, qp, k: quantizers.binarize_sign(w)),
    "xnor": QuantizerKind(
        bits=(0, 1), scales_per_group=1,  # mean|w|
        grid=lambda w, m, qp, k: grid.signs(w, quantizers.xnor_scale(w, m.groups)),
        quantize=lambda w, m, qp, k: quantizers.binarize_xnor(w, m.groups)),
}
QUANTIZER_BITS = {name: kind.bits for name, kind in QUANTIZERS.items()}
SCALES_PER_GROUP = {name: kind.scales_per_group for name, kind in QUANTIZERS.items()}
