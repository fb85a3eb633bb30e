"""Several JAX processes as one job on this machine (JAX's multi-controller runtime, CPU
collectives over gloo): 2 processes x 2 devices must train as 1 process x 4 devices does, write
each file once and whole, and resume after losing a process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT, tiny_run_flags, xla_flags

# Files a run writes whole (atomically): a reader must never find one that does not parse.
_WHOLE_FILES = ("results.json", "config.json", "policy.json", "search/search.json",
                "full_precision.json")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch_job(config: str, workdir: Path, flags: dict, *, processes: int,
                devices_per_process: int) -> list[subprocess.Popen]:
  """The same `python -m mpqbert.main` command once per process, as on several hosts."""
  args = [sys.executable, "-m", "mpqbert.main", f"--config=configs/{config}.py",
          f"--workdir={workdir}", f"--compilation_cache_dir={workdir.parent / 'xla_cache'}"
          ] + [f"--config.{k}={v}" for k, v in flags.items()]
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env.update(JAX_PLATFORMS="cpu",
             XLA_FLAGS=xla_flags(host_devices=devices_per_process))
  coordinator = f"localhost:{_free_port()}"
  workdir.mkdir(parents=True, exist_ok=True)
  launched = []
  for index in range(processes):
    job = ({"JAX_COORDINATOR_ADDRESS": coordinator, "JAX_NUM_PROCESSES": str(processes),
            "JAX_PROCESS_ID": str(index)} if processes > 1 else {})
    log = (workdir.parent / f"{workdir.name}.process{index}.log").open("a")
    launched.append(subprocess.Popen(args, cwd=REPO_ROOT, env={**env, **job}, stdout=log,
                                     stderr=subprocess.STDOUT, text=True))
  return launched


def _wait(job: list[subprocess.Popen], workdir: Path, timeout: float = 900) -> None:
  for index, process in enumerate(job):
    process.wait(timeout=timeout)
    log = (workdir.parent / f"{workdir.name}.process{index}.log").read_text()
    assert process.returncode == 0, f"process {index} failed:\n{log[-3000:]}"


class _WholeFileWatcher(threading.Thread):
  """Reads the run's whole-written files as often as it can while the job runs; records any
  that exists but does not parse (a reader saw it half written)."""

  def __init__(self, workdir: Path):
    super().__init__(daemon=True)
    self.workdir, self.torn, self.reads, self.done = workdir, [], 0, threading.Event()

  def run(self):
    while not self.done.is_set():
      for name in _WHOLE_FILES:
        try:
          text = (self.workdir / name).read_text()
        except FileNotFoundError:
          continue
        self.reads += 1
        try:
          json.loads(text)
        except json.JSONDecodeError:
          self.torn.append(name)
      time.sleep(0.01)


def _rows(path: Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_same_training(got: Path, want: Path, stages: tuple[str, ...]) -> None:
  """Equal per-step losses and final metrics (float tolerance: the reductions' order differs)."""
  for stage in stages:
    a, b = _rows(got / stage / "metrics.jsonl"), _rows(want / stage / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b], stage
    for key in ("loss", "accuracy", "expected_size_mb", "sampled_size_mb"):
      if key in b[0]:
        np.testing.assert_allclose([r[key] for r in a if key in r],
                                   [r[key] for r in b if key in r], rtol=1e-4, err_msg=stage)
  a, b = (json.loads((d / "results.json").read_text()) for d in (got, want))
  assert a["dev"] == pytest.approx(b["dev"], rel=1e-6)
  assert a["size_mb"] == b["size_mb"]


def _temporary_files(workdir: Path) -> list[Path]:
  return [p for p in workdir.rglob("*.tmp") if p.is_file()]


def test_automp_as_two_processes_equals_one_process_of_four_devices(tmp_path, tiny_model_dir,
                                                                    glue_dir):
  """The AutoMPQ pipeline (teacher fine-tune, search, derivation, retrain) as one job of 2
  processes x 2 devices against 1 process x 4 devices: the same global batches and the same
  steps, so the same losses, policy and dev metrics; every file once, never seen torn."""
  flags = {**tiny_run_flags(tiny_model_dir, glue_dir), "teacher.train.batch_size": 8,
           "teacher.train.num_train_steps": 8, "train.num_train_steps": 6,
           "search.num_train_steps": 12, "search.batch_size": 8, "search.warmup_epochs": 0.0,
           "search.arch_optimizer": "adam", "search.arch_lr": 0.05, "quant.groups": 4,
           "quant.calibration_batches": 2, "search.tolerance": 0.02,
           "search.target_compression": 12.0, "checkpoint.every_steps": 6, "data.shards": 2}
  flags.pop("train.num_epochs")
  single, multi = tmp_path / "one_process", tmp_path / "two_processes"
  _wait(_launch_job("automp", single, flags, processes=1, devices_per_process=4), single)
  watcher = _WholeFileWatcher(multi)
  watcher.start()
  _wait(_launch_job("automp", multi, flags, processes=2, devices_per_process=2), multi)
  watcher.done.set()
  watcher.join()
  assert watcher.reads > 0 and watcher.torn == []
  assert "process 1 of 2, 2 local of 4 devices" in (tmp_path / "two_processes.process1.log"
                                                    ).read_text()
  # Each process tokenized its shard of the 64 training examples, the single process both.
  for index in range(2):
    log = (tmp_path / f"two_processes.process{index}.log").read_text()
    assert f"process {index} tokenized 32 of 64 training examples (shards {index}-{index} of 2)" in log
  assert "process 0 tokenized 64 of 64 training examples (shards 0-1 of 2)" in (
      tmp_path / "one_process.process0.log").read_text()
  _assert_same_training(multi, single, ("teacher", "search", "retrain"))
  assert (json.loads((multi / "policy.json").read_text()) ==
          json.loads((single / "policy.json").read_text()))
  assert sorted(p.relative_to(multi) for p in multi.rglob("*.json*")) == sorted(
      p.relative_to(single) for p in single.rglob("*.json*"))  # one of each file, no copies
  assert _temporary_files(multi) == []


def test_a_job_that_lost_a_process_resumes_as_if_uninterrupted(tmp_path, tiny_model_dir,
                                                               glue_dir):
  """kill -9 one of two processes after the first checkpoint, stop the other (a cluster manager
  restarts the whole job), start both again: the job resumes from its last complete checkpoint
  and ends as the uninterrupted job does."""
  flags = {**tiny_run_flags(tiny_model_dir, glue_dir), "checkpoint.every_steps": 4}
  reference, killed = tmp_path / "reference", tmp_path / "killed"
  _wait(_launch_job("finetune", reference, flags, processes=2, devices_per_process=2),
        reference)

  job = _launch_job("finetune", killed, flags, processes=2, devices_per_process=2)
  deadline = time.time() + 600
  while not any(p.name.isdigit() for p in (killed / "checkpoints").glob("*")):
    assert all(p.poll() is None for p in job), "the job ended before it could be killed"
    assert time.time() < deadline
    time.sleep(0.05)
  job[1].send_signal(signal.SIGKILL)
  job[1].wait()
  job[0].send_signal(signal.SIGKILL)  # What a cluster manager does to the rest of a failed job.
  job[0].wait()
  assert not (killed / "results.json").exists(), "the job ended before it could be killed"

  _wait(_launch_job("finetune", killed, flags, processes=2, devices_per_process=2), killed)
  log = (tmp_path / "killed.process0.log").read_text()
  assert "resuming" in log
  _assert_same_training(killed, reference, ("",))
  assert _temporary_files(killed) == []


_GATHER_SCRIPT = """
import json, sys
import numpy as np
import jax
from mpqbert import data
from mpqbert.train import sharding
sharding.maybe_initialize_distributed()

def tokenizer(text_a, text_pair=None, **kwargs):
  ids = [[101] + [1000 + int(w) for w in t.split()] + [102] for t in text_a]
  return {"input_ids": ids, "token_type_ids": [[0] * len(x) for x in ids]}

texts = [" ".join([str(i)] * (1 + (7 * i) % 23)) for i in range(30)]
examples = data.Examples(texts, None, np.arange(30, dtype=np.int32) % 2)
own = data.shards_of_process(2, jax.process_index(), jax.process_count())
part = data.tokenize_shards(examples, tokenizer, 64, num_shards=2, own=own)
held = [x is not None for x in part.input_ids]
part = sharding.gather_lengths(part)
whole = sharding.gather_examples(part.select(np.arange(3, 30, 3)))
json.dump({"held": held, "lengths": part.lengths.tolist(),
           "gathered": [x.tolist() for x in whole.input_ids]}, open(sys.argv[1], "w"))
"""


def test_each_process_tokenizes_its_shard_and_gathers_lengths_and_examples(tmp_path):
  """2 processes, 2 shards of 30 examples: each tokenizes its 15, and after the all-gathers both
  know all 30 lengths and hold every token of a selected subset, as counted by hand."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env.update(JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"localhost:{_free_port()}",
             JAX_NUM_PROCESSES="2", XLA_FLAGS=xla_flags(host_devices=1))
  job = [subprocess.Popen([sys.executable, "-c", _GATHER_SCRIPT, str(tmp_path / f"{i}.json")],
                          cwd=REPO_ROOT, env={**env, "JAX_PROCESS_ID": str(i)},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
         for i in range(2)]
  for index, process in enumerate(job):
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, f"process {index} failed:\n{output[-3000:]}"
  lengths = [3 + (7 * i) % 23 for i in range(30)]
  for index in range(2):
    got = json.loads((tmp_path / f"{index}.json").read_text())
    assert got["held"] == [i % 2 == index for i in range(30)]
    assert got["lengths"] == lengths
    assert got["gathered"] == [[101] + [1000 + i] * (1 + (7 * i) % 23) + [102]
                               for i in range(3, 30, 3)]


def test_a_streamed_split_as_two_processes_equals_one_process(tmp_path, tiny_model_dir,
                                                              glue_dir):
  """`data.streaming=True` (the local TSV read row by row, 2 shards): 2 processes x 2 devices,
  each reading its shard and padding to max_seq_length, train as 1 process x 4 devices that reads
  both shards and pads to bucket lengths (padding is masked: equal within float tolerance)."""
  flags = {**tiny_run_flags(tiny_model_dir, glue_dir), "data.streaming": True,
           "data.pad_multiple": 32,  # the single process's buckets: 32 or 64
           "data.train_subset": 0, "data.shards": 2, "train.num_train_steps": 6,
           "checkpoint.every_steps": 6}
  flags.pop("train.num_epochs")
  single, multi = tmp_path / "one_process", tmp_path / "two_processes"
  _wait(_launch_job("finetune", single, flags, processes=1, devices_per_process=4), single)
  _wait(_launch_job("finetune", multi, flags, processes=2, devices_per_process=2), multi)
  for index in range(2):
    log = (tmp_path / f"two_processes.process{index}.log").read_text()
    assert f"process {index} streams shards {index}-{index} of 2 of 2490 training" in log
  _assert_same_training(multi, single, ("",))
