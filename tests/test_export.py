"""Packed export of mixed-precision policies: bytes, column blocks, and agreement with the
fake-quantized model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_BERT
from mpqbert import export, models, quant


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
  spec = quant.bert_encoder_spec(groups=4, bit_choices=(0, 2, 4, 8),
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
  report = quant.size_report(params, policy)
  # 2-, 4- and 8-bit codes fill whole words here (K = 32 or 64): bytes are exactly size_mb.
  assert export.packed_nbytes(packed, part="matrices") == report["size_mb"] * 2**20
  first = next(iter(plan))
  stored = set(packed.matrices[first]) - {"act_scale"}
  assert stored == {"b8/words", "b8/scale", "b4/words", "b4/scale", "b2/words", "b2/scale"}
  loaded = export.load_packed(export.save_packed(packed, tmp_path / "mixed.npz"))
  served = jax.jit(lambda p, ids: p.apply(ids, **kwargs))(loaded, ids)
  np.testing.assert_allclose(np.asarray(served), np.asarray(fake), rtol=1e-4, atol=1e-5)


def test_bit_blocks_put_each_width_together_and_leave_pruned_groups_out():
  matrix = quant.MatrixSpec(path="m", shape=(8, 12), groups=6, quantizer="symmetric",
                            bit_choices=(0, 2, 4, 8))
  policy = quant.Policy(bits={"m": jnp.asarray([2, 8, 0, 2, 4, 8])}, matrices=(matrix,))
  blocks = [(b, g.tolist()) for b, g in export.bit_blocks(policy, "m")]
  assert blocks == [(8, [1, 5]), (4, [4]), (2, [0, 3])]


def test_export_rejects_widths_the_kernels_do_not_pack():
  params = models.init_params(models.build_model(models.BertConfig(**TINY_BERT), 2), seed=0)
  spec = quant.bert_encoder_spec(bit_choices=(6,))
  with pytest.raises(ValueError, match="6-bit sub-groups cannot be packed"):
    export.export_packed(params, quant.uniform_policy(spec.plan(params), 6),
                         quant.init_qparams(spec, params))
  with pytest.raises(FileNotFoundError, match="no packed model"):
    export.load_packed("/nonexistent/packed.npz")
