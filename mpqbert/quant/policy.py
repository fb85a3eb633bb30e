"""`Policy`: the chosen bit-width of every sub-group, and exact size accounting.

A policy is a pytree whose leaves are the `[G]` int32 bit arrays (one per quantized kernel); the
matrix layout (`MatrixSpec`s) and the embedding / activation bits are static metadata. Sizes
follow one convention (../shared/DESIGN.md):

  size_mb        the layout's weight matrices (`ModelLayout.matrices`; BERT: the encoder's)
                 under the policy: per sub-group
                 `MatrixSpec.storage_bits` (its codes packed in 32-bit words, b bits per weight
                 except 3-bit codes at 10 to a word, + 32 * scale floats if kept; pruned groups
                 cost nothing); matrices the policy leaves out count at 32 bits; / 8 / 2^20.
  size_mb_other  every other parameter at `other_bits` (32, or 16 for half precision), except
                 embedding tables at `embedding_bits` when that is below 32: per row with one
                 float32 scale per row ("symmetric"), or the word and position tables with a
                 float32 (min, max) each ("index").
  compression    32-bit size of the encoder matrices / size_mb.
  avg_bits       packed code bits of the encoder matrices (without scales) / their weight count.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from mpqbert import files
from mpqbert.quant.layout import EMBEDDING_QUANTIZERS, ModelLayout
from mpqbert.quant.spec import FULL_PRECISION, MatrixSpec, Plan, _check_bits_or_fp, flatten_params

OTHER_BITS = (16, FULL_PRECISION)  # Storage of the unquantized parameters: half or float32.

_FORMAT = "mpqbert-policy/1"
BITS_PER_MB = 8 * 2**20  # Bits per MB (MiB) in every size this project reports.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Policy:
  """Bits per sub-group of every quantized kernel, plus embedding, activation and other bits.

  Build one with `uniform_policy`, `policy_from_logits` or `Policy.load`; those validate it.
  """

  bits: dict[str, jax.Array]  # path -> [G] int bit-widths (pytree leaves)
  matrices: tuple[MatrixSpec, ...] = dataclasses.field(metadata=dict(static=True))
  embedding_bits: int = dataclasses.field(default=FULL_PRECISION, metadata=dict(static=True))
  activation_bits: int = dataclasses.field(default=FULL_PRECISION, metadata=dict(static=True))
  embedding_quantizer: str = dataclasses.field(default="symmetric", metadata=dict(static=True))
  other_bits: int = dataclasses.field(default=FULL_PRECISION, metadata=dict(static=True))

  @property
  def plan(self) -> Plan:
    return {m.path: m for m in self.matrices}

  def _identity(self) -> tuple:
    bits = tuple((p, np.asarray(b).tobytes()) for p, b in sorted(self.bits.items()))
    return (bits, self.matrices, self.embedding_bits, self.activation_bits,
            self.embedding_quantizer, self.other_bits)

  def __eq__(self, other: object) -> bool:
    """Equal bits and settings. By value, so that a Policy held as static metadata (a
    `PackedModel`'s) can be compared and hashed by jit, which arrays alone cannot."""
    return isinstance(other, Policy) and self._identity() == other._identity()

  def __hash__(self) -> int:
    return hash(self._identity())

  def validate(self) -> "Policy":
    """Checks the layout and that every bit-width is one of its matrix's choices."""
    _check_bits_or_fp("embedding_bits", self.embedding_bits)
    _check_bits_or_fp("activation_bits", self.activation_bits)
    if self.embedding_quantizer not in EMBEDDING_QUANTIZERS:
      raise ValueError(f"embedding_quantizer={self.embedding_quantizer!r}; use one of "
                       f"{EMBEDDING_QUANTIZERS}.")
    if self.other_bits not in OTHER_BITS:
      raise ValueError(f"other_bits={self.other_bits}; use 16 (half precision) or 32.")
    if set(self.bits) != set(self.plan):
      raise ValueError("Policy.bits and Policy.matrices name different matrices.")
    for path, matrix in self.plan.items():
      bits = np.asarray(self.bits[path])
      if bits.shape != (matrix.groups,):
        raise ValueError(f"{path}: policy has bits of shape {bits.shape}, expected "
                         f"({matrix.groups},) (one per sub-group).")
      bad = sorted(set(bits.tolist()) - set(matrix.bit_choices))
      if bad:
        raise ValueError(f"{path}: bit-width(s) {bad} are not supported here; this matrix's "
                         f"{matrix.quantizer!r} quantizer has bit choices {matrix.bit_choices}. "
                         "Add them to the rule's bit_choices or change the policy.")
    return self

  def check_matches(self, plan: Plan) -> None:
    """Raises a clear error if this policy was made for another model or spec than `plan`."""
    mine, theirs = self.plan, plan
    missing, extra = sorted(set(theirs) - set(mine)), sorted(set(mine) - set(theirs))
    if missing or extra:
      raise ValueError(
          "the policy was made for another model or QuantSpec: "
          + (f"it lacks {missing[:3]}{'...' if len(missing) > 3 else ''} " if missing else "")
          + (f"it has matrices the model lacks: {extra[:3]}{'...' if len(extra) > 3 else ''}"
             if extra else "")
          + ". Derive the policy from this model's plan (spec.plan(params)).")
    for path, matrix in theirs.items():
      got = mine[path]
      if (got.shape, got.groups, got.quantizer) != (matrix.shape, matrix.groups,
                                                    matrix.quantizer):
        raise ValueError(
            f"the policy was made for another model or QuantSpec: {path} is shape {got.shape}, "
            f"{got.groups} groups, {got.quantizer!r} in the policy but shape {matrix.shape}, "
            f"{matrix.groups} groups, {matrix.quantizer!r} here.")
      bits = self.bits[path]
      if isinstance(bits, jax.core.Tracer):
        continue  # Checked where the policy met the plan outside jit (its values are unknown here).
      bad = sorted(set(np.asarray(bits).tolist()) - set(matrix.bit_choices))
      if bad:
        raise ValueError(
            f"{path}: the policy has bit-width(s) {bad}, which this QuantSpec's bit choices "
            f"{matrix.bit_choices} do not contain, so those sub-groups would quantize to zero. "
            "Use a spec whose rule has these bit_choices, or a policy over them.")

  def to_json(self) -> dict[str, Any]:
    return {"format": _FORMAT, "embedding_bits": self.embedding_bits,
            "activation_bits": self.activation_bits,
            "embedding_quantizer": self.embedding_quantizer, "other_bits": self.other_bits,
            "matrices": {m.path: {**m.to_json(), "bits": np.asarray(self.bits[m.path]).tolist()}
                         for m in self.matrices}}

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "Policy":
    if d.get("format") != _FORMAT:
      raise ValueError(f"not an mpqbert policy (format {d.get('format')!r}, expected "
                       f"{_FORMAT!r}).")
    matrices = tuple(MatrixSpec.from_json(p, m) for p, m in sorted(d["matrices"].items()))
    bits = {p: np.asarray(m["bits"], np.int32) for p, m in d["matrices"].items()}
    return cls(bits=bits, matrices=matrices, embedding_bits=int(d["embedding_bits"]),
               activation_bits=int(d["activation_bits"]),
               embedding_quantizer=d.get("embedding_quantizer", "symmetric"),
               other_bits=int(d.get("other_bits", FULL_PRECISION))).validate()

  def save(self, path: str | Path) -> Path:
    return files.write_atomic(path, json.dumps(self.to_json(), indent=1))

  @classmethod
  def load(cls, path: str | Path, plan: Plan | None = None) -> "Policy":
    """Reads a policy JSON; with `plan`, also checks it fits that model and spec."""
    path = Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"no policy file at {path}.")
    try:
      policy = cls.from_json(json.loads(path.read_text()))
    except (KeyError, TypeError, json.JSONDecodeError) as e:
      raise ValueError(f"{path} is not a valid policy file ({type(e).__name__}: {e}).") from None
    if plan is not None:
      policy.check_matches(plan)
    return policy

  def weight_bits(self, path: str) -> int:
    """Storage bits of one quantized matrix's packed codes (no scales)."""
    return int(self.plan[path].code_bits(np.asarray(self.bits[path])).sum())

  def matrix_bits(self, path: str) -> int:
    """Storage bits of one quantized matrix: packed codes plus the scales of kept groups."""
    return int(self.plan[path].storage_bits(np.asarray(self.bits[path])).sum())


def uniform_policy(plan: Plan, bits: int, *, embedding_bits: int = FULL_PRECISION,
                   activation_bits: int = FULL_PRECISION) -> Policy:
  """Every sub-group of every planned matrix at `bits`."""
  return Policy(bits={p: np.full((m.groups,), bits, np.int32) for p, m in plan.items()},
                matrices=tuple(plan.values()), embedding_bits=embedding_bits,
                activation_bits=activation_bits).validate()


def policy_from_logits(arch: Mapping[str, Any], plan: Plan, *,
                       embedding_bits: int = FULL_PRECISION,
                       activation_bits: int = FULL_PRECISION) -> Policy:
  """The argmax bit choice of every sub-group's architecture logits `[G, K]`."""
  bits = {}
  for path, matrix in plan.items():
    logits = np.asarray(arch[path])
    if logits.shape != (matrix.groups, len(matrix.bit_choices)):
      raise ValueError(f"{path}: logits of shape {logits.shape}, expected "
                       f"({matrix.groups}, {len(matrix.bit_choices)}).")
    bits[path] = np.asarray(matrix.bit_choices, np.int32)[np.argmax(logits, axis=-1)]
  return Policy(bits=bits, matrices=tuple(plan.values()), embedding_bits=embedding_bits,
                activation_bits=activation_bits).validate()


def size_report(params: Any, policy: Policy | None = None, *,
                layout: ModelLayout) -> dict[str, float]:
  """size_mb, size_mb_other, compression, avg_bits of `params` under `policy` (None: float32),
  with `layout` naming the matrices `size_mb` counts and the embedding tables.

  Also size_mb_total (both parts) and compression_total (the float32 model over it).
  """
  policy = policy or Policy(bits={}, matrices=())
  quantized = policy.plan
  quantize_tables = policy.embedding_bits < FULL_PRECISION
  matrix_bits = other_bits = matrix_weight_bits = matrix_count = total_count = 0
  for path, value in flatten_params(params).items():
    shape = np.shape(value)
    count = math.prod(shape)
    total_count += count
    if path in quantized:
      bits, weight_bits = policy.matrix_bits(path), policy.weight_bits(path)
    elif quantize_tables and layout.is_table(path, policy.embedding_quantizer):
      scales = shape[0] if policy.embedding_quantizer == "symmetric" else 2
      bits = weight_bits = count * policy.embedding_bits + scales * 32
    elif layout.is_matrix(path):
      bits = weight_bits = count * FULL_PRECISION
    else:
      bits = weight_bits = count * policy.other_bits
    if layout.is_matrix(path):
      matrix_bits += bits
      matrix_weight_bits += weight_bits
      matrix_count += count
    else:
      other_bits += bits
  if matrix_count == 0:
    raise ValueError(f"params have no weight matrices of the {layout.name!r} layout "
                     f"(regex {layout.matrices!r}); pass the layout of this model.")
  ratio = lambda fp32_count, bits: fp32_count * FULL_PRECISION / bits if bits else math.inf
  return {"size_mb": matrix_bits / BITS_PER_MB, "size_mb_other": other_bits / BITS_PER_MB,
          "compression": ratio(matrix_count, matrix_bits),
          "avg_bits": matrix_weight_bits / matrix_count,
          "size_mb_total": (matrix_bits + other_bits) / BITS_PER_MB,
          "compression_total": ratio(total_count, matrix_bits + other_bits)}
