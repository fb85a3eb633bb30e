r"""Packed models against the full-precision one: bytes on disk and inference latency.

  FP      model.apply on float32 parameters (one jitted forward, eval mode), with float32 and
          with bfloat16 matmuls (float32 accumulation).
  packed  `PackedModel.apply`: one `kernels.packed_matmul` per bit-width block of each matrix in
          `export.half_dtype()` activations (float16 on GPU), XNOR-popcount matmuls for 1-bit FFNs
          with binarized inputs; on CPU the kernels' pure-jnp reference ("auto" backend).
  int8    (CPU only, --int8) the same packed model laid out once by `export.lay_out(packed,
          "int8")`: int8 x int8 -> int32 matmuls for matrices with quantized or binarized inputs
          (SensiMix's 1-bit FFNs: +-1 int8 instead of XNOR-popcount), float32 matmuls of the
          weights dequantized at load for those with float inputs (SensiMix's attention and
          8-bit FFNs); "(int8, popcount)" rows, where a model has 1-bit layers with binarized
          inputs and `lay_out`'s timing found XNOR-popcount faster for some: those by popcount.

The packed models are the uniform 8/4/2-bit (8-bit inputs, their scales calibrated on one
batch, as the study's uniform runs) and SensiMix (3+3 on 6 layers) exports of the
embedded MiniLM, or of a random BERT-base-shaped model with --model=bert_base_random (the time of
a forward does not depend on the values) and any exported runs given with --packed
(repeatable, e.g. an AutoMPQ run exported with `python -m mpqbert.export`). For each batch size,
timed rounds alternate between the models; ratios of median times are reported.

  python experiments/bench_packed_inference.py --batch_sizes=1,8,32 --seq_len=128 \
      --packed=workdirs/exports_int8/sst2_automp16_seed0.safetensors  # CPU: int8 rows too
  python experiments/bench_packed_inference.py --model=bert_base_random --batch_sizes=1,8,32  # GPU

Writes experiments/results/packed_inference_<backend>[_bert_base_random].{json,md}. About 3 min
on a 2-core CPU.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from mpqbert import export, models, quant
from mpqbert.methods import sensimix
from mpqbert.train import results


_MODEL = flags.DEFINE_enum("model", "minilm", ["minilm", "bert_base_random"],
                          "minilm: the embedded MiniLM-L6-H384 checkpoint; bert_base_random: a "
                          "randomly initialised BERT-base-shaped model (no files needed: for "
                          "accelerator hosts without the embedded package).")
_LAYERS = flags.DEFINE_integer("num_layers", 12, "Encoder layers of --model=bert_base_random.")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "32"], "Examples per forward.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per example.")
_PACKED = flags.DEFINE_multi_string("packed", [], "Exported MiniLM runs (packed .safetensors "
                                    "files, or .npz of earlier versions) to time besides uniform "
                                    "4-bit and SensiMix 3+3.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Alternating timed rounds.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Forwards per timed round.")
_OUT = flags.DEFINE_string("out", None, "Output path without extension (default: "
                           "experiments/results/packed_inference_<backend>).")
_INT8 = flags.DEFINE_bool("int8", None, "Also time every packed model's int8 layout "
                          "(export.lay_out); default: on CPU only.")


def _calibrated_qparams(model, spec: quant.QuantSpec, params, policy: quant.Policy):
  """Quantizer parameters with the inputs' scales calibrated on one batch of random tokens (as
  training does before its first step), so that 8-bit inputs are quantized, not passed through."""
  ids = jnp.asarray(np.random.default_rng(1).integers(1000, 30000, (4, _SEQ_LEN.value)),
                    jnp.int32)
  _, qparams = quant.transform(model.apply, spec)(
      params, quant.init_qparams(spec, params), policy, ids, update_act_stats=True,
      attention_mask=jnp.ones_like(ids), deterministic=True)
  return qparams


def _default_packed(params, config: models.BertConfig) -> dict[str, export.PackedModel]:
  """Uniform 8/4/2-bit (symmetric, 12 sub-groups, 8-bit inputs) and SensiMix exports of `params`:
  8-bit FFNs in the first half of the layers, 1-bit FFNs with binarized inputs in the second (3+3
  on 6 layers)."""
  out = {}
  model = models.build_model(config, 2)
  for bits in (8, 4, 2):
    spec = models.bert_encoder_spec(groups=12, bit_choices=(bits,), activation_mode="moving")
    policy = quant.uniform_policy(spec.plan(params), bits, activation_bits=8)
    out[f"uniform {bits}-bit"] = export.export_packed(
        params, policy, _calibrated_qparams(model, spec, params, policy), config=config,
        num_labels=2)
  layers = config.num_hidden_layers
  half = layers // 2
  mixed = sensimix.sensimix_spec(list(range(half)), list(range(half, layers)))
  out[f"SensiMix {half}+{layers - half}"] = export.export_packed(
      params, sensimix.fixed_policy(mixed, params, other_bits=16), config=config, num_labels=2)
  return out


def _float_model(num_labels: int):
  """(config, {dtype name: model}, float32 params) of --model."""
  if _MODEL.value == "minilm":
    model, params = models.load_pretrained("minilm", num_labels=num_labels)
    config = model.config
  else:
    config = models.BertConfig(num_hidden_layers=_LAYERS.value)
    params = models.init_params(models.build_model(config, num_labels))
  return config, {name: models.build_model(config, num_labels, dtype=dtype)
                  for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16))}, params


def _memory_bytes(tree) -> int:
  """Bytes of the arrays a served model holds."""
  return sum(int(np.asarray(v).nbytes) for v in jax.tree.leaves(tree))


def _file_bytes(packed: export.PackedModel) -> int:
  with tempfile.TemporaryDirectory() as tmp:
    return export.save_packed(packed, Path(tmp) / "m.safetensors").stat().st_size


def _times(fn, *args) -> list[float]:
  out = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    out.append(time.perf_counter() - start)
  return out


def main(argv):
  del argv
  config, float_models, params = _float_model(num_labels=2)
  packed = _default_packed(params, config)
  for path in _PACKED.value:
    packed[Path(path).stem] = export.load_packed(path)
    if packed[Path(path).stem].config != config:
      raise ValueError(f"{path} was exported from another model than --model={_MODEL.value}; "
                       "pass exports of the same architecture.")
  fp_bytes = sum(int(np.asarray(v).nbytes) for v in jax.tree.leaves(params))
  served = {f"full precision ({name})": (jax.jit(
      lambda p, ids, mask, m=model: m.apply({"params": p}, ids, attention_mask=mask,
                                            deterministic=True)), params)
            for name, model in float_models.items()}
  serve = jax.jit(lambda p, ids, mask: p.apply(ids, attention_mask=mask, deterministic=True))
  # On GPUs and TPUs, laid out in whole kernel tiles once (no weight padded per call).
  served.update({name: (serve, export.lay_out_for_kernels(p)) for name, p in packed.items()})
  int8 = jax.default_backend() == "cpu" if _INT8.value is None else _INT8.value
  laid_out = {}
  for name, p in packed.items() if int8 else ():
    laid_out[f"{name} (int8)"] = export.lay_out(p, "int8", sign_matmul="int8")
    faster = export.lay_out(p, "int8")  # Binarized layers by the faster of int8 and popcount.
    if "popcount" in export.sign_matmuls(faster).values():
      laid_out[f"{name} (int8, popcount)"] = faster
    kinds = Counter(export.input_kinds(p).values())
    print(f"{name} (int8): matrices by input kind {dict(kinds)}", flush=True)
  served.update({name: (serve, p) for name, p in laid_out.items()})
  reference = "full precision (float32)"
  rng = np.random.default_rng(0)
  rows = []
  for batch in [int(b) for b in _BATCHES.value]:
    ids = jnp.asarray(rng.integers(1000, 30000, (batch, _SEQ_LEN.value)), jnp.int32)
    mask = jnp.ones_like(ids)
    jax.block_until_ready([fn(p, ids, mask) for fn, p in served.values()])  # compile
    times = {name: [] for name in served}
    for _ in range(_ROUNDS.value):
      for name, (fn, p) in served.items():
        times[name] += _times(fn, p, ids, mask)
    fp_s = statistics.median(times[reference])
    for name, ts in times.items():
      median = statistics.median(ts)
      rows.append({"batch_size": batch, "model": name, "median_ms": median * 1e3,
                   "latency_ratio_vs_fp": median / fp_s})
    print(f"batch {batch}: " + ", ".join(f"{r['model']} {r['median_ms']:.1f} ms"
                                         for r in rows if r["batch_size"] == batch), flush=True)
  fp_matrix_bytes = quant.size_report(params, layout=models.BERT_LAYOUT)["size_mb"] * 2**20
  sizes = {name: {"file_bytes": fp_bytes, "matrix_bytes": fp_matrix_bytes,
                  "memory_bytes": fp_bytes}
           for name in served if name.startswith("full precision")}
  for name, p in packed.items():
    sizes[name] = {"file_bytes": _file_bytes(p),
                   "matrix_bytes": export.packed_nbytes(p, part="matrices"),
                   "memory_bytes": _memory_bytes(p)}
    for variant in (f"{name} (int8)", f"{name} (int8, popcount)"):  # The file laid out at load.
      if variant in laid_out:
        sizes[variant] = {**sizes[name], "memory_bytes": _memory_bytes(laid_out[variant])}
  backend, device = jax.default_backend(), jax.devices()[0].device_kind
  report = {"model": _MODEL.value, "config": config.to_dict(), "rows": rows, "sizes": sizes,
            "seq_len": _SEQ_LEN.value, "backend": backend,
            "device": device, "machine": f"{platform.machine()}, {jax.device_count()} device(s)",
            "half_dtype": jnp.dtype(export.half_dtype()).name, "jax": jax.__version__,
            "rounds": _ROUNDS.value, "repeats": _REPEATS.value,
            "git_commit": results.git_commit(), "command": " ".join(["python"] + sys.argv)}
  stem = f"packed_inference_{backend}" + ("" if _MODEL.value == "minilm" else f"_{_MODEL.value}")
  out = Path(_OUT.value or Path(__file__).parent / "results" / stem)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
  lines = [f"Packed inference against full precision ({_MODEL.value}, "
           f"{config.num_hidden_layers} layers x {config.hidden_size}): one jitted forward, "
           f"sequences of {_SEQ_LEN.value} tokens, on {device} ({backend}; packed GEMMs in "
           f"{report['half_dtype']}).", "",
           "| model | encoder matrices (MB) | file on disk (MB) | x smaller | in memory (MB) | " +
           " | ".join(f"batch {b} (ms) | ratio" for b in _BATCHES.value) + " |",
           "|---|---:|---:|---:|---:|" + "---:|---:|" * len(_BATCHES.value)]
  for name, size in sizes.items():
    cells = []
    for b in _BATCHES.value:
      r = next(r for r in rows if r["model"] == name and r["batch_size"] == int(b))
      cells += [f"{r['median_ms']:.1f}", f"{r['latency_ratio_vs_fp']:.2f}x"]
    lines.append(f"| {name} | {size['matrix_bytes'] / 2**20:.2f} | "
                 f"{size['file_bytes'] / 2**20:.2f} | "
                 f"{fp_bytes / size['file_bytes']:.1f} | "
                 f"{size['memory_bytes'] / 2**20:.2f} | " + " | ".join(cells) + " |")
  lines += ["", f"Ratio: median time over the float32 model's in the same run "
            f"({_ROUNDS.value} alternating rounds of {_REPEATS.value} forwards). Full precision "
            "is the float32 parameter bytes (its bfloat16 row computes every matmul in bfloat16 "
            "with float32 accumulation from the same float32 parameters); the other files hold "
            "the embeddings at their policy's bits (float32 for uniform and AutoMPQ, 8-bit for "
            "SensiMix). (int8) rows serve the file above them laid out by `export.lay_out`: "
            "int8 x int8 -> int32 matmuls where inputs are quantized or binarized, float32 "
            "matmuls of weights dequantized at load where they are not (in memory: what each "
            f"served model holds). jax {jax.__version__}; commit {report['git_commit'][:10]}. "
            f"Command: `{report['command']}`."]
  out.with_suffix(".md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
