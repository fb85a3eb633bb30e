"""Integer inference on the CPU (`export.lay_out(packed, "int8")`): one int8 Dense layer against a
float64 NumPy reference of `dequant(x_q) @ dequant(W)`, and whole tiny BERTs against the
fake-quantized model they were exported from."""

from __future__ import annotations

import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_BERT
from mpqbert import export, models, quant
from mpqbert.export import integer
from mpqbert.methods import sensimix

# Logits of two float paths compared to ~1e-5: full float32 matmuls on GPUs and TPUs too.
pytestmark = pytest.mark.usefixtures("float32_matmuls")

K, N, GROUPS = 64, 48, 6
PATH = "layer/kernel"


# ------------------------------------------------------------------ one layer, float64 reference


def _np_sign(v: np.ndarray) -> np.ndarray:
  return np.where(v >= 0, 1.0, -1.0)


def _np_symmetric_steps(w: np.ndarray, choices: tuple[int, ...]) -> np.ndarray:
  """`[len(choices), G]` float32 step sizes: 0.8 max|w| / q_pos per group (some clipping); 1 bit:
  mean|w|."""
  wg = np.abs(w.reshape(K, GROUPS, -1))
  rows = [np.ones(GROUPS) if b == 0 else wg.mean((0, 2)) if b == 1 else
          0.8 * wg.max((0, 2)) / (2**(b - 1) - 1) for b in choices]
  return np.asarray(rows, np.float32)


def _np_weight(w: np.ndarray, quantizer: str, choices: tuple[int, ...], bits: np.ndarray,
               steps: np.ndarray | None) -> np.ndarray:
  """The dequantized weight in float64 from each quantizer's definition (codes rounded in
  float32, as the model computes them); pruned sub-groups 0."""
  out = np.zeros(w.shape, np.float64)
  width = N // GROUPS
  for g, b in enumerate(bits.tolist()):
    cols = slice(g * width, (g + 1) * width)
    wg = w[:, cols]
    if b == 0:
      continue
    if quantizer == "sign":
      out[:, cols] = _np_sign(wg)
    elif quantizer == "xnor":
      out[:, cols] = np.abs(wg.astype(np.float64)).mean() * _np_sign(wg)
    elif quantizer == "index":
      lo, hi = wg.min(), wg.max()
      step = np.float32((hi - lo) / np.float32(2**b - 1))
      codes = np.round((np.clip(wg, lo, hi) - lo) / step)
      out[:, cols] = np.float64(step) * codes + np.float64(lo)
    elif b == 1:
      out[:, cols] = np.float64(steps[choices.index(1), g]) * _np_sign(wg)
    else:
      s = steps[choices.index(b), g]
      codes = np.clip(np.round(wg / s), -2**(b - 1), 2**(b - 1) - 1)
      out[:, cols] = np.float64(s) * codes
  return out


def _np_input(x: np.ndarray, input_bits: int, act_scale: np.float32) -> np.ndarray:
  """`dequant(x_q)` in float64: sign(x), or the symmetric grid of step act_scale."""
  if input_bits == 1:
    return _np_sign(x)
  codes = np.clip(np.round(x / act_scale), -2**(input_bits - 1), 2**(input_bits - 1) - 1)
  return np.float64(act_scale) * codes


LAYER_CASES = {
    # name: (quantizer, bit choices, bits per sub-group, input bits)
    "symmetric 1..8 bits, pruned, 8-bit inputs": ("symmetric", (0, 1, 2, 3, 4, 8),
                                                  [8, 0, 2, 4, 3, 1], 8),
    "symmetric, 4-bit inputs": ("symmetric", (0, 2, 4), [4, 4, 2, 0, 2, 4], 4),
    "index with zero points, 8-bit codes shifted": ("index", (0, 2, 4, 8), [8, 8, 4, 2, 0, 8], 8),
    "index, binarized inputs": ("index", (2, 8), [8, 2, 8, 8, 2, 2], 1),
    "sign weights, binarized inputs": ("sign", (1,), [1] * GROUPS, 1),
    "xnor weights, pruned, binarized inputs": ("xnor", (0, 1), [1, 1, 0, 1, 1, 1], 1),
    "symmetric 1..8 bits, pruned, binarized inputs": ("symmetric", (0, 1, 2, 3, 4, 8),
                                                      [1, 2, 0, 8, 3, 4], 1),
}


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_int8_dense_matches_float64_reference(case):
  quantizer, choices, bits, input_bits = LAYER_CASES[case]
  rng = np.random.default_rng(zlib.crc32(case.encode()))
  w = rng.normal(0, 0.05, (K, N)).astype(np.float32)
  x = rng.normal(0, 1.0, (2, 5, K)).astype(np.float32)
  bias = rng.normal(0, 0.1, (N,)).astype(np.float32)
  matrix = quant.MatrixSpec(path=PATH, shape=(K, N), groups=GROUPS, quantizer=quantizer,
                            bit_choices=choices, activation_bits=input_bits)
  bits = np.asarray(bits, np.int32)
  policy = quant.Policy(bits={PATH: jnp.asarray(bits)}, matrices=(matrix,)).validate()
  act_scale = np.float32(np.abs(x).max() / (2**(input_bits - 1) - 1) * 0.7) if input_bits > 1 \
      else np.float32(0)
  steps = _np_symmetric_steps(w, choices) if quantizer == "symmetric" else None
  qparams = {PATH: {"act_scale": jnp.asarray(act_scale),
                    **({"scale": jnp.asarray(steps)} if steps is not None else {})}}
  packed = export.export_packed({"layer": {"kernel": jnp.asarray(w)}}, policy, qparams)

  laid = integer.lay_out_matrix(packed.matrices[PATH], policy, matrix)
  assert integer.input_kind(policy, matrix, packed.matrices[PATH]) == (
      "sign" if input_bits == 1 else "int")
  kept = np.repeat(bits > 0, N // GROUPS)
  assert laid["codes"].dtype == jnp.int8 and laid["codes"].shape == (K, int(kept.sum()))
  y = integer.integer_dense(jnp.asarray(x), laid, policy, matrix, jnp.asarray(bias))

  want = (_np_input(x.astype(np.float64), input_bits, act_scale) @
          _np_weight(w, quantizer, choices, bits, steps) + bias)
  assert y.shape == want.shape and y.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
  np.testing.assert_array_equal(np.asarray(y)[..., ~kept], np.broadcast_to(bias[~kept],
                                                                          want[..., ~kept].shape))


def test_index_codes_are_centred_in_int8_with_the_shift_in_the_zero_point():
  """8-bit index codes 0..255 become -128..127; w = scale * (code - zero) is unchanged."""
  w = np.random.default_rng(0).normal(0, 0.05, (K, N)).astype(np.float32)
  matrix = quant.MatrixSpec(path=PATH, shape=(K, N), groups=GROUPS, quantizer="index",
                            bit_choices=(2, 8), activation_bits=8)
  bits = np.asarray([8, 2, 8, 8, 2, 2])
  policy = quant.Policy(bits={PATH: jnp.asarray(bits)}, matrices=(matrix,)).validate()
  entry = export.export_packed({"layer": {"kernel": jnp.asarray(w)}}, policy,
                               {PATH: {"act_scale": jnp.float32(0.5)}}).matrices[PATH]
  codes, scale, zero = integer.unpack_matrix(entry, policy, matrix)
  assert codes.min() == 0 and codes.max() == 255
  laid = integer.lay_out_matrix(entry, policy, matrix)
  shift = np.repeat(np.where(bits == 8, 128, 2), N // GROUPS)
  np.testing.assert_array_equal(np.asarray(laid["codes"]), codes - shift)
  # correction = (act_scale * scale) * (zero - shift): the shift folded into the zero point.
  np.testing.assert_allclose(np.asarray(laid["correction"]),
                             0.5 * scale * (zero - shift), rtol=1e-6)


# ------------------------------------------------------------------ whole tiny BERTs


def _tiny(seed: int = 1, num_labels: int = 2):
  config = models.BertConfig(**TINY_BERT)
  model = models.build_model(config, num_labels)
  return config, model, models.init_params(model, seed=seed)


def _mixed_symmetric(params):
  spec = models.bert_encoder_spec(groups=4, bit_choices=(0, 1, 2, 3, 4, 8), activation_bits=8,
                                 activation_mode="moving")
  plan = spec.plan(params)
  rng = np.random.default_rng(0)
  bits = {p: np.asarray(rng.choice(m.bit_choices, m.groups), np.int32) for p, m in plan.items()}
  bits[next(iter(plan))] = np.asarray([8, 0, 2, 3], np.int32)
  return spec, quant.Policy(bits={p: jnp.asarray(b) for p, b in bits.items()},
                            matrices=tuple(plan.values()), activation_bits=8).validate()


def _index_attention_binary_ffn(params):
  """Index attention matrices (2/4/8 bits, pruned sub-groups) on 8-bit inputs; FFNs 1-bit sign
  on binarized inputs; int8 index embedding tables and float16 other parameters (SensiMix's)."""
  attention = r"attention/(self/(query|key|value)|output/dense)/kernel$"
  rules = (quant.Rule(pattern=attention, quantizer="index", groups=4, bit_choices=(0, 2, 4, 8)),
           quant.Rule(pattern=r"(intermediate|output)/dense/kernel$", quantizer="sign",
                      bit_choices=(1,), activation_bits=1))
  spec = quant.QuantSpec(rules=rules, layout=models.BERT_LAYOUT, activation_bits=8,
                         activation_mode="moving", embedding_bits=8,
                         embedding_quantizer="index")
  plan = spec.plan(params)
  rng = np.random.default_rng(1)
  bits = {p: np.asarray(rng.choice(m.bit_choices, m.groups) if m.quantizer == "index"
                        else np.ones(m.groups), np.int32) for p, m in plan.items()}
  return spec, quant.Policy(bits={p: jnp.asarray(b) for p, b in bits.items()},
                            matrices=tuple(plan.values()), activation_bits=8, embedding_bits=8,
                            embedding_quantizer="index", other_bits=16).validate()


def _sensimix(params):
  """SensiMix 1+1: float inputs (activation_bits 32) everywhere but the binary FFN."""
  spec = sensimix.sensimix_spec([0], [1], binary_scale=True, binary_groups=4)
  return spec, sensimix.fixed_policy(spec, params, other_bits=16)


MODEL_CASES = {"mixed symmetric, 8-bit inputs": (_mixed_symmetric, True),
               "index attention, binary FFN": (_index_attention_binary_ffn, True),
               "SensiMix, float attention inputs": (_sensimix, False),
               "never calibrated: float inputs": (_mixed_symmetric, False)}
EXPECTED_KINDS = {"mixed symmetric, 8-bit inputs": {"int"},
                  "index attention, binary FFN": {"int", "sign"},
                  "SensiMix, float attention inputs": {"float", "sign"},
                  "never calibrated: float inputs": {"float"}}


def _served(model, ids, **kwargs):
  return jax.jit(lambda m, ids: m.apply(ids, **kwargs))(model, ids)


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_tiny_bert_int8_logits_match_fake_quantized_model(tmp_path, case):
  make_policy, calibrate = MODEL_CASES[case]
  config, model, params = _tiny(seed=1, num_labels=3)
  # Larger FFN weights in layer 1, so that binarized FFNs do not give all-tiny outputs.
  params = jax.tree_util.tree_map_with_path(
      lambda path, v: v * 30 if "layer/1/intermediate" in jax.tree_util.keystr(path) else v,
      params)
  spec, policy = make_policy(params)
  qparams = quant.init_qparams(spec, params)
  qapply = quant.transform(model.apply, spec)
  ids = jnp.asarray(np.random.default_rng(2).integers(1000, 5000, (32, 12)), jnp.int32)
  kwargs = dict(attention_mask=jnp.ones_like(ids), deterministic=True)
  if calibrate:
    _, qparams = qapply(params, qparams, policy, ids, update_act_stats=True, **kwargs)
  fake = np.asarray(qapply(params, qparams, policy, ids, **kwargs))

  packed = export.export_packed(params, policy, qparams, config=config, num_labels=3)
  loaded = export.load_packed(export.save_packed(packed, tmp_path / "m.safetensors"))
  assert set(export.input_kinds(loaded).values()) == EXPECTED_KINDS[case]
  served = np.asarray(_served(export.lay_out(loaded, "int8"), ids, **kwargs))
  scale = np.abs(fake).max()
  assert scale > 1e-3
  np.testing.assert_allclose(served, fake, rtol=0, atol=1e-5 * scale)
  np.testing.assert_array_equal(np.argmax(served, -1), np.argmax(fake, -1))


def test_forward_has_one_int8_dot_per_matrix_and_no_unpacking():
  """Everything is laid out at `lay_out`: the jitted forward holds one s8 x s8 -> s32 dot per
  int8 matrix, float32 dots for the float-input ones, and no shifts (no code unpacking)."""
  config, model, params = _tiny()
  spec, policy = _index_attention_binary_ffn(params)
  qparams = quant.init_qparams(spec, params)
  ids = jnp.ones((2, 8), jnp.int32)
  _, qparams = quant.transform(model.apply, spec)(params, qparams, policy, ids,
                                                  update_act_stats=True, deterministic=True)
  packed = export.export_packed(params, policy, qparams, config=config, num_labels=2)
  laid = export.lay_out(packed, sign_matmul="int8")
  text = jax.jit(lambda m, ids: m.apply(ids, deterministic=True)).lower(laid, ids).as_text()
  int8_dots = re.findall(r"stablehlo\.dot_general.*tensor<[0-9x]+xi8>, tensor<[0-9x]+xi8>\)"
                         r" -> tensor<[0-9x]+xi32>", text)
  assert len(int8_dots) == len(policy.matrices)
  assert "shift_right" not in text and "xui32" not in text


@pytest.mark.parametrize("case", ["index attention, binary FFN",
                                  "SensiMix, float attention inputs"])
def test_binary_layers_by_popcount_equal_the_int8_sign_dot(case):
  """+-1 weights with binarized inputs: XNOR-popcount on sign words and the int8 dot of the signs
  are the same integers, so the whole model's logits are equal bit for bit; "auto" picks one of
  the two per matrix, and only matrices with binarized inputs."""
  make_policy, calibrate = MODEL_CASES[case]
  config, model, params = _tiny(seed=1, num_labels=3)
  spec, policy = make_policy(params)
  qparams = quant.init_qparams(spec, params)
  ids = jnp.asarray(np.random.default_rng(4).integers(1000, 5000, (16, 12)), jnp.int32)
  kwargs = dict(attention_mask=jnp.ones_like(ids), deterministic=True)
  if calibrate:
    _, qparams = quant.transform(model.apply, spec)(params, qparams, policy, ids,
                                                    update_act_stats=True, **kwargs)
  packed = export.export_packed(params, policy, qparams, config=config, num_labels=3)
  by_int8 = export.lay_out(packed, sign_matmul="int8")
  by_popcount = export.lay_out(packed, sign_matmul="popcount")
  binary = {p for p, kind in export.input_kinds(packed).items() if kind == "sign"}
  assert binary and set(export.sign_matmuls(by_popcount)) == binary
  assert set(export.sign_matmuls(by_popcount).values()) == {"popcount"}
  assert set(export.sign_matmuls(by_int8).values()) == {"int8"}
  assert set(export.sign_matmuls(export.lay_out(packed))) == binary  # "auto"
  np.testing.assert_array_equal(np.asarray(_served(by_popcount, ids, **kwargs)),
                                np.asarray(_served(by_int8, ids, **kwargs)))
  with pytest.raises(ValueError, match="unknown sign_matmul 'xnor'"):
    export.lay_out(packed, sign_matmul="xnor")


def test_lay_out_names_the_layouts_it_knows():
  config, model, params = _tiny()
  spec, policy = _mixed_symmetric(params)
  packed = export.export_packed(params, policy, quant.init_qparams(spec, params), config=config,
                                num_labels=2)
  with pytest.raises(ValueError, match="unknown layout 'int4'"):
    export.lay_out(packed, "int4")
