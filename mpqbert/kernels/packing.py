"""Low-bit integers packed into uint32 words along the reduction axis, plane-major.

Layout of a `[K, N]` matrix of b-bit codes (`b` in `SUPPORTED_BITS`), packed to `[K_w, N]` uint32:

  values per word  v = 32 // b          (1: 32, 2: 16, 3: 10, 4: 8, 8: 4; 3-bit leaves 2 bits unused)
  word rows        K_w = ceil(K / v)
  code k of column n sits in word row `k % K_w`, bits `[b * (k // K_w), b * (k // K_w) + b)`.

So bit-plane `j` of every word holds the contiguous slice `k in [j * K_w, (j + 1) * K_w)`: a
kernel that loads a tile of word rows unpacks plane j with one shift and one mask and multiplies
it by the matching contiguous slice of the activations, with no interleaving shuffle. Codes past K
(the last plane's tail) are 0.

A kernel reads whole tiles of word rows, so a weight served by a kernel may be laid out with more
rows than K_w, `kernel_rows(K, b, tile)` (K_w rounded up to whole tiles; 3-bit codes at K=768
take 77 rows, 80 in 16-row tiles): the same formula with the larger row count, codes past K still
0, so no call pads the weight. Files store the compact K_w rows; the kernel layout is made once
when a model is loaded (`export.lay_out_for_kernels`).

Codes: unsigned b-bit codes are `0 .. 2^b - 1`; signed codes are two's complement
`-2^(b-1) .. 2^(b-1) - 1`, except 1 bit, where signed means the sign format {-1, +1} stored as
bit 1 = +1 (the format of `binary.pack_signs`). `pack` / `unpack` are the pure-jnp reference of
this layout; the Pallas kernels unpack the same bits in-kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
WORD_BITS = 32
SUPPORTED_BITS = (1, 2, 3, 4, 8)


def check_bits(bits: int) -> None:
  if bits not in SUPPORTED_BITS:
    raise ValueError(f"packed kernels support {SUPPORTED_BITS}-bit codes, not {bits}; quantize to "
                     "one of those widths (e.g. 5..7-bit policies can be stored at 8 bits).")


def values_per_word(bits: int) -> int:
  """How many b-bit codes one uint32 word holds."""
  check_bits(bits)
  return WORD_BITS // bits


def word_rows(k: int, bits: int) -> int:
  """`K_w`: uint32 rows of a packed `[K, N]` matrix."""
  return -(-k // values_per_word(bits))


def kernel_rows(k: int, bits: int, tile: int) -> int:
  """Word rows of the kernel layout: `word_rows(k, bits)` rounded up to a multiple of `tile`."""
  rows = word_rows(k, bits)
  return -(-rows // tile) * tile


def check_rows(rows: int, k: int, bits: int, tile: int | None = None) -> None:
  """Refuses a packed weight whose row count is not `word_rows` (or, laid out in whole tiles of
  `tile` rows, `kernel_rows`): most likely packed at another width or for another K."""
  expected = word_rows(k, bits) if tile is None else kernel_rows(k, bits, tile)
  if rows != expected:
    layout = "" if tile is None else f" laid out in {tile}-row tiles"
    raise ValueError(f"{rows} word rows do not hold K={k} {bits}-bit codes{layout} (expected "
                     f"{expected}); was the weight packed at another width, for another K or "
                     "in another layout?")


def code_range(bits: int, signed: bool) -> tuple[int, int]:
  """Smallest and largest code of the format."""
  check_bits(bits)
  if not signed:
    return 0, 2**bits - 1
  return (-1, 1) if bits == 1 else (-(2**(bits - 1)), 2**(bits - 1) - 1)


def pack(codes: Array, bits: int, *, signed: bool, tile: int | None = None) -> Array:
  """`[K, ...]` integer codes -> `[K_w, ...]` uint32 words (the module's layout), or, with
  `tile`, `[kernel_rows(K, bits, tile), ...]` (the kernel layout).

  Raises if a code is outside the format's range (checked only on concrete arrays).
  """
  lo, hi = code_range(bits, signed)
  codes = jnp.asarray(codes)
  if not jnp.issubdtype(codes.dtype, jnp.integer):
    raise TypeError(f"pack expects integer codes, got {codes.dtype}; round and cast first.")
  try:  # Concrete codes are checked; traced ones (under jit) cannot be.
    cmin, cmax = (int(codes.min()), int(codes.max())) if codes.size else (lo, hi)
    has_zero = signed and bits == 1 and bool(jnp.any(codes == 0))
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError,
          jax.errors.TracerBoolConversionError):
    cmin, cmax, has_zero = lo, hi, False
  if cmin < lo or cmax > hi or has_zero:
    raise ValueError(f"{'signed' if signed else 'unsigned'} {bits}-bit codes must lie in "
                     f"[{lo}, {hi}]{' and be +-1' if signed and bits == 1 else ''}; got "
                     f"[{cmin}, {cmax}].")
  k, v = codes.shape[0], values_per_word(bits)
  rows = word_rows(k, bits) if tile is None else kernel_rows(k, bits, tile)
  fields = codes.astype(jnp.int32)
  if signed and bits == 1:
    fields = (fields > 0).astype(jnp.int32)
  fields = fields.astype(jnp.uint32) & jnp.uint32(2**bits - 1)  # Two's complement low bits.
  fields = jnp.pad(fields, [(0, rows * v - k)] + [(0, 0)] * (codes.ndim - 1))
  planes = fields.reshape(v, rows, *codes.shape[1:])
  shifts = (jnp.arange(v, dtype=jnp.uint32) * bits).reshape(v, *[1] * (planes.ndim - 1))
  return jnp.sum(planes << shifts, axis=0, dtype=jnp.uint32)  # Fields do not overlap: sum = or.


def extract_plane(words: Array, plane: int, bits: int, *, signed: bool) -> Array:
  """Plane `plane` of uint32 `words` as int32 codes: one shift, one mask, sign extension.

  Shared by `unpack` and the kernels, so both read the layout identically.
  """
  field = (words >> jnp.uint32(plane * bits)) & jnp.uint32(2**bits - 1)
  field = field.astype(jnp.int32)
  if not signed:
    return field
  if bits == 1:
    return 2 * field - 1
  return field - ((field >> (bits - 1)) << bits)


def unpack(words: Array, bits: int, k: int, *, signed: bool, tile: int | None = None) -> Array:
  """`[K_w, ...]` uint32 words (`[kernel_rows, ...]` with `tile`) -> `[K, ...]` int32 codes; the
  inverse of `pack`."""
  v = values_per_word(bits)
  if words.dtype != jnp.uint32:
    raise TypeError(f"packed words must be uint32, got {words.dtype}.")
  check_rows(words.shape[0], k, bits, tile)
  planes = [extract_plane(words, j, bits, signed=signed) for j in range(v)]
  return jnp.concatenate(planes, axis=0)[:k]
