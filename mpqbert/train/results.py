"""metrics.jsonl (one JSON object per logged step) and results.json of a run."""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging as absl_logging

from mpqbert import files


def quiet_library_info_logs(record: logging.LogRecord) -> bool:
  """A log filter that keeps Orbax's per-save INFO chatter out of run logs (warnings still show)."""
  # A standard-library LogRecord: compare with its levels, not absl's (WARNING = -1).
  return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


@functools.cache
def git_commit() -> str:
  """The commit of the code this process runs, read at the first call and kept: `mpqbert.main`
  calls it at start, so a commit made while a long run trains does not relabel its results."""
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).parent).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
  """The CPU's model name ("AMD EPYC 7B13"), or the architecture where the system does not say."""
  try:
    for line in cpuinfo.read_text().splitlines():
      key, _, value = line.partition(":")
      if key.strip() == "model name" and value.strip():
        return value.strip()
  except OSError:
    pass
  return platform.machine() or "unknown CPU"


def device_description() -> str:
  """What this process computes on, for results.json: the same run on another accelerator, CPU
  model or JAX version is not bitwise the same (an SST-2 teacher retrained on an AMD CPU instead
  of an Intel one moved its dev loss by 7e-8), and a QAT run can move by a seed's spread, so a
  table that mixes devices should say so."""
  devices = jax.devices()
  kind = devices[0].device_kind
  if jax.default_backend() == "cpu":
    kind = f"CPU ({cpu_model()}), {os.cpu_count()} cores"
  return f"{len(devices)} x {kind}, jax {jax.__version__}"


def _jsonable(value: Any) -> Any:
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    return np.asarray(value).item() if np.ndim(value) == 0 else np.asarray(value).tolist()
  return value


class MetricsLog:
  """Appends rows to `workdir/metrics.jsonl`.

  On resume, rows logged after the restored step by the killed process are dropped first, so the
  file reads as if the run had never stopped. On several hosts only process 0 writes (every
  process logs the same globally reduced metrics).
  """

  def __init__(self, workdir: str | Path, resume_step: int):
    self.path = Path(workdir) / "metrics.jsonl"
    self.writer = jax.process_index() == 0
    if self.path.exists() and self.writer:
      kept = [row for row in self.rows() if row["step"] <= resume_step]
      files.write_atomic(self.path, "".join(json.dumps(row) + "\n" for row in kept))

  def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
    if not self.writer:
      return
    row = {"step": int(step), "split": split, **{k: _jsonable(v) for k, v in metrics.items()}}
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")

  def rows(self) -> list[dict[str, Any]]:
    """The logged rows. A last line cut short (a process killed while appending it) is dropped
    with a warning; a malformed line before the last one is an error naming it."""
    lines = [line for line in self.path.read_text().splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        if number < len(lines):
          raise ValueError(f"{self.path} line {number} is not JSON ({e}); the file is damaged "
                           "beyond a torn last line: remove that line or the run's workdir."
                           ) from None
        absl_logging.warning("%s: dropping its last line, cut short by a killed process: %r",
                        self.path, line[:80])
    return rows


def write_results(workdir: str | Path, results: Mapping[str, Any]) -> Path:
  return files.write_atomic(Path(workdir) / "results.json",
                            json.dumps({k: _jsonable(v) for k, v in results.items()}, indent=2))
