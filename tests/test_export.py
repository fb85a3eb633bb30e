"""Packed export of mixed-precision policies: bytes, column blocks, agreement with the
fake-quantized model, and the file (safetensors, read by the `safetensors` package)."""

from __future__ import annotations

import dataclasses
import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_BERT
from mpqbert import export, files, kernels, models, quant

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
  loaded = export.load_packed(export.save_packed(packed, tmp_path / "mixed.safetensors"))
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
  policy, ids, kwargs, fake, packed, packed_bytes = _packed_under(
      bits, plan, model, params, spec, config, activation_bits)

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

  path = export.save_packed(packed, tmp_path / "one_bit.safetensors")
  loaded = export.load_packed(path)
  served = _served(loaded, ids, **kwargs)
  np.testing.assert_allclose(np.asarray(served), np.asarray(fake), rtol=1e-4, atol=1e-5)
  if binary_ffn_inputs and activation_bits == 8:
    # The same through the Pallas kernels themselves (interpreted; "auto" on CPU runs their jnp
    # references): packed_matmul at 8, 3, 2 and 1 bits and xnor_matmul end to end.
    interpreted = jax.jit(lambda p, ids: p.apply(ids, backend="interpret", **kwargs))(loaded, ids)
    np.testing.assert_allclose(np.asarray(interpreted), np.asarray(fake), rtol=1e-4, atol=1e-5)
    # Laid out once in whole 16-row tiles (as on a GPU): 3-bit codes at K=32 take 4 compact word
    # rows, 16 laid out; the xnor block keeps its sign words. The same logits, interpreted.
    laid = export.lay_out_for_kernels(loaded, backend="interpret")
    assert laid.layout_tile == 16
    assert loaded.matrices[paths[0]]["b3/words"].shape[0] == 4
    assert laid.matrices[paths[0]]["b3/words"].shape[0] == 16
    assert laid.matrices[ffn_out]["b1/words"].shape == loaded.matrices[ffn_out]["b1/words"].shape
    served_laid = jax.jit(lambda p, ids: p.apply(ids, backend="interpret", **kwargs))(laid, ids)
    np.testing.assert_allclose(np.asarray(served_laid), np.asarray(fake), rtol=1e-4, atol=1e-5)
    assert export.lay_out_for_kernels(loaded, backend="reference") is loaded
    with pytest.raises(TypeError, match="laid out for the kernels"):
      export.save_packed(laid, tmp_path / "laid_out.safetensors")
    with pytest.raises(ValueError, match="lay_out_for_kernels"):
      export.lay_out(laid, "int8")
  # In the file, as the safetensors package reads it, the packed matrices take these bytes too.
  assert _matrix_bytes(_tensors_of_file(path, packed)) == packed_bytes


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
  policy, ids, kwargs, fake, packed, packed_bytes = _packed_under(
      bits, plan, model, params, spec, config, activation_bits)

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

  path = export.save_packed(packed, tmp_path / "uneven.safetensors")
  served = _served(export.load_packed(path), ids, **kwargs)
  np.testing.assert_allclose(np.asarray(served), np.asarray(fake), rtol=1e-4, atol=1e-5)
  assert _matrix_bytes(_tensors_of_file(path, packed)) == packed_bytes


def _packed_under(bits, plan, model, params, spec, config, activation_bits):
  """The policy of `bits`, and the fake-quantized and packed models under it; checks that size_mb
  counts the packed words, so the bytes on disk are the reported size (3-bit included), both
  against a count by hand. Returns (policy, ids, kwargs, fake logits, packed, packed bytes)."""
  policy = quant.Policy(bits={p: jnp.asarray(b) for p, b in bits.items()},
                        matrices=tuple(plan.values()), activation_bits=activation_bits).validate()
  ids, kwargs, fake, packed = _fake_and_packed(model, params, spec, policy, config,
                                               activation_bits)
  packed_bytes = _packed_bytes_by_hand(policy)
  assert quant.size_report(params, policy,
                           layout=models.BERT_LAYOUT)["size_mb"] * 2**20 == packed_bytes
  assert export.packed_nbytes(packed, part="matrices") == packed_bytes
  return policy, ids, kwargs, fake, packed, packed_bytes


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


def test_matrices_a_policy_leaves_out_stay_float32_in_training_size_and_export(tmp_path):
  """A half-precision policy (other_bits 16) that quantizes only the FFN input matrices: the
  attention matrices it leaves out are float32 in the export and its file, as the fake-quantized
  model keeps them and as `size_mb` counts them; biases and LayerNorms are float16. Bytes counted
  by hand."""
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
  tensors = _tensors_of_file(export.save_packed(packed, tmp_path / "half.safetensors"), packed)
  assert _matrix_bytes(tensors) == ffn_in + float_matrices
  assert tensors["params/" + query].dtype == np.float32
  assert tensors["params/bert/encoder/layer/0/attention/self/query/bias"].dtype == np.float16
  fake = quant.transform(model.apply, spec)
  ids = jnp.asarray(np.random.default_rng(4).integers(1000, 5000, (4, 10)), jnp.int32)
  want = fake(params, quant.init_qparams(spec, params), policy, ids, deterministic=True)
  np.testing.assert_allclose(np.asarray(packed.apply(ids, deterministic=True)), np.asarray(want),
                             rtol=1e-4, atol=1e-5)


def _named_arrays(packed: export.PackedModel) -> dict[str, np.ndarray]:
  """The arrays of a packed model under their names in the file (`params/<path>`,
  `matrices/<kernel path>/<name>`, `tables/<table path>/<name>`), as the module docstring says."""
  named = {f"params/{p}": v for p, v in quant.flatten_params(packed.params).items()}
  for kind, tree in (("matrices", packed.matrices), ("tables", packed.tables)):
    named.update({f"{kind}/{p}/{k}": v for p, entry in tree.items() for k, v in entry.items()})
  return {k: np.asarray(v) for k, v in named.items()}


def _tensors_of_file(path, packed: export.PackedModel) -> dict[str, np.ndarray]:
  """The tensors of a packed file as the `safetensors` package alone reads them, checked: every
  array of `packed` under its name, equal and of its dtype; the metadata's policy, config and
  num_labels those of `packed`; the file its header and these tensors' bytes, nothing more."""
  safetensors = pytest.importorskip("safetensors")
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  tensors = load_file(str(path))
  want = _named_arrays(packed)
  assert set(tensors) == set(want)
  for name, value in want.items():
    assert tensors[name].dtype == value.dtype, name
    np.testing.assert_array_equal(tensors[name], value, err_msg=name)
  with safetensors.safe_open(str(path), framework="numpy") as f:
    metadata = f.metadata()
  assert metadata["format"] == "mpqbert-packed/3"
  assert quant.Policy.from_json(json.loads(metadata["policy"])) == packed.policy
  assert models.BertConfig(**json.loads(metadata["config"])) == packed.config
  assert json.loads(metadata["num_labels"]) == packed.num_labels
  raw = path.read_bytes()
  header = 8 + int.from_bytes(raw[:8], "little")  # the length prefix, then the JSON header
  assert header % 8 == 0 and raw[8:9] == b"{"
  assert len(raw) - header == sum(v.nbytes for v in tensors.values())
  return tensors


def _matrix_bytes(tensors: dict[str, np.ndarray]) -> int:
  """Bytes of a packed file's encoder matrices (what `size_mb` counts): the packed ones without
  their input step sizes, and those the policy leaves out, kept under params/."""
  return sum(v.nbytes for k, v in tensors.items()
             if (k.startswith("matrices/") and not k.endswith("/act_scale"))
             or (k.startswith("params/") and models.BERT_LAYOUT.is_matrix(k[len("params/"):])))


@functools.cache
def _index_packed() -> export.PackedModel:
  """A small packed model of every stored kind: 4-bit index matrices on 8-bit inputs (words,
  scale, zero point, act_scale), int8 index embedding tables with their scale and zero point,
  float16 other parameters."""
  config = models.BertConfig(**TINY_BERT)
  params = models.init_params(models.build_model(config, 2), seed=1)
  spec = models.bert_encoder_spec(quantizer="index", groups=2, bit_choices=(4,),
                                 activation_bits=8)
  policy = dataclasses.replace(
      quant.uniform_policy(spec.plan(params), 4, embedding_bits=8, activation_bits=8),
      embedding_quantizer="index", other_bits=16).validate()
  return export.export_packed(params, policy, quant.init_qparams(spec, params), config=config,
                              num_labels=2)


def _assert_same_model(got: export.PackedModel, want: export.PackedModel) -> None:
  assert jax.tree.structure(got) == jax.tree.structure(want)  # policy, config, num_labels too
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)


def test_packed_file_is_safetensors_with_every_kind_of_array(tmp_path):
  """int8 tables, float16 parameters, index matrices: the safetensors package reads them all, and
  load_packed gives the model back. The write leaves no temporary file; only .safetensors names
  are written."""
  packed = _index_packed()
  path = export.save_packed(packed, tmp_path / "out" / "m.safetensors")
  tensors = _tensors_of_file(path, packed)
  assert {v.dtype for v in tensors.values()} == {np.dtype(t) for t in ("uint32", "float32",
                                                                       "float16", "int8")}
  assert any(k.startswith("tables/") for k in tensors)
  assert [p.name for p in path.parent.iterdir()] == ["m.safetensors"]
  _assert_same_model(export.load_packed(path), packed)
  with pytest.raises(ValueError, match=r"name the file \*\.safetensors"):
    export.save_packed(packed, tmp_path / "m.npz")


def test_old_npz_packed_files_still_load(tmp_path):
  """A packed file of the earlier format, written here with np.savez (the arrays under the same
  names, the metadata as JSON in a uint8 `__meta__` entry), loads as the model it holds, whatever
  its name: the reader tells the formats apart by content."""
  packed = _index_packed()
  meta = json.dumps({"format": "mpqbert-packed/3", "policy": packed.policy.to_json(),
                     "config": packed.config.to_dict(), "num_labels": packed.num_labels})
  for name in ("old.npz", "renamed.safetensors"):
    with (tmp_path / name).open("wb") as f:
      np.savez(f, __meta__=np.frombuffer(meta.encode(), np.uint8), **_named_arrays(packed))
    _assert_same_model(export.load_packed(tmp_path / name), packed)


def test_torn_packed_files_raise_a_clear_error(tmp_path):
  """A file cut short (in the length prefix, the header or the data), with bytes after its
  tensors, or whose header leaves a hole in the data raises a ValueError naming the file and
  the fix."""
  raw = export.save_packed(_index_packed(), tmp_path / "m.safetensors").read_bytes()
  header = 8 + int.from_bytes(raw[:8], "little")
  cases = {"length": raw[:5], "header": raw[:header // 2], "data": raw[:header + 100],
           "end": raw[:-1], "trailing": raw + b"\0" * 8}
  # By hand: one F32 tensor at bytes [4, 8) of 8 bytes of data, [0, 4) covered by none.
  hole = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}).encode()
  cases["hole"] = len(hole).to_bytes(8, "little") + hole + bytes(8)
  for name, data in cases.items():
    torn = tmp_path / f"{name}.safetensors"
    torn.write_bytes(data)
    with pytest.raises(ValueError, match=re.escape(f"{torn} is not a complete safetensors file")
                       + ".*export again"):
      export.load_packed(torn)


def test_safetensors_files_agree_with_the_safetensors_package(tmp_path):
  """`files.write_safetensors` of every dtype NumPy and safetensors share (0-d, empty,
  big-endian and strided arrays too) reads back through the package, and the package's files
  through `files.read_safetensors`; bfloat16 is stored as the top 16 bits of float32."""
  numpy_io = pytest.importorskip("safetensors.numpy")
  rng = np.random.default_rng(0)
  arrays = {t: rng.integers(-3, 100, (2, 3)).astype(t) for t in (
      "float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint64", "uint32",
      "uint16", "uint8", "bool")}
  arrays.update({"scalar": np.asarray(2.5, np.float32), "empty": np.zeros((0, 3), np.int32)})
  metadata = {"note": "ü, a str"}
  # Only ours: the package's numpy writer stores a strided array's memory, not its values.
  strided = np.arange(12, dtype=np.int16).reshape(3, 4).T
  ours = files.write_safetensors(tmp_path / "ours.safetensors", {
      **arrays, "big_endian": np.arange(3, dtype=">u4"), "strided": strided}, metadata)
  got = numpy_io.load_file(str(ours))
  numpy_io.save_file(arrays, str(tmp_path / "theirs.safetensors"), metadata=metadata)
  theirs, their_metadata = files.read_safetensors(tmp_path / "theirs.safetensors")
  assert their_metadata == metadata
  np.testing.assert_array_equal(got.pop("big_endian"), [0, 1, 2])
  np.testing.assert_array_equal(got.pop("strided"), strided)
  for read in (got, theirs):
    assert set(read) == set(arrays)
    for name, value in arrays.items():
      assert read[name].dtype == value.dtype and read[name].shape == value.shape, name
      np.testing.assert_array_equal(read[name], value)

  values = np.asarray([1.5, -2.0, 3.140625], np.float32)
  raw = files.write_safetensors(tmp_path / "bf16.safetensors",
                                {"x": values.astype(jnp.bfloat16)}, {}).read_bytes()
  header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
  assert header["x"] == {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}
  assert raw[-6:] == (values.view(np.uint32) >> 16).astype("<u2").tobytes()


def test_nudge_last_bit_moves_each_nonzero_float32_by_one_ulp_and_keeps_signs():
  from mpqbert.methods.export_run import nudge_last_bit
  rng = np.random.default_rng(0)
  w = rng.normal(size=(64, 32)).astype(np.float32)
  w[0, :8] = 0.0
  w[1, :4] = [np.finfo(np.float32).tiny, -1.0, 2.0, 1e-45]  # a normal, powers of two, a denormal
  params = {"dense": {"kernel": w, "bias": np.zeros(32, np.float32)},
            "ids": np.arange(5, dtype=np.int32)}
  nudged = nudge_last_bit(params, seed=1)
  # The reference: neighbouring float32 values of one sign are neighbouring int32 bit patterns.
  steps = nudged["dense"]["kernel"].view(np.int32).astype(np.int64) - w.view(np.int32)
  nonzero = w != 0
  assert set(np.unique(steps[nonzero])) == {-1, 1}
  assert np.all(steps[~nonzero] == 0) and np.all(nudged["dense"]["bias"] == 0)
  assert np.all(nudged["dense"]["kernel"] * w >= 0)  # no value crosses zero: sign(w) stays
  np.testing.assert_array_equal(nudged["ids"], params["ids"])
  assert not np.array_equal(steps, nudge_last_bit(params, seed=2)["dense"]["kernel"].view(
      np.int32).astype(np.int64) - w.view(np.int32))


def test_prediction_agreement_counts_equal_labels_or_close_scores():
  from mpqbert import data
  from mpqbert.methods.export_run import prediction_agreement
  labels = prediction_agreement(data.get_task("sst2"), np.array([0, 1, 1, 0]),
                                np.array([0, 1, 0, 0]))
  assert labels == {"agreement": 0.75}
  scores = prediction_agreement(data.get_task("stsb"), np.array([1.0, 2.0, 3.0, 4.0], np.float32),
                                np.array([1.04, 2.06, 3.0, 3.5], np.float32))
  assert scores["agreement"] == 0.5 and scores["max_abs_diff"] == pytest.approx(0.5)
