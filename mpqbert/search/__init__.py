"""AutoMPQ search: size band and loss, bilevel step, exact policy derivation, sensitivity prior;
and the sensitivities of the Hessian baselines (Q-BERT, HAWQ-V3)."""

from mpqbert.search import knapsack
from mpqbert.search.bilevel import (SearchState, arch_entropy, argmax_probs, label_loss,
                                    make_search_step, mean_top_probability, temperature)
from mpqbert.search.derive import (derive_policy, exact_choices, log_probabilities,
                                   policy_from_choices)
from mpqbert.search.hessian import (NEGATIVE_TRACES, average_traces, block_top_eigenvalues,
                                    fisher_diagonal, hutchinson_traces, price_negative_traces,
                                    qbert_sensitivity, quantization_errors, sensitivity_policy)
from mpqbert.search.prior import prior_logits
from mpqbert.search.size import (SizeBand, expected_size_mb, float_matrix_bits, make_band,
                                 size_loss, size_range_mb, uniform_size_mb)

__all__ = [
    "NEGATIVE_TRACES", "SearchState", "SizeBand", "arch_entropy", "argmax_probs",
    "average_traces", "block_top_eigenvalues", "derive_policy", "exact_choices",
    "expected_size_mb", "fisher_diagonal", "float_matrix_bits", "hutchinson_traces", "knapsack",
    "label_loss", "log_probabilities", "make_band", "make_search_step", "mean_top_probability",
    "policy_from_choices", "price_negative_traces", "prior_logits", "qbert_sensitivity",
    "quantization_errors", "sensitivity_policy", "size_loss", "size_range_mb", "temperature",
    "uniform_size_mb",
]
