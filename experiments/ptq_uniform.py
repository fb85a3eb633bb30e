r"""Post-training uniform quantization (no retraining) of the fine-tuned full-precision MiniLM.

Restores the full-precision checkpoints of `experiments/run_finetune_fp.sh`, quantizes the 36
encoder weight matrices (Q, K, V, attention output, FFN in and out of the 6 layers) with the
symmetric uniform quantizer of `mpqbert.quant` at 8, 4 and 2 bits with 1, 12 (one per head in Q, K
and V) and 128 sub-groups per matrix, and evaluates on the dev set. Three settings:

  (a) weights only, MSE scale init (the main table);
  (b) weights only, max-abs scale init (ablation);
  (c) weights as (a) + 8-bit Dense inputs, per-tensor scales calibrated with the moving max|x| over
      the first `--calibration_batches` training batches.

Embeddings, pooler, classifier, biases and LayerNorms stay float32 (they are `size_mb_other`).

  python experiments/ptq_uniform.py --tasks=sst2,mrpc --workdir_root=workdirs/finetune_fp \
      --glue_dir=../shared/data/glue --out=experiments/results/ptq_uniform --calibration_batches=8

Writes `<out>.{md,csv,json}`. One `QuantSpec` per group count holds every bit-width as a choice
and a `Policy` picks one, so changing the bit-width does not recompile (a one-hot mixture
reproduces the single quantizer exactly).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging as std_logging
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

from mpqbert import data, models, quant
from mpqbert.train import checkpoint, loop, optim, results, sharding, steps

REPO = Path(__file__).resolve().parents[1]

_TASKS = flags.DEFINE_list("tasks", ["sst2", "mrpc"], "GLUE tasks (fine-tuned workdirs needed).")
_WORKDIR_ROOT = flags.DEFINE_string("workdir_root", "workdirs/finetune_fp",
                                    "Folder holding one fine-tuned workdir per task.")
_GLUE_DIR = flags.DEFINE_string(
    "glue_dir", os.environ.get(data.GLUE_DIR_ENV_VAR) or "../shared/data/glue",
    "Local GLUE directory (relative paths: from the repository root).")
_OUT = flags.DEFINE_string("out", "experiments/results/ptq_uniform",
                           "Output path without extension (relative: from the repository root).")
_CALIBRATION_BATCHES = flags.DEFINE_integer(
    "calibration_batches", 8, "Training batches for the activation max|x| calibration.")
_BITS = flags.DEFINE_list("bits", ["8", "4", "2"], "Weight bit-widths.")
_GROUPS = flags.DEFINE_list("groups", ["1", "12", "128"], "Sub-groups per matrix.")

FP_BITS = quant.FULL_PRECISION


@dataclasses.dataclass(frozen=True)
class Setting:
  """One PTQ recipe: how the weight scales start and the bits of the Dense inputs."""

  name: str
  scale_init: str
  activation_bits: int
  label: str


SETTINGS = (
    Setting("w_mse", "mse", FP_BITS, "(a) weights only, MSE scale init (main)"),
    Setting("w_absmax", "absmax", FP_BITS, "(b) weights only, max-abs scale init (ablation)"),
    Setting("w_mse_a8", "mse", 8, "(c) weights MSE + 8-bit activations (moving max|x|)"),
)


@dataclasses.dataclass
class TaskRun:
  """A restored fine-tuned model and its data."""

  task: data.GlueTask
  config: ml_collections.ConfigDict
  model: Any
  params: Any
  dev_set: data.TokenizedDataset
  train_set: data.TokenizedDataset
  reported_dev: float


def from_repo(path: str) -> Path:
  """`path` as given if absolute, else relative to the repository root."""
  p = Path(path).expanduser()
  return p if p.is_absolute() else REPO / p


def finetune_command(task: str, workdir_root: str) -> str:
  """The command of `experiments/run_finetune_fp.sh` that creates `workdir_root/task`."""
  extra = (" --config.train.num_epochs=1 --config.train.eval_every_steps=500" if task == "sst2"
           else "")
  return (f"bash experiments/run_finetune_fp.sh {task} (into workdirs/finetune_fp), that is: "
          f"python -m mpqbert.main --config=configs/finetune.py --config.task={task} "
          f"--config.data.glue_dir=../shared/data/glue --config.checkpoint.keep=1{extra} "
          f"--workdir={workdir_root}/{task}")


def check_workdir(workdir: Path, task: str, workdir_root: str) -> None:
  """Fails with the command to run when the fine-tuned run is missing or unfinished."""
  fix = f"Create it with: {finetune_command(task, workdir_root)}"
  ckpt = workdir / "checkpoints"
  if not (workdir / checkpoint.CONFIG_FILE).is_file() or not ckpt.is_dir() or not any(
      p.name.isdigit() for p in ckpt.iterdir()):
    raise FileNotFoundError(f"no fine-tuned checkpoint for {task} in {ckpt}. {fix}")
  if not (workdir / "results.json").is_file():
    raise FileNotFoundError(f"{workdir} holds an unfinished fine-tuning run (no results.json); "
                            f"rerun its command to finish it (it resumes). {fix}")


def restore_params(workdir: Path, config: ml_collections.ConfigDict, model_params: Any,
                   total_steps: int) -> Any:
  """The fine-tuned params of the newest checkpoint in `workdir` (a TrainState template)."""
  optimizer, _ = optim.make_optimizer(config.train, max(1, total_steps))
  template = steps.TrainState.create(model_params, optimizer)
  manager = checkpoint.make_manager(workdir, config.checkpoint.every_steps, config.checkpoint.keep)
  state = checkpoint.restore_latest(manager, template)
  if state is None:
    raise FileNotFoundError(f"no checkpoint step found in {workdir / 'checkpoints'}.")
  logging.info("restored %s step %d", workdir, int(state.step))
  return state.params


def load_task(name: str, workdir_root: str, glue_dir: Path) -> TaskRun:
  """Restores the fine-tuned model of one task and tokenizes its train and dev splits."""
  workdir = from_repo(workdir_root) / name
  check_workdir(workdir, name, workdir_root)
  config = ml_collections.ConfigDict(json.loads((workdir / checkpoint.CONFIG_FILE).read_text()))
  config.data.glue_dir = str(glue_dir)
  reported = json.loads((workdir / "results.json").read_text())
  task, train_set, eval_sets = loop.load_glue(config, models.load_tokenizer(config.model))
  model, fresh = models.load_pretrained(config.model, num_labels=task.num_labels,
                                        dtype=loop.compute_dtype(config.train.dtype),
                                        seed=config.seed)
  params = restore_params(workdir, config, fresh, int(reported.get("steps", 1)))
  return TaskRun(task=task, config=config, model=model, params=params,
                 dev_set=eval_sets[task.eval_splits[0]], train_set=train_set,
                 reported_dev=float(reported["dev"]))


def make_calibration_step(qapply: Callable) -> Callable:
  """One moving-max|x| update of the activation scales on a batch."""

  def calibrate(params: Any, qparams: Any, policy: quant.Policy, batch: steps.Batch) -> Any:
    _, new_qparams = qapply(params, qparams, policy, batch["input_ids"],
                            attention_mask=batch["attention_mask"],
                            token_type_ids=batch["token_type_ids"], deterministic=True,
                            update_act_stats=True)
    return new_qparams

  return jax.jit(calibrate)


def calibrate(step: Callable, run: TaskRun, qparams: Any, policy: quant.Policy,
              num_batches: int) -> Any:
  """qparams whose activation scales saw the first `num_batches` training batches."""
  batches = data.train_batches_from(run.train_set, run.config.train.batch_size,
                                    seed=run.config.seed,
                                    max_seq_length=run.config.data.max_seq_length,
                                    pad_multiple=run.config.data.pad_multiple)
  for _ in range(num_batches):
    batch = next(batches)
    qparams = step(run.params, qparams, policy, {k: jnp.asarray(batch[k]) for k in
                                                 ("input_ids", "attention_mask", "token_type_ids")})
  return qparams


def evaluate(eval_step: Callable, variables: Any, run: TaskRun, mesh) -> dict[str, float]:
  """GLUE metrics (and loss) of one model on the dev split."""
  return loop.evaluate(eval_step, variables, run.dev_set, run.task, run.config, mesh)


def label_shares(run: TaskRun) -> list[float]:
  """Fraction of dev examples per class: the accuracy of always predicting that class."""
  counts = np.bincount(np.asarray(run.dev_set.labels).astype(np.int64),
                       minlength=run.task.num_labels)
  return (counts / counts.sum()).tolist()


def uncommitted_files() -> list[str]:
  """Files of the `mpqbert` package that differ from the git commit (the code that ran)."""
  try:
    status = subprocess.run(["git", "status", "--porcelain", "--", "mpqbert"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return []
  return sorted(line[3:] for line in status.splitlines() if line.strip())


def majority_metrics(run: TaskRun) -> dict[str, float]:
  """Dev metrics of always predicting the most frequent dev label (the chance level)."""
  labels = np.asarray(run.dev_set.labels)
  majority = np.bincount(labels.astype(np.int64)).argmax()
  return data.glue_metrics(run.task, np.full_like(labels, majority), labels)


def make_row(run: TaskRun, metrics: dict[str, float], *, setting: str, bits: int | str,
             groups: int | str, scale_init: str, activation_bits: int | str,
             size: dict[str, float], fp_dev: float | None, seconds: float) -> dict[str, Any]:
  """One table row (the CSV / JSON record)."""
  dev = metrics[run.task.main_metric]
  return {"task": run.task.name, "setting": setting, "metric": run.task.main_metric,
          "bits": bits, "groups": groups, "scale_init": scale_init,
          "activation_bits": activation_bits, "dev": dev, "accuracy": metrics["accuracy"],
          "delta_vs_fp": None if fp_dev is None else dev - fp_dev, "loss": metrics.get("loss"),
          "size_mb": size.get("size_mb"), "compression": size.get("compression"),
          "avg_bits": size.get("avg_bits"), "eval_s": seconds}


def log_row(row: dict[str, Any]) -> None:
  """The greppable result line."""
  fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
  keys = ("task", "setting", "bits", "groups", "scale_init", "activation_bits", "metric", "dev",
          "accuracy", "size_mb", "compression")
  line = "ptq " + " ".join(f"{k}={fmt(row[k])}" for k in keys)
  tqdm.write(line)


def run_task(run: TaskRun, bits_list: list[int], groups_list: list[int], num_calibration: int,
             mesh, progress: tqdm) -> list[dict[str, Any]]:
  """FP, majority-class and every (setting, bits, groups) row of one task."""
  t0 = time.time()
  fp_metrics = evaluate(steps.make_eval_step(steps.model_logits(run.model), run.task.is_regression),
                        run.params, run, mesh)
  fp_dev = fp_metrics[run.task.main_metric]
  rows = [make_row(run, fp_metrics, setting="fp", bits=FP_BITS, groups="-", scale_init="-",
                   activation_bits=FP_BITS,
                   size=quant.size_report(run.params, layout=models.BERT_LAYOUT), fp_dev=fp_dev,
                   seconds=time.time() - t0),
          make_row(run, majority_metrics(run), setting="majority", bits="-", groups="-",
                   scale_init="-", activation_bits="-", size={}, fp_dev=fp_dev, seconds=0.0)]
  for row in rows:
    log_row(row)
  if abs(fp_dev - run.reported_dev) > 1e-4:
    logging.warning("%s: restored FP dev %.4f differs from results.json %.4f", run.task.name,
                    fp_dev, run.reported_dev)
  progress.update()
  num_heads = run.model.config.num_attention_heads
  for groups in groups_list:
    spec = models.bert_encoder_spec(quantizer="symmetric", groups=groups,
                                   bit_choices=tuple(sorted(bits_list)), num_heads=num_heads,
                                   activation_mode="moving")
    plan = spec.plan(run.params)
    qapply = quant.transform(run.model.apply, spec)
    eval_step = steps.make_eval_step(
        lambda variables, batch: steps.apply_to_batch(qapply, variables, batch, deterministic=True),
        run.task.is_regression, "quant_eval_step")
    calibration_step = make_calibration_step(qapply)
    qparams_by_init: dict[str, Any] = {}
    for setting in SETTINGS:
      if setting.scale_init not in qparams_by_init:
        qparams_by_init[setting.scale_init] = quant.init_qparams(spec, run.params,
                                                                 scale_init=setting.scale_init)
      for bits in bits_list:
        t0 = time.time()
        policy = quant.uniform_policy(plan, bits, activation_bits=setting.activation_bits)
        qparams = qparams_by_init[setting.scale_init]
        if setting.activation_bits < FP_BITS:
          qparams = calibrate(calibration_step, run, qparams, policy, num_calibration)
        metrics = evaluate(eval_step, (run.params, qparams, policy), run, mesh)
        row = make_row(run, metrics, setting=setting.name, bits=bits, groups=groups,
                       scale_init=setting.scale_init, activation_bits=setting.activation_bits,
                       size=quant.size_report(run.params, policy,
                                              layout=models.BERT_LAYOUT), fp_dev=fp_dev,
                       seconds=time.time() - t0)
        rows.append(row)
        log_row(row)
        progress.update()
  rows.sort(key=_row_order)
  return [{**row, "fp_dev_reported": run.reported_dev} for row in rows]


def _row_order(row: dict[str, Any]) -> tuple[int, int, int]:
  """FP, majority class, then the settings in `SETTINGS` order; bits down, groups up."""
  names = ["fp", "majority"] + [s.name for s in SETTINGS]
  numeric = lambda v: v if isinstance(v, int) else 0
  return names.index(row["setting"]), -numeric(row["bits"]), numeric(row["groups"])


# --- Reports -----------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 4) -> str:
  if value is None or value == "":
    return ""
  if isinstance(value, float):
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"
  return str(value)


def markdown_table(rows: list[dict[str, Any]], with_accuracy: bool) -> list[str]:
  """The per-task table: FP, majority class, then the settings in `SETTINGS` order."""
  metric = rows[0]["metric"]
  header = ["setting", "bits", "groups", "scale init", "act bits", f"dev {metric}"]
  header += ["dev accuracy"] if with_accuracy else []
  header += ["Δ vs FP", "size_mb", "compression", "avg_bits"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in rows:
    cells = [r["setting"], r["bits"], r["groups"], r["scale_init"], r["activation_bits"],
             _fmt(r["dev"])] + ([_fmt(r["accuracy"])] if with_accuracy else [])
    cells += [_fmt(r["delta_vs_fp"]) if r["setting"] != "fp" else "",
              _fmt(r["size_mb"], 2), _fmt(r["compression"], 2), _fmt(r["avg_bits"], 2)]
    lines.append("| " + " | ".join(str(c) for c in cells) + " |")
  return lines


def _pick(rows: Iterable[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
  return [r for r in rows if all(r[k] == v for k, v in match.items())]


def observations(rows: list[dict[str, Any]], label_shares: list[float]) -> list[str]:
  """Sentences computed from one task's rows and dev label shares (nothing hard-coded)."""
  fp, chance = _pick(rows, setting="fp")[0], _pick(rows, setting="majority")[0]
  metric, out = fp["metric"], []
  out.append(f"Restored FP dev {metric} {fp['dev']:.4f} (results.json: "
             f"{fp['fp_dev_reported']:.4f}, |diff| {abs(fp['dev'] - fp['fp_dev_reported']):.1e}); "
             f"majority-class {metric} {chance['dev']:.4f}.")
  bits_list = sorted({r["bits"] for r in _pick(rows, setting="w_mse")}, reverse=True)
  for bits in bits_list:
    main = _pick(rows, setting="w_mse", bits=bits)
    deltas = [r["delta_vs_fp"] for r in main]
    low, high = min(r["compression"] for r in main), max(r["compression"] for r in main)
    compressions = [f"{low:.2f}x"] + ([f"{high:.2f}x"] if f"{high:.2f}" != f"{low:.2f}" else [])
    text = (f"{bits}-bit weights (MSE): " + ", ".join(f"G={r['groups']}: {r['dev']:.4f}"
                                                      for r in main)
            + f"; Δ vs FP {min(deltas):+.4f} to {max(deltas):+.4f}; compression "
            + " to ".join(compressions) + ".")
    if len(main) > 1:
      text += (f" G={main[-1]['groups']} minus G={main[0]['groups']}: "
               f"{main[-1]['dev'] - main[0]['dev']:+.4f}.")
    out.append(text)
  shares = ", ".join(f"{x:.4f}" for x in label_shares)
  constant = [r for r in rows if r["setting"] not in ("fp", "majority")
              and min(abs(r["accuracy"] - x) for x in label_shares) <= 0.02]
  if constant:
    out.append(f"Accuracy within 0.02 of a constant prediction (dev label shares {shares}), "
               "consistent with (near-)constant predictions: "
               + ", ".join(f"{r['setting']} {r['bits']}-bit G={r['groups']} ({r['accuracy']:.4f})"
                           for r in constant) + ".")
  else:
    out.append(f"No configuration's accuracy is within 0.02 of a constant prediction (dev label "
               f"shares {shares}).")
  below = [r for r in rows if r["setting"] not in ("fp", "majority")
           and r["accuracy"] <= chance["accuracy"]]
  if below:
    out.append(f"At or below the majority-class accuracy ({chance['accuracy']:.4f}): "
               + ", ".join(f"{r['setting']} {r['bits']}-bit G={r['groups']} ({r['accuracy']:.4f})"
                           for r in below) + ".")
  out += _setting_differences(rows, bits_list, "w_absmax",
                              "MSE minus max-abs scale init at {bits} bits: ", sign=-1)
  out += _setting_differences(rows, bits_list, "w_mse_a8",
                              "Adding 8-bit activations at {bits}-bit weights changes dev by ")
  return out


def _setting_differences(rows: list[dict[str, Any]], bits_list: Iterable[int], other: str,
                         label: str, sign: int = 1) -> list[str]:
  """Per bit-width: sign * (dev of `other` - dev of the main "w_mse" setting), per group count."""
  out = []
  for bits in bits_list:
    pairs = [(m, a) for m in _pick(rows, setting="w_mse", bits=bits)
             for a in _pick(rows, setting=other, bits=bits, groups=m["groups"])]
    diffs = [sign * (a["dev"] - m["dev"]) for m, a in pairs]
    if diffs:
      out.append(label.format(bits=bits)
                 + ", ".join(f"G={m['groups']}: {d:+.4f}" for (m, _), d in zip(pairs, diffs))
                 + f" (mean {np.mean(diffs):+.4f}).")
  return out


def write_markdown(path: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
  lines = ["# Post-training uniform quantization of the fine-tuned MiniLM (no retraining)", "",
           "```", meta["command"], "```", "",
           "Symmetric uniform quantization of the 36 encoder weight matrices (Q, K, V, attention "
           "output, FFN in/out of 6 layers) with one scale per sub-group. Sub-groups split each "
           "matrix's output neurons into G equal blocks (G=12: one per attention head for Q, K "
           "and V). Settings: " + "; ".join(s.label for s in SETTINGS) + ". Activation "
           "quantization (c) is per-tensor, on the inputs of the quantized Dense layers, "
           f"calibrated on {meta['calibration_batches']} training batches. Embeddings, pooler, "
           f"classifier, biases and LayerNorms stay float32 ({meta['size_mb_other']:.2f} MB, not "
           "in size_mb). size_mb counts the encoder matrices: bits × weights + one float32 scale "
           "per sub-group. `majority` = always predicting the most frequent dev label; Δ vs FP "
           "is on the main metric.", "",
           f"git commit `{meta['git_commit']}`"
           + (f" + uncommitted changes to {', '.join(meta['uncommitted'])}" if meta["uncommitted"]
              else "") + f", wall time {meta['wall_time_s']:.0f} s on "
           f"{meta['machine']}.", "", f"![dev metric vs size]({path.with_suffix('.png').name})",
           ""]
  for task in meta["tasks"]:
    task_rows = _pick(rows, task=task)
    metric = task_rows[0]["metric"]
    lines += [f"## {task} (dev {metric}{', accuracy' if metric != 'accuracy' else ''})", ""]
    lines += markdown_table(task_rows, with_accuracy=metric != "accuracy") + [""]
    notes = observations(task_rows, meta["label_shares"][task])
    lines += ["Observations:", ""] + [f"- {s}" for s in notes] + [""]
  path.write_text("\n".join(lines))


def write_outputs(out: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
  """`out`.csv (one row per configuration), .json (rows + run metadata) and .md."""
  out.parent.mkdir(parents=True, exist_ok=True)
  with out.with_suffix(".csv").open("w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
  write_markdown(out.with_suffix(".md"), rows, meta)
  plot_size_vs_dev(out.with_suffix(".png"), rows)


def plot_size_vs_dev(path: Path, rows: list[dict[str, Any]]) -> None:
  """One panel per task: dev metric against size_mb, a marker per setting (1/12/128 groups)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  tasks = list(dict.fromkeys(r["task"] for r in rows))
  fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
  markers = {"fp": "*", "w_mse": "o", "w_absmax": "x", "w_mse_a8": "s"}
  for ax, task in zip(axes[0], tasks):
    task_rows = [r for r in rows if r["task"] == task]
    for setting, marker in markers.items():
      points = [r for r in task_rows if r["setting"] == setting]
      ax.scatter([r["size_mb"] for r in points], [r["dev"] for r in points], marker=marker,
                 label=setting, s=80 if setting == "fp" else 36)
      for r in points:
        if setting == "w_mse" and r["groups"] == 1:  # G changes size_mb by < 1%: one label
          ax.annotate(f"{r['bits']}-bit", (r["size_mb"], r["dev"]), fontsize=8,
                      xytext=(3, 3), textcoords="offset points")
    chance = [r for r in task_rows if r["setting"] == "majority"]
    if chance:
      ax.axhline(chance[0]["dev"], color="gray", linestyle=":", label="majority class")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("size_mb (encoder matrices + scales, log2)")
    ax.set_ylabel(f"dev {task_rows[0]['metric']}")
    ax.set_title(f"{task}: post-training uniform quantization")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def command_line() -> str:
  flag_values = [f"--tasks={','.join(_TASKS.value)}", f"--workdir_root={_WORKDIR_ROOT.value}",
                 f"--glue_dir={_GLUE_DIR.value}", f"--out={_OUT.value}",
                 f"--calibration_batches={_CALIBRATION_BATCHES.value}"]
  if _BITS.value != _BITS.default:
    flag_values.append(f"--bits={','.join(_BITS.value)}")
  if _GROUPS.value != _GROUPS.default:
    flag_values.append(f"--groups={','.join(_GROUPS.value)}")
  return "python experiments/ptq_uniform.py " + " ".join(flag_values)


def _quiet_orbax_info(record: std_logging.LogRecord) -> bool:
  """Keeps Orbax's INFO chatter out of the log (its warnings still show).

  Compares with the standard library's WARNING (30): absl's `logging.WARNING` is its verbosity
  -1, which every record's levelno exceeds.
  """
  return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_quiet_orbax_info)
  start = time.time()
  bits_list = [int(b) for b in _BITS.value]
  groups_list = [int(g) for g in _GROUPS.value]
  glue_dir = from_repo(_GLUE_DIR.value)
  mesh = sharding.make_mesh()
  configs_per_task = 1 + len(SETTINGS) * len(bits_list) * len(groups_list)
  progress = tqdm(total=configs_per_task * len(_TASKS.value), desc="ptq", unit="config",
                  dynamic_ncols=True)
  rows, size_other, shares = [], None, {}
  uncommitted, commit = uncommitted_files(), results.git_commit()
  for name in _TASKS.value:
    try:
      run = load_task(name, _WORKDIR_ROOT.value, glue_dir)
    except FileNotFoundError as e:
      progress.close()
      sys.exit(f"error: {e}")
    size_other = quant.size_report(run.params, layout=models.BERT_LAYOUT)["size_mb_other"]
    shares[name] = label_shares(run)
    rows += run_task(run, bits_list, groups_list, _CALIBRATION_BATCHES.value, mesh, progress)
  progress.close()
  meta = {"command": command_line(), "tasks": list(_TASKS.value),
          "calibration_batches": _CALIBRATION_BATCHES.value, "size_mb_other": size_other,
          "settings": [dataclasses.asdict(s) for s in SETTINGS],
          "label_shares": shares, "git_commit": commit, "uncommitted": uncommitted,
          "wall_time_s": time.time() - start,
          "machine": f"{platform.machine()} CPU x{os.cpu_count()}, jax {jax.__version__} "
                     f"({jax.default_backend()})"}
  out = from_repo(_OUT.value)
  write_outputs(out, rows, meta)
  print(f"wrote {out}.{{md,csv,json}} ({len(rows)} rows, {meta['wall_time_s']:.0f} s)")


if __name__ == "__main__":
  app.run(main)
