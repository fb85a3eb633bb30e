"""Jitted functions that compile once per input signature and say so in the log.

    step = compiled.Jit(train_step, "qat_step", donate_argnums=0)
    state, metrics = step(state, batch, teacher_params, policy)

Every compilation is logged as `compiled <name> for <inputs> in <seconds> s`, so a researcher
can grep a run's log for where its time went. Large trees (teacher weights, frozen parameters,
the policy) are arguments of the step, never Python constants closed over: closed-over arrays
are embedded in the program, which makes it large and slow to compile.

The persistent compilation cache (`enable_persistent_cache`) makes a resumed or repeated run,
and a later stage whose program equals an earlier one's, load the executable instead of
compiling it again. It changes no result: the cache key is the program itself.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from absl import logging

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "mpqbert" / "xla"


def _leaf_signature(x: Any) -> tuple:
  return (np.shape(x), str(getattr(x, "dtype", type(x).__name__)),
          getattr(x, "weak_type", False), getattr(x, "sharding", None))


def _describe(tree: Any) -> str:
  """A short description of one argument: a batch's shape, else its array count and size."""
  if isinstance(tree, Mapping) and "input_ids" in tree:
    return "batch[" + ",".join(map(str, np.shape(tree["input_ids"]))) + "]"
  if isinstance(tree, tuple) and tree and all(isinstance(t, Mapping) and "input_ids" in t
                                              for t in tree):
    return " + ".join(_describe(t) for t in tree)
  leaves = jax.tree.leaves(tree)
  nbytes = sum(int(np.prod(np.shape(x))) * np.dtype(getattr(x, "dtype", np.float32)).itemsize
               for x in leaves)
  return f"{len(leaves)} arrays ({nbytes / 2**20:.1f} MiB)"


def _signature(args: tuple) -> tuple:
  leaves, treedef = jax.tree.flatten(args)
  return treedef, tuple(_leaf_signature(x) for x in leaves)


class Jit:
  """`jax.jit(fn)` that compiles ahead of time once per argument signature and logs it.

  The signature is the tree structure, shapes, dtypes and shardings of the arguments; a new one
  is lowered and compiled (through the persistent cache, when enabled) and the executable kept.
  `precompile` compiles several signatures at once, in parallel threads (XLA compiles one
  program on one core). `compilations` lists (signature description, seconds) of every
  compilation, for tests and benchmarks; `fn` is the traced function, `jitted` its `jax.jit`.

  `returns_state`: `fn(state, ...)` returns `(state, ...)`, and the new state is laid out like
  the argument (its shardings, e.g. split over a `model` mesh axis), not as the partitioner
  would pick: the next step then has the same signature, reuses this executable and the donated
  buffers.
  """

  def __init__(self, fn: Callable, name: str, *, donate_argnums: int | Sequence[int] = (),
               returns_state: bool = False):
    self.name, self.fn, self.returns_state = name, fn, returns_state
    self.jitted = jax.jit(fn, donate_argnums=donate_argnums)
    self._donate_argnums = donate_argnums
    self._executables: dict[Any, Any] = {}
    self.compilations: list[tuple[str, float]] = []

  def __call__(self, *args):
    key = _signature(args)
    if key not in self._executables:
      self.precompile([args])
    return self._executables[key](*args)

  def precompile(self, arg_sets: Sequence[tuple]) -> None:
    """Compiles every signature among `arg_sets` that has none yet, concurrently.

    Only shapes, dtypes and shardings of the arguments matter: nothing runs, nothing is donated.
    """
    todo = {}
    for args in arg_sets:
      key = _signature(args)
      if key not in self._executables and key not in todo:
        todo[key] = args
    if not todo:
      return

    def compile_one(item):
      key, args = item
      start = time.perf_counter()
      executable = self._jit_for(args).lower(*args).compile()
      return key, args, executable, time.perf_counter() - start

    with concurrent.futures.ThreadPoolExecutor(min(len(todo), os.cpu_count() or 1)) as pool:
      for key, args, executable, seconds in pool.map(compile_one, todo.items()):
        described = ", ".join(_describe(a) for a in args)
        self.compilations.append((described, seconds))
        logging.info("compiled %s for %s in %.1f s%s", self.name, described, seconds,
                     f" ({len(todo)} in parallel)" if len(todo) > 1 else "")
        self._executables[key] = executable

  def _jit_for(self, args: tuple) -> Any:
    """`jitted`, or with `returns_state` and a state laid out on a mesh (`sharding.shard_state`)
    a jit whose first output has the shardings of `args[0]` (the rest left to the partitioner)."""
    leaves = jax.tree.leaves(args[0]) if args else []
    on_mesh = lambda x: isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding)
    if not (self.returns_state and leaves and all(map(on_mesh, leaves))):
      return self.jitted
    layout = jax.tree.map(lambda x: x.sharding, args[0])
    return jax.jit(self.fn, donate_argnums=self._donate_argnums, out_shardings=(layout, None))

  def bind(self, *trailing: Any) -> "BoundJit":
    """This function with its last arguments fixed (the teacher, the policy, ...)."""
    return BoundJit(self, trailing)


@dataclasses.dataclass(frozen=True)
class BoundJit:
  """A `Jit` with fixed trailing arguments: `bound(state, batch) == jit(state, batch, *fixed)`."""

  jit: Jit
  trailing: tuple

  def __call__(self, *args):
    return self.jit(*args, *self.trailing)

  def precompile(self, arg_sets: Sequence[tuple]) -> None:
    self.jit.precompile([(*args, *self.trailing) for args in arg_sets])


@dataclasses.dataclass(frozen=True)
class Phased:
  """Two compiled steps, the host choosing by step number: `before` for the steps below
  `switch_step`, `after` from it on (the search's weights-only warm-up, then bilevel steps).

  A choice on the host instead of a `lax.cond` on the state's step inside one program: on a GPU a
  conditional copies its predicate to the host and waits for it, every step.
  """

  before: Jit | BoundJit
  after: Jit | BoundJit
  switch_step: int

  def at(self, step: int) -> Jit | BoundJit:
    return self.after if step >= self.switch_step else self.before

  def phases(self, start: int, stop: int) -> list[tuple[Jit | BoundJit, int]]:
    """(step function, number of steps) of the steps `start..stop-1`, in order."""
    split = min(max(self.switch_step, start), stop)
    return [(fn, count) for fn, count in ((self.before, split - start), (self.after, stop - split))
            if count > 0]

  def bind(self, *trailing: Any) -> "Phased":
    return Phased(self.before.bind(*trailing), self.after.bind(*trailing), self.switch_step)


def enable_persistent_cache(cache_dir: str | os.PathLike | None) -> Path | None:
  """Turns on JAX's on-disk compilation cache in `cache_dir` (None or "": leave it off).

  A directory already set through `JAX_COMPILATION_CACHE_DIR` wins over `cache_dir`. Every
  program is cached, however fast it compiled.
  """
  current = jax.config.jax_compilation_cache_dir
  if current:
    return Path(current)
  if not cache_dir:
    return None
  path = Path(cache_dir).expanduser()
  path.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  logging.info("persistent compilation cache: %s", path)
  return path
