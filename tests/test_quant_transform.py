"""`mpqbert.quant.transform` on a real (tiny) BERT: references, search mode, jit/grad/vmap/sharding."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from mpqbert import models, quant
from tests.conftest import REPO_ROOT, TINY_BERT, xla_flags
from tests.test_quant import ref_symmetric

CONFIG = models.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=64,
                           max_position_embeddings=32, type_vocab_size=2)
QUERY = "encoder/layer/0/attention/self/query/kernel"


@pytest.fixture(scope="module")
def tiny():
  model = models.build_model(CONFIG, num_labels=None)
  params = models.init_params(model, seed=7)
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(1, CONFIG.vocab_size, size=(4, 12)), jnp.int32)
  mask = jnp.asarray(np.arange(12)[None, :] < np.array([[12], [9], [5], [12]]), jnp.int32)
  return model, params, ids, mask


def with_kernels(params, replace):
  """params with every planned kernel replaced by `replace(path, kernel)` (a NumPy array)."""
  def visit(tree, prefix):
    if isinstance(tree, dict):
      return {k: visit(v, f"{prefix}{k}/") for k, v in tree.items()}
    return jnp.asarray(replace(prefix[:-1], np.asarray(tree)), jnp.float32)
  return visit(params, "")


def test_uniform_policy_equals_model_with_float64_quantized_kernels(tiny):
  model, params, ids, mask = tiny
  spec = models.bert_encoder_spec(groups="head", bit_choices=(4,), num_heads=4)
  plan = spec.plan(params)
  qparams = quant.init_qparams(spec, params, scale_init="mse")
  policy = quant.uniform_policy(plan, 4)
  qapply = quant.transform(model.apply, spec)
  got = qapply(params, qparams, policy, ids, attention_mask=mask, deterministic=True)

  reference = with_kernels(params, lambda path, w: ref_symmetric(
      w, np.asarray(qparams[path]["scale"][0]), 4) if path in plan else w)
  want = model.apply({"params": reference}, ids, attention_mask=mask, deterministic=True)
  np.testing.assert_allclose(got, want, atol=1e-4)
  fp = model.apply({"params": params}, ids, attention_mask=mask, deterministic=True)
  assert np.max(np.abs(np.asarray(got) - np.asarray(fp))) > 1e-3  # 10x the tolerance: quantization did something


def test_activation_calibration_and_quantized_dense_against_numpy():
  dense = models.QuantizableDense(features=8)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 16)), jnp.float32)
  params = dense.init(jax.random.key(0), x)["params"]
  spec = quant.QuantSpec(rules=(quant.Rule(pattern="^kernel$", groups=2, bit_choices=(4,)),),
                         activation_bits=8, activation_mode="moving", activation_momentum=0.75,
                         layout=quant.ModelLayout(name="one Dense", matrices=r"^kernel$"))
  qparams = quant.init_qparams(spec, params)
  policy = quant.uniform_policy(spec.plan(params), 4, activation_bits=8)
  qapply = quant.transform(dense.apply, spec)

  _, qparams = qapply(params, qparams, policy, x, update_act_stats=True)
  first = np.max(np.abs(np.asarray(x))) / 127
  np.testing.assert_allclose(qparams["kernel"]["act_scale"], first, rtol=1e-6)
  x2 = 2.0 * x
  _, updated = qapply(params, qparams, policy, x2, update_act_stats=True)
  np.testing.assert_allclose(updated["kernel"]["act_scale"], 0.75 * first + 0.25 * 2 * first,
                             rtol=1e-6)

  got = qapply(params, qparams, policy, x)
  x_ref = ref_symmetric(np.asarray(x).reshape(1, -1), np.array([first]), 8).reshape(x.shape)
  w_ref = ref_symmetric(np.asarray(params["kernel"]), np.asarray(qparams["kernel"]["scale"][0]),
                        4)
  np.testing.assert_allclose(got, x_ref @ w_ref + np.asarray(params["bias"]), atol=1e-5)

  learned_spec = dataclasses.replace(spec, activation_mode="learned")
  learned = quant.transform(dense.apply, learned_spec)
  grads = jax.grad(lambda q: jnp.sum(learned(params, q, policy, x) ** 2))(qparams)
  assert float(grads["kernel"]["act_scale"]) != 0.0
  moving = jax.grad(lambda q: jnp.sum(qapply(params, q, policy, x) ** 2))(qparams)
  assert float(moving["kernel"]["act_scale"]) == 0.0


def test_search_mode_hard_sample_equals_the_sampled_policy(tiny):
  model, params, ids, mask = tiny
  spec = models.bert_encoder_spec(groups=4, num_heads=4, activation_bits=32)
  plan = spec.plan(params)
  qparams = quant.init_qparams(spec, params)
  arch = {p: jax.random.normal(jax.random.key(i), l.shape)
          for i, (p, l) in enumerate(quant.init_arch(spec, params).items())}
  key = jax.random.key(42)
  qapply = quant.transform(model.apply, spec)
  searched = qapply(params, qparams, arch, ids, attention_mask=mask, key=key, tau=0.7, hard=True,
                    deterministic=True)
  probs = quant.sample_probs(arch, key, tau=0.7, hard=True)
  sampled = quant.policy_from_logits(probs, plan)
  assert len({int(b) for bits in sampled.bits.values() for b in bits}) > 1  # really mixed
  fixed = qapply(params, qparams, sampled, ids, attention_mask=mask, deterministic=True)
  np.testing.assert_array_equal(searched, fixed)


def test_gradients_reach_weights_scales_and_logits(tiny):
  model, params, ids, mask = tiny
  spec = models.bert_encoder_spec(groups=4, num_heads=4, activation_bits=8)
  qparams = quant.init_qparams(spec, params)
  arch = quant.init_arch(spec, params)
  qapply = quant.transform(model.apply, spec)
  _, qparams = qapply(params, qparams, arch, ids, attention_mask=mask, deterministic=True,
                      update_act_stats=True)

  def loss(p, q, a):
    return jnp.sum(qapply(p, q, a, ids, attention_mask=mask, key=jax.random.key(0), tau=1.0,
                          deterministic=True) ** 2)

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, qparams, arch)
  for tree in grads:
    leaves = jax.tree.leaves(tree)
    assert all(np.all(np.isfinite(leaf)) for leaf in leaves)
  assert np.any(grads[0]["encoder"]["layer"]["1"]["output"]["dense"]["kernel"])
  assert np.any(grads[1][QUERY]["scale"][1:]) and np.any(grads[1][QUERY]["act_scale"])
  assert np.any(grads[2][QUERY])


def _primitives(jaxpr) -> set[str]:
  """Names of every primitive in `jaxpr` and the jaxprs nested in it (pjit, custom_vjp, ...)."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      names |= _primitives(sub)
  return names


def test_quantized_forward_and_backward_hold_no_conditional(tiny):
  """No `cond` in a quantized step: on a GPU each conditional copies its predicate to the host,
  which would be one synchronisation per quantized input per step."""
  model, params, ids, mask = tiny
  spec = models.bert_encoder_spec(groups=4, num_heads=4, activation_bits=8,
                                  activation_mode="learned")
  qparams = quant.init_qparams(spec, params)
  arch = quant.init_arch(spec, params)
  qapply = quant.transform(model.apply, spec)

  def loss(p, q, a):
    return jnp.sum(qapply(p, q, a, ids, attention_mask=mask, key=jax.random.key(0), tau=1.0,
                          deterministic=True) ** 2)

  names = _primitives(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(params, qparams,
                                                                       arch).jaxpr)
  assert "round" in names  # The quantizers are in the program.
  assert not names & {"cond", "while"}, sorted(names)


def test_pruned_sub_groups_are_zero_and_get_no_gradient(tiny):
  model, params, ids, mask = tiny
  spec = models.bert_encoder_spec(groups=4, num_heads=4)
  plan = spec.plan(params)
  qparams = quant.init_qparams(spec, params)
  policy = quant.uniform_policy(plan, 8)
  policy = quant.Policy(bits={**policy.bits, QUERY: np.array([0, 8, 0, 2], np.int32)},
                        matrices=policy.matrices).validate()
  w_hat = quant.quantize_weight(jnp.asarray(params["encoder"]["layer"]["0"]["attention"]
                                            ["self"]["query"]["kernel"]), plan[QUERY],
                                qparams[QUERY], quant.one_hot_bits(policy.bits[QUERY], (0, 2, 4,
                                                                                        8)))
  assert not np.any(np.asarray(w_hat)[:, :8]) and not np.any(np.asarray(w_hat)[:, 16:24])
  assert np.count_nonzero(np.asarray(w_hat)[:, 8:16]) > 0.9 * 32 * 8
  qapply = quant.transform(model.apply, spec)
  grads = jax.grad(lambda p: jnp.sum(qapply(p, qparams, policy, ids, attention_mask=mask,
                                            deterministic=True) ** 2))(params)
  g = np.asarray(grads["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"])
  assert not np.any(g[:, :8]) and not np.any(g[:, 16:24]) and np.any(g[:, 8:16])


def test_jit_vmap_and_remat_agree_with_eager(tiny):
  model, params, ids, mask = tiny
  spec = models.bert_encoder_spec(groups="neuron", num_heads=4, activation_bits=8)
  qparams = quant.init_qparams(spec, params, scale_init="lsq")
  arch = quant.init_arch(spec, params)
  qapply = quant.transform(model.apply, spec)
  _, qparams = qapply(params, qparams, arch, ids, attention_mask=mask, deterministic=True,
                      update_act_stats=True)
  kwargs = dict(key=jax.random.key(1), tau=0.5, deterministic=True)
  eager = qapply(params, qparams, arch, ids, attention_mask=mask, **kwargs)
  jitted = jax.jit(lambda p, q, a, i, m: qapply(p, q, a, i, attention_mask=m, **kwargs))(
      params, qparams, arch, ids, mask)
  np.testing.assert_allclose(jitted, eager, atol=1e-5)
  per_example = jax.vmap(lambda i, m: qapply(params, qparams, arch, i[None], attention_mask=m[None],
                                             **kwargs)[0])(ids, mask)
  np.testing.assert_allclose(per_example, eager, atol=1e-5)
  remat_model = models.build_model(CONFIG, num_labels=None, remat=True)
  remat = quant.transform(remat_model.apply, spec)(params, qparams, arch, ids, attention_mask=mask,
                                                   **kwargs)
  np.testing.assert_allclose(remat, eager, atol=1e-5)


def test_embedding_bits_quantize_the_tables_per_row(tiny):
  model, params, ids, mask = tiny
  spec = models.bert_encoder_spec(groups=1, bit_choices=(8,))
  plan = spec.plan(params)
  qparams = quant.init_qparams(spec, params)
  qapply = quant.transform(model.apply, spec)
  policy = quant.uniform_policy(plan, 8, embedding_bits=4)
  got = qapply(params, qparams, policy, ids, attention_mask=mask, deterministic=True)

  def reference(path, w):
    if path in plan:
      return ref_symmetric(w, np.asarray(qparams[path]["scale"][0]), 8)
    if models.BERT_LAYOUT.is_table(path, "symmetric"):
      rows = np.maximum(np.abs(w).max(axis=1), 1e-12) / 7
      return ref_symmetric(w.T, rows, 4).T
    return w

  want = model.apply({"params": with_kernels(params, reference)}, ids, attention_mask=mask,
                     deterministic=True)
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_mismatched_trees_get_clear_errors(tiny):
  model, params, ids, mask = tiny
  spec = models.bert_encoder_spec(groups=4)
  qparams = quant.init_qparams(spec, params)
  arch = quant.init_arch(spec, params)
  qapply = quant.transform(model.apply, spec)
  with pytest.raises(ValueError, match="qparams has no entry"):
    qapply(params, {}, arch, ids, deterministic=True)
  with pytest.raises(ValueError, match="expected \\(4, 4\\)"):
    qapply(params, qparams, {**arch, QUERY: jnp.zeros((2, 4))}, ids, deterministic=True)
  other = models.bert_encoder_spec(groups=2)
  policy = quant.uniform_policy(other.plan(params), 8)
  with pytest.raises(ValueError, match="another model or QuantSpec"):
    qapply(params, qparams, policy, ids, deterministic=True)


def test_policy_bits_outside_the_specs_choices_are_rejected(tiny):
  """Same shapes and groups, but 3 bits where the spec offers (0, 2, 4, 8): one-hot rows of all
  zeros would silently quantize those sub-groups to 0, so it must be an error naming them."""
  model, params, ids, mask = tiny
  spec = models.bert_encoder_spec(groups=4, bit_choices=(0, 2, 4, 8))
  qapply = quant.transform(model.apply, spec)
  qparams = quant.init_qparams(spec, params)
  plan3 = models.bert_encoder_spec(groups=4, bit_choices=(3, 8)).plan(params)
  policy = quant.uniform_policy(plan3, 8)
  policy.check_matches(spec.plan(params))  # 8 bits are among the choices: fine
  np.asarray(qapply(params, qparams, policy, ids, deterministic=True))
  bits = {p: np.where(np.arange(m.groups) == 1, 3, 8).astype(np.int32) for p, m in plan3.items()}
  mixed = quant.Policy(bits=bits, matrices=tuple(plan3.values())).validate()
  with pytest.raises(ValueError, match=r"bit-width\(s\) \[3\].*\(0, 2, 4, 8\)"):
    mixed.check_matches(spec.plan(params))
  with pytest.raises(ValueError, match=r"encoder/layer/0/.*bit-width\(s\) \[3\]"):
    qapply(params, qparams, mixed, ids, deterministic=True)
  # The one-hot rows of a policy that passes are exactly one-hot.
  good = quant.uniform_policy(spec.plan(params), 4)
  for p, m in spec.plan(params).items():
    rows = np.asarray(quant.one_hot_bits(good.bits[p], m.bit_choices))
    np.testing.assert_array_equal(rows.sum(-1), np.ones(m.groups))


_SHARDED_SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import jax, jax.numpy as jnp, numpy as np
from mpqbert import models, quant
from mpqbert.train import sharding
from tests.test_quant_transform import CONFIG

model = models.build_model(CONFIG, num_labels=None)
params = models.init_params(model, seed=7)
spec = models.bert_encoder_spec(groups=4, activation_bits=8)
qparams = quant.init_qparams(spec, params)
arch = quant.init_arch(spec, params)
qapply = quant.transform(model.apply, spec)
rng = np.random.default_rng(0)
batch = {"input_ids": rng.integers(1, CONFIG.vocab_size, size=(8, 12)).astype(np.int32),
         "attention_mask": np.ones((8, 12), np.int32)}
_, qparams = qapply(params, qparams, arch, batch["input_ids"], deterministic=True,
                    update_act_stats=True)
projection = jnp.asarray(rng.normal(size=(8, 12, CONFIG.hidden_size)), jnp.float32)

@jax.jit
def loss_and_grads(params, qparams, arch, batch):
  def loss(p, q, a):
    logits = qapply(p, q, a, batch["input_ids"], attention_mask=batch["attention_mask"],
                    key=jax.random.key(0), deterministic=True)
    return jnp.mean(logits * projection)
  return jax.value_and_grad(loss, argnums=(0, 1, 2))(params, qparams, arch)

def run(devices):
  mesh = sharding.make_mesh(devices)
  loss, grads = loss_and_grads(*sharding.replicate((params, qparams, arch), mesh),
                               sharding.shard_batch(batch, mesh))
  return float(loss), [float(jnp.sum(jnp.abs(g))) for g in jax.tree.leaves(grads)]

print(json.dumps({"devices": len(jax.devices()), "four": run(jax.devices()),
                  "one": run(jax.devices()[:1])}))
"""


def test_data_parallel_sharding_matches_one_device():
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": xla_flags(host_devices=4)}
  result = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT, str(REPO_ROOT)], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["devices"] == 4
  np.testing.assert_allclose(out["four"][0], out["one"][0], rtol=1e-5)
  grads_four, grads_one = np.asarray(out["four"][1]), np.asarray(out["one"][1])
  np.testing.assert_allclose(grads_four, grads_one, rtol=1e-3, atol=1e-4 * grads_one.max())
  assert grads_one.max() > 1e-2


def test_activation_calibration_ignores_padded_positions():
  """Calibrating on a batch padded to 16 tokens gives the step sizes of the same batch unpadded
  (8 tokens), whatever the padded positions hold; counting them would change the step sizes."""
  config = models.BertConfig(**TINY_BERT)
  model = models.build_model(config, 2)
  params = models.init_params(model, seed=5)
  spec = models.bert_encoder_spec(groups=1, bit_choices=(8,), activation_bits=8,
                                 activation_mode="moving")
  policy = quant.uniform_policy(spec.plan(params), 8, activation_bits=8)
  qapply = quant.transform(model.apply, spec)
  rng = np.random.default_rng(6)
  short = jnp.asarray(rng.integers(1000, 5000, (3, 8)), jnp.int32)
  junk = jnp.asarray(rng.integers(20000, 30000, (3, 8)), jnp.int32)  # Ids the pads happen to hold.
  padded = jnp.concatenate([short, junk], axis=1)
  mask = jnp.concatenate([jnp.ones((3, 8), jnp.int32), jnp.zeros((3, 8), jnp.int32)], axis=1)

  def calibrated(ids, attention_mask):
    _, qparams = qapply(params, quant.init_qparams(spec, params), policy, ids,
                        attention_mask=attention_mask, deterministic=True, update_act_stats=True)
    return {p: float(e["act_scale"]) for p, e in qparams.items()}

  want = calibrated(short, jnp.ones_like(short))
  got = calibrated(padded, mask)
  for path in want:
    np.testing.assert_allclose(got[path], want[path], rtol=1e-5, err_msg=path)
  # The padded positions do reach the matrices: counted, they move some step size.
  with_pads = calibrated(padded, jnp.ones_like(padded))
  assert any(abs(with_pads[p] - want[p]) > 1e-3 * want[p] for p in want)
