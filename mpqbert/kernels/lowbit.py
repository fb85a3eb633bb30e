"""`x @ W` for a weight W stored as packed low-bit codes (`packing`), as a Pallas kernel.

`W[k, n] = scale[g(k), n] * (code[k, n] - zero_point[g(k), n])`, where `g(k) = k // group_size`
(per-(K-group, N) scales) or `g = 0` (per-output-channel scales, `group_size=None`); zero points are
optional (symmetric formats have none).

The kernel's grid runs over (M tiles, N tiles, K splits); each program loops over its split's
tiles of `block_k_words` word rows of its weight column block, and for every bit-plane j of the
tile shifts and masks the words into codes, multiplies them with the activations of that plane
(`x` is reordered once to `[planes, M, K_w]`, so the plane's slice is contiguous) and accumulates
in float32. Per-channel scales and the zero-point correction `scale * zero * sum_k x` are applied
once at the end; K-group scales per plane and tile (a tile never straddles a group: `group_size`
must be a multiple of the tile and divide `K_w`). The epilogue is linear, so K splits (more
programs when M is small and few N tiles would leave most of a GPU idle) write partial outputs
that are summed afterwards. M, N and K_w are padded to whole tiles and the padding sliced off.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mpqbert.kernels import compat, packing

Array = jax.Array
INPUT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _check_inputs(x: Array, w_packed: Array, scales: Array, zero_points: Array | None,
                  bits: int, group_size: int | None, layout_tile: int | None) -> tuple[int, int]:
  """Validates shapes and dtypes; returns (K, number of scale groups)."""
  packing.check_bits(bits)
  if x.dtype not in INPUT_DTYPES:
    raise TypeError(f"packed_matmul takes float32, bfloat16 or float16 activations, got {x.dtype}.")
  if w_packed.dtype != jnp.uint32 or w_packed.ndim != 2:
    raise TypeError(f"w_packed must be a [K_w, N] uint32 array (packing.pack), got "
                    f"{w_packed.dtype}{list(w_packed.shape)}.")
  k, (rows, n) = x.shape[-1], w_packed.shape
  packing.check_rows(rows, k, bits, layout_tile)
  groups = 1
  if group_size is not None:
    if k % group_size or rows % group_size:
      raise ValueError(f"group_size={group_size} must divide K={k} and the {rows} word rows per "
                       "bit-plane, so that no K-group straddles two planes; use per-channel "
                       "scales (group_size=None) or a group size that divides both.")
    groups = k // group_size
  expected = (n,) if group_size is None and scales.ndim == 1 else (groups, n)
  if scales.shape != expected:
    raise ValueError(f"scales have shape {scales.shape}, expected {expected} for N={n}"
                     f"{'' if group_size is None else f' and {groups} K-groups of {group_size}'}.")
  if zero_points is not None and zero_points.shape != scales.shape:
    raise ValueError(f"zero_points {zero_points.shape} must match scales {scales.shape}.")
  return k, groups


def dequantize(w_packed: Array, scales: Array, *, bits: int, k: int, signed: bool = True,
               zero_points: Array | None = None, group_size: int | None = None,
               layout_tile: int | None = None) -> Array:
  """The float32 `[K, N]` weight a packed matrix stands for."""
  codes = packing.unpack(w_packed, bits, k, signed=signed, tile=layout_tile).astype(jnp.float32)
  s = scales.reshape(-1, scales.shape[-1]).astype(jnp.float32)
  z = jnp.zeros_like(s) if zero_points is None else zero_points.reshape(s.shape)
  rows = k if group_size is None else group_size
  return jnp.repeat(s, rows, axis=0) * (codes - jnp.repeat(z.astype(jnp.float32), rows, axis=0))


def _kernel(x_ref, w_ref, s_ref, z_ref, o_ref, *, bits: int, signed: bool, planes: int,
            plane_rows: int, block_k_words: int, k_tiles: int, group_size: int | None,
            precision):
  """One (M tile, N tile, K split): loop over its K tiles, unpack each bit-plane, dot,
  accumulate; `o_ref` is this split's partial output `[1, block_m, block_n]`."""
  _, block_m, block_n = o_ref.shape
  compute_dtype = x_ref.dtype
  with_zero = z_ref is not None
  first_tile = pl.program_id(2) * k_tiles

  def body(t, carry):
    acc, xsum = carry
    start = pl.multiple_of((first_tile + t) * block_k_words, block_k_words)
    words = w_ref[pl.ds(start, block_k_words), :]
    for j in range(planes):
      xj = x_ref[j, :, pl.ds(start, block_k_words)]
      codes = packing.extract_plane(words, j, bits, signed=signed).astype(compute_dtype)
      part = jnp.dot(xj, codes, preferred_element_type=jnp.float32, precision=precision)
      if group_size is None:
        acc += part
        if with_zero:
          xsum += jnp.sum(xj.astype(jnp.float32), axis=1, keepdims=True)
      else:  # The tile lies in one K-group; padded tiles past K reuse the last (their x is 0).
        g = jnp.minimum((j * plane_rows + start) // group_size, s_ref.shape[0] - 1)
        s = s_ref[pl.ds(g, 1), :]
        acc += part * s
        if with_zero:
          acc -= (s * z_ref[pl.ds(g, 1), :]) * jnp.sum(xj.astype(jnp.float32), axis=1,
                                                        keepdims=True)
    return acc, xsum

  init = (jnp.zeros((block_m, block_n), jnp.float32), jnp.zeros((block_m, 1), jnp.float32))
  acc, xsum = jax.lax.fori_loop(0, k_tiles, body, init)
  if group_size is None:
    s = s_ref[pl.ds(0, 1), :]
    acc = acc * s - (s * z_ref[pl.ds(0, 1), :]) * xsum if with_zero else acc * s
  o_ref[0] = acc


def kernel_tile(backend: str) -> int | None:
  """Word rows per tile that a weight laid out for `backend`'s kernel is padded to
  (`packing.pack(..., tile=)`): 16 on GPU (Triton and its interpreter; the smallest K tile its dot
  takes), 128 on TPU (a lane width); None where no kernel runs (the reference)."""
  return {"triton": 16, "interpret": 16, "mosaic_tpu": 128, "tpu_interpret": 128}.get(backend)


def _default_block_k_words(rows: int, group_size: int | None, tpu: bool) -> int:
  """Word rows per K tile: 128 on TPU (a lane width); on GPU the largest of 32 and 16 that
  divides K_w (no weight padding), else 32. Not 8: Triton's dot needs K >= 16 (8-row tiles gave
  twice the product on an H200, though the interpreter got them right). Within a K-group when
  there are groups."""
  if tpu:
    tile = 128
  else:
    tile = next((t for t in (32, 16) if rows % t == 0), 32)
  while group_size is not None and group_size % tile and tile > 1:
    tile //= 2
  return tile


def _default_k_splits(output_tiles: int, k_tiles: int, tpu: bool, target: int = 128) -> int:
  """K splits so that about `target` programs run (a GPU has ~100+ SMs; the closest in ratio);
  1 on TPU. A divisor of `k_tiles`, so that every split gets whole tiles and the weight is never
  padded per call (at K=768, 4 bits: 3 tiles; 2 splits padded 96 word rows to 128, a copy of the
  whole weight)."""
  if tpu or output_tiles >= target:
    return 1
  divisors = [d for d in range(1, k_tiles + 1) if k_tiles % d == 0]
  return min(divisors, key=lambda d: (abs(math.log(output_tiles * d / target)), d))


def tiling(m: int, n: int, rows: int, *, group_size: int | None, tpu: bool,
           block_m: int | None = None, block_n: int | None = None,
           block_k_words: int | None = None, k_splits: int | None = None
           ) -> tuple[int, int, int, int, int]:
  """(block_m, block_n, block_k_words, K tiles, K splits) of an `[m, K] @ [rows words, n]` call:
  the given tiles, defaults for the rest. K tiles cover the weight's rows, padded up to whole
  tiles per split only when a given `block_k_words` or `k_splits` asks for it."""
  block_m = block_m or min(compat.power_of_two_at_least(m, 8 if tpu else 16), 64)
  block_n = block_n or min(compat.power_of_two_at_least(n, 128 if tpu else 16), 128)
  block_k_words = block_k_words or _default_block_k_words(rows, group_size, tpu)
  compat.check_tiles(block_m=block_m, block_n=block_n, block_k_words=block_k_words)
  if group_size is not None and group_size % block_k_words:
    raise ValueError(f"block_k_words={block_k_words} must divide group_size={group_size}.")
  k_tiles = -(-rows // block_k_words)
  splits = k_splits or _default_k_splits(-(-m // block_m) * -(-n // block_n), k_tiles, tpu)
  if k_tiles % splits:
    k_tiles += splits - k_tiles % splits  # Whole tiles per split; the extra ones are padding.
  return block_m, block_n, block_k_words, k_tiles, splits


def _pad_to(a: Array, axis: int, multiple: int) -> Array:
  pad = -a.shape[axis] % multiple
  if not pad:
    return a
  widths = [(0, 0)] * a.ndim
  widths[axis] = (0, pad)
  return jnp.pad(a, widths)


@functools.partial(jax.jit, static_argnames=("bits", "signed", "group_size", "out_dtype", "backend",
                                             "block_m", "block_n", "block_k_words", "k_splits",
                                             "layout_tile"))
def packed_matmul(x: Array, w_packed: Array, scales: Array, *, bits: int, signed: bool = True,
                  zero_points: Array | None = None, group_size: int | None = None,
                  out_dtype=None, backend: str = "auto", block_m: int | None = None,
                  block_n: int | None = None, block_k_words: int | None = None,
                  k_splits: int | None = None, layout_tile: int | None = None) -> Array:
  """`x [..., K] @ W [K, N]` with W packed by `packing.pack` along K (see the module docstring).

  Args:
    x: activations, float32, bfloat16 or float16; the dot runs in this type, accumulating in
      float32.
    w_packed: `[K_w, N]` uint32.
    scales: `[N]` (per output channel) or `[K // group_size, N]`.
    bits, signed: the code format (`packing`).
    zero_points: optional, shaped like `scales`: `W = scale * (code - zero_point)`.
    group_size: K rows per scale group; None for per-channel scales.
    out_dtype: defaults to x's dtype.
    backend: see `compat` ("auto", "triton", "mosaic_tpu", "interpret", "tpu_interpret",
      "reference").
    block_m, block_n, block_k_words: tile sizes (powers of two; defaults fit the backend).
    k_splits: programs along K whose partial outputs are summed (default: enough programs to
      fill a GPU at small M; 1 on TPU).
    layout_tile: None for a weight of `packing.word_rows` rows (as files store it); a tile size
      for one laid out in whole tiles of word rows (`packing.pack(..., tile=)`), which no call
      pads.
  """
  k, groups = _check_inputs(x, w_packed, scales, zero_points, bits, group_size, layout_tile)
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  backend = compat.resolve_backend(backend)
  lead, n = x.shape[:-1], w_packed.shape[1]
  if backend == "reference":
    w = dequantize(w_packed, scales, bits=bits, k=k, signed=signed, zero_points=zero_points,
                   group_size=group_size, layout_tile=layout_tile)
    y = jnp.dot(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
    return y.astype(out_dtype)

  planes, rows = packing.values_per_word(bits), w_packed.shape[0]
  x2 = x.reshape(-1, k)
  m = x2.shape[0]
  if m == 0:
    return jnp.zeros((*lead, n), out_dtype)
  block_m, block_n, block_k_words, k_tiles, splits = tiling(
      m, n, rows, group_size=group_size, tpu=backend in ("mosaic_tpu", "tpu_interpret"),
      block_m=block_m, block_n=block_n, block_k_words=block_k_words, k_splits=k_splits)
  # Activations in the weight's plane order: plane j holds x[:, j * rows:(j + 1) * rows].
  xp = jnp.pad(x2, ((0, 0), (0, planes * rows - k))).reshape(m, planes, rows).transpose(1, 0, 2)
  xp = _pad_to(_pad_to(xp, 1, block_m), 2, block_k_words * k_tiles)
  wp = _pad_to(_pad_to(w_packed, 0, block_k_words * k_tiles), 1, block_n)
  s = _pad_to(scales.reshape(groups, n).astype(jnp.float32), 1, block_n)
  operands = [xp, wp, s]
  if zero_points is not None:
    operands.append(_pad_to(zero_points.reshape(groups, n).astype(jnp.float32), 1, block_n))
  m_pad, k_pad, n_pad = xp.shape[1], xp.shape[2], wp.shape[1]
  precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
  kernel = functools.partial(
      _kernel, bits=bits, signed=signed, planes=planes, plane_rows=rows,
      block_k_words=block_k_words, k_tiles=k_tiles // splits, group_size=group_size,
      precision=precision)
  if zero_points is None:
    kernel = functools.partial(lambda f, x_ref, w_ref, s_ref, o_ref: f(x_ref, w_ref, s_ref, None,
                                                                       o_ref), kernel)
  in_specs = [pl.BlockSpec((planes, block_m, k_pad), lambda i, j, s: (0, i, 0)),
              pl.BlockSpec((k_pad, block_n), lambda i, j, s: (0, j)),
              pl.BlockSpec((groups, block_n), lambda i, j, s: (0, j))]
  in_specs += in_specs[2:] if zero_points is not None else []
  partials = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((splits, m_pad, n_pad), jnp.float32),
      grid=(m_pad // block_m, n_pad // block_n, splits),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((1, block_m, block_n), lambda i, j, s: (s, i, j)),
      name=f"packed_matmul_{bits}bit",
      # 16 planes (2-bit) at block_m 64 ask 237 KB of shared memory with 3 pipeline stages, over
      # the 232 KB of an H100/H200 (seen on an H200): 2 stages there.
      **compat.pallas_call_options(backend, parallel_axes=3, num_stages=2 if planes >= 16 else 3),
  )(*operands)
  y = partials[0] if splits == 1 else jnp.sum(partials, axis=0)
  return y[:m, :n].astype(out_dtype).reshape(*lead, n)
