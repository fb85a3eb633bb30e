"""Fine-tuning: optimizer pieces, losses, the main command, resume after kill -9, data parallel."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT, load_config, tiny_run_flags, xla_flags
from mpqbert import files, models
from mpqbert.methods import common
from mpqbert.train import checkpoint, losses, optim, results, steps
from mpqbert.train.loop import finetune


def _config(overrides: dict):
  config = load_config("finetune")
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = config
    for name in parents:
      node = node[name]
    node[leaf] = value
  return config


def _main(workdir: Path, overrides: dict, **popen_kwargs):
  args = [sys.executable, "-m", "mpqbert.main", "--config=configs/finetune.py",
          f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **popen_kwargs)


def _finish(process) -> str:
  out, err = process.communicate(timeout=600)
  assert process.returncode == 0, err[-3000:]
  return out


def test_weight_decay_mask_spares_biases_and_layer_norms():
  params = {"encoder": {"dense": {"kernel": 1, "bias": 1}, "LayerNorm": {"scale": 1, "bias": 1}},
            "embeddings": {"word_embeddings": {"embedding": 1}}}
  assert optim.decay_mask(params) == {
      "encoder": {"dense": {"kernel": True, "bias": False},
                  "LayerNorm": {"scale": False, "bias": False}},
      "embeddings": {"word_embeddings": {"embedding": True}}}


def test_learning_rate_warms_up_then_decays_linearly():
  schedule = optim.learning_rate_schedule(1e-3, num_train_steps=100, warmup_steps=10)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(55), schedule(100)],
                             [0.0, 5e-4, 1e-3, 5e-4, 0.0], atol=1e-9)


def test_losses_match_float64_reference_and_ignore_padding_rows():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 3))
  labels = rng.integers(0, 3, 6)
  weights = np.array([1, 1, 1, 1, 0, 0], np.float32)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected_ce = -log_probs[np.arange(6), labels][:4].mean()
  ce = losses.weighted_mean(losses.per_example_loss(jnp.asarray(logits, jnp.float32), labels, False),
                           weights)
  np.testing.assert_allclose(ce, expected_ce, rtol=1e-5)
  targets = rng.uniform(0, 5, 6)
  mse = losses.weighted_mean(losses.per_example_loss(jnp.asarray(logits[:, :1], jnp.float32),
                                                   targets, True), weights)
  np.testing.assert_allclose(mse, ((logits[:4, 0] - targets[:4])**2).mean(), rtol=1e-5)


def test_train_step_fits_a_fixed_batch(tiny_model_dir):
  model, params = models.load_pretrained(tiny_model_dir, num_labels=2)
  config = load_config("finetune")
  config.train.learning_rate = 1e-3
  optimizer, _ = optim.make_optimizer(config.train, num_train_steps=40)
  train_step = steps.make_train_step(model, optimizer, is_regression=False, dropout_seed=0)
  rng = np.random.default_rng(0)
  batch = {"input_ids": rng.integers(1000, 1100, (8, 16)).astype(np.int32),
           "attention_mask": np.ones((8, 16), np.int32),
           "token_type_ids": np.zeros((8, 16), np.int32),
           "labels": np.array([0, 1] * 4, np.int32), "weights": np.ones(8, np.float32)}
  state = steps.TrainState.create(params, optimizer)
  losses = []
  for _ in range(40):
    state, metrics = train_step(state, batch)
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 40
  assert losses[-1] < 0.6 * losses[0], losses


def test_main_writes_results_and_resumes_after_kill_9(tmp_path, tiny_model_dir, glue_dir):
  overrides = {**tiny_run_flags(tiny_model_dir, glue_dir), "train.num_train_steps": 160,
               "train.eval_every_steps": 80, "checkpoint.every_steps": 16}
  reference_dir, killed_dir = tmp_path / "uninterrupted", tmp_path / "killed"
  out = _finish(_main(reference_dir, overrides))
  reference = json.loads((reference_dir / "results.json").read_text())
  assert "rte finetune dev accuracy" in out
  for key in ("task", "method", "metric", "dev", "size_mb", "size_mb_other", "compression",
              "avg_bits", "steps", "wall_time_s", "git_commit", "config"):
    assert key in reference, key
  assert reference["steps"] == 160 and reference["metric"] == "accuracy"
  assert 0.0 <= reference["dev"] <= 1.0
  expected = "CPU" if jax.default_backend() == "cpu" else jax.devices()[0].device_kind
  assert expected in reference["device"] and jax.__version__ in reference["device"]

  process = _main(killed_dir, overrides)
  deadline = time.time() + 300
  while not any(p.name.isdigit() for p in (killed_dir / "checkpoints").glob("*")):
    assert process.poll() is None, process.communicate()[1][-3000:]
    assert time.time() < deadline
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.communicate()
  assert process.returncode == -signal.SIGKILL
  assert not (killed_dir / "results.json").exists(), "the run ended before it could be killed"

  _finish(_main(killed_dir, overrides))
  resumed = json.loads((killed_dir / "results.json").read_text())
  assert resumed["dev_metrics"]["validation"] == pytest.approx(
      reference["dev_metrics"]["validation"], rel=1e-6)
  rows = lambda d: [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
  resumed_rows, reference_rows = rows(killed_dir), rows(reference_dir)
  assert [(r["step"], r["split"]) for r in resumed_rows] == [(r["step"], r["split"])
                                                              for r in reference_rows]
  np.testing.assert_allclose([r["loss"] for r in resumed_rows],
                             [r["loss"] for r in reference_rows], rtol=1e-6)


def test_unknown_config_key_is_a_one_line_error(tmp_path):
  process = _main(tmp_path, {"tsak": "rte"})
  _, err = process.communicate(timeout=120)
  assert process.returncode != 0
  assert "unknown config key" in err and 'Did you mean "task"' in err
  assert "Traceback" not in err


def test_bad_task_data_and_workdir_errors(tmp_path, tiny_model_dir, glue_dir):
  base = tiny_run_flags(tiny_model_dir, glue_dir)
  with pytest.raises(ValueError, match="sst3.*rte"):
    finetune(_config({**base, "task": "sst3"}), tmp_path / "a")
  with pytest.raises(FileNotFoundError, match=r"QNLI/train.tsv[\s\S]*glue_dir"):
    finetune(_config({**base, "task": "qnli"}), tmp_path / "b")
  missing_dir = tmp_path / "no_glue_here"
  with pytest.raises(FileNotFoundError, match="no_glue_here"):
    finetune(_config({**base, "data.glue_dir": str(missing_dir)}), tmp_path / "c")

  checkpoint.guard_workdir(tmp_path / "d", _config(base).to_json())
  with pytest.raises(ValueError, match=r"different config.*train.learning_rate"):
    checkpoint.guard_workdir(tmp_path / "d", _config({**base, "train.learning_rate": 1.0}).to_json())
  # The device layout may change on resume (Orbax restores onto the new mesh).
  checkpoint.guard_workdir(tmp_path / "d", _config({**base, "train.model_parallel": 2}).to_json())
  # A run saved before data.shards, data.streaming and model_layers existed resumes under their
  # defaults, and only those; reading its config back fills them in.
  saved = json.loads(_config(base).to_json())
  for key in ("shards", "streaming"):
    del saved["data"][key]
  del saved["model_layers"]
  (tmp_path / "e").mkdir()
  (tmp_path / "e" / checkpoint.CONFIG_FILE).write_text(json.dumps(saved))
  checkpoint.guard_workdir(tmp_path / "e", _config(base).to_json())
  with pytest.raises(ValueError, match=r"different config.*data.shards"):
    checkpoint.guard_workdir(tmp_path / "e", _config({**base, "data.shards": 2}).to_json())
  with pytest.raises(ValueError, match=r"different config.*model_layers: 0 -> 1"):
    checkpoint.guard_workdir(tmp_path / "e", _config({**base, "model_layers": 1}).to_json())
  loaded = checkpoint.load_config(tmp_path / "e")
  assert (loaded.model_layers, loaded.data.shards, loaded.data.streaming) == (0, 0, False)
  assert loaded.to_dict() == json.loads(_config(base).to_json())
  with pytest.raises(FileNotFoundError, match="holds no mpqbert run"):
    checkpoint.load_config(tmp_path / "a_workdir_never_used")


def test_write_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path):
  path = tmp_path / "new_dir" / "result.json"
  files.write_atomic(path, '{"dev": 1}')
  files.write_atomic(path, '{"dev": 2}')
  assert json.loads(path.read_text()) == {"dev": 2}
  files.write_atomic(path.with_name("plot.png"), b"\x89PNG")
  assert path.with_name("plot.png").read_bytes() == b"\x89PNG"
  assert sorted(p.name for p in path.parent.iterdir()) == ["plot.png", "result.json"]


def test_teacher_checkpoint_of_another_model_names_the_differing_parameters(tmp_path):
  saved = {"encoder": {"kernel": np.zeros((4, 8)), "bias": np.zeros(8)}, "head": np.zeros(3)}
  manager = checkpoint.make_manager(tmp_path / "run", every_steps=1, keep=1)
  checkpoint.save(manager, 1, {"params": saved}, force=True)
  manager.wait_until_finished()
  template = {"encoder": {"kernel": np.zeros((4, 6)), "bias": np.zeros(8)},
              "classifier": np.zeros(2)}  # What the checkpoint's `params` entry should hold.
  with pytest.raises(ValueError, match=r"another model") as error:
    common.restore_params(tmp_path / "run", template)
  message = str(error.value)
  assert "classifier missing" in message and "head unexpected" in message
  assert "encoder/kernel: saved (4, 8), model (4, 6)" in message
  assert "bias" not in message and "teacher.workdir" in message
  restored = common.restore_params(tmp_path / "run", saved)
  np.testing.assert_array_equal(restored["encoder"]["kernel"], saved["encoder"]["kernel"])


def test_divergence_raises_a_clear_error(tmp_path, tiny_model_dir, glue_dir):
  config = _config({**tiny_run_flags(tiny_model_dir, glue_dir), "train.learning_rate": 1e30,
                    "train.warmup_ratio": 0.0, "train.num_train_steps": 8})
  with pytest.raises(FloatingPointError, match="diverged.*learning_rate"):
    finetune(config, tmp_path)
  assert not list((tmp_path / "checkpoints").glob("[0-9]*"))


_DATA_PARALLEL_SCRIPT = """
import json, sys, itertools
import jax, numpy as np
from mpqbert import data, models
from mpqbert.train import optim, sharding, steps
model, params = models.load_pretrained(sys.argv[1], num_labels=2)
tokenizer = models.load_tokenizer(sys.argv[1])
dataset = data.tokenize(data.load_split("rte", "train", sys.argv[2]), tokenizer, 64)
optimizer, _ = optim.make_optimizer(optim_config := __import__("ml_collections").ConfigDict(dict(
    learning_rate=1e-4, warmup_ratio=0.0, weight_decay=0.01, adam_b1=0.9, adam_b2=0.999,
    adam_eps=1e-6, max_grad_norm=1.0)), 10)

def leaves(state):
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}

def run(devices):
  mesh = sharding.make_mesh(devices)
  fresh = jax.tree.map(np.array, params)  # The train step donates its state: copy per run.
  state = sharding.replicate(steps.TrainState.create(fresh, optimizer), mesh)
  train_step = steps.make_train_step(model, optimizer, False, dropout_seed=0)
  out = []
  for batch in itertools.islice(data.train_batches_from(dataset, 16, seed=0, max_seq_length=64), 4):
    state, metrics = train_step(state, sharding.shard_batch(batch, mesh))
    out.append(float(metrics["loss"]))
  return out, leaves(state)

initial = leaves(steps.TrainState.create(params, optimizer))
(four, four_state), (one, one_state) = run(jax.devices()), run(jax.devices()[:1])
np.savez(sys.argv[3], **{f"{run}{i}": state[name] for run, state in
                         (("initial", initial), ("four", four_state), ("one", one_state))
                         for i, name in enumerate(sorted(initial))})
print(json.dumps({"devices": len(jax.devices()), "four": four, "one": one,
                  "names": sorted(initial)}))
"""


def test_data_parallel_over_four_devices_matches_one(tmp_path, tiny_model_dir, glue_dir):
  """4 AdamW steps with the batch split over 4 (host) devices and on 1 give the same losses and,
  leaf by leaf, the same train state: parameter updates and AdamW's moments (mu and nu sum each
  leaf's clipped gradients, so a gradient one leaf got wrong on the mesh shows in that leaf)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": xla_flags(host_devices=4)}
  arrays = tmp_path / "states.npz"
  result = subprocess.run([sys.executable, "-c", _DATA_PARALLEL_SCRIPT, str(tiny_model_dir),
                           str(glue_dir), str(arrays)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["devices"] == 4
  np.testing.assert_allclose(out["four"], out["one"], rtol=1e-5)
  assert len(set(out["one"])) > 1  # Training moved; the comparison is not of constants.

  names = out["names"]
  kind = lambda name: ("params" if name.startswith(".params[") else "mu" if ".mu[" in name
                       else "nu" if ".nu[" in name else "other")
  with np.load(arrays) as saved:
    state = {run: {n: saved[f"{run}{i}"].astype(np.float64) for i, n in enumerate(names)}
             for run in ("initial", "four", "one")}
  counts = {k: sum(kind(n) == k for n in names) for k in ("params", "mu", "nu")}
  assert counts["params"] == counts["mu"] == counts["nu"] > 10, names
  # Float32 rounding of a stored value is relative to the size of that kind of quantity, not
  # to the leaf's own (a key bias's gradient is exactly 0 in theory, ~1e-15 as computed).
  scale = {k: max(np.max(np.abs(state["one"][n]), initial=0.0) for n in names if kind(n) == k)
           for k in ("params", "mu", "nu", "other")}
  moved = 0.0
  for name in names:
    four, one = (state[run][name] - state["initial"][name] for run in ("four", "one"))
    assert four.shape == one.shape, name
    np.testing.assert_allclose(four, one, rtol=1e-4, atol=1e-7 * scale[kind(name)],
                               err_msg=name)
    if kind(name) == "params":
      moved = max(moved, float(np.max(np.abs(one), initial=0.0)))
  assert moved > 1e3 * 1e-7 * scale["params"]  # the updates dwarf the tolerance


def test_metrics_log_drops_a_torn_last_line_and_refuses_a_damaged_file(tmp_path):
  rows = [{"step": s, "split": "train", "loss": 1.0 / s} for s in (10, 20, 30)]
  text = "".join(json.dumps(r) + "\n" for r in rows)
  (tmp_path / "metrics.jsonl").write_text(text + '{"step": 40, "split": "tr')  # killed mid-write
  log = results.MetricsLog(tmp_path, resume_step=20)
  assert log.rows() == rows[:2]  # the torn line and the steps after the checkpoint are gone
  log.write(30, "train", {"loss": 0.5})
  assert [r["step"] for r in log.rows()] == [10, 20, 30]
  (tmp_path / "metrics.jsonl").write_text(json.dumps(rows[0]) + '\n{"ste\n' + json.dumps(rows[1]))
  with pytest.raises(ValueError, match="line 2 is not JSON"):
    results.MetricsLog(tmp_path, resume_step=20)


def test_cpu_model_names_the_processor_for_the_device_field(tmp_path, monkeypatch):
  """results.json's device names the CPU model: runs on AMD and Intel CPUs differ by rounding."""
  cpuinfo = tmp_path / "cpuinfo"
  cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\n"
                     "model name\t: AMD EPYC 7B13 64-Core Processor\nflags\t: fpu vme\n\n"
                     "processor\t: 1\nmodel name\t: AMD EPYC 7B13 64-Core Processor\n")
  assert results.cpu_model(cpuinfo) == "AMD EPYC 7B13 64-Core Processor"
  monkeypatch.setattr(results.platform, "machine", lambda: "aarch64")
  assert results.cpu_model(tmp_path / "absent") == "aarch64"  # macOS, or no /proc
  cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")  # ARM Linux: no model name
  assert results.cpu_model(cpuinfo) == "aarch64"


def test_an_unfinished_teacher_workdir_is_refused(tmp_path):
  (tmp_path / "checkpoints").mkdir()  # a run that was killed before it finished
  with pytest.raises(ValueError, match="no results.json: it is not a finished"):
    common.check_finished_teacher(tmp_path, "sst2", "minilm")
  (tmp_path / "results.json").write_text(json.dumps({"task": "mrpc", "model": "minilm"}))
  with pytest.raises(ValueError, match="fine-tuned on task 'mrpc'"):
    common.check_finished_teacher(tmp_path, "sst2", "minilm")
  (tmp_path / "results.json").write_text(json.dumps({"task": "sst2", "model": "minilm"}))
  common.check_finished_teacher(tmp_path, "sst2", "minilm")


def test_predict_returns_every_example_in_order_after_one_transfer(monkeypatch):
  """`loop.predict` over several batches: each example's prediction (here the sum of its token
  ids, by NumPy) lands at its dataset position, and the outputs come back in one `fetch`."""
  import jax
  import ml_collections
  from mpqbert import data
  from mpqbert.train import loop, sharding

  rng = np.random.default_rng(3)
  ids = [rng.integers(1, 500, rng.integers(3, 40)).astype(np.int32) for _ in range(37)]
  dataset = data.TokenizedDataset(ids, [np.zeros_like(i) for i in ids],
                                  np.zeros(len(ids), np.int32))
  config = ml_collections.ConfigDict({"train": {"eval_batch_size": 8},
                                      "data": {"max_seq_length": 64, "pad_multiple": 8}})
  eval_step = jax.jit(lambda params, b: {
      "predictions": jnp.sum(b["input_ids"], axis=1),
      "loss_sum": jnp.sum(b["weights"] * params)})
  fetches = []
  real_fetch = sharding.fetch
  monkeypatch.setattr(sharding, "fetch", lambda tree: fetches.append(1) or real_fetch(tree))
  predictions, loss_sum = loop.predict(eval_step, jnp.float32(0.5), dataset, config,
                                       sharding.make_mesh())
  np.testing.assert_array_equal(predictions, [int(i.sum()) for i in ids])
  assert loss_sum == pytest.approx(0.5 * len(ids))
  assert len(fetches) == 1
