"""Packed low-bit kernels against float64 NumPy references built from the generated integer codes.

The references never go through the library's `unpack` / `dequantize`: weights are
`scale * (codes - zero)` in float64 from the codes the test drew, and the packed layout is checked
against a NumPy packer written from `packing`'s docstring. Interpret-mode Pallas calls compile
once per shape (~0.5-2 s each on CPU), so the bit-width x signedness x M matrix varies K, N and
the input dtype across its cases instead of taking the full cross product.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpqbert import kernels
from mpqbert.kernels import binary, compat, packing

# The backend of the correctness matrix: Pallas's interpreter on CPU (CI); on a GPU or TPU host,
# MPQBERT_KERNEL_BACKEND=triton / mosaic_tpu runs the same matrix compiled
# (experiments/accelerator_check.sh).
KERNEL_BACKEND = os.environ.get("MPQBERT_KERNEL_BACKEND", "interpret")
BITS = (1, 2, 3, 4, 8)
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Max abs error / max abs reference, by activation dtype (half outputs are rounded to half too).
TOL = {jnp.float32: 1e-3, jnp.bfloat16: 1e-2, jnp.float16: 1e-2}
# (K, N): whole tiles (K_w a multiple of the 32-word K tile at 4 bits, N = 128) and ragged ones.
SHAPES = ((256, 128), (100, 50), (200, 72))

# Jitted for the many shapes below: one compilation each instead of one per eager op (~0.4 s).
# The eager path and its range check are tested on their own.
_pack_jit = jax.jit(packing.pack, static_argnames=("bits", "signed"))
_unpack_jit = jax.jit(packing.unpack, static_argnames=("bits", "k", "signed"))
_pack_signs_jit = jax.jit(binary.pack_signs, static_argnames=("axis",))


# ---------------------------------------------------------------- independent NumPy references


def np_code_range(bits: int, signed: bool) -> tuple[int, int]:
  """Code range from the format's definition (not from `packing.code_range`)."""
  if not signed:
    return 0, 2**bits - 1
  return (-1, 1) if bits == 1 else (-(2**(bits - 1)), 2**(bits - 1) - 1)


def random_codes(rng: np.random.Generator, shape: tuple[int, ...], bits: int,
                 signed: bool) -> np.ndarray:
  """Uniform int64 codes of the format; signed 1-bit codes are +-1."""
  if signed and bits == 1:
    return rng.choice(np.array([-1, 1]), size=shape)
  lo, hi = np_code_range(bits, signed)
  return rng.integers(lo, hi + 1, size=shape)


def np_pack(codes: np.ndarray, bits: int, signed: bool, tile: int | None = None) -> np.ndarray:
  """The docstring's layout, one code at a time: code k -> row k % K_w, bits b * (k // K_w)
  (K_w rounded up to whole tiles of `tile` rows in the kernel layout)."""
  k = codes.shape[0]
  rows = -(-k // (32 // bits))
  rows = rows if tile is None else -(-rows // tile) * tile
  words = np.zeros((rows, *codes.shape[1:]), np.uint64)
  for i in range(k):
    c = codes[i].astype(np.int64)
    field = (c > 0).astype(np.int64) if signed and bits == 1 else c & (2**bits - 1)
    words[i % rows] |= field.astype(np.uint64) << np.uint64(bits * (i // rows))
  return words.astype(np.uint32)


def np_matmul(x: np.ndarray, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None = None,
              group_size: int | None = None) -> np.ndarray:
  """float64 `x @ (scale * (codes - zero))`, scales `[N]` or `[K // group_size, N]`."""
  s = np.asarray(scales, np.float64).reshape(-1, codes.shape[1])
  z = np.zeros_like(s) if zeros is None else np.asarray(zeros, np.float64).reshape(s.shape)
  rows = codes.shape[0] if group_size is None else group_size
  w = np.repeat(s, rows, axis=0) * (codes.astype(np.float64) - np.repeat(z, rows, axis=0))
  return np.asarray(x, np.float64) @ w


def rel_err(got: jax.Array, want: np.ndarray) -> float:
  got = np.asarray(got).astype(np.float64)
  assert got.shape == want.shape and np.all(np.isfinite(got))
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def activations(rng: np.random.Generator, shape: tuple[int, ...], dtype) -> tuple[jax.Array,
                                                                                   np.ndarray]:
  """`x` in `dtype` and the float64 copy of the same (half-rounded) values."""
  x = rng.standard_normal(shape, dtype=np.float32).astype(dtype)  # Round to nearest even.
  return jnp.asarray(x), x.astype(np.float64)


def packed_case(seed, k: int, n: int, bits: int, signed: bool, groups: int = 1,
                zero_points: bool = False):
  """(rng, codes, w_packed, scales, zeros): random codes, per-(group, N) scales in [0.1, 1) and
  (optionally) zero points drawn from the code range, as float32."""
  rng = np.random.default_rng(seed)
  codes = random_codes(rng, (k, n), bits, signed)
  w = _pack_jit(jnp.asarray(codes, jnp.int32), bits, signed=signed)
  shape = (n,) if groups == 1 else (groups, n)
  scales = rng.uniform(0.1, 1.0, size=shape).astype(np.float32)
  zeros = None
  if zero_points:
    lo, hi = np_code_range(bits, signed)
    zeros = rng.integers(lo, hi + 1, size=shape).astype(np.float32)
  return rng, codes, w, scales, zeros


# ---------------------------------------------------------------- packing: format and layout


def test_format_tables():
  assert packing.SUPPORTED_BITS == BITS
  assert [packing.values_per_word(b) for b in BITS] == [32, 16, 10, 8, 4]
  for b in BITS:
    for signed in (True, False):
      assert packing.code_range(b, signed) == np_code_range(b, signed)
  assert packing.code_range(1, True) == (-1, 1) and packing.code_range(3, True) == (-4, 3)
  assert [packing.word_rows(20, b) for b in BITS] == [1, 2, 2, 3, 5]
  assert packing.word_rows(32, 1) == 1 and packing.word_rows(33, 1) == 2


def test_layout_hand_computed_2bit_k20():
  """2-bit, K=20 -> 16 codes per word, K_w=2: code k in row k % 2, bits [2 (k // 2), +2)."""
  codes = np.arange(20) % 4  # column 0: k=0..19 -> 0,1,2,3,0,1,...
  words = np.asarray(packing.pack(jnp.asarray(codes[:, None], jnp.int32), 2, signed=False))
  assert words.dtype == np.uint32 and words.shape == (2, 1)
  # Row 0 holds even k at planes p = k // 2: codes 0,2,0,2,... -> 0b10 in planes 1,3,5,7,9.
  assert int(words[0, 0]) == sum(2 << (2 * p) for p in (1, 3, 5, 7, 9)) == 0x00088888
  # Row 1 holds odd k: codes 1,3,1,3,... in planes 0..9 -> 0b11_01 repeated; planes 10..15 empty.
  assert int(words[1, 0]) == 0x000DDDDD
  # Signed: a single -1 (two's complement 0b11) at k=19 -> row 1, plane 9, bits 18..19.
  signed = np.zeros((20, 1), np.int32)
  signed[19] = -1
  words = np.asarray(packing.pack(jnp.asarray(signed), 2, signed=True))
  assert [int(v) for v in words[:, 0]] == [0, 0x000C0000]
  # All -1: every used field is 0b11, the 6 planes past K stay 0.
  words = np.asarray(packing.pack(jnp.full((20, 3), -1, jnp.int32), 2, signed=True))
  assert np.all(words == 0x000FFFFF)


def test_layout_1bit_signs_and_3bit_unused_bits():
  """Signed 1-bit: bit 1 = +1; 3-bit: 10 fields use bits 0..29, the top 2 bits stay 0."""
  plus = np.asarray(packing.pack(jnp.ones((64, 2), jnp.int32), 1, signed=True))
  minus = np.asarray(packing.pack(-jnp.ones((64, 2), jnp.int32), 1, signed=True))
  assert np.all(plus == 0xFFFFFFFF) and np.all(minus == 0)
  top = np.asarray(packing.pack(jnp.full((30, 1), 7, jnp.int32), 3, signed=False))
  assert np.all(top == 2**30 - 1)
  low = np.asarray(packing.pack(jnp.full((30, 1), -4, jnp.int32), 3, signed=True))  # 0b100
  assert np.all(low == sum(4 << (3 * p) for p in range(10)))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_pack_matches_numpy_layout_and_round_trips(bits: int, signed: bool):
  """Random codes plus all-min, all-max and alternating min/max columns, for K of one code, of
  whole words, and ragged ([K, 2, 3] codes in int8 / uint8 there); unpack inverts pack exactly."""
  rng = np.random.default_rng([bits, signed])
  lo, hi = np_code_range(bits, signed)
  v = 32 // bits
  for k in (1, 3 * v, 5 * v + 3):
    codes = random_codes(rng, (k, 6), bits, signed)
    codes[:, 0], codes[:, 1] = lo, hi
    codes[:, 2] = np.where(np.arange(k) % 2, lo, hi)
    codes[:, 3] = np.where(np.arange(k) % 2, hi, lo)
    given = jnp.asarray(codes, jnp.int32)
    if k % v:
      codes = codes.reshape(k, 2, 3)
      given = jnp.asarray(codes.astype(np.int8 if signed else np.uint8))
    words = _pack_jit(given, bits, signed=signed)
    assert words.dtype == jnp.uint32 and words.shape == (-(-k // v), *codes.shape[1:])
    np.testing.assert_array_equal(np.asarray(words), np_pack(codes, bits, signed))
    back = _unpack_jit(words, bits, k, signed=signed)
    assert back.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(back), codes)
  # The eager path (with its range check) packs the same words.
  np.testing.assert_array_equal(packing.pack(given, bits, signed=signed), words)


def test_extract_plane_reads_one_plane():
  codes = np.arange(-8, 8).repeat(2).reshape(32, 1)  # 4-bit signed, K_w = 4
  words = packing.pack(jnp.asarray(codes, jnp.int32), 4, signed=True)
  for j in range(8):
    np.testing.assert_array_equal(packing.extract_plane(words, j, 4, signed=True),
                                  codes[4 * j:4 * j + 4])
  np.testing.assert_array_equal(packing.extract_plane(words, 0, 4, signed=False),
                                codes[:4] & 15)


@pytest.mark.parametrize("bits", [0, 5, 6, 16, 32])
def test_pack_rejects_unsupported_bits(bits: int):
  with pytest.raises(ValueError, match=r"support \(1, 2, 3, 4, 8\)-bit codes, not"):
    packing.pack(jnp.zeros((8, 2), jnp.int32), bits, signed=False)
  with pytest.raises(ValueError, match=r"support \(1, 2, 3, 4, 8\)"):
    packing.unpack(jnp.zeros((1, 2), jnp.uint32), bits, 8, signed=False)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_pack_rejects_out_of_range_codes(bits: int, signed: bool):
  lo, hi = np_code_range(bits, signed)
  base = jnp.full((10, 3), 1 if signed and bits == 1 else 0, jnp.int32)
  for bad in (lo - 1, hi + 1):
    codes = base.at[7, 2].set(bad)
    with pytest.raises(ValueError, match=f"{bits}-bit codes must lie in"):
      packing.pack(codes, bits, signed=signed)
  if signed and bits == 1:
    with pytest.raises(ValueError, match=r"be \+-1"):
      packing.pack(jnp.array([[1], [0], [-1]], jnp.int32), 1, signed=True)


def test_pack_and_unpack_reject_wrong_dtypes_and_rows():
  with pytest.raises(TypeError, match="integer codes"):
    packing.pack(jnp.zeros((8, 2), jnp.float32), 4, signed=True)
  with pytest.raises(TypeError, match="must be uint32"):
    packing.unpack(jnp.zeros((1, 2), jnp.int32), 4, 8, signed=True)
  with pytest.raises(ValueError, match="word rows do not hold K=20"):
    packing.unpack(jnp.zeros((4, 2), jnp.uint32), 4, 20, signed=True)


# ---------------------------------------------------------------- packed_matmul


def matrix_case(bits: int, signed: bool, m: int):
  """(K, N) and dtype for one (bits, signed, M): per bit-width, both signednesses see every shape
  and every dtype, and each M meets different shapes across bit-widths."""
  b, i = BITS.index(bits), (1, 7, 128).index(m)
  k, n = SHAPES[(i + b) % 3]
  dtype = DTYPES[(2 * i + b + int(signed)) % 3]
  return pytest.param(bits, signed, m, k, n, dtype,
                      id=f"{bits}bit-{'s' if signed else 'u'}-M{m}-K{k}N{n}-{dtype.__name__}")


@pytest.mark.parametrize("bits,signed,m,k,n,dtype",
                         [matrix_case(b, s, m) for b in BITS for s in (True, False)
                          for m in (1, 7, 128)])
def test_packed_matmul_matches_float64(bits: int, signed: bool, m: int, k: int, n: int, dtype):
  rng, codes, w, scales, _ = packed_case([bits, signed, m, k, n], k, n, bits, signed)
  x, x64 = activations(rng, (m, k), dtype)
  y = kernels.packed_matmul(x, w, jnp.asarray(scales), bits=bits, signed=signed,
                            backend=KERNEL_BACKEND)
  assert y.shape == (m, n) and y.dtype == dtype
  assert rel_err(y, np_matmul(x64, codes, scales)) < TOL[dtype]


@pytest.mark.parametrize("bits,signed,m,k,n,dtype,backend", [
    (1, True, 7, 100, 50, jnp.float32, "tpu_interpret"),
    (3, False, 128, 200, 72, jnp.bfloat16, "tpu_interpret"),
    (8, True, 1, 256, 128, jnp.float16, "tpu_interpret"),
    (2, False, 7, 200, 72, jnp.float32, "reference"),
    (4, True, 128, 100, 50, jnp.bfloat16, "reference"),
])
def test_packed_matmul_other_backends(bits: int, signed: bool, m: int, k: int, n: int, dtype,
                                      backend: str):
  rng, codes, w, scales, _ = packed_case([bits, signed, m, k, n, 1], k, n, bits, signed)
  x, x64 = activations(rng, (m, k), dtype)
  y = kernels.packed_matmul(x, w, jnp.asarray(scales), bits=bits, signed=signed, backend=backend)
  assert y.shape == (m, n) and y.dtype == dtype
  assert rel_err(y, np_matmul(x64, codes, scales)) < TOL[dtype]


@pytest.mark.parametrize("bits,signed,k,group_size,zero_points,dtype,backend", [
    (4, True, 512, 64, False, jnp.bfloat16, KERNEL_BACKEND),
    (4, False, 512, 32, True, jnp.float32, KERNEL_BACKEND),
    (8, True, 256, 16, True, jnp.float16, KERNEL_BACKEND),
    # K_w=40: 10 planes hold 400 > K=392 codes, so the last plane ends in padding past the last
    # group (and the default 4 K splits pad its 5 K tiles of 8 word rows to 8 tiles).
    (3, False, 392, 8, True, jnp.float32, KERNEL_BACKEND),
    (4, False, 512, 64, True, jnp.float32, "tpu_interpret"),
    (2, True, 512, 32, True, jnp.float32, "reference"),
])
def test_packed_matmul_k_group_scales_and_zero_points(bits: int, signed: bool, k: int,
                                                      group_size: int, zero_points: bool, dtype,
                                                      backend: str):
  """Per-(K-group, N) scales (and zero points); N=200 spans two 128-wide N tiles."""
  m, n, groups = 7, 200, k // group_size
  rng, codes, w, scales, zeros = packed_case([bits, k, group_size], k, n, bits, signed,
                                             groups=groups, zero_points=zero_points)
  x, x64 = activations(rng, (m, k), dtype)
  zj = None if zeros is None else jnp.asarray(zeros)
  y = kernels.packed_matmul(x, w, jnp.asarray(scales), bits=bits, signed=signed, zero_points=zj,
                            group_size=group_size, backend=backend)
  assert y.shape == (m, n) and y.dtype == dtype
  want = np_matmul(x64, codes, scales, zeros, group_size)
  assert rel_err(y, want) < TOL[dtype]
  # A per-channel reading of the same scales (group 0 everywhere) must not pass.
  assert rel_err(y, np_matmul(x64, codes, scales[0], None if zeros is None else zeros[0])) > 0.05


@pytest.mark.parametrize("bits,signed,m,k,dtype", [
    (4, False, 7, 300, jnp.float32),
    (8, False, 128, 256, jnp.bfloat16),
    (3, True, 1, 100, jnp.float16),
])
def test_packed_matmul_per_channel_zero_points(bits: int, signed: bool, m: int, k: int, dtype):
  """Asymmetric per-channel weights: W = scale * (code - zero), zero in the code range."""
  n = 200
  rng, codes, w, scales, zeros = packed_case([bits, signed, m, k, 2], k, n, bits, signed,
                                             zero_points=True)
  x, x64 = activations(rng, (m, k), dtype)
  y = kernels.packed_matmul(x, w, jnp.asarray(scales), bits=bits, signed=signed,
                            zero_points=jnp.asarray(zeros), backend=KERNEL_BACKEND)
  assert y.shape == (m, n) and y.dtype == dtype
  assert rel_err(y, np_matmul(x64, codes, scales, zeros)) < TOL[dtype]


@pytest.mark.parametrize("bits,signed,k,group_size", [(3, False, 392, 8), (2, True, 100, None)])
def test_dequantize_matches_codes(bits: int, signed: bool, k: int, group_size: int | None):
  n = 20
  groups = 1 if group_size is None else k // group_size
  _, codes, w, scales, zeros = packed_case([bits, k, 7], k, n, bits, signed, groups=groups,
                                           zero_points=True)
  w_hat = kernels.dequantize(w, jnp.asarray(scales), bits=bits, k=k, signed=signed,
                             zero_points=jnp.asarray(zeros), group_size=group_size)
  assert w_hat.shape == (k, n) and w_hat.dtype == jnp.float32
  np.testing.assert_allclose(w_hat, np_matmul(np.eye(k), codes, scales, zeros, group_size),
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", [KERNEL_BACKEND, "reference"])
def test_packed_matmul_leading_batch_dims(backend: str):
  k, n, bits = 200, 72, 4
  rng, codes, w, scales, _ = packed_case([k, n, 3], k, n, bits, True)
  x, x64 = activations(rng, (2, 3, k), jnp.float32)
  y = kernels.packed_matmul(x, w, jnp.asarray(scales), bits=bits, backend=backend)
  assert y.shape == (2, 3, n) and y.dtype == jnp.float32
  want = np_matmul(x64.reshape(6, k), codes, scales).reshape(2, 3, n)
  assert rel_err(y, want) < 1e-3
  # Each batch row is its own product (no mixing across the flattened M axis).
  assert rel_err(y[1, 2], want[1, 2]) < 1e-3
  # No leading dims at all: x [K] -> [N].
  y = kernels.packed_matmul(x[1, 2], w, jnp.asarray(scales), bits=bits, backend=backend)
  assert y.shape == (n,) and rel_err(y, want[1, 2]) < 1e-3


@pytest.mark.parametrize("x_dtype,out_dtype,tol", [
    (jnp.bfloat16, jnp.float32, 1e-4),  # bf16 x times exact integer codes, f32 accumulation
    (jnp.float16, jnp.float32, 1e-4),
    (jnp.float32, jnp.bfloat16, 1e-2),
])
def test_packed_matmul_out_dtype(x_dtype, out_dtype, tol: float):
  k, n, m, bits = 200, 72, 7, 8
  rng, codes, w, scales, _ = packed_case([k, n, 4], k, n, bits, False)
  x, x64 = activations(rng, (m, k), x_dtype)
  y = kernels.packed_matmul(x, w, jnp.asarray(scales), bits=bits, signed=False,
                            out_dtype=out_dtype, backend=KERNEL_BACKEND)
  assert y.dtype == out_dtype and y.shape == (m, n)
  assert rel_err(y, np_matmul(x64, codes, scales)) < tol


@pytest.mark.parametrize("group_size", [None, 32])
def test_packed_matmul_small_explicit_tiles_and_k_splits(group_size: int | None):
  """Several M, N and K tiles per call (8 x 16 outputs, 8 words), ragged M and N, and 3 K splits
  of the 8 K tiles (padded to 9: a split past the last word row adds nothing)."""
  m, n, k, bits = 20, 40, 512, 4
  groups = 1 if group_size is None else k // group_size
  rng, codes, w, scales, zeros = packed_case([m, n, k, 5], k, n, bits, False, groups=groups,
                                             zero_points=True)
  x, x64 = activations(rng, (m, k), jnp.float32)
  y = kernels.packed_matmul(x, w, jnp.asarray(scales), bits=bits, signed=False,
                            zero_points=jnp.asarray(zeros), group_size=group_size,
                            backend=KERNEL_BACKEND, block_m=8, block_n=16, block_k_words=8,
                            k_splits=3)
  assert rel_err(y, np_matmul(x64, codes, scales, zeros, group_size)) < 1e-3


def test_packed_matmul_auto_backend():
  """backend="auto" picks a concrete backend (no GPU/TPU lowering on CPU) and computes x @ W."""
  for name in compat.BACKENDS[1:]:
    assert compat.resolve_backend(name) == name
  auto = compat.resolve_backend("auto")
  assert auto in compat.BACKENDS and auto != "auto"
  if jax.default_backend() == "cpu":
    assert auto not in ("triton", "mosaic_tpu")
  k, n, bits = 100, 50, 2
  rng, codes, w, scales, _ = packed_case([k, n, 6], k, n, bits, True)
  x, x64 = activations(rng, (7, k), jnp.float32)
  y = kernels.packed_matmul(x, w, jnp.asarray(scales), bits=bits)
  assert rel_err(y, np_matmul(x64, codes, scales)) < 1e-3


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the Triton lowering needs a GPU")
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_packed_matmul_triton_on_gpu(bits: int, signed: bool):
  """The compiled GPU kernel (CPU runs check the same code through the interpreter)."""
  for m, (k, n), dtype in ((7, SHAPES[2], jnp.float32), (128, SHAPES[0], jnp.bfloat16)):
    rng, codes, w, scales, zeros = packed_case([bits, signed, m, 9], k, n, bits, signed,
                                               zero_points=not signed)
    x, x64 = activations(rng, (m, k), dtype)
    y = kernels.packed_matmul(x, w, jnp.asarray(scales), bits=bits, signed=signed,
                              zero_points=None if zeros is None else jnp.asarray(zeros),
                              backend="triton")
    assert y.shape == (m, n) and y.dtype == dtype
    assert rel_err(y, np_matmul(x64, codes, scales, zeros)) < TOL[dtype]


# ---------------------------------------------------------------- packed_matmul errors


def _operands(k: int = 64, n: int = 8, bits: int = 4):
  x = jnp.ones((3, k), jnp.float32)
  w = packing.pack(jnp.ones((k, n), jnp.int32), bits, signed=True)
  return x, w, jnp.ones((n,), jnp.float32)


@pytest.mark.parametrize("bits", [0, 5])
def test_packed_matmul_rejects_unsupported_bits(bits: int):
  x, w, s = _operands()
  with pytest.raises(ValueError, match=r"support \(1, 2, 3, 4, 8\)-bit codes, not"):
    kernels.packed_matmul(x, w, s, bits=bits, backend="interpret")


def test_packed_matmul_rejects_mismatched_k():
  x, w, s = _operands(k=128)
  with pytest.raises(ValueError, match="16 word rows do not hold K=64 4-bit codes"):
    kernels.packed_matmul(x[:, :64], w, s, bits=4, backend="interpret")
  with pytest.raises(ValueError, match="word rows"):  # Right K, packed at another width.
    kernels.packed_matmul(x, w, s, bits=2, backend="interpret")


def test_packed_matmul_rejects_wrong_scales_and_zero_points():
  x, w, s = _operands(k=512)
  with pytest.raises(ValueError, match=r"scales have shape \(9,\), expected \(8,\)"):
    kernels.packed_matmul(x, w, jnp.ones((9,)), bits=4, backend="interpret")
  with pytest.raises(ValueError, match=r"scales have shape \(2, 8\)"):
    kernels.packed_matmul(x, w, jnp.ones((2, 8)), bits=4, backend="interpret")
  with pytest.raises(ValueError, match=r"scales have shape \(8,\), expected \(8, 8\)"):
    kernels.packed_matmul(x, w, s, bits=4, group_size=64, backend="interpret")
  with pytest.raises(ValueError, match=r"scales have shape \(4, 8\).*8 K-groups of 64"):
    kernels.packed_matmul(x, w, jnp.ones((4, 8)), bits=4, group_size=64, backend="interpret")
  with pytest.raises(ValueError, match=r"zero_points \(7,\) must match scales \(8,\)"):
    kernels.packed_matmul(x, w, s, bits=4, zero_points=jnp.ones((7,)), backend="interpret")
  with pytest.raises(ValueError, match="zero_points .* must match scales"):
    kernels.packed_matmul(x, w, jnp.ones((8, 8)), bits=4, zero_points=s, group_size=64,
                          backend="interpret")


def test_packed_matmul_rejects_group_size_not_dividing_k_w():
  x, w, _ = _operands(k=512)  # 4-bit: K_w = 64.
  with pytest.raises(ValueError, match="group_size=128 must divide K=512 and the 64 word rows"):
    kernels.packed_matmul(x, w, jnp.ones((4, 8)), bits=4, group_size=128, backend="interpret")
  with pytest.raises(ValueError, match="group_size=48 must divide K=512"):
    kernels.packed_matmul(x, w, jnp.ones((10, 8)), bits=4, group_size=48, backend="interpret")
  with pytest.raises(ValueError, match="block_k_words=32 must divide group_size=16"):
    kernels.packed_matmul(x, w, jnp.ones((32, 8)), bits=4, group_size=16, block_k_words=32,
                          backend="interpret")


def test_packed_matmul_rejects_tiles_not_powers_of_two():
  x, w, s = _operands()
  with pytest.raises(ValueError, match="block_m=48 must be a power of two"):
    kernels.packed_matmul(x, w, s, bits=4, block_m=48, backend="interpret")
  with pytest.raises(ValueError, match="block_k_words=6 must be a power of two"):
    kernels.packed_matmul(x, w, s, bits=4, block_k_words=6, backend="interpret")


def test_packed_matmul_rejects_wrong_dtypes():
  x, w, s = _operands()
  with pytest.raises(TypeError, match="activations, got int32"):
    kernels.packed_matmul(x.astype(jnp.int32), w, s, bits=4, backend="interpret")
  with pytest.raises(TypeError, match="w_packed must be a .K_w, N. uint32 array"):
    kernels.packed_matmul(x, w.astype(jnp.float32), s, bits=4, backend="interpret")
  with pytest.raises(TypeError, match="w_packed must be a .K_w, N. uint32 array"):
    kernels.packed_matmul(x, w.astype(jnp.int32), s, bits=4, backend="interpret")
  with pytest.raises(TypeError, match="w_packed must be"):
    kernels.packed_matmul(x, w[:, 0], s, bits=4, backend="interpret")


def test_unknown_backend_is_rejected():
  x, w, s = _operands()
  with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
    kernels.packed_matmul(x, w, s, bits=4, backend="cuda")
  with pytest.raises(ValueError, match="unknown kernel backend 'tpu'"):
    binary.xnor_matmul(jnp.zeros((3, 2), jnp.uint32), jnp.zeros((2, 8), jnp.uint32), 64,
                       backend="tpu")
  with pytest.raises(ValueError, match="no Pallas lowering"):
    compat.pallas_call_options("reference")


# ---------------------------------------------------------------- binary: XNOR-popcount


def sign_inputs(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  """Normal float32 values with some exact zeros (sign(0) = +1) and negative zeros."""
  x = rng.standard_normal(shape).astype(np.float32)
  x.flat[::7] = 0.0
  x.flat[3::11] = -0.0
  return x


def test_pack_signs_layout():
  rng = np.random.default_rng(11)
  x, wt = sign_inputs(rng, (5, 70)), sign_inputs(rng, (70, 4))
  sx, sw = np.where(x >= 0, 1, -1), np.where(wt >= 0, 1, -1)
  np.testing.assert_array_equal(binary.pack_signs(jnp.asarray(x)), np_pack(sx.T, 1, True).T)
  np.testing.assert_array_equal(binary.pack_signs(jnp.asarray(wt), axis=0), np_pack(sw, 1, True))


@pytest.mark.parametrize("m,k,n", [(1, 40, 130), (7, 384, 50), (128, 100, 72), (7, 64, 20)])
def test_xnor_matmul_exact(m: int, k: int, n: int):
  """int32 equality with NumPy's +-1 dot product, K ragged (40, 100) and whole words (64, 384)."""
  rng = np.random.default_rng([m, k, n])
  x, wt = sign_inputs(rng, (m, k)), sign_inputs(rng, (k, n))
  want = np.where(x >= 0, 1, -1).astype(np.int64) @ np.where(wt >= 0, 1, -1).astype(np.int64)
  xw, ww = _pack_signs_jit(jnp.asarray(x)), _pack_signs_jit(jnp.asarray(wt), axis=0)
  assert xw.shape == (m, -(-k // 32)) and ww.shape == (-(-k // 32), n)
  backends = (KERNEL_BACKEND, "tpu_interpret", "reference") + (
      ("triton",) if jax.default_backend() == "gpu" else ())
  for got in (binary.xnor_matmul(xw, ww, k, backend=b) for b in backends):
    assert got.dtype == jnp.int32 and got.shape == (m, n)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_xnor_matmul_scale_and_bias():
  """Float32 `products * scale + bias` (2 x 2 output tiles, ragged K) against float64."""
  m, k, n = 128, 100, 130
  rng = np.random.default_rng([m, k, n, 1])
  x, wt = sign_inputs(rng, (m, k)), sign_inputs(rng, (k, n))
  dots = np.where(x >= 0, 1.0, -1.0) @ np.where(wt >= 0, 1.0, -1.0)
  scale = rng.uniform(0.01, 0.1, n).astype(np.float32)
  bias = rng.standard_normal(n).astype(np.float32)
  xw, ww = _pack_signs_jit(jnp.asarray(x)), _pack_signs_jit(jnp.asarray(wt), axis=0)
  sj, bj = jnp.asarray(scale), jnp.asarray(bias)
  want = dots * scale.astype(np.float64) + bias.astype(np.float64)
  for backend in (KERNEL_BACKEND, "reference"):
    got = binary.xnor_matmul(xw, ww, k, scale=sj, bias=bj, backend=backend)
    assert got.dtype == jnp.float32 and got.shape == (m, n)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
  got = binary.xnor_matmul_reference(xw, ww, k, scale=sj)
  np.testing.assert_allclose(got, dots * scale.astype(np.float64), rtol=1e-6, atol=1e-6)
  got = binary.xnor_matmul_reference(xw, ww, k, bias=bj)
  np.testing.assert_allclose(got, dots + bias.astype(np.float64), rtol=1e-6, atol=1e-6)


def test_xnor_matmul_rejects_bad_inputs():
  xw, ww = jnp.zeros((3, 2), jnp.uint32), jnp.zeros((2, 5), jnp.uint32)  # K = 40
  for fn in (binary.xnor_matmul, binary.xnor_matmul_reference):
    with pytest.raises(TypeError, match="uint32 sign words"):
      fn(xw.astype(jnp.int32), ww, 40)
    with pytest.raises(TypeError, match="uint32 sign words"):
      fn(xw, ww.astype(jnp.float32), 40)
    with pytest.raises(ValueError, match=r"multiplies \[M, K_w\] by \[K_w, N\]"):
      fn(xw, jnp.concatenate([ww, ww]), 40)
    with pytest.raises(ValueError, match="length 100 does not fit 2 words"):
      fn(xw, ww, 100)
    with pytest.raises(ValueError, match=r"scale must have shape \(5,\)"):
      fn(xw, ww, 40, scale=jnp.ones((4,)))
    with pytest.raises(ValueError, match=r"bias must have shape \(5,\)"):
      fn(xw, ww, 40, bias=jnp.ones((5, 1)))


# ------------------------------------------------------------------- lowering without the device


# The custom call each accelerator lowering must emit: the kernel itself, not a fallback.
KERNEL_CALLS = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}


def _export_text(fn, platform: str, *args: jax.ShapeDtypeStruct) -> str:
  """`jax.export` of `fn` for `platform` (on any host), as StableHLO text. The Triton call has no
  serialization-compatibility guarantee, so its check is disabled: the module is only read."""
  checks = ([jax.export.DisabledSafetyCheck.custom_call(KERNEL_CALLS["cuda"])]
            if platform == "cuda" else [])
  exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args)
  return exported.mlir_module()


def _export_cases() -> list[tuple]:
  """(bits, signed, m, k, n, dtype, scale rows, zero points, group size) of every configuration the
  correctness tests run: the whole (bits, signedness, M) matrix with its shapes and dtypes, each
  with per-channel zero points, and the K-group cases."""
  cases = []
  for bits in BITS:
    for signed in (True, False):
      for m in (1, 7, 128):
        _, _, _, k, n, dtype = matrix_case(bits, signed, m).values
        cases += [(bits, signed, m, k, n, dtype, 1, False, None),
                  (bits, signed, m, k, n, dtype, 1, True, None)]
  for bits, signed, k, group_size, zeros, dtype in [
      (4, True, 512, 64, False, jnp.bfloat16), (4, False, 512, 32, True, jnp.float32),
      (8, True, 256, 16, True, jnp.float16), (3, False, 392, 8, True, jnp.float32)]:
    cases.append((bits, signed, 7, k, 200, dtype, k // group_size, zeros, group_size))
  return cases


@pytest.mark.parametrize("platform,backend", [("cuda", "triton"), ("tpu", "mosaic_tpu")])
def test_every_kernel_configuration_exports_for_gpu_and_tpu(platform: str, backend: str):
  """`jax.export` for CUDA and TPU of every kernel configuration the correctness tests run (and
  xnor_matmul), on any host: an op, shape or dtype the Triton or Mosaic lowering rejects fails
  here without the device, and each module holds the kernel's custom call. Compilation by the
  device's compiler is not covered (experiments/accelerator_check.sh runs that on a device)."""
  from mpqbert.kernels import lowbit
  struct = jax.ShapeDtypeStruct
  for bits, signed, m, k, n, dtype, scale_rows, zeros, group_size in _export_cases():
    if group_size is not None and platform == "tpu":
      continue  # K-group scales index their rows dynamically: Mosaic needs the TPU's kind.
    scales = struct((scale_rows, n) if group_size else (n,), jnp.float32)

    def call(x, w, s, z, bits=bits, signed=signed, group_size=group_size):
      return kernels.packed_matmul(x, w, s, bits=bits, signed=signed, zero_points=z,
                                   group_size=group_size, backend=backend)

    text = _export_text(call, platform, struct((m, k), dtype),
                        struct((packing.word_rows(k, bits), n), jnp.uint32), scales,
                        scales if zeros else None)
    assert KERNEL_CALLS[platform] in text, (bits, signed, m, k, n, dtype, group_size)
  tile = lowbit.kernel_tile(backend)  # Weights laid out in whole tiles (3-bit, 1-bit at K=768).
  for bits, m in [(3, 1), (3, 128), (1, 8)]:
    def laid_out(x, w, s, bits=bits):
      return kernels.packed_matmul(x, w, s, bits=bits, backend=backend, layout_tile=tile)

    text = _export_text(laid_out, platform, struct((m, 768), jnp.float16),
                        struct((packing.kernel_rows(768, bits, tile), 256), jnp.uint32),
                        struct((256,), jnp.float32))
    assert KERNEL_CALLS[platform] in text, ("laid out", bits, m)
  for m, k, n in [(1, 40, 130), (7, 384, 50), (128, 100, 72)]:
    words = packing.word_rows(k, 1)
    text = _export_text(lambda a, b, k=k: binary.xnor_matmul(a, b, k, backend=backend), platform,
                        struct((m, words), jnp.uint32), struct((words, n), jnp.uint32))
    assert KERNEL_CALLS[platform] in text, ("xnor", m, k, n)


def test_popcount32_counts_set_bits():
  """The kernels' shift-and-mask popcount against Python's bit count, edge words included."""
  v = np.random.default_rng(11).integers(0, 2**32, 4000, dtype=np.uint64).astype(np.uint32)
  v[:4] = [0, 0xFFFFFFFF, 0x80000001, 0x55555555]
  want = np.array([bin(int(a)).count("1") for a in v])
  np.testing.assert_array_equal(np.asarray(binary.popcount32(jnp.asarray(v))), want)


@pytest.mark.parametrize("k,n", [(768, 768), (768, 3072), (3072, 768), (4096, 4096)])
def test_default_tiles_never_pad_the_weight_at_bert_shapes(k: int, n: int):
  """At BERT-base shapes and 4096x4096, 1/2/3/4/8 bits, M 1..512, the default GPU tiles cover the
  packed weight exactly (no per-call copy into a padded buffer) and fill the GPU: 64 programs or
  more wherever K can be split that far. Rows that no 16-row tile divides (3 bits; 1 bit at
  K=768: 24 rows; Triton's dot needs 16 rows or more) are laid out in whole 16-row tiles once,
  at load (`packing.kernel_rows`)."""
  from mpqbert.kernels import lowbit
  for bits in (1, 2, 3, 4, 8):
    rows = packing.kernel_rows(k, bits, lowbit.kernel_tile("triton"))
    assert rows - packing.word_rows(k, bits) < 16
    for m in (1, 8, 32, 128, 512):
      block_m, block_n, block_k_words, k_tiles, splits = lowbit.tiling(m, n, rows,
                                                                       group_size=None, tpu=False)
      assert block_k_words * k_tiles == rows and k_tiles % splits == 0, (bits, m)
      assert n % block_n == 0
      programs = -(-m // block_m) * (n // block_n) * splits
      assert programs >= min(64, -(-m // block_m) * (n // block_n) * k_tiles), (bits, m, programs)


@pytest.mark.parametrize("bits,signed", [(3, True), (3, False), (1, True), (2, False)])
def test_kernel_layout_matches_numpy_and_round_trips(bits: int, signed: bool):
  """`pack(..., tile=16)`: the layout formula with K_w rounded up to whole 16-row tiles (3-bit at
  K=768: 77 -> 80 rows; 1-bit: 24 -> 32), against the one-code-at-a-time NumPy packer; unpack
  with the tile inverts it, and either layout is refused where the other is expected."""
  rng = np.random.default_rng([bits, signed, 16])
  for k in (768, 45):
    codes = random_codes(rng, (k, 5), bits, signed)
    words = packing.pack(jnp.asarray(codes, jnp.int32), bits, signed=signed, tile=16)
    rows = -(-packing.word_rows(k, bits) // 16) * 16
    assert words.shape == (rows, 5) and rows == packing.kernel_rows(k, bits, 16)
    np.testing.assert_array_equal(np.asarray(words), np_pack(codes, bits, signed, tile=16))
    np.testing.assert_array_equal(
        np.asarray(packing.unpack(words, bits, k, signed=signed, tile=16)), codes)
    if rows != packing.word_rows(k, bits):
      with pytest.raises(ValueError, match=f"{rows} word rows do not hold K={k}"):
        packing.unpack(words, bits, k, signed=signed)
      compact = packing.pack(jnp.asarray(codes, jnp.int32), bits, signed=signed)
      with pytest.raises(ValueError, match="laid out in 16-row tiles"):
        packing.unpack(compact, bits, k, signed=signed, tile=16)


@pytest.mark.parametrize("bits,signed,group_size", [(3, True, None), (3, False, None),
                                                    (1, True, None), (3, True, 16)])
def test_packed_matmul_on_laid_out_weights_matches_float64(bits: int, signed: bool,
                                                           group_size: int | None):
  """Weights laid out in 16-row tiles (`layout_tile=16`) at K=768, interpreted, against float64
  NumPy; the default tiles cover the 80 (3-bit) or 32 (1-bit) rows exactly. Laid out, a 3-bit
  weight also takes K-groups of 16 (planes of 80 rows; the compact 77 rows take none)."""
  from mpqbert.kernels import lowbit
  k, n, m = 768, 96, 8
  rng = np.random.default_rng([bits, signed, 768])
  codes = random_codes(rng, (k, n), bits, signed)
  groups = 1 if group_size is None else k // group_size
  scales = rng.uniform(0.1, 1.0, size=(n,) if groups == 1 else (groups, n)).astype(np.float32)
  words = packing.pack(jnp.asarray(codes, jnp.int32), bits, signed=signed, tile=16)
  rows = words.shape[0]
  _, _, block_k_words, k_tiles, _ = lowbit.tiling(m, n, rows, group_size=group_size, tpu=False)
  assert block_k_words * k_tiles == rows
  x, x64 = activations(rng, (m, k), jnp.float32)
  got = kernels.packed_matmul(x, words, jnp.asarray(scales), bits=bits, signed=signed,
                              group_size=group_size, backend="interpret", layout_tile=16)
  assert rel_err(got, np_matmul(x64, codes, scales, group_size=group_size)) < 1e-5
  with pytest.raises(ValueError, match="word rows do not hold"):
    kernels.packed_matmul(x, words, jnp.asarray(scales), bits=bits, signed=signed,
                          group_size=group_size, backend="interpret")
