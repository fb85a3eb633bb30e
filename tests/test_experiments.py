"""The experiment scripts' --dry-run: each lists its runs (teacher first) and runs nothing."""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import REPO_ROOT


def _dry_run(script: str, *args: str, root) -> list[str]:
  env = {**os.environ, "ROOT": str(root)}
  out = subprocess.run(["bash", f"experiments/{script}", "--dry-run", *args], cwd=REPO_ROOT,
                       env=env, capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  return out.stdout.splitlines()


@pytest.mark.parametrize("script, task, runs", [
    ("run_compression.sh", "rte", ["uniform4", "automp16", "hessian16", "automp8", "hessian8",
                                   "uniform8", "uniform2"]),
    ("run_compression.sh", "mrpc", ["uniform4", "automp16", "hessian16", "automp8", "hessian8",
                                    "uniform8", "uniform2", "automp20", "automp30"]),
    ("run_compression.sh", "sst2", ["uniform4", "automp16", "hessian16", "automp8", "hessian8",
                                    "uniform8", "uniform2", "automp20", "automp30",
                                    "ablation_groups1",
                                    "ablation_groups128", "ablation_bits024", "ablation_sgd"]),
    ("run_sensimix.sh", "rte", ["sensimix"]),
    ("run_sensimix.sh", "mrpc", ["sensimix", "xnor_scale", "no_abwr", "no_pt", "no_ilf",
                                 "auto_split", "ffn_inputs_8bit", "clipped_input_ste"]),
    ("run_sensimix.sh", "sst2", ["sensimix", "xnor_scale", "no_abwr", "no_pt", "no_ilf",
                                 "auto_split", "ffn_inputs_8bit", "clipped_input_ste",
                                 "double_steps"]),
])
def test_dry_run_lists_the_teacher_then_every_run(script, task, runs, tmp_path):
  lines = _dry_run(script, task, root=tmp_path)
  assert lines[0].endswith(f"workdirs/finetune_fp/{task}")  # The teacher: done, or todo.
  assert [l.split("--workdir=")[1].split()[0] for l in lines[1:]] == [
      f"{tmp_path}/{task}/{run}" for run in runs]
  assert all(l.startswith("todo: python -m mpqbert.main") for l in lines[1:])
  assert not any(tmp_path.iterdir()), "a dry run must not create run directories"


def test_dry_run_marks_finished_runs_done(tmp_path):
  (tmp_path / "rte" / "uniform4").mkdir(parents=True)
  (tmp_path / "rte" / "uniform4" / "results.json").write_text("{}")
  lines = _dry_run("run_compression.sh", "rte", root=tmp_path)
  assert f"done: {tmp_path}/rte/uniform4" in lines
  assert sum(l.startswith("todo: ") for l in lines[1:]) == 6


def test_finetune_dry_run_covers_five_tasks(tmp_path):
  lines = _dry_run("run_finetune_fp.sh", root=tmp_path)
  assert [l.split("workdirs/finetune_fp/")[-1] for l in lines] == ["rte", "mrpc", "stsb", "cola",
                                                                   "sst2"]


def test_head_to_head_dry_run_lists_the_teacher_then_both_methods_per_seed(tmp_path):
  lines = _dry_run("run_head_to_head.sh", "mrpc", root=tmp_path)
  workdirs = [l.split("--workdir=")[1].split()[0] for l in lines]
  assert workdirs == [f"{tmp_path}/mrpc/teacher"] + [
      f"{tmp_path}/mrpc/{method}_seed{seed}" for seed in (0, 1, 2)
      for method in ("uniform2", "automp")]
  automp = [l for l in lines if "automp_seed" in l]
  assert all("--config.search.target_uniform_bits=2" in l for l in automp)
  assert all("--config.train.num_train_steps=100" in l for l in lines[1:])  # same budget
  assert not any(tmp_path.iterdir()), "a dry run must not create run directories"
