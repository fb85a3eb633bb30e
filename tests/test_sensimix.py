"""SensiMix: its quantizers, ABWR, the PT / ILF schedule, size accounting, export and pipeline."""

from __future__ import annotations

import json
import math
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from conftest import TINY_BERT, load_module
from mpqbert import export, kernels, models, quant
from mpqbert.methods import sensimix as sm


MINILM = models.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                           num_attention_heads=12, intermediate_size=1536,
                           max_position_embeddings=512)


def _abstract_params(config: models.BertConfig, num_labels: int = 2):
  model = models.build_model(config, num_labels)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))[
      "params"]


# ------------------------------------------------------------------------------- quantizers


def test_index_quantization_round_trip_is_within_half_a_step_on_the_int8_range():
  w = jnp.asarray(np.random.default_rng(0).normal(size=(64, 48)) * 0.05, jnp.float32)
  lo, hi = quant.minmax_range(w, 1)
  w_hat = quant.quantize_index(w, lo, hi, 8)
  step = float(hi[0] - lo[0]) / 255
  assert float(jnp.max(jnp.abs(w_hat - w))) <= step / 2 * (1 + 1e-5)
  codes = quant.grid.index(w, lo, hi, 8).int_codes()  # what the packed export stores
  # idx = round((w - min) * 255 / (max - min)), by hand in float64.
  w64, lo64, hi64 = np.asarray(w, np.float64), float(lo[0]), float(hi[0])
  hand = np.round((w64 - lo64) * 255 / (hi64 - lo64))
  assert np.abs(np.asarray(codes, np.float64) - hand).max() <= 1  # ties may round either way
  assert np.mean(np.asarray(codes) == hand) > 0.999
  assert int(codes.min()) == 0 and int(codes.max()) == 255  # min and max are exact codes
  flat = np.asarray(w).ravel()
  assert np.asarray(codes).ravel()[flat.argmin()] == 0
  assert np.asarray(codes).ravel()[flat.argmax()] == 255
  # Stored as packed 8-bit codes with scale (hi - lo) / 255 and zero point -lo / scale.
  scale = jnp.repeat((hi - lo) / 255, 48)
  dequantized = kernels.dequantize(kernels.pack(codes, 8, signed=False), scale, bits=8, k=64,
                                   signed=False, zero_points=jnp.repeat(-lo, 48) / scale)
  np.testing.assert_allclose(np.asarray(dequantized), np.asarray(w_hat), rtol=0, atol=step * 1e-3)


def test_binary_weights_and_inputs_forward_values_and_ste_gradient():
  w = jnp.array([[0.3, -0.2], [-1.5, 0.0]], jnp.float32)
  np.testing.assert_array_equal(quant.binarize_sign(w), [[1, -1], [-1, 1]])
  grad = jax.grad(lambda w: jnp.sum(quant.binarize_sign(w) * jnp.array([[1., 2.], [3., 4.]])))(w)
  np.testing.assert_array_equal(grad, [[1, 2], [0, 4]])  # |w| > 1 gets no gradient

  # Through the transform, a 1-bit FFN with 1-bit inputs computes sign(x) . sign(W) + b.
  params = models.init_params(models.build_model(models.BertConfig(**TINY_BERT), 2), seed=0)
  spec = sm.sensimix_spec([0], [1], embedding_bits=32)
  plan = spec.plan(params)
  binary = [p for p, m in plan.items() if m.quantizer == "sign"]
  assert binary == ["bert/encoder/layer/1/intermediate/dense/kernel",
                    "bert/encoder/layer/1/output/dense/kernel"]
  assert all(plan[p].activation_bits == 1 for p in binary)
  policy = sm.fixed_policy(spec, params, other_bits=16)
  qapply = quant.transform(models.build_model(models.BertConfig(**TINY_BERT), 2).apply, spec)
  seen = {}

  def capture(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and "/".join(context.module.path) == \
        "bert/encoder/layer/1/intermediate/dense":
      seen["x"], seen["y"] = args[0], out
    return out

  ids = jnp.asarray(np.random.default_rng(1).integers(1000, 2000, (2, 8)), jnp.int32)
  with nn.intercept_methods(capture):
    qapply(params, quant.init_qparams(spec, params), policy, ids,
           attention_mask=jnp.ones_like(ids), token_type_ids=jnp.zeros_like(ids),
           deterministic=True)
  layer = params["bert"]["encoder"]["layer"]["1"]["intermediate"]["dense"]
  x_sign = np.where(np.asarray(seen["x"], np.float64) >= 0, 1.0, -1.0)
  w_sign = np.where(np.asarray(layer["kernel"], np.float64) >= 0, 1.0, -1.0)
  hand = x_sign @ w_sign + np.asarray(layer["bias"], np.float64)
  np.testing.assert_allclose(np.asarray(seen["y"]), hand, atol=1e-4)


@pytest.mark.parametrize("clip", [None, 1.0])
def test_binarized_input_gradient_is_straight_through_unless_clipped(clip):
  # A one-matrix model: y = sign(x) @ sign(W) + b. The input's gradient is g @ sign(W)^T where
  # the rule passes it: everywhere (None, SensiMix's code) or only where |x| <= clip.
  spec = quant.QuantSpec(rules=(quant.Rule(pattern="kernel$", quantizer="sign", bit_choices=(1,),
                                           activation_bits=1),),
                         activation_bits=quant.FULL_PRECISION, binary_input_clip=clip,
                         layout=models.BERT_LAYOUT)
  dense = models.QuantizableDense(3)
  x = jnp.array([[0.5, -3.0, 2.0, -0.25]], jnp.float32)
  params = dense.init(jax.random.PRNGKey(0), x)["params"]
  policy = sm.fixed_policy(spec, params, other_bits=32)
  qapply = quant.transform(lambda v, x: dense.apply(v, x), spec)
  qparams = quant.init_qparams(spec, params)
  cotangent = np.array([[1.0, -2.0, 0.5]])
  grad = jax.grad(lambda x: jnp.sum(qapply(params, qparams, policy, x) * cotangent))(x)
  w_sign = np.where(np.asarray(params["kernel"], np.float64) >= 0, 1.0, -1.0)
  hand = cotangent @ w_sign.T
  if clip is not None:
    hand = np.where(np.abs(np.asarray(x)) <= clip, hand, 0.0)
  np.testing.assert_allclose(np.asarray(grad), hand, rtol=1e-6)
  with pytest.raises(ValueError, match="binary_input_clip"):
    quant.QuantSpec(rules=spec.rules, binary_input_clip=0.0, layout=models.BERT_LAYOUT)


def test_xnor_popcount_matmul_matches_float64_sign_products():
  rng = np.random.default_rng(2)
  for k in (1, 31, 32, 33, 384, 1000):
    a, b = rng.normal(size=(5, k)), rng.normal(size=(300, k))
    a[0, 0] = 0.0  # sign(0) = +1 on both sides
    got = kernels.xnor_matmul(kernels.pack_signs(jnp.asarray(a)),
                              kernels.pack_signs(jnp.asarray(b.T), axis=0), k)
    want = np.where(a >= 0, 1.0, -1.0) @ np.where(b >= 0, 1.0, -1.0).T
    np.testing.assert_array_equal(np.asarray(got), want.astype(np.int32))
  with pytest.raises(ValueError, match="words per row"):
    kernels.xnor_matmul(jnp.zeros((2, 2), jnp.uint32), jnp.zeros((2, 1), jnp.uint32), 100)


def test_abwr_value_and_gradient_by_hand():
  params = {"a": {"kernel": jnp.array([[0.5, -2.0], [0.25, 1.0]])},
            "b": {"kernel": jnp.array([[3.0, -0.5, 0.0]])}}
  # a: ((0.5)^2 + 1^2 + 0.75^2 + 0) / 4 = 0.453125; b: (4 + 0.25 + 1) / 3 = 1.75
  value = sm.abwr(params, ["a/kernel", "b/kernel"])
  assert float(value) == pytest.approx(0.453125 + 1.75)
  grads = jax.grad(sm.abwr)(params, ["a/kernel", "b/kernel"])
  # d/dw mean((|w| - 1)^2) = 2 (|w| - 1) sign(w) / n, with sign(0) = +1 as the binarizer's:
  # a zero weight is pulled toward +1, the value it binarizes to.
  np.testing.assert_allclose(grads["a"]["kernel"], [[-0.25, -0.5], [-0.375, 0.0]])
  np.testing.assert_allclose(grads["b"]["kernel"], [[4 / 3, 1 / 3, -2 / 3]], rtol=1e-6)


# ------------------------------------------------------------------------------- schedule


def test_pt_and_ilf_schedule_and_which_matrices_are_binary_at_each_stage():
  full = sm.stage_schedule([3, 4, 5], prioritized=True, inverse_layerwise=True)
  assert full == [(), (5,), (4, 5), (3, 4, 5)]
  assert sm.stage_schedule([3, 4, 5], prioritized=False, inverse_layerwise=True) == [
      (5,), (4, 5), (3, 4, 5)]
  assert sm.stage_schedule([3, 4, 5], prioritized=True, inverse_layerwise=False) == [
      (), (3, 4, 5)]
  assert sm.stage_schedule([3, 4, 5], prioritized=False, inverse_layerwise=False) == [(3, 4, 5)]
  assert sm.stage_schedule([], prioritized=True, inverse_layerwise=True) == [()]
  assert sm.split_budget(10, 4) == [3, 3, 2, 2]
  # One step each, then the rest by shares 1 : 1 : 1 : 3: 1 + 396 // 6 = 67 and 1 + 198 = 199.
  assert sm.split_budget(400, 4, final_shares=3) == [67, 67, 67, 199]
  assert sm.split_budget(7, 2, final_shares=3) == [3, 4]  # 1 + 5 // 4, 1 + 15 // 4, +1 first
  assert sm.split_budget(4, 4, final_shares=3) == [1, 1, 1, 1]
  with pytest.raises(ValueError, match="cannot cover 4"):
    sm.split_budget(3, 4)

  params = _abstract_params(MINILM)
  for binary_now in full:
    plan = sm.sensimix_spec([0, 1, 2], binary_now).plan(params)
    by_kind = {}
    for path, m in plan.items():
      layer = int(path.split("/")[3])
      ffn = "attention" not in path
      by_kind.setdefault((layer, ffn), set()).add((m.quantizer, m.bit_choices))
    for layer in range(6):
      assert by_kind[(layer, False)] == {("index", (8,))}  # attention: always 8-bit
      if layer < 3:
        assert by_kind[(layer, True)] == {("index", (8,))}
      elif layer in binary_now:
        assert by_kind[(layer, True)] == {("sign", (1,))}
      else:
        assert (layer, True) not in by_kind  # PT: still float
  with pytest.raises(ValueError, match="both 8-bit and binary"):
    sm.sensimix_spec([2, 3], [3])


def test_three_plus_three_size_accounting_by_hand():
  params = _abstract_params(MINILM)
  spec = sm.sensimix_spec([0, 1, 2], [3, 4, 5])
  report = quant.size_report(params, sm.fixed_policy(spec, params, other_bits=16),
                             layout=models.BERT_LAYOUT)
  h, f = 384, 1536
  attention = 6 * 4 * (h * h * 8 + 2 * 32)  # 8-bit index + (min, max) per matrix
  ffn_8bit = 3 * 2 * (h * f * 8 + 2 * 32)
  ffn_1bit = 3 * 2 * h * f  # 1 bit, no scale
  assert report["size_mb"] * 8 * 2**20 == attention + ffn_8bit + ffn_1bit
  fp32 = 6 * (4 * h * h + 2 * h * f) * 32
  assert report["compression"] == pytest.approx(fp32 / (attention + ffn_8bit + ffn_1bit))
  assert report["avg_bits"] == pytest.approx((6 * 4 * h * h * 8 + 3 * 2 * h * f * 8 +
                                              3 * 2 * h * f) / (6 * (4 * h * h + 2 * h * f)))
  # Word and position tables 8-bit index + (min, max); the rest in half precision.
  tables = (30522 + 512) * h * 8 + 2 * 2 * 32
  rest = (2 * h  # token types
          + 2 * h  # embedding LayerNorm
          + 6 * (4 * h + f + h + 2 * 2 * h)  # biases of Q K V O, FFN in, FFN out; 2 LayerNorms
          + h * h + h  # pooler
          + h * 2 + 2) * 16  # classifier
  assert report["size_mb_other"] * 8 * 2**20 == tables + rest
  assert report["size_mb_total"] == report["size_mb"] + report["size_mb_other"]
  all_weights = sum(math.prod(v.shape) for v in jax.tree.leaves(params))
  assert report["compression_total"] == pytest.approx(
      all_weights * 32 / (attention + ffn_8bit + ffn_1bit + tables + rest))


def test_auto_split_takes_the_least_sensitive_layers_up_to_the_target():
  size = lambda layers: 10.0 - 2.0 * len(layers)
  sensitivity = {0: 0.9, 1: 0.1, 2: 0.5, 3: 0.05, 4: 0.3, 5: 0.2}
  assert sm.choose_binary_layers(sensitivity, size, 4.0) == (1, 3, 5)
  assert sm.choose_binary_layers(sensitivity, size, 10.0) == ()
  with pytest.raises(ValueError, match="raise sensimix.target_size_mb"):
    sm.choose_binary_layers(sensitivity, size, -5.0)  # all six leave -2


# ------------------------------------------------------------------------------- export


def test_xnor_scale_makes_float_and_popcount_products_equal_bit_for_bit():
  rng = np.random.default_rng(3)
  k, n, groups = 1536, 96, 12
  w = jnp.asarray(rng.normal(size=(k, n)) * 0.03, jnp.float32)
  x = jnp.asarray(rng.normal(size=(16, k)), jnp.float32)
  alpha = quant.xnor_scale(w, groups)
  np.testing.assert_allclose(alpha, np.abs(np.asarray(w)).reshape(k, groups, -1).mean((0, 2)),
                             rtol=2**-11)
  per_column = jnp.repeat(alpha, n // groups)
  float_product = quant.binarize_sign(x) @ quant.binarize_xnor(w, groups)
  popcount = kernels.xnor_matmul(kernels.pack_signs(x), kernels.pack_signs(w, axis=0), k)
  np.testing.assert_array_equal(np.asarray(float_product),
                                np.asarray(popcount.astype(jnp.float32) * per_column))


@pytest.mark.parametrize("binary_scale,ffn_input_bits", [(False, 1), (True, 1), (True, 8)])
def test_packed_model_agrees_with_the_fake_quantized_model(tmp_path, binary_scale,
                                                           ffn_input_bits):
  config = models.BertConfig(**TINY_BERT)
  model = models.build_model(config, 3)
  params = models.init_params(model, seed=4)
  # ABWR-like weights around +-1 in the binary FFN, so its outputs are not all tiny.
  params = jax.tree_util.tree_map_with_path(
      lambda path, v: v * 30 if "layer/1/intermediate" in jax.tree_util.keystr(path) else v,
      params)
  spec = sm.sensimix_spec([0], [1], binary_scale=binary_scale, binary_groups=4,
                          ffn_input_bits=ffn_input_bits)
  policy = sm.fixed_policy(spec, params, other_bits=16)
  qparams = quant.init_qparams(spec, params)
  qapply = quant.transform(model.apply, spec)
  rng = np.random.default_rng(5)
  ids = jnp.asarray(rng.integers(1000, 5000, (64, 16)), jnp.int32)
  kwargs = dict(attention_mask=jnp.ones_like(ids), token_type_ids=jnp.zeros_like(ids),
                deterministic=True)
  if ffn_input_bits < 32:
    _, qparams = qapply(params, qparams, policy, ids, update_act_stats=True, **kwargs)
  fake = qapply(params, qparams, policy, ids, **kwargs)

  packed = export.export_packed(params, policy, qparams)
  report = quant.size_report(params, policy, layout=models.BERT_LAYOUT)
  assert export.packed_nbytes(packed) == report["size_mb_total"] * 2**20
  path = export.save_packed(packed, tmp_path / "packed.safetensors")
  # The file: safetensors' length prefix and JSON header, then the arrays and input step sizes.
  header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
  act_scales = sum(np.asarray(e["act_scale"]).nbytes for e in packed.matrices.values()
                   if "act_scale" in e)
  assert path.stat().st_size == header + report["size_mb_total"] * 2**20 + act_scales
  loaded = export.load_packed(path)
  served = jax.jit(lambda p, ids: export.packed_apply(model, p, ids, **kwargs))(loaded, ids)
  # On CPU (export.half_dtype float32) the packed model does the fake-quantized model's
  # arithmetic: the float16 parameters are what training saw, the XNOR products are exact; only
  # XLA's fusion of the two graphs differs, in the last bits.
  np.testing.assert_allclose(np.asarray(served), np.asarray(fake), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.argmax(served, -1), np.argmax(fake, -1))
  kinds = {p: set(entry) for p, entry in loaded.matrices.items()}
  assert kinds["bert/encoder/layer/1/output/dense/kernel"] >= {"b1/words"}
  assert kinds["bert/encoder/layer/0/output/dense/kernel"] == {"b8/words", "b8/scale", "b8/zero"}
  assert loaded.params["bert"]["embeddings"]["word_embeddings"]["embedding"].dtype == jnp.int8


# ---------------------------------------------------------------- the authors' code, as options


def _tiny_forward(apply_fn, spec, params, ids, **extra):
  qapply = quant.transform(apply_fn, spec)
  policy = sm.fixed_policy(spec, params, other_bits=32)
  return qapply(params, quant.init_qparams(spec, params), policy, ids,
                attention_mask=jnp.ones_like(ids), token_type_ids=jnp.zeros_like(ids),
                deterministic=True, **extra)


def _numpy_ffn_block(attended, layer, *, binarize_residual):
  """LayerNorm(W2 sign(gelu(W1 sign(a) + b1)) + b2 + r) in float64, r = sign(a) or a."""
  sign = lambda x: np.where(x >= 0, 1.0, -1.0)
  f64 = lambda x: np.asarray(x, np.float64)
  a = f64(attended)
  h = sign(a) @ f64(layer["intermediate"]["dense"]["kernel"]) + f64(
      layer["intermediate"]["dense"]["bias"])
  h = 0.5 * h * (1 + scipy.special.erf(h / np.sqrt(2)))
  y = sign(h) @ f64(layer["output"]["dense"]["kernel"]) + f64(layer["output"]["dense"]["bias"])
  y = y + (sign(a) if binarize_residual else a)
  mean, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
  norm = layer["output"]["LayerNorm"]
  return (y - mean) / np.sqrt(var + 1e-12) * f64(norm["scale"]) + f64(norm["bias"])


@pytest.mark.parametrize("binarize_residual", [False, True])
def test_early_sign_inputs_and_the_binarized_residual_match_numpy(binarize_residual):
  """Layer 1's FFN keeps float weights (PT) but takes sign inputs; with the authors' residual
  bug the block adds sign(a) instead of its input a."""
  config = models.BertConfig(**TINY_BERT)
  model = models.build_model(config, 2)
  params = models.init_params(model, seed=3)
  ids = jnp.asarray(np.random.default_rng(0).integers(1000, 5000, (4, 8)), jnp.int32)
  apply_fn = sm.authors_code_apply(model.apply, sign_input_layers=[1],
                                   sign_residual_layers=[1] if binarize_residual else [])
  spec = sm.sensimix_spec([0], [])  # Layer 1's FFN unplanned: float weights.
  _, state = _tiny_forward(apply_fn, spec, params, ids, capture_intermediates=True,
                           mutable=["intermediates"])
  layer1 = state["intermediates"]["bert"]["encoder"]["layer"]["1"]
  attended, out = layer1["attention"]["__call__"][0], layer1["__call__"][0]
  expected = _numpy_ffn_block(attended, params["bert"]["encoder"]["layer"]["1"],
                              binarize_residual=binarize_residual)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=2e-4, atol=2e-4)


def test_frozen_signs_get_no_task_gradient_and_the_one_sided_clip_passes_below_minus_one():
  config = models.BertConfig(**TINY_BERT)
  model = models.build_model(config, 2)
  params = models.init_params(model, seed=5)
  kernel = "bert/encoder/layer/1/intermediate/dense/kernel"
  grid = jnp.tile(jnp.array([-1.5, -0.5, 0.5, 1.5], jnp.float32), 32 * 64 // 4).reshape(32, 64)
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: grid if jax.tree_util.keystr(p).replace("']['", "/").strip("[']") == kernel
      else v, params)
  ids = jnp.asarray(np.random.default_rng(1).integers(1000, 5000, (4, 8)), jnp.int32)
  spec = sm.sensimix_spec([0], [1])
  weights = jnp.asarray(np.random.default_rng(2).normal(size=(4, 2)), jnp.float32)

  def grad_of(apply_fn):
    loss = lambda p: jnp.sum(_tiny_forward(apply_fn, spec, p, ids) * weights)
    g = jax.grad(loss)(params)
    return np.asarray(g["bert"]["encoder"]["layer"]["1"]["intermediate"]["dense"]["kernel"]), \
        float(loss(params))

  two, loss_two = grad_of(model.apply)
  one, loss_one = grad_of(sm.authors_code_apply(model.apply, one_sided_kernels=[kernel]))
  frozen, loss_frozen = grad_of(sm.authors_code_apply(model.apply, frozen_kernels=[kernel]))
  assert loss_one == loss_two == loss_frozen  # Same forward: only gradients differ.
  w = np.asarray(grid)
  assert np.all(two[w > 1] == 0) and np.all(two[w < -1] == 0)  # |w| <= 1 only
  assert np.all(one[w > 1] == 0) and np.any(one[w < -1] != 0)  # w <= 1
  np.testing.assert_array_equal(one[np.abs(w) <= 1], two[np.abs(w) <= 1])
  assert np.any(two != 0) and np.all(frozen == 0)


# ------------------------------------------------------------------------------- pipeline


def test_sensimix_pipeline_on_a_tiny_bert(tmp_path, tiny_model_dir, glue_dir):
  from test_pipelines import _finish, _flags, _launch
  flags = _flags(tiny_model_dir, glue_dir, **{"sensimix.num_8bit_layers": 1,
                                              "train.num_train_steps": 12})
  for key in [k for k in flags if k.startswith(("search.", "hessian.", "quant."))]:
    flags.pop(key)
  out = _finish(_launch("sensimix", tmp_path / "fixed", flags))
  result = json.loads((tmp_path / "fixed" / "results.json").read_text())
  assert "sensimix" in out and result["method"] == "sensimix"
  assert [s["binary_layers"] for s in result["stages"]] == [[], [1]]
  # 12 steps at 1 : 3 (final_stage_shares): 1 + 10 // 4 (+1 remainder) and 1 + 30 // 4.
  assert [s["steps"] for s in result["stages"]] == [4, 8] and result["steps"] == 12
  params = _abstract_params(models.BertConfig(**TINY_BERT))
  spec = sm.sensimix_spec([0], [1])
  hand = quant.size_report(params, sm.fixed_policy(spec, params, other_bits=16),
                           layout=models.BERT_LAYOUT)
  assert result["size_mb"] == pytest.approx(hand["size_mb"])
  assert result["export"]["array_bytes"] == pytest.approx(result["size_mb_total"] * 2**20)
  assert result["export"]["agreement"] >= 0.995
  for stage in ("stage0", "stage1"):  # ABWR on the FFN to binarize, from PT on
    metrics = [json.loads(l) for l in (tmp_path / "fixed" / stage / "metrics.jsonl")
               .read_text().splitlines()]
    assert any(m.get("regularizer", 0) > 0 for m in metrics), stage
  assert (tmp_path / "fixed" / "bit_map.png").stat().st_size > 0

  # A run stopped after the PT stage resumes from its checkpoint and ends as the first did.
  for name in ("results.json", "export.json", "packed.safetensors", "policy.json"):
    (tmp_path / "fixed" / name).unlink()
  shutil.rmtree(tmp_path / "fixed" / "stage1")
  _finish(_launch("sensimix", tmp_path / "fixed", flags))
  resumed = json.loads((tmp_path / "fixed" / "results.json").read_text())
  assert resumed["dev"] == pytest.approx(result["dev"], rel=1e-6)
  assert resumed["export"]["agreement"] == result["export"]["agreement"]

  auto = _finish(_launch("sensimix", tmp_path / "auto", {
      **flags, "sensimix.split": "auto", "sensimix.sensitivity_batches": 1,
      "teacher.workdir": tmp_path / "fixed" / "teacher"}))
  split = json.loads((tmp_path / "auto" / "split.json").read_text())
  assert len(split["binary_layers"]) == 1 and set(split["sensitivity"]) == {"0", "1"}
  assert "sensimix" in auto


def test_stage_jump_measures_the_layers_ffn_output_and_its_residual():
  """`ffn_rms` against float64 NumPy on the tensors Flax captures: layer 1's FFN output is
  intermediate(x) @ W + b of its output dense, the residual is its attention block's output."""
  script = load_module("experiments/sensimix_stage_jump.py", "sensimix_stage_jump")
  model = models.build_model(models.BertConfig(**TINY_BERT), num_labels=1)
  params = models.init_params(model, seed=7)
  ids = jax.random.randint(jax.random.key(1), (3, 10), 0, 1000)
  batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids).at[0, 7:].set(0),
           "token_type_ids": jnp.zeros_like(ids)}

  def apply(variables, *args, **kwargs):
    return model.apply({"params": variables}, *args, **kwargs)

  got = script.ffn_rms(apply, (params,), batch, layer=1)
  _, state = model.apply({"params": params}, batch["input_ids"],
                         attention_mask=batch["attention_mask"],
                         token_type_ids=batch["token_type_ids"], deterministic=True,
                         capture_intermediates=True, mutable=["intermediates"])
  layer = state["intermediates"]["bert"]["encoder"]["layer"]["1"]
  dense = params["bert"]["encoder"]["layer"]["1"]["output"]["dense"]
  inner = np.asarray(layer["intermediate"]["__call__"][0], np.float64)
  ffn = inner @ np.asarray(dense["kernel"], np.float64) + np.asarray(dense["bias"], np.float64)
  attended = np.asarray(layer["attention"]["__call__"][0], np.float64)
  np.testing.assert_allclose(got["ffn_out_rms"], np.sqrt(np.mean(ffn ** 2)), rtol=1e-5)
  np.testing.assert_allclose(got["residual_rms"], np.sqrt(np.mean(attended ** 2)), rtol=1e-6)
  assert got["ffn_out_rms"] != pytest.approx(got["residual_rms"], rel=1e-2)
  with pytest.raises(ValueError, match="no encoder/layer/2/output"):
    script.ffn_rms(apply, (params,), batch, layer=2)
