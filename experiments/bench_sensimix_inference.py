r"""Inference time of a packed SensiMix model against the full-precision model, same inputs.

  FP        model.apply on float32 parameters (one jitted forward, eval mode).
  SensiMix  export.packed_apply on the packed checkpoint: 8-bit index matrices as integer-code
            GEMMs in `export.half_dtype()` (float16 on GPU, float32 on CPU), 1-bit FFNs with
            binarized inputs as XNOR-popcount matmuls (`mpqbert.kernels`).
The packed model is a trained run's `packed.npz` (--packed) or, without one, the 3+3 SensiMix
export of the embedded MiniLM (random weights of MiniLM's shape if it is not installed): the
time of a forward does not depend on the values. Timed rounds alternate between the two; the
ratio of median times is reported.

  python experiments/bench_sensimix_inference.py --batch_size=32 --seq_len=128

Writes experiments/results/sensimix_inference_<backend>.{json,md}.
"""

from __future__ import annotations

import importlib
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from mpqbert import export, models
from mpqbert.train import results

sensimix = importlib.import_module("mpqbert.methods.sensimix")

_BATCH = flags.DEFINE_integer("batch_size", 32, "Examples per forward.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per example.")
_PACKED = flags.DEFINE_string("packed", None, "A trained run's packed.npz (default: export one).")
_ROUNDS = flags.DEFINE_integer("rounds", 7, "Alternating timed rounds.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Forwards per timed round.")
_OUT = flags.DEFINE_string("out", None, "Output path without extension (default: "
                           "experiments/results/sensimix_inference_<backend>).")


def _model_and_params():
  try:
    model, params = models.load_pretrained("minilm", num_labels=2)
    return model, params, "embedded MiniLM"
  except (ImportError, FileNotFoundError, OSError):
    config = models.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                               num_attention_heads=12, intermediate_size=1536,
                               max_position_embeddings=512)
    model = models.build_model(config, 2)
    return model, models.init_params(model, seed=0), "random MiniLM-shaped BERT"


def _median_seconds(fn, *args) -> list[float]:
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return times


def main(argv):
  del argv
  model, params, source = _model_and_params()
  if _PACKED.value:
    packed = export.load_packed(_PACKED.value)
    source = _PACKED.value
  else:
    spec = sensimix.sensimix_spec([0, 1, 2], [3, 4, 5])
    packed = export.export_packed(params, sensimix.fixed_policy(spec, params, other_bits=16))
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(1000, 30000, (_BATCH.value, _SEQ_LEN.value)), jnp.int32)
  kwargs = dict(attention_mask=jnp.ones_like(ids), token_type_ids=jnp.zeros_like(ids),
                deterministic=True)
  fp = jax.jit(lambda p, ids: model.apply({"params": p}, ids, **kwargs))
  mixed = jax.jit(lambda p, ids: export.packed_apply(model, p, ids, **kwargs))
  jax.block_until_ready((fp(params, ids), mixed(packed, ids)))  # compile
  fp_times, mixed_times = [], []
  for _ in range(_ROUNDS.value):
    fp_times += _median_seconds(fp, params, ids)
    mixed_times += _median_seconds(mixed, packed, ids)
  fp_s, mixed_s = statistics.median(fp_times), statistics.median(mixed_times)
  backend = jax.default_backend()
  device = jax.devices()[0].device_kind
  command = ("python experiments/bench_sensimix_inference.py "
             f"--batch_size={_BATCH.value} --seq_len={_SEQ_LEN.value}"
             + (f" --packed={_PACKED.value}" if _PACKED.value else ""))
  report = {"fp_median_s": fp_s, "sensimix_median_s": mixed_s, "ratio": mixed_s / fp_s,
            "batch_size": _BATCH.value, "seq_len": _SEQ_LEN.value, "model": source,
            "half_dtype": jnp.dtype(export.half_dtype()).name, "backend": backend,
            "device": device, "machine": f"{platform.machine()}, {jax.device_count()} device(s)",
            "jax": jax.__version__, "rounds": _ROUNDS.value, "repeats": _REPEATS.value,
            "packed_bytes": export.packed_nbytes(packed),
            "fp_bytes": sum(int(np.asarray(v).nbytes) for v in jax.tree.leaves(params)),
            "git_commit": results.git_commit(), "command": command}
  out = Path(_OUT.value or Path(__file__).parent / "results" / f"sensimix_inference_{backend}")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(report, indent=2))
  lines = [f"SensiMix packed inference vs full precision: one jitted forward of {source}, batch "
           f"{_BATCH.value} x {_SEQ_LEN.value} tokens, on {device} ({backend}).", "",
           "| model | median time (ms) | weights (MB) |", "|---|---:|---:|",
           f"| full precision (float32) | {fp_s * 1e3:.1f} | {report['fp_bytes'] / 2**20:.2f} |",
           f"| SensiMix packed ({report['half_dtype']} GEMM + XNOR) | {mixed_s * 1e3:.1f} | "
           f"{report['packed_bytes'] / 2**20:.2f} |", "",
           f"Time ratio SensiMix / FP: **{report['ratio']:.2f}x**. {_ROUNDS.value} alternating "
           f"rounds of {_REPEATS.value} forwards; jax {jax.__version__}; commit "
           f"{report['git_commit'][:10]}. Command: `{command}`."]
  out.with_suffix(".md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
