"""Data-parallel sharding over all devices: batch split along the `data` mesh axis."""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
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


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D data-parallel mesh, by default over every device of every host."""
  return Mesh(np.asarray(jax.devices() if devices is None else devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  if batch_size % mesh.size:
    raise ValueError(f"batch size {batch_size} is not divisible by the {mesh.size} devices of the "
                     f"data-parallel mesh; pick a multiple of {mesh.size}.")


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Global host batch -> arrays split over the `data` axis.

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


def replicate(tree: Any, mesh: Mesh) -> Any:
  """A replicated copy of `tree` on `mesh`.

  Always a copy: train steps donate their state, and the caller's arrays (a teacher's weights,
  say) must survive that.
  """
  return jax.device_put(tree, replicated(mesh), may_alias=False)
