r"""One matmul in float32, bfloat16 (float32 accumulation) and int8 x int8 -> int32 on this
machine's default JAX backend: what the int8 layout (`export.lay_out`) can gain at most; and, for
1-bit weights with binarized inputs, the two ways to compute the +-1 product: the int8 dot of the
signs (what `lay_out` runs) against XNOR-popcount on sign words packed 32 to a uint32
(`kernels.xnor_matmul`, its XLA path: `lax.population_count` per word).

  python experiments/bench_int8_dot.py                      # MiniLM's shapes at 32 x 128 tokens
  python experiments/bench_int8_dot.py --shapes=4096x384x1536 --rounds=10

Timed rounds alternate between the four; prints the minimum and median times (ms) of each and
the float32 median over each other median. Before timing, the popcount product is checked equal
to the int8 dot of the same signs. Writes nothing unless --out is given (JSON).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from mpqbert.kernels import binary

_SHAPES = flags.DEFINE_list("shapes", ["4096x384x1536", "4096x1536x384", "4096x384x384",
                                       "128x384x1536", "128x1536x384", "128x384x384"],
                            "MxKxN of [M, K] x [K, N].")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Alternating timed rounds.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Calls per dot and round.")
_OUT = flags.DEFINE_string("out", None, "Optional JSON output path.")
_DOT = (((1,), (0,)), ((), ()))


def _dots() -> dict[str, tuple[jnp.dtype, jnp.dtype]]:
  """name -> (operand dtype, accumulation dtype)."""
  return {"float32": (jnp.float32, jnp.float32), "bfloat16": (jnp.bfloat16, jnp.float32),
          "int8": (jnp.int8, jnp.int32)}


def _time_ms(fn, *args) -> list[float]:
  out = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    out.append((time.perf_counter() - start) * 1e3)
  return out


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  rows = []
  for shape in _SHAPES.value:
    m, k, n = (int(v) for v in shape.split("x"))
    a, b = rng.integers(-127, 128, (m, k)), rng.integers(-127, 128, (k, n))
    runs = {}
    for name, (dtype, acc) in _dots().items():
      fn = jax.jit(lambda x, y, acc=acc: jax.lax.dot_general(x, y, _DOT,
                                                             preferred_element_type=acc))
      args = (jnp.asarray(a, dtype), jnp.asarray(b, dtype))
      jax.block_until_ready(fn(*args))  # compile
      runs[name] = (fn, args)
    signs = np.where(rng.standard_normal((m, k)) >= 0, 1, -1), np.where(
        rng.standard_normal((k, n)) >= 0, 1, -1)
    words = (binary.pack_signs(jnp.asarray(signs[0], jnp.float32)),
             binary.pack_signs(jnp.asarray(signs[1], jnp.float32), axis=0))
    popcount = jax.jit(lambda x, w, k=k: binary.xnor_matmul(x, w, k, backend="reference"))
    want = signs[0].astype(np.int64) @ signs[1].astype(np.int64)
    if not np.array_equal(np.asarray(popcount(*words)), want):
      raise AssertionError(f"{shape}: XNOR-popcount differs from the +-1 product")
    runs["xnor_popcount"] = (popcount, words)
    times = {name: [] for name in runs}
    for _ in range(_ROUNDS.value):
      for name, (fn, args) in runs.items():
        times[name] += _time_ms(fn, *args)
    medians = {name: statistics.median(t) for name, t in times.items()}
    row = {"shape": shape, **{f"{name}_min_ms": min(t) for name, t in times.items()},
           **{f"{name}_median_ms": v for name, v in medians.items()},
           **{f"float32_over_{name}": medians["float32"] / v for name, v in medians.items()
              if name != "float32"}}
    rows.append(row)
    print(f"{shape}: " + ", ".join(f"{name} {min(times[name]):.2f}/{medians[name]:.2f} ms"
                                   for name in runs) +
          f"; float32 / int8 {row['float32_over_int8']:.2f}x, float32 / bfloat16 "
          f"{row['float32_over_bfloat16']:.2f}x, popcount / int8 "
          f"{medians['xnor_popcount'] / medians['int8']:.2f}x", flush=True)
  if _OUT.value:
    report = {"rows": rows, "backend": jax.default_backend(),
              "device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "rounds": _ROUNDS.value, "repeats": _REPEATS.value}
    Path(_OUT.value).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
  app.run(main)
