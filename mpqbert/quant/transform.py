"""`transform(apply_fn, spec)`: run a Flax model with quantized weights and activations.

    qapply = mpqbert.quant.transform(model.apply, spec)
    logits = qapply(params, qparams, bits_or_logits, input_ids, attention_mask=..., key=key)

Three separate pytrees: `params` (the float weights), `qparams` (per quantized kernel: step sizes
per bit choice and sub-group, optional learned ranges, the input's activation scale) and
`bits_or_logits`: either a `Policy` (fixed bits) or a dict of logits `[G, K]` per kernel
(search; sampled with Gumbel-softmax from `key`, or plain softmax when `key` is None). Every
quantized kernel becomes `sum_k p_k Q_{b_k}(w)` before its one matmul; a policy is the one-hot
case.

The model exposes quantization through one method, `quantize_operands(x, kernel)` of its Dense
layers; this module intercepts it with `flax.linen.intercept_methods`, the only Flax API used in
`mpqbert.quant` (the quantizers themselves are plain JAX).
"""

from __future__ import annotations

import math

import zlib
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mpqbert.quant import grid, quantizers
from mpqbert.quant.registry import QUANTIZERS
from mpqbert.quant.mixture import gumbel_softmax, mix, one_hot_bits
from mpqbert.quant.policy import Policy
from mpqbert.quant.layout import ModelLayout
from mpqbert.quant.spec import FULL_PRECISION, MatrixSpec, Plan, QuantSpec, flatten_params

Array = jax.Array
QParams = dict[str, dict[str, Array]]
BitsOrLogits = Policy | Mapping[str, Array]

_INTERCEPTED = "quantize_operands"
_STATS = "quant_stats"


def matrix_key(key: jax.Array, path: str) -> jax.Array:
  """The Gumbel noise key of one matrix: `key` folded with a stable hash of its path."""
  return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def sample_probs(logits: Mapping[str, Array], key: jax.Array | None, tau: float | Array = 1.0,
                 hard: bool = False) -> dict[str, Array]:
  """Bit-choice probabilities `[G, K]` per matrix, exactly those `qapply` uses for these args."""
  return {path: gumbel_softmax(value, None if key is None else matrix_key(key, path), tau, hard)
          for path, value in logits.items()}


def quantize_choice(w: Array, matrix: MatrixSpec, qparams: Mapping[str, Array], k: int) -> Array:
  """`w` quantized with the k-th bit choice of `matrix` (0 bits: pruned)."""
  if matrix.bit_choices[k] == 0:
    return quantizers.prune(w)
  return QUANTIZERS[matrix.quantizer].quantize(w, matrix, qparams, k)


def weight_grid(w: Array, matrix: MatrixSpec, qparams: Mapping[str, Array], k: int
                ) -> grid.QArray:
  """The integer grid of `w` at the k-th (non-zero) bit choice of `matrix`: the codes, scales and
  zero points `quantize_choice` dequantizes, which the export packs."""
  if matrix.bit_choices[k] == 0:
    raise ValueError(f"{matrix.path}: a pruned sub-group (0 bits) has no grid.")
  return QUANTIZERS[matrix.quantizer].grid(w, matrix, qparams, k)


def quantize_weight(w: Array, matrix: MatrixSpec, qparams: Mapping[str, Array],
                    probs: Array) -> Array:
  """The searched weight `sum_k probs[:, k] * Q_{b_k}(w)` (probs `[G, K]`, one-hot for a policy).

  Rematerialised: the backward pass recomputes the K quantized copies of the (small) weight
  instead of keeping them alive from the forward pass, which saves K weight-sized buffers per
  matrix for the price of a few elementwise passes.
  """
  @jax.checkpoint
  def mixed(w, qparams, probs):
    return mix(w, probs, lambda w_, k: quantize_choice(w_, matrix, qparams, k))

  return mixed(w, qparams, probs)


def quantize_embedding(table: Array, bits: int, quantizer: str = "symmetric") -> Array:
  """An embedding table quantized per row (symmetric, max-abs scale per row) or per tensor
  ("index": min-max asymmetric, SensiMix's 8-bit embeddings)."""
  if quantizer == "index":
    lo, hi = quantizers.minmax_range(table.reshape(1, -1), 1)
    return quantizers.quantize_index(table.reshape(1, -1), lo, hi, bits).reshape(table.shape)
  rows = jax.lax.stop_gradient(table)
  _, q_pos = quantizers.symmetric_levels(bits)
  scale = jnp.maximum(jnp.max(jnp.abs(rows), axis=1) / q_pos, quantizers.MIN_SCALE)
  return quantizers.quantize_symmetric(table.T, scale, bits, lsq_grad=False).T


def init_qparams(spec: QuantSpec, params: Any, *, scale_init: str = "mse") -> QParams:
  """Quantizer parameters of every planned kernel, initialised from the weights.

  "scale": `[K, G]` step sizes, row k for bit choice k (symmetric quantizer; rows of 0-bit
  choices are unused); "lo"/"hi": `[K, G]` ranges (index quantizer with learn_range);
  "act_scale": the input's activation step size, 0 until calibrated (see `qapply`'s
  update_act_stats). `scale_init` is "mse", "absmax" or "lsq" (`init_symmetric_scale`).
  """
  plan = spec.plan(params)
  flat = flatten_params(params)
  qparams = {}
  for path, matrix in plan.items():
    w = jnp.asarray(flat[path], jnp.float32)
    qparams[path] = {"act_scale": jnp.zeros((), jnp.float32),
                     **QUANTIZERS[matrix.quantizer].init(w, matrix, scale_init)}
  return qparams


def init_arch(spec: QuantSpec, params: Any) -> dict[str, Array]:
  """Zero architecture logits `[G, K]` per planned kernel: every bit choice equally likely."""
  return {path: jnp.zeros((m.groups, len(m.bit_choices)), jnp.float32)
          for path, m in spec.plan(params).items()}


def _check_trees(plan: Plan, qparams: Mapping[str, Any], bits_or_logits: BitsOrLogits) -> None:
  """Errors naming the mismatch between the model's plan and the qparams / bits_or_logits trees."""
  missing = sorted(set(plan) - set(qparams))
  if missing:
    raise ValueError(f"qparams has no entry for {missing[0]} (and {len(missing) - 1} more); build "
                     "it with mpqbert.quant.init_qparams(spec, params) for this model and spec.")
  if isinstance(bits_or_logits, Policy):
    bits_or_logits.check_matches(plan)
    return
  for path, matrix in plan.items():
    if path not in bits_or_logits:
      raise ValueError(f"bits_or_logits has no logits for {path}; build them with "
                       "mpqbert.quant.init_arch(spec, params), or pass a Policy.")
    expected = (matrix.groups, len(matrix.bit_choices))
    if tuple(bits_or_logits[path].shape) != expected:
      raise ValueError(f"the logits for {path} have shape {tuple(bits_or_logits[path].shape)}, "
                       f"expected {expected} (sub-groups, bit choices).")


def _quantize_embeddings(params: Any, bits: int, quantizer: str, layout: ModelLayout) -> Any:
  if bits >= FULL_PRECISION:
    return params
  flat = flatten_params(params)
  return _replace_leaves(params, {path: quantize_embedding(value, bits, quantizer)
                                  for path, value in flat.items()
                                  if layout.is_table(path, quantizer)})


def _round_to_half(params: Any, plan: Plan, layout: ModelLayout, embedding_quantizer: str,
                   embedding_bits: int) -> Any:
  """Every parameter a half-precision policy stores in float16 (`other_bits` 16), rounded to
  float16 with a straight-through gradient, so that training sees the values inference uses.
  Planned kernels, quantized tables and the layout's matrices left out of the policy stay
  float32."""
  def kept_float32(path: str) -> bool:
    return (path in plan or layout.is_matrix(path) or
            (embedding_bits < FULL_PRECISION and layout.is_table(path, embedding_quantizer)))

  return _replace_leaves(params, {
      path: value + jax.lax.stop_gradient(value.astype(jnp.float16).astype(value.dtype) - value)
      for path, value in flatten_params(params).items() if not kept_float32(path)})


def _replace_leaves(params: Any, new: Mapping[str, Any], prefix: str = "") -> Any:
  """`params` (nested dicts) with the leaves at the paths of `new` replaced."""
  if isinstance(params, Mapping):
    return {k: _replace_leaves(v, new, f"{prefix}{k}/") for k, v in params.items()}
  return new.get(prefix[:-1], params)


def _updated_act_scales(qparams: QParams, stats: Mapping[str, Any], bits: Mapping[str, int],
                        momentum: float) -> QParams:
  """qparams with act_scale <- moving average of max|x| / q_pos (the first batch sets it)."""
  new = {path: dict(entry) for path, entry in qparams.items()}
  for path, absmax in stats.items():
    batch_scale = absmax / quantizers.symmetric_levels(bits[path])[1]
    old = new[path]["act_scale"]
    new[path]["act_scale"] = jnp.where(old > 0, momentum * old + (1 - momentum) * batch_scale,
                                       batch_scale)
  return new


def _collect_stats(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Array]:
  """Sown {module path: {"act_absmax": (values...)}} -> {kernel path: max value}."""
  out = {}
  for name, child in tree.items():
    if name == "act_absmax":
      out[prefix + "kernel"] = jnp.max(jnp.stack(child))
    else:
      out.update(_collect_stats(child, f"{prefix}{name}/"))
  return out


def _real_token_absmax(x: Array, token_mask: Array | None) -> Array:
  """max|x| over the positions the mask keeps: inputs `[B, T, K]` of the encoder's matrices with an
  attention mask `[B, T]`; any other shape (or no mask) counts every position."""
  x = jnp.abs(jax.lax.stop_gradient(x))
  if token_mask is not None and x.ndim == 3 and x.shape[:2] == token_mask.shape:
    x = jnp.where(token_mask[..., None] > 0, x, 0.0)
  return jnp.max(x)


def transform(apply_fn: Callable[..., Any], spec: QuantSpec) -> Callable[..., Any]:
  """Wraps a Flax `Module.apply` so that the kernels `spec` selects run quantized.

  Returns `qapply(params, qparams, bits_or_logits, *args, key=None, tau=1.0, hard=False,
  update_act_stats=False, **kwargs)`, which calls `apply_fn({"params": params}, *args, **kwargs)`.
  With `update_act_stats=True` it returns `(outputs, new_qparams)`, whose activation scales moved
  toward this batch's max|x| over real tokens (`attention_mask`; momentum
  `spec.activation_momentum`): run it on a few batches to calibrate before training or
  evaluation. Pure: works under jit, grad, vmap and sharding.
  """

  def qapply(params: Any, qparams: QParams, bits_or_logits: BitsOrLogits, *args,
             key: jax.Array | None = None, tau: float | Array = 1.0, hard: bool = False,
             update_act_stats: bool = False, **kwargs):
    plan = spec.plan(params)
    _check_trees(plan, qparams, bits_or_logits)
    settings = bits_or_logits if isinstance(bits_or_logits, Policy) else spec
    act_bits, emb_bits = settings.activation_bits, settings.embedding_bits
    learned_act = spec.activation_mode == "learned"
    token_mask = kwargs.get("attention_mask")  # Calibration ignores padded positions.

    def probs_of(path: str, matrix: MatrixSpec) -> Array:
      if isinstance(bits_or_logits, Policy):
        return one_hot_bits(bits_or_logits.bits[path], matrix.bit_choices)
      return gumbel_softmax(bits_or_logits[path],
                            None if key is None else matrix_key(key, path), tau, hard)

    def interceptor(next_fun, call_args, call_kwargs, context):
      if context.method_name != _INTERCEPTED:
        return next_fun(*call_args, **call_kwargs)
      x, kernel = call_args
      path = "/".join((*context.module.path, "kernel"))
      matrix = plan.get(path)
      if matrix is None:  # Float; an interceptor inside `apply_fn` still sees the call.
        return next_fun(x, kernel)
      kernel = quantize_weight(kernel, matrix, qparams[path], probs_of(path, matrix))
      input_bits = matrix.input_bits(act_bits)
      if input_bits == 1:
        x = quantizers.binarize_sign(x, math.inf if spec.binary_input_clip is None
                                     else spec.binary_input_clip)
      elif input_bits < FULL_PRECISION:
        if update_act_stats:
          context.module.sow(_STATS, "act_absmax", _real_token_absmax(x, token_mask))
        x = quantizers.quantize_activation(x, qparams[path]["act_scale"], input_bits,
                                           learned=learned_act)
      return next_fun(x, kernel)

    if isinstance(bits_or_logits, Policy) and bits_or_logits.other_bits == 16:
      params = _round_to_half(params, plan, spec.layout, bits_or_logits.embedding_quantizer,
                              emb_bits)
    variables = {"params": _quantize_embeddings(params, emb_bits, settings.embedding_quantizer,
                                                spec.layout)}
    with nn.intercept_methods(interceptor):
      if not update_act_stats:
        return apply_fn(variables, *args, **kwargs)
      outputs, state = apply_fn(variables, *args, mutable=[_STATS], **kwargs)
    stats = _collect_stats(state.get(_STATS, {}))
    input_bits = {path: m.input_bits(act_bits) for path, m in plan.items()}
    return outputs, _updated_act_scales(qparams, stats, input_bits, spec.activation_momentum)

  return qapply
