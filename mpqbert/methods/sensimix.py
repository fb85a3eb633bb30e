"""SensiMix (Piao, Cho, Kang, PLoS ONE 2022) as one resumable pipeline.

  teacher -> split (fixed `num_8bit_layers`, or the least binarization-sensitive FFNs up to a
  size target) -> PT stage (1-bit FFNs still float) -> ILF stages (binarize FFNs top-down, one
  layer per stage) -> eval -> packed export -> packed inference, checked against the model
  it was exported from

Sensitive parts (every attention Q/K/V/O, the FFNs of the 8-bit layers, word and position
embeddings) get 8-bit min-max index quantization per tensor; the FFNs of the other layers get
1-bit value quantization sign(w) with sign-binarized inputs (an XNOR-popcount GEMM), trained with
the Absolute Binary Weight Regularization `lambda * sum mean((|W| - 1)^2)` over those FFNs in
every stage. The stages share the `config.train` budget (the last one `final_stage_shares` times
as much as each other); each starts from the previous stage's weights.

Why one module over 300 lines: it is one method, the paper's recipe and the switches that reproduce
the authors' code (`authors_code_apply`), which are easiest to check against the paper in one place.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import linen as nn
from flax import traverse_util

from mpqbert import data, export, models, quant
from mpqbert.methods import common, export_run, qat
from mpqbert.methods.report import plot_bit_map
from mpqbert.train import loop, sharding
from mpqbert.train.steps import make_eval_step

_ATTENTION = r"attention/(self/(query|key|value)|output/dense)/kernel$"
_FFN = r"(intermediate|output)/dense/kernel$"
_BINARY = ("sign", "xnor")


def _layers(layers: Sequence[int], tail: str) -> str:
  return rf"encoder/layer/({'|'.join(str(l) for l in sorted(layers))})/{tail}"


def sensimix_spec(eight_bit_ffn_layers: Sequence[int], binary_ffn_layers: Sequence[int], *,
                  weight_bits: int = 8, embedding_bits: int = 8, binary_scale: bool = False,
                  binary_groups: int = 1, ffn_input_bits: int = 1,
                  binary_input_clip: float | None = None) -> quant.QuantSpec:
  """Every attention matrix and the FFNs of `eight_bit_ffn_layers` at `weight_bits` index; the
  FFNs of `binary_ffn_layers` at 1 bit (sign, or xnor with `binary_scale`) with inputs at
  `ffn_input_bits` (`binary_input_clip`: see `QuantSpec`); FFNs in neither list stay float (the
  layers PT / ILF have not reached)."""
  if set(eight_bit_ffn_layers) & set(binary_ffn_layers):
    raise ValueError(f"layers {sorted(set(eight_bit_ffn_layers) & set(binary_ffn_layers))} are "
                     "both 8-bit and binary.")
  rules = [quant.Rule(pattern=r"encoder/layer/\d+/" + _ATTENTION, quantizer="index",
                      bit_choices=(weight_bits,))]
  if eight_bit_ffn_layers:
    rules.append(quant.Rule(pattern=_layers(eight_bit_ffn_layers, _FFN), quantizer="index",
                            bit_choices=(weight_bits,)))
  if binary_ffn_layers:
    rules.append(quant.Rule(pattern=_layers(binary_ffn_layers, _FFN),
                            quantizer="xnor" if binary_scale else "sign",
                            groups=binary_groups if binary_scale else 1, bit_choices=(1,),
                            activation_bits=ffn_input_bits))
  return quant.QuantSpec(rules=tuple(rules), layout=models.BERT_LAYOUT,
                         activation_bits=quant.FULL_PRECISION,
                         embedding_bits=embedding_bits, embedding_quantizer="index",
                         binary_input_clip=binary_input_clip)


def fixed_policy(spec: quant.QuantSpec, params: Any, *, other_bits: int) -> quant.Policy:
  """The only policy of a SensiMix spec: each matrix at its rule's one bit-width."""
  plan = spec.plan(params)
  return quant.Policy(bits={p: np.full((m.groups,), m.bit_choices[0], np.int32)
                            for p, m in plan.items()},
                      matrices=tuple(plan.values()), embedding_bits=spec.embedding_bits,
                      activation_bits=spec.activation_bits,
                      embedding_quantizer=spec.embedding_quantizer,
                      other_bits=other_bits).validate()


def stage_schedule(binary_layers: Sequence[int], *, prioritized: bool,
                   inverse_layerwise: bool) -> list[tuple[int, ...]]:
  """The binary FFN layers of each training stage.

  PT adds a first stage with none; ILF then adds one layer per stage from the top (the last
  layer first); without ILF every binary layer is binarized in one stage.
  """
  top_down = sorted(binary_layers, reverse=True)
  if not top_down:
    return [()]
  stages = [()] if prioritized else []
  if inverse_layerwise:
    stages += [tuple(sorted(top_down[:k])) for k in range(1, len(top_down) + 1)]
  else:
    stages.append(tuple(sorted(top_down)))
  return stages


def split_budget(total_steps: int, num_stages: int, final_shares: int = 1) -> list[int]:
  """`total_steps` shared by the stages in proportion 1 : ... : 1 : `final_shares`, the earlier
  stages taking the remainder. The last stage (every chosen FFN binary) is the model that ships,
  so it may train longer: the authors' six-epoch script gives it the last three epochs."""
  if final_shares < 1:
    raise ValueError(f"sensimix.final_stage_shares={final_shares} must be at least 1.")
  if total_steps < num_stages:
    raise ValueError(f"{total_steps} training steps cannot cover {num_stages} SensiMix stages; "
                     "raise train.num_train_steps (or train.num_epochs).")
  shares = [1] * (num_stages - 1) + [final_shares]
  spare = total_steps - num_stages  # Every stage gets one step, the rest goes by shares.
  steps = [1 + spare * share // sum(shares) for share in shares]
  for i in range(total_steps - sum(steps)):
    steps[i] += 1
  return steps


def authors_code_apply(apply_fn: Callable, *, sign_input_layers: Sequence[int] = (),
                       sign_residual_layers: Sequence[int] = (),
                       frozen_kernels: Sequence[str] = (),
                       one_sided_kernels: Sequence[str] = ()) -> Callable:
  """`apply_fn` (a BERT's `Module.apply`) with behaviours of the authors' code
  (snudm-starlab/SensiMix) that the quantizer does not give, each off when empty:

  sign_input_layers: these layers' FFN matrices take sign(x) inputs while their weights are still
    float (the authors binarize the inputs of the future 1-bit FFNs from prioritized training on).
  sign_residual_layers: the FFN block's residual is sign(x), the binarized input, instead of x
    (their in-place `input.data` overwrite).
  frozen_kernels: no task gradient reaches these kernels (their final stage: only ABWR, which is
    computed outside, moves them).
  one_sided_kernels: sign(w)'s straight-through gradient passes wherever w <= 1 (their clip, a
    duplicated line, zeroes it only above +1) instead of |w| <= 1. `w` enters the quantizer as
    `max(w, -1)` with an identity gradient: same sign, and the two-sided rule then passes below -1.
  """
  ffn_inputs = re.compile(_layers(sign_input_layers, _FFN)) if sign_input_layers else None
  residuals = (re.compile(rf"encoder/layer/({'|'.join(map(str, sign_residual_layers))})/output$")
               if sign_residual_layers else None)
  frozen, one_sided = set(frozen_kernels), set(one_sided_kernels)

  def interceptor(next_fun, args, kwargs, context):
    path = "/".join(context.module.path)
    if (ffn_inputs is not None and context.method_name == "quantize_operands"
        and ffn_inputs.search(path + "/kernel")):
      x, kernel = args
      return next_fun(quant.sign_ste(x, math.inf), kernel)
    if residuals is not None and context.method_name == "__call__" and residuals.search(path):
      hidden, residual, *rest = args
      return next_fun(hidden, quant.sign_ste(residual, math.inf), *rest, **kwargs)
    return next_fun(*args, **kwargs)

  def weights(params: Any) -> Any:
    flat = traverse_util.flatten_dict(params, sep="/")
    for path in frozen & set(flat):
      flat[path] = jax.lax.stop_gradient(flat[path])
    for path in one_sided & set(flat):
      w = flat[path]
      flat[path] = w + jax.lax.stop_gradient(jnp.maximum(w, -1.0) - w)
    return traverse_util.unflatten_dict(flat, sep="/")

  def apply(variables, *args, **kwargs):
    if frozen or one_sided:
      variables = {**variables, "params": weights(variables["params"])}
    with nn.intercept_methods(interceptor):
      return apply_fn(variables, *args, **kwargs)

  return apply


def abwr(params: Any, paths: Sequence[str]) -> jax.Array:
  """Absolute Binary Weight Regularization: sum over the matrices of mean((|W| - 1)^2)."""
  flat = quant.flatten_params(params)
  return sum(jnp.mean(jnp.square(jnp.abs(flat[p]) - 1.0)) for p in paths)


def choose_binary_layers(sensitivity: Mapping[int, float], size_mb: Callable[[tuple], float],
                         target_mb: float) -> tuple[int, ...]:
  """The least sensitive layers, added one at a time until `size_mb(layers) <= target_mb`."""
  chosen: list[int] = []
  for layer in sorted(sensitivity, key=lambda l: (sensitivity[l], -l)):
    if size_mb(tuple(sorted(chosen))) <= target_mb:
      break
    chosen.append(layer)
  size = size_mb(tuple(sorted(chosen)))
  if size > target_mb:
    raise ValueError(f"binarizing every FFN still leaves {size:.3f} MB, above the target "
                     f"{target_mb:.3f} MB; raise sensimix.target_size_mb or lower "
                     "sensimix.target_compression.")
  return tuple(sorted(chosen))


# ------------------------------------------------------------------------------------ pipeline


def config_spec(config, eight_bit: Sequence[int], binary: Sequence[int],
                embedding_bits: int | None = None) -> quant.QuantSpec:
  """`sensimix_spec` with `config.quant`'s numerics (embeddings at `embedding_bits` if given)."""
  qc = config.quant
  return sensimix_spec(eight_bit, binary, weight_bits=qc.weight_bits,
                       embedding_bits=qc.embedding_bits if embedding_bits is None
                       else embedding_bits, binary_scale=qc.binary_scale,
                       binary_groups=qc.binary_groups, ffn_input_bits=qc.ffn_input_bits,
                       binary_input_clip=qc.binary_input_clip)


def _mean_loss(ctx: common.TaskContext, spec: quant.QuantSpec, params: Any,
               dataset: data.TokenizedDataset) -> float:
  qapply = quant.transform(ctx.model.apply, spec)
  policy = fixed_policy(spec, params, other_bits=quant.FULL_PRECISION)
  qparams = qat.calibrate_activations(ctx, qapply, params, quant.init_qparams(spec, params),
                                         policy)
  eval_step = make_eval_step(qat.quantized_logits(qapply), ctx.task.is_regression,
                             "quant_eval_step")
  return loop.evaluate(eval_step, (params, qparams, policy), dataset, ctx.task, ctx.config,
                       ctx.mesh)["loss"]


def choose_split(ctx: common.TaskContext, teacher: Any) -> dict[str, Any]:
  """The binary FFN layers: the last ones (fixed), or by measured sensitivity (auto)."""
  config, sc = ctx.config, ctx.config.sensimix
  num_layers = ctx.model.config.num_hidden_layers
  if not 0 <= sc.num_8bit_layers <= num_layers:
    raise ValueError(f"sensimix.num_8bit_layers={sc.num_8bit_layers} must be in 0..{num_layers}.")
  fixed = tuple(range(sc.num_8bit_layers, num_layers))
  if sc.split == "fixed":
    return {"split": "fixed", "binary_layers": list(fixed)}
  if sc.split != "auto":
    raise ValueError(f"sensimix.split={sc.split!r}; use 'fixed' or 'auto'.")

  def size_mb(binary: tuple[int, ...]) -> float:
    spec = config_spec(config, [l for l in range(num_layers) if l not in binary], binary)
    policy = fixed_policy(spec, teacher, other_bits=config.quant.other_bits)
    return quant.size_report(jax.device_get(teacher), policy, layout=spec.layout)["size_mb"]

  if sc.target_size_mb is not None and sc.target_compression is not None:
    raise ValueError("set at most one of sensimix.target_size_mb and sensimix.target_compression.")
  if sc.target_size_mb is not None:
    target = float(sc.target_size_mb)
  elif sc.target_compression is not None:
    target = (quant.size_report(jax.device_get(teacher), layout=models.BERT_LAYOUT)["size_mb"]
              / sc.target_compression)
  else:
    target = size_mb(fixed)  # Equal size to the fixed split.
  _, search_set = common.split_for_search(ctx.train_set, sc.search_fraction, config.seed)
  keep = min(len(search_set), sc.sensitivity_batches * config.train.eval_batch_size)
  # Evaluated whole on every process: the first `keep` examples, gathered or read from the stream.
  search_set = (search_set.head(keep) if isinstance(search_set, data.StreamingSet)
                else sharding.gather_examples(search_set.select(slice(keep))))
  # Against the teacher with 8-bit attention and float FFNs: only the one FFN changes.
  base_loss = _mean_loss(ctx, config_spec(config, [], [],
                                          embedding_bits=quant.FULL_PRECISION),
                         teacher, search_set)
  sensitivity = {}
  for layer in range(num_layers):
    loss = _mean_loss(ctx, config_spec(config, [], [layer],
                                       embedding_bits=quant.FULL_PRECISION),
                      teacher, search_set)
    sensitivity[layer] = loss - base_loss
    logging.info("sensimix: binarizing layer %d's FFN alone raises the search-split loss by %.4f",
                 layer, sensitivity[layer])
  chosen = choose_binary_layers(sensitivity, size_mb, target)
  logging.info("sensimix: auto split binarizes layers %s (target %.3f MB)", chosen, target)
  return {"split": "auto", "binary_layers": list(chosen), "target_size_mb": target,
          "sensitivity": {str(l): v for l, v in sensitivity.items()},
          "base_loss": base_loss, "search_examples": keep}


def export_and_check(ctx: common.TaskContext, workdir: Path, spec: quant.QuantSpec,
                     policy: quant.Policy, params: Any, qparams: Any) -> dict[str, Any]:
  """Writes `packed.safetensors` and compares its predictions with the fake-quantized model's on
  dev."""
  params, qparams = jax.device_get((params, qparams))
  packed = export.export_packed(params, policy, qparams, config=ctx.model.config,
                                num_labels=ctx.task.num_labels)
  path = export.save_packed(packed, workdir / "packed.safetensors")
  check = export_run.packed_agreement(ctx, packed, spec, params, qparams)
  size = quant.size_report(params, policy, layout=spec.layout)
  logging.info("sensimix: packed model %s, %d bytes (%.0f expected), agreement with the "
               "fake-quantized model %.4f (that model against itself with its weights one ulp "
               "off: %.4f), dev %s", path, path.stat().st_size, size["size_mb_total"] * 2**20,
               check["agreement"], check["agreement_one_ulp"], check["dev_metrics"])
  return {"file": str(path), "file_bytes": path.stat().st_size,
          "array_bytes": export.packed_nbytes(packed),
          "matrix_bytes": export.packed_nbytes(packed, part="matrices"),
          "size_mb_bytes": size["size_mb"] * 2**20,
          "size_mb_total_bytes": size["size_mb_total"] * 2**20,
          "half_dtype": jnp.dtype(export.half_dtype()).name, **check}


def ffn_kernels(params: Any, layers: Sequence[int]) -> list[str]:
  """The paths of both FFN kernels of `layers`."""
  pattern = re.compile(_layers(layers, _FFN))
  return sorted(p for p in quant.flatten_params(params) if layers and pattern.search(p))


def stage_apply(ctx: common.TaskContext, params: Any, binary: Sequence[int],
                binary_now: Sequence[int], *, final: bool) -> Callable:
  """The model's forward in one stage, with the authors' code's behaviours the config asks for
  (`authors_code_apply`)."""
  sc, qc = ctx.config.sensimix, ctx.config.quant
  later = [l for l in binary if l not in binary_now]
  sign_inputs = later if sc.binarize_inputs_early and qc.ffn_input_bits == 1 else []
  sign_now = list(binary_now) if qc.ffn_input_bits == 1 else []
  if sc.one_sided_weight_clip and qc.binary_scale:
    raise ValueError("sensimix.one_sided_weight_clip reproduces the unscaled sign quantizer's "
                     "gradient; it cannot be combined with quant.binary_scale.")
  return authors_code_apply(
      ctx.model.apply, sign_input_layers=sign_inputs,
      sign_residual_layers=sign_now + sign_inputs if sc.binary_input_residual else (),
      frozen_kernels=ffn_kernels(params, binary_now) if sc.freeze_binary_signs and final else (),
      one_sided_kernels=ffn_kernels(params, binary_now) if sc.one_sided_weight_clip else ())


def run(config, workdir) -> dict[str, Any]:
  """SensiMix from the teacher: split, PT and ILF stages with ABWR, eval, packed export."""
  start, workdir, ctx, teacher, full_precision = common.start_pipeline(config, workdir)
  sc = config.sensimix
  num_layers = ctx.model.config.num_hidden_layers
  split = common.cached_json(workdir / "split.json", lambda: choose_split(ctx, teacher))
  binary = tuple(split["binary_layers"])
  eight_bit = [l for l in range(num_layers) if l not in binary]
  stages = stage_schedule(binary, prioritized=sc.prioritized_training,
                          inverse_layerwise=sc.inverse_layerwise)
  steps_per_epoch = ctx.train_set.steps_per_epoch(config.train.batch_size)
  budget = split_budget(loop.num_train_steps(config.train, steps_per_epoch), len(stages),
                        sc.final_stage_shares)
  logging.info("sensimix: binary FFN layers %s; stages %s with %s steps", binary, stages, budget)
  # ABWR pulls every FFN the split binarizes toward |w| = 1 from the first stage on, so that
  # binarizing it in its ILF stage changes its output little (the authors: classification only).
  regularizer = None
  if ffn_kernels(teacher, binary) and sc.abwr_weight > 0 and (
      sc.abwr_on_regression or not ctx.task.is_regression):
    regularizer = lambda w: sc.abwr_weight * abwr(w["params"], ffn_kernels(teacher, binary))
  if sc.init not in ("pretrained", "teacher"):
    raise ValueError(f"sensimix.init={sc.init!r}; use 'pretrained' (the authors') or 'teacher'.")
  params = ctx.pretrained_params if sc.init == "pretrained" else teacher
  stage_log, result = [], {}
  for i, (binary_now, steps) in enumerate(zip(stages, budget)):
    spec = config_spec(config, eight_bit, binary_now)
    policy = fixed_policy(spec, params, other_bits=config.quant.other_bits)
    qparams = quant.init_qparams(spec, params)
    stage = workdir / f"stage{i}"
    result = qat.train_quantized(ctx, stage, spec, policy, params, qparams, teacher,
                                    num_steps=steps, regularizer=regularizer,
                                    apply_fn=stage_apply(ctx, params, binary, binary_now,
                                                         final=i == len(stages) - 1))
    weights = qat.stage_weights(stage, params, qparams)
    params, qparams = weights["params"], weights["qparams"]
    stage_log.append({"stage": i, "binary_layers": list(binary_now), "steps": steps,
                      "dev": result["dev"], "size_mb": result["size_mb"]})
    logging.info("sensimix stage %d (binary FFN layers %s): dev %s = %.4f, %.3f MB", i,
                 list(binary_now), ctx.task.main_metric, result["dev"], result["size_mb"])
  if sc.binary_input_residual:  # The packed kernels compute the model without it.
    packed = {"skipped": "sensimix.binary_input_residual: packed inference keeps the float "
                         "residual, so it would not match this model"}
  else:
    packed = common.cached_json(workdir / "export.json", lambda: export_and_check(
        ctx, workdir, spec, policy, params, qparams))
  policy.save(workdir / "policy.json")
  plot_bit_map(policy, workdir / "bit_map.png",
               title=f"sensimix {ctx.task.name}: {result['size_mb']:.3f} MB, "
                     f"{result['compression']:.1f}x, dev {result['dev']:.4f}")
  result = {**result, "steps": sum(budget)}
  rows = [common.row("full precision", full_precision), common.row("sensimix", result)]
  return common.write_summary(ctx, workdir, method="sensimix", result=result, rows=rows,
                              start_time=start, split=split, stages=stage_log, export=packed,
                              full_precision_total_mb=full_precision["size_mb_total"])
