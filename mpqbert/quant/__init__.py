"""The quantizer transform: STEs, quantizers, sub-groups, Gumbel-softmax mixture, policies, sizes.

It knows no model: a `ModelLayout` (BERT's: `mpqbert.models.BERT_LAYOUT`) says which parameters
sizes count and which tables the embedding quantizer sees.

Pure JAX functions over arrays and pytrees; `transform` hooks them into a Flax model through its
single injection point (`QuantizableDense.quantize_operands`).
"""

from mpqbert.quant import grid
from mpqbert.quant.grid import QArray
from mpqbert.quant.mixture import expected_bits, gumbel_softmax, mix, one_hot_bits
from mpqbert.quant.policy import (BITS_PER_MB, Policy, policy_from_logits, size_report,
                                  uniform_policy)
from mpqbert.quant.quantizers import (absmax_scale,
                                      binarize_sign, binarize_xnor, group_view,
                                      init_symmetric_scale, minmax_range, prune,
                                      quantize_activation, quantize_index, quantize_symmetric,
                                      symmetric_levels, xnor_scale)
from mpqbert.quant.registry import (QUANTIZER_BITS, QUANTIZERS, SCALES_PER_GROUP,
                                    QuantizerKind)
from mpqbert.quant.layout import ModelLayout
from mpqbert.quant.spec import (FULL_PRECISION, Groups, MatrixSpec, Plan, QuantSpec, Rule,
                                flatten_params)
from mpqbert.quant.ste import round_ste, scale_grad, sign_ste
from mpqbert.quant.transform import (init_arch, init_qparams, matrix_key, quantize_choice,
                                     quantize_embedding, quantize_weight, sample_probs,
                                     transform, weight_grid)

__all__ = [
    "BITS_PER_MB", "FULL_PRECISION", "Groups", "MatrixSpec", "ModelLayout", "QArray", "Plan",
    "Policy", "QUANTIZERS", "QUANTIZER_BITS", "QuantSpec", "QuantizerKind", "Rule",
    "SCALES_PER_GROUP", "absmax_scale", "binarize_sign", "binarize_xnor", "expected_bits",
    "flatten_params", "group_view", "grid", "gumbel_softmax", "init_arch", "init_qparams", "init_symmetric_scale",
    "matrix_key", "minmax_range", "mix", "one_hot_bits", "policy_from_logits", "prune",
    "quantize_activation", "quantize_choice", "quantize_embedding", "quantize_index",
    "quantize_symmetric", "quantize_weight", "round_ste", "sample_probs", "scale_grad", "sign_ste",
    "size_report", "symmetric_levels", "transform", "uniform_policy", "weight_grid", "xnor_scale",
]
