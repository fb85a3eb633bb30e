"""The compression pipelines end to end on a tiny BERT: one command each, resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT, tiny_run_flags


def _flags(model_dir, glue_dir, **extra) -> dict:
  tiny = tiny_run_flags(model_dir, glue_dir)
  flags = {**tiny, "teacher.train.batch_size": 8, "teacher.train.num_train_steps": 16,
           "train.num_train_steps": 12, "search.num_train_steps": 24, "search.batch_size": 8,
           "search.warmup_epochs": 0.5, "search.arch_optimizer": "adam", "search.arch_lr": 0.05,
           "quant.groups": 4, "quant.calibration_batches": 2, "hessian.batch_size": 8,
           "search.tolerance": 0.02,  # The tiny BERT's sub-groups are 0.6% of its size each.
           "hessian.num_batches": 1, "hessian.power_iterations": 3, "checkpoint.every_steps": 6}
  flags.pop("train.num_epochs")
  flags.update(extra)
  return flags


def _launch(config: str, workdir: Path, flags: dict) -> subprocess.Popen:
  """`python -m mpqbert.main` with a compilation cache of its own beside the workdir."""
  args = [sys.executable, "-m", "mpqbert.main", f"--config=configs/{config}.py",
          f"--workdir={workdir}", f"--compilation_cache_dir={workdir.parent / 'xla_cache'}"
          ] + [f"--config.{k}={v}" for k, v in flags.items()]
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  return subprocess.Popen(args, cwd=REPO_ROOT, env={**env, "JAX_PLATFORMS": "cpu"},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> str:
  """The run's printed output followed by its log."""
  out, err = process.communicate(timeout=900)
  assert process.returncode == 0, err[-3000:]
  return out + err


def _rows(path: Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_automp_resumes_after_kill_9_as_if_uninterrupted(tmp_path, tiny_model_dir, glue_dir):
  flags = _flags(tiny_model_dir, glue_dir, **{"search.target_compression": 12.0})
  reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
  out = _finish(_launch("automp", reference_dir, flags))
  reference = json.loads((reference_dir / "results.json").read_text())
  assert "full precision" in out and "automp" in out  # the printed table
  # Each step function compiles once per sequence length, and every batch here has the one
  # length 64 (`data.pad_multiple`). How the search pads its pairs of batches to one length:
  # test_data's test of `loop.paired_batches`.
  assert out.count("compiled search_step for") == 1
  assert out.count("compiled qat_step for") == 1
  # The later runs below load their steps from this cache; they must still match this run.
  assert any((tmp_path / "xla_cache").iterdir())
  low, high = reference["search"]["band_mb"]
  assert low <= reference["size_mb"] <= high  # the exact derivation: at most the target
  info = reference["search"]
  assert info["derived_size_mb"] == pytest.approx(reference["size_mb"], rel=1e-9)
  # The size loss pulls the searched distribution to the target: its expected size and the
  # derived policy's agree within 5% at the end of even this tiny search.
  assert info["expected_size_mb"] == pytest.approx(info["derived_size_mb"], rel=0.05)
  for key in ("entropy", "mean_top_prob", "argmax_size_mb", "derived_pruned_groups"):
    assert key in info and key in info["start"]
  assert (reference_dir / "bit_map.png").stat().st_size > 0
  policy = json.loads((reference_dir / "policy.json").read_text())
  assert policy["format"] == "mpqbert-policy/1"
  # The finished run exports to a packed checkpoint of its size that predicts as it does.
  exported = subprocess.run(
      [sys.executable, "-m", "mpqbert.export", f"--workdir={reference_dir}",
       f"--out={tmp_path / 'automp.safetensors'}", "--check_dev", "--check_int8"], cwd=REPO_ROOT,
      capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert exported.returncode == 0, exported.stderr[-3000:]
  report = json.loads((tmp_path / "automp.safetensors.json").read_text())
  # The safetensors file: its header, the arrays, and a 4-byte input step size per matrix at most.
  step_sizes = report["file_bytes"] - report["header_bytes"] - report["all_bytes"]
  assert step_sizes % 4 == 0 and 0 <= step_sizes <= 4 * len(policy["matrices"])
  assert report["matrix_bytes"] == pytest.approx(report["size_mb_bytes"], rel=0.02)
  assert report["agreement"] >= 0.995
  assert report["int8"]["agreement"] >= 0.995  # its int8 CPU layout (export.lay_out) too
  # No sign(x) inputs: the fake-quantized model with its weights one ulp off predicts as it does.
  assert report["agreement_one_ulp"] >= 0.995

  process = _launch("automp", killed_dir, flags)
  deadline = time.time() + 600
  while not any(p.name.isdigit() for p in (killed_dir / "search" / "checkpoints").glob("*")):
    assert process.poll() is None, process.communicate()[1][-3000:]
    assert time.time() < deadline
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.communicate()
  assert not (killed_dir / "results.json").exists(), "the run ended before it could be killed"

  _finish(_launch("automp", killed_dir, flags))
  resumed = json.loads((killed_dir / "results.json").read_text())
  assert json.loads((killed_dir / "policy.json").read_text()) == policy
  assert resumed["dev"] == pytest.approx(reference["dev"], rel=1e-6)
  assert resumed["size_mb"] == reference["size_mb"]
  for stage in ("search", "retrain"):
    got, want = _rows(killed_dir / stage / "metrics.jsonl"), _rows(reference_dir / stage /
                                                                   "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in got] == [(r["step"], r["split"]) for r in want]
    for key in ("loss", "expected_size_mb", "sampled_size_mb", "arch_entropy"):
      if key in want[0]:
        np.testing.assert_allclose([r[key] for r in got if key in r],
                                   [r[key] for r in want if key in r], rtol=1e-5)


def test_uniform_qbert_and_hawq_pipelines(tmp_path, tiny_model_dir, glue_dir):
  flags = _flags(tiny_model_dir, glue_dir)
  _finish(_launch("finetune", tmp_path / "teacher",
                  {**tiny_run_flags(tiny_model_dir, glue_dir), "train.num_train_steps": 16}))
  shared = {"teacher.workdir": str(tmp_path / "teacher")}
  _finish(_launch("uniform", tmp_path / "uniform3", {**flags, **shared, "quant.bits": 3}))
  uniform = json.loads((tmp_path / "uniform3" / "results.json").read_text())
  # 3-bit codes go 10 to a 32-bit word along K: ceil(K / 10) words per column, counted by hand.
  matrices = json.loads((tmp_path / "uniform3" / "policy.json").read_text())["matrices"].values()
  stored = sum(-(-m["shape"][0] // 10) * 32 * m["shape"][1] for m in matrices)
  weights = sum(m["shape"][0] * m["shape"][1] for m in matrices)
  assert uniform["avg_bits"] == pytest.approx(stored / weights) and uniform["avg_bits"] > 3.0
  assert uniform["method"] == "uniform3"
  assert [r["method"] for r in uniform["rows"]] == ["full precision", "uniform 3-bit"]
  # The final model's dev predictions are kept for paired bootstraps: they give its accuracy.
  with np.load(tmp_path / "uniform3" / "retrain" / "dev_predictions.npz") as f:
    assert len(f["labels"]) == 277  # RTE dev
    assert np.mean(f["predictions"] == f["labels"]) == pytest.approx(uniform["dev"], abs=1e-9)

  # The Hessian baselines: their policies at or under the target (in the knapsack's window),
  # Q-BERT without pruning or 1-bit groups, HAWQ over the full search space.
  for method, extra in (("qbert", {"hessian.num_batches": 2}),
                        ("hawq", {"hessian.trace_samples": 2})):
    _finish(_launch(method, tmp_path / method,
                    {**flags, **shared, **extra, "search.target_uniform_bits": 3}))
    result = json.loads((tmp_path / method / "results.json").read_text())
    target = uniform["size_mb"]  # uniform 3-bit's exact size, same sub-groups
    assert (1 - 0.02) * target <= result["size_mb"] <= target, method
    bits = {int(b) for b in result["policy"]["groups_per_bits"]}
    info = json.loads((tmp_path / method / "sensitivity.json").read_text())
    assert result["sensitivity"] == info and info["method"] == method
    if method == "qbert":
      assert bits <= {2, 3, 4, 8} and len(bits) > 1, bits
      assert all(len(v) == 2 for v in info["eigenvalues"].values())  # one per batch
      assert [k.split("encoder/")[-1] for k in info["sensitivity"]] == ["layer/0", "layer/1"]
    else:
      assert info["vectors"] == 2 * 1 and len(info["trace"]) == 12


def test_automp_on_a_streamed_training_split(tmp_path, tiny_model_dir, glue_dir):
  """AutoMPQ with `data.streaming=True`: teacher, Hessian-free search on a hash-split stream
  (weights / search parts), derivation at the target and retrain, all from the TSV read row by
  row; the policy lands in the size window like the in-memory run's."""
  flags = _flags(tiny_model_dir, glue_dir, **{"data.streaming": True, "data.train_subset": 0,
                                              "search.target_uniform_bits": 3,
                                              "search.warmup_epochs": 0.0})
  out = _finish(_launch("automp", tmp_path / "automp", flags))
  assert "streams shards 0-0 of 1 of 2490 training examples" in out
  result = json.loads((tmp_path / "automp" / "results.json").read_text())
  assert result["method"] == "automp" and 0.0 <= result["dev"] <= 1.0
  # The search's two parts are the stream's hash split (their sizes estimated from the share).
  assert "search: 1992 weight / 498 search examples" in out
  search = json.loads((tmp_path / "automp" / "search" / "search.json").read_text())
  assert search["steps"] == 24 and search["derived_size_mb"] == result["size_mb"]
