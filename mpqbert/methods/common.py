"""Pieces every compression pipeline shares: task context, teacher, quantized training, results.

A pipeline's workdir holds one sub-directory per stage (`teacher/`, `search/`, `retrain/`,
`uniform4/`, ...), each with its own checkpoints and `metrics.jsonl`; a finished stage leaves a
JSON file that a resumed run reads instead of redoing the stage.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from mpqbert import data, files, models, quant
from mpqbert.train import checkpoint, loop, optim, results, sharding
from mpqbert.train.compiled import Jit
from mpqbert.train.losses import capture_layers, distillation_loss, layer_outputs, task_loss
from mpqbert.train.steps import TrainState, apply_to_batch, make_eval_step, model_logits

Batch = dict[str, jax.Array]
Metrics = dict[str, dict[str, float]]


@dataclasses.dataclass
class TaskContext:
  """The task, data, model and device mesh of one pipeline run."""

  config: ml_collections.ConfigDict
  task: data.GlueTask
  model: Any
  pretrained_params: Any
  train_set: data.TokenizedDataset
  eval_sets: dict[str, data.TokenizedDataset]
  mesh: Any

  @property
  def dev_split(self) -> str:
    return self.task.eval_splits[0]

  def dev_value(self, metrics: Metrics) -> float:
    return metrics[self.dev_split][self.task.main_metric]

  def evaluate(self, eval_step: Callable, variables: Any) -> Metrics:
    return {split: loop.evaluate(eval_step, variables, ds, self.task, self.config, self.mesh)
            for split, ds in self.eval_sets.items()}


def make_context(config: ml_collections.ConfigDict) -> TaskContext:
  tokenizer = models.load_tokenizer(config.model)
  task, train_set, eval_sets = loop.load_glue(config, tokenizer)
  model, params = models.load_pretrained(config.model, num_labels=task.num_labels,
                                         dtype=loop.compute_dtype(config.train.dtype),
                                         remat=config.train.remat, seed=config.seed)
  mesh = sharding.make_mesh()
  for size in (config.train.batch_size, config.train.eval_batch_size):
    sharding.check_batch_size(size, mesh)
  return TaskContext(config, task, model, params, train_set, eval_sets, mesh)


def cached_json(path: Path, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
  """`compute()` once: its result is written to `path` and read back by a resumed run."""
  if path.is_file():
    return json.loads(path.read_text())
  value = compute()
  files.write_atomic(path, json.dumps(value, indent=2))
  return value


def split_for_search(dataset: data.TokenizedDataset, fraction: float, seed: int
                     ) -> tuple[data.TokenizedDataset, data.TokenizedDataset]:
  """A seeded (weights, search) split of the training data; the dev set is never used."""
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"search.search_fraction={fraction} must be in (0, 1).")
  order = np.random.default_rng(seed + 7919).permutation(len(dataset))
  cut = int(round(len(dataset) * (1.0 - fraction)))
  if cut == 0 or cut == len(dataset):
    raise ValueError(f"{len(dataset)} training examples are too few to split with "
                     f"search_fraction={fraction}.")
  return dataset.select(np.sort(order[:cut])), dataset.select(np.sort(order[cut:]))


# ----------------------------------------------------------------------------------- teacher


def restore_params(workdir: Path, template: Any) -> Any:
  """The `params` of the newest checkpoint in `workdir`, checked against `template`'s shapes."""
  saved = checkpoint.load_params(workdir)
  differences = checkpoint.shape_differences(template, saved)
  if differences:
    raise ValueError(f"the checkpoint in {workdir} holds another model than config.model with "
                     f"this task's head ({'; '.join(differences[:4])}"
                     f"{' ...' if len(differences) > 4 else ''}); point teacher.workdir at a "
                     "fine-tuning run of the same model and task.")
  return jax.tree.map(jnp.asarray, saved)


def teacher_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The `configs/finetune.py`-style config of the teacher fine-tuning stage."""
  return ml_collections.ConfigDict({
      "method": "finetune", "task": config.task, "model": config.model, "seed": config.seed,
      "data": config.data.to_dict(), "train": config.teacher.train.to_dict(),
      "checkpoint": config.checkpoint.to_dict()})


def check_finished_teacher(source: Path, task: str, model: str) -> None:
  """Refuses a `teacher.workdir` that is not a finished fine-tuning of `model` on `task`: an
  unfinished one would silently serve its last checkpoint as the teacher."""
  if not (source / "results.json").is_file():
    raise ValueError(f"teacher.workdir={source} has no results.json: it is not a finished "
                     "fine-tuning run (its last checkpoint would be taken for the teacher). "
                     "Finish it by rerunning its command, or name a finished run.")
  reported = json.loads((source / "results.json").read_text())
  if reported.get("task") != task or reported.get("model") != model:
    raise ValueError(f"teacher.workdir={source} was fine-tuned on task {reported.get('task')!r} "
                     f"with model {reported.get('model')!r}, but this run is {task!r} with "
                     f"{model!r}.")


def get_teacher(ctx: TaskContext, workdir: Path) -> tuple[Any, Metrics | None]:
  """Full-precision fine-tuned params: from `teacher.workdir`, or fine-tuned in `workdir/teacher`.

  A teacher fine-tuned here is resumable like any stage; its `results.json` marks it finished
  and holds its final eval metrics on this run's data, which are returned with it (None for a
  teacher from `teacher.workdir`, whose data settings may differ).
  """
  config = ctx.config
  if config.teacher.workdir:
    source = Path(config.teacher.workdir)
    check_finished_teacher(source, ctx.task.name, config.model)
    return restore_params(source, ctx.pretrained_params), None
  stage = workdir / "teacher"
  tconfig = teacher_config(config)
  checkpoint.guard_workdir(stage, tconfig.to_json())
  if (stage / "results.json").is_file():
    finished = json.loads((stage / "results.json").read_text())
    return restore_params(stage, ctx.pretrained_params), finished.get("dev_metrics")
  state, dev_metrics, _ = loop.train_full_precision(tconfig, stage, ctx.model,
                                                    ctx.pretrained_params, ctx.task,
                                                    ctx.train_set, ctx.eval_sets)
  results.write_results(stage, {"task": ctx.task.name, "model": config.model,
                                "dev_metrics": dev_metrics, "config": tconfig.to_dict()})
  return state.params, dev_metrics


# -------------------------------------------------------------------------- quantized model


def make_spec(config: ml_collections.ConfigDict, num_heads: int,
              bit_choices: tuple[int, ...] | None = None) -> quant.QuantSpec:
  """The search space / numerics of `config.quant` over the six encoder matrices per layer."""
  return quant.bert_encoder_spec(groups=config.quant.groups,
                                 bit_choices=tuple(bit_choices or config.quant.bit_choices),
                                 num_heads=num_heads,
                                 activation_bits=config.quant.activation_bits,
                                 activation_mode="learned")


def quantized_logits(qapply: Callable) -> Callable:
  """`logits_fn(variables, batch)` of a quantized apply in eval mode; `variables` is
  `(params, qparams, arch)` with `arch` a Policy or logits."""
  return lambda variables, batch: apply_to_batch(qapply, variables, batch, deterministic=True)


def calibrate_activations(ctx: TaskContext, qapply: Callable, params: Any, qparams: Any,
                          arch: Any) -> Any:
  """qparams whose activation step sizes start at the moving max|x| of a few training batches."""
  if isinstance(arch, quant.Policy):
    input_bits = [m.input_bits(arch.activation_bits) for m in arch.matrices]
  else:
    input_bits = [ctx.config.quant.activation_bits]
  if not any(1 < bits < quant.FULL_PRECISION for bits in input_bits):
    return qparams  # No input has a step size (float or sign inputs only).

  def update(params, qparams, arch, batch):
    return apply_to_batch(qapply, (params, qparams, arch), batch, deterministic=True,
                          update_act_stats=True)[1]

  update = Jit(update, "calibrate_step")
  params, qparams, arch = sharding.replicate((params, qparams, arch), ctx.mesh)
  stream = loop.batches_for(ctx.config, ctx.train_set, 0)
  for _ in range(ctx.config.quant.calibration_batches):
    batch = next(stream)
    qparams = update(params, qparams, arch, sharding.shard_batch(batch, ctx.mesh))
  return qparams


# weights {"params", "qparams"} -> a scalar added to the loss.
Regularizer = Callable[[Any], jax.Array]


def distills(train_config: ml_collections.ConfigDict) -> bool:
  """Whether quantization-aware training learns from the teacher (logits or hidden states)."""
  return train_config.distill_alpha > 0 or train_config.distill_hidden_weight > 0


def make_student_loss(ctx: TaskContext, qapply: Callable) -> Callable:
  """The quantized model's training loss, shared by the QAT retrain and the AutoMPQ search.

  `loss(weights, arch, batch, dropout_key, gumbel_key, tau, hard, teacher_params) -> (loss,
  aux)`: the task loss, mixed with distillation from the teacher (logits and layer outputs,
  `config.train.distill_*`) when `distills(config.train)`; `arch` is a Policy or logits sampled
  with `gumbel_key` at temperature `tau` (`search.make_search_step`'s `LossFn`).
  """
  train = ctx.config.train
  is_regression = ctx.task.is_regression
  distill = distills(train)

  def loss(weights, arch, batch, dropout_key, gumbel_key, tau, hard, teacher_params):
    kwargs = dict(deterministic=False, rngs={"dropout": dropout_key}, key=gumbel_key, tau=tau,
                  hard=hard)
    if distill:
      kwargs["capture_intermediates"] = capture_layers
    out = apply_to_batch(qapply, (weights["params"], weights["qparams"], arch), batch, **kwargs)
    logits = out[0] if distill else out
    labels_loss = task_loss(logits, batch, is_regression)
    if not distill:
      return labels_loss, {"task_loss": labels_loss}
    t_logits, t_state = apply_to_batch(ctx.model.apply, ({"params": teacher_params},), batch,
                                       deterministic=True, capture_intermediates=capture_layers)
    t_logits, t_hidden = jax.lax.stop_gradient((t_logits, layer_outputs(t_state)))
    kd_logits, kd_hidden = distillation_loss(logits, t_logits, layer_outputs(out[1]), t_hidden,
                                             batch, is_regression=is_regression,
                                             temperature=train.distill_temperature)
    total = ((1 - train.distill_alpha) * labels_loss + train.distill_alpha * kd_logits
             + train.distill_hidden_weight * kd_hidden)
    return total, {"task_loss": labels_loss, "kd_logits": kd_logits, "kd_hidden": kd_hidden}

  return loss


def make_qat_step(ctx: TaskContext, qapply: Callable, optimizer,
                  regularizer: Regularizer | None = None) -> Jit:
  """One AdamW step of weights and quantizer parameters under a fixed policy (+ distillation,
  + an optional `regularizer` of the weights, logged as "regularizer").

  The compiled `step(state, batch, teacher_params, policy)` takes the teacher's weights (None
  without distillation) and the policy as arguments, so they are not constants in its program.
  """
  base_key = jax.random.key(ctx.config.seed)
  student_loss = make_student_loss(ctx, qapply)

  def loss_fn(weights, batch, key, teacher_params, policy):
    loss, aux = student_loss(weights, policy, batch, key, None, 1.0, False, teacher_params)
    if regularizer is None:
      return loss, aux
    penalty = regularizer(weights)
    return loss + penalty, {**aux, "regularizer": penalty}

  def step(state: TrainState, batch: Batch, teacher_params: Any, policy: quant.Policy):
    key = jax.random.fold_in(base_key, state.step)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key,
                                                                   teacher_params, policy)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state), {"loss": loss, **aux}

  return Jit(step, "qat_step", donate_argnums=0)


def train_quantized(ctx: TaskContext, stage: Path, spec: quant.QuantSpec, policy: quant.Policy,
                    params: Any, qparams: Any, teacher_params: Any, *,
                    num_steps: int | None = None,
                    regularizer: Regularizer | None = None,
                    apply_fn: Callable | None = None) -> dict[str, Any]:
  """Quantization-aware fine-tuning under a fixed `policy` from `params` (the teacher's weights).

  Trains weights and quantizer scales for `config.train`'s budget (or `num_steps`), checkpointed
  in `stage`; returns (and caches in `stage/result.json`) the dev metrics and sizes of the final
  model, whose weights `stage_weights` reads back. `apply_fn` (default: the model's) is the
  float forward the quantizer wraps, e.g. with a method's own interceptors.
  """
  policy.check_matches(spec.plan(params))  # Outside jit: its bits are values here.

  def run() -> dict[str, Any]:
    start = time.time()
    config = ctx.config
    stage.mkdir(parents=True, exist_ok=True)
    policy.save(stage / "policy.json")
    qapply = quant.transform(apply_fn or ctx.model.apply, spec)
    steps_per_epoch = data.num_train_batches(len(ctx.train_set), config.train.batch_size)
    total_steps = num_steps or loop.num_train_steps(config.train, steps_per_epoch)
    optimizer, schedule = optim.make_optimizer(config.train, total_steps,
                                               mask=optim.weights_decay_mask)
    calibrated = calibrate_activations(ctx, qapply, params, qparams, policy)
    state = sharding.replicate(
        TrainState.create({"params": params, "qparams": calibrated}, optimizer), ctx.mesh)
    eval_step = make_eval_step(quantized_logits(qapply), ctx.task.is_regression,
                               "quant_eval_step")
    qat_step = make_qat_step(ctx, qapply, optimizer, regularizer)
    frozen = sharding.replicate((teacher_params if distills(config.train) else None, policy),
                                ctx.mesh)
    state, dev_metrics = loop.train_loop(
        name=f"{stage.name} {ctx.task.name}", workdir=stage, state=state,
        train_step=qat_step.bind(*frozen),
        batches=lambda s: loop.batches_for(config, ctx.train_set, s), total_steps=total_steps,
        evaluate_fn=lambda s: ctx.evaluate(eval_step, (s.params["params"],
                                                       s.params["qparams"], frozen[1])),
        config=config, mesh=ctx.mesh,
        eval_every=config.train.eval_every_steps or steps_per_epoch, learning_rate=schedule)
    save_dev_predictions(ctx, stage, eval_step, (state.params["params"], state.params["qparams"],
                                                 frozen[1]))
    return {"dev": ctx.dev_value(dev_metrics), "dev_metrics": dev_metrics,
            **quant.size_report(jax.device_get(params), policy), "steps": total_steps,
            "wall_time_s": time.time() - start}

  return cached_json(stage / "result.json", run)


def save_dev_predictions(ctx: TaskContext, stage: Path, eval_step: Callable,
                         variables: Any) -> Path:
  """The final model's dev predictions and the labels, in dev order (`dev_predictions.npz`):
  what paired comparisons between runs bootstrap over."""
  dev_set = ctx.eval_sets[ctx.dev_split]
  predictions, _ = loop.predict(eval_step, variables, dev_set, ctx.config, ctx.mesh)
  buffer = io.BytesIO()
  np.savez(buffer, predictions=np.asarray(predictions), labels=np.asarray(dev_set.labels))
  return files.write_atomic(stage / "dev_predictions.npz", buffer.getvalue())


def stage_weights(stage: Path, params: Any, qparams: Any) -> dict[str, Any]:
  """The final {"params", "qparams"} of a finished `train_quantized` stage."""
  return restore_params(stage, {"params": params, "qparams": qparams})


def evaluate_full_precision(ctx: TaskContext, params: Any, workdir: Path,
                            metrics: Metrics | None = None) -> dict[str, Any]:
  """The teacher's dev metrics under this run's data settings (the full-precision row);
  `metrics`, when given, are those already measured on them (a teacher fine-tuned here)."""
  def run():
    if metrics is None:
      measured = ctx.evaluate(make_eval_step(model_logits(ctx.model), ctx.task.is_regression),
                              params)
    else:
      measured = metrics
    return {"dev": ctx.dev_value(measured), "dev_metrics": measured,
            **quant.size_report(jax.device_get(params))}

  return cached_json(workdir / "full_precision.json", run)


def start_pipeline(config: ml_collections.ConfigDict, workdir: str | Path
                   ) -> tuple[float, Path, TaskContext, Any, dict[str, Any]]:
  """Every pipeline's opening: guard the workdir, load data and model, get and evaluate the
  teacher. Returns (start time, workdir, context, teacher params, full-precision result)."""
  start = time.time()
  workdir = Path(workdir)
  checkpoint.guard_workdir(workdir, config.to_json())
  ctx = make_context(config)
  teacher, teacher_metrics = get_teacher(ctx, workdir)
  full_precision = evaluate_full_precision(ctx, teacher, workdir, teacher_metrics)
  logging.info("full precision dev %s = %.4f", ctx.task.main_metric, full_precision["dev"])
  return start, workdir, ctx, teacher, full_precision


# ------------------------------------------------------------------------------------ results


def row(method: str, result: Mapping[str, Any]) -> dict[str, Any]:
  """One line of the size / accuracy table."""
  return {"method": method, **{k: result[k] for k in ("size_mb", "compression", "avg_bits",
                                                      "dev")}}


def format_table(rows: list[Mapping[str, Any]], metric: str) -> str:
  lines = [f"{'method':<24} {'size_mb':>9} {'compression':>11} {'avg_bits':>8} {metric:>9}"]
  for r in rows:
    lines.append(f"{r['method']:<24} {r['size_mb']:>9.3f} {r['compression']:>10.2f}x "
                 f"{r['avg_bits']:>8.3f} {r['dev']:>9.4f}")
  return "\n".join(lines)


def write_summary(ctx: TaskContext, workdir: Path, *, method: str, result: Mapping[str, Any],
                  rows: list[dict[str, Any]], start_time: float, **extra: Any) -> dict[str, Any]:
  """`workdir/results.json` of a compression pipeline: the final model plus the table rows."""
  summary = {"task": ctx.task.name, "method": method, "model": ctx.config.model,
             "metric": ctx.task.main_metric, **dict(result), "rows": rows, **extra,
             "train_examples": len(ctx.train_set), "wall_time_s": time.time() - start_time,
             "git_commit": results.git_commit(), "config": ctx.config.to_dict()}
  results.write_results(workdir, summary)
  logging.info("table:\n%s", format_table(rows, ctx.task.main_metric))
  return summary
