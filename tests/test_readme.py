"""Every `python -m mpqbert.main` command in README.md runs as written, on a small budget.

Each command is taken from the README (continuation lines joined, `...` dropped), its workdir
replaced by a temporary one, a `teacher.workdir` (a finished fine-tuning run) dropped so the
teacher is fine-tuned on the spot, and flags appended that shrink it to seconds: the tiny BERT, a
64-example subset, 32 tokens, a few steps per stage. Everything else (config file, task, target,
bit-widths, dtype) is the README's.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()
_COMMAND = re.compile(r"python -m mpqbert\.main\b((?:\\\n|[^`\n\"#])*)")


def readme_commands() -> list[str]:
  """The README's mpqbert.main commands, deduplicated, with continuations joined."""
  found = []
  for match in _COMMAND.finditer(README):
    args = match.group(1).replace("\\\n", " ").replace("...", " ")
    command = " ".join(["python -m mpqbert.main", *args.split()])
    if "<method>" not in command and command not in found:
      found.append(command)
  return found


def _small_budget(config: str, model_dir, glue_dir) -> list[str]:
  flags = {"model": model_dir, "data.glue_dir": glue_dir, "data.train_subset": 64,
           "data.max_seq_length": 32, "data.pad_multiple": 32, "train.batch_size": 8,
           "train.eval_batch_size": 128, "train.num_train_steps": 3,
           "checkpoint.every_steps": 50}
  if config != "finetune":
    flags.update({"teacher.train.num_train_steps": 3, "teacher.train.batch_size": 8,
                  "teacher.train.eval_batch_size": 128, "quant.calibration_batches": 1})
  if config in ("automp", "quickstart", "uniform", "qbert", "hawq"):  # 32-wide: 4 groups.
    flags.update({"quant.groups": 4})
  if config in ("automp", "quickstart", "qbert", "hawq"):  # A tiny sub-group: 0.6% of the size.
    flags.update({"search.tolerance": 0.02})
  if config in ("automp", "quickstart"):  # No weights-only warm-up: one search program to compile.
    flags.update({"search.num_train_steps": 3, "search.batch_size": 8,
                  "search.warmup_epochs": 0.0})
  if config in ("qbert", "hawq"):
    flags.update({"hessian.batch_size": 8, "hessian.num_batches": 2,
                  "hessian.power_iterations": 2, "hessian.trace_samples": 1})
  if config == "sensimix":  # The tiny BERT has 2 layers: 1 + 1, and a step per stage (3).
    flags.update({"sensimix.num_8bit_layers": 1})
  return [f"--config.{k}={v}" for k, v in flags.items()]


def test_the_readme_has_every_method_command():
  configs = {re.search(r"configs/(\w+)\.py", c).group(1) for c in readme_commands()}
  assert configs >= {"quickstart", "finetune", "automp", "uniform", "qbert", "hawq",
                     "sensimix"}


def _command_id(command: str) -> str:
  """`<config>` plus the README's own overrides, e.g. automp-task=sst2-train.dtype=bfloat16."""
  config = re.search(r"configs/(\w+)\.py", command).group(1)
  overrides = [a[len("--config."):] for a in command.split() if a.startswith("--config.")
               and not a.startswith("--config.data.glue_dir")]
  return "-".join([config, *overrides])


@pytest.mark.parametrize("command", readme_commands(), ids=_command_id)
def test_readme_command_runs(command, tmp_path, tiny_model_dir, glue_dir):
  config = re.search(r"configs/(\w+)\.py", command).group(1)
  args = [a for a in shlex.split(command)[3:]
          if not a.startswith(("--workdir", "--config.teacher.workdir"))]
  args += [f"--workdir={tmp_path / 'run'}",
           *_small_budget(config, tiny_model_dir, glue_dir)]
  run = subprocess.run([sys.executable, "-m", "mpqbert.main", *args], cwd=REPO_ROOT,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                       text=True, timeout=900)
  assert run.returncode == 0, f"{command}\n{run.stderr[-3000:]}"
  assert (tmp_path / "run" / "results.json").is_file()
  assert " dev " in run.stdout.splitlines()[-1]  # "<task> <method> dev <metric> = ..."
