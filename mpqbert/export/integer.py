r"""Integer inference on the CPU: a packed model laid out once as int8 matrices, run with
`int8 x int8 -> int32` matmuls.

    integer = export.lay_out(export.load_packed("model.safetensors"), "int8")
    logits = jax.jit(lambda m, ids, mask: m.apply(ids, attention_mask=mask,
                                                  deterministic=True))(integer, ids, mask)

`lay_out` is the one way in: it reads a `PackedModel` (the file format is unchanged) and returns an
`IntegerModel` whose `.apply` takes `PackedModel.apply`'s arguments. All layout work happens in
`lay_out`, once; the forward holds no unpacking (one int8 dot per matrix, see the tests).

Layout of one packed matrix `[K, N]` (`lay_out_matrix`): its 1/2/3/4/8-bit codes (every bit-width
block, `kernels.unpack`) as ONE int8 `[K, N']` matrix in the original column order, where `N'`
leaves out the columns of pruned sub-groups (their outputs are the bias alone: the forward puts
zeros back in their place with one gather, fused into the epilogue); per column a float32 scale and,
for index matrices, a zero point. Index codes `0 .. 2^b - 1` are shifted by `-2^(b-1)` into int8
(8-bit codes 0..255 do not fit it otherwise) and the shift is folded into the zero point:
`w = scale * (code - zero) = scale * ((code - 2^(b-1)) - (zero - 2^(b-1)))`; centred codes also
keep the zero-point correction small. Per-column values come from per-sub-group ones through
`column_groups`, the one place that knows how columns split into sub-groups.

The forward of a Dense layer `x [M, K] -> [M, N]`, by the kind of its input (`input_kind`):

  "int"    input quantized to b = 2..8 bits (`quant.quantize_activation`: symmetric, step
           `act_scale`, round to nearest even, clip to [-2^(b-1), 2^(b-1) - 1]): `x_q` int8,
           `acc = x_q @ codes` int32, then one float32 epilogue (`a = act_scale * col_scale`)
             `y = acc * a - rowsum(x_q) * (a * zero) + bias`
           (the middle term only for index matrices);
  "sign"   input binarized to sign(x) (sign(0) = +1; SensiMix's 1-bit FFNs): `x_q` = +-1 int8 and
           the same int8 dot and epilogue with an activation scale of 1. Where every kept column
           holds 1-bit weights (+-1), the product can instead be XNOR-popcount on sign words packed
           32 to a uint32 (`kernels.xnor_matmul`): `lay_out(..., sign_matmul=)` picks "int8",
           "popcount", or "auto", the faster of the two for the matrix's shape on this backend,
           timed once at layout (on this project's CPU popcount won at K=384 and lost at K=1536,
           `experiments/results/integer_inference_cpu.md`). Both give the same integers.
  "float"  input not quantized (input bits 32, e.g. SensiMix's attention and 8-bit FFNs), or an
           activation scale still 0 (never calibrated: the fake-quantized model passes such
           inputs through unchanged): no integer activations exist, so the weight is dequantized
           once here to float32 `[K, N]` and the layer is a float32 matmul, as the float model's.

Rounding against the fake-quantized model (`quant.transform`): it computes `Q(x) @ Q(w)` in
float32 from dequantized values, each product and partial sum rounded to float32. The integer
path's codes are the same (the same `quant.grid` functions round `x / act_scale`, and the weight
codes are those on disk, which training dequantized), its accumulation is exact, and it rounds
only in the epilogue (the float32 product `act_scale * col_scale`, the int32 -> float32 conversion
of `acc`, the correction and the bias). So a layer's outputs differ by float32 rounding
(about 1e-7 relative to the sum of |terms|), except where a later layer's input lies within such
a rounding of a quantization threshold: its code moves by one step there, and that difference
propagates. With binarized inputs and 1-bit weights both paths are exact (integer sums of +-1
are exact in float32, and `quant.xnor_scale` cuts its mantissa so that scale times sum is exact).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mpqbert import kernels, quant
from mpqbert.export.packed import PackedModel, bit_blocks, packed_apply
from mpqbert.quant import FULL_PRECISION, Policy
from mpqbert.quant.quantizers import positive_step

Array = jax.Array
LAYOUTS = ("int8",)
SIGN_MATMULS = ("auto", "int8", "popcount")
_PROBE_ROWS = 1024  # Rows of the probe input that times the two sign products at layout.
_DOT = (((1,), (0,)), ((), ()))  # [M, K] x [K, N]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class IntegerModel(PackedModel):
  """A packed model laid out for integer inference (`lay_out`): the fields of `PackedModel`, with
  `matrices` holding per packed kernel path its laid-out arrays (`lay_out_matrix`) and `params`
  in float32 (index tables stay int8 codes). In memory only: `save_packed` stores the packed
  model it came from."""

  def apply(self, *args, **kwargs) -> Any:
    """The model's forward pass (arguments as `BertForSequenceClassification`, as
    `PackedModel.apply`) with every packed matrix run by `integer_dense`. Pure and jit-able."""
    return packed_apply(self.model(), self, *args, dense=integer_dense, **kwargs)


def column_groups(matrix: quant.MatrixSpec) -> np.ndarray:
  """The sub-group of each output column, `[N]` (contiguous blocks of `matrix.group_widths`, the
  last one narrower when the groups are uneven): every per-column expansion below follows it."""
  return np.repeat(np.arange(matrix.groups), matrix.group_widths)


def kept_columns(policy: Policy, matrix: quant.MatrixSpec) -> np.ndarray:
  """Output columns of the sub-groups the policy keeps (bits > 0), in order."""
  return np.flatnonzero(np.asarray(policy.bits[matrix.path])[column_groups(matrix)] > 0)


def input_kind(policy: Policy, matrix: quant.MatrixSpec, entry: Mapping[str, Array]) -> str:
  """"int", "sign" or "float": how this matrix's input reaches the integer path (module
  docstring). Decided at layout time, from the policy and the concrete activation scale."""
  bits = matrix.input_bits(policy.activation_bits)
  if bits == 1:
    return "sign"
  if bits >= FULL_PRECISION:
    return "float"
  if "act_scale" not in entry:
    raise ValueError(f"{matrix.path}: {bits}-bit inputs but the packed entry has no act_scale; "
                     "export the model again with its qparams (export_packed(..., qparams)).")
  return "int" if float(entry["act_scale"]) != 0.0 else "float"


def unpack_matrix(entry: Mapping[str, Array], policy: Policy, matrix: quant.MatrixSpec
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """A packed entry's codes `[K, N]` (int32, the stored codes: unsigned for index matrices),
  per-column scales and zero points `[N]` (float32), in the original column order; pruned
  columns have code, scale and zero 0."""
  k, n = matrix.shape
  groups_of = column_groups(matrix)
  codes = np.zeros((k, n), np.int32)
  scale = np.zeros((n,), np.float32)
  zero = np.zeros((n,), np.float32)
  signed = matrix.quantizer != "index"
  for b, groups in bit_blocks(policy, matrix.path):
    cols = np.flatnonzero(np.isin(groups_of, groups))  # the block's storage order
    codes[:, cols] = np.asarray(kernels.unpack(entry[f"b{b}/words"], b, k, signed=signed))
    position = np.searchsorted(groups, groups_of[cols])  # each column's place in the block
    if f"b{b}/scale" in entry:
      scale[cols] = np.asarray(entry[f"b{b}/scale"], np.float32)[position]
    else:  # Sign matrices store no scale: w = sign(w).
      scale[cols] = 1.0
    if f"b{b}/zero" in entry:
      zero[cols] = np.asarray(entry[f"b{b}/zero"], np.float32)[position]
  return codes, scale, zero


def code_shift(policy: Policy, matrix: quant.MatrixSpec) -> np.ndarray:
  """Per column the shift `2^(b-1)` that centres unsigned b-bit index codes in int8 (0 for
  signed codes and pruned columns)."""
  if matrix.quantizer != "index":
    return np.zeros((matrix.shape[-1],), np.int32)
  bits = np.asarray(policy.bits[matrix.path])[column_groups(matrix)]
  return np.where(bits > 0, 2 ** np.maximum(bits - 1, 0), 0).astype(np.int32)


def lay_out_matrix(entry: Mapping[str, Array], policy: Policy, matrix: quant.MatrixSpec,
                   sign_matmul: str = "int8") -> dict[str, Array]:
  """The arrays `integer_dense` runs one packed matrix with:

    "int" / "sign" inputs: `codes` int8 `[K, N']` (kept columns), `scale` float32 `[N']`
      (act_scale * column scale), `correction` `[N']` (scale * zero; index matrices only) and
      `act_scale` (int inputs only); or, for "sign" inputs and +-1 weights under `sign_matmul`
      "popcount" (or "auto" where popcount was faster), `sign_words` uint32 `[K/32, N']` in place
      of `codes`;
    "float" inputs: `weight` float32 `[K, N]`, the dequantized matrix.
  """
  codes, scale, zero = unpack_matrix(entry, policy, matrix)
  kind = input_kind(policy, matrix, entry)
  if kind == "float":  # As `quant.QArray.dequantize`, from the stored (unshifted) codes.
    weight = scale * (codes.astype(np.float32) - zero)
    return {"weight": jnp.asarray(weight, jnp.float32)}
  shift = code_shift(policy, matrix)
  codes, zero = codes - shift, zero - shift.astype(np.float32)
  if codes.min(initial=0) < -128 or codes.max(initial=0) > 127:
    raise ValueError(f"{matrix.path}: codes outside int8 after the shift; the packed entry does "
                     "not hold the policy's bit-widths (export it again).")
  act_scale = None
  if kind == "int":
    act_scale = positive_step(jnp.asarray(entry["act_scale"], jnp.float32))
    scale = np.float32(act_scale) * scale
  kept = kept_columns(policy, matrix)
  out = {"codes": jnp.asarray(codes[:, kept], jnp.int8), "scale": jnp.asarray(scale[kept])}
  if matrix.quantizer == "index":
    out["correction"] = jnp.asarray((scale * zero)[kept], jnp.float32)
  if act_scale is not None:
    out["act_scale"] = act_scale
  if kind == "sign" and sign_matmul != "int8" and np.all(np.abs(codes[:, kept]) == 1):
    words = kernels.pack_signs(jnp.asarray(codes[:, kept], jnp.float32), axis=0)
    if sign_matmul == "popcount" or _faster_sign_matmul(out["codes"], words,
                                                        matrix.shape[0]) == "popcount":
      out["sign_words"] = words
      del out["codes"]
  return out


def _popcount_matmul(x: Array, words: Array, k: int) -> Array:
  """int32 `sign(x) @ W` for +-1 weights packed as sign words `[K/32, N']`."""
  return kernels.xnor_matmul(kernels.pack_signs(x), words, k, backend="reference")


def _int8_sign_matmul(x: Array, codes: Array) -> Array:
  return jax.lax.dot_general(quant.grid.sign_codes(x).astype(jnp.int8), codes, _DOT,
                             preferred_element_type=jnp.int32)


def _faster_sign_matmul(codes: Array, words: Array, k: int, repeats: int = 3) -> str:
  """"int8" or "popcount", whichever multiplies a probe `[_PROBE_ROWS, K]` input by this
  matrix faster here (minimum of `repeats` timed calls after a compiling one)."""
  x = jax.random.normal(jax.random.key(0), (_PROBE_ROWS, k), jnp.float32)
  candidates = {"int8": (jax.jit(_int8_sign_matmul), codes),
                "popcount": (jax.jit(_popcount_matmul, static_argnums=2), words)}
  best = {}
  for name, (fn, weight) in candidates.items():
    args = (x, weight, k) if name == "popcount" else (x, weight)
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times.append(time.perf_counter() - start)
    best[name] = min(times)
  return min(best, key=best.get)


def _input_codes(x: Array, entry: Mapping[str, Array], bits: int) -> Array:
  """int8 codes of a Dense input: `quant.quantize_activation`'s grid (the same `quant.grid`
  call, so the same rounding of `x / act_scale`), or sign(x) for binarized inputs."""
  if bits == 1:
    return quant.grid.sign_codes(x).astype(jnp.int8)
  return quant.grid.symmetric(x, entry["act_scale"].reshape(1), bits).codes.astype(jnp.int8)


def _restore_pruned(y: Array, kept: np.ndarray, n: int) -> Array:
  """`[M, N']` outputs of the kept columns -> `[M, N]` with zeros in the pruned columns."""
  if len(kept) == n:
    return y
  index = np.full((n,), len(kept), np.int32)
  index[kept] = np.arange(len(kept), dtype=np.int32)
  return jnp.take(jnp.pad(y, ((0, 0), (0, 1))), index, axis=1)


def integer_dense(x: Array, entry: Mapping[str, Array], policy: Policy,
                  matrix: quant.MatrixSpec, bias: Array, backend: str = "auto") -> Array:
  """One laid-out Dense layer `x [..., K] -> [..., N]`: an int8 x int8 -> int32 dot and a float32
  epilogue (module docstring), or a float32 matmul for float inputs. `backend` is unused (no
  kernel runs); it is there for `packed_apply`'s `dense` hook."""
  del backend
  k, n = matrix.shape
  x2 = x.reshape(-1, k)
  if "weight" in entry:
    y = jnp.dot(x2.astype(jnp.float32), entry["weight"])
  else:
    if "sign_words" in entry:  # XNOR-popcount (+-1 weights, binarized inputs, no zero point).
      acc = _popcount_matmul(x2, entry["sign_words"], k)
    else:
      xq = _input_codes(x2, entry, matrix.input_bits(policy.activation_bits))
      acc = jax.lax.dot_general(xq, entry["codes"], _DOT, preferred_element_type=jnp.int32)
    y = acc.astype(jnp.float32) * entry["scale"]
    if "correction" in entry:
      rows = jnp.sum(xq, axis=1, keepdims=True, dtype=jnp.int32).astype(jnp.float32)
      y = y - rows * entry["correction"]
    y = _restore_pruned(y, kept_columns(policy, matrix), n)
  return (y + bias).reshape(*x.shape[:-1], n)


def lay_out(packed: PackedModel, layout: str = "int8", *, sign_matmul: str = "auto"
            ) -> IntegerModel:
  """`packed` laid out for integer inference on the CPU (module docstring); `layout` is the one
  layout there is, "int8"; `sign_matmul` how binarized inputs meet +-1 weights ("auto": the
  faster of "int8" and "popcount" per matrix, timed here). The packed model is unchanged."""
  if layout not in LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}.")
  if sign_matmul not in SIGN_MATMULS:
    raise ValueError(f"unknown sign_matmul {sign_matmul!r}; choose one of {SIGN_MATMULS}.")
  if packed.layout_tile is not None:
    raise ValueError("lay_out takes a packed model as exported or loaded, not one laid out for "
                     "the kernels (lay_out_for_kernels): pass the model that was given to it.")
  plan = packed.policy.plan
  matrices = {path: lay_out_matrix(entry, packed.policy, plan[path], sign_matmul)
              for path, entry in packed.matrices.items()}
  params = jax.tree.map(lambda v: v if v.dtype == jnp.int8 else jnp.asarray(v, jnp.float32),
                        packed.params)
  return IntegerModel(params=params, matrices=matrices, tables=packed.tables,
                      policy=packed.policy, config=packed.config, num_labels=packed.num_labels)


def sign_matmuls(model: IntegerModel) -> dict[str, str]:
  """"int8" or "popcount" for each laid-out matrix with binarized inputs: what `lay_out` chose."""
  plan = model.policy.plan
  return {path: "popcount" if "sign_words" in entry else "int8"
          for path, entry in model.matrices.items()
          if plan[path].input_bits(model.policy.activation_bits) == 1}


def input_kinds(packed: PackedModel) -> dict[str, str]:
  """Each packed matrix's `input_kind`: which run the int8 path and which stay float32."""
  plan = packed.policy.plan
  return {path: input_kind(packed.policy, plan[path], entry)
          for path, entry in packed.matrices.items()}
