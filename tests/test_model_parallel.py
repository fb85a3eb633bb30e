"""The `model` mesh axis (`train.model_parallel`): Megatron-style shardings of BERT's matrices,
their quantizer parameters and logits, and an AutoMPQ search step on a (data=2, model=2) mesh
equal to the replicated one on (data=4), on 4 simulated CPU devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import REPO_ROOT, TINY_BERT, xla_flags
from mpqbert import models
from mpqbert.train import sharding

RULES = models.BERT_MODEL_PARALLEL
LAYER = ["bert", "encoder", "layer", "0"]
QUERY = "bert/encoder/layer/0/attention/self/query/kernel"
FFN_OUT = "bert/encoder/layer/0/output/dense/kernel"


def _spec(keys, shape, model_size=2):
  return sharding.leaf_spec(keys, shape, RULES, model_size)


def test_leaf_specs_split_columns_rows_and_their_quantizer_trees():
  # Weights (and optimizer moments, whose paths end the same way).
  assert _spec(LAYER + ["attention", "self", "query", "kernel"], (32, 32)) == P(None, "model")
  assert _spec(["opt_state", "0", "mu", "params"] + LAYER + ["intermediate", "dense", "kernel"],
               (32, 64)) == P(None, "model")
  assert _spec(LAYER + ["attention", "self", "value", "bias"], (32,)) == P("model")
  assert _spec(LAYER + ["attention", "output", "dense", "kernel"], (32, 32)) == P("model", None)
  assert _spec(LAYER + ["output", "dense", "kernel"], (64, 32)) == P("model", None)
  assert _spec(LAYER + ["output", "dense", "bias"], (32,)) == P()  # Row-split: bias whole.
  assert _spec(LAYER + ["output", "LayerNorm", "scale"], (32,)) == P()
  assert _spec(["bert", "embeddings", "word_embeddings", "embedding"], (100, 32)) == P()
  assert _spec(["classifier", "kernel"], (32, 2)) == P()
  # quant's per-matrix trees: qparams [K, G] (group axis last), logits [G, K] (first).
  assert _spec(["qparams", QUERY, "scale"], (4, 8)) == P(None, "model")
  assert _spec(["qparams", QUERY, "act_scale"], ()) == P()
  assert _spec(["arch", QUERY], (8, 4)) == P("model", None)
  assert _spec(["arch_opt_state", "0", "mu", QUERY], (8, 4)) == P("model", None)
  assert _spec(["bits", QUERY], (8,)) == P("model")
  assert _spec(["arch", QUERY], (3, 4)) == P()  # 3 sub-groups do not split in 2: whole.
  assert _spec(["qparams", QUERY, "scale"], (4, 3)) == P()
  assert _spec(["arch", FFN_OUT], (8, 4)) == P()  # Row-split matrix: groups are not split.
  assert _spec(["qparams", FFN_OUT, "scale"], (4, 8)) == P()
  # One device per model copy, or no rules: everything replicated (today's data parallelism).
  assert _spec(LAYER + ["attention", "self", "query", "kernel"], (32, 32), 1) == P()
  assert sharding.leaf_spec(LAYER + ["attention", "self", "query", "kernel"], (32, 32), (),
                            2) == P()


def test_model_parallel_must_divide_the_devices():
  count = len(jax.devices())
  with pytest.raises(ValueError, match=rf"model_parallel={count + 1} does not divide the "
                                       rf"{count} devices; use a divisor of {count}"):
    sharding.make_mesh(model_parallel=count + 1)
  mesh = sharding.make_mesh()
  assert dict(mesh.shape) == {"data": count, "model": 1}


_SCRIPT = r"""
import concurrent.futures, json, re, sys
sys.path.insert(0, sys.argv[1])
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from mpqbert import models, quant, search
from mpqbert.defaults import train_defaults
from mpqbert.train import optim, sharding, steps

config = models.BertConfig(**json.loads(sys.argv[2]))
model = models.build_model(config, num_labels=2)
params = models.init_params(model, seed=3)
# qkv: 4 sub-groups (split over model=2); ffn_in: 3 (do not split: replicated).
spec = models.bert_encoder_spec(groups={"qkv": 4, "attention_output": 2, "ffn_in": 3,
                                        "ffn_out": 4}, bit_choices=(0, 4, 8), activation_bits=8)
plan = spec.plan(params)
qapply = quant.transform(model.apply, spec)
rng = np.random.default_rng(0)

def batch():
  ids = rng.integers(1, 2000, (8, 16)).astype(np.int32)
  mask = (np.arange(16)[None] < rng.integers(6, 17, (8, 1))).astype(np.int32)
  return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
          "labels": rng.integers(0, 2, 8).astype(np.int32), "weights": np.ones(8, np.float32)}

batches = [(batch(), batch()) for _ in range(3)]
arch = quant.init_arch(spec, params)
calibrate = jax.jit(lambda p, q, a, b: qapply(p, q, a, b["input_ids"], deterministic=True,
                                              attention_mask=b["attention_mask"],
                                              update_act_stats=True)[1])
qparams = calibrate(params, quant.init_qparams(spec, params), arch, batches[0][0])
fixed = search.float_matrix_bits(params, plan, layout=models.BERT_LAYOUT)
target = 0.7 * float(search.expected_size_mb({p: jax.nn.softmax(v) for p, v in arch.items()},
                                              plan, fixed))
# The search's own optimizers: clipped AdamW with weight decay off the scales, Adam on the logits.
weight_optimizer = optim.make_optimizer(train_defaults(learning_rate=1e-3, warmup_ratio=0.0), 10,
                                        mask=optim.weights_decay_mask)[0]
arch_optimizer = optax.adam(0.05)
fresh = lambda: jax.tree.map(np.array, search.SearchState.create(
    params, qparams, arch, weight_optimizer, arch_optimizer))

def leaves(state):
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
  return {jax.tree_util.keystr(path): np.asarray(leaf, np.float64) for path, leaf in flat}

def search_run(mesh, state):  # A fresh search step (its own program), state, sharded batches.
  step = search.make_search_step(
      search.label_loss(qapply, is_regression=False), plan=plan, target_mb=target,
      fixed_bits=fixed, size_weight=1.0, weight_optimizer=weight_optimizer,
      arch_optimizer=arch_optimizer, tau_fn=lambda s: jnp.float32(1.0), arch_start_step=0,
      seed=1).at(0)  # Bilevel from the first step.
  return step, state, [tuple(sharding.shard_batch(b, mesh) for b in pair) for pair in batches]

def finetune_run(mesh):  # The float fine-tuning step, replicated on `mesh`.
  optimizer = optim.make_optimizer(train_defaults(learning_rate=1e-3), 10)[0]
  state = jax.device_put(steps.TrainState.create(jax.tree.map(np.array, params), optimizer),
                         NamedSharding(mesh, PartitionSpec()), may_alias=False)
  return (steps.make_train_step(model, optimizer, False, dropout_seed=0), state,
          [sharding.shard_batch(pair[0], mesh) for pair in batches])

def run(step, state, inputs):
  specs_in = [x.sharding.spec for x in jax.tree.leaves(state)]
  losses = []
  for batch in inputs:
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  same_layout = specs_in == [x.sharding.spec for x in jax.tree.leaves(state)]
  return losses, leaves(state), {"same_layout": same_layout,
                                 "compilations": len(step.compilations)}

devices = jax.devices()
mesh22, mesh41 = sharding.make_mesh(devices, model_parallel=2), sharding.make_mesh(devices)
sharded_in = sharding.shard_state(fresh(), mesh22, models.BERT_MODEL_PARALLEL)

def where(tree, *keys):
  for k in keys:
    tree = tree[k] if isinstance(tree, dict) else getattr(tree, k)
  return {"spec": [a if a is None else str(a) for a in tree.sharding.spec],
          "shards": sorted({tuple(s.data.shape) for s in tree.addressable_shards}),
          "devices": len(tree.addressable_shards)}

layer = lambda *names: ("weights", "params", "bert", "encoder", "layer", "0") + names
ffn_in = "bert/encoder/layer/0/intermediate/dense/kernel"
query = "bert/encoder/layer/0/attention/self/query/kernel"
layouts = {
    "query_kernel": where(sharded_in, *layer("attention", "self", "query", "kernel")),
    "query_bias": where(sharded_in, *layer("attention", "self", "query", "bias")),
    "ffn_in_kernel": where(sharded_in, *layer("intermediate", "dense", "kernel")),
    "ffn_out_kernel": where(sharded_in, *layer("output", "dense", "kernel")),
    "ffn_out_bias": where(sharded_in, *layer("output", "dense", "bias")),
    "attention_output_kernel": where(sharded_in, *layer("attention", "output", "dense", "kernel")),
    "query_scale": where(sharded_in, "weights", "qparams", query, "scale"),
    "query_logits": where(sharded_in, "arch", query),
    "ffn_in_logits": where(sharded_in, "arch", ffn_in),
    "word_embeddings": where(sharded_in, "weights", "params", "bert", "embeddings",
                             "word_embeddings", "embedding"),
}
jobs = {"sharded": search_run(mesh22, sharded_in),
        "replicated": search_run(mesh41, sharding.replicate(fresh(), mesh41)),
        # Before the `model` axis the mesh was 1-D (`data`); model_parallel=1 must give the same
        # bits (checked on the cheaper float fine-tuning step).
        "legacy": finetune_run(Mesh(np.asarray(devices), ("data",))),
        "current": finetune_run(mesh41)}
with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:  # XLA compiles on one core each.
  list(pool.map(lambda job: job[0].precompile([(job[1], job[2][0])]), jobs.values()))
(sharded_losses, a, sharded_info), (replicated_losses, b, replicated_info) = (
    run(*jobs["sharded"]), run(*jobs["replicated"]))
(legacy_losses, legacy, _), (current_losses, current, _) = (run(*jobs["legacy"]),
                                                           run(*jobs["current"]))

start = leaves(fresh())
rel = lambda x, y, scale: float(np.max(np.abs(x - y)) / max(scale, 1e-30))
# Differences relative to the largest value of their kind (the weights, each optimizer moment, the
# logits): a leaf whose gradient is at rounding level (the key biases, whose exact gradient is 0)
# differs relatively to itself, not to the state.
kind = lambda k: re.match(r"\.\w+(\[\d+\])*(\.\w+)?", k).group(0)
scale = {}
for k, v in b.items():
  scale[kind(k)] = max(scale.get(kind(k), 0.0), float(np.max(np.abs(v))))
diffs = {k: rel(a[k], b[k], scale[kind(k)]) for k in b}
leafwise = {k: rel(a[k], b[k], np.max(np.abs(b[k]))) for k in b
            if np.max(np.abs(b[k])) > 1e-2 * scale[kind(k)]}
moved = {k: rel(b[k], start[k], np.max(np.abs(start[k]))) for k in b}
print(json.dumps({
    "devices": len(devices), "layouts": layouts,
    "losses": {"sharded": sharded_losses, "replicated": replicated_losses},
    "max_rel_diff": max(diffs.values()), "worst_leaf": max(diffs, key=diffs.get),
    "max_leafwise_rel_diff": max(leafwise.values()),
    "worst_leafwise": max(leafwise, key=leafwise.get),
    "min_moved_rel": min(v for k, v in moved.items()
                         if k.startswith((".weights['params']", ".arch")) and "kernel" in k),
    "legacy_identical": legacy_losses == current_losses and all(
        np.array_equal(legacy[k], current[k]) for k in legacy),
    "sharded_info": sharded_info, "replicated_info": replicated_info}))
"""


def test_search_step_on_data_and_model_axes_equals_the_replicated_one():
  """3 AutoMPQ search steps (logits, then weights and scales; dropout, Gumbel noise, clipped
  AdamW) with the state split over model=2 of a (data=2, model=2) mesh equal the same steps
  replicated over data=4: the losses to 1e-5, and every leaf of the state (weights, qparams,
  logits, both optimizers' moments) to 1e-5 of the largest value of its kind, and to 5e-5 of
  itself unless it is under 1% of that (leaves with rounding-level gradients, such as the key
  biases whose exact gradient is 0, differ in their own noise). The sharded state keeps its
  layout across steps (one compilation), and model_parallel=1 is bit for bit the 1-D data mesh
  of before."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": xla_flags(host_devices=4, fast_compile=False)}
  result = subprocess.run([sys.executable, "-c", _SCRIPT, str(REPO_ROOT), json.dumps(TINY_BERT)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["devices"] == 4
  layouts = out["layouts"]
  column, row, whole = ([None, "model"], ["model", None], [])
  expected = {  # (spec, shard shapes): hidden 32, intermediate 64, 3 bit choices.
      "query_kernel": (column, [[32, 16]]), "query_bias": (["model"], [[16]]),
      "ffn_in_kernel": (column, [[32, 32]]), "ffn_out_kernel": (row, [[32, 32]]),
      "attention_output_kernel": (row, [[16, 32]]), "ffn_out_bias": (whole, [[32]]),
      "query_scale": (column, [[3, 2]]), "query_logits": (row, [[2, 3]]),
      "ffn_in_logits": (whole, [[3, 3]]), "word_embeddings": (whole, [[30522, 32]])}
  for name, (spec, shards) in expected.items():
    assert (layouts[name]["spec"], layouts[name]["shards"]) == (spec, shards), (name, layouts[name])
    assert layouts[name]["devices"] == 4
  losses = out["losses"]
  np.testing.assert_allclose(losses["sharded"], losses["replicated"], rtol=1e-5)
  assert out["max_rel_diff"] < 1e-5, (out["max_rel_diff"], out["worst_leaf"])
  # Relative to its own leaf, AdamW's normalised update amplifies the rounding of near-zero
  # gradient entries, and how much depends on the CPU's matmul kernels: under 1e-5 on Intel Xeons,
  # 1.1e-5 (layer 0's value kernel) on an AMD EPYC. 5e-5 is still 20x below how far every matrix
  # moved (the next assertion), which is what a sharding error would be of the order of.
  assert out["max_leafwise_rel_diff"] < 5e-5, (out["max_leafwise_rel_diff"], out["worst_leafwise"])
  assert out["min_moved_rel"] > 1e-3  # Every matrix and its logits moved: a real comparison.
  assert out["legacy_identical"]
  for info in (out["sharded_info"], out["replicated_info"]):
    assert info == {"same_layout": True, "compilations": 1}, info
  print(f"max difference sharded vs replicated, relative to its kind: {out['max_rel_diff']:.2e} "
        f"({out['worst_leaf']}); relative to its leaf: {out['max_leafwise_rel_diff']:.2e} "
        f"({out['worst_leafwise']}); losses {losses['sharded']} vs {losses['replicated']}")
