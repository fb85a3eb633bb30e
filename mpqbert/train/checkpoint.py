"""Orbax checkpointing of the train state, and the guard against reusing a workdir."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import traverse_util

from mpqbert import files

CONFIG_FILE = "config.json"
# Config keys (last component) that only lay the run out on devices: a run may resume under
# another value (Orbax restores the state onto the new mesh), and runs from before the key existed
# resume too.
_DEVICE_LAYOUT_KEYS = ("model_parallel",)
# Options added after runs were saved, with the value that reproduces those runs: a saved config
# without the key resumes under that value.
_ADDED_DEFAULTS = {"data.shards": 0, "data.streaming": False, "model_layers": 0}


def make_manager(workdir: str | Path, every_steps: int, keep: int) -> ocp.CheckpointManager:
  """Saves every `every_steps` steps (and the last), keeps the newest `keep` checkpoints."""
  options = ocp.CheckpointManagerOptions(save_interval_steps=max(1, every_steps),
                                         max_to_keep=max(1, keep), create=True)
  return ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints", options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, *, force: bool = False) -> bool:
  return manager.save(step, args=ocp.args.StandardSave(state), force=force)


def restore_latest(manager: ocp.CheckpointManager, target: Any) -> Any | None:
  """The newest saved state with the structure/shardings of `target`, or None for a fresh run."""
  step = manager.latest_step()
  if step is None:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def load_params(workdir: str | Path) -> Any:
  """The `params` entry of the newest checkpoint in `workdir/checkpoints`, as saved (no target)."""
  manager = ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints")
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints: the run there has not "
                            "saved yet; finish it (rerun its command) or point at another run.")
  return manager.restore(step, args=ocp.args.StandardRestore())["params"]


def shape_differences(expected: Any, found: Any) -> list[str]:
  """Each parameter path where `found` lacks, adds or reshapes a leaf of `expected`, in words."""
  want = traverse_util.flatten_dict(expected, sep="/")
  have = traverse_util.flatten_dict(found, sep="/")
  return ([f"{k} missing" for k in sorted(want.keys() - have.keys())]
          + [f"{k} unexpected" for k in sorted(have.keys() - want.keys())]
          + [f"{k}: saved {tuple(have[k].shape)}, model {tuple(want[k].shape)}"
             for k in sorted(want.keys() & have.keys())
             if tuple(have[k].shape) != tuple(want[k].shape)])


def _flat(config_dict: dict) -> dict[str, Any]:
  return traverse_util.flatten_dict(config_dict, sep=".")


def load_config(workdir: str | Path) -> ml_collections.ConfigDict:
  """The config a run in `workdir` saved, with the options added since it ran at the defaults
  that reproduce it (`_ADDED_DEFAULTS`)."""
  path = Path(workdir) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing: {workdir} holds no mpqbert run (its config is "
                            "written when the run starts); name the run's workdir.")
  saved = _flat(json.loads(path.read_text()))
  return ml_collections.ConfigDict(traverse_util.unflatten_dict(
      {**_ADDED_DEFAULTS, **saved}, sep="."))


def guard_workdir(workdir: str | Path, config_json: str) -> None:
  """Writes the run's config to the workdir, or checks it equals the one already there.

  Resuming a run with a different config would silently mix two experiments; the error lists the
  keys that differ. Device layout keys (`train.model_parallel`) are not compared, and a saved
  config without an option added since (`_ADDED_DEFAULTS`) counts as holding its default.
  """
  path = Path(workdir) / CONFIG_FILE
  current = json.loads(config_json)
  if path.exists():
    previous = json.loads(path.read_text())
    old, new = {**_ADDED_DEFAULTS, **_flat(previous)}, _flat(current)
    diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k)
                  and k.rsplit(".", 1)[-1] not in _DEVICE_LAYOUT_KEYS)
    if diff:
      details = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:6])
      raise ValueError(
          f"workdir {workdir} holds a run with a different config ({details}). Resume it with the "
          "same config, or pass a new --workdir for the new config.")
    return
  files.write_atomic(path, json.dumps(current, indent=2, sort_keys=True))
