r"""Pipeline throughput: the FP, QAT and search steps in float32 and bfloat16, compile time and
steady step time apart, and the wall time of each stage of finished quickstart runs.

  python experiments/bench_pipeline.py --seq_lens=64,128 \
      --stage_runs=before=workdirs/quickstart_before,after=workdirs/quickstart

Steps (embedded MiniLM + 2-way head, batch 32, dropout on, the quickstart's settings):
  fp      full-precision AdamW step (the teacher's fine-tuning)
  qat     quantization-aware step under a fixed policy with distillation from the teacher
          (the config's bit choices, 12 sub-groups, 8-bit activations; the retrain stages)
  search  the bilevel AutoMPQ step (architecture step on one batch, weight step on another,
          both with the distillation loss)
Timed rounds alternate between all step kinds and dtypes, so machine load hits them alike;
medians are reported. One more side-by-side pair: the float32 QAT step compiled with the teacher's
weights and the policy as arguments (what the pipelines do) and closed over as constants (what
they did before), with the size of each program.

`--stage_runs=label=WORKDIR,...` adds the stage wall times of finished `configs/quickstart.py`
runs, read from the modification times of each stage's result file (fresh, uninterrupted runs
only). Writes experiments/results/pipeline_throughput.{json,md}.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import statistics
import time
import types
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

from mpqbert import data, models, quant, search
from mpqbert.methods import qat
from mpqbert.train import compiled, optim, results, sharding, steps

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["64", "128"], "Sequence lengths to time.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Examples per step.")
_ROUNDS = flags.DEFINE_integer("rounds", 4, "Alternating timed rounds per step kind and dtype.")
_STEPS = flags.DEFINE_integer("steps_per_round", 3, "Steps per timed round.")
_KINDS = flags.DEFINE_list("kinds", ["fp", "qat", "search"], "Step kinds to time.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes to time.")
_CONSTANTS = flags.DEFINE_bool("compare_constants", True,
                               "Also compile the QAT step with the teacher closed over.")
_STAGE_RUNS = flags.DEFINE_list("stage_runs", [], "label=workdir of finished quickstart runs.")
_OUT = flags.DEFINE_string("out", str(Path(__file__).parent / "results" / "pipeline_throughput"),
                           "Output path without extension.")

REPO = Path(__file__).resolve().parents[1]
# Stage name -> the file a finished stage leaves (the run's config.json marks its start).
STAGE_FILES = (("teacher", "teacher/results.json"), ("uniform 4-bit", "uniform4/result.json"),
               ("search", "search/search.json"), ("retrain", "retrain/result.json"),
               ("table", "results.json"))


def cpu_features() -> list[str]:
  """The CPU's bfloat16 / int8 matmul features (Linux), which decide what bfloat16 can gain."""
  try:
    flags_line = next(l for l in Path("/proc/cpuinfo").read_text().splitlines()
                      if l.startswith("flags"))
  except (OSError, StopIteration):
    return []
  wanted = ("avx512_bf16", "amx_bf16", "amx_int8", "amx_tile", "avx512_vnni", "avx_vnni")
  return [f for f in wanted if f in flags_line.split()]


def quickstart_config():
  spec = importlib.util.spec_from_file_location("quickstart", REPO / "configs" / "quickstart.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


class Stepper:
  """A step function, its compiled `Jit` and its state: `run(n)` runs n steps and waits."""

  def __init__(self, step: Callable, jit: compiled.Jit, state: Any, batch: Any):
    self.step, self.jit, self.state, self.batch = step, jit, state, batch

  def run(self, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
      self.state, metrics = self.step(self.state, self.batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / n


def make_steppers(config, dtype: str, seq_len: int, kinds: list[str]
                  ) -> tuple[dict[str, Stepper], dict[str, Any]]:
  """The FP / QAT / search steps of `config` in `dtype`, built as the pipelines build them."""
  model, params = models.load_pretrained("minilm", num_labels=2, seed=0,
                                         dtype=jnp.dtype(dtype))
  params = jax.tree.map(jnp.asarray, params)
  fresh = lambda: jax.tree.map(jnp.copy, params)  # Each state its own copy: steps donate it.
  batch = data.random_batch(_BATCH.value, seq_len, seed=seq_len)
  ctx = types.SimpleNamespace(config=config, task=types.SimpleNamespace(is_regression=False),
                              model=model, mesh=sharding.make_mesh())
  spec = qat.make_spec(config, model.config.num_attention_heads)
  plan = spec.plan(params)
  qapply = quant.transform(model.apply, spec)
  out, extras = {}, {}
  if "fp" in kinds:
    optimizer, _ = optim.make_optimizer(config.teacher.train, 10**6)
    step = steps.make_train_step(model, optimizer, False, config.seed)
    out["fp"] = Stepper(step, step, steps.TrainState.create(fresh(), optimizer), batch)
  if "qat" in kinds:
    optimizer, _ = optim.make_optimizer(config.train, 10**6, mask=optim.weights_decay_mask)
    policy = quant.uniform_policy(plan, 2, activation_bits=config.quant.activation_bits)
    qat_step = qat.make_qat_step(ctx, qapply, optimizer)
    state = steps.TrainState.create(
        {"params": fresh(), "qparams": quant.init_qparams(spec, params)}, optimizer)
    out["qat"] = Stepper(qat_step.bind(params, policy), qat_step, state, batch)
    extras["qat"] = (qat_step, state, batch, params, policy)
  if "search" in kinds:
    sc = config.search
    weight_opt, _ = optim.make_optimizer(config.train, 10**6, mask=optim.weights_decay_mask,
                                         learning_rate=sc.weight_lr)
    arch_opt = optax.adam(sc.arch_lr)
    band = search.make_band(params, plan, target_size_mb=sc.target_size_mb,
                            target_compression=sc.target_compression,
                            target_uniform_bits=sc.target_uniform_bits, tolerance=sc.tolerance,
                            layout=models.BERT_LAYOUT)
    step = search.make_search_step(  # The pipeline's: distillation loss, hard samples.
        qat.make_student_loss(ctx, qapply), plan=plan, target_mb=band.target_mb,
        fixed_bits=search.float_matrix_bits(params, plan,
                                            layout=models.BERT_LAYOUT), size_weight=sc.size_weight,
        entropy_weight=sc.entropy_weight, hard=sc.hard_sample, weight_optimizer=weight_opt,
        arch_optimizer=arch_opt, tau_fn=lambda s: jnp.float32(sc.tau_start), arch_start_step=0,
        seed=config.seed)
    state = search.SearchState.create(fresh(), quant.init_qparams(spec, params),
                                      quant.init_arch(spec, params), weight_opt, arch_opt)
    step = step.at(0)  # Bilevel from the first step.
    out["search"] = Stepper(step.bind(params), step, state,
                            (batch, data.random_batch(_BATCH.value, seq_len, seed=seq_len + 1)))
  return out, extras


def compile_seconds(stepper: Stepper) -> float:
  """Runs the first step; returns the seconds its compilation took (as `Jit` recorded them)."""
  stepper.run(1)
  return stepper.jit.compilations[-1][1]


def constants_comparison(qat, state, batch, teacher, policy) -> dict[str, float]:
  """Compile time and program size of the QAT step with the teacher and policy as arguments
  against the same step with them closed over (compiled into the program as constants)."""
  out = {}  # Fresh jax.jit objects: each one lowers and compiles from scratch.
  variants = {"arguments": (jax.jit(qat.fn), (state, batch, teacher, policy)),
              "constants": (jax.jit(lambda s, b: qat.fn(s, b, teacher, policy)),
                            (state, batch))}
  for name, (fn, args) in variants.items():
    start = time.perf_counter()
    lowered = fn.lower(*args)
    text_mib = len(lowered.as_text()) / 2**20
    lowered.compile()
    out[name] = {"compile_s": time.perf_counter() - start, "program_mib": text_mib}
    print(f"qat step with the teacher as {name}: {out[name]['compile_s']:.1f} s to lower and "
          f"compile, {text_mib:.1f} MiB program", flush=True)
  return out


def stage_times(workdir: Path) -> dict[str, float]:
  """Seconds of each stage of a finished quickstart run, from its files' modification times."""
  previous = (workdir / "config.json").stat().st_mtime
  out = {}
  for name, relative in STAGE_FILES:
    mtime = (workdir / relative).stat().st_mtime
    out[name] = mtime - previous
    previous = mtime
  out["total"] = sum(out.values())
  return out


def main(argv):
  del argv
  config = quickstart_config()
  report: dict[str, Any] = {"batch_size": _BATCH.value, "rows": [], "git_commit":
                            results.git_commit(), "jax": jax.__version__,
                            "machine": f"{platform.processor() or platform.machine()}, "
                                       f"{os.cpu_count()} CPU cores, {jax.devices()[0].platform}",
                            "cpu_features": cpu_features(),
                            "rounds": _ROUNDS.value, "steps_per_round": _STEPS.value}
  for seq_len in map(int, _SEQ_LENS.value):
    steppers, compiles = {}, {}
    for dtype in _DTYPES.value:
      built, extras = make_steppers(config, dtype, seq_len, _KINDS.value)
      for kind, stepper in built.items():
        steppers[kind, dtype] = stepper
        compiles[kind, dtype] = compile_seconds(stepper)
        print(f"seq {seq_len} {kind} {dtype}: compiled in {compiles[kind, dtype]:.1f} s",
              flush=True)
      if (_CONSTANTS.value and dtype == "float32" and seq_len == int(_SEQ_LENS.value[0])
          and "qat" in extras):
        report["qat_teacher_as"] = constants_comparison(*extras["qat"])
    for stepper in steppers.values():
      stepper.run(1)  # warm up after compilation
    times: dict[Any, list[float]] = {key: [] for key in steppers}
    for _ in range(_ROUNDS.value):
      for key, stepper in steppers.items():
        times[key].append(stepper.run(_STEPS.value))
    for (kind, dtype), values in times.items():
      row = {"seq_len": seq_len, "kind": kind, "dtype": dtype, "compile_s": compiles[kind, dtype],
             "step_s": statistics.median(values)}
      report["rows"].append(row)
      print(f"seq {seq_len} {kind:6s} {dtype:8s} compile {row['compile_s']:6.1f} s  step "
            f"{row['step_s']:.3f} s", flush=True)
  report["stage_runs"] = {}
  for entry in _STAGE_RUNS.value:
    label, workdir = entry.split("=", 1)
    report["stage_runs"][label] = {"workdir": workdir, "seconds": stage_times(Path(workdir)),
                                   "git_commit": json.loads(
                                       (Path(workdir) / "results.json").read_text()
                                   ).get("git_commit")}
  write(report)


def _step(report, seq_len, kind, dtype) -> float | None:
  for r in report["rows"]:
    if (r["seq_len"], r["kind"], r["dtype"]) == (seq_len, kind, dtype):
      return r["step_s"]
  return None


def write(report: dict[str, Any]) -> None:
  out = Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(report, indent=2))
  lines = [f"Steps of the embedded MiniLM + 2-way head, batch {report['batch_size']}, dropout on "
           "(medians of alternating rounds; compile = lowering + XLA compilation of the first "
           "call).", "",
           "| seq len | step | dtype | compile (s) | step (s) | float32 / this |",
           "|---:|---|---|---:|---:|---:|"]
  for r in report["rows"]:
    fp32 = _step(report, r["seq_len"], r["kind"], "float32")
    ratio = f"{fp32 / r['step_s']:.2f}x" if fp32 else ""
    lines.append(f"| {r['seq_len']} | {r['kind']} | {r['dtype']} | {r['compile_s']:.1f} | "
                 f"{r['step_s']:.3f} | {ratio} |")
  seq_lens = sorted({r["seq_len"] for r in report["rows"]})
  for seq_len in seq_lens:
    searched, fp = (_step(report, seq_len, k, "bfloat16") for k in ("search", "fp"))
    if searched and fp:
      lines.append(f"\nseq {seq_len}: bfloat16 search step / bfloat16 FP step = "
                   f"**{searched / fp:.2f}x**.")
  if "qat_teacher_as" in report:
    c = report["qat_teacher_as"]
    lines += ["", "float32 QAT step with distillation (seq "
              f"{seq_lens[0]}), teacher weights and policy passed as arguments vs closed over:",
              "", "| teacher as | lower + compile (s) | program (MiB of StableHLO text) |",
              "|---|---:|---:|"]
    lines += [f"| {k} | {v['compile_s']:.1f} | {v['program_mib']:.1f} |" for k, v in c.items()]
  if report["stage_runs"]:
    labels = list(report["stage_runs"])
    lines += ["", "Wall time of each stage of `configs/quickstart.py` runs (seconds, from the "
              "stage files' modification times):", "",
              "| stage | " + " | ".join(f"{l} ({report['stage_runs'][l]['git_commit'] or '?'})"
                                       for l in labels) + " |",
              "|---|" + "---:|" * len(labels)]
    for stage in [name for name, _ in STAGE_FILES] + ["total"]:
      lines.append(f"| {stage} | " + " | ".join(
          f"{report['stage_runs'][l]['seconds'][stage]:.0f}" for l in labels) + " |")
  lines += ["", f"{report['machine']} (matmul features: "
            f"{', '.join(report['cpu_features']) or 'none found'}); jax {report['jax']}; "
            f"{report['rounds']} rounds of "
            f"{report['steps_per_round']} steps; commit {report['git_commit']}. Command: "
            "`python experiments/bench_pipeline.py`."]
  out.with_suffix(".md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
