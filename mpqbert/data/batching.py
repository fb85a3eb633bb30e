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
  """Unpadded token ids of a split.

  Attributes:
    input_ids: One int32 array per example, with [CLS]/[SEP], unpadded.
    token_type_ids: One int32 array per example, same lengths as input_ids.
    labels: int32 class ids or float32 regression targets, one per example.
  """

  input_ids: list[np.ndarray]
  token_type_ids: list[np.ndarray]
  labels: np.ndarray

  def __post_init__(self):
    n = len(self.input_ids)
    if len(self.token_type_ids) != n or len(self.labels) != n:
      raise ValueError(
          f"TokenizedDataset fields disagree in length: input_ids {n}, "
          f"token_type_ids {len(self.token_type_ids)}, labels {len(self.labels)}."
      )

  def __len__(self) -> int:
    return len(self.input_ids)

  @functools.cached_property
  def lengths(self) -> np.ndarray:
    """Number of tokens of each example (int64 [N])."""
    return np.asarray([len(x) for x in self.input_ids], dtype=np.int64)

  def select(self, indices: np.ndarray | slice) -> "TokenizedDataset":
    """The examples at `indices` (an index array or a slice), in that order."""
    keep = np.arange(len(self))[indices] if isinstance(indices, slice) else np.asarray(indices)
    return TokenizedDataset(input_ids=[self.input_ids[i] for i in keep],
                            token_type_ids=[self.token_type_ids[i] for i in keep],
                            labels=self.labels[keep])


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
    indices: np.ndarray,
    batch_size: int,
    max_seq_length: int,
    pad_multiple: int,
) -> Batch:
  """Pads the examples at `indices` (1..batch_size of them) into one batch."""
  num_real = len(indices)
  seq_len = bucket_length(
      int(dataset.lengths[indices].max()), max_seq_length, pad_multiple
  )
  # Dummy rows repeat the first real example; their weight is 0.
  rows = np.concatenate(
      [indices, np.full(batch_size - num_real, indices[0], dtype=indices.dtype)]
  )
  input_ids = np.zeros((batch_size, seq_len), np.int32)
  token_type_ids = np.zeros((batch_size, seq_len), np.int32)
  attention_mask = np.zeros((batch_size, seq_len), np.int32)
  for r, i in enumerate(rows):
    n = len(dataset.input_ids[i])
    input_ids[r, :n] = dataset.input_ids[i]
    token_type_ids[r, :n] = dataset.token_type_ids[i]
    attention_mask[r, :n] = 1
  labels = np.asarray(dataset.labels)[rows]
  labels = labels.astype(
      np.float32 if np.issubdtype(labels.dtype, np.floating) else np.int32
  )
  weights = np.zeros(batch_size, np.float32)
  weights[:num_real] = 1.0
  return {
      "input_ids": input_ids,
      "attention_mask": attention_mask,
      "token_type_ids": token_type_ids,
      "labels": labels,
      "weights": weights,
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
    seed: int,
    epoch: int,
    bucket_window: int,
) -> list[np.ndarray]:
  """Example indices of each batch of one training epoch, in yield order.

  Shuffle all examples, sort each window of `bucket_window * batch_size`
  examples by length (similar lengths share a batch, so little padding), cut
  windows into batches, then shuffle the batch order. Only the very last
  batch (of the last window) can be partial.
  """
  if bucket_window < 1:
    raise ValueError(f"bucket_window={bucket_window} must be >= 1 (e.g. 50).")
  rng = np.random.default_rng([seed, epoch])
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

  The order depends only on (seed, epoch). Yields exactly
  `num_train_batches(len(dataset), batch_size)` batches, minus the first
  `skip` ones, which are skipped without being built.
  """
  _check_batch_size(batch_size)
  _check_seq_args(max_seq_length, pad_multiple)
  plan = _epoch_plan(
      dataset.lengths,
      batch_size,
      seed=seed,
      epoch=epoch,
      bucket_window=bucket_window,
  )
  if skip < 0:
    raise ValueError(f"skip={skip} must be >= 0.")
  for indices in plan[skip:]:
    yield _collate(dataset, indices, batch_size, max_seq_length, pad_multiple)


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
  with steps_per_epoch = num_train_batches(len(dataset), batch_size). So a run
  resumed at global step s yields exactly the batches an uninterrupted run
  yields from step s on.
  """
  _check_batch_size(batch_size)
  if len(dataset) == 0:
    raise ValueError("Cannot make training batches from an empty dataset.")
  if start_step < 0:
    raise ValueError(f"start_step={start_step} must be >= 0.")
  steps_per_epoch = num_train_batches(len(dataset), batch_size)
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
  order = np.argsort(dataset.lengths, kind="stable")
  for start in range(0, len(order), batch_size):
    indices = order[start : start + batch_size]
    batch = _collate(dataset, indices, batch_size, max_seq_length, pad_multiple)
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
