"""Packed export of mixed-precision policies: bytes, column blocks, and agreement with the
fake-quantized model."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_BERT
from mpqbert import export, kernels, models, quant

# Logits of two float paths compared to ~1e-5: full float32 matmuls on GPUs and TPUs too.
pytestmark = pytest.mark.usefixtures("float32_matmuls")


def _mixed_policy(plan: quant.Plan, rng: np.random.Generator, activation_bits: int) -> quant.Policy:
  bits = {p: jnp.asarray(rng.choice(m.bit_choices, m.groups), jnp.int32) for p, m in plan.items()}
  first = next(iter(plan))
  bits[first] = jnp.asarray([8, 0, 2, 4][:plan[first].groups], jnp.int32)  # every kind, pruned too
  return quant.Policy(bits=bits, matrices=tuple(plan.values()),
                      activation_bits=activation_bits).validate()


@pytest.mark.parametrize("activation_bits", [32, 8])
def test_mixed_policy_export_matches_fake_quantized_model(tmp_path, activation_bits):
  config = models.BertConfig(**TINY_BERT)
  model = models.build_model(config, 2)
  params = models.init_params(model, seed=1)
  spec = models.bert_encoder_spec(groups=4, bit_choices=(0, 2, 4, 8),
                                 activation_bits=activation_bits, activation_mode="moving")
  plan = spec.plan(params)
  policy = _mixed_policy(plan, np.random.default_rng(0), activation_bits)
  qparams = quant.init_qparams(spec, params)
  qapply = quant.transform(model.apply, spec)
  rng = np.random.default_rng(2)
  ids = jnp.asarray(rng.integers(1000, 5000, (16, 12)), jnp.int32)
  kwargs = dict(attention_mask=jnp.ones_like(ids), deterministic=True)
  if activation_bits < 32:
    _, qparams = qapply(params, qparams, policy, ids, update_act_stats=True, **kwargs)
  fake = qapply(params, qparams, policy, ids, **kwargs)

  packed = export.export_packed(params, policy, qparams, config=config, num_labels=2)
  report = quant.size_report(params, policy, layout=models.BERT_LAYOUT)
  # 2-, 4- and 8-bit codes fill whole words here (K = 32 or 64): bytes are exactly size_mb.
  assert export.packed_nbytes(packed, part="matrices") == report["size_mb"] * 2**20
  first = next(iter(plan))
  stored = set(packed.matrices[first]) - {"act_scale"}
  assert stored == {"b8/words", "b8/scale", "b4/words", "b4/scale", "b2/words", "b2/scale"}
  loaded = export.load_packed(export.save_packed(packed, tmp_path / "mixed.npz"))
  served = jax.jit(lambda p, ids: p.apply(ids, **kwargs))(loaded, ids)
  np.testing.assert_allclose(np.asarray(served), np.asarray(fake), rtol=1e-4, atol=1e-5)


def _packed_bytes_by_hand(policy: quant.Policy) -> int:
  """Bytes of a policy's matrices, counted per sub-group g of [g * w, min((g + 1) * w, N)),
  w = ceil(N / G): b-bit codes of K rows take ceil(K / floor(32 / b)) uint32 words per column
  (K * b / 8 bytes for 1, 2, 4, 8 bits when 32 divides K; 3-bit codes 10 to a word); + 4 bytes
  of scale per kept sub-group (8 for index matrices: scale and zero point)."""
  total = 0
  for m in policy.matrices:
    k, n = m.shape
    width = -(-n // m.groups)
    for g, b in enumerate(np.asarray(policy.bits[m.path]).tolist()):
      if b == 0:
        continue
      columns = min((g + 1) * width, n) - g * width
      total += 4 * -(-k // (32 // b)) * columns + (8 if m.quantizer == "index" else 4)
  return total


@pytest.mark.parametrize("binary_ffn_inputs", [False, True])
@pytest.mark.parametrize("activation_bits", [32, 8])
def test_one_bit_symmetric_groups_export_matches_fake_quantized_model(tmp_path, activation_bits,
                                                                      binary_ffn_inputs):
  """A symmetric policy over bits (0, 1, 2, 3, 4, 8), 1-bit groups s * sign(w): the packed model
  gives the fake-quantized logits, with the bytes counted by hand."""
  config = models.BertConfig(**TINY_BERT)
  model = models.build_model(config, 2)
  params = models.init_params(model, seed=1)
  choices = (0, 1, 2, 3, 4, 8)
  spec = models.bert_encoder_spec(groups=4, bit_choices=choices, activation_bits=activation_bits,
                                 activation_mode="moving")
  if binary_ffn_inputs:  # FFN outputs' inputs binarized to sign(x): 1-bit groups run XNOR.
    rules = tuple(quant.Rule(pattern=r.pattern, groups=4, bit_choices=choices,
                             activation_bits=1 if "/output/dense" in r.pattern and
                             "attention" not in r.pattern else None) for r in spec.rules)
    spec = quant.QuantSpec(rules=rules, activation_bits=activation_bits,
                           activation_mode="moving", layout=models.BERT_LAYOUT)
  plan = spec.plan(params)
  rng = np.random.default_rng(0)
  bits = {p: np.asarray(rng.choice(choices, m.groups), np.int32) for p, m in plan.items()}
  paths = list(plan)
  bits[paths[0]] = np.asarray([1, 3, 0, 8], np.int32)  # every choice in the first two matrices
  bits[paths[1]] = np.asarray([2, 1, 4, 3], np.int32)
  ffn_out = "bert/encoder/layer/1/output/dense/kernel"
  bits[ffn_out] = np.asarray([1, 2, 1, 0], np.int32)
  policy = quant.Policy(bits={p: jnp.asarray(b) for p, b in bits.items()},
                        matrices=tuple(plan.values()), activation_bits=activation_bits).validate()
  ids, kwargs, fake, packed = _fake_and_packed(model, params, spec, policy, config,
                                               activation_bits)
  # size_mb counts the packed words, so the bytes on disk are the reported size, 3-bit included.
  packed_bytes = _packed_bytes_by_hand(policy)
  assert quant.size_report(params, policy,
                           layout=models.BERT_LAYOUT)["size_mb"] * 2**20 == packed_bytes
  assert export.packed_nbytes(packed, part="matrices") == packed_bytes

  # The 1-bit block: sign bits (K = 32: one word per column, bit k = row k, 1 = w >= 0) and the
  # per-group scale, mean|w| of the group (the "mse" init at 1 bit).
  w = np.asarray(quant.flatten_params(params)[paths[0]], np.float64)  # [32, 32], groups of 8
  entry = packed.matrices[paths[0]]
  words = np.asarray(entry["b1/words"])
  assert words.shape == (1, 8) and words.dtype == np.uint32
  sign_bits = (words[0][None, :] >> np.arange(32, dtype=np.uint32)[:, None]) & 1
  np.testing.assert_array_equal(sign_bits, (w[:, :8] >= 0).astype(np.uint32))
  np.testing.assert_allclose(entry["b1/scale"], [np.abs(w[:, :8]).mean()], rtol=1e-6)
  assert set(entry) - {"act_scale"} == {f"b{b}/{a}" for b in (8, 3, 1) for a in ("words",
                                                                                "scale")}

  loaded = export.load_packed(export.save_packed(packed, tmp_path / "one_bit.npz"))
  served = _served(loaded, ids, **kwargs)
  np.testing.assert_allclose(np.asarray(served), np.asarray(fake), rtol=1e-4, atol=1e-5)
  if binary_ffn_inputs and activation_bits == 8:
    # The same through the Pallas kernels themselves (interpreted; "auto" on CPU runs their jnp
    # references): packed_matmul at 8, 3, 2 and 1 bits and xnor_matmul end to end.
    interpreted = jax.jit(lambda p, ids: p.apply(ids, backend="interpret", **kwargs))(loaded, ids)
    np.testing.assert_allclose(np.asarray(interpreted), np.asarray(fake), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("quantizer,activation_bits,binary_ffn_inputs", [
    ("symmetric", 8, False), ("symmetric", 32, True), ("index", 32, False)])
def test_uneven_groups_export_matches_fake_quantized_model(tmp_path, quantizer, activation_bits,
                                                           binary_ffn_inputs):
  """A BERT whose FFN is 80 wide, in sub-groups that do not divide it (FFN inputs 12 groups:
  11 of 7 columns and 3; FFN outputs 5 of 32: 4 of 7 and 4; attention outputs 3: 11, 11, 10):
  the packed bytes are size_mb and counted by hand, the short group packs its own columns, and
  the packed model gives the fake-quantized logits."""
  config = models.BertConfig(**{**TINY_BERT, "intermediate_size": 80})
  model = models.build_model(config, 2)
  params = models.init_params(model, seed=5)
  choices = (0, 1, 2, 3, 4, 8)
  spec = models.bert_encoder_spec(
      quantizer=quantizer, groups={"qkv": 4, "attention_output": 3, "ffn_in": 12, "ffn_out": 5},
      bit_choices=choices, activation_bits=activation_bits, activation_mode="moving")
  if binary_ffn_inputs:  # FFN outputs' inputs binarized: their 1-bit groups run XNOR (K = 80).
    spec = dataclasses.replace(spec, rules=tuple(
        dataclasses.replace(r, activation_bits=1) if r.pattern.endswith(r"/output/dense/kernel$")
        and "attention" not in r.pattern else r for r in spec.rules))
  plan = spec.plan(params)
  ffn_in = "bert/encoder/layer/0/intermediate/dense/kernel"
  ffn_out = "bert/encoder/layer/1/output/dense/kernel"
  assert plan[ffn_in].group_widths[-1] == 3 and plan[ffn_out].group_widths[-1] == 4
  rng = np.random.default_rng(0)
  bits = {p: np.asarray(rng.choice(choices, m.groups), np.int32) for p, m in plan.items()}
  bits[ffn_in][-1] = 3  # The short groups alone in their blocks, and next to full ones.
  bits[ffn_in][:-1] = np.where(bits[ffn_in][:-1] == 3, 4, bits[ffn_in][:-1])
  bits[ffn_out] = np.asarray([1, 0, 2, 8, 1], np.int32)
  policy = quant.Policy(bits={p: jnp.asarray(b) for p, b in bits.items()},
                        matrices=tuple(plan.values()), activation_bits=activation_bits).validate()
  ids, kwargs, fake, packed = _fake_and_packed(model, params, spec, policy, config,
                                               activation_bits)
  packed_bytes = _packed_bytes_by_hand(policy)
  assert quant.size_report(params, policy,
                           layout=models.BERT_LAYOUT)["size_mb"] * 2**20 == packed_bytes
  assert export.packed_nbytes(packed, part="matrices") == packed_bytes

  # The short FFN-input group: its 3 columns (77..79) alone at 3 bits, ceil(32 / 10) = 4 words
  # each, with the codes of its own grid (float64, from its stored scale and zero point).
  entry = packed.matrices[ffn_in]
  assert entry["b3/words"].shape == (4, 3) and entry["b3/scale"].shape == (1,)
  codes = np.asarray(kernels.unpack(entry["b3/words"], 3, 32, signed=quantizer != "index"))
  w = np.asarray(quant.flatten_params(params)[ffn_in], np.float64)[:, 77:]
  scale = float(entry["b3/scale"][0])
  if quantizer == "index":
    want = np.round((w - w.min()) / scale)
    np.testing.assert_allclose(entry["b3/zero"], [-w.min() / scale], rtol=1e-5)
  else:
    want = np.clip(np.round(w / scale), -4, 3)
  np.testing.assert_array_equal(codes, want)

  loaded = export.load_packed(export.save_packed(packed, tmp_path / "uneven.npz"))
  served = _served(loaded, ids, **kwargs)
  np.testing.assert_allclose(np.asarray(served), np.asarray(fake), rtol=1e-4, atol=1e-5)


def _fake_and_packed(model, params, spec, policy, config, activation_bits):
  """Inputs, the fake-quantized logits (activation scales calibrated on the inputs when they are
  quantized) and the packed model of `policy`."""
  qparams = quant.init_qparams(spec, params)
  qapply = quant.transform(model.apply, spec)
  ids = jnp.asarray(np.random.default_rng(2).integers(1000, 5000, (16, 12)), jnp.int32)
  kwargs = dict(attention_mask=jnp.ones_like(ids), deterministic=True)
  if activation_bits < 32:
    _, qparams = qapply(params, qparams, policy, ids, update_act_stats=True, **kwargs)
  fake = qapply(params, qparams, policy, ids, **kwargs)
  return ids, kwargs, fake, export.export_packed(params, policy, qparams, config=config,
                                                 num_labels=2)


@functools.partial(jax.jit, static_argnames=("deterministic",))
def _served(packed, ids, **kwargs):
  """One jitted function for every packed model of the tests: models of equal shapes and other
  policies are different static metadata, which jit must compare (and hash) to tell apart."""
  return packed.apply(ids, **kwargs)


def test_packed_models_with_other_policies_retrace_one_jitted_function():
  config = models.BertConfig(**TINY_BERT)
  params = models.init_params(models.build_model(config, 2), seed=1)
  spec = models.bert_encoder_spec(groups=4, bit_choices=(2, 4), activation_bits=32)
  plan = spec.plan(params)
  qparams = quant.init_qparams(spec, params)
  ids = jnp.asarray(np.random.default_rng(2).integers(1000, 5000, (2, 12)), jnp.int32)
  for bits in (2, 4, 2):
    policy = quant.uniform_policy(plan, bits)
    packed = export.export_packed(params, policy, qparams, config=config, num_labels=2)
    served = np.asarray(_served(packed, ids, deterministic=True))
    eager = np.asarray(packed.apply(ids, deterministic=True))  # no jit cache involved
    np.testing.assert_allclose(served, eager, rtol=1e-5, atol=1e-6)
    if bits == 4:  # not the 2-bit model's program served again
      assert np.abs(served - first).max() > 0
    else:
      first = served
  assert quant.uniform_policy(plan, 2) == quant.uniform_policy(plan, 2)
  assert hash(quant.uniform_policy(plan, 2)) == hash(quant.uniform_policy(plan, 2))
  assert quant.uniform_policy(plan, 2) != quant.uniform_policy(plan, 4)


def test_bit_blocks_put_each_width_together_and_leave_pruned_groups_out():
  matrix = quant.MatrixSpec(path="m", shape=(8, 12), groups=6, quantizer="symmetric",
                            bit_choices=(0, 2, 4, 8))
  policy = quant.Policy(bits={"m": jnp.asarray([2, 8, 0, 2, 4, 8])}, matrices=(matrix,))
  blocks = [(b, g.tolist()) for b, g in export.bit_blocks(policy, "m")]
  assert blocks == [(8, [1, 5]), (4, [4]), (2, [0, 3])]


def test_export_rejects_widths_the_kernels_do_not_pack():
  params = models.init_params(models.build_model(models.BertConfig(**TINY_BERT), 2), seed=0)
  spec = models.bert_encoder_spec(bit_choices=(6,))
  with pytest.raises(ValueError, match="6-bit sub-groups cannot be packed"):
    export.export_packed(params, quant.uniform_policy(spec.plan(params), 6),
                         quant.init_qparams(spec, params))
  with pytest.raises(FileNotFoundError, match="no packed model"):
    export.load_packed("/nonexistent/packed.npz")


def test_matrices_a_policy_leaves_out_stay_float32_in_training_size_and_export():
  """A half-precision policy (other_bits 16) that quantizes only the FFN input matrices: the
  attention matrices it leaves out are float32 in the export, as the fake-quantized model keeps
  them and as `size_mb` counts them; biases and LayerNorms are float16. Bytes counted by hand."""
  config = models.BertConfig(**TINY_BERT)
  model = models.build_model(config, 2)
  params = models.init_params(model, seed=3)
  spec = quant.QuantSpec(rules=(quant.Rule(pattern=r"intermediate/dense/kernel$", groups=4,
                                           bit_choices=(4,)),), activation_bits=32,
                                           layout=models.BERT_LAYOUT)
  plan = spec.plan(params)
  policy = dataclasses.replace(quant.uniform_policy(plan, 4), other_bits=16).validate()
  packed = export.export_packed(params, policy, quant.init_qparams(spec, params), config=config,
                                num_labels=2)
  flat = quant.flatten_params(params)
  kept = quant.flatten_params(packed.params)
  query = "bert/encoder/layer/0/attention/self/query/kernel"
  assert kept[query].dtype == jnp.float32
  np.testing.assert_array_equal(kept[query], flat[query])
  assert kept["bert/encoder/layer/0/attention/self/query/bias"].dtype == jnp.float16
  # By hand: 4-bit FFN input matrices [H, I] in ceil(H / 8) words per column + 4 scales, and every
  # other encoder matrix at 4 bytes per weight.
  h, i, layers = TINY_BERT["hidden_size"], TINY_BERT["intermediate_size"], 2
  ffn_in = (-(-h // 8) * i * 4 + 4 * 4) * layers
  float_matrices = (4 * h * h + i * h) * 4 * layers
  assert export.packed_nbytes(packed, part="matrices") == ffn_in + float_matrices
  assert quant.size_report(params, policy,
                           layout=models.BERT_LAYOUT)["size_mb"] * 2**20 == ffn_in + float_matrices
  fake = quant.transform(model.apply, spec)
  ids = jnp.asarray(np.random.default_rng(4).integers(1000, 5000, (4, 10)), jnp.int32)
  want = fake(params, quant.init_qparams(spec, params), policy, ids, deterministic=True)
  np.testing.assert_allclose(np.asarray(packed.apply(ids, deterministic=True)), np.asarray(want),
                             rtol=1e-4, atol=1e-5)
