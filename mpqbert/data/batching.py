"""Tokenization and length-bucketed, dynamically padded batches.

Every batch has exactly `batch_size` rows (a partial last batch is filled with
dummy rows of weight 0) and a sequence length rounded up by `bucket_length`, so
a jitted step sees only a handful of shapes ([B, 32], [B, 64], ...) and
compiles a handful of times.

Batch dicts hold NumPy arrays:

  input_ids       int32   [B, L]  0 at padding positions
  attention_mask  int32   [B, L]  1 on real tokens, 0 on padding
  token_type_ids  int32   [B, L]  0 on segment A and padding, 1 on segment B
  labels          int32 or float32 [B]
  weights         float32 [B]     1 for real rows, 0 for dummy rows
  index           int32   [B]     eval only: row position in the dataset, -1
                                  for dummy rows

Dummy rows repeat the batch's first real example (so no row is fully masked,
which could give NaNs in attention) with weight 0: losses and metrics must be
weighted, e.g. `sum(w * loss) / sum(w)`.

Training order is a pure function of (seed, epoch): `train_batches` yields one
epoch, and `train_batches_from(..., start_step=s)` yields the endless stream of
epochs 0, 1, 2, ... starting at global step s, which is how training resumes
from a checkpoint without storing iterator state.

A training set may be divided into shards (`tokenize_shards`: example i in shard i % S). Shard s
fills rows [s B/S, (s + 1) B/S) of every batch, shuffled and bucketed on its own, so a process
needs the tokens of the shards whose rows it feeds only (`shards_of_process`); every example's
length is known to every process, so all agree on each batch's padded length.

Why one module over 300 lines: tokenization, bucketing, padding and the per-process split of
rows are one contract (every batch's shape and weights); splitting it would spread that contract.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, Iterator, Sequence

import numpy as np

from mpqbert.data.glue import Examples

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class TokenizedDataset:
  """Unpadded token ids of a split, maybe divided into shards that different processes tokenize.

  Attributes:
    input_ids: One int32 array per example, with [CLS]/[SEP], unpadded; None for an example that
      another process tokenized (its shard is not this process's).
    token_type_ids: One int32 array per example, same lengths as input_ids (None likewise).
    labels: int32 class ids or float32 regression targets, one per example (all of them).
    known_lengths: Every example's token count (int64 [N]), needed where some tokens are None
      (gathered from the processes that tokenized them); computed from the tokens when omitted.
    shards: The training shard of each example (int [N]); None: one shard. Fixed when the split
      is loaded (example position modulo `num_shards`) and kept by `select`.
    num_shards: How many shards the training batches are drawn from (`train_batches`).
  """

  input_ids: list[np.ndarray | None]
  token_type_ids: list[np.ndarray | None]
  labels: np.ndarray
  known_lengths: np.ndarray | None = None
  shards: np.ndarray | None = None
  num_shards: int = 1

  def __post_init__(self):
    n = len(self.input_ids)
    if len(self.token_type_ids) != n or len(self.labels) != n:
      raise ValueError(
          f"TokenizedDataset fields disagree in length: input_ids {n}, "
          f"token_type_ids {len(self.token_type_ids)}, labels {len(self.labels)}."
      )
    if self.known_lengths is None and any(x is None for x in self.input_ids):
      raise ValueError("a TokenizedDataset with examples of other processes (None tokens) needs "
                       "known_lengths; gather them first (train.sharding.gather_lengths).")
    if self.num_shards < 1 or (self.shards is None) != (self.num_shards == 1):
      raise ValueError(f"num_shards={self.num_shards} with shards "
                       f"{'None' if self.shards is None else 'given'}: give `shards` exactly "
                       "when num_shards > 1.")
    for name in ("known_lengths", "shards"):
      value = getattr(self, name)
      if value is not None and len(value) != n:
        raise ValueError(f"{name} has {len(value)} entries for {n} examples.")

  def __len__(self) -> int:
    return len(self.input_ids)

  @functools.cached_property
  def lengths(self) -> np.ndarray:
    """Number of tokens of each example (int64 [N])."""
    if self.known_lengths is not None:
      return np.asarray(self.known_lengths, dtype=np.int64)
    return np.asarray([len(x) for x in self.input_ids], dtype=np.int64)

  @property
  def is_complete(self) -> bool:
    """Whether this process holds the tokens of every example."""
    return all(x is not None for x in self.input_ids)

  def shard_members(self) -> list[np.ndarray]:
    """The example indices of each shard, in dataset order."""
    if self.shards is None:
      return [np.arange(len(self))]
    return [np.flatnonzero(self.shards == s) for s in range(self.num_shards)]

  def steps_per_epoch(self, batch_size: int) -> int:
    """Training batches per epoch: every shard gives `batch_size / num_shards` rows of each batch,
    so an epoch lasts as long as its largest shard (ceil(N / batch_size) with one shard)."""
    rows = shard_rows(batch_size, self.num_shards)
    return max(num_train_batches(len(m), rows) for m in self.shard_members())

  def select(self, indices: np.ndarray | slice) -> "TokenizedDataset":
    """The examples at `indices` (an index array or a slice), in that order, in their shards."""
    keep = np.arange(len(self))[indices] if isinstance(indices, slice) else np.asarray(indices)
    return TokenizedDataset(
        input_ids=[self.input_ids[i] for i in keep],
        token_type_ids=[self.token_type_ids[i] for i in keep],
        labels=self.labels[keep],
        known_lengths=None if self.known_lengths is None else self.lengths[keep],
        shards=None if self.shards is None else self.shards[keep],
        num_shards=self.num_shards)


def shard_rows(batch_size: int, num_shards: int) -> int:
  """Rows each shard contributes to a batch; refuses a batch the shards cannot share equally."""
  _check_batch_size(batch_size)
  if batch_size % num_shards:
    raise ValueError(f"batch size {batch_size} is not divisible by data.shards={num_shards}: "
                     "every shard gives the same number of rows to each batch. Pick a batch "
                     f"size that is a multiple of {num_shards}, or another data.shards.")
  return batch_size // num_shards


def shards_of_process(num_shards: int, process_index: int, process_count: int) -> range:
  """The shards whose rows process `process_index` of `process_count` feeds.

  Each process feeds a contiguous block of every batch's rows (`train.sharding.shard_batch`) and
  each shard a contiguous block of `batch_size / num_shards` rows, so with several shards per
  process it holds `num_shards / process_count` of them, and processes that share one shard
  (`num_shards < process_count`) each hold it.
  """
  if num_shards % process_count and process_count % num_shards:
    raise ValueError(f"data.shards={num_shards} does not fit {process_count} processes: use a "
                     f"multiple of {process_count} (or 1, every process tokenizing everything).")
  if num_shards >= process_count:
    per = num_shards // process_count
    return range(process_index * per, (process_index + 1) * per)
  shard = process_index * num_shards // process_count
  return range(shard, shard + 1)


def tokenize(
    examples: Examples, tokenizer: Any, max_seq_length: int = 128
) -> TokenizedDataset:
  """Tokenizes `examples` in one batched call, truncating to `max_seq_length`.

  Pairs are truncated "longest_first" (as BERT's GLUE recipe does); no
  padding is added here (batches are padded dynamically).
  """
  if max_seq_length < 3:
    raise ValueError(
        f"max_seq_length={max_seq_length} is too small: [CLS] and [SEP] alone "
        "take 2-3 tokens. Fix: use e.g. 128."
    )
  if len(examples) == 0:
    return TokenizedDataset([], [], np.asarray(examples.labels))
  encoded = tokenizer(
      list(examples.text_a),
      text_pair=None if examples.text_b is None else list(examples.text_b),
      truncation="longest_first",
      max_length=max_seq_length,
      padding=False,
      return_token_type_ids=True,
      return_attention_mask=False,
  )
  return TokenizedDataset(
      input_ids=[np.asarray(x, dtype=np.int32) for x in encoded["input_ids"]],
      token_type_ids=[
          np.asarray(x, dtype=np.int32) for x in encoded["token_type_ids"]
      ],
      labels=np.asarray(examples.labels),
  )


def tokenize_shards(examples: Examples, tokenizer: Any, max_seq_length: int, *,
                    num_shards: int, own: Sequence[int]) -> TokenizedDataset:
  """Tokenizes only the examples of the shards in `own` (example i is in shard i % num_shards).

  The others get None tokens and length -1 until `train.sharding.gather_lengths` fills in the
  lengths their processes measured: each process of a job tokenizes its share of the split.
  """
  n = len(examples)
  shards = np.arange(n) % num_shards
  mine = np.flatnonzero(np.isin(shards, list(own)))
  part = tokenize(examples.select(mine), tokenizer, max_seq_length)
  input_ids: list[np.ndarray | None] = [None] * n
  token_type_ids: list[np.ndarray | None] = [None] * n
  lengths = np.full(n, -1, np.int64)
  for i, ids, types in zip(mine, part.input_ids, part.token_type_ids):
    input_ids[i], token_type_ids[i], lengths[i] = ids, types, len(ids)
  return TokenizedDataset(input_ids=input_ids, token_type_ids=token_type_ids,
                          labels=np.asarray(examples.labels), known_lengths=lengths,
                          shards=shards if num_shards > 1 else None, num_shards=num_shards)


def bucket_length(length: int, max_seq_length: int, multiple: int = 32) -> int:
  """Rounds `length` up to a multiple of `multiple`, capped at `max_seq_length`.

  Few distinct padded lengths mean few jit recompilations. The result is at
  least min(multiple, max_seq_length), even for length 0.
  """
  if multiple < 1:
    raise ValueError(f"multiple={multiple} must be >= 1 (e.g. 32).")
  if length < 0 or length > max_seq_length:
    raise ValueError(
        f"Sequence length {length} is outside [0, max_seq_length="
        f"{max_seq_length}]. Fix: tokenize with the same (or a smaller) "
        "max_seq_length as used for batching."
    )
  rounded = max(-(-length // multiple), 1) * multiple
  return min(rounded, max_seq_length)


def _check_batch_size(batch_size: int) -> None:
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(
        f"batch_size={batch_size!r} must be a positive integer. Fix: set "
        "config batch_size to e.g. 32."
    )


def num_train_batches(num_examples: int, batch_size: int) -> int:
  """Batches per training epoch: ceil(num_examples / batch_size)."""
  _check_batch_size(batch_size)
  if num_examples < 0:
    raise ValueError(f"num_examples={num_examples} must be >= 0.")
  return -(-num_examples // batch_size)


def _collate(
    dataset: TokenizedDataset,
    parts: Sequence[tuple[np.ndarray, int]],
    rows: int,
    max_seq_length: int,
    pad_multiple: int,
) -> Batch:
  """Pads parts of `rows` rows each into one batch (a part per shard; one part for eval).

  A part `(indices, num_real)` has its first `num_real` indices as real rows (weight 1); its other
  rows repeat its first index with weight 0 (a shard whose epoch ran out gives only such rows).
  Rows whose tokens this process does not hold (another process's shard) keep zero ids and their
  attention mask: the process never feeds them (`train.sharding.shard_batch`).
  """
  real = np.concatenate([idx[:num_real] for idx, num_real in parts])
  seq_len = bucket_length(int(dataset.lengths[real].max()), max_seq_length, pad_multiple)
  row_ids = np.concatenate(
      [np.concatenate([idx[:num_real], np.full(rows - num_real, idx[0], dtype=idx.dtype)])
       for idx, num_real in parts])
  batch_size = len(row_ids)
  input_ids = np.zeros((batch_size, seq_len), np.int32)
  token_type_ids = np.zeros((batch_size, seq_len), np.int32)
  attention_mask = np.zeros((batch_size, seq_len), np.int32)
  for r, i in enumerate(row_ids):
    n = min(int(dataset.lengths[i]), seq_len)  # Only a dummy row can be longer: cut it.
    attention_mask[r, :n] = 1
    if dataset.input_ids[i] is not None:
      input_ids[r, :n] = dataset.input_ids[i][:n]
      token_type_ids[r, :n] = dataset.token_type_ids[i][:n]
  labels = np.asarray(dataset.labels)[row_ids]
  labels = labels.astype(
      np.float32 if np.issubdtype(labels.dtype, np.floating) else np.int32
  )
  weights = np.concatenate([np.arange(rows) < num_real for _, num_real in parts])
  return {
      "input_ids": input_ids,
      "attention_mask": attention_mask,
      "token_type_ids": token_type_ids,
      "labels": labels,
      "weights": weights.astype(np.float32),
  }


def random_batch(batch_size: int, seq_len: int, seed: int = 0, num_labels: int = 2) -> Batch:
  """A full training batch of random token ids and labels (benchmarks and tests of speed)."""
  rng = np.random.default_rng(seed)
  return {
      "input_ids": rng.integers(1000, 30000, (batch_size, seq_len)).astype(np.int32),
      "attention_mask": np.ones((batch_size, seq_len), np.int32),
      "token_type_ids": np.zeros((batch_size, seq_len), np.int32),
      "labels": rng.integers(0, num_labels, batch_size).astype(np.int32),
      "weights": np.ones(batch_size, np.float32),
  }


_TOKEN_FIELDS = ("input_ids", "attention_mask", "token_type_ids")


def pad_to_length(batch: Batch, length: int) -> Batch:
  """`batch` with its [B, L] token arrays padded by zeros to [B, length] (padding positions).

  Two batches that one step consumes together (the search's weight and architecture batches)
  are padded to a common length, so that step compiles once per length, not per pair.
  """
  current = batch["input_ids"].shape[1]
  if length < current:
    raise ValueError(f"cannot pad a batch of length {current} to the shorter {length}.")
  if length == current:
    return batch
  widths = ((0, 0), (0, length - current))
  return {k: np.pad(v, widths) if k in _TOKEN_FIELDS else v for k, v in batch.items()}


def _epoch_plan(
    lengths: np.ndarray,
    batch_size: int,
    *,
    rng: np.random.Generator,
    bucket_window: int,
) -> list[np.ndarray]:
  """Example positions (into `lengths`) of each batch of one epoch of one shard, in yield order.

  Shuffle all examples, sort each window of `bucket_window * batch_size`
  examples by length (similar lengths share a batch, so little padding), cut
  windows into batches, then shuffle the batch order. Only the very last
  batch (of the last window) can be partial.
  """
  if bucket_window < 1:
    raise ValueError(f"bucket_window={bucket_window} must be >= 1 (e.g. 50).")
  perm = rng.permutation(len(lengths))
  window = bucket_window * batch_size
  batches = []
  for start in range(0, len(perm), window):
    chunk = perm[start : start + window]
    chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
    batches.extend(
        chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)
    )
  order = rng.permutation(len(batches))
  return [batches[k] for k in order]


def _epoch_parts(dataset: TokenizedDataset, batch_size: int, *, seed: int, epoch: int,
                 bucket_window: int) -> list[list[tuple[np.ndarray, int]]]:
  """Each batch of one epoch as its shards' parts `(example indices, number real)`.

  Every shard is shuffled and bucketed on its own (seeded by seed, epoch and, with several
  shards, the shard), so a process needs the tokens of its shards only, and the order does not
  depend on how many processes share the shards. A shard whose epoch ends before the largest
  one's fills its rows of the remaining batches with weight-0 repeats.
  """
  rows = shard_rows(batch_size, dataset.num_shards)
  plans = []
  for shard, members in enumerate(dataset.shard_members()):
    if len(members) == 0:
      raise ValueError(f"shard {shard} of data.shards={dataset.num_shards} holds no example "
                       f"({len(dataset)} in all); use fewer shards.")
    rng = np.random.default_rng([seed, epoch] if dataset.num_shards == 1 else
                                [seed, epoch, shard])
    plans.append([members[b] for b in _epoch_plan(dataset.lengths[members], rows, rng=rng,
                                                  bucket_window=bucket_window)])
  steps = max(len(plan) for plan in plans)
  return [[(plan[t], len(plan[t])) if t < len(plan) else (plan[0][:1], 0) for plan in plans]
          for t in range(steps)]


def _check_seq_args(max_seq_length: int, pad_multiple: int) -> None:
  if max_seq_length < 1 or pad_multiple < 1:
    raise ValueError(
        f"max_seq_length={max_seq_length} and pad_multiple={pad_multiple} must "
        "be >= 1 (e.g. 128 and 32)."
    )


def train_batches(
    dataset: TokenizedDataset,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    max_seq_length: int = 128,
    pad_multiple: int = 32,
    bucket_window: int = 50,
    skip: int = 0,
) -> Iterator[Batch]:
  """Yields the shuffled, length-bucketed batches of one training epoch.

  The order depends only on (seed, epoch) and the dataset's shards. Yields exactly
  `dataset.steps_per_epoch(batch_size)` batches, minus the first
  `skip` ones, which are skipped without being built.
  """
  _check_batch_size(batch_size)
  _check_seq_args(max_seq_length, pad_multiple)
  if skip < 0:
    raise ValueError(f"skip={skip} must be >= 0.")
  rows = shard_rows(batch_size, dataset.num_shards)
  for parts in _epoch_parts(dataset, batch_size, seed=seed, epoch=epoch,
                            bucket_window=bucket_window)[skip:]:
    yield _collate(dataset, parts, rows, max_seq_length, pad_multiple)


def train_batches_from(
    dataset: TokenizedDataset,
    batch_size: int,
    *,
    seed: int,
    start_step: int = 0,
    max_seq_length: int = 128,
    pad_multiple: int = 32,
    bucket_window: int = 50,
) -> Iterator[Batch]:
  """Endless training stream over epochs 0, 1, 2, ..., starting at `start_step`.

  Step s belongs to epoch s // steps_per_epoch, at offset s % steps_per_epoch,
  with steps_per_epoch = dataset.steps_per_epoch(batch_size). So a run
  resumed at global step s yields exactly the batches an uninterrupted run
  yields from step s on.
  """
  _check_batch_size(batch_size)
  if len(dataset) == 0:
    raise ValueError("Cannot make training batches from an empty dataset.")
  if start_step < 0:
    raise ValueError(f"start_step={start_step} must be >= 0.")
  steps_per_epoch = dataset.steps_per_epoch(batch_size)
  first_epoch, offset = divmod(start_step, steps_per_epoch)
  for epoch in itertools.count(first_epoch):
    yield from train_batches(
        dataset,
        batch_size,
        seed=seed,
        epoch=epoch,
        max_seq_length=max_seq_length,
        pad_multiple=pad_multiple,
        bucket_window=bucket_window,
        skip=offset if epoch == first_epoch else 0,
    )


def eval_batches(
    dataset: TokenizedDataset,
    batch_size: int,
    *,
    max_seq_length: int = 128,
    pad_multiple: int = 32,
) -> Iterator[Batch]:
  """Yields all examples once, sorted by length, with an `index` key.

  `index[r]` is the dataset position of row r (-1 for dummy rows), so
  `preds_in_order[index[w > 0]] = preds[w > 0]` restores dataset order.
  """
  _check_batch_size(batch_size)
  _check_seq_args(max_seq_length, pad_multiple)
  if not dataset.is_complete:
    raise ValueError("eval_batches needs the tokens of every example, but this dataset holds "
                     "only this process's shards; gather them first "
                     "(train.sharding.gather_examples) or evaluate a split every process loads.")
  order = np.argsort(dataset.lengths, kind="stable")
  for start in range(0, len(order), batch_size):
    indices = order[start : start + batch_size]
    batch = _collate(dataset, [(indices, len(indices))], batch_size, max_seq_length,
                     pad_multiple)
    index = np.full(batch_size, -1, np.int32)
    index[: len(indices)] = indices
    batch["index"] = index
    yield batch


def _concat(arrays: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
  if isinstance(arrays, np.ndarray):
    return arrays
  return np.concatenate([np.asarray(a) for a in arrays])


def restore_order(
    index: np.ndarray | Sequence[np.ndarray],
    predictions: np.ndarray | Sequence[np.ndarray],
    num_examples: int,
) -> np.ndarray:
  """Puts predictions made on `eval_batches` back in dataset order.

  Args:
    index: The batches' `index` arrays (a list of per-batch arrays, or one
      concatenated array).
    predictions: The matching predictions, same nesting, leading dimension
      batch_size per batch.
    num_examples: Dataset size.

  Returns:
    Array of shape [num_examples, ...] whose row i is example i's prediction.
  """
  index, preds = _concat(index), _concat(predictions)
  if len(index) != len(preds):
    raise ValueError(
        f"{len(preds)} prediction rows for {len(index)} index rows. Fix: pass "
        "one prediction array per eval batch, with batch_size rows each."
    )
  real = index >= 0
  if not np.array_equal(np.sort(index[real]), np.arange(num_examples)):
    raise ValueError(
        f"Batch indices do not cover examples 0..{num_examples - 1} exactly "
        "once. Fix: pass the index of every batch of one eval_batches pass."
    )
  out = np.empty((num_examples,) + preds.shape[1:], preds.dtype)
  out[index[real]] = preds[real]
  return out
