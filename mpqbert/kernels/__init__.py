"""Low-bit matmul kernels and their bit packing.

`binary`: sign bits packed into uint32 words and the XNOR-popcount matmul of two packed sign
matrices, as a pure-jnp reference (the Pallas kernels build on the same packing).
"""

from mpqbert.kernels.binary import WORD_BITS, pack_signs, packed_words, xnor_matmul

__all__ = ["WORD_BITS", "pack_signs", "packed_words", "xnor_matmul"]
