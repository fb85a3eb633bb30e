"""Tests for mpqbert.data.streaming: streamed training batches behind the batching contract.

Small in-memory streams and a fake word-level tokenizer (NumPy only, no model). Example i's first
token is 2000 + i, so every batch row decodes back to the example it came from.
"""

import dataclasses
import itertools
import math

import numpy as np
import pytest

from mpqbert.data import batching
from mpqbert.data import glue
from mpqbert.data import streaming

MAX_LEN = 32
MULTIPLE = 8
CLS, SEP = 101, 102


class FakeTokenizer:
  """Word-level stand-in for a Hugging Face tokenizer, with the call `batching.tokenize` makes.

  "x<k>" -> 2000 + k, "f" -> 7, "y" -> 8; [CLS] a [SEP] (b [SEP]); pairs truncated longest-first
  (the longer segment loses its last token until the pair fits). Counts the texts it tokenizes.
  """

  def __init__(self):
    self.tokenized = 0

  @staticmethod
  def _ids(text):
    return [2000 + int(w[1:]) if w.startswith("x") else {"f": 7, "y": 8}[w] for w in text.split()]

  def __call__(self, text, text_pair=None, *, truncation, max_length, padding,
               return_token_type_ids, return_attention_mask):
    assert truncation == "longest_first" and padding is False
    assert return_token_type_ids and not return_attention_mask
    self.tokenized += len(text)
    input_ids, token_type_ids = [], []
    for k, text_a in enumerate(text):
      a = self._ids(text_a)
      if text_pair is None:
        a = a[: max_length - 2]
        ids, types = [CLS, *a, SEP], [0] * (len(a) + 2)
      else:
        b = self._ids(text_pair[k])
        while len(a) + len(b) > max_length - 3:
          (a if len(a) > len(b) else b).pop()
        ids, types = [CLS, *a, SEP, *b, SEP], [0] * (len(a) + 2) + [1] * (len(b) + 1)
      input_ids.append(ids)
      token_type_ids.append(types)
    return {"input_ids": input_ids, "token_type_ids": token_type_ids}


def _example(i, pair=True, regression=False):
  text_a = " ".join(["x%d" % i] + ["f"] * (i * 7 % 23))
  text_b = " ".join(["y"] * (1 + i * 5 % 11)) if pair else None
  return text_a, text_b, (i / 8.0 if regression else i % 3)


EXAMPLES = [_example(i) for i in range(100)]


def _set(examples=EXAMPLES, num_shards=1, **kwargs):
  def open_stream(shard, n):
    return iter(examples[shard::n])
  kwargs = {"tokenizer": FakeTokenizer(), "max_seq_length": MAX_LEN, **kwargs}
  return streaming.StreamingSet(open_stream, len(examples), num_shards, **kwargs)


def _reference_ids(example):
  """[CLS] a [SEP] b [SEP] of one example, by the fake tokenizer directly."""
  a, b, _ = example
  out = FakeTokenizer()([a], text_pair=None if b is None else [b], truncation="longest_first",
                        max_length=MAX_LEN, padding=False, return_token_type_ids=True,
                        return_attention_mask=False)
  return np.asarray(out["input_ids"][0]), np.asarray(out["token_type_ids"][0])


def _decode(batch):
  """Example index of each real row."""
  return (batch["input_ids"][batch["weights"] > 0, 1] - 2000).tolist()


def _check_batch(batch, batch_size, examples=EXAMPLES, fixed_length=None):
  """The batching contract, checked row by row against the examples the rows decode to."""
  b, length = batch["input_ids"].shape
  assert b == batch_size
  assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels", "weights"}
  for key in ("input_ids", "attention_mask", "token_type_ids"):
    assert batch[key].shape == (b, length) and batch[key].dtype == np.int32
  assert batch["weights"].dtype == np.float32 and batch["weights"].shape == (b,)
  regression = isinstance(examples[0][2], float)
  assert batch["labels"].dtype == (np.float32 if regression else np.int32)
  num_real = int(batch["weights"].sum())
  np.testing.assert_array_equal(batch["weights"][:num_real], 1.0)
  np.testing.assert_array_equal(batch["weights"][num_real:], 0.0)
  if num_real:
    real_len = max(len(_reference_ids(examples[i])[0]) for i in _decode(batch))
    expected = fixed_length or batching.bucket_length(real_len, MAX_LEN, MULTIPLE)
    assert length == expected
  for r in range(b):
    i = int(batch["input_ids"][r, 1]) - 2000
    ids, types = _reference_ids(examples[i])
    np.testing.assert_array_equal(batch["input_ids"][r], np.pad(ids, (0, length - len(ids))))
    np.testing.assert_array_equal(batch["token_type_ids"][r], np.pad(types, (0, length - len(ids))))
    np.testing.assert_array_equal(batch["attention_mask"][r], np.arange(length) < len(ids))
    np.testing.assert_allclose(batch["labels"][r], examples[i][2])
  # Dummy rows repeat the first row.
  for key in batch:
    if key != "weights":
      np.testing.assert_array_equal(batch[key][num_real:], np.broadcast_to(
          batch[key][0], batch[key][num_real:].shape))


def _take(stream_set, batch_size, shard, num, tokenizer=None, **kwargs):
  kwargs = {"seed": 0, "pad_multiple": MULTIPLE, "bucket_window": 2, **kwargs}
  stream_set = dataclasses.replace(
      stream_set, tokenizer=tokenizer or stream_set.tokenizer or FakeTokenizer(),
      max_seq_length=MAX_LEN)
  batches = streaming.train_batches_from(stream_set, batch_size,
                                         shard=shard, **kwargs)
  return list(itertools.islice(batches, num))


def _same_batches(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for key in x:
      assert x[key].dtype == y[key].dtype
      np.testing.assert_array_equal(x[key], y[key])


def _reference_epoch(indices, batch_size, window, *, seed, epoch, shard, steps):
  """The spec of one shard's epoch, restated: example indices per batch (a dummy batch: [])."""
  lengths = np.asarray([len(_reference_ids(e)[0]) for e in EXAMPLES])
  indices = np.asarray(indices[: steps * batch_size])
  plan = []
  for w, start in enumerate(range(0, len(indices), window * batch_size)):
    chunk = indices[start : start + window * batch_size]
    rng = np.random.default_rng([seed, epoch, shard, w])
    chunk = chunk[rng.permutation(len(chunk))]
    chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
    cut = [chunk[i : i + batch_size].tolist() for i in range(0, len(chunk), batch_size)]
    plan += [cut[k] for k in rng.permutation(len(cut))]
  return plan + [[]] * (steps - len(plan))


# --- One epoch: coverage, contract, order. ---


@pytest.mark.parametrize("num_shards,batch_size", [(1, 8), (3, 3), (4, 5)])
def test_each_example_once_per_epoch_over_all_shards(num_shards, batch_size):
  stream_set = _set(num_shards=num_shards)
  steps = stream_set.steps_per_epoch(batch_size * stream_set.num_shards)
  assert steps == math.ceil(math.ceil(100 / num_shards) / batch_size)
  per_shard = [_take(stream_set, batch_size, s, 2 * steps) for s in range(num_shards)]
  for epoch in range(2):
    seen = []
    for s, batches in enumerate(per_shard):
      epoch_batches = batches[epoch * steps : (epoch + 1) * steps]
      assert len(epoch_batches) == steps
      plan = _reference_epoch(list(range(100))[s::num_shards], batch_size, 2, seed=0,
                              epoch=epoch, shard=s, steps=steps)
      for batch, expected in zip(epoch_batches, plan):
        _check_batch(batch, batch_size)
        assert _decode(batch) == expected
        if not expected:  # All-dummy: the shard's first example, weight 0.
          assert (batch["input_ids"][:, 1] == 2000 + s).all()
        seen += _decode(batch)
    assert sorted(seen) == list(range(100))
  # (3, 3): shards 1 and 2 have 33 examples, 11 batches, then one all-dummy batch.
  if (num_shards, batch_size) == (3, 3):
    assert [b["weights"].sum() for b in per_shard[1][:steps]][-1] == 0


def test_regression_labels_and_single_sentences():
  examples = [_example(i, pair=False, regression=True) for i in range(20)]
  stream_set = _set(examples, num_shards=2, is_regression=True)
  batches = _take(stream_set, 4, 1, stream_set.steps_per_epoch(4 * stream_set.num_shards))
  for batch in batches:
    _check_batch(batch, 4, examples)
    assert (batch["token_type_ids"] == 0).all()
  assert sorted(sum((_decode(b) for b in batches), [])) == list(range(1, 20, 2))


def test_same_seed_same_batches_other_seed_other_order():
  stream_set = _set(num_shards=2)
  _same_batches(_take(stream_set, 4, 1, 20), _take(stream_set, 4, 1, 20))
  order = [_decode(b) for b in _take(stream_set, 4, 1, 20)]
  assert order != [_decode(b) for b in _take(stream_set, 4, 1, 20, seed=1)]
  # Another epoch is another order too.
  steps = stream_set.steps_per_epoch(4 * stream_set.num_shards)
  epochs = [_decode(b) for b in _take(stream_set, 4, 1, 2 * steps)]
  assert epochs[:steps] != epochs[steps:]


# --- Resume. ---


def test_resume_equals_uninterrupted_stream():
  stream_set = _set(num_shards=3)
  steps = stream_set.steps_per_epoch(3 * stream_set.num_shards)  # 12: shard 1 has 11 real batches.
  full = _take(stream_set, 3, 1, 3 * steps)
  for k in (0, 1, 5, steps - 1, steps, steps + 7, 2 * steps + 4, 3 * steps - 1):
    _same_batches(_take(stream_set, 3, 1, 3 * steps - k, start_step=k), full[k:])


def test_miscounted_stream_pads_with_dummies_or_drops_the_tail():
  """num_examples off (as `keep`'s estimate can be): the epoch keeps its step count."""
  def open_stream(shard, n):
    return iter(EXAMPLES[shard::n])
  # Over-counted: 130 -> 17 steps of 8, 13 real batches then 4 all-dummy ones.
  stream_set = streaming.StreamingSet(open_stream, num_examples=130)
  steps = stream_set.steps_per_epoch(8 * stream_set.num_shards)
  full = _take(stream_set, 8, 0, 2 * steps)
  assert [b["weights"].sum() == 0 for b in full[:steps]] == [False] * 13 + [True] * 4
  for k in range(2 * steps):
    _same_batches(_take(stream_set, 8, 0, 2 * steps - k, start_step=k), full[k:])
  # Under-counted: 60 -> 15 steps of 4; examples 60..99 are dropped, every epoch.
  stream_set = streaming.StreamingSet(open_stream, num_examples=60)
  batches = _take(stream_set, 4, 0, 30)
  for epoch in range(2):
    seen = sum((_decode(b) for b in batches[15 * epoch : 15 * (epoch + 1)]), [])
    assert sorted(seen) == list(range(60))


def test_resume_does_not_tokenize_skipped_windows():
  stream_set = _set(num_shards=3)
  steps = stream_set.steps_per_epoch(3 * stream_set.num_shards)
  # Shard 1, epoch 1: windows of 6 examples, 2 batches each; step 7 is in window 3.
  tokenizer = FakeTokenizer()
  _take(stream_set, 3, 1, 1, tokenizer, start_step=steps + 7)
  assert tokenizer.tokenized == 6
  # Step 11 is the all-dummy batch: only the epoch's first example is tokenized.
  tokenizer = FakeTokenizer()
  (batch,) = _take(stream_set, 3, 1, 1, tokenizer, start_step=steps + 11)
  assert tokenizer.tokenized == 1 and batch["weights"].sum() == 0
  assert (batch["input_ids"][:, 1] == 2001).all()
  # An uninterrupted run tokenizes window by window, not the whole stream.
  tokenizer = FakeTokenizer()
  _take(stream_set, 3, 1, 1, tokenizer)
  assert tokenizer.tokenized == 6


# --- split and the position hash. ---


def _splitmix64_u(seed, i):
  """Reference u(i): output i of splitmix64 with state seed, top 53 bits, in Python integers."""
  mask = 2**64 - 1
  z = (seed + (i + 1) * 0x9E3779B97F4A7C15) & mask
  z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
  z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
  z ^= z >> 31
  return (z >> 11) / 2**53


def test_position_hash_matches_a_plain_integer_splitmix64():
  positions = [0, 1, 2, 999, 2**40 + 3, 2**63 + 11]
  for seed in (0, 7, 2**63 + 5):
    u = streaming.position_hash(seed, np.asarray(positions, dtype=np.uint64))
    assert u.tolist() == [_splitmix64_u(seed, i) for i in positions]


@pytest.mark.parametrize("num_shards", [1, 3])
def test_split_partitions_the_stream_by_the_hash(num_shards):
  n, fraction, seed = 2000, 0.2, 5
  examples = [("x%d" % i, None, i % 2) for i in range(n)]
  stream_set = _set(examples, num_shards=num_shards)
  weights, search = stream_set.split(fraction, seed)
  members = {}
  for name, part in (("weights", weights), ("search", search)):
    ids = [int(a[1:]) for s in range(num_shards) for a, _, _ in part.kept_examples(s)]
    assert len(ids) == len(set(ids))
    members[name] = set(ids)
  assert not members["weights"] & members["search"]
  assert members["weights"] | members["search"] == set(range(n))
  assert abs(len(members["search"]) / n - fraction) < 0.03
  assert members["search"] == {i for i in range(n) if _splitmix64_u(seed, i) >= 1 - fraction}
  assert len(search) == round(n * fraction) and len(weights) == round(n * (1 - fraction))
  # The head of a part is its first members in position order.
  head = search.head(30)
  assert [int(x[1]) - 2000 for x in head.input_ids] == sorted(members["search"])[:30]


def test_split_part_trains_on_its_members_only():
  examples = [_example(i) for i in range(300)]
  weights, search = _set(examples, num_shards=2).split(0.3, 1)
  members = {i for i in range(300) if _splitmix64_u(1, i) >= 0.7}
  steps = search.steps_per_epoch(4 * search.num_shards)
  seen = []
  for s in range(2):
    batches = _take(search, 4, s, steps)
    for batch in batches:
      _check_batch(batch, 4, examples)
    seen += sum((_decode(b) for b in batches), [])
    # Extra examples (the estimate len(search) is short) are the shard's last ones, dropped.
    shard_members = sorted(i for i in members if i % 2 == s)
    assert sorted(sum((_decode(b) for b in batches), [])) == shard_members[: steps * 4]
  assert len(seen) == len(set(seen)) and set(seen) <= members


def test_split_errors_and_nesting():
  stream_set = _set()
  for fraction in (0.0, 1.0, -0.5, 1.5):
    with pytest.raises(ValueError, match=r"fraction.*\(0, 1\)"):
      stream_set.split(fraction, 0)
  weights, search = stream_set.split(0.5, 3)
  assert weights.keep == (0.0, 0.5, 3) and search.keep == (0.5, 1.0, 3)
  inner_weights, inner_search = search.split(0.5, 3)
  assert inner_weights.keep == (0.5, 0.75, 3) and inner_search.keep == (0.75, 1.0, 3)
  with pytest.raises(ValueError, match="seed=3"):
    search.split(0.5, 4)


# --- head. ---


def test_head_is_the_first_examples_in_stream_order():
  stream_set = _set(num_shards=3)
  head = stream_set.head(10)
  assert len(head) == 10
  for k in range(10):
    ids, types = _reference_ids(EXAMPLES[k])
    np.testing.assert_array_equal(head.input_ids[k], ids)
    np.testing.assert_array_equal(head.token_type_ids[k], types)
  np.testing.assert_array_equal(head.labels, [k % 3 for k in range(10)])
  assert head.labels.dtype == np.int32
  assert len(stream_set.head(500)) == 100
  assert len(stream_set.head(0)) == 0


# --- fixed_length. ---


def test_fixed_length_pads_every_batch_and_rejects_longer_examples():
  stream_set = _set(num_shards=3)
  steps = stream_set.steps_per_epoch(3 * stream_set.num_shards)
  for batch in _take(stream_set, 3, 1, steps, fixed_length=MAX_LEN):  # Ends on a dummy batch.
    _check_batch(batch, 3, fixed_length=MAX_LEN)
  with pytest.raises(ValueError, match="fixed_length=10"):
    _take(stream_set, 3, 1, 1, fixed_length=10)


def test_argument_errors():
  with pytest.raises(ValueError, match="shard=3"):
    _take(_set(num_shards=3), 3, 3, 1)
  with pytest.raises(ValueError, match="empty stream"):
    _take(_set([]), 3, 0, 1)
  with pytest.raises(ValueError, match="batch_size"):
    _take(_set(), 0, 0, 1)
  with pytest.raises(ValueError, match="mixes single sentences and pairs"):
    _take(_set(EXAMPLES[:3] + [("x3", None, 0)]), 4, 0, 1)


# --- datasets.IterableDataset and the hub. ---


def _rows(labels):
  return [{"sentence1": "x%d f" % i, "sentence2": "y y", "label": label, "idx": i}
          for i, label in enumerate(labels)]


def _iterable(rows):
  datasets = pytest.importorskip("datasets")

  def generate():
    yield from rows
  return datasets.IterableDataset.from_generator(generate)


def test_from_iterable_dataset_order_and_shards():
  rows = _rows([i % 2 for i in range(11)])
  stream_set = streaming.from_iterable_dataset(_iterable(rows), "rte", num_examples=11,
                                               num_shards=3, tokenizer=FakeTokenizer(),
                                               max_seq_length=MAX_LEN)
  expected = [(r["sentence1"], r["sentence2"], r["label"]) for r in rows]
  assert list(stream_set.open_stream(0, 1)) == expected
  for s in range(3):
    assert list(stream_set.open_stream(s, 3)) == expected[s::3]
    assert list(stream_set.kept_examples(s)) == expected[s::3]
  assert len(stream_set) == 11 and not stream_set.is_regression
  head = stream_set.head(11)
  assert [int(x[1]) - 2000 for x in head.input_ids] == list(range(11))
  # Regression labels come back as floats.
  stsb = streaming.from_iterable_dataset(_iterable(_rows([0.5, 4.25])), "stsb", num_examples=2)
  assert stsb.is_regression and [e[2] for e in stsb.open_stream(0, 1)] == [0.5, 4.25]


def test_from_iterable_dataset_rejects_bad_labels_and_columns():
  stream_set = streaming.from_iterable_dataset(_iterable(_rows([0, 1, 1, 0, -1])), "rte", 5)
  with pytest.raises(ValueError, match=r"label -1 outside \[0, 2\) at stream position 4"):
    list(stream_set.open_stream(0, 1))
  stream_set = streaming.from_iterable_dataset(_iterable(_rows([0, 1.5])), "rte", 2)
  with pytest.raises(ValueError, match="outside"):
    list(stream_set.open_stream(0, 1))
  stream_set = streaming.from_iterable_dataset(_iterable(_rows([0, "x"])), "stsb", 2)
  with pytest.raises(ValueError, match="not a number"):
    list(stream_set.open_stream(0, 1))
  stream_set = streaming.from_iterable_dataset(_iterable(_rows([0])), "sst2", 1)
  with pytest.raises(ValueError, match=r"lacks column\(s\) \['sentence'\]"):
    list(stream_set.open_stream(0, 1))


def test_hub_stream_with_a_fake_hub(monkeypatch):
  datasets = pytest.importorskip("datasets")
  calls = []

  def fake_load_dataset(path, name, split, streaming):
    calls.append((path, name, split, streaming))
    if name == "mnli":
      raise ConnectionError("offline")
    ds = _iterable(_rows([0, 1, 0]))
    if name == "rte":
      ds.info.splits = datasets.SplitDict(
          {split: datasets.SplitInfo(name=split, num_examples=3)})
    return ds

  monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
  stream_set = streaming.hub_stream("RTE", num_shards=2)
  assert calls == [(glue.HUB_DATASET, "rte", "train", True)]
  assert stream_set.num_examples == 3 and stream_set.num_shards == 2
  assert [e[0] for e in stream_set.open_stream(1, 2)] == ["x1 f"]
  # No count in the info: one pass counts the rows.
  assert streaming.hub_stream("mrpc", "dev").num_examples == 3
  assert calls[-1][2] == "validation"
  with pytest.raises(RuntimeError, match="glue_dir"):
    streaming.hub_stream("mnli")


def test_global_batches_place_each_shard_in_its_rows():
  """2 shards, batch 8: rows 0-3 are shard 0's batch, rows 4-7 shard 1's, padded to the longer
  one's length; a process holding shard 1 alone builds the same rows 4-7 (at a fixed length that
  needs no other process) and leaves rows 0-3 empty with weight 0."""
  stream_set = _set(num_shards=2)
  kwargs = {"seed": 3, "pad_multiple": MULTIPLE, "bucket_window": 2}
  both = list(itertools.islice(streaming.global_batches(stream_set, 8, own=[0, 1], **kwargs), 5))
  alone = list(itertools.islice(streaming.global_batches(stream_set, 8, own=[1], start_step=0,
                                                         fixed_length=MAX_LEN, **kwargs), 5))
  per_shard = [_take(stream_set, 4, s, 5, seed=3, bucket_window=2) for s in range(2)]
  for t in range(5):
    length = max(p[t]["input_ids"].shape[1] for p in (per_shard[0], per_shard[1]))
    assert both[t]["input_ids"].shape == (8, length)
    for s in range(2):
      part = per_shard[s][t]
      rows = slice(4 * s, 4 * s + 4)
      for key, value in part.items():
        width = value.shape[1] if value.ndim == 2 else None
        got = both[t][key][rows] if width is None else both[t][key][rows, :width]
        np.testing.assert_array_equal(got, value)
        if width is not None:
          assert not both[t][key][rows, width:].any()
    assert alone[t]["input_ids"].shape == (8, MAX_LEN)
    assert not alone[t]["weights"][:4].any() and not alone[t]["input_ids"][:4].any()
    for key in ("input_ids", "attention_mask", "token_type_ids"):
      np.testing.assert_array_equal(alone[t][key][4:, :length], both[t][key][4:])
    np.testing.assert_array_equal(alone[t]["weights"][4:], both[t]["weights"][4:])


def test_load_stream_reads_the_local_tsv_row_by_row(glue_dir):
  """The local TSV as a stream: the row count and, shard by shard, the examples `read_tsv` reads."""
  examples = glue.read_tsv("rte", glue_dir / "RTE" / "train.tsv")
  stream_set = streaming.load_stream("rte", "train", str(glue_dir), num_shards=3)
  assert stream_set.num_examples == len(examples) == 2490 and not stream_set.is_regression
  for s in range(3):
    got = list(stream_set.open_stream(s, 3))
    want = list(zip(examples.text_a, examples.text_b, examples.labels.tolist()))[s::3]
    assert got == want
  with pytest.raises(FileNotFoundError, match="GLUE file not found"):
    streaming.load_stream("rte", "train", str(glue_dir / "nowhere"))
