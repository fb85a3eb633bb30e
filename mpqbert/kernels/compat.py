"""Which Pallas lowering runs a kernel, and the Pallas API differences between JAX versions.

Every version-dependent name the kernels use is resolved here and nowhere else:

  * compiler parameters: `pltpu.CompilerParams` / Triton `CompilerParams` (JAX >= 0.7) were
    `pltpu.TPUCompilerParams` / `plgpu.TritonCompilerParams` before;
  * TPU interpret mode: `interpret=pltpu.InterpretParams()` (JAX >= 0.7; before: `TPUInterpretParams`);
  * `pl.load` / `pl.store` are gone from `pallas` (JAX >= 0.8); kernels index refs instead.

Backends (`backend=` of the kernels):
  "auto"           the default: "triton" on GPU, "mosaic_tpu" on TPU, "reference" on CPU (where
                   interpreted kernels are for testing, not speed);
  "triton"         GPU through Triton (deprecated by JAX 0.11 in favour of Mosaic GPU, still the
                   lowering that takes a plain grid/BlockSpec kernel on every NVIDIA generation);
  "mosaic_tpu"     TPU;
  "interpret"      Pallas's generic interpreter, on any backend (CPU tests);
  "tpu_interpret"  the TPU lowering's semantics interpreted on CPU (`pltpu.InterpretParams`);
  "reference"      the pure-jnp reference instead of a kernel.
"""

from __future__ import annotations

from typing import Any

import jax

BACKENDS = ("auto", "triton", "mosaic_tpu", "interpret", "tpu_interpret", "reference")


def resolve_backend(backend: str) -> str:
  """`backend` with "auto" replaced by what the default JAX device runs."""
  if backend not in BACKENDS:
    raise ValueError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS}.")
  if backend != "auto":
    return backend
  return {"gpu": "triton", "tpu": "mosaic_tpu"}.get(jax.default_backend(), "reference")


def _tpu_module():
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  return pltpu


def _first_attr(module: Any, *names: str) -> Any:
  for name in names:
    if hasattr(module, name):
      return getattr(module, name)
  raise ImportError(f"this JAX ({jax.__version__}) has none of {names} in {module.__name__}; "
                    "mpqbert's kernels support JAX 0.6 to 0.11.")


def pallas_call_options(backend: str, *, num_warps: int = 4, num_stages: int = 3,
                        parallel_axes: int = 2) -> dict[str, Any]:
  """`interpret=` and `compiler_params=` of `pl.pallas_call` for a resolved backend.

  `parallel_axes`: leading grid axes with independent iterations (TPU dimension semantics).
  """
  if backend == "interpret":
    return {"interpret": True}
  if backend == "tpu_interpret":
    pltpu = _tpu_module()
    return {"interpret": _first_attr(pltpu, "InterpretParams", "TPUInterpretParams")()}
  if backend == "mosaic_tpu":
    pltpu = _tpu_module()
    params = _first_attr(pltpu, "CompilerParams", "TPUCompilerParams")
    return {"compiler_params": params(dimension_semantics=("parallel",) * parallel_axes)}
  if backend == "triton":
    try:
      from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
      params = _first_attr(pltriton, "CompilerParams")
    except ImportError:
      from jax.experimental.pallas import gpu as plgpu  # pylint: disable=g-import-not-at-top
      params = _first_attr(plgpu, "TritonCompilerParams")
    return {"compiler_params": params(num_warps=num_warps, num_stages=num_stages)}
  raise ValueError(f"backend {backend!r} has no Pallas lowering.")


def power_of_two_at_least(n: int, floor: int = 1) -> int:
  """Smallest power of two >= max(n, floor); Triton tiles must be powers of two."""
  n = max(int(n), floor)
  return 1 << (n - 1).bit_length()


def check_tiles(**tiles: int) -> None:
  """Tile sizes must be positive powers of two (Triton's rule; harmless elsewhere)."""
  for name, size in tiles.items():
    if size < 1 or size & (size - 1):
      raise ValueError(f"{name}={size} must be a power of two.")
