r"""Why a SensiMix stage breaks: its model at the start of an ILF stage, before it trains.

Restores the final weights of stage k-1 of a SensiMix run and evaluates them on dev twice more
under stage k's quantization (one more layer's FFN at 1 bit): with unscaled sign(w) weights (the
authors', `quant.binary_scale=False`) and with XNOR-Net's per-matrix mean|w| scale. For each it
gives the dev metric and loss, the spread of a regression's predictions, and on one training batch
the RMS of the newly binarized layer's FFN output next to that of the residual it is added to
before the LayerNorm: the ratio says how much of the attention block's output survives that
LayerNorm.

  python experiments/sensimix_stage_jump.py --run=workdirs/study/stsb/sensimix_seed0 --stage=1 \
      --out=experiments/results/sensimix_stage_jump_stsb.md

Needs only the run's `config.json`, `split.json` and `stage<k-1>/checkpoints` (not its teacher).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from flax import linen as nn

from mpqbert import data, quant
from mpqbert.methods import common, qat, sensimix
from mpqbert.train import loop, results
from mpqbert.train.steps import apply_to_batch, make_eval_step

_RUN = flags.DEFINE_string("run", None, "A SensiMix workdir whose stage k-1 has finished.",
                           required=True)
_STAGE = flags.DEFINE_integer("stage", 1, "The stage k to inspect at its start (k >= 1).")
_GLUE_DIR = flags.DEFINE_string("glue_dir", None, "GLUE directory (default: the run's).")
_OUT = flags.DEFINE_string("out", None, "Markdown file to write (default: print only).")


def ffn_rms(apply_fn: Callable, variables: tuple, batch: dict, layer: int) -> dict[str, float]:
  """RMS over `batch` of layer `layer`'s FFN output (its output dense, before the residual add)
  and of that residual (the attention block's output), from one forward of `apply_fn`."""
  seen: dict[str, float] = {}

  def rms(x) -> float:
    return float(jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32)))))

  def interceptor(next_fun, args, kwargs, context):
    path = "/".join(context.module.path)
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__":
      if path.endswith(f"encoder/layer/{layer}/output"):
        seen["residual_rms"] = rms(args[1])
      elif path.endswith(f"encoder/layer/{layer}/output/dense"):
        seen["ffn_out_rms"] = rms(out)
    return out

  with nn.intercept_methods(interceptor):
    apply_to_batch(apply_fn, variables, batch, deterministic=True)
  if set(seen) != {"residual_rms", "ffn_out_rms"}:
    raise ValueError(f"the forward has no encoder/layer/{layer}/output block; the model has "
                     "fewer layers.")
  return seen


def eight_bit_layers(ctx: common.TaskContext, binary: tuple[int, ...]) -> list[int]:
  """The layers whose FFNs the split keeps at 8 bits."""
  return [l for l in range(ctx.model.config.num_hidden_layers) if l not in binary]


def evaluate_stage_start(ctx: common.TaskContext, params: Any, qparams: Any,
                         binary: tuple[int, ...], binary_now: tuple[int, ...],
                         layer: int) -> dict[str, Any]:
  """Dev metrics, prediction spread and `ffn_rms` of `params` under the stage whose binary FFN
  layers are `binary_now` (of the split's `binary`), with `ctx.config`'s quantizer."""
  spec = sensimix.config_spec(ctx.config, eight_bit_layers(ctx, binary), binary_now)
  policy = sensimix.fixed_policy(spec, params, other_bits=ctx.config.quant.other_bits)
  qapply = quant.transform(sensimix.stage_apply(ctx, params, binary, binary_now, final=False),
                           spec)
  qparams = qat.calibrate_activations(ctx, qapply, params, qparams, policy)
  eval_step = make_eval_step(qat.quantized_logits(qapply), ctx.task.is_regression,
                             "stage_jump_eval")
  variables = (params, qparams, policy)
  dev = ctx.eval_sets[ctx.dev_split]
  predictions, loss_sum = loop.predict(eval_step, variables, dev, ctx.config, ctx.mesh)
  metrics = {**data.glue_metrics(ctx.task, predictions, dev.labels), "loss": loss_sum / len(dev)}
  batch = next(loop.batches_for(ctx.config, ctx.train_set, 0))
  return {"binary_layers": list(binary_now), "binary_scale": bool(ctx.config.quant.binary_scale),
          "metrics": metrics, "prediction_mean": float(np.mean(predictions)),
          "prediction_std": float(np.std(predictions)),
          **ffn_rms(qapply, variables, batch, layer)}


def stage_jump(run: Path, stage: int, glue_dir: str | None = None) -> dict[str, Any]:
  """Stage `stage - 1` as trained, then its weights under stage `stage` with and without the
  XNOR scale."""
  config = ml_collections.ConfigDict(json.loads((run / "config.json").read_text()))
  if glue_dir:
    config.data.glue_dir = glue_dir
  split = json.loads((run / "split.json").read_text())
  binary = tuple(split["binary_layers"])
  stages = sensimix.stage_schedule(binary, prioritized=config.sensimix.prioritized_training,
                                   inverse_layerwise=config.sensimix.inverse_layerwise)
  if not 1 <= stage < len(stages):
    raise ValueError(f"--stage={stage}: this run has stages 0..{len(stages) - 1}; pick one "
                     "that binarizes more than the stage before it (1 or later).")
  turned = sorted(set(stages[stage]) - set(stages[stage - 1]))
  if len(turned) != 1:
    raise ValueError(f"stage {stage} binarizes layers {turned} at once (no ILF); this tool "
                     "inspects one layer's turn.")
  layer = turned[0]
  ctx = common.make_context(config)
  eight_bit = eight_bit_layers(ctx, binary)
  before = sensimix.config_spec(config, eight_bit, stages[stage - 1])
  template = ctx.pretrained_params
  weights = qat.stage_weights(run / f"stage{stage - 1}", template,
                              quant.init_qparams(before, template))
  params = weights["params"]
  rows = [evaluate_stage_start(ctx, params, weights["qparams"], binary, stages[stage - 1], layer)]
  for scale in (config.quant.binary_scale, not config.quant.binary_scale):
    ctx.config = ml_collections.ConfigDict(config.to_dict())
    ctx.config.quant.binary_scale = scale
    after = sensimix.config_spec(ctx.config, eight_bit, stages[stage])
    rows.append(evaluate_stage_start(ctx, params, quant.init_qparams(after, params), binary,
                                     stages[stage], layer))
  labels = ctx.eval_sets[ctx.dev_split].labels
  return {"run": str(run), "stage": stage, "layer": layer, "task": ctx.task.name,
          "metric": ctx.task.main_metric, "regression": ctx.task.is_regression,
          "label_mean": float(np.mean(labels)), "label_std": float(np.std(labels)), "rows": rows,
          "dev_split": ctx.dev_split, "git_commit": results.git_commit(),
          "device": results.device_description()}


def to_markdown(report: dict[str, Any], command: str) -> str:
  """The report as a table, with its command, commit and device."""
  metric, split = report["metric"], report["dev_split"]
  spread = " | prediction mean ± std" if report["regression"] else ""
  lines = [f"# SensiMix on {report['task']}: layer {report['layer']}'s FFN turns 1-bit "
           f"(stage {report['stage']}), before it trains", "",
           f"`{command}`", "", f"Commit {report['git_commit'][:10]}, {report['device']}. Run: "
           f"`{report['run']}`.", "",
           f"| model | binary FFN layers | dev {metric} | dev loss{spread} | layer "
           f"{report['layer']} FFN output RMS | residual RMS | ratio |",
           "|---|---|---:|---:|" + ("---:|" if spread else "") + "---:|---:|---:|"]
  names = [f"stage {report['stage'] - 1} as trained"] + [
      f"its weights, stage {report['stage']} quantizer, "
      + ("XNOR mean\\|w\\| scale" if row["binary_scale"] else "unscaled sign(w)")
      for row in report["rows"][1:]]
  for name, row in zip(names, report["rows"]):
    dev = row["metrics"]
    cells = [name, str(row["binary_layers"]), f"{100 * dev[metric]:.2f}", f"{dev['loss']:.3f}"]
    if spread:
      cells.append(f"{row['prediction_mean']:.2f} ± {row['prediction_std']:.2f}")
    cells += [f"{row['ffn_out_rms']:.2f}", f"{row['residual_rms']:.2f}",
              f"{row['ffn_out_rms'] / row['residual_rms']:.1f}"]
    lines.append("| " + " | ".join(cells) + " |")
  if report["regression"]:
    lines += ["", f"Dev labels: mean {report['label_mean']:.2f} ± {report['label_std']:.2f}."]
  return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
  del argv
  report = stage_jump(Path(_RUN.value), _STAGE.value, _GLUE_DIR.value)
  text = to_markdown(report, "python experiments/sensimix_stage_jump.py " + " ".join(sys.argv[1:]))
  print(text)
  if _OUT.value:
    Path(_OUT.value).write_text(text)
    Path(_OUT.value).with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
  app.run(main)
