"""Full-precision fine-tuning on a GLUE task: the `finetune` method of `mpqbert.main`."""

from __future__ import annotations

import concurrent.futures
import itertools
import math
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import tqdm

from mpqbert import data, models, quant
from mpqbert.train import checkpoint, compiled, optim, results, sharding
from mpqbert.train.steps import TrainState, make_eval_step, make_train_step, model_logits

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str) -> Any:
  if name not in _DTYPES:
    raise ValueError(f"train.dtype={name!r} is not supported; use one of {sorted(_DTYPES)}.")
  return _DTYPES[name]


def take_subset(dataset: Any, size: int, seed: int) -> Any:
  """The first `size` examples (of `data.Examples` or a `data.TokenizedDataset`) of a seeded
  permutation, in dataset order (`size <= 0` keeps everything)."""
  if size <= 0 or size >= len(dataset):
    return dataset
  if isinstance(dataset, data.StreamingSet):
    raise ValueError(f"cannot take a subset of {size} examples of a streamed split; set the "
                     "option that asked for it (e.g. search.train_subset) to 0, or "
                     "data.streaming=False.")
  return dataset.select(np.sort(np.random.default_rng(seed).permutation(len(dataset))[:size]))


def data_shards(config) -> int:
  """`config.data.shards`, 0 meaning one shard per process (also for configs saved before the
  option existed)."""
  shards = int(config.data.get("shards", 0))
  if shards < 0:
    raise ValueError(f"data.shards={shards} must be >= 0 (0: one per process).")
  return shards or jax.process_count()


def load_glue(config, tokenizer) -> tuple[data.GlueTask, data.TokenizedDataset,
                                          dict[str, data.TokenizedDataset]]:
  """The train split (maybe subsampled), tokenized by shards, and every eval split of
  `config.task`, tokenized whole.

  Training example i (after subsampling) is in shard i % `data.shards`; each process tokenizes
  the shards whose batch rows it feeds (`data.shards_of_process`) and learns the others' lengths
  from one all-gather, so a job of P processes tokenizes the split once, not P times. The batch
  order depends on the seed and `data.shards`, not on the process count.
  """
  task = data.get_task(config.task)
  glue_dir = data.resolve_glue_dir(config.data.glue_dir)
  shards = data_shards(config)
  own = data.shards_of_process(shards, jax.process_index(), jax.process_count())
  if config.data.get("streaming", False):
    if config.data.train_subset > 0:
      raise ValueError("data.train_subset does not apply to a streamed training split; set "
                       "data.streaming=False to subsample a split held in memory.")
    train_set = data.streaming.load_stream(task, "train", glue_dir, num_shards=shards,
                                           tokenizer=tokenizer,
                                           max_seq_length=config.data.max_seq_length)
    logging.info("data: process %d streams shards %d-%d of %d of %d training examples",
                 jax.process_index(), own.start, own.stop - 1, shards, len(train_set))
  else:
    examples = take_subset(data.load_split(task, "train", glue_dir), config.data.train_subset,
                           config.seed)
    train_set = sharding.gather_lengths(data.tokenize_shards(
        examples, tokenizer, config.data.max_seq_length, num_shards=shards, own=own))
    logging.info("data: process %d tokenized %d of %d training examples (shards %d-%d of %d)",
                 jax.process_index(), sum(x is not None for x in train_set.input_ids),
                 len(train_set), own.start, own.stop - 1, shards)
  eval_sets = {split: data.tokenize(data.load_split(task, split, glue_dir), tokenizer,
                                    config.data.max_seq_length) for split in task.eval_splits}
  return task, train_set, eval_sets


def num_train_steps(train_config, steps_per_epoch: int) -> int:
  if train_config.num_train_steps > 0:
    return int(train_config.num_train_steps)
  return max(1, math.ceil(train_config.num_epochs * steps_per_epoch))


def predict(eval_step, params, dataset: data.TokenizedDataset, config,
            mesh) -> tuple[np.ndarray, float]:
  """Predictions of `eval_step` for every example of `dataset`, in its order, and the loss sum.

  The outputs stay on the devices until the last batch is dispatched and come back in one
  transfer: a copy per batch would wait for each batch before the next is sent (a host
  synchronisation per batch on an accelerator).
  """
  indices, outputs = [], []
  for batch in data.eval_batches(dataset, config.train.eval_batch_size,
                                 max_seq_length=config.data.max_seq_length,
                                 pad_multiple=config.data.pad_multiple):
    indices.append(batch.pop("index"))
    outputs.append(eval_step(params, sharding.shard_batch(batch, mesh)))
  outputs = sharding.fetch(outputs)
  predictions = [out["predictions"] for out in outputs]
  loss_sum = float(sum(np.float64(out["loss_sum"]) for out in outputs))
  return data.restore_order(indices, predictions, len(dataset)), loss_sum


def evaluate(eval_step, params, dataset: data.TokenizedDataset, task: data.GlueTask, config,
             mesh) -> dict[str, float]:
  """GLUE metrics and mean loss of `params` on one eval split."""
  predictions, loss_sum = predict(eval_step, params, dataset, config, mesh)
  metrics = data.glue_metrics(task, predictions, dataset.labels)
  return {**metrics, "loss": loss_sum / len(dataset)}


def _check_finite(loss: float, step: int, workdir: Path) -> None:
  if not math.isfinite(loss):
    raise FloatingPointError(
        f"training loss is {loss} at step {step}: the run diverged. Lower train.learning_rate, "
        "keep train.max_grad_norm > 0 or use train.dtype=float32, then rerun; checkpoints in "
        f"{workdir / 'checkpoints'} hold only steps with a finite loss.")


def _shard(batch: Any, mesh) -> Any:
  """A batch dict, or a tuple of them (the search's weight and architecture batches), on `mesh`."""
  if isinstance(batch, tuple):
    return tuple(sharding.shard_batch(b, mesh) for b in batch)
  return sharding.shard_batch(batch, mesh)


def _num_examples(batch: Any) -> int:
  first = batch[0] if isinstance(batch, tuple) else batch
  return int(first["weights"].sum())


def _precompile(train_step: Any, state: Any, stream, start: int, stop: int, mesh) -> None:
  """Compiles `train_step` for every batch shape of the steps `start..stop-1` at once.

  A stage sees a few sequence lengths; compiled one after the other as they first appear, they
  cost one core each while the other idles. `precompile` (a `compiled.Jit`) compiles them in
  parallel before the first step; the programs of a `compiled.Phased` step compile side by side,
  each for the shapes of its own steps.
  """
  phases = (train_step.phases(start, stop) if isinstance(train_step, compiled.Phased)
            else [(train_step, stop - start)])
  jobs = []
  for fn, count in phases:
    examples = {}
    for batch in itertools.islice(stream, count):
      examples.setdefault(tuple(np.shape(x) for x in jax.tree.leaves(batch)), batch)
    if hasattr(fn, "precompile"):
      jobs.append((fn, [(state, _shard(batch, mesh)) for batch in examples.values()]))
  with concurrent.futures.ThreadPoolExecutor(max(1, len(jobs))) as pool:
    list(pool.map(lambda job: job[0].precompile(job[1]), jobs))


def train_loop(*, name: str, workdir: Path, state: Any, train_step: Callable, batches: Callable,
               total_steps: int, evaluate_fn: Callable[[Any], dict[str, dict[str, float]]],
               config, mesh, eval_every: int, learning_rate: Callable | None = None
               ) -> tuple[Any, dict[str, dict[str, float]]]:
  """The resumable loop every stage shares: step, log, evaluate, checkpoint.

  `state` has a `step` field and is the whole checkpointed state; `batches(start_step)` yields
  the batches from a step on (a dict, or a tuple of dicts); `train_step(state, batch)` returns
  `(state, metrics)` with a scalar "loss" among them (a `compiled.Jit` is first compiled for
  every batch shape of the stage, in parallel; a `compiled.Phased` picks its program by the
  step number); `evaluate_fn(state)` returns metrics per
  eval split. Resumes from the newest checkpoint in `workdir/checkpoints`; rows of
  `workdir/metrics.jsonl` past it are dropped. Returns the final state and its eval metrics.
  """
  manager = checkpoint.make_manager(workdir, config.checkpoint.every_steps, config.checkpoint.keep)
  restored = checkpoint.restore_latest(manager, state)
  state = state if restored is None else restored
  start_step = int(state.step)
  if start_step:
    logging.info("%s: resuming %s from step %d", name, workdir, start_step)
  log = results.MetricsLog(workdir, start_step)
  _precompile(train_step, state, batches(start_step), start_step, total_steps, mesh)
  stream = data.prefetch(batches(start_step))
  eval_metrics: dict[str, dict[str, float]] = {}
  window, window_start, window_examples = [], time.time(), 0
  progress = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps,
                  desc=name, unit="step", dynamic_ncols=True)
  for step in progress:
    batch = next(stream)
    window_examples += _num_examples(batch)
    step_fn = train_step.at(step) if isinstance(train_step, compiled.Phased) else train_step
    state, step_metrics = step_fn(state, _shard(batch, mesh))
    window.append(step_metrics)
    done = step + 1
    save_now = done % config.checkpoint.every_steps == 0 or done == total_steps
    if done % config.train.log_every_steps == 0 or save_now:
      means = {k: float(np.mean(v)) for k, v in
               jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *window)).items()}
      _check_finite(means["loss"], done, workdir)
      row = {**means, "examples_per_sec": window_examples / max(time.time() - window_start, 1e-9)}
      if learning_rate is not None:
        row["learning_rate"] = float(learning_rate(step))
      log.write(done, "train", row)
      logging.info("%s step %d/%d train %s", name, done, total_steps,
                   " ".join(f"{k}={v:.4g}" for k, v in row.items()))
      progress.set_postfix(loss=f"{means['loss']:.4f}")
      window, window_start, window_examples = [], time.time(), 0
    if done % eval_every == 0 or done == total_steps:
      eval_metrics = evaluate_fn(state)
      for split, metrics in eval_metrics.items():
        log.write(done, split, metrics)
        logging.info("%s step %d eval %s %s", name, done, split,
                     " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    if save_now:
      checkpoint.save(manager, done, state, force=True)
  stream.close()  # Stops the prefetching thread.
  manager.wait_until_finished()
  progress.close()
  if not eval_metrics:  # Resumed after the last step: evaluate the restored final state.
    eval_metrics = evaluate_fn(state)
  return state, eval_metrics


def load_model(config, num_labels: int):
  """`(model, params)` of `config.model` (its first `config.model_layers` layers) with a
  `num_labels` head, in the configured compute dtype."""
  return models.load_pretrained(config.model, num_labels=num_labels,
                                dtype=compute_dtype(config.train.dtype),
                                remat=config.train.remat, seed=config.seed,
                                num_layers=config.model_layers)


def finetune(config, workdir: str | Path) -> dict[str, Any]:
  """Fine-tunes `config.model` on `config.task`; resumes from the newest checkpoint in `workdir`.

  Writes `workdir/metrics.jsonl` and `workdir/results.json` and returns the results dict.
  """
  start_time = time.time()
  workdir = Path(workdir)
  checkpoint.guard_workdir(workdir, config.to_json())
  tokenizer = models.load_tokenizer(config.model)
  task, train_set, eval_sets = load_glue(config, tokenizer)
  model, params = load_model(config, task.num_labels)
  state, dev_metrics, total_steps = train_full_precision(config, workdir, model, params, task,
                                                         train_set, eval_sets)
  summary = {
      "task": task.name,
      "method": config.method,
      "model": config.model,
      "metric": task.main_metric,
      "dev": dev_metrics[task.eval_splits[0]][task.main_metric],
      "dev_metrics": dev_metrics,
      **quant.size_report(jax.device_get(state.params), layout=models.BERT_LAYOUT),
      "steps": total_steps,
      "train_examples": len(train_set),
      "wall_time_s": time.time() - start_time,
      "git_commit": results.git_commit(),
      "device": results.device_description(),
      "config": config.to_dict(),
  }
  results.write_results(workdir, summary)
  return summary


def train_full_precision(config, workdir: Path, model, params: Any, task: data.GlueTask,
                         train_set: data.TokenizedDataset,
                         eval_sets: dict[str, data.TokenizedDataset]
                         ) -> tuple[TrainState, dict[str, dict[str, float]], int]:
  """AdamW fine-tuning of `params` under `config.train`, checkpointed in `workdir`."""
  mesh = sharding.make_mesh(model_parallel=config.train.model_parallel)
  sharding.check_batch_size(config.train.batch_size, mesh)
  sharding.check_batch_size(config.train.eval_batch_size, mesh)
  steps_per_epoch = train_set.steps_per_epoch(config.train.batch_size)
  total_steps = num_train_steps(config.train, steps_per_epoch)
  optimizer, schedule = optim.make_optimizer(config.train, total_steps)
  state = sharding.shard_state(TrainState.create(params, optimizer), mesh,
                               models.BERT_MODEL_PARALLEL)
  train_step = make_train_step(model, optimizer, task.is_regression, dropout_seed=config.seed)
  eval_step = make_eval_step(model_logits(model), task.is_regression)
  logging.info("finetune task=%s train=%d examples, %d steps/epoch, %d steps, %d devices %s",
               task.name, len(train_set), steps_per_epoch, total_steps, mesh.size,
               dict(mesh.shape))
  state, dev_metrics = train_loop(
      name=f"finetune {task.name}", workdir=workdir, state=state, train_step=train_step,
      batches=lambda start: batches_for(config, train_set, start),
      total_steps=total_steps,
      evaluate_fn=lambda s: {split: evaluate(eval_step, s.params, ds, task, config, mesh)
                             for split, ds in eval_sets.items()},
      config=config, mesh=mesh, eval_every=config.train.eval_every_steps or steps_per_epoch,
      learning_rate=schedule)
  return state, dev_metrics, total_steps


def batches_for(config, dataset: data.TokenizedDataset | data.StreamingSet, start_step: int,
                batch_size: int | None = None, seed_offset: int = 0):
  """The seeded, resumable training batch stream of `config` over `dataset` (held in memory, or
  streamed: then this process reads its shards, padded to max_seq_length when other processes
  read the rest, so that every process builds batches of one shape)."""
  batch_size = batch_size or config.train.batch_size
  seed = config.seed + seed_offset
  if isinstance(dataset, data.StreamingSet):
    own = data.shards_of_process(dataset.num_shards, jax.process_index(), jax.process_count())
    return data.streaming.global_batches(
        dataset, batch_size, seed=seed, own=own, start_step=start_step,
        pad_multiple=config.data.pad_multiple,
        fixed_length=None if len(own) == dataset.num_shards else dataset.max_seq_length)
  return data.train_batches_from(dataset, batch_size, seed=seed, start_step=start_step,
                                 max_seq_length=config.data.max_seq_length,
                                 pad_multiple=config.data.pad_multiple)


def paired_batches(config, first: data.TokenizedDataset | data.StreamingSet,
                   second: data.TokenizedDataset | data.StreamingSet, start_step: int,
                   batch_size: int | None = None):
  """Two seeded batch streams side by side (the search's weight and architecture batches), the
  second seeded `config.seed + 1`; each pair padded to its longer length, so a step that takes
  both compiles once per length, not once per pair of lengths."""
  for a, b in zip(batches_for(config, first, start_step, batch_size),
                  batches_for(config, second, start_step, batch_size, seed_offset=1)):
    length = max(a["input_ids"].shape[1], b["input_ids"].shape[1])
    yield data.pad_to_length(a, length), data.pad_to_length(b, length)
