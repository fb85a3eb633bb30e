"""Pieces every compression pipeline shares: task context, data split, teacher, results.

A pipeline's workdir holds one sub-directory per stage (`teacher/`, `search/`, `retrain/`,
`uniform4/`, ...), each with its own checkpoints and `metrics.jsonl`; a finished stage leaves a
JSON file that a resumed run reads instead of redoing the stage.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from mpqbert import data, files, models, quant
from mpqbert.train import checkpoint, loop, results, sharding
from mpqbert.train.steps import make_eval_step, model_logits

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

  def shard(self, tree: Any) -> Any:
    """A copy of a state or weights on the mesh: BERT's matrices (and their quantizer parameters
    and logits) split over its `model` axis (`train.model_parallel`), the rest replicated."""
    return sharding.shard_state(tree, self.mesh, models.BERT_MODEL_PARALLEL)

  def evaluate(self, eval_step: Callable, variables: Any) -> Metrics:
    return {split: loop.evaluate(eval_step, variables, ds, self.task, self.config, self.mesh)
            for split, ds in self.eval_sets.items()}


def make_context(config: ml_collections.ConfigDict) -> TaskContext:
  tokenizer = models.load_tokenizer(config.model)
  task, train_set, eval_sets = loop.load_glue(config, tokenizer)
  model, params = loop.load_model(config, task.num_labels)
  mesh = sharding.make_mesh(model_parallel=config.train.model_parallel)
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
  if isinstance(dataset, data.StreamingSet):  # By a seeded hash of each stream position.
    return dataset.split(fraction, seed + 7919)
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
      "method": "finetune", "task": config.task, "model": config.model,
      "model_layers": config.model_layers, "seed": config.seed, "data": config.data.to_dict(),
      "train": config.teacher.train.to_dict(), "checkpoint": config.checkpoint.to_dict()})


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
            **quant.size_report(jax.device_get(params), layout=models.BERT_LAYOUT)}

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
             "git_commit": results.git_commit(), "device": results.device_description(),
             "config": ctx.config.to_dict()}
  results.write_results(workdir, summary)
  logging.info("table:\n%s", format_table(rows, ctx.task.main_metric))
  return summary
