"""Compilation: steps take large trees as arguments, compile once per shape, and bfloat16 matmuls
stay bfloat16 x bfloat16 -> float32 in the forward and the backward pass."""

from __future__ import annotations

import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from mpqbert import data, models, quant
from mpqbert.methods import qat
from mpqbert.models import matmul
from mpqbert.train import compiled, optim, sharding, steps


def _largest_constant(stablehlo: str) -> int:
  """Elements of the largest `stablehlo.constant` in a lowered program's text."""
  largest = 0
  for shape in re.findall(r"stablehlo\.constant dense<.*?> : tensor<([0-9x]*)x?[a-z]+[0-9]*>",
                          stablehlo):
    dims = [int(d) for d in shape.split("x") if d]
    largest = max(largest, int(np.prod(dims)) if dims else 1)
  return largest


def test_qat_step_with_distillation_holds_no_large_constants(tiny_model_dir):
  model, params = models.load_pretrained(str(tiny_model_dir), num_labels=2, seed=0)
  config = load_config("automp")
  config.quant.groups = 4
  assert qat.distills(config.train)
  ctx = types.SimpleNamespace(config=config, task=types.SimpleNamespace(is_regression=False),
                              model=model, mesh=sharding.make_mesh())
  spec = qat.make_spec(config, model.config.num_attention_heads)
  policy = quant.uniform_policy(spec.plan(params), 4, activation_bits=8)
  optimizer, _ = optim.make_optimizer(config.train, 10, mask=optim.weights_decay_mask)
  state = steps.TrainState.create(
      {"params": params, "qparams": quant.init_qparams(spec, params)}, optimizer)
  step = qat.make_qat_step(ctx, quant.transform(model.apply, spec), optimizer)
  text = step.jitted.lower(state, data.random_batch(4, 16), params, policy).as_text()
  # The tiny BERT's word embeddings alone are 30522 x 32 floats (3.7 MiB): baked-in teacher
  # weights would show up as constants of that size.
  assert len(text) < 2**20, f"the lowered QAT step is {len(text) / 2**20:.1f} MiB of text"
  assert _largest_constant(text) <= 1024


def test_jit_compiles_once_per_input_signature_and_records_it():
  step = compiled.Jit(lambda x, batch: x + batch["input_ids"].sum(), "toy_step")
  x = jnp.zeros((), jnp.int32)
  assert int(step(x, {"input_ids": np.ones((2, 32), np.int32)})) == 64
  assert int(step(x, {"input_ids": np.full((2, 32), 2, np.int32)})) == 128
  assert int(step(x, {"input_ids": np.ones((2, 64), np.int32)})) == 128
  assert [described for described, _ in step.compilations] == [
      "1 arrays (0.0 MiB), batch[2,32]", "1 arrays (0.0 MiB), batch[2,64]"]
  assert all(seconds >= 0 for _, seconds in step.compilations)


def test_precompile_compiles_each_new_signature_once_and_bind_fixes_trailing_arguments():
  step = compiled.Jit(lambda x, batch, scale: x + scale * batch["input_ids"].sum(), "toy_step")
  bound = step.bind(jnp.int32(2))
  batches = [{"input_ids": np.ones((2, n), np.int32)} for n in (16, 32, 16)]
  bound.precompile([(jnp.int32(0), b) for b in batches])
  assert len(step.compilations) == 2  # two shapes, compiled together
  assert int(bound(jnp.int32(1), batches[1])) == 1 + 2 * 64
  assert int(step(jnp.int32(1), batches[0], jnp.int32(3))) == 1 + 3 * 32
  assert len(step.compilations) == 2  # both calls used the precompiled executables


def test_pad_to_length_pads_token_arrays_with_padding_positions():
  batch = {"input_ids": np.array([[101, 7, 102]], np.int32),
           "attention_mask": np.array([[1, 1, 1]], np.int32),
           "token_type_ids": np.array([[0, 0, 0]], np.int32),
           "labels": np.array([1], np.int32), "weights": np.array([1.0], np.float32)}
  padded = data.pad_to_length(batch, 5)
  np.testing.assert_array_equal(padded["input_ids"], [[101, 7, 102, 0, 0]])
  np.testing.assert_array_equal(padded["attention_mask"], [[1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(padded["token_type_ids"], [[0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(padded["labels"], [1])
  assert data.pad_to_length(batch, 3) is batch
  with pytest.raises(ValueError, match="shorter"):
    data.pad_to_length(batch, 2)


def _round_bf16(x: np.ndarray) -> np.ndarray:
  return np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)


@pytest.mark.parametrize("spec,a_shape,b_shape", [
    ("mi,io->mo", (6, 5), (5, 3)),
    ("bhqd,bhkd->bhqk", (2, 3, 4, 5), (2, 3, 6, 5)),
    ("bhqk,bhkd->bhqd", (2, 3, 4, 6), (2, 3, 6, 5)),
])
def test_bfloat16_einsum_and_its_gradients_match_float64(spec, a_shape, b_shape):
  rng = np.random.default_rng(0)
  a = rng.normal(size=a_shape).astype(np.float32)
  b = rng.normal(size=b_shape).astype(np.float32)
  out_shape = np.einsum(spec, a, b).shape
  g = rng.normal(size=out_shape).astype(np.float32)
  a_low, b_low, g_low = _round_bf16(a), _round_bf16(b), _round_bf16(g)
  lhs, rhs, out = re.split(r",|->", spec)

  value, vjp = jax.vjp(lambda a, b: matmul.einsum(spec, a, b, jnp.bfloat16), jnp.asarray(a),
                       jnp.asarray(b))
  grad_a, grad_b = vjp(jnp.asarray(g))
  assert value.dtype == jnp.float32 and grad_a.dtype == jnp.float32
  # Products of bfloat16-rounded operands, accumulated in float32: float64 within float32's
  # rounding of the sums.
  np.testing.assert_allclose(value, np.einsum(spec, a_low, b_low), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grad_a, np.einsum(f"{out},{rhs}->{lhs}", g_low, b_low),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grad_b, np.einsum(f"{lhs},{out}->{rhs}", a_low, g_low),
                             rtol=1e-5, atol=1e-5)
  # A bfloat16 operand gets a bfloat16 gradient.
  _, vjp = jax.vjp(lambda a, b: matmul.einsum(spec, a, b, jnp.bfloat16),
                   jnp.asarray(a, jnp.bfloat16), jnp.asarray(b))
  assert vjp(jnp.asarray(g))[0].dtype == jnp.bfloat16


def test_float32_einsum_is_the_plain_product():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(4, 3)), rng.normal(size=(3, 2))
  np.testing.assert_allclose(matmul.einsum("mi,io->mo", jnp.asarray(a, jnp.float32),
                                           jnp.asarray(b, jnp.float32)), a @ b, rtol=1e-6)


def test_bfloat16_train_step_multiplies_only_bfloat16_operands(tiny_model_dir):
  """Every matmul of the bfloat16 train step, forward and backward, is bf16 x bf16 -> f32:
  the form XLA:CPU runs on its fast bfloat16 path (a float32 operand makes it a float32 matmul)."""
  model, params = models.load_pretrained(str(tiny_model_dir), num_labels=2, seed=0,
                                         dtype=jnp.bfloat16)
  optimizer, _ = optim.make_optimizer(load_config("finetune").train, 10)
  step = steps.make_train_step(model, optimizer, is_regression=False, dropout_seed=0)
  state = steps.TrainState.create(params, optimizer)
  text = step.jitted.lower(state, data.random_batch(4, 16)).as_text()
  dots = re.findall(r"stablehlo\.dot_general.*?: \((tensor<[^>]*>), (tensor<[^>]*>)\) -> "
                    r"(tensor<[^>]*>)", text)
  # 2 layers x (6 Dense + 2 attention products) forward, twice as many backward.
  assert len(dots) >= 2 * 8 * 3
  kinds = {(a.split("x")[-1], b.split("x")[-1], out.split("x")[-1]) for a, b, out in dots}
  assert kinds == {("bf16>", "bf16>", "f32>")}, kinds
