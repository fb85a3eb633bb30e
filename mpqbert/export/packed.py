"""A quantized model as a packed checkpoint, and inference on it through the low-bit kernels.

`export_packed(params, policy, qparams)` stores what the policy says and nothing more:

  index matrices  int8 codes `code - 2^(b-1)` `[K, N]` and float32 (lo, hi) per sub-group;
                  inference dequantizes them and runs a half-precision GEMM (`half_dtype`);
  sign / xnor     sign bits packed into uint32 words `[N, ceil(K / 32)]` (one row per output),
                  plus float32 mean|w| per sub-group for xnor; inference with binarized inputs
                  runs the XNOR-popcount matmul of `mpqbert.kernels`;
  index tables    (embedding_quantizer "index") int8 codes and float32 (lo, hi);
  everything else at the policy's `other_bits` (float16 or float32).

So the bytes of a packed model are the policy's `size_mb_total` (`packed_nbytes` checks it),
plus a float32 input step size for each matrix whose input is quantized to 2..8 bits.
Supported: index matrices and tables at 8 bits, 1-bit sign / xnor matrices (SensiMix); the
b-bit symmetric matrices of AutoMPQ need the packed low-bit kernels.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mpqbert import kernels, quant
from mpqbert.models.bert import QuantizableDense
from mpqbert.quant import FULL_PRECISION, Policy

Array = jax.Array
_CODE_BITS = 8  # Index codes are stored as int8.
_FORMAT = "mpqbert-packed/1"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedModel:
  """`params`: the Flax tree without packed kernels (index tables as int8 codes); `matrices`:
  per packed kernel path its arrays; `tables`: (lo, hi) of index tables; `policy` (static)."""

  params: Any
  matrices: dict[str, dict[str, Array]]
  tables: dict[str, dict[str, Array]]
  policy: Policy = dataclasses.field(metadata=dict(static=True))


def half_dtype() -> jnp.dtype:
  """The GEMM type of the 8-bit parts: float16 on GPU, bfloat16 on TPU (its fast type), and
  float32 on CPU, where neither half type has fast GEMMs."""
  return {"gpu": jnp.float16, "tpu": jnp.bfloat16}.get(jax.default_backend(), jnp.float32)


def _index_codes(w: Array, lo: Array, hi: Array, bits: int) -> Array:
  """The integer codes `quant.quantize_index` rounds to, shifted into int8."""
  wg = quant.group_view(w, lo.shape[-1])
  span = jnp.maximum(hi - lo, quant.quantizers.MIN_SCALE)[:, None]
  q = (2.0**bits - 1.0) / span
  code = jnp.round(q * (jnp.clip(wg, lo[:, None], hi[:, None]) - lo[:, None]))
  return (code - 2**(_CODE_BITS - 1)).astype(jnp.int8).reshape(w.shape)


def _dequantize_index(codes: Array, lo: Array, hi: Array, bits: int) -> Array:
  """float32 weights from int8 codes: the same arithmetic as `quant.quantize_index`."""
  span = jnp.maximum(hi - lo, quant.quantizers.MIN_SCALE)[:, None]
  q = (2.0**bits - 1.0) / span
  code = quant.group_view(codes.astype(jnp.float32) + 2**(_CODE_BITS - 1), lo.shape[-1])
  return (code / q + lo[:, None]).reshape(codes.shape)


def _check_supported(policy: Policy) -> None:
  for m in policy.matrices:
    bits = set(np.asarray(policy.bits[m.path]).tolist())
    ok = ((m.quantizer == "index" and bits == {_CODE_BITS}) or
          (m.quantizer in ("sign", "xnor") and bits == {1}))
    if not ok:
      raise ValueError(f"{m.path}: packed export supports 8-bit index and 1-bit sign/xnor "
                       f"matrices, not {m.quantizer!r} at {sorted(bits)} bits; export b-bit "
                       "symmetric matrices with the packed low-bit kernels.")
  if policy.embedding_bits < FULL_PRECISION and (policy.embedding_quantizer != "index" or
                                                 policy.embedding_bits != _CODE_BITS):
    raise ValueError(f"packed export stores embedding tables as 8-bit index codes; this policy "
                     f"has {policy.embedding_bits}-bit {policy.embedding_quantizer!r} tables.")


def export_packed(params: Any, policy: Policy, qparams: Mapping[str, Any] | None = None
                  ) -> PackedModel:
  """The packed form of `params` under `policy` (`qparams`: input step sizes, when quantized)."""
  _check_supported(policy)
  flat = quant.flatten_params(params)
  other = np.float16 if policy.other_bits == 16 else np.float32
  tables_re = quant.INDEX_EMBEDDING_TABLE
  quantize_tables = policy.embedding_bits < FULL_PRECISION
  plan = policy.plan
  kept, matrices, tables = {}, {}, {}
  for path, value in flat.items():
    w = jnp.asarray(value, jnp.float32)
    if path in plan:
      m = plan[path]
      entry = {}
      if m.quantizer == "index":
        lo, hi = quant.minmax_range(w, m.groups)
        entry = {"codes": _index_codes(w, lo, hi, _CODE_BITS), "lo": lo, "hi": hi}
      else:
        entry = {"words": kernels.pack_signs(w.T)}
        if m.quantizer == "xnor":
          entry["alpha"] = quant.xnor_scale(w, m.groups)
      if 1 < m.input_bits(policy.activation_bits) < FULL_PRECISION:
        entry["act_scale"] = jnp.asarray(qparams[path]["act_scale"], jnp.float32)
      matrices[path] = entry
    elif quantize_tables and tables_re.search(path):
      lo, hi = quant.minmax_range(w.reshape(1, -1), 1)
      kept[path] = _index_codes(w.reshape(1, -1), lo, hi, _CODE_BITS).reshape(w.shape)
      tables[path] = {"lo": lo, "hi": hi}
    else:
      kept[path] = jnp.asarray(np.asarray(value, other))
  return PackedModel(params=traverse_util.unflatten_dict(kept, sep="/"), matrices=matrices,
                     tables=tables, policy=policy)


def packed_nbytes(packed: PackedModel, *, with_act_scales: bool = False) -> int:
  """Bytes of the packed arrays (input step sizes only with `with_act_scales`)."""
  leaves = jax.tree.leaves(packed.params) + jax.tree.leaves(packed.tables)
  for entry in packed.matrices.values():
    leaves += [v for k, v in entry.items() if with_act_scales or k != "act_scale"]
  return sum(int(np.asarray(v).nbytes) for v in leaves)


def _dense(x: Array, entry: Mapping[str, Array], matrix: quant.MatrixSpec, input_bits: int,
           bias: Array) -> Array:
  """One packed Dense layer: `x [..., K] -> [..., N]`.

  8-bit index matrices are dequantized (the training-time formula) and multiplied in
  `half_dtype()`; 1-bit matrices with binarized inputs run the XNOR-popcount matmul, times the
  per-group scale of xnor matrices (exact, see `quant.xnor_scale`). On CPU (float32) this is the
  fake-quantized model's arithmetic, so both predict alike.
  """
  k, n = matrix.shape
  scale = jnp.repeat(entry["alpha"], n // matrix.groups) if "alpha" in entry else None
  if matrix.quantizer != "index" and input_bits == 1:  # Binary x binary: XNOR-popcount.
    words = kernels.pack_signs(x.reshape(-1, k))
    y = kernels.xnor_matmul(words, entry["words"], k).astype(jnp.float32).reshape(
        *x.shape[:-1], n)
    return (y if scale is None else y * scale) + bias
  if 1 < input_bits < FULL_PRECISION:
    x = quant.quantize_activation(x, entry["act_scale"], input_bits, learned=False)
  if matrix.quantizer == "index":
    w = _dequantize_index(entry["codes"], entry["lo"], entry["hi"], _CODE_BITS)
  else:
    bits = (entry["words"][:, :, None] >> jnp.arange(kernels.WORD_BITS, dtype=jnp.uint32)) & 1
    w = (2.0 * bits.reshape(n, -1)[:, :k].astype(jnp.float32) - 1.0).T
    w = w if scale is None else w * scale
  half = half_dtype()
  y = jnp.einsum("...i,io->...o", x.astype(half), w.astype(half),
                 preferred_element_type=jnp.float32)
  return y + bias


def packed_apply(model: nn.Module, packed: PackedModel, *args, **kwargs) -> Any:
  """`model.apply` on a packed model: packed kernels run through `_dense`, int8 tables are
  gathered then dequantized; every other parameter is computed in float32. Pure and jit-able."""
  policy = packed.policy
  plan = policy.plan
  params = jax.tree.map(lambda v: v if v.dtype == jnp.int8 else v.astype(jnp.float32),
                        packed.params)

  def interceptor(next_fun, call_args, call_kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*call_args, **call_kwargs)
    module = context.module
    if isinstance(module, QuantizableDense):
      path = "/".join((*module.path, "kernel"))
      if path in packed.matrices:
        matrix = plan[path]
        return _dense(call_args[0], packed.matrices[path], matrix,
                      matrix.input_bits(policy.activation_bits),
                      module.get_variable("params", "bias"))
    if isinstance(module, nn.Embed):
      path = "/".join((*module.path, "embedding"))
      if path in packed.tables:
        rows = module.embedding[call_args[0]]
        lo, hi = packed.tables[path]["lo"], packed.tables[path]["hi"]
        return _dequantize_index(rows.reshape(1, -1), lo, hi, _CODE_BITS).reshape(rows.shape)
    return next_fun(*call_args, **call_kwargs)

  with nn.intercept_methods(interceptor):
    return model.apply({"params": params}, *args, **kwargs)


def save_packed(packed: PackedModel, path: str | Path) -> Path:
  """One uncompressed .npz: the arrays under their paths, and the policy as JSON."""
  arrays = {f"params/{p}": v for p, v in quant.flatten_params(packed.params).items()}
  for kind, tree in (("matrices", packed.matrices), ("tables", packed.tables)):
    for p, entry in tree.items():
      arrays.update({f"{kind}/{p}/{k}": v for k, v in entry.items()})
  meta = json.dumps({"format": _FORMAT, "policy": packed.policy.to_json()})
  path = Path(path)
  with path.open("wb") as f:
    np.savez(f, __meta__=np.frombuffer(meta.encode(), np.uint8),
             **{k: np.asarray(v) for k, v in arrays.items()})
  return path


def load_packed(path: str | Path) -> PackedModel:
  """A `save_packed` file back as a `PackedModel`."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no packed model at {path}; write one with save_packed.")
  with np.load(path) as f:
    if "__meta__" not in f.files:
      raise ValueError(f"{path} is not an mpqbert packed model (no __meta__ entry).")
    meta = json.loads(bytes(f["__meta__"]).decode())
    if meta.get("format") != _FORMAT:
      raise ValueError(f"{path} has format {meta.get('format')!r}, expected {_FORMAT!r}.")
    params, matrices, tables = {}, {}, {}
    for key in f.files:
      if key == "__meta__":
        continue
      kind, rest = key.split("/", 1)
      value = jnp.asarray(f[key])
      if kind == "params":
        params[rest] = value
      else:
        matrix_path, name = rest.rsplit("/", 1)
        (matrices if kind == "matrices" else tables).setdefault(matrix_path, {})[name] = value
  return PackedModel(params=traverse_util.unflatten_dict(params, sep="/"), matrices=matrices,
                     tables=tables, policy=Policy.from_json(meta["policy"]))
