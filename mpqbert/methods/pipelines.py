"""The compression methods of `mpqbert.main`, each one resumable pipeline over `common` stages.

  automp   teacher -> bilevel search (mpqbert.search) -> derived policy -> QAT retrain -> eval
  uniform  teacher -> n-bit policy -> QAT retrain -> eval
  qbert    teacher -> per-layer Hessian eigenvalues (Q-BERT) -> knapsack policy -> QAT retrain
  hawq     teacher -> per-matrix Hutchinson traces (HAWQ-V3) -> knapsack policy -> QAT retrain

Every quantized model starts from the teacher's weights and gets the same `config.train` budget;
the searched/assigned policy lands in the size band of `config.search`.

Why one module over 300 lines: the four pipelines share their stages and differ in a few lines
each; side by side, those differences (what each method does with the same budget) read at once.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from absl import logging

from mpqbert import files, quant, search
from mpqbert.methods import common, qat
from mpqbert.methods.report import plot_bit_map
from mpqbert.train import loop, optim, sharding
from mpqbert.train.losses import task_loss
from mpqbert.train.steps import make_eval_step, model_logits


_LAYER = re.compile(r"^(.*/layer/\d+)/")


def policy_stats(policy: quant.Policy) -> dict[str, Any]:
  """How many sub-groups got each bit-width (0 = pruned)."""
  counts = Counter(int(b) for bits in policy.bits.values() for b in np.asarray(bits))
  return {"groups": sum(counts.values()), "pruned_groups": counts.get(0, 0),
          "groups_per_bits": {str(b): counts[b] for b in sorted(counts)}}


def _num_heads(ctx: common.TaskContext) -> int:
  return ctx.model.config.num_attention_heads


def _uniform(ctx: common.TaskContext, stage: Path, bits: int, teacher: Any) -> dict[str, Any]:
  """QAT of the teacher with every sub-group at `bits` (same sub-groups as `config.quant`)."""
  spec = qat.make_spec(ctx.config, _num_heads(ctx), bit_choices=(bits,))
  policy = quant.uniform_policy(spec.plan(teacher), bits,
                                activation_bits=ctx.config.quant.activation_bits)
  qparams = quant.init_qparams(spec, teacher, scale_init=ctx.config.quant.scale_init)
  return qat.train_quantized(ctx, stage, spec, policy, teacher, qparams, teacher)


def _finish(ctx, workdir: Path, *, method: str, label: str, spec, policy: quant.Policy,
            teacher, rows: list, start: float, qparams: Any = None, **extra) -> dict[str, Any]:
  """Retrain under `policy` (quantizer parameters `qparams`, or fresh ones), write policy.json,
  the bit map and results.json."""
  if qparams is None:
    qparams = quant.init_qparams(spec, teacher, scale_init=ctx.config.quant.scale_init)
  result = qat.train_quantized(ctx, workdir / "retrain", spec, policy, teacher, qparams,
                                  teacher)
  policy.save(workdir / "policy.json")
  plot_bit_map(policy, workdir / "bit_map.png",
               title=f"{method} {ctx.task.name}: {result['size_mb']:.3f} MB, "
                     f"{result['compression']:.1f}x, dev {result['dev']:.4f}")
  rows = rows + [common.row(label, result)]
  return common.write_summary(ctx, workdir, method=method, result=result, rows=rows,
                              start_time=start, policy=policy_stats(policy), **extra)


def _band(ctx, teacher, spec: quant.QuantSpec) -> search.SizeBand:
  s = ctx.config.search
  return search.make_band(teacher, spec.plan(teacher), layout=spec.layout,
                          target_size_mb=s.target_size_mb,
                          target_compression=s.target_compression,
                          target_uniform_bits=s.target_uniform_bits, tolerance=s.tolerance)


def _training_batches(ctx, count: int, seed_offset: int, batch_size: int | None = None) -> list:
  """`count` sharded training batches of a seeded stream (sensitivity estimates)."""
  stream = loop.batches_for(ctx.config, ctx.train_set, 0, seed_offset=seed_offset,
                            batch_size=batch_size)
  return [sharding.shard_batch(next(stream), ctx.mesh) for _ in range(count)]


def _label_loss(ctx):
  """The teacher's mean task loss on a batch, deterministic (for curvature estimates)."""
  logits_fn = model_logits(ctx.model)
  return lambda params, batch: task_loss(logits_fn(params, batch), batch, ctx.task.is_regression)


# ------------------------------------------------------------------------------------- automp


def _arch_optimizer(search_config) -> optax.GradientTransformation:
  if search_config.arch_optimizer == "sgd":
    return optax.sgd(search_config.arch_lr)
  if search_config.arch_optimizer == "adam":
    return optax.adam(search_config.arch_lr)
  raise ValueError(f"search.arch_optimizer={search_config.arch_optimizer!r}; use 'sgd' or "
                   "'adam'.")


def initial_logits(ctx: common.TaskContext, spec: quant.QuantSpec, band: search.SizeBand,
                   teacher: Any, qparams: Any) -> dict[str, Any]:
  """Zero logits (`search.prior="none"`), or the Fisher sensitivity prior (`search.prior`)."""
  sc = ctx.config.search
  if sc.prior == "none":
    return quant.init_arch(spec, teacher)
  if sc.prior != "fisher":
    raise ValueError(f"search.prior={sc.prior!r}; use 'fisher' or 'none'.")
  plan = spec.plan(teacher)
  fisher = search.fisher_diagonal(_label_loss(ctx), teacher,
                                  _training_batches(ctx, sc.prior_batches, seed_offset=3),
                                  list(plan))
  costs = search.quantization_errors(teacher, plan, qparams, fisher)
  logits = search.prior_logits(costs, plan, band,
                               fixed_bits=search.float_matrix_bits(teacher, plan,
                                                                       layout=spec.layout),
                               strength=sc.prior_strength)
  return {p: jax.numpy.asarray(v) for p, v in logits.items()}


def arch_summary(arch: Any, plan: quant.Plan, band: search.SizeBand, fixed: int,
                 max_pruned_fraction: float | None) -> dict[str, Any]:
  """How decided the logits are and the sizes they imply: expected (softmax), argmax, and the
  exactly derived policy's, with its pruned sub-groups."""
  arch = {p: jax.numpy.asarray(v) for p, v in arch.items()}
  probs = {p: jax.nn.softmax(v) for p, v in arch.items()}
  derived = search.derive_policy(arch, plan, band, fixed_bits=fixed,
                                 max_pruned_fraction=max_pruned_fraction)
  size_of = lambda policy: (fixed + sum(policy.matrix_bits(p) for p in plan)) / quant.BITS_PER_MB
  return {"entropy": float(search.arch_entropy(arch)),
          "mean_top_prob": float(search.mean_top_probability(arch)),
          "expected_size_mb": float(search.expected_size_mb(probs, plan, fixed)),
          "argmax_size_mb": size_of(quant.policy_from_logits(arch, plan)),
          "derived_size_mb": size_of(derived),
          "derived_pruned_groups": policy_stats(derived)["pruned_groups"]}


def run_search(ctx: common.TaskContext, stage: Path, spec: quant.QuantSpec,
               band: search.SizeBand, teacher: Any) -> dict[str, Any]:
  """The bilevel search from the teacher's weights; returns (and caches) the final logits and
  quantizer parameters (`arch_logits.npz`, `qparams.npz`)."""
  config, sc = ctx.config, ctx.config.search
  plan = spec.plan(teacher)
  fixed = search.float_matrix_bits(teacher, plan, layout=spec.layout)
  weight_set, search_set = common.split_for_search(
      loop.take_subset(ctx.train_set, sc.train_subset, config.seed + 1), sc.search_fraction,
      config.seed)
  steps_per_epoch = weight_set.steps_per_epoch(sc.batch_size)
  total_steps = (int(sc.num_train_steps) if sc.num_train_steps > 0
                 else max(1, math.ceil(sc.num_epochs * steps_per_epoch)))
  arch_start = int(round(sc.warmup_epochs * steps_per_epoch))
  weight_optimizer, schedule = optim.make_optimizer(config.train, total_steps,
                                                    mask=optim.weights_decay_mask,
                                                    learning_rate=sc.weight_lr)
  arch_optimizer = _arch_optimizer(sc)
  qapply = quant.transform(ctx.model.apply, spec)
  qparams = quant.init_qparams(spec, teacher, scale_init=config.quant.scale_init)
  arch = initial_logits(ctx, spec, band, teacher, qparams)
  start_summary = arch_summary(arch, plan, band, fixed, sc.max_pruned_fraction)
  logging.info("search start (prior %s): %s", sc.prior, start_summary)
  qparams = qat.calibrate_activations(ctx, qapply, teacher, qparams, arch)
  state = ctx.shard(search.SearchState.create(teacher, qparams, arch, weight_optimizer,
                                              arch_optimizer))
  tau_fn = lambda step: search.temperature(step, steps_per_epoch, tau_start=sc.tau_start,
                                           tau_decay=sc.tau_decay, warmup_epochs=sc.warmup_epochs)
  distill = qat.distills(config.train)
  loss_fn = (qat.make_student_loss(ctx, qapply) if distill
             else search.label_loss(qapply, ctx.task.is_regression))
  step_fn = search.make_search_step(
      loss_fn, plan=plan, target_mb=band.target_mb, fixed_bits=fixed,
      size_weight=sc.size_weight, entropy_weight=sc.entropy_weight, hard=sc.hard_sample,
      weight_optimizer=weight_optimizer, arch_optimizer=arch_optimizer, tau_fn=tau_fn,
      arch_start_step=arch_start, second_order=sc.second_order, inner_lr=sc.weight_lr,
      seed=config.seed)
  teacher_arg = ctx.shard(teacher if distill else None)
  eval_step = make_eval_step(qat.quantized_logits(qapply), ctx.task.is_regression,
                             "quant_eval_step")

  def evaluate(state):  # Report only: the argmax policy on the search's own weights.
    argmax = quant.policy_from_logits(jax.device_get(state.arch), plan,
                                      activation_bits=config.quant.activation_bits)
    # Replicated like the retrain's policy: its evaluation then reuses this compiled program.
    return ctx.evaluate(eval_step, (state.weights["params"], state.weights["qparams"],
                                    sharding.replicate(argmax, ctx.mesh)))

  batches = lambda start: loop.paired_batches(config, weight_set, search_set, start,
                                              sc.batch_size)
  logging.info("search: %d weight / %d search examples, %d steps (%d/epoch), architecture "
               "updates from step %d, band %s, loss %s", len(weight_set), len(search_set),
               total_steps, steps_per_epoch, arch_start, band.describe(),
               "distillation" if distill else "labels")
  state, argmax_metrics = loop.train_loop(
      name=f"search {ctx.task.name}", workdir=stage, state=state,
      train_step=step_fn.bind(teacher_arg), batches=batches, total_steps=total_steps,
      evaluate_fn=evaluate, config=config, mesh=ctx.mesh,
      eval_every=sc.eval_every_steps or total_steps, learning_rate=schedule)
  arch = jax.device_get(state.arch)
  files.write_npz(stage / "arch_logits.npz", {p.replace("/", "."): v for p, v in arch.items()})
  save_qparams(stage / "qparams.npz", jax.device_get(state.weights["qparams"]))
  end_summary = arch_summary(arch, plan, band, fixed, sc.max_pruned_fraction)
  logging.info("search end: %s", end_summary)
  return {"arch": arch, "steps": total_steps, "argmax_dev_metrics": argmax_metrics,
          "start": start_summary, **end_summary}


def save_qparams(path: Path, qparams: Any) -> None:
  """Quantizer parameters `{path: {name: array}}` as one .npz (keys `path|name`, / as .)."""
  flat = {f"{p.replace('/', '.')}|{name}": np.asarray(v) for p, entry in qparams.items()
          for name, v in entry.items()}
  files.write_npz(path, flat)


def load_qparams(path: Path) -> dict[str, dict[str, Any]]:
  """The inverse of `save_qparams`."""
  out: dict[str, dict[str, Any]] = {}
  with np.load(path) as f:
    for key in f.files:
      p, name = key.split("|")
      out.setdefault(p.replace(".", "/"), {})[name] = jax.numpy.asarray(f[key])
  return out


def load_arch(stage: Path) -> dict[str, np.ndarray]:
  with np.load(stage / "arch_logits.npz") as f:
    return {k.replace(".", "/"): f[k] for k in f.files}


def automp(config, workdir) -> dict[str, Any]:
  """AutoMPQ: search bits per sub-group (0 = pruned) under the size band, derive, retrain."""
  start, workdir, ctx, teacher, full_precision = common.start_pipeline(config, workdir)
  spec = qat.make_spec(config, _num_heads(ctx))
  plan = spec.plan(teacher)
  band = _band(ctx, teacher, spec)
  rows = [common.row("full precision", full_precision)]
  for bits in config.compare.uniform_bits:
    rows.append(common.row(f"uniform {bits}-bit",
                           _uniform(ctx, workdir / f"uniform{bits}", bits, teacher)))
  stage = workdir / "search"

  def searched() -> dict[str, Any]:
    out = run_search(ctx, stage, spec, band, teacher)
    return {k: v for k, v in out.items() if k != "arch"}

  search_info = common.cached_json(stage / "search.json", searched)
  arch = load_arch(stage)
  fixed = search.float_matrix_bits(teacher, plan, layout=spec.layout)
  policy = search.derive_policy(arch, plan, band, fixed_bits=fixed,
                                max_pruned_fraction=config.search.max_pruned_fraction,
                                activation_bits=config.quant.activation_bits)
  search_info["band_mb"] = [band.lower, band.upper]
  logging.info("search: expected size %.4f MB, argmax policy %.4f MB, derived policy %.4f MB "
               "(band %s)", search_info["expected_size_mb"], search_info["argmax_size_mb"],
               search_info["derived_size_mb"], band.describe())
  qparams = load_qparams(stage / "qparams.npz") if config.search.carry_scales else None
  return _finish(ctx, workdir, method="automp", label="automp", spec=spec, policy=policy,
                 teacher=teacher, rows=rows, start=start, qparams=qparams, search=search_info)


# ---------------------------------------------------------------------------------- baselines


def uniform(config, workdir) -> dict[str, Any]:
  """Uniform n-bit quantization-aware fine-tuning (`config.quant.bits`)."""
  start, workdir, ctx, teacher, full_precision = common.start_pipeline(config, workdir)
  bits = int(config.quant.bits)
  result = _uniform(ctx, workdir / "retrain", bits, teacher)
  spec = qat.make_spec(config, _num_heads(ctx), bit_choices=(bits,))
  policy = quant.uniform_policy(spec.plan(teacher), bits,
                                activation_bits=config.quant.activation_bits)
  policy.save(workdir / "policy.json")
  rows = [common.row("full precision", full_precision), common.row(f"uniform {bits}-bit", result)]
  return common.write_summary(ctx, workdir, method=f"uniform{bits}", result=result, rows=rows,
                              start_time=start, policy=policy_stats(policy))


def layer_blocks(plan: quant.Plan) -> dict[str, list[str]]:
  """The planned matrices of each encoder layer (`.../layer/<i>`), Q-BERT's unit."""
  blocks: dict[str, list[str]] = {}
  for path in plan:
    match = _LAYER.search(path)
    if match is None:
      raise ValueError(f"{path} is in no encoder layer (.../layer/<i>/...); Q-BERT measures "
                       "sensitivity per layer.")
    blocks.setdefault(match.group(1), []).append(path)
  return blocks


def _sensitivity(ctx, workdir: Path, method: str, measure, field: str,
                 keys: set[str]) -> dict[str, Any]:
  """The method's Hessian measurement, with a value per key in `info[field]`: computed once and
  cached in sensitivity.json, or read from `hessian.sensitivity_from` (another run's file, of
  the same teacher and method)."""
  source = ctx.config.hessian.sensitivity_from
  info = (json.loads(Path(source).read_text()) if source
          else common.cached_json(workdir / "sensitivity.json", measure))
  missing = sorted(keys - set(info.get(field, {})))
  if info.get("method") != method or missing:
    raise ValueError(f"{source or workdir / 'sensitivity.json'} holds no {method} sensitivity "
                     f"for {missing[0] if missing else 'this model'}; hessian.sensitivity_from "
                     f"must name the sensitivity.json of a {method} run of the same teacher.")
  return info


def _sensitivity_batches(ctx) -> list:
  hc = ctx.config.hessian
  return _training_batches(ctx, hc.num_batches, seed_offset=2, batch_size=hc.batch_size)


def _assign(ctx, workdir: Path, method: str, spec, plan, band, teacher, sensitivity,
            full_precision, start, info) -> dict[str, Any]:
  """Bits by `search.sensitivity_policy` in the band, then the common retrain."""
  qparams = quant.init_qparams(spec, teacher, scale_init=ctx.config.quant.scale_init)
  errors = search.quantization_errors(teacher, plan, qparams)
  fixed = search.float_matrix_bits(teacher, plan, layout=spec.layout)
  policy = search.sensitivity_policy(sensitivity, errors, plan, band, fixed_bits=fixed,
                                     max_pruned_fraction=ctx.config.search.max_pruned_fraction,
                                     activation_bits=ctx.config.quant.activation_bits)
  rows = [common.row("full precision", full_precision)]
  return _finish(ctx, workdir, method=method, label=method, spec=spec, policy=policy,
                 teacher=teacher, rows=rows, start=start, sensitivity=info)


def qbert(config, workdir) -> dict[str, Any]:
  """Q-BERT: per layer |mean| + std of the top Hessian eigenvalue over `hessian.num_batches`
  batches, times each sub-group's quantization error, bits by the exact knapsack in the band."""
  start, workdir, ctx, teacher, full_precision = common.start_pipeline(config, workdir)
  spec = qat.make_spec(config, _num_heads(ctx))
  plan = spec.plan(teacher)
  band = _band(ctx, teacher, spec)
  blocks = layer_blocks(plan)
  hc = config.hessian

  def measure() -> dict[str, Any]:
    eigenvalues = search.block_top_eigenvalues(
        _label_loss(ctx), teacher, _sensitivity_batches(ctx), blocks,
        iterations=hc.power_iterations, tolerance=hc.tolerance, seed=config.seed)
    return {"method": "qbert", "eigenvalues": {k: v.tolist() for k, v in eigenvalues.items()},
            "sensitivity": search.qbert_sensitivity(eigenvalues)}

  info = _sensitivity(ctx, workdir, "qbert", measure, "sensitivity", set(blocks))
  sensitivity = {p: info["sensitivity"][layer] for layer, paths in blocks.items() for p in paths}
  return _assign(ctx, workdir, "qbert", spec, plan, band, teacher, sensitivity, full_precision,
                 start, info)


def hawq(config, workdir) -> dict[str, Any]:
  """HAWQ-V3: per matrix (or sub-group) the Hutchinson Hessian trace over its weight count,
  times each sub-group's quantization error, bits by the exact knapsack in the band."""
  hc = config.hessian
  search.price_negative_traces({}, hc.negative_traces)  # A bad value fails before any work.
  start, workdir, ctx, teacher, full_precision = common.start_pipeline(config, workdir)
  spec = qat.make_spec(config, _num_heads(ctx))
  plan = spec.plan(teacher)
  band = _band(ctx, teacher, spec)

  def measure() -> dict[str, Any]:
    traces = search.hutchinson_traces(_label_loss(ctx), teacher, _sensitivity_batches(ctx), plan,
                                      samples=hc.trace_samples, seed=config.seed)
    n = next(iter(traces.values())).shape[0]
    return {"method": "hawq", "vectors": n,
            "group_traces": {p: t.mean(0).tolist() for p, t in traces.items()},
            "trace": {p: float(t.sum(-1).mean()) for p, t in traces.items()},
            "trace_stderr": {p: float(t.sum(-1).std(ddof=1) / math.sqrt(n)) if n > 1 else None
                             for p, t in traces.items()}}

  info = _sensitivity(ctx, workdir, "hawq", measure, "group_traces", set(plan))
  traces = {p: np.asarray([info["group_traces"][p]]) for p in plan}
  sensitivity = search.price_negative_traces(
      search.average_traces(traces, plan, per_group=hc.per_group_traces), hc.negative_traces)
  return _assign(ctx, workdir, "hawq", spec, plan, band, teacher, sensitivity, full_precision,
                 start, info)
