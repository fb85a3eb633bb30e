"""Sharding over a (`data`, `model`) device mesh: batches split along `data`; the encoder's
weight matrices, with their quantizer parameters and logits, optionally split along `model`.

With `model_parallel` = 1 (the default) the `model` axis has size 1 and every state is
replicated: plain data parallelism. With `model_parallel` = N > 1 the big matrices are split
Megatron-style over N devices (`state_shardings`), for models whose weights, optimizer moments,
K quantized copies and logits crowd one device; XLA's partitioner inserts the collectives.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mpqbert import data

DATA_AXIS = "data"
MODEL_AXIS = "model"
# How a weight matrix is split over the `model` axis: by output columns (its bias too) or by
# input rows (its bias replicated); a model's rules are (regex over parameter paths, split)
# pairs, e.g. `mpqbert.models.BERT_MODEL_PARALLEL`.
COLUMN, ROW = "column", "row"
SplitRules = Sequence[tuple[str, str]]
# Environment variables that mark a multi-host launch (set by the launcher, or by the user).
_MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


def maybe_initialize_distributed() -> None:
  """Calls `jax.distributed.initialize()` when launched as one of several processes.

  A multi-process launch is recognised by a coordinator address in the environment (JAX's own
  `JAX_COORDINATOR_ADDRESS`, with `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` where no cluster
  manager provides them), or by `MPQBERT_DISTRIBUTED=1` on a TPU pod or SLURM allocation that
  `jax.distributed.initialize` detects itself. CPU processes exchange collectives over gloo.
  """
  env = os.environ
  if not (any(env.get(v) for v in _MULTIHOST_ENV) or env.get("MPQBERT_DISTRIBUTED") == "1"):
    return
  counts = {}
  for name, key in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
    if env.get(key):
      try:
        counts[name] = int(env[key])
      except ValueError:
        raise ValueError(f"{key}={env[key]!r} must be an integer.") from None
  if not env.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**counts)
  logging.info("jax.distributed initialised: process %d of %d, %d local of %d devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def make_mesh(devices: Sequence[jax.Device] | None = None, *, model_parallel: int = 1) -> Mesh:
  """A (`data`, `model`) mesh, by default over every device of every host.

  `model_parallel` devices hold one copy of the model between them (the `model` axis, adjacent
  devices, so within one host); the rest of the devices are data parallel.
  """
  devices = np.asarray(jax.devices() if devices is None else devices)
  count = devices.size
  if model_parallel < 1 or count % model_parallel:
    raise ValueError(f"train.model_parallel={model_parallel} does not divide the {count} devices; "
                     f"use a divisor of {count} (1 for data parallelism alone).")
  local = jax.local_device_count()
  if jax.process_count() > 1 and local % model_parallel:
    raise ValueError(f"train.model_parallel={model_parallel} does not divide the {local} devices "
                     "of one process: the model axis must stay within a host (its collectives "
                     f"run in every layer); use a divisor of {local}.")
  return Mesh(devices.reshape(count // model_parallel, model_parallel), (DATA_AXIS, MODEL_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  """Refuses a batch that the `data` axis cannot split into equal rows."""
  size = mesh.shape[DATA_AXIS]
  if batch_size % size:
    raise ValueError(f"batch size {batch_size} is not divisible by the {size} data-parallel "
                     f"replicas of the mesh; pick a multiple of {size}.")


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Global host batch -> arrays split over the `data` axis (replicated over `model`).

  Every process builds the same global batch (the pipeline is deterministic) and contributes its
  own contiguous slice of rows.
  """
  sharding = data_sharded(mesh)
  count, index = jax.process_count(), jax.process_index()

  def local_rows(x: np.ndarray) -> np.ndarray:
    rows = x.shape[0] // count
    return x[index * rows:(index + 1) * rows]

  return {k: jax.make_array_from_process_local_data(sharding, local_rows(v))
          for k, v in batch.items()}


def fetch(tree: Any) -> Any:
  """`tree` as NumPy on every process: arrays split over several processes' devices (e.g. the
  per-example outputs of a sharded batch) are all-gathered, the rest copied from a local shard."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  return jax.tree.map(one, tree)


def gather_lengths(dataset: data.TokenizedDataset) -> data.TokenizedDataset:
  """`dataset` (tokenized by shards, `data.tokenize_shards`) with every example's length: each
  process measured those of its shards (the others are -1); one all-gather of N integers lets
  every process plan every shard's batches and so pad each batch to the same length."""
  lengths = dataset.lengths
  if (lengths < 0).any():
    lengths = np.asarray(multihost_utils.process_allgather(lengths)).reshape(-1, len(lengths))
    lengths = lengths.max(axis=0)
  if (lengths < 0).any():
    raise ValueError(f"{int((lengths < 0).sum())} training examples were tokenized by no process: "
                     "data.shards must cover every shard (shards_of_process).")
  return dataclasses.replace(dataset, known_lengths=lengths)


def gather_examples(dataset: data.TokenizedDataset) -> data.TokenizedDataset:
  """`dataset` with the tokens of every example on every process (for a small set that each
  process must evaluate whole, e.g. SensiMix's sensitivity examples): one all-gather of the
  padded token arrays."""
  if dataset.is_complete:
    return dataset
  n, width = len(dataset), max(int(dataset.lengths.max(initial=0)), 1)
  held = np.zeros(n, np.int32)
  tokens = np.zeros((2, n, width), np.int32)
  for i, (ids, types) in enumerate(zip(dataset.input_ids, dataset.token_type_ids)):
    if ids is not None:
      held[i], tokens[0, i, :len(ids)], tokens[1, i, :len(ids)] = 1, ids, types
  held_all, tokens_all = (np.asarray(x) for x in
                          multihost_utils.process_allgather((held, tokens)))
  holder = held_all.reshape(-1, n).argmax(axis=0)
  if not held_all.reshape(-1, n).max(axis=0).all():
    raise ValueError("some examples are held by no process; cannot gather them.")
  tokens_all = tokens_all.reshape(-1, 2, n, width)
  lengths = dataset.lengths
  ids = [tokens_all[holder[i], 0, i, :lengths[i]].copy() for i in range(n)]
  types = [tokens_all[holder[i], 1, i, :lengths[i]].copy() for i in range(n)]
  return dataclasses.replace(dataset, input_ids=ids, token_type_ids=types)


def _key_name(entry: Any) -> str:
  for field in ("key", "name", "idx"):
    if hasattr(entry, field):
      return str(getattr(entry, field))
  return str(entry)


def _split_of(path: str, rules: SplitRules) -> str | None:
  """COLUMN or ROW for a matrix path one of `rules` matches (`re.search`), else None."""
  for pattern, split in rules:
    if re.search(pattern, path):
      return split
  return None


def _along(axis: int, ndim: int) -> PartitionSpec:
  """`model` on `axis` of an ndim-array, nothing elsewhere."""
  spec = [None] * ndim
  spec[axis] = MODEL_AXIS
  return PartitionSpec(*spec)


def leaf_spec(keys: Sequence[str], shape: Sequence[int], rules: SplitRules,
              model_size: int) -> PartitionSpec:
  """The PartitionSpec of one leaf, from the names on its path and its shape.

  Matrices (a path `rules` match, through nested dicts: the weights and their optimizer
  moments): COLUMN ones `[in, out]` split on `out`, with their sibling `bias`; ROW ones on `in`.
  Per-matrix trees of `mpqbert.quant` (a dict keyed by the whole matrix path: qparams, logits,
  a policy's bits, their optimizer moments) follow their matrix's sub-groups, which are column
  blocks, so only those of COLUMN matrices are split: the leaf at the path (logits `[G, K]`,
  bits `[G]`) on its first axis, its named fields (`[K, G]` scales and ranges) on their last;
  scalars (activation scales) stay whole. Any leaf whose axis `model_size` does not divide (an
  odd G, say) is replicated, as is everything else (embeddings, norms, the head, step counts).
  """
  ndim = len(shape)
  if model_size == 1 or ndim == 0:
    return PartitionSpec()
  axis = None
  for i, key in enumerate(keys):  # quant's per-matrix trees: one key names the whole matrix.
    split = _split_of(key, rules) if "/" in key else None
    if split is not None:
      if split == COLUMN:
        axis = 0 if i == len(keys) - 1 else (ndim - 1 if ndim == 2 else None)
      break
  else:
    path = "/".join(keys)
    split = _split_of(path, rules)
    if split == COLUMN and ndim >= 2:
      axis = ndim - 1
    elif split == ROW and ndim >= 2:
      axis = ndim - 2
    elif split is None and keys and keys[-1] == "bias":
      kernel = "/".join([*keys[:-1], "kernel"])
      axis = ndim - 1 if _split_of(kernel, rules) == COLUMN else None
  if axis is None or shape[axis] % model_size:
    return PartitionSpec()
  return _along(axis, ndim)


def state_shardings(tree: Any, mesh: Mesh, rules: SplitRules = ()) -> Any:
  """`tree` (params, a train or search state, a teacher, ...) -> a NamedSharding per leaf on
  `mesh`: split over its `model` axis where `leaf_spec` says, else replicated; never split over
  `data` (every data-parallel replica holds the whole state). Pure: reads only names and shapes.
  """
  model_size = mesh.shape.get(MODEL_AXIS, 1)

  def one(path, leaf):
    keys = [_key_name(entry) for entry in path]
    return NamedSharding(mesh, leaf_spec(keys, np.shape(leaf), rules, model_size))

  return jax.tree_util.tree_map_with_path(one, tree)


def shard_state(tree: Any, mesh: Mesh, rules: SplitRules = ()) -> Any:
  """A copy of `tree` on `mesh`, laid out by `state_shardings` (no `rules`, or a `model` axis of
  size 1: replicated on every device).

  Always a copy: train steps donate their state, and the caller's arrays (a teacher's weights,
  say) must survive that.
  """
  return jax.device_put(tree, state_shardings(tree, mesh, rules), may_alias=False)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """A replicated copy of `tree` on `mesh` (small trees: a policy, logits to evaluate)."""
  return shard_state(tree, mesh)
