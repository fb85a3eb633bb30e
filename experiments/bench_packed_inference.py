r"""Packed models against the full-precision one: bytes on disk and inference latency.

  FP      model.apply on float32 parameters (one jitted forward, eval mode).
  packed  `PackedModel.apply`: one `kernels.packed_matmul` per bit-width block of each matrix in
          `export.half_dtype()` activations (float16 on GPU), XNOR-popcount matmuls for 1-bit FFNs
          with binarized inputs; on CPU the kernels' pure-jnp reference ("auto" backend).

The packed models are the uniform 4-bit and SensiMix 3+3 exports of the embedded MiniLM (the time
of a forward does not depend on the values) and any exported runs given with --packed
(repeatable, e.g. an AutoMPQ run exported with `python -m mpqbert.export`). For each batch size, timed
rounds alternate between the models; ratios of median times are reported.

  python experiments/bench_packed_inference.py --batch_sizes=1,32 --seq_len=128

Writes experiments/results/packed_inference_<backend>.{json,md}. About 3 min on a 2-core CPU.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from mpqbert import export, models, quant
from mpqbert.methods import sensimix
from mpqbert.train import results


_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "32"], "Examples per forward.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per example.")
_PACKED = flags.DEFINE_multi_string("packed", [], "Exported MiniLM runs (packed .npz files) to "
                                    "time besides uniform 4-bit and SensiMix 3+3.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Alternating timed rounds.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Forwards per timed round.")
_OUT = flags.DEFINE_string("out", None, "Output path without extension (default: "
                           "experiments/results/packed_inference_<backend>).")


def _default_packed(params, config: models.BertConfig) -> dict[str, export.PackedModel]:
  """Uniform 4-bit (symmetric, 12 sub-groups) and SensiMix 3+3 exports of `params`."""
  spec = quant.bert_encoder_spec(groups=12, bit_choices=(4,))
  uniform = export.export_packed(params, quant.uniform_policy(spec.plan(params), 4),
                                 quant.init_qparams(spec, params), config=config, num_labels=2)
  mixed = sensimix.sensimix_spec([0, 1, 2], [3, 4, 5])
  sensi = export.export_packed(params, sensimix.fixed_policy(mixed, params, other_bits=16),
                               config=config, num_labels=2)
  return {"uniform 4-bit": uniform, "SensiMix 3+3": sensi}


def _file_bytes(packed: export.PackedModel) -> int:
  with tempfile.TemporaryDirectory() as tmp:
    return export.save_packed(packed, Path(tmp) / "m.npz").stat().st_size


def _times(fn, *args) -> list[float]:
  out = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    out.append(time.perf_counter() - start)
  return out


def main(argv):
  del argv
  model, params = models.load_pretrained("minilm", num_labels=2)
  packed = _default_packed(params, model.config)
  for path in _PACKED.value:
    packed[Path(path).stem] = export.load_packed(path)
    if packed[Path(path).stem].config != model.config:
      raise ValueError(f"{path} is not a MiniLM export; this benchmark compares MiniLM models.")
  fp_bytes = sum(int(np.asarray(v).nbytes) for v in jax.tree.leaves(params))
  fp = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, attention_mask=mask,
                                                deterministic=True))
  served = {name: jax.jit(lambda p, ids, mask: p.apply(ids, attention_mask=mask,
                                                       deterministic=True))
            for name in packed}
  rng = np.random.default_rng(0)
  rows = []
  for batch in [int(b) for b in _BATCHES.value]:
    ids = jnp.asarray(rng.integers(1000, 30000, (batch, _SEQ_LEN.value)), jnp.int32)
    mask = jnp.ones_like(ids)
    jax.block_until_ready([fp(params, ids, mask)] +
                          [served[n](p, ids, mask) for n, p in packed.items()])  # compile
    times = {"full precision": [], **{n: [] for n in packed}}
    for _ in range(_ROUNDS.value):
      times["full precision"] += _times(fp, params, ids, mask)
      for name, p in packed.items():
        times[name] += _times(served[name], p, ids, mask)
    fp_s = statistics.median(times["full precision"])
    for name, ts in times.items():
      median = statistics.median(ts)
      rows.append({"batch_size": batch, "model": name, "median_ms": median * 1e3,
                   "latency_ratio_vs_fp": median / fp_s})
    print(f"batch {batch}: " + ", ".join(f"{r['model']} {r['median_ms']:.1f} ms"
                                         for r in rows if r["batch_size"] == batch), flush=True)
  fp_matrix_bytes = quant.size_report(params)["size_mb"] * 2**20
  sizes = {"full precision": {"file_bytes": fp_bytes, "matrix_bytes": fp_matrix_bytes}}
  for name, p in packed.items():
    sizes[name] = {"file_bytes": _file_bytes(p),
                   "matrix_bytes": export.packed_nbytes(p, part="matrices")}
  backend, device = jax.default_backend(), jax.devices()[0].device_kind
  report = {"rows": rows, "sizes": sizes, "seq_len": _SEQ_LEN.value, "backend": backend,
            "device": device, "machine": f"{platform.machine()}, {jax.device_count()} device(s)",
            "half_dtype": jnp.dtype(export.half_dtype()).name, "jax": jax.__version__,
            "rounds": _ROUNDS.value, "repeats": _REPEATS.value,
            "git_commit": results.git_commit(), "command": " ".join(["python"] + sys.argv)}
  out = Path(_OUT.value or Path(__file__).parent / "results" / f"packed_inference_{backend}")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
  lines = [f"Packed inference against full precision: one jitted forward, sequences of "
           f"{_SEQ_LEN.value} tokens, on {device} ({backend}; packed GEMMs in "
           f"{report['half_dtype']}).", "",
           "| model | encoder matrices (MB) | file on disk (MB) | x smaller | " +
           " | ".join(f"batch {b} (ms) | ratio" for b in _BATCHES.value) + " |",
           "|---|---:|---:|---:|" + "---:|---:|" * len(_BATCHES.value)]
  for name, size in sizes.items():
    cells = []
    for b in _BATCHES.value:
      r = next(r for r in rows if r["model"] == name and r["batch_size"] == int(b))
      cells += [f"{r['median_ms']:.1f}", f"{r['latency_ratio_vs_fp']:.2f}x"]
    lines.append(f"| {name} | {size['matrix_bytes'] / 2**20:.2f} | "
                 f"{size['file_bytes'] / 2**20:.2f} | "
                 f"{fp_bytes / size['file_bytes']:.1f} | " + " | ".join(cells) + " |")
  lines += ["", f"Ratio: median time over the full-precision model's in the same run "
            f"({_ROUNDS.value} alternating rounds of {_REPEATS.value} forwards). Full precision "
            "is the float32 parameter bytes; the other files hold the embeddings at their policy's "
            "bits (float32 for uniform and AutoMPQ, 8-bit for SensiMix). jax " + jax.__version__ + "; commit "
            f"{report['git_commit'][:10]}. Command: `{report['command']}`."]
  out.with_suffix(".md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
