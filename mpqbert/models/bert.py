"""Flax linen BERT encoder and sequence-classification head with Hugging Face parameter names.

The parameter tree mirrors the PyTorch state dict (`encoder/layer/3/attention/self/query/kernel`
is `encoder.layer.3.attention.self.query.weight`, transposed), so checkpoints convert one to one
(`mpqbert.models.convert`).

Quantization injection point: every Dense (attention Q, K, V, output; FFN intermediate, output;
pooler; classifier) is a `QuantizableDense`, whose `quantize_operands(x, kernel)` method is the
identity here. The quantizer transform intercepts that one method (`flax.linen.intercept_methods`)
to return quantized operands, so no module carries a quantization flag.

Every matmul goes through `matmul.einsum`: in `dtype` with float32 accumulation, forward and
backward (the fast bfloat16 path of XLA:CPU with `dtype=bfloat16`; plain float32 otherwise).
"""

from __future__ import annotations

from typing import Any, Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from mpqbert.models import matmul
from mpqbert.models.config import BertConfig

Array = jax.Array
DType = Any


def activation(name: str) -> Callable[[Array], Array]:
  """Hugging Face activation name -> JAX function (erf GELU for 'gelu', as HF does)."""
  return {
      "gelu": lambda x: jax.nn.gelu(x, approximate=False),
      "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
      "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
      "relu": jax.nn.relu,
      "silu": jax.nn.silu,
      "swish": jax.nn.silu,
  }[name]


def _normal_init(config: BertConfig) -> nn.initializers.Initializer:
  return nn.initializers.normal(stddev=config.initializer_range)


def _layer_norm(config: BertConfig, dtype: DType, name: str = "LayerNorm") -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, param_dtype=jnp.float32,
                      name=name)


class QuantizableDense(nn.Module):
  """`y = x @ kernel + bias`, with `quantize_operands` as the quantizer's injection point."""

  features: int
  dtype: DType = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.normal(stddev=0.02)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    x, kernel = self.quantize_operands(x, kernel)
    rows = x.reshape(-1, x.shape[-1])
    y = matmul.einsum("mi,io->mo", rows, kernel, self.dtype) + bias  # float32 accumulation
    return y.astype(self.dtype).reshape(*x.shape[:-1], self.features)

  def quantize_operands(self, x: Array, kernel: Array) -> tuple[Array, Array]:
    """Identity. `mpqbert.quant.transform` intercepts this call to quantize input and kernel."""
    return x, kernel


class BertEmbeddings(nn.Module):
  """Word + position (+ token type) embeddings, LayerNorm, dropout."""

  config: BertConfig
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, input_ids: Array, token_type_ids: Array, deterministic: bool) -> Array:
    cfg = self.config
    init = _normal_init(cfg)
    seq_len = input_ids.shape[-1]
    if seq_len > cfg.max_position_embeddings:
      raise ValueError(f"sequence length {seq_len} exceeds max_position_embeddings="
                       f"{cfg.max_position_embeddings}; truncate inputs (data.max_seq_length).")
    word = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init,
                    name="word_embeddings")(input_ids)
    position = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init,
                        name="position_embeddings")(jnp.arange(seq_len))
    hidden = word + position[None]
    if cfg.type_vocab_size > 0:
      hidden += nn.Embed(cfg.type_vocab_size, cfg.hidden_size, embedding_init=init,
                         name="token_type_embeddings")(token_type_ids)
    hidden = _layer_norm(cfg, self.dtype)(hidden.astype(self.dtype))
    return nn.Dropout(cfg.hidden_dropout_prob)(hidden, deterministic=deterministic)


class BertSelfAttention(nn.Module):
  """Multi-head scaled dot-product attention; query/key/value are `QuantizableDense`."""

  config: BertConfig
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, hidden: Array, mask_bias: Array, deterministic: bool) -> Array:
    cfg = self.config
    dense = lambda name: QuantizableDense(cfg.hidden_size, self.dtype, _normal_init(cfg), name=name)
    # Heads-major [batch, heads, seq, head_dim]: both products (and their gradients) are plain
    # batched matmuls, which XLA:CPU runs in bfloat16 too (some other layouts it cannot).
    split = lambda x: x.reshape(x.shape[:-1] + (cfg.num_attention_heads, cfg.head_dim)
                                ).transpose(0, 2, 1, 3)
    query, key, value = (split(dense(n)(hidden)) for n in ("query", "key", "value"))
    # float32 scores (accumulated in float32 from `dtype` operands): the softmax and the mask
    # bias stay float32, which keeps bfloat16 runs stable.
    scores = matmul.einsum("bhqd,bhkd->bhqk", query, key, self.dtype) / jnp.sqrt(
        jnp.float32(cfg.head_dim))
    probs = jax.nn.softmax(scores + mask_bias, axis=-1).astype(self.dtype)
    probs = nn.Dropout(cfg.attention_probs_dropout_prob)(probs, deterministic=deterministic)
    context = matmul.einsum("bhqk,bhkd->bhqd", probs, value, self.dtype).astype(self.dtype)
    return context.transpose(0, 2, 1, 3).reshape(hidden.shape[:-1] + (cfg.hidden_size,))


class BertResidualOutput(nn.Module):
  """Dense -> dropout -> residual add -> LayerNorm (HF `BertSelfOutput` and `BertOutput`)."""

  config: BertConfig
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, hidden: Array, residual: Array, deterministic: bool) -> Array:
    cfg = self.config
    hidden = QuantizableDense(cfg.hidden_size, self.dtype, _normal_init(cfg), name="dense")(hidden)
    hidden = nn.Dropout(cfg.hidden_dropout_prob)(hidden, deterministic=deterministic)
    return _layer_norm(cfg, self.dtype)(hidden + residual)


class BertAttention(nn.Module):
  config: BertConfig
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, hidden: Array, mask_bias: Array, deterministic: bool) -> Array:
    context = BertSelfAttention(self.config, self.dtype, name="self")(hidden, mask_bias,
                                                                      deterministic)
    return BertResidualOutput(self.config, self.dtype, name="output")(context, hidden,
                                                                      deterministic)


class BertIntermediate(nn.Module):
  config: BertConfig
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, hidden: Array) -> Array:
    cfg = self.config
    hidden = QuantizableDense(cfg.intermediate_size, self.dtype, _normal_init(cfg),
                              name="dense")(hidden)
    return activation(cfg.hidden_act)(hidden)


class BertLayer(nn.Module):
  """One transformer block (post-LayerNorm, as in BERT)."""

  config: BertConfig
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, hidden: Array, mask_bias: Array, deterministic: bool) -> Array:
    attended = BertAttention(self.config, self.dtype, name="attention")(hidden, mask_bias,
                                                                        deterministic)
    inner = BertIntermediate(self.config, self.dtype, name="intermediate")(attended)
    return BertResidualOutput(self.config, self.dtype, name="output")(inner, attended,
                                                                      deterministic)


class BertLayerStack(nn.Module):
  """The layers, named "0", "1", ... as in HF's `encoder.layer.<i>`; optional remat per layer."""

  config: BertConfig
  dtype: DType = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, hidden: Array, mask_bias: Array, deterministic: bool) -> Array:
    # `deterministic` is a Python bool, hence static for remat (argument 3 counting self).
    layer_cls = nn.remat(BertLayer, static_argnums=(3,)) if self.remat else BertLayer
    for i in range(self.config.num_hidden_layers):
      hidden = layer_cls(self.config, self.dtype, name=str(i))(hidden, mask_bias, deterministic)
    return hidden


class BertEncoder(nn.Module):
  config: BertConfig
  dtype: DType = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, hidden: Array, mask_bias: Array, deterministic: bool) -> Array:
    return BertLayerStack(self.config, self.dtype, self.remat, name="layer")(hidden, mask_bias,
                                                                             deterministic)


class BertPooler(nn.Module):
  """tanh(Dense(hidden state of the first token)), as BERT's next-sentence pooler."""

  config: BertConfig
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, hidden: Array) -> Array:
    dense = QuantizableDense(self.config.hidden_size, self.dtype, _normal_init(self.config),
                             name="dense")
    return jnp.tanh(dense(hidden[:, 0]))


def attention_mask_bias(attention_mask: Array) -> Array:
  """[batch, seq] 0/1 mask -> additive float32 bias [batch, 1, 1, seq]: 0 or the float32 min."""
  keep = attention_mask.astype(bool)[:, None, None, :]
  return jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


class BertModel(nn.Module):
  """The BERT encoder: `apply(..., input_ids, attention_mask, token_type_ids)` -> [B, S, H].

  `pool(hidden)` applies the pooler; it creates its parameters only when called, so a bare
  encoder has none.
  """

  config: BertConfig
  dtype: DType = jnp.float32
  remat: bool = False

  def setup(self):
    self.embeddings = BertEmbeddings(self.config, self.dtype)
    self.encoder = BertEncoder(self.config, self.dtype, self.remat)
    self.pooler = BertPooler(self.config, self.dtype)

  def __call__(self, input_ids: Array, attention_mask: Array | None = None,
               token_type_ids: Array | None = None, *, deterministic: bool = True) -> Array:
    chex.assert_rank(input_ids, 2)
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    chex.assert_equal_shape([input_ids, attention_mask, token_type_ids])
    hidden = self.embeddings(input_ids, token_type_ids, deterministic)
    hidden = self.encoder(hidden, attention_mask_bias(attention_mask), deterministic)
    chex.assert_shape(hidden, input_ids.shape + (self.config.hidden_size,))
    return hidden

  def pool(self, hidden: Array) -> Array:
    return self.pooler(hidden)


class BertForSequenceClassification(nn.Module):
  """Encoder + pooler + dropout + linear head -> logits [B, num_labels].

  `num_labels=1` is the regression head (STS-B), as in Hugging Face.
  """

  config: BertConfig
  num_labels: int
  dtype: DType = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None = None,
               token_type_ids: Array | None = None, *, deterministic: bool = True) -> Array:
    bert = BertModel(self.config, self.dtype, self.remat, name="bert")
    pooled = bert.pool(bert(input_ids, attention_mask, token_type_ids,
                            deterministic=deterministic))
    pooled = nn.Dropout(self.config.head_dropout)(pooled, deterministic=deterministic)
    logits = QuantizableDense(self.num_labels, self.dtype, _normal_init(self.config),
                              name="classifier")(pooled)
    return logits.astype(jnp.float32)
