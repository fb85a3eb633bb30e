"""A quantized model as a packed checkpoint, and inference on it through the low-bit kernels.

`export_packed(params, policy, qparams)` stores what the policy says and nothing more: the codes
are those of the `quant.QArray` (`quant.weight_grid`) that training dequantized. Each
quantized matrix `[K, N]` is split by bit-width: the sub-groups (column blocks of
`MatrixSpec.group_widths`, the last one narrower when G does not divide N) at b bits are
gathered, in order, into one block packed along K (`kernels.packing`), stored as

  `b{b}/words`   uint32 `[K_w, N_b]`: signed codes (symmetric, sign, xnor; at 1 bit the sign
                 bits of w, bit 1 = +1, sign(0) = +1) or unsigned ones (index);
  `b{b}/scale`   float32 per sub-group (symmetric: the step size, at 1 bit the s of s * sign(w);
                 index: `(hi - lo) / (2^b - 1)`; xnor: mean|w|; sign matrices store none);
  `b{b}/zero`    float32 per sub-group, index matrices only: `-lo / scale`, so `w = scale *
                 (code - zero)`;

so the output columns are permuted to put each bit-width together (blocks in decreasing bits,
pruned sub-groups last). The permutation follows from the policy, which the checkpoint stores,
so it costs no bytes; pruned sub-groups cost neither bytes nor compute. Matrices whose input is
quantized to 2..8 bits also store `act_scale`. Embedding tables under an 8-bit index policy are
int8 codes (the index grid's codes - 128) with a float32 scale and zero point; every other
parameter is kept at the policy's `other_bits` (encoder matrices it leaves out: float32).

The file (`save_packed`) is safetensors, the format the Hugging Face ecosystem reads, written with
NumPy alone (`files.write_safetensors`) and loadable by the `safetensors` package alone: every
array under its name (`params/<path>`, `matrices/<kernel path>/b{b}/words` ..., `tables/<table
path>/scale`, `.../zero`), and in the header's `__metadata__` (str -> str) `format`, `policy` (the
policy JSON, `Policy.to_json`), `config` (the `BertConfig` as JSON, or "null") and `num_labels`.
Its tensors are the arrays above and nothing else, so the file is their bytes plus the header.
`load_packed` also reads the .npz files earlier versions wrote (same names, the metadata as JSON in
a uint8 `__meta__` entry), told apart by content.

Inference (`PackedModel.apply`, or `packed_apply`) runs one `kernels.packed_matmul` per bit-width
block, in `half_dtype()` activations with float32 accumulation (FP16 GEMMs on GPU); a signed
1-bit block with binarized inputs runs `kernels.xnor_matmul`. The bytes of the packed matrices are
the policy's `size_mb` (`packed_nbytes`): sizes count the packed words (`MatrixSpec.storage_bits`),
so 3-bit codes, 10 to a word, cost what they take on disk.

Why one module over 300 lines: the file format is written (`export_packed`, `save_packed`), read
(`load_packed`) and served (`packed_apply`) here; the three must agree on every array's name and
layout, which is easiest to check side by side. The int8 layout lives apart (`integer.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mpqbert import files, kernels, quant
from mpqbert.models.bert import QuantizableDense
from mpqbert.models.config import BertConfig
from mpqbert.models.layout import BERT_LAYOUT
from mpqbert.models.pretrained import build_model
from mpqbert.quant import FULL_PRECISION, Policy

Array = jax.Array
_TABLE_BITS = 8  # Index embedding tables are int8 codes.
_FORMAT = "mpqbert-packed/3"  # 3: index tables store (scale, zero) of their QArray.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedModel:
  """`params`: the Flax tree without the packed kernels (index tables as int8 codes);
  `matrices`: per packed kernel path its arrays (module docstring); `tables`: (scale, zero) of
  index tables; `policy`, `config` and `num_labels` (static) say how to rebuild and run the
  model."""

  params: Any
  matrices: dict[str, dict[str, Array]]
  tables: dict[str, dict[str, Array]]
  policy: Policy = dataclasses.field(metadata=dict(static=True))
  config: BertConfig | None = dataclasses.field(default=None, metadata=dict(static=True))
  num_labels: int | None = dataclasses.field(default=None, metadata=dict(static=True))
  # None: packed words of `packing.word_rows` rows, as files store them; a tile: laid out in whole
  # tiles of word rows for the kernels (`lay_out_for_kernels`), served only, never saved.
  layout_tile: int | None = dataclasses.field(default=None, metadata=dict(static=True))

  def model(self) -> nn.Module:
    """The Flax model these parameters belong to."""
    if self.config is None:
      raise ValueError("this PackedModel carries no BertConfig; pass config= to export_packed.")
    return build_model(self.config, self.num_labels)

  def apply(self, *args, backend: str = "auto", **kwargs) -> Any:
    """The model's forward pass through the kernels (arguments as `BertForSequenceClassification`)."""
    return packed_apply(self.model(), self, *args, backend=backend, **kwargs)


def half_dtype() -> jnp.dtype:
  """The activation type of the kernels' GEMMs: float16 on GPU, bfloat16 on TPU (its fast type),
  and float32 on CPU, where neither half type has fast GEMMs."""
  return {"gpu": jnp.float16, "tpu": jnp.bfloat16}.get(jax.default_backend(), jnp.float32)


def bit_blocks(policy: Policy, path: str) -> list[tuple[int, np.ndarray]]:
  """`(bits, sub-group indices)` of the packed blocks of a matrix, in storage order (decreasing
  bits; pruned sub-groups are in no block)."""
  bits = np.asarray(policy.bits[path])
  return [(int(b), np.flatnonzero(bits == b)) for b in sorted(set(bits.tolist()), reverse=True)
          if b > 0]


def _columns(groups: np.ndarray, matrix: quant.MatrixSpec) -> np.ndarray:
  """The output columns of sub-groups `groups` (in order): contiguous blocks of
  `matrix.group_widths`, the last one narrower when the groups are uneven."""
  widths = np.asarray(matrix.group_widths, np.int64)
  starts = np.cumsum(widths) - widths
  return np.concatenate([np.zeros((0,), np.int64)] +
                        [np.arange(starts[g], starts[g] + widths[g]) for g in groups])


def _per_column(values: Array, groups: np.ndarray, matrix: quant.MatrixSpec) -> Array:
  """Per-sub-group values `[len(groups)]` repeated over each sub-group's columns."""
  widths = np.asarray(matrix.group_widths)[groups]
  if len(set(widths.tolist())) == 1:
    return jnp.repeat(values, int(widths[0]))
  return jnp.repeat(values, widths, total_repeat_length=int(widths.sum()))


def _check_supported(policy: Policy) -> None:
  for m in policy.matrices:
    bits = set(np.asarray(policy.bits[m.path]).tolist()) - {0}
    for b in bits:
      if b not in kernels.SUPPORTED_BITS:
        raise ValueError(f"{m.path}: {b}-bit sub-groups cannot be packed; the kernels take "
                         f"{kernels.SUPPORTED_BITS} bits. Search or quantize with bit choices "
                         "among those widths.")
  if policy.embedding_bits < FULL_PRECISION and (policy.embedding_quantizer != "index" or
                                                 policy.embedding_bits != _TABLE_BITS):
    raise ValueError(f"packed export stores embedding tables as 8-bit index codes; this policy "
                     f"has {policy.embedding_bits}-bit {policy.embedding_quantizer!r} tables.")


def _pack_matrix(w: Array, matrix: quant.MatrixSpec, bits_per_group: np.ndarray,
                 qparams: Mapping[str, Any] | None, policy: Policy) -> dict[str, Array]:
  """The stored arrays of one quantized matrix (module docstring)."""
  entry = {}
  for b, groups in bit_blocks(policy, matrix.path):
    cols = _columns(groups, matrix)
    # The grid training dequantized (`quant.weight_grid`), restricted to this block's sub-groups.
    qarray = quant.weight_grid(w, matrix, qparams or {}, matrix.bit_choices.index(b))
    if matrix.quantizer != "sign":
      entry[f"b{b}/scale"] = jnp.asarray(qarray.scale, jnp.float32)[groups]
    if matrix.quantizer == "index":
      entry[f"b{b}/zero"] = jnp.asarray(qarray.zero, jnp.float32)[groups]
    entry[f"b{b}/words"] = kernels.pack(qarray.int_codes()[:, cols], b, signed=qarray.signed)
  if 1 < matrix.input_bits(policy.activation_bits) < FULL_PRECISION:
    entry["act_scale"] = jnp.asarray(qparams["act_scale"], jnp.float32)
  return entry


def export_packed(params: Any, policy: Policy, qparams: Mapping[str, Any] | None = None, *,
                  config: BertConfig | None = None, num_labels: int | None = None
                  ) -> PackedModel:
  """The packed form of `params` under `policy` (`qparams`: the quantizers' scales and input
  step sizes; `config`, `num_labels`: the model, so that `PackedModel.apply` can rebuild it)."""
  _check_supported(policy)
  flat = quant.flatten_params(params)
  other = np.float16 if policy.other_bits == 16 else np.float32
  quantize_tables = policy.embedding_bits < FULL_PRECISION
  plan = policy.plan
  kept, matrices, tables = {}, {}, {}
  for path, value in flat.items():
    w = jnp.asarray(value, jnp.float32)
    if path in plan:
      matrices[path] = _pack_matrix(w, plan[path], np.asarray(policy.bits[path]),
                                    (qparams or {}).get(path), policy)
    elif quantize_tables and BERT_LAYOUT.is_table(path, "index"):
      lo, hi = quant.minmax_range(w.reshape(1, -1), 1)
      table = quant.grid.index(w.reshape(1, -1), lo, hi, _TABLE_BITS)
      kept[path] = (table.int_codes() - 2**(_TABLE_BITS - 1)).astype(jnp.int8).reshape(w.shape)
      tables[path] = {"scale": table.scale, "zero": table.zero}
    elif BERT_LAYOUT.is_matrix(path):
      # An encoder matrix the policy leaves out: float32, as training and `size_mb` keep it.
      kept[path] = jnp.asarray(np.asarray(value, np.float32))
    else:
      kept[path] = jnp.asarray(np.asarray(value, other))
  return PackedModel(params=traverse_util.unflatten_dict(kept, sep="/"), matrices=matrices,
                     tables=tables, policy=policy, config=config, num_labels=num_labels)


def packed_nbytes(packed: PackedModel, *, part: str = "all") -> int:
  """Bytes of the packed arrays: `part` "matrices" (the encoder matrices, packed or left out of
  the policy at float32: what `size_mb` counts), "other" (the rest, `size_mb_other`) or "all";
  input step sizes are not counted."""
  def nbytes(leaves):
    return sum(int(np.asarray(v).nbytes) for v in leaves)

  kept = quant.flatten_params(packed.params)
  left_out = [v for path, v in kept.items() if BERT_LAYOUT.is_matrix(path)]
  matrices = nbytes([v for e in packed.matrices.values() for k, v in e.items()
                     if k != "act_scale"] + left_out)
  other = nbytes([v for path, v in kept.items() if not BERT_LAYOUT.is_matrix(path)] +
                 jax.tree.leaves(packed.tables))
  return {"matrices": matrices, "other": other, "all": matrices + other}[part]


def _dense(x: Array, entry: Mapping[str, Array], policy: Policy, matrix: quant.MatrixSpec,
           bias: Array, backend: str, layout_tile: int | None = None) -> Array:
  """One packed Dense layer `x [..., K] -> [..., N]`: a kernel call per bit-width block, the
  blocks' columns put back in order, pruned columns 0. `layout_tile`: the model's
  (`PackedModel.layout_tile`)."""
  k, n = matrix.shape
  x2 = x.reshape(-1, k)
  input_bits = matrix.input_bits(policy.activation_bits)
  if 1 < input_bits < FULL_PRECISION:
    x2 = quant.quantize_activation(x2, entry["act_scale"], input_bits, learned=False)
  signed = matrix.quantizer != "index"
  outputs, columns = [], []
  for b, groups in bit_blocks(policy, matrix.path):
    words = entry[f"b{b}/words"]
    scale = entry.get(f"b{b}/scale")
    scale = (jnp.ones((len(groups),), jnp.float32) if scale is None else scale)
    scale = _per_column(scale, groups, matrix)
    if input_bits == 1 and b == 1 and signed:  # Binary x binary (sign, xnor, 1-bit symmetric).
      y = kernels.xnor_matmul(kernels.pack_signs(x2), words, k, scale=scale, backend=backend)
    else:  # Binarized inputs are sign(x), sign(0) = +1, as quant.sign_ste.
      xb = quant.grid.sign_codes(x2) if input_bits == 1 else x2
      zero = entry.get(f"b{b}/zero")
      zero = None if zero is None else _per_column(zero, groups, matrix)
      y = kernels.packed_matmul(xb.astype(half_dtype()), words, scale, bits=b, signed=signed,
                                zero_points=zero, out_dtype=jnp.float32, backend=backend,
                                layout_tile=_block_tile(words, k, b, layout_tile))
    outputs.append(y)
    columns.append(_columns(groups, matrix))
  order = np.concatenate(columns) if columns else np.zeros((0,), np.int64)
  if len(order) < n:  # Pruned sub-groups: zero columns.
    outputs.append(jnp.zeros((x2.shape[0], n - len(order)), jnp.float32))
    order = np.concatenate([order, np.setdiff1d(np.arange(n), order)])
  y = jnp.concatenate(outputs, axis=1) if len(outputs) > 1 else outputs[0]
  if not np.array_equal(order, np.arange(n)):
    y = y[:, np.argsort(order)]
  return y.reshape(*x.shape[:-1], n) + bias


def _block_tile(words: Array, k: int, bits: int, layout_tile: int | None) -> int | None:
  """The layout tile of one block's words: the model's, where laying out added rows (blocks
  already whole tiles, and xnor words, keep the compact rows)."""
  if layout_tile is None or words.shape[0] == kernels.packing.word_rows(k, bits):
    return None
  return layout_tile


def lay_out_for_kernels(packed: PackedModel, backend: str = "auto") -> PackedModel:
  """`packed` with every kernel weight laid out in whole tiles of word rows of the `backend`'s
  kernel (`packing.kernel_rows`: 16 rows on GPU, 128 on TPU), once, so that no call pads a
  weight (3-bit at K=768: 77 rows -> 80; 1-bit at 768: 24 -> 32). Blocks already whole tiles,
  xnor weights (sign words) and backends without kernels (the reference) stay as they are. The
  result serves (`.apply`); files keep the compact rows (`save_packed` takes the model given)."""
  if packed.layout_tile is not None:
    return packed
  tile = kernels.lowbit.kernel_tile(kernels.compat.resolve_backend(backend))
  if tile is None:
    return packed
  plan, policy = packed.policy.plan, packed.policy
  matrices = {}
  for path, entry in packed.matrices.items():
    matrix = plan[path]
    k, signed = matrix.shape[0], matrix.quantizer != "index"
    binary_inputs = matrix.input_bits(policy.activation_bits) == 1
    laid_out = dict(entry)
    for b, _ in bit_blocks(policy, path):
      words = entry[f"b{b}/words"]
      if (b == 1 and binary_inputs and signed) or words.shape[0] % tile == 0:
        continue
      codes = kernels.packing.unpack(words, b, k, signed=signed)
      laid_out[f"b{b}/words"] = kernels.packing.pack(codes, b, signed=signed, tile=tile)
    matrices[path] = laid_out
  return dataclasses.replace(packed, matrices=matrices, layout_tile=tile)


def packed_apply(model: nn.Module, packed: PackedModel, *args, backend: str = "auto",
                 dense: Callable[..., Array] | None = None, **kwargs) -> Any:
  """`model.apply` on a packed model: packed kernels run through `_dense`, int8 tables are
  gathered then dequantized; every other parameter is computed in float32. Pure and jit-able.
  `backend`: the kernels' (`kernels.compat`; "auto" is the pure-jnp reference on CPU). `dense`:
  what runs a packed matrix instead of `_dense`, same arguments (`export.integer` passes its
  int8 layer with an `IntegerModel` as `packed`)."""
  dense = dense or functools.partial(_dense, layout_tile=packed.layout_tile)
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
        return dense(call_args[0], packed.matrices[path], policy, plan[path],
                     module.get_variable("params", "bias"), backend)
    if isinstance(module, nn.Embed):
      path = "/".join((*module.path, "embedding"))
      if path in packed.tables:
        codes = module.embedding[call_args[0]].astype(jnp.float32) + 2**(_TABLE_BITS - 1)
        entry = packed.tables[path]
        return entry["scale"] * (codes - entry["zero"])  # `quant.QArray.dequantize`
    return next_fun(*call_args, **call_kwargs)

  with nn.intercept_methods(interceptor):
    return model.apply({"params": params}, *args, **kwargs)


def _file_arrays(packed: PackedModel) -> dict[str, Array]:
  """Every array of `packed` under its name in the file: `params/<path>`,
  `matrices/<kernel path>/<name>` (`b{b}/words`, ...) and `tables/<table path>/<name>`."""
  arrays = {f"params/{p}": v for p, v in quant.flatten_params(packed.params).items()}
  for kind, tree in (("matrices", packed.matrices), ("tables", packed.tables)):
    for p, entry in tree.items():
      arrays.update({f"{kind}/{p}/{k}": v for k, v in entry.items()})
  return arrays


def save_packed(packed: PackedModel, path: str | Path) -> Path:
  """`packed` as one safetensors file (module docstring), written atomically: its arrays
  (`_file_arrays`) and, in the metadata, `format`, `policy` and `config` (JSON) and
  `num_labels` ("null" when absent). `path` must end in .safetensors."""
  if type(packed) is not PackedModel or packed.layout_tile is not None:
    raise TypeError("save_packed stores a PackedModel as exported, not one laid out for the "
                    "kernels or the int8 path; save the packed model that `lay_out_for_kernels` "
                    "or `lay_out` was given.")
  path = Path(path)
  if path.suffix != ".safetensors":
    raise ValueError(f"{path}: packed models are written as safetensors; name the file "
                     "*.safetensors (old .npz exports still load).")
  metadata = {"format": _FORMAT, "policy": json.dumps(packed.policy.to_json()),
              "config": json.dumps(None if packed.config is None else packed.config.to_dict()),
              "num_labels": json.dumps(packed.num_labels)}
  return files.write_safetensors(path, {k: np.asarray(v) for k, v in
                                        _file_arrays(packed).items()}, metadata)


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Arrays and metadata (JSON values decoded) of a safetensors packed file."""
  try:
    arrays, metadata = files.read_safetensors(path)
  except ValueError as e:
    raise ValueError(f"{e} It is torn or truncated (a partial copy or download, a full disk) or "
                     "not a packed model: export again, `python -m mpqbert.export --workdir=RUN "
                     "--out=FILE.safetensors`.") from None
  meta = {"format": metadata.get("format")}
  try:
    meta.update({k: json.loads(metadata[k]) for k in ("policy", "config", "num_labels")})
  except (KeyError, json.JSONDecodeError):
    if meta["format"] == _FORMAT:
      raise ValueError(f"{path}: its metadata lacks a valid policy, config or num_labels; "
                       "export again.") from None
  return arrays, meta


def _read_npz(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Arrays and metadata of a packed file of the old format: one .npz, the metadata as JSON in
  a uint8 `__meta__` entry."""
  with np.load(path) as f:
    if "__meta__" not in f.files:
      raise ValueError(f"{path} is not an mpqbert packed model (no __meta__ entry).")
    meta = json.loads(bytes(f["__meta__"]).decode())
    return {k: f[k] for k in f.files if k != "__meta__"}, meta


def load_packed(path: str | Path) -> PackedModel:
  """A packed file back as a `PackedModel`; `.apply(...)` runs it. Reads what `save_packed`
  writes (safetensors) and the .npz files earlier versions wrote, told apart by their content
  (a zip archive's first bytes), not by the file's name."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no packed model at {path}; write one with `python -m mpqbert.export "
                            "--workdir=RUN --out=FILE.safetensors` or save_packed.")
  with path.open("rb") as f:
    is_zip = f.read(4) == b"PK\x03\x04"
  arrays, meta = (_read_npz if is_zip else _read_safetensors)(path)
  if meta.get("format") != _FORMAT:
    raise ValueError(f"{path} has format {meta.get('format')!r}, expected {_FORMAT!r}; "
                     "export the run again with this version.")
  params, matrices, tables = {}, {}, {}
  for key, value in arrays.items():
    kind, rest = key.split("/", 1)
    value = jnp.asarray(value)
    if kind == "params":
      params[rest] = value
    elif kind == "matrices":
      matrix_path, name = rest.split("/kernel/", 1)
      matrices.setdefault(matrix_path + "/kernel", {})[name] = value
    else:
      table_path, name = rest.rsplit("/", 1)
      tables.setdefault(table_path, {})[name] = value
  config = None if meta.get("config") is None else BertConfig(**meta["config"])
  return PackedModel(params=traverse_util.unflatten_dict(params, sep="/"), matrices=matrices,
                     tables=tables, policy=Policy.from_json(meta["policy"]), config=config,
                     num_labels=meta.get("num_labels"))
