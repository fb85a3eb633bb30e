r"""Training-step throughput: mpqbert's Flax BERT vs Hugging Face's PyTorch BERT, side by side.

Both frameworks fine-tune the same weights (embedded MiniLM + the same freshly initialised
classifier) on the same token batches with the same optimizer (AdamW, lr 5e-5, weight decay 0.01
on matrices only, eps 1e-6, global-norm clipping at 1.0) and dropout on. Timed rounds alternate
between the two so machine load hits both alike; the ratio of median step times is reported.

  python experiments/bench_train_throughput.py --seq_lens=32,64,128 --batch_size=32

Needs torch (`pip install -e ".[parity]"`). Writes experiments/results/train_throughput.{json,md}.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import app, flags

from mpqbert import data, models
from mpqbert.train import optim, results, steps

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["32", "64", "128"], "Sequence lengths to time.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Examples per step.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Alternating timed rounds per framework.")
_STEPS = flags.DEFINE_integer("steps_per_round", 3, "Train steps per timed round.")
_OUT = flags.DEFINE_string("out", str(Path(__file__).parent / "results" / "train_throughput"),
                           "Output path without extension.")

LEARNING_RATE, WEIGHT_DECAY, EPS, CLIP = 5e-5, 0.01, 1e-6, 1.0


def jax_stepper(model, params):
  """Returns `run(batch, n)`: n jitted train steps, blocking until done."""
  train_config = ml_collections.ConfigDict(dict(
      learning_rate=LEARNING_RATE, warmup_ratio=0.0, weight_decay=WEIGHT_DECAY, adam_b1=0.9,
      adam_b2=0.999, adam_eps=EPS, max_grad_norm=CLIP))
  # A constant-rate schedule for the benchmark: num_train_steps large, no warm-up.
  optimizer, _ = optim.make_optimizer(train_config, num_train_steps=10**9)
  train_step = steps.make_train_step(model, optimizer, is_regression=False, dropout_seed=0)
  holder = {"state": steps.TrainState.create(jax.tree.map(np.array, params), optimizer)}

  def run(batch, n):
    for _ in range(n):
      holder["state"], metrics = train_step(holder["state"], batch)
    jax.block_until_ready(metrics)

  return run


def torch_stepper(model_dir: Path, head: dict):
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import BertForSequenceClassification  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(os.cpu_count() or 1)
  model = BertForSequenceClassification.from_pretrained(str(model_dir), num_labels=2)
  with torch.no_grad():  # Same head as the Flax model.
    model.classifier.weight.copy_(torch.from_numpy(np.asarray(head["kernel"]).T.copy()))
    model.classifier.bias.copy_(torch.from_numpy(np.asarray(head["bias"]).copy()))
  model.train()
  decay = [p for n, p in model.named_parameters() if not n.endswith("bias") and "LayerNorm" not in n]
  no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
  optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=LEARNING_RATE,
                                eps=EPS)

  def run(batch, n):
    inputs = {k: torch.from_numpy(batch[k]).long() for k in ("input_ids", "attention_mask",
                                                             "token_type_ids", "labels")}
    for _ in range(n):
      loss = model(**inputs).loss
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
      optimizer.step()
      optimizer.zero_grad(set_to_none=True)

  return run, torch.__version__, model.config._attn_implementation  # pylint: disable=protected-access


def _median_step_seconds(run, batch, rounds_out: list[float], n: int) -> None:
  start = time.perf_counter()
  run(batch, n)
  rounds_out.append((time.perf_counter() - start) / n)


def main(argv):
  del argv
  model_dir = models.resolve_model_dir("minilm")
  model, params = models.load_pretrained("minilm", num_labels=2, seed=0)
  run_jax = jax_stepper(model, params)
  run_torch, torch_version, attention = torch_stepper(model_dir, params["classifier"])
  rows = []
  for seq_len in map(int, _SEQ_LENS.value):
    batch = data.random_batch(_BATCH.value, seq_len, seed=seq_len)
    run_jax(batch, 2)  # Compile and warm up.
    run_torch(batch, 2)
    jax_times, torch_times = [], []
    for _ in range(_ROUNDS.value):
      _median_step_seconds(run_jax, batch, jax_times, _STEPS.value)
      _median_step_seconds(run_torch, batch, torch_times, _STEPS.value)
    jax_s, torch_s = statistics.median(jax_times), statistics.median(torch_times)
    rows.append({"seq_len": seq_len, "batch_size": _BATCH.value,
                 "jax_examples_per_s": _BATCH.value / jax_s,
                 "torch_examples_per_s": _BATCH.value / torch_s, "ratio_jax_over_torch": torch_s / jax_s})
    print(f"seq {seq_len:4d}: flax {rows[-1]['jax_examples_per_s']:7.1f} ex/s   torch "
          f"{rows[-1]['torch_examples_per_s']:7.1f} ex/s   ratio {rows[-1]['ratio_jax_over_torch']:.2f}x",
          flush=True)

  report = {"model": "minilm (MiniLM-L6-H384) + 2-way head", "rows": rows,
            "geomean_ratio": float(np.exp(np.mean([np.log(r["ratio_jax_over_torch"]) for r in rows]))),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
            "jax": jax.__version__, "torch": torch_version, "torch_attention": attention,
            "rounds": _ROUNDS.value, "steps_per_round": _STEPS.value,
            "git_commit": results.git_commit()}
  out = Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(report, indent=2))
  lines = ["| seq len | batch | Flax ex/s | PyTorch ex/s | ratio (Flax / PyTorch) |",
           "|---:|---:|---:|---:|---:|"]
  lines += [f"| {r['seq_len']} | {r['batch_size']} | {r['jax_examples_per_s']:.1f} | "
            f"{r['torch_examples_per_s']:.1f} | {r['ratio_jax_over_torch']:.2f}x |" for r in rows]
  lines.append(f"\nGeometric-mean ratio: {report['geomean_ratio']:.2f}x. {report['machine']}; jax "
               f"{report['jax']}, torch {torch_version} ({attention} attention). Command: "
               "`python experiments/bench_train_throughput.py`.")
  out.with_suffix(".md").write_text("\n".join(lines) + "\n")
  print(f"geometric-mean ratio {report['geomean_ratio']:.2f}x -> {out}.json")


if __name__ == "__main__":
  app.run(main)
