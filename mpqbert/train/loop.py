"""Full-precision fine-tuning on a GLUE task: the `finetune` method of `mpqbert.main`."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import tqdm

from mpqbert import data, models, quant
from mpqbert.train import checkpoint, optim, results, sharding
from mpqbert.train.steps import TrainState, make_eval_step, make_train_step

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str) -> Any:
  if name not in _DTYPES:
    raise ValueError(f"train.dtype={name!r} is not supported; use one of {sorted(_DTYPES)}.")
  return _DTYPES[name]


def take_subset(dataset: data.TokenizedDataset, size: int, seed: int) -> data.TokenizedDataset:
  """The first `size` examples of a seeded permutation (`size <= 0` keeps everything)."""
  if size <= 0 or size >= len(dataset):
    return dataset
  keep = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:size])
  return data.TokenizedDataset(input_ids=[dataset.input_ids[i] for i in keep],
                               token_type_ids=[dataset.token_type_ids[i] for i in keep],
                               labels=dataset.labels[keep])


def load_glue(config, tokenizer) -> tuple[data.GlueTask, data.TokenizedDataset,
                                          dict[str, data.TokenizedDataset]]:
  """Tokenized train split (maybe subsampled) and every eval split of `config.task`."""
  task = data.get_task(config.task)
  glue_dir = data.resolve_glue_dir(config.data.glue_dir)
  encode = lambda split: data.tokenize(data.load_split(task, split, glue_dir), tokenizer,
                                       config.data.max_seq_length)
  train_set = take_subset(encode("train"), config.data.train_subset, config.seed)
  return task, train_set, {split: encode(split) for split in task.eval_splits}


def num_train_steps(train_config, steps_per_epoch: int) -> int:
  if train_config.num_train_steps > 0:
    return int(train_config.num_train_steps)
  return max(1, math.ceil(train_config.num_epochs * steps_per_epoch))


def evaluate(eval_step, params, dataset: data.TokenizedDataset, task: data.GlueTask, config,
             mesh) -> dict[str, float]:
  """GLUE metrics and mean loss of `params` on one eval split."""
  indices, predictions, loss_sum = [], [], 0.0
  for batch in data.eval_batches(dataset, config.train.eval_batch_size,
                                 max_seq_length=config.data.max_seq_length,
                                 pad_multiple=config.data.pad_multiple):
    indices.append(batch.pop("index"))
    out = jax.device_get(eval_step(params, sharding.shard_batch(batch, mesh)))
    predictions.append(out["predictions"])
    loss_sum += float(out["loss_sum"])
  ordered = data.restore_order(indices, predictions, len(dataset))
  metrics = data.glue_metrics(task, ordered, dataset.labels)
  return {**metrics, "loss": loss_sum / len(dataset)}


def _check_finite(loss: float, step: int, workdir: Path) -> None:
  if not math.isfinite(loss):
    raise FloatingPointError(
        f"training loss is {loss} at step {step}: the run diverged. Lower train.learning_rate, "
        "keep train.max_grad_norm > 0 or use train.dtype=float32, then rerun; checkpoints in "
        f"{workdir / 'checkpoints'} hold only steps with a finite loss.")


def finetune(config, workdir: str | Path) -> dict[str, Any]:
  """Fine-tunes `config.model` on `config.task`; resumes from the newest checkpoint in `workdir`.

  Writes `workdir/metrics.jsonl` and `workdir/results.json` and returns the results dict.
  """
  start_time = time.time()
  workdir = Path(workdir)
  checkpoint.guard_workdir(workdir, config.to_json())
  tokenizer = models.load_tokenizer(config.model)
  task, train_set, eval_sets = load_glue(config, tokenizer)
  model, params = models.load_pretrained(config.model, num_labels=task.num_labels,
                                         dtype=compute_dtype(config.train.dtype),
                                         remat=config.train.remat, seed=config.seed)

  mesh = sharding.make_mesh()
  sharding.check_batch_size(config.train.batch_size, mesh)
  sharding.check_batch_size(config.train.eval_batch_size, mesh)
  steps_per_epoch = data.num_train_batches(len(train_set), config.train.batch_size)
  total_steps = num_train_steps(config.train, steps_per_epoch)
  eval_every = config.train.eval_every_steps or steps_per_epoch
  optimizer, schedule = optim.make_optimizer(config.train, total_steps)

  state = sharding.replicate(TrainState.create(params, optimizer), mesh)
  manager = checkpoint.make_manager(workdir, config.checkpoint.every_steps, config.checkpoint.keep)
  restored = checkpoint.restore_latest(manager, state)
  state = state if restored is None else restored
  start_step = int(state.step)
  if start_step:
    logging.info("resuming %s from step %d", workdir, start_step)
  log = results.MetricsLog(workdir, start_step)
  train_step = make_train_step(model, optimizer, task.is_regression, dropout_seed=config.seed)
  eval_step = make_eval_step(model, task.is_regression)
  batches = data.train_batches_from(train_set, config.train.batch_size, seed=config.seed,
                                    start_step=start_step,
                                    max_seq_length=config.data.max_seq_length,
                                    pad_multiple=config.data.pad_multiple)
  logging.info("task=%s train=%d examples, %d steps/epoch, %d steps, %d devices", task.name,
               len(train_set), steps_per_epoch, total_steps, mesh.size)

  dev_metrics: dict[str, dict[str, float]] = {}
  window_losses, window_start, window_examples = [], time.time(), 0
  progress = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps,
                  desc=f"finetune {task.name}", unit="step", dynamic_ncols=True)
  for step in progress:
    batch = next(batches)
    window_examples += int(batch["weights"].sum())
    state, step_metrics = train_step(state, sharding.shard_batch(batch, mesh))
    window_losses.append(step_metrics["loss"])
    done = step + 1
    save_now = done % config.checkpoint.every_steps == 0 or done == total_steps
    if done % config.train.log_every_steps == 0 or save_now or done == total_steps:
      loss = float(np.mean(jax.device_get(window_losses)))
      _check_finite(loss, done, workdir)
      rate = window_examples / max(time.time() - window_start, 1e-9)
      row = {"loss": loss, "grad_norm": step_metrics["grad_norm"],
             "learning_rate": float(schedule(step)), "examples_per_sec": rate}
      log.write(done, "train", row)
      logging.info("step %d/%d train loss=%.4f lr=%.3g examples/s=%.1f", done, total_steps, loss,
                   row["learning_rate"], rate)
      progress.set_postfix(loss=f"{loss:.4f}")
      window_losses, window_start, window_examples = [], time.time(), 0
    if done % eval_every == 0 or done == total_steps:
      for split, dataset in eval_sets.items():
        dev_metrics[split] = evaluate(eval_step, state.params, dataset, task, config, mesh)
        log.write(done, split, dev_metrics[split])
        logging.info("step %d eval %s %s", done, split,
                     " ".join(f"{k}={v:.4f}" for k, v in dev_metrics[split].items()))
    if save_now:
      checkpoint.save(manager, done, state, force=True)
  manager.wait_until_finished()
  progress.close()

  if not dev_metrics:  # Resumed after the last step: evaluate the restored final state.
    dev_metrics = {split: evaluate(eval_step, state.params, dataset, task, config, mesh)
                   for split, dataset in eval_sets.items()}
  first_split = task.eval_splits[0]
  summary = {
      "task": task.name,
      "method": config.method,
      "model": config.model,
      "metric": task.main_metric,
      "dev": dev_metrics[first_split][task.main_metric],
      "dev_metrics": dev_metrics,
      **quant.size_report(jax.device_get(state.params)),
      "steps": total_steps,
      "train_examples": len(train_set),
      "wall_time_s": time.time() - start_time,
      "git_commit": results.git_commit(),
      "config": config.to_dict(),
  }
  results.write_results(workdir, summary)
  return summary
