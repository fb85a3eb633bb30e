"""Training batches from a streamed split, for GLUE-style tasks too large to hold in memory.

`batching.train_batches_from` shuffles a whole tokenized split held in memory. A split too large
for that (or for tokenizing up front) is read here as a stream instead, behind the same batch
contract (see `batching`'s docstring): the same keys, dtypes, dummy rows and bucketed lengths.

* `StreamingSet` describes the split: a function that opens a fresh pass over one shard of the
  stream, and the split's example count, known up front (steps per epoch need it).
* Shard s holds the examples at stream positions i with i % num_shards == s, so each process
  materializes and tokenizes only the shards it trains on. (The source may still have to be
  scanned past the other shards' rows: see `from_iterable_dataset`.)
* `train_batches_from` yields one shard's endless stream of batches. Its order is a pure function
  of (seed, shard, epoch, step): windows of `bucket_window * batch_size` examples are read in
  stream order, and each is shuffled, sorted by length and cut into batches with an rng seeded by
  (seed, epoch, shard, window). So a run resumes at a step by reading past whole windows without
  tokenizing them, with no iterator state in the checkpoint.
* `StreamingSet.split` carves out the search split of a search by a seeded hash of each
  example's stream position, so both parts stream without an index in memory.

Unlike the in-memory path, examples are only shuffled within a window: windows come in stream
order every epoch, so a larger `bucket_window` mixes more (at the cost of memory per window).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from absl import logging

from mpqbert.data import batching
from mpqbert.data import glue
from mpqbert.data.batching import Batch
from mpqbert.data.batching import TokenizedDataset
from mpqbert.data.glue import Examples
from mpqbert.data.glue import GlueTask

# One example: (text_a, text_b or None, label).
Example = tuple[str, str | None, int | float]

# Stream positions hashed per NumPy call when filtering by `keep`.
_HASH_CHUNK = 1024

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def position_hash(seed: int, positions: np.ndarray) -> np.ndarray:
  """u(i) in [0, 1) for each stream position i: a pure function of (seed, i).

  u(i) is the top 53 bits of output number i (counting from 0) of the splitmix64 generator
  whose state starts at seed mod 2**64, i.e. mix(seed + (i + 1) * 0x9E3779B97F4A7C15 mod 2**64)
  scaled to [0, 1). Vectorized over a NumPy array of positions (uint64 arithmetic wraps).
  """
  state = np.full(np.shape(positions), seed % 2**64, dtype=np.uint64)
  z = state + (np.asarray(positions, dtype=np.uint64) + np.uint64(1)) * _GOLDEN
  z = (z ^ (z >> np.uint64(30))) * _MIX1
  z = (z ^ (z >> np.uint64(27))) * _MIX2
  z = z ^ (z >> np.uint64(31))
  return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _check_int(name: str, value: Any, minimum: int, fix: str) -> None:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"{name}={value!r} must be an integer >= {minimum}. Fix: {fix}")


@dataclasses.dataclass(frozen=True)
class StreamingSet:
  """A training split read as a stream, in shards.

  Attributes:
    open_stream: (shard, num_shards) -> a fresh pass, in a fixed order, over that shard's
      examples (text_a, text_b or None, label); shard s holds stream positions i with
      i % num_shards == s.
    num_examples: The whole split's example count (all shards, before `keep`).
    num_shards: How many shards the stream is read in (e.g. one per process).
    keep: None for every example, or (lo, hi, seed): keep the example at stream position i iff
      lo <= position_hash(seed, i) < hi. Set by `split`.
    is_regression: Float labels (STS-B) instead of int class ids.
    tokenizer: Tokenizes windows as `batching.tokenize` does (a Hugging Face tokenizer).
    max_seq_length: Truncation length of the tokenizer call.
  """

  open_stream: Callable[[int, int], Iterable[Example]]
  num_examples: int
  num_shards: int = 1
  keep: tuple[float, float, int] | None = None
  is_regression: bool = False
  tokenizer: Any = None
  max_seq_length: int = 128

  def __post_init__(self):
    if not callable(self.open_stream):
      raise ValueError(f"open_stream must be callable (shard, num_shards) -> examples, got "
                       f"{self.open_stream!r}.")
    _check_int("num_examples", self.num_examples, 0, "pass the split's example count.")
    _check_int("num_shards", self.num_shards, 1, "use e.g. one shard per process.")
    if self.keep is not None:
      lo, hi, seed = self.keep
      if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"keep={self.keep!r} needs 0 <= lo < hi <= 1. Fix: build it with "
                         "StreamingSet.split.")
      _check_int("keep seed", seed, 0, "use a non-negative seed.")

  def __len__(self) -> int:
    """Examples per epoch (all shards): exact without `keep`, else round(num_examples * share).

    With `keep` it is an estimate (the hash keeps each position independently), used only to
    count steps per epoch; see `train_batches_from` for what happens when it is off.
    """
    if self.keep is None:
      return self.num_examples
    lo, hi, _ = self.keep
    return round(self.num_examples * (hi - lo))

  def steps_per_epoch(self, batch_size: int) -> int:
    """Steps per epoch of global batches of `batch_size` rows, `batch_size / num_shards` from
    each shard: ceil(ceil(len(self) / num_shards) / rows), the same for every shard."""
    rows = batching.shard_rows(batch_size, self.num_shards)
    return batching.num_train_batches(-(-len(self) // self.num_shards), rows)

  def split(self, fraction: float, seed: int) -> tuple["StreamingSet", "StreamingSet"]:
    """(weights part, search part): the search part holds the positions whose hash falls in
    the last `fraction` of [0, 1) (of `keep`'s interval, if this set is already a part)."""
    if not 0.0 < fraction < 1.0:
      raise ValueError(f"split fraction={fraction!r} must be in (0, 1). Fix: pass the search "
                       "part's share, e.g. 0.1.")
    lo, hi = 0.0, 1.0
    if self.keep is not None:
      lo, hi, keep_seed = self.keep
      if keep_seed != seed:
        raise ValueError(f"This set was split with seed {keep_seed}; splitting it again with seed "
                         f"{seed} would need two hashes. Fix: split with seed={keep_seed} (which "
                         "subdivides this part), or split the unsplit set.")
    cut = hi - fraction * (hi - lo)
    return (dataclasses.replace(self, keep=(lo, cut, seed)),
            dataclasses.replace(self, keep=(cut, hi, seed)))

  def head(self, n: int) -> TokenizedDataset:
    """The first n kept examples in global stream order (shards read round-robin), tokenized in
    memory: for small passes such as a sensitivity measurement. Fewer if the stream is shorter."""
    _check_int("n", n, 0, "ask for a non-negative number of examples.")
    with contextlib.closing(self._kept(self._global_order(), first=0, step=1)) as kept:
      raw = list(itertools.islice(kept, n))
    return _tokenize(raw, self)

  def kept_examples(self, shard: int) -> Iterator[Example]:
    """One pass over the examples of `shard` that `keep` keeps, in stream order (untokenized)."""
    self._check_shard(shard)
    stream = iter(self.open_stream(shard, self.num_shards))
    return self._kept(stream, first=shard, step=self.num_shards)

  def _check_shard(self, shard: int) -> None:
    if not isinstance(shard, (int, np.integer)) or not 0 <= shard < self.num_shards:
      raise ValueError(f"shard={shard!r} is outside [0, num_shards={self.num_shards}). Fix: pass "
                       "this process's shard index, e.g. jax.process_index().")

  def _global_order(self) -> Iterator[Example]:
    """The whole stream in position order: one example of each shard in turn."""
    streams = [iter(self.open_stream(s, self.num_shards)) for s in range(self.num_shards)]
    while True:
      for stream in streams:
        try:
          yield next(stream)
        except StopIteration:
          return

  def _kept(self, stream: Iterator[Example], *, first: int, step: int) -> Iterator[Example]:
    """The examples of `stream` (at positions first, first + step, ...) that `keep` keeps."""
    if self.keep is None:
      yield from stream
      return
    lo, hi, seed = self.keep
    for k in itertools.count(0, _HASH_CHUNK):
      chunk = list(itertools.islice(stream, _HASH_CHUNK))
      if not chunk:
        return
      u = position_hash(seed, first + step * np.arange(k, k + len(chunk), dtype=np.uint64))
      yield from itertools.compress(chunk, (u >= lo) & (u < hi))


def _tokenize(raw: list[Example], stream_set: StreamingSet) -> TokenizedDataset:
  """`batching.tokenize` of a list of (text_a, text_b or None, label) examples."""
  text_b = [b for _, b, _ in raw]
  has_pair = [b is not None for b in text_b]
  if any(has_pair) and not all(has_pair):
    raise ValueError(f"The stream mixes single sentences and pairs (window example "
                     f"{has_pair.index(False)} has no text_b). Fix: yield text_b for all examples "
                     "or for none.")
  labels = np.asarray([label for _, _, label in raw],
                      dtype=np.float32 if stream_set.is_regression else np.int32).reshape(-1)
  examples = Examples(text_a=[a for a, _, _ in raw], text_b=text_b if any(has_pair) else None,
                      labels=labels)
  if stream_set.tokenizer is None:
    raise ValueError("This StreamingSet has no tokenizer. Fix: build it with tokenizer= (the "
                     "model's, models.load_tokenizer).")
  return batching.tokenize(examples, stream_set.tokenizer, stream_set.max_seq_length)


def _collate(dataset: TokenizedDataset, indices: np.ndarray, batch_size: int, max_seq_length: int,
             pad_multiple: int, fixed_length: int | None) -> Batch:
  """`batching`'s own padding of rows into a batch (one contract), or to `fixed_length`."""
  if fixed_length is not None:  # bucket_length(n, F, F) == F for every 1 <= n <= F.
    max_seq_length = pad_multiple = fixed_length
  return batching._collate(dataset, [(indices, len(indices))], batch_size, max_seq_length,
                           pad_multiple)


def _check_lengths(dataset: TokenizedDataset, fixed_length: int | None, max_seq_length: int,
                   shard: int) -> None:
  if fixed_length is not None and len(dataset) and dataset.lengths.max() > fixed_length:
    raise ValueError(f"An example of shard {shard} has {dataset.lengths.max()} tokens, more than "
                     f"fixed_length={fixed_length}. Fix: set fixed_length >= max_seq_length "
                     f"(= {max_seq_length}), e.g. fixed_length=max_seq_length.")


def _epoch_batches(stream_set: StreamingSet, batch_size: int, *, seed: int,
                   shard: int, epoch: int, skip: int, steps: int,
                   pad_multiple: int, bucket_window: int,
                   fixed_length: int | None) -> Iterator[Batch]:
  """Batches skip..steps-1 of one shard's epoch (see `train_batches_from`)."""
  max_seq_length = stream_set.max_seq_length
  window_size = bucket_window * batch_size
  done = 0  # Batches of this epoch yielded or skipped so far.
  first = None  # The epoch's first example of the shard, for all-dummy batches.
  with contextlib.closing(stream_set.kept_examples(shard)) as kept:
    examples = itertools.islice(kept, steps * batch_size)  # Extra examples are dropped.
    for window_index in itertools.count():
      raw = list(itertools.islice(examples, window_size))
      if not raw:
        break
      if first is None:
        first = raw[0]
      num_batches = -(-len(raw) // batch_size)
      if done + num_batches <= skip:  # The whole window lies before the resume step.
        done += num_batches
        continue
      window = _tokenize(raw, stream_set)
      _check_lengths(window, fixed_length, max_seq_length, shard)
      rng = np.random.default_rng([seed, epoch, shard, window_index])
      perm = rng.permutation(len(raw))
      order = perm[np.argsort(window.lengths[perm], kind="stable")]
      cuts = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
      for b in rng.permutation(num_batches):
        done += 1
        if done > skip:
          yield _collate(window, cuts[b], batch_size, max_seq_length, pad_multiple, fixed_length)
  if done >= steps:
    return
  if first is None:
    raise ValueError(f"Shard {shard} of {stream_set.num_shards} has no examples in epoch {epoch} "
                     f"(the set estimates {len(stream_set)} in all). Fix: use fewer shards, or a "
                     "larger part of the split.")
  single = _tokenize([first], stream_set)
  _check_lengths(single, fixed_length, max_seq_length, shard)
  dummy = _collate(single, np.zeros(1, np.int64), batch_size, max_seq_length, pad_multiple,
                   fixed_length)
  dummy["weights"][:] = 0.0
  for _ in range(max(done, skip), steps):
    yield {key: value.copy() for key, value in dummy.items()}


def train_batches_from(
    stream_set: StreamingSet,
    batch_size: int,
    *,
    seed: int,
    shard: int,
    start_step: int = 0,
    pad_multiple: int = 32,
    bucket_window: int = 50,
    fixed_length: int | None = None,
) -> Iterator[Batch]:
  """Endless training batches of one shard, epochs 0, 1, 2, ..., from global step `start_step`.

  `batch_size` is the shard's share of a global batch. Every shard's epoch has
  `stream_set.steps_per_epoch(batch_size * num_shards)` steps. Epoch e reads the shard's kept examples in
  windows of `bucket_window * batch_size`; window w is shuffled with
  `np.random.default_rng([seed, e, shard, w])`, sorted by token length (stable), cut into
  batches (only its last one can be partial), and its batches are yielded in an order drawn from
  the same rng. So the stream is a pure function of (seed, shard, epoch, step), and resuming at
  `start_step` yields what an uninterrupted run yields from there: whole windows before it are
  read but not tokenized, and batches of its window before it are not built.

  A shard whose epoch runs out of examples before the step count (the shards' sizes differ by
  one, or `keep`'s length is an estimate) then yields all-dummy batches: weight 0 on rows that
  repeat the epoch's first example of the shard. One with more examples than the step count
  allows (only possible under `keep`) drops its last ones for that epoch, the same every epoch.

  Each batch is padded to `bucket_length` of its longest row, or to `fixed_length` when given
  (so shards that never talk agree on a shape); `fixed_length` must be >= every example's length.
  """
  batching._check_batch_size(batch_size)
  max_seq_length = stream_set.max_seq_length
  batching._check_seq_args(max_seq_length, pad_multiple)
  _check_int("start_step", start_step, 0, "resume from a non-negative step.")
  _check_int("bucket_window", bucket_window, 1, "use e.g. 50.")
  if fixed_length is not None:
    _check_int("fixed_length", fixed_length, 1, "use e.g. fixed_length=max_seq_length.")
  stream_set._check_shard(shard)
  steps = stream_set.steps_per_epoch(batch_size * stream_set.num_shards)
  if steps == 0:
    raise ValueError("Cannot make training batches from an empty stream (len(stream_set) == 0). "
                     "Fix: check num_examples and the split fraction.")
  first_epoch, offset = divmod(start_step, steps)
  for epoch in itertools.count(first_epoch):
    yield from _epoch_batches(
        stream_set, batch_size, seed=seed, shard=shard, epoch=epoch,
        skip=offset if epoch == first_epoch else 0, steps=steps,
        pad_multiple=pad_multiple, bucket_window=bucket_window, fixed_length=fixed_length)


_HUB_FIX = ("Fix: check network access / the HF cache, or set `config.data.glue_dir` or "
            f"{glue.GLUE_DIR_ENV_VAR} to a local GLUE directory.")


def _example_from_row(row: dict, task: GlueTask, source: str, position: int) -> Example:
  """(text_a, text_b or None, label) of one dataset row, its label checked."""
  missing = [c for c in (*task.hub_text_columns, "label") if c not in row]
  if missing:
    raise ValueError(f"{source}: the row at stream position {position} lacks column(s) {missing}; "
                     f"has {sorted(row)}. Fix: stream the dataset of task {task.name!r}.")
  label = row["label"]
  if task.is_regression:
    try:
      label = float(label)
    except (TypeError, ValueError):
      raise ValueError(f"{source}: label {label!r} at stream position {position} is not a number "
                       f"(task {task.name!r} is regression).") from None
    if not math.isfinite(label):
      raise ValueError(f"{source}: label {label!r} at stream position {position} is not finite.")
  else:
    if (not isinstance(label, (int, np.integer)) or isinstance(label, bool)
        or not 0 <= label < task.num_labels):
      raise ValueError(
          f"{source} has label {label!r} outside [0, {task.num_labels}) at stream position "
          f"{position} (test splits are unlabelled: use 'train' or one of "
          f"{list(task.eval_splits)}).")
    label = int(label)
  texts = [row[c] for c in task.hub_text_columns]
  return texts[0], texts[1] if task.is_pair else None, label


@dataclasses.dataclass(frozen=True)
class _DatasetStream:
  """`StreamingSet.open_stream` over a `datasets.IterableDataset`."""

  dataset: Any
  task: GlueTask
  source: str

  def __call__(self, shard: int, num_shards: int) -> Iterator[Example]:
    # Positions are filtered here: `datasets.distributed.split_dataset_by_node` hands whole file
    # shards to nodes when it can (strategy "auto"), which is not the i % num_shards assignment.
    rows = itertools.islice(iter(self.dataset), shard, None, num_shards)
    for position in itertools.count(shard, num_shards):
      try:
        row = next(rows)
      except StopIteration:
        return
      except Exception as err:
        raise RuntimeError(f"Could not read {self.source} near stream position {position} "
                           f"({type(err).__name__}: {err}). {_HUB_FIX}") from err
      yield _example_from_row(row, self.task, self.source, position)


def from_iterable_dataset(ds: Any, task: GlueTask | str, num_examples: int, *, num_shards: int = 1,
                          tokenizer: Any = None, max_seq_length: int = 128,
                          source: str = "the streamed dataset") -> StreamingSet:
  """A `StreamingSet` over a `datasets.IterableDataset` with `task`'s hub columns and "label".

  Each pass over a shard iterates `ds` from the start and keeps every num_shards-th row, so a
  process reads (but does not decode or tokenize) the other shards' rows too. `source` names
  the dataset in error messages.
  """
  task = glue.get_task(task)
  columns = getattr(ds, "column_names", None)
  if columns is not None:
    missing = [c for c in (*task.hub_text_columns, "label") if c not in columns]
    if missing:
      raise ValueError(f"{source} lacks column(s) {missing} needed by task {task.name!r}; has "
                       f"{list(columns)}.")
  return StreamingSet(open_stream=_DatasetStream(ds, task, source), num_examples=num_examples,
                      num_shards=num_shards, is_regression=task.is_regression,
                      tokenizer=tokenizer, max_seq_length=max_seq_length)


def hub_stream(task: GlueTask | str, split: str = "train", *, num_shards: int = 1,
               tokenizer: Any = None, max_seq_length: int = 128) -> StreamingSet:
  """`split` of `task` streamed from `nyu-mll/glue` on the Hugging Face hub.

  The example count comes from the dataset info, or, where the info lacks it, from one pass over
  the stream that only counts rows (no decoding of texts into examples, no tokenizing).
  """
  import datasets  # Imported lazily: slow, and unneeded for local data.

  task = glue.get_task(task)
  split = task.canonical_split(split)
  source = f"{glue.HUB_DATASET}/{task.hub_config} split {split!r}"
  try:
    ds = datasets.load_dataset(glue.HUB_DATASET, task.hub_config, split=split, streaming=True)
  except Exception as err:
    raise RuntimeError(f"Could not open {source} as a stream from the Hugging Face hub "
                       f"({type(err).__name__}: {err}). {_HUB_FIX}") from err
  splits = getattr(getattr(ds, "info", None), "splits", None) or {}
  num_examples = getattr(splits.get(split), "num_examples", None)
  if not num_examples:  # None, or 0 where the info was never filled in.
    logging.info("data: the info of %s gives no example count; counting its rows", source)
    try:
      num_examples = sum(1 for _ in ds)
    except Exception as err:
      raise RuntimeError(f"Could not read {source} to count its rows "
                         f"({type(err).__name__}: {err}). {_HUB_FIX}") from err
  return from_iterable_dataset(ds, task, num_examples, num_shards=num_shards, tokenizer=tokenizer,
                               max_seq_length=max_seq_length, source=source)


@dataclasses.dataclass(frozen=True)
class _TsvStream:
  """`StreamingSet.open_stream` over a local GLUE TSV file, read row by row."""

  task: GlueTask
  path: str

  def __call__(self, shard: int, num_shards: int) -> Iterator[Example]:
    return itertools.islice(glue.iter_tsv(self.task, self.path), shard, None, num_shards)


def load_stream(task: GlueTask | str, split: str, glue_dir: str | None, *, num_shards: int = 1,
                tokenizer: Any = None, max_seq_length: int = 128) -> StreamingSet:
  """`split` of `task` as a stream: from the local GLUE directory when one is set (its rows are
  counted once up front, without tokenizing), else from the Hugging Face hub (`hub_stream`)."""
  task = glue.get_task(task)
  if glue_dir is None:
    return hub_stream(task, split, num_shards=num_shards, tokenizer=tokenizer,
                      max_seq_length=max_seq_length)
  open_stream = _TsvStream(task, str(glue.split_path(task, split, glue_dir)))
  num_examples = sum(1 for _ in open_stream(0, 1))
  return StreamingSet(open_stream=open_stream, num_examples=num_examples, num_shards=num_shards,
                      is_regression=task.is_regression, tokenizer=tokenizer,
                      max_seq_length=max_seq_length)


def global_batches(stream_set: StreamingSet, batch_size: int, *, seed: int, own: Sequence[int],
                   start_step: int = 0, pad_multiple: int = 32, bucket_window: int = 50,
                   fixed_length: int | None = None) -> Iterator[Batch]:
  """Global batches of `batch_size` rows: shard s fills rows [s * r, (s + 1) * r), r =
  batch_size / num_shards, for the shards in `own` (this process's, `shards_of_process`).

  The other shards' rows stay zero with weight 0: their processes feed them
  (`train.sharding.shard_batch` hands each process its own rows). Without `fixed_length` a batch
  takes the longest of its shards' bucketed lengths, which every process can only agree on when
  each holds every shard; otherwise pass `fixed_length` (e.g. max_seq_length).
  """
  rows = batching.shard_rows(batch_size, stream_set.num_shards)
  streams = [train_batches_from(stream_set, rows, seed=seed, shard=s, start_step=start_step,
                                pad_multiple=pad_multiple, bucket_window=bucket_window,
                                fixed_length=fixed_length) for s in own]
  for parts in zip(*streams):
    length = max(part["input_ids"].shape[1] for part in parts)
    batch = {key: np.zeros((batch_size,) + (length,) * (value.ndim - 1), value.dtype)
             for key, value in parts[0].items()}
    for shard, part in zip(own, parts):
      for key, value in part.items():
        batch[key][shard * rows:(shard + 1) * rows, ...][..., :value.shape[-1]] = value
    yield batch
