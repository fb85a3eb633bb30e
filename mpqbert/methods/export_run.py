"""A finished run (uniform, Q-BERT, HAWQ, AutoMPQ or SensiMix) to a packed checkpoint, and the
packed model's dev predictions against the fake-quantized model it came from.

  python -m mpqbert.export --workdir=workdirs/compression/mrpc/automp16 \
      --out=/tmp/automp16.safetensors

reads the run's `config.json`, `policy.json` and the newest checkpoint of its final stage
(`retrain/`, or SensiMix's last `stage<i>/`), writes the packed file (safetensors,
`export.save_packed`) and `<out>.json` with its sizes against the run's `size_mb`, and (with
`check_dev`, `check_int8`) the packed model's, or its int8 CPU layout's (`export.lay_out`), dev
predictions against the fake-quantized model's, next to that model's agreement with itself when its
weights move by one float32 ulp (the floor rounding sets; far below 1 for models with sign(x)
inputs). It lives
with the pipelines, above `mpqbert.export` (the format and the kernels' inference), which imports
nothing of the runs.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mpqbert import data, export, files, quant
from mpqbert.methods import common, qat
from mpqbert.models.layout import BERT_LAYOUT
from mpqbert.models.pretrained import pretrained_config
from mpqbert.train import checkpoint, loop
from mpqbert.train.steps import apply_to_batch, make_eval_step


def final_stage(workdir: Path) -> Path:
  """The stage directory that holds the run's final quantized weights."""
  if (workdir / "retrain" / "checkpoints").is_dir():
    return workdir / "retrain"
  stages = sorted((p for p in workdir.glob("stage*") if re.fullmatch(r"stage\d+", p.name)),
                  key=lambda p: int(p.name[5:]))
  if stages and (stages[-1] / "checkpoints").is_dir():
    return stages[-1]
  raise FileNotFoundError(f"{workdir} has no retrain/ or stage<i>/ checkpoints; export a run of "
                          "configs/uniform.py, qbert.py, hawq.py, automp.py or sensimix.py.")


def spec_from_policy(policy: quant.Policy) -> quant.QuantSpec:
  """A QuantSpec whose plan is exactly the policy's matrices (one rule per matrix), for the
  fake-quantized model the policy was trained as."""
  rules = [quant.Rule(pattern=re.escape(m.path) + "$", quantizer=m.quantizer, groups=m.groups,
                      bit_choices=m.bit_choices, learn_range=m.learn_range,
                      activation_bits=m.activation_bits) for m in policy.matrices]
  return quant.QuantSpec(rules=tuple(rules), layout=BERT_LAYOUT,
                         activation_bits=policy.activation_bits,
                         activation_mode="moving", embedding_bits=policy.embedding_bits,
                         embedding_quantizer=policy.embedding_quantizer)


def export_run(workdir: str | Path, out: str | Path, *, check_dev: bool = False,
               check_int8: bool = False) -> dict[str, Any]:
  """Packs the final model of the run in `workdir` into `out` (a .safetensors path); returns
  (and writes to `<out>.json`) the file's bytes against the run's reported sizes: `file_bytes` =
  `header_bytes` (safetensors' length prefix and JSON header, metadata included) + `all_bytes`
  (the arrays; `matrix_bytes` of them the encoder matrices, what `size_mb` counts) + the input
  step sizes (`act_scale`, 4 bytes per matrix with quantized inputs). `check_dev`: the packed
  model's dev predictions against the fake-quantized model's; `check_int8`: the same for its int8
  CPU layout (`export.lay_out`), under "int8"."""
  workdir, out = Path(workdir), Path(out)
  if not (workdir / "results.json").is_file():
    raise FileNotFoundError(f"{workdir}/results.json is missing: the run is not finished (or "
                            "not an mpqbert run); finish it with the same command first.")
  config = checkpoint.load_config(workdir)
  policy = quant.Policy.load(workdir / "policy.json")
  stage = final_stage(workdir)
  saved = checkpoint.load_params(stage)
  params, qparams = saved["params"], saved["qparams"]
  bert_config = pretrained_config(config.model, config.model_layers)
  num_labels = data.get_task(config.task).num_labels
  packed = export.export_packed(params, policy, qparams, config=bert_config,
                                num_labels=num_labels)
  path = export.save_packed(packed, out)
  size = quant.size_report(params, policy, layout=BERT_LAYOUT)
  report = {"workdir": str(workdir), "stage": stage.name, "file": str(path),
            "file_bytes": path.stat().st_size,
            "header_bytes": files.safetensors_header_bytes(path),
            "matrix_bytes": export.packed_nbytes(packed, part="matrices"),
            "size_mb_bytes": size["size_mb"] * 2**20,
            "all_bytes": export.packed_nbytes(packed),
            "size_mb_total_bytes": size["size_mb_total"] * 2**20}
  report["matrix_bytes_over_size_mb"] = report["matrix_bytes"] / report["size_mb_bytes"]
  if check_dev or check_int8:
    ctx, spec = common.make_context(config), spec_from_policy(policy)
    reference = fake_reference(ctx, spec, params, qparams, policy)
    packed = jax.device_get(packed)
    if check_dev:
      report.update(packed_agreement(ctx, export.lay_out_for_kernels(packed), spec, params,
                                     qparams, reference=reference))
    if check_int8:
      report["int8"] = {"input_kinds": dict(Counter(export.input_kinds(packed).values())),
                        **packed_agreement(ctx, export.lay_out(packed, "int8"), spec, params,
                                           qparams, reference=reference)}
  Path(f"{out}.json").write_text(json.dumps(report, indent=2) + "\n")
  return report


def predict_packed(ctx: common.TaskContext, served: export.PackedModel | export.IntegerModel,
                   dataset: data.TokenizedDataset) -> np.ndarray:
  """Dev predictions of a packed model (`PackedModel.apply`, the kernels of this backend) or of
  its int8 layout (`IntegerModel.apply`)."""
  def logits_fn(served, batch):
    return apply_to_batch(lambda *args, **kwargs: served.apply(*args, **kwargs), (), batch,
                          deterministic=True)

  eval_step = make_eval_step(logits_fn, ctx.task.is_regression, "packed_eval_step")
  return loop.predict(eval_step, served, dataset, ctx.config, ctx.mesh)[0]


def fake_predictions(ctx: common.TaskContext, spec: quant.QuantSpec, params: Any, qparams: Any,
                     policy: quant.Policy) -> np.ndarray:
  """Dev predictions of the fake-quantized model (`quant.transform`) a run trained."""
  eval_step = make_eval_step(qat.quantized_logits(quant.transform(ctx.model.apply, spec)),
                             ctx.task.is_regression, "quant_eval_step")
  dev = ctx.eval_sets[ctx.dev_split]
  return np.asarray(loop.predict(eval_step, (params, qparams, policy), dev, ctx.config,
                                 ctx.mesh)[0])


def nudge_last_bit(params: Any, seed: int = 0) -> Any:
  """`params` with every nonzero float32 value moved one unit in the last place, up or down at
  random (zeros and other dtypes kept, so no sign(w) changes): the size of the rounding
  differences between two correct implementations of one model."""
  rng = np.random.default_rng(seed)

  def nudge(x: Any) -> Any:
    x = np.asarray(x)
    if x.dtype != np.float32:
      return x
    toward = np.where(rng.random(x.shape) < 0.5, -np.inf, np.inf).astype(np.float32)
    return np.where(x == 0, x, np.nextafter(x, toward))

  return jax.tree_util.tree_map(nudge, params)


def prediction_agreement(task: data.GlueTask, a: np.ndarray, b: np.ndarray) -> dict[str, float]:
  """The share of dev examples where two models predict alike: equal labels, or for regression
  |difference| <= 0.05 (with the largest difference)."""
  if task.is_regression:
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return {"agreement": float(np.mean(diff <= 0.05)), "max_abs_diff": float(diff.max())}
  return {"agreement": float(np.mean(a == b))}


def fake_reference(ctx: common.TaskContext, spec: quant.QuantSpec, params: Any, qparams: Any,
                   policy: quant.Policy) -> dict[str, Any]:
  """The fake-quantized model's dev predictions and metrics, and its agreement with itself (and
  its metrics) when every weight moves by one float32 ulp (`nudge_last_bit`): the floor that
  rounding alone sets for any served form of it. Models with sign(x) inputs can sit far below 1
  there, since a last-bit change flips sign(x) near 0 and the flip grows through later layers."""
  fake = fake_predictions(ctx, spec, params, qparams, policy)
  nudged = fake_predictions(ctx, spec, nudge_last_bit(params), qparams, policy)
  labels = ctx.eval_sets[ctx.dev_split].labels
  return {"predictions": fake,
          "agreement_one_ulp": prediction_agreement(ctx.task, fake, nudged)["agreement"],
          "fake_dev_metrics": data.glue_metrics(ctx.task, fake, labels),
          "one_ulp_dev_metrics": data.glue_metrics(ctx.task, nudged, labels)}


def packed_agreement(ctx: common.TaskContext, served: export.PackedModel | export.IntegerModel,
                     spec: quant.QuantSpec, params: Any, qparams: Any, *,
                     reference: dict[str, Any] | None = None) -> dict[str, Any]:
  """Dev predictions of a packed model (or its int8 layout) against the fake-quantized model it
  was exported from (`reference`: its `fake_reference`, when already computed): the share of
  alike predictions (`prediction_agreement`), the one-ulp floor, and the dev metrics of the served,
  the fake-quantized and the nudged model. The export is at fault where `agreement` falls clearly
  below `agreement_one_ulp`."""
  if reference is None:
    reference = fake_reference(ctx, spec, params, qparams, served.policy)
  dev = ctx.eval_sets[ctx.dev_split]
  start = time.time()
  served = np.asarray(predict_packed(ctx, served, dev))
  return {"dev_examples": len(dev), "predict_wall_s": time.time() - start,
          "dev_metrics": data.glue_metrics(ctx.task, served, dev.labels),
          **prediction_agreement(ctx.task, reference["predictions"], served),
          **{k: v for k, v in reference.items() if k != "predictions"}}
