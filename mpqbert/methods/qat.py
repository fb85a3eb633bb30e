"""Quantization-aware training under a fixed policy, shared by every compression pipeline.

`train_quantized` is one resumable stage: calibrate the activation step sizes, then AdamW on the
weights and quantizer parameters with the task loss, distilled from the teacher
(`make_student_loss`, also the AutoMPQ search's loss), and keep the final dev predictions.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
import optax

from mpqbert import files, models, quant
from mpqbert.methods import common
from mpqbert.train import loop, optim, sharding
from mpqbert.train.compiled import Jit
from mpqbert.train.losses import capture_layers, distillation_loss, layer_outputs, task_loss
from mpqbert.train.steps import TrainState, apply_to_batch, make_eval_step

Batch = dict[str, jax.Array]


def make_spec(config: ml_collections.ConfigDict, num_heads: int,
              bit_choices: tuple[int, ...] | None = None) -> quant.QuantSpec:
  """The search space / numerics of `config.quant` over the six encoder matrices per layer."""
  return models.bert_encoder_spec(groups=config.quant.groups,
                                  bit_choices=tuple(bit_choices or config.quant.bit_choices),
                                  num_heads=num_heads,
                                  activation_bits=config.quant.activation_bits,
                                  activation_mode="learned")


def quantized_logits(qapply: Callable) -> Callable:
  """`logits_fn(variables, batch)` of a quantized apply in eval mode; `variables` is
  `(params, qparams, bits_or_logits)` with `bits_or_logits` a Policy or logits."""
  return lambda variables, batch: apply_to_batch(qapply, variables, batch, deterministic=True)


def calibrate_activations(ctx: common.TaskContext, qapply: Callable, params: Any, qparams: Any,
                          bits_or_logits: Any) -> Any:
  """qparams whose activation step sizes start at the moving max|x| of a few training batches."""
  if isinstance(bits_or_logits, quant.Policy):
    input_bits = [m.input_bits(bits_or_logits.activation_bits) for m in bits_or_logits.matrices]
  else:
    input_bits = [ctx.config.quant.activation_bits]
  if not any(1 < bits < quant.FULL_PRECISION for bits in input_bits):
    return qparams  # No input has a step size (float or sign inputs only).

  def update(params, qparams, bits_or_logits, batch):
    return apply_to_batch(qapply, (params, qparams, bits_or_logits), batch, deterministic=True,
                          update_act_stats=True)[1]

  update = Jit(update, "calibrate_step")
  params, qparams, bits_or_logits = ctx.shard((params, qparams, bits_or_logits))
  stream = loop.batches_for(ctx.config, ctx.train_set, 0)
  for _ in range(ctx.config.quant.calibration_batches):
    batch = next(stream)
    qparams = update(params, qparams, bits_or_logits, sharding.shard_batch(batch, ctx.mesh))
  return qparams


# weights {"params", "qparams"} -> a scalar added to the loss.
Regularizer = Callable[[Any], jax.Array]


def distills(train_config: ml_collections.ConfigDict) -> bool:
  """Whether quantization-aware training learns from the teacher (logits or hidden states)."""
  return train_config.distill_alpha > 0 or train_config.distill_hidden_weight > 0


def make_student_loss(ctx: common.TaskContext, qapply: Callable) -> Callable:
  """The quantized model's training loss, shared by the QAT retrain and the AutoMPQ search.

  `loss(weights, bits_or_logits, batch, dropout_key, gumbel_key, tau, hard, teacher_params) ->
  (loss, aux)`: the task loss, mixed with distillation from the teacher (logits and layer outputs,
  `config.train.distill_*`) when `distills(config.train)`; `bits_or_logits` is a Policy, or logits
  sampled with `gumbel_key` at temperature `tau` (`search.make_search_step`'s `LossFn`).
  """
  train = ctx.config.train
  is_regression = ctx.task.is_regression
  distill = distills(train)

  def loss(weights, bits_or_logits, batch, dropout_key, gumbel_key, tau, hard, teacher_params):
    kwargs = dict(deterministic=False, rngs={"dropout": dropout_key}, key=gumbel_key, tau=tau,
                  hard=hard)
    if distill:
      kwargs["capture_intermediates"] = capture_layers
    out = apply_to_batch(qapply, (weights["params"], weights["qparams"], bits_or_logits), batch,
                         **kwargs)
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


def make_qat_step(ctx: common.TaskContext, qapply: Callable, optimizer,
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

  return Jit(step, "qat_step", donate_argnums=0, returns_state=True)


def train_quantized(ctx: common.TaskContext, stage: Path, spec: quant.QuantSpec,
                    policy: quant.Policy, params: Any, qparams: Any, teacher_params: Any, *,
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
    steps_per_epoch = ctx.train_set.steps_per_epoch(config.train.batch_size)
    total_steps = num_steps or loop.num_train_steps(config.train, steps_per_epoch)
    optimizer, schedule = optim.make_optimizer(config.train, total_steps,
                                               mask=optim.weights_decay_mask)
    calibrated = calibrate_activations(ctx, qapply, params, qparams, policy)
    state = ctx.shard(TrainState.create({"params": params, "qparams": calibrated}, optimizer))
    eval_step = make_eval_step(quantized_logits(qapply), ctx.task.is_regression,
                               "quant_eval_step")
    qat_step = make_qat_step(ctx, qapply, optimizer, regularizer)
    frozen = (ctx.shard(teacher_params if distills(config.train) else None),
              sharding.replicate(policy, ctx.mesh))
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
            **quant.size_report(jax.device_get(params), policy, layout=spec.layout),
            "steps": total_steps,
            "wall_time_s": time.time() - start}

  return common.cached_json(stage / "result.json", run)


def save_dev_predictions(ctx: common.TaskContext, stage: Path, eval_step: Callable,
                         variables: Any) -> Path:
  """The final model's dev predictions and the labels, in dev order (`dev_predictions.npz`):
  what paired comparisons between runs bootstrap over."""
  dev_set = ctx.eval_sets[ctx.dev_split]
  predictions, _ = loop.predict(eval_step, variables, dev_set, ctx.config, ctx.mesh)
  return files.write_npz(stage / "dev_predictions.npz",
                         {"predictions": predictions, "labels": dev_set.labels})


def stage_weights(stage: Path, params: Any, qparams: Any) -> dict[str, Any]:
  """The final {"params", "qparams"} of a finished `train_quantized` stage."""
  return common.restore_params(stage, {"params": params, "qparams": qparams})
