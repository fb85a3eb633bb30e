r"""Speed of the packed low-bit kernels against XLA's bfloat16 matmul, one GEMM at a time, on a GPU.

For each weight shape K x N (BERT-base: 768x768, 768x3072, 3072x768; and 4096x4096) and each M
(1, 8, 32, 128, 512 rows of activations), side by side in the same run:

  bf16       jnp.dot(x bf16 [M, K], w bf16 [K, N]) (XLA's own GEMM: the baseline)
  packed8/4/2  kernels.packed_matmul(x bf16, w packed [K_w, N] uint32, scales [N]) at 8/4/2 bits
  xnor       kernels.xnor_matmul(x words [M, K/32], w words [K/32, N], K): activations already
             packed into sign words (the timed call is the matmul only)
  xnor+pack  the same with pack_signs(x bf16) inside the timed call
  int8       W8A8 through XLA: x bf16 quantized to int8 with one scale, an int8 [K, N] weight,
             lax.dot_general int8 x int8 -> int32, one epilogue scaling to bf16 (what
             export.lay_out(packed, "int8") runs per matrix; tensor-core IMMA on GPUs)

Timing: every method's call is jitted into a block of R calls on R distinct (x, w) pairs, chained
by optimization barriers (each call waits for the previous one's output, as layers of a model do,
so XLA can neither merge nor horizontally fuse them); R is chosen so that the block's weights
and activations span >= --rotate_mib (default 256 MiB, 5x the 50 MB L2 of an H100), capped at
--max_unroll, so that weights are read from HBM, not L2, except where the cap leaves the rotating
set small (the "rotating MiB" column). One timed sample = time.perf_counter around the block call
and jax.block_until_ready, divided by R; samples of all methods of a (shape, M) alternate, after a
warm-up, and the median is reported. Speed-up = median bf16 time / median method time of the same
(shape, M). Bytes moved = weight operand (packed words + scales) + activations + output;
achieved bandwidth as a fraction of the card's copy bandwidth, measured in the same run (median
time of `a + 1` on a 1 GiB float32 array, counting read + write). "ideal" = bf16 bytes / method
bytes, the memory-bound limit (-> 16 / bits at small M: 2x at 8 bits, 4x at 4, 8x at 2, 16x at 1).
Every case is checked before it is timed, on its first block's first output: packed_matmul
against backend="reference" (float32 dot with the dequantized weight; max error <= 2% of
max |reference|), xnor_matmul exactly against the float32 dot of the +-1 matrices. A mismatch is
not timed, is marked in the tables, and makes the script exit with status 1.

  python experiments/kernel_bench.py            # GPU: 120 timed cases; ~3-5 min on an H100 by
                                                # estimate (not yet measured), mostly compiling
                                                # 100 kernel variants; --budget_s starts no new
                                                # (shape, M) after 6 min
  python experiments/kernel_bench.py --dry-run  # the cases, unrolls and bytes; runs nothing (~2 s)
  python experiments/kernel_bench.py --check --ms=1 --shapes=768x768   # CPU: ~20 s (M 1, 8: ~30 s)

Writes experiments/results/kernel_bench.{md,csv} (rewritten after every (shape, M), so a killed run
leaves what it measured). On a CPU it refuses to time (interpret mode is not speed); --check runs
only the correctness pass there (backend "interpret", M in {1, 8}, 768x768 unless given), plus a
lowering of each kernel to Triton for CUDA, and writes nothing.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import math
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mpqbert.kernels import binary, compat, packing  # noqa: E402
from mpqbert.kernels.lowbit import dequantize, packed_matmul  # noqa: E402

SHAPES = "768x768,768x3072,3072x768,4096x4096"
MS = "1,8,32,128,512"
METHODS = ("bf16", "int8", "packed8", "packed4", "packed2", "xnor", "xnor+pack")
CHECK_MS = "1,8"
CHECK_SHAPES = "768x768"
TILE_KEYS = ("block_m", "block_n", "block_k_words")
REL_TOL = 2e-2  # packed: max |kernel - reference| <= REL_TOL * max |reference| (bf16 output).
GOAL = "4-bit at M<=16: speed-up >= 3x and >= 70% of copy bandwidth"
REFUSAL = ("no GPU/TPU: interpret-mode times are not speed; run on a GPU, or use --check to run "
           "the correctness pass in interpret mode")
L2_MIB = 50  # H100 / H200; only for the note on warm-cache rows.


@dataclasses.dataclass(frozen=True)
class Case:
  """One timed GEMM: x [m, k] times a [k, n] weight by `method`."""
  k: int
  n: int
  m: int
  method: str

  @property
  def shape(self) -> str:
    return f"{self.k}x{self.n}"

  @property
  def bits(self) -> int:
    return {"bf16": 16, "int8": 8, "packed8": 8, "packed4": 4, "packed2": 2}.get(self.method, 1)

  def nbytes(self) -> dict[str, int]:
    """Bytes of the weight operand, the activations and the output of one call."""
    k, n, m = self.k, self.n, self.m
    if self.method == "bf16":
      return {"weight": 2 * k * n, "act": 2 * m * k, "out": 2 * m * n}
    if self.method == "int8":
      return {"weight": k * n + 4 * n, "act": 2 * m * k, "out": 2 * m * n}
    words = packing.word_rows(k, self.bits)
    if self.method.startswith("packed"):
      return {"weight": 4 * words * n + 4 * n, "act": 2 * m * k, "out": 2 * m * n}
    act = 4 * m * words if self.method == "xnor" else 2 * m * k
    return {"weight": 4 * words * n, "act": act, "out": 4 * m * n}  # int32 dot products.

  def total_bytes(self) -> int:
    return sum(self.nbytes().values())

  def ideal(self) -> float:
    """Memory-bound speed-up limit over bf16: bytes(bf16) / bytes(method)."""
    return Case(self.k, self.n, self.m, "bf16").total_bytes() / self.total_bytes()

  def unroll(self, rotate_bytes: int, max_unroll: int, min_unroll: int = 4) -> int:
    """Calls per timed block: enough distinct operands to span `rotate_bytes`."""
    b = self.nbytes()
    return int(min(max_unroll, max(min_unroll, math.ceil(rotate_bytes / (b["weight"] + b["act"])))))


def _ints(text: str) -> list[int]:
  return [int(v) for v in text.split(",") if v.strip()]


def _shapes(text: str) -> list[tuple[int, int]]:
  out = []
  for item in text.split(","):
    k, n = item.strip().lower().split("x")
    out.append((int(k), int(n)))
  return out


def _tiles(text: str | None) -> dict[str, int]:
  """`block_m=16,block_n=64,block_k_words=32` -> kwargs of the kernels."""
  tiles = {}
  for item in (text or "").split(","):
    if not item.strip():
      continue
    key, value = item.split("=")
    if key.strip() not in TILE_KEYS:
      raise SystemExit(f"--tile keys are {TILE_KEYS}, got {key!r}.")
    tiles[key.strip()] = int(value)
  return tiles


def _git_commit() -> str:
  try:
    run = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, check=True,
                                    cwd=REPO).stdout.strip()
    commit = run("rev-parse", "HEAD")
    return commit + ("+dirty" if run("status", "--porcelain", "--untracked-files=no") else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def _median_s(fn: Callable[[], Any], reps: int, warmup: int = 2) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def copy_bandwidth(mib: int, reps: int = 20) -> float:
  """Bytes/s of `a + 1` on a `mib` MiB float32 device array (read + write)."""
  a = jnp.ones((mib * 2**20 // 4,), jnp.float32)
  f = jax.jit(lambda a: a + 1)
  t = _median_s(lambda: f(a), reps)
  return 2 * mib * 2**20 / t


def dispatch_overhead(reps: int = 50) -> float:
  """Seconds of a jitted call on a 1-element array + block_until_ready (host + launch + sync)."""
  a = jnp.ones((1,), jnp.float32)
  f = jax.jit(lambda a: a + 1)
  return _median_s(lambda: f(a), reps, warmup=5)


# --- The methods: inputs, the call, the correctness check. --------------------------------


def _call(case: Case, backend: str, tiles: dict[str, int]) -> Callable:
  """`call(x, w, aux)` of one GEMM of the case's method."""
  if case.method == "bf16":
    return lambda x, w, aux: jnp.dot(x, w)
  if case.method == "int8":
    return w8a8_matmul
  if case.method.startswith("packed"):
    return lambda x, w, s: packed_matmul(x, w, s, bits=case.bits, backend=backend, **tiles)
  xt = {k: v for k, v in tiles.items() if k != "block_k_words"}
  if case.method == "xnor":
    return lambda xw, w, aux: binary.xnor_matmul(xw, w, case.k, backend=backend, **xt)
  return lambda x, w, aux: binary.xnor_matmul(binary.pack_signs(x, -1), w, case.k,
                                              backend=backend, **xt)


def w8a8_matmul(x: jax.Array, w: jax.Array, aux: tuple[jax.Array, jax.Array]) -> jax.Array:
  """bf16 x [M, K] -> int8 with the scalar scale aux[0]; int8 dot with w [K, N]; x aux[1] [N]."""
  act_scale, col_scales = aux
  xq = jnp.clip(jnp.round(x.astype(jnp.float32) / act_scale), -127, 127).astype(jnp.int8)
  acc = jax.lax.dot_general(xq, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
  return (acc.astype(jnp.float32) * (act_scale * col_scales)).astype(jnp.bfloat16)


def _inputs(case: Case, count: int, seed: int = 0) -> tuple[list, list, Any, Any]:
  """`count` distinct (x, w) operands and the shared aux (scales); the first w from real codes.

  Returns (xs, ws, aux, codes of ws[0] or None). Later weights are random words: every bit
  pattern is a valid code of every packed format.
  """
  k, n, m = case.k, case.n, case.m
  keys = jax.random.split(jax.random.key(seed), 2 * count + 2)
  xs = [jax.random.normal(keys[i], (m, k), jnp.bfloat16) for i in range(count)]
  if case.method == "xnor":
    xs = [binary.pack_signs(x, -1) for x in xs]
  if case.method == "bf16":
    ws = [jax.random.normal(keys[count + i], (k, n), jnp.bfloat16) / math.sqrt(k)
          for i in range(count)]
    return xs, ws, None, None
  if case.method == "int8":
    ws = [jax.random.randint(keys[count + i], (k, n), -127, 128, jnp.int32).astype(jnp.int8)
          for i in range(count)]
    aux = (jnp.float32(4.0 / 127),  # Standard-normal activations: clip at 4 sigma.
           jax.random.uniform(keys[-2], (n,), jnp.float32, 0.5, 1.5) / (math.sqrt(k) * 127))
    return xs, ws, aux, ws[0]
  lo, hi = packing.code_range(case.bits, True)
  codes = jax.random.randint(keys[-1], (k, n), lo, hi + 1, jnp.int32)
  if case.bits == 1:
    codes = jnp.where(codes > 0, 1, -1)
  words = packing.word_rows(k, case.bits)
  ws = [packing.pack(codes, case.bits, signed=True)]
  ws += [jax.random.bits(keys[count + i], (words, n), jnp.uint32) for i in range(1, count)]
  aux = None
  if case.method.startswith("packed"):
    aux = jax.random.uniform(keys[-2], (n,), jnp.float32, 0.5, 1.5) / (math.sqrt(k) * 2**case.bits)
  return xs, ws, aux, codes


@functools.partial(jax.jit, static_argnames=("bits",))
def _roundtrip_err(w: jax.Array, scales: jax.Array, codes: jax.Array, *, bits: int) -> jax.Array:
  """max |dequantize(w) - scales * codes| / max |scales * codes|."""
  want = scales * codes.astype(jnp.float32)
  got = dequantize(w, scales, bits=bits, k=codes.shape[0])
  return jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))


@functools.partial(jax.jit, static_argnames=("k",))
def _unpack_signs(words: jax.Array, *, k: int) -> jax.Array:
  return packing.unpack(words, 1, k, signed=True).astype(jnp.float32)


def check(case: Case, y: Any, x0: Any, w0: Any, aux: Any, codes: Any) -> tuple[bool, str]:
  """The kernel's output `y` on (x0, w0) against a float32 reference; (ok, description)."""
  if case.method == "bf16":
    return True, "baseline"
  y = np.asarray(y, np.float32)
  if case.method == "int8":  # float64 NumPy: the same quantized activations, exact integer dot.
    act_scale, col_scales = (np.asarray(a, np.float64) for a in aux)
    x64 = np.asarray(jnp.asarray(x0, jnp.float32), np.float64)
    xq = np.clip(np.round(x64 / act_scale), -127, 127)
    ref = (xq @ np.asarray(codes, np.float64)) * (act_scale * col_scales)
    err, scale = float(np.max(np.abs(y - ref))), float(np.max(np.abs(ref)))
    ok = bool(np.all(np.isfinite(y))) and y.shape == ref.shape and err <= REL_TOL * scale
    return ok, f"max err {err:.3g} vs max |ref| {scale:.3g} (tol {REL_TOL:.0%})"
  if case.method.startswith("packed"):
    ref = np.asarray(packed_matmul(x0, w0, aux, bits=case.bits, backend="reference",
                                   out_dtype=jnp.float32))
    # The reference must decode the codes we packed: dequantize(pack(codes)) == scales * codes.
    if float(_roundtrip_err(w0, aux, codes, bits=case.bits)) > 1e-6:
      return False, "pack/dequantize round trip differs from the codes"
    err, scale = float(np.max(np.abs(y - ref))), float(np.max(np.abs(ref)))
    ok = bool(np.all(np.isfinite(y))) and y.shape == ref.shape and err <= REL_TOL * scale
    return ok, f"max err {err:.3g} vs max |ref| {scale:.3g} (tol {REL_TOL:.0%})"
  x_signs = jnp.where(x0 >= 0, 1.0, -1.0) if case.method == "xnor+pack" else None
  if case.method == "xnor":  # Decode the words we time back to +-1 activations.
    x_signs = _unpack_signs(x0.T, k=case.k).T
  ref = np.asarray(jnp.dot(x_signs, codes.astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)).round().astype(np.int64)
  bad = int(np.sum(y.astype(np.int64) != ref)) if y.shape == ref.shape else -1
  return bad == 0, f"{bad} of {ref.size} +-1 dot products differ" if bad else "exact"


def _block(call: Callable, count: int) -> Callable:
  """Jitted `count` calls on distinct operands, each waiting for the previous output."""
  def block(xs, ws, aux):
    outs, x, w = [], xs[0], ws[0]
    for i in range(count):
      y = call(x, w, aux)
      outs.append(y)
      if i + 1 < count:
        x, w, _ = jax.lax.optimization_barrier((xs[i + 1], ws[i + 1], y))
    return outs
  return jax.jit(block)


# --- Running. -----------------------------------------------------------------------------


def cases_of(args: argparse.Namespace) -> list[Case]:
  """(M outer, so the small-M rows the goal is about come first; shape; method)."""
  return [Case(k, n, m, method) for m in args.ms for k, n in args.shapes for method in args.methods]


def dry_run(args: argparse.Namespace) -> None:
  rotate = args.rotate_mib * 2**20
  print(f"{'shape':>10} {'M':>4} {'method':>10} {'bytes/call':>11} {'ideal':>6} {'unroll':>6} "
        f"{'rotating MiB':>12}")
  cases = cases_of(args)
  for c in cases:
    r = c.unroll(rotate, args.max_unroll)
    b = c.nbytes()
    print(f"{c.shape:>10} {c.m:>4} {c.method:>10} {c.total_bytes():>11,} {c.ideal():>5.2f}x "
          f"{r:>6} {r * (b['weight'] + b['act']) / 2**20:>12.1f}")
  kernels = sum(c.method != "bf16" for c in cases)
  print(f"{len(cases)} cases in {len(cases) // max(len(args.methods), 1)} (shape, M) groups; "
        f"{kernels} Pallas kernel variants to compile (+ {len(cases) - kernels} bf16 dots and "
        f"the references); backend {args.backend}; tiles {args.tile or 'defaults'}.")


def run_check(args: argparse.Namespace) -> int:
  """Correctness only (no timing, nothing written); on CPU in interpret mode."""
  cpu = jax.default_backend() == "cpu"
  backend = "interpret" if cpu and args.backend == "auto" else args.backend
  resolved = compat.resolve_backend(backend)
  print(f"correctness pass: backend {resolved} on {jax.devices()[0].device_kind} "
        f"(jax {jax.__version__}); nothing is timed or written.", flush=True)
  failures = 0
  for case in cases_of(args):
    if case.method == "bf16":
      continue
    start = time.perf_counter()
    call = _call(case, resolved, args.tile)
    try:
      xs, ws, aux, codes = _inputs(case, 1)
      ok, info = check(case, jax.jit(call)(xs[0], ws[0], aux), xs[0], ws[0], aux, codes)
      verdict = "ok" if ok else "MISMATCH"
    except Exception as e:  # pylint: disable=broad-except
      ok, info, verdict = False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", "ERROR"
    line = f"{case.shape:>10} M={case.m:<4} {case.method:>10}: {verdict} ({info})"
    if cpu:  # The GPU lowering of the same call, without a GPU.
      lowered = _lower_triton(case, args.tile)
      line += f"; triton lowering {lowered}"
      ok = ok and lowered == "ok"
    print(f"{line} [{time.perf_counter() - start:.1f} s]", flush=True)
    failures += not ok
  print("ALL OK" if not failures else f"!!! {failures} case(s) failed", flush=True)
  return 1 if failures else 0


def _lower_triton(case: Case, tiles: dict[str, int]) -> str:
  """Lowers the case's kernel call for CUDA (Pallas -> Triton IR) on any host."""
  try:
    xs, ws, aux, _ = jax.eval_shape(lambda: _inputs(case, 1))
    jax.jit(_call(case, "triton", tiles)).trace(xs[0], ws[0], aux).lower(
        lowering_platforms=("cuda",))
    return "ok"
  except Exception as e:  # pylint: disable=broad-except
    return f"FAILED ({type(e).__name__}: {str(e).splitlines()[0][:200]})"


def time_group(cases: list[Case], args: argparse.Namespace, backend: str) -> list[dict]:
  """Checks, compiles and times the methods of one (shape, M), samples alternating."""
  rotate = args.rotate_mib * 2**20
  states, rows = [], []
  for case in cases:
    row = {"shape": case.shape, "K": case.k, "N": case.n, "M": case.m, "method": case.method,
           "bits": case.bits, "bytes": case.total_bytes(), "ideal": case.ideal()}
    count = case.unroll(rotate, args.max_unroll)
    nb = case.nbytes()
    row.update(unroll=count, rotating_mib=count * (nb["weight"] + nb["act"]) / 2**20)
    try:
      start = time.perf_counter()
      call = _call(case, backend, args.tile)
      xs, ws, aux, codes = _inputs(case, count)
      fn = _block(call, count)
      outs = jax.block_until_ready(fn(xs, ws, aux))  # Compile + first run.
      row["compile_s"] = time.perf_counter() - start
      ok, info = check(case, outs[0], xs[0], ws[0], aux, codes)  # Before any timing.
      row["check"] = info
      del outs
      if not ok:
        row["status"] = "MISMATCH"
        print(f"  !! {case.shape} M={case.m} {case.method}: MISMATCH ({info})", flush=True)
      else:
        jax.block_until_ready(fn(xs, ws, aux))
        states.append((row, lambda fn=fn, xs=xs, ws=ws, aux=aux: fn(xs, ws, aux), count, []))
        row["status"] = "ok"
    except Exception as e:  # pylint: disable=broad-except
      row["status"] = f"ERROR {type(e).__name__}: {str(e).splitlines()[0][:160]}"
      print(f"  !! {case.shape} M={case.m} {case.method}: {row['status']}", flush=True)
      traceback.print_exc(limit=3)
    rows.append(row)
  start = time.perf_counter()
  for rep in range(args.reps):
    for _, fn, count, samples in states:
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      samples.append((time.perf_counter() - t0) / count)
    if rep + 1 >= args.min_reps and time.perf_counter() - start > args.group_s:
      break
  for row, _, _, samples in states:
    row.update(median_us=statistics.median(samples) * 1e6, min_us=min(samples) * 1e6,
               samples=len(samples))
    row["gbps"] = row["bytes"] / row["median_us"] / 1e3
  base = next((r for r in rows if r["method"] == "bf16" and "median_us" in r), None)
  for row in rows:
    if base and "median_us" in row:
      row["speedup"] = base["median_us"] / row["median_us"]
  return rows


def _fmt(v: Any, spec: str) -> str:
  return "" if v is None else format(v, spec)


def goal(rows: list[dict]) -> tuple[str, str]:
  """(verdict, detail) of GOAL over the 4-bit rows with M <= 16."""
  rel = [r for r in rows if r["method"] == "packed4" and r["M"] <= 16]
  if not rel:
    return "NOT EVALUATED", "no 4-bit rows with M <= 16 in this run"
  timed = [r for r in rel if "speedup" in r]
  bad = [r for r in rel if "speedup" not in r or r["speedup"] < 3 or r["frac_copy_bw"] < 0.7]
  detail = f"{len(rel) - len(bad)} of {len(rel)} rows meet it"
  if timed:
    s = min(timed, key=lambda r: r["speedup"])
    f = min(timed, key=lambda r: r["frac_copy_bw"])
    detail += (f"; worst speed-up {s['speedup']:.2f}x ({s['shape']}, M={s['M']}), worst "
               f"bandwidth {f['frac_copy_bw']:.0%} of copy ({f['shape']}, M={f['M']})")
  return ("MET" if not bad else "NOT MET"), detail


CSV_FIELDS = ["shape", "K", "N", "M", "method", "bits", "median_us", "min_us", "samples", "unroll",
              "rotating_mib", "speedup", "ideal", "bytes", "gbps", "frac_copy_bw", "compile_s",
              "status", "check", "device", "backend", "jax", "git_commit", "command"]


def write(rows: list[dict], meta: dict, out: Path, final: bool) -> None:
  """kernel_bench.csv (a row per case, with the run's metadata) and kernel_bench.md."""
  out.mkdir(parents=True, exist_ok=True)
  order = {m: i for i, m in enumerate(METHODS)}
  rows = sorted(rows, key=lambda r: (r["K"] * r["N"], r["K"], r["M"], order[r["method"]]))
  with open(out / "kernel_bench.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
      writer.writerow({**{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()},
                       **{k: meta[k] for k in ("device", "backend", "jax", "git_commit",
                                               "command")}})
  verdict, detail = goal(rows)
  lines = [
      "# Packed low-bit kernels vs XLA bf16 `jnp.dot`", "",
      f"Device **{meta['device']}** ({meta['platform']}), kernel backend `{meta['backend']}`, "
      f"jax {meta['jax']}, commit `{meta['git_commit']}`, tiles "
      f"{meta['tiles'] or 'kernel defaults'}.", f"Command: `{meta['command']}`", "",
      f"Copy bandwidth (median `a + 1` on {meta['copy_mib']} MiB float32, read + write): "
      f"**{meta['copy_gbps']:.0f} GB/s**. Dispatch + sync of an empty jitted call: "
      f"{meta['overhead_us']:.1f} us, paid once per timed block of `unroll` calls.", "",
      f"Goal: {GOAL}: **{verdict}** ({detail})." + ("" if final else " *(run incomplete)*"), "",
      "Times are medians per call over alternating timed blocks (see the script's docstring); "
      "speed-up is over the bf16 row of the same shape and M; `ideal` is bf16 bytes / method "
      "bytes (16/bits at small M); `% copy` is (weight + activation + output bytes) / time over "
      f"the copy bandwidth. Rows whose rotating set is under ~2x L2 ({L2_MIB} MB on H100/H200) "
      "may read weights from L2 and exceed 100%.", ""]
  for shape in dict.fromkeys(r["shape"] for r in rows):
    lines += [f"## {shape}", "",
              "| M | method | median us | speed-up | ideal | GB/s | % copy | unroll | rotating MiB "
              "| status |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in (r for r in rows if r["shape"] == shape):
      speed = f"{r['speedup']:.2f}x" if "speedup" in r else ""
      frac = f"{r['frac_copy_bw']:.0%}" if "frac_copy_bw" in r else ""
      lines.append(f"| {r['M']} | {r['method']} | {_fmt(r.get('median_us'), '.2f')} | {speed} | "
                   f"{r['ideal']:.2f}x | {_fmt(r.get('gbps'), '.0f')} | {frac} | {r['unroll']} | "
                   f"{r['rotating_mib']:.0f} | {r['status']} |")
    lines.append("")
  (out / "kernel_bench.md").write_text("\n".join(lines))


def run_bench(args: argparse.Namespace) -> int:
  backend = compat.resolve_backend(args.backend)
  if backend in ("interpret", "tpu_interpret"):
    raise SystemExit(f"backend {backend!r} interprets the kernel: its times are not speed.")
  t_start = time.perf_counter()
  device = jax.devices()[0]
  meta = {"device": device.device_kind, "platform": jax.default_backend(), "backend": backend,
          "jax": jax.__version__, "git_commit": _git_commit(), "tiles": args.tile,
          "command": " ".join(["python", "experiments/kernel_bench.py",
                               *map(shlex.quote, sys.argv[1:])]), "copy_mib": args.copy_mib}
  print(f"{meta['device']} ({meta['platform']}), backend {backend}, jax {meta['jax']}, "
        f"commit {meta['git_commit'][:12]}", flush=True)
  meta["copy_gbps"] = copy_bandwidth(args.copy_mib) / 1e9
  meta["overhead_us"] = dispatch_overhead() * 1e6
  print(f"copy bandwidth {meta['copy_gbps']:.0f} GB/s; dispatch + sync {meta['overhead_us']:.1f} "
        "us per block", flush=True)
  cases = cases_of(args)
  groups = list(dict.fromkeys((c.m, c.k, c.n) for c in cases))
  rows: list[dict] = []
  for gi, (m, k, n) in enumerate(groups):
    elapsed = time.perf_counter() - t_start
    if elapsed > args.budget_s:
      print(f"time budget --budget_s={args.budget_s} spent after {gi} of {len(groups)} groups; "
            "the rest is skipped.", flush=True)
      break
    group = [c for c in cases if (c.m, c.k, c.n) == (m, k, n)]
    new = time_group(group, args, backend)
    for r in new:
      if "gbps" in r:
        r["frac_copy_bw"] = r["gbps"] / meta["copy_gbps"]
      print(f"[{gi + 1:>2}/{len(groups)} {time.perf_counter() - t_start:5.0f} s] {r['shape']:>9} "
            f"M={m:<3} {r['method']:>9}: " + (
                f"{r['median_us']:9.2f} us  x{r.get('speedup', float('nan')):5.2f} "
                f"(ideal {r['ideal']:5.2f})  {r['frac_copy_bw']:4.0%} copy bw  "
                f"[unroll {r['unroll']}, compile {r.get('compile_s', 0):.1f} s]"
                if "median_us" in r else r["status"]), flush=True)
    rows += new
    write(rows, meta, args.out, final=False)
  final = len({(r["M"], r["K"], r["N"]) for r in rows}) == len(groups)
  write(rows, meta, args.out, final=final)
  verdict, detail = goal(rows)
  print(f"\nGoal: {GOAL}: {verdict} ({detail})")
  print(f"wrote {args.out / 'kernel_bench.md'} and kernel_bench.csv "
        f"({time.perf_counter() - t_start:.0f} s)")
  bad = [r for r in rows if r["status"] != "ok"]
  if bad:
    print(f"\n!!! {len(bad)} case(s) failed the correctness check or errored:", file=sys.stderr)
    for r in bad:
      print(f"!!!   {r['shape']} M={r['M']} {r['method']}: {r['status']} {r.get('check', '')}",
            file=sys.stderr)
    return 1
  return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--backend", default="auto", choices=compat.BACKENDS,
                 help="Kernel backend (auto: triton on GPU, mosaic_tpu on TPU).")
  p.add_argument("--shapes", default=None, help=f"K x N weight shapes (default {SHAPES}).")
  p.add_argument("--ms", default=None, help=f"Activation rows M (default {MS}).")
  p.add_argument("--methods", default=",".join(METHODS), help="Subset of " + ",".join(METHODS))
  p.add_argument("--reps", type=int, default=30, help="Timed blocks per method (at most).")
  p.add_argument("--min_reps", type=int, default=7, help="Timed blocks per method (at least).")
  p.add_argument("--group_s", type=float, default=1.5,
                 help="Stop sampling a (shape, M) after this many seconds once --min_reps are in.")
  p.add_argument("--tile", default=None,
                 help="Block sizes for the kernels, e.g. block_m=16,block_n=64,block_k_words=32 "
                 "(xnor_matmul takes block_m and block_n).")
  p.add_argument("--rotate_mib", type=int, default=256,
                 help="Distinct weight + activation bytes per timed block (defeats the L2 cache).")
  p.add_argument("--max_unroll", type=int, default=64, help="Most calls per timed block.")
  p.add_argument("--copy_mib", type=int, default=1024, help="Array size of the copy bandwidth.")
  p.add_argument("--budget_s", type=float, default=360,
                 help="Start no new (shape, M) after this many seconds (results stay consistent).")
  p.add_argument("--out", type=Path, default=REPO / "experiments" / "results")
  p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                 help="Print the cases and exit.")
  p.add_argument("--check", action="store_true",
                 help="Only the correctness pass (interpret mode on CPU); writes nothing.")
  args = p.parse_args(argv)
  small = args.check and jax.default_backend() == "cpu"
  args.shapes = _shapes(args.shapes or (CHECK_SHAPES if small else SHAPES))
  args.ms = _ints(args.ms or (CHECK_MS if small else MS))
  args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  unknown = set(args.methods) - set(METHODS)
  if unknown:
    p.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}.")
  args.tile = _tiles(args.tile)
  return args


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  if args.dry_run:
    dry_run(args)
    return 0
  if args.check:
    return run_check(args)
  if jax.default_backend() == "cpu":
    print(REFUSAL, file=sys.stderr)
    return 2
  return run_bench(args)


if __name__ == "__main__":
  sys.exit(main())
