r"""Cost of the quantizer transform: one MiniLM train step under the search mixture vs full precision.

Both steps fine-tune the embedded MiniLM (+ 2-way head) on the same token batch with dropout on.
  FP      loss(model.apply(params)) -> AdamW on params (the foundation's train step).
  search  loss(qapply(params, qparams, arch, key, tau)) with 4 bit choices {0, 2, 4, 8},
          128 sub-groups per matrix and 8-bit learned activations -> gradients for params,
          qparams and arch logits, AdamW on params, Adam on qparams and on arch.
Timed rounds alternate between the two so machine load hits both alike; the ratio of median step
times is reported. Peak memory is XLA's buffer assignment of each compiled step
(arguments + outputs - donated aliases + temporaries, `Compiled.memory_analysis()`).

  python experiments/bench_quant_step.py --seq_len=128 --batch_size=32

Writes experiments/results/quant_step.{json,md}.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import app, flags

from mpqbert import data, models, quant
from mpqbert.train import compiled, losses, optim, results, steps

_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per example.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Examples per step.")
_GROUPS = flags.DEFINE_integer("groups", 128, "Sub-groups per matrix.")
_BITS = flags.DEFINE_list("bit_choices", ["0", "2", "4", "8"], "Bit choices of the search.")
_ACT_BITS = flags.DEFINE_integer("activation_bits", 8, "Activation bits (32: off).")
_ACT_MODE = flags.DEFINE_enum("activation_mode", "learned", ["learned", "moving"],
                               "Activation range: learned step size (LSQ) or moving max.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Alternating timed rounds per step kind.")
_STEPS = flags.DEFINE_integer("steps_per_round", 3, "Train steps per timed round.")
_OUT = flags.DEFINE_string("out", str(Path(__file__).parent / "results" / "quant_step"),
                           "Output path without extension.")

TRAIN = ml_collections.ConfigDict(dict(learning_rate=5e-5, warmup_ratio=0.0, weight_decay=0.01,
                                       adam_b1=0.9, adam_b2=0.999, adam_eps=1e-6,
                                       max_grad_norm=1.0))


def fp_step(model, params) -> tuple[Callable, Any]:
  """The foundation's jitted train step and its initial state."""
  optimizer, _ = optim.make_optimizer(TRAIN, num_train_steps=10**9)
  return (steps.make_train_step(model, optimizer, is_regression=False, dropout_seed=0),
          steps.TrainState.create(params, optimizer))


def search_step(model, params, spec: quant.QuantSpec, batch) -> tuple[Callable, Any]:
  """A jitted step updating weights, quantizer parameters and architecture logits together."""
  weight_opt, _ = optim.make_optimizer(TRAIN, num_train_steps=10**9)
  quant_opt = optax.adam(1e-3)
  qapply = quant.transform(model.apply, spec)
  qparams = quant.init_qparams(spec, params, scale_init="lsq")
  arch = quant.init_arch(spec, params)
  _, qparams = qapply(params, qparams, arch, batch["input_ids"],
                      attention_mask=batch["attention_mask"], deterministic=True,
                      update_act_stats=True)
  state = {"step": jnp.zeros((), jnp.int32), "trees": (params, qparams, arch),
           "opt": (weight_opt.init(params), quant_opt.init(qparams), quant_opt.init(arch))}

  def loss_fn(trees, batch, key):
    params, qparams, arch = trees
    gumbel_key, dropout_key = jax.random.split(key)
    logits = qapply(params, qparams, arch, batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    token_type_ids=batch["token_type_ids"], key=gumbel_key, tau=1.0,
                    deterministic=False, rngs={"dropout": dropout_key})
    return losses.weighted_mean(losses.per_example_loss(logits, batch["labels"], False),
                               batch["weights"])

  def step(state, batch):
    key = jax.random.fold_in(jax.random.key(0), state["step"])
    loss, grads = jax.value_and_grad(loss_fn)(state["trees"], batch, key)
    new_trees, new_opt = [], []
    for tree, grad, opt_state, opt in zip(state["trees"], grads, state["opt"],
                                          (weight_opt, quant_opt, quant_opt)):
      updates, opt_state = opt.update(grad, opt_state, tree)
      new_trees.append(optax.apply_updates(tree, updates))
      new_opt.append(opt_state)
    return ({"step": state["step"] + 1, "trees": tuple(new_trees), "opt": tuple(new_opt)},
            {"loss": loss})

  return compiled.Jit(step, "search_step", donate_argnums=0), state


def peak_bytes(step: Callable, state, batch) -> dict[str, int]:
  """XLA's memory plan of the compiled step."""
  analysis = step.jitted.lower(state, batch).compile().memory_analysis()
  live = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
          - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)
  return {"peak": int(live), "temp": int(analysis.temp_size_in_bytes),
          "arguments": int(analysis.argument_size_in_bytes)}


def main(argv):
  del argv
  model, params = models.load_pretrained("minilm", num_labels=2, seed=0)
  config = model.config
  batch = data.random_batch(_BATCH.value, _SEQ_LEN.value, seed=_SEQ_LEN.value)
  spec = models.bert_encoder_spec(groups=_GROUPS.value, bit_choices=tuple(map(int, _BITS.value)),
                                 num_heads=config.num_attention_heads,
                                 activation_bits=_ACT_BITS.value,
                                 activation_mode=_ACT_MODE.value)
  kinds = {"fp": fp_step(model, jax.tree.map(jnp.array, params)),
           "search": search_step(model, jax.tree.map(jnp.array, params), spec, batch)}
  memory = {name: peak_bytes(step, state, batch) for name, (step, state) in kinds.items()}
  holders = {name: [state] for name, (_, state) in kinds.items()}

  def run(name: str, n: int) -> float:
    step = kinds[name][0]
    start = time.perf_counter()
    for _ in range(n):
      holders[name][0], metrics = step(holders[name][0], batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / n

  for name in kinds:
    run(name, 2)  # compile + warm up
  times = {name: [] for name in kinds}
  for _ in range(_ROUNDS.value):
    for name in kinds:
      times[name].append(run(name, _STEPS.value))
  median = {name: statistics.median(t) for name, t in times.items()}
  report = {
      "model": "minilm (MiniLM-L6-H384) + 2-way head",
      "batch_size": _BATCH.value, "seq_len": _SEQ_LEN.value, "groups": _GROUPS.value,
      "bit_choices": list(map(int, _BITS.value)), "activation_bits": _ACT_BITS.value,
      "step_s": median, "time_ratio": median["search"] / median["fp"],
      "memory_bytes": memory,
      "peak_memory_ratio": memory["search"]["peak"] / memory["fp"]["peak"],
      "temp_memory_ratio": memory["search"]["temp"] / memory["fp"]["temp"],
      "rounds": _ROUNDS.value, "steps_per_round": _STEPS.value,
      "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
                 f"{jax.devices()[0].platform}",
      "jax": jax.__version__, "git_commit": results.git_commit(),
  }
  out = Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(report, indent=2))
  mb = lambda b: b / 2**20
  lines = [
      f"One jitted train step of MiniLM, batch {_BATCH.value} x {_SEQ_LEN.value} tokens, dropout "
      f"on: search mixture (bit choices {report['bit_choices']}, {_GROUPS.value} sub-groups per "
      f"matrix, {_ACT_BITS.value}-bit activations, gradients for weights, scales and logits) vs "
      "full precision.", "",
      "| step | median time (s) | peak memory (MiB) | temporaries (MiB) |", "|---|---:|---:|---:|"]
  for name in kinds:
    lines.append(f"| {name} | {median[name]:.3f} | {mb(memory[name]['peak']):.1f} | "
                 f"{mb(memory[name]['temp']):.1f} |")
  lines += ["", f"Time ratio search / FP: **{report['time_ratio']:.2f}x** (goal <= 1.3x). Peak "
            f"memory ratio: **{report['peak_memory_ratio']:.2f}x** (goal <= 1.5x); temporaries "
            f"alone {report['temp_memory_ratio']:.2f}x.", "",
            f"{report['machine']}; jax {report['jax']}; {_ROUNDS.value} alternating rounds of "
            f"{_STEPS.value} steps. Command: `python experiments/bench_quant_step.py "
            f"--seq_len={_SEQ_LEN.value} --batch_size={_BATCH.value}`."]
  out.with_suffix(".md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
