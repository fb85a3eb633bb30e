"""AutoMPQ search: size band and loss, bilevel step, policy derivation, Hessian baseline."""

from mpqbert.search.bilevel import SearchState, arch_entropy, make_search_step, temperature
from mpqbert.search.derive import derive_policy, fit_to_band, policy_from_choices
from mpqbert.search.hessian import block_top_eigenvalues, hessian_policy, quantization_errors
from mpqbert.search.size import (BITS_PER_MB, SizeBand, expected_size_mb, fixed_bits, make_band,
                                 size_loss, size_range_mb)

__all__ = [
    "BITS_PER_MB", "SearchState", "SizeBand", "arch_entropy", "block_top_eigenvalues",
    "derive_policy", "expected_size_mb", "fit_to_band", "fixed_bits", "hessian_policy",
    "make_band", "make_search_step", "policy_from_choices", "quantization_errors", "size_loss",
    "size_range_mb", "temperature",
]
