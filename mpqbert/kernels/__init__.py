"""Low-bit matmul kernels (Pallas, with pure-jnp references) and their bit packing.

`packing`: 1/2/3/4/8-bit codes packed plane-major into uint32 words along the reduction axis.
`packed_matmul`: activations times a packed weight with per-channel or per-K-group scales.
`binary`: sign-packed activations and weights, XNOR-popcount matmul.
`compat`: the backend choice and the Pallas API differences between JAX versions.
"""

from mpqbert.kernels.binary import pack_signs, xnor_matmul, xnor_matmul_reference
from mpqbert.kernels.compat import BACKENDS
from mpqbert.kernels.lowbit import dequantize, packed_matmul
from mpqbert.kernels.packing import (SUPPORTED_BITS, WORD_BITS, code_range, pack, unpack,
                                     values_per_word, word_rows)

__all__ = ["BACKENDS", "SUPPORTED_BITS", "WORD_BITS", "code_range", "dequantize", "pack",
           "pack_signs", "packed_matmul", "unpack", "values_per_word", "word_rows",
           "xnor_matmul", "xnor_matmul_reference"]
