"""What to quantize and how: regex rules over parameter paths, resolved per matrix.

A `QuantSpec` is the search space and the numerics: which kernels are quantized (the first `Rule`
whose `pattern` matches a parameter path such as
`bert/encoder/layer/3/attention/self/query/kernel`), with which quantizer, how many sub-groups and
which bit choices; plus activation and embedding settings. `spec.plan(params)` resolves it against
a concrete parameter tree into one `MatrixSpec` per quantized kernel.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import numpy as np

from mpqbert.quant import grid
from mpqbert.quant.layout import EMBEDDING_QUANTIZERS, ModelLayout
from mpqbert.quant.registry import QUANTIZER_BITS, SCALES_PER_GROUP

ACTIVATION_MODES = ("learned", "moving")
FULL_PRECISION = 32
# Packed codes live in 32-bit words along the reduction axis, floor(32 / b) to a word
# (`mpqbert.kernels.packing`): the storage every size in the project counts.
WORD_BITS = 32
SCALE_BITS = 32  # Each stored scale float is float32.

Groups = int | str  # a count, "head" (num_heads groups) or "neuron" (one per output neuron)


def _check_bits_or_fp(name: str, bits: int) -> None:
  if bits != FULL_PRECISION and not 2 <= bits <= 8:
    raise ValueError(f"{name}={bits} is not supported; use 2..8, or {FULL_PRECISION} to keep "
                     "full precision.")


def _check_input_bits(name: str, bits: int | None) -> None:
  """A matrix's input bits: None (the global setting), 1 (sign, binarized), 2..8 or 32."""
  if bits is not None and bits != 1:
    _check_bits_or_fp(name, bits)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
  """Quantize kernels whose parameter path matches `pattern` (`re.search`)."""

  pattern: str
  quantizer: str = "symmetric"
  groups: Groups = 1
  bit_choices: tuple[int, ...] = (0, 2, 4, 8)
  learn_range: bool = False  # "index" only: learn (lo, hi) instead of taking min/max of w.
  # Bits of the matmul's input: None takes the spec's (or policy's) activation_bits; 1 binarizes
  # it to sign(x), which with 1-bit weights makes the product an XNOR-popcount (SensiMix).
  activation_bits: int | None = None

  def __post_init__(self):
    _check_input_bits("Rule.activation_bits", self.activation_bits)
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f"Rule.pattern {self.pattern!r} is not a valid regex: {e}") from None
    if self.quantizer not in QUANTIZER_BITS:
      raise ValueError(f"unknown quantizer {self.quantizer!r}; use one of "
                       f"{sorted(QUANTIZER_BITS)}.")
    object.__setattr__(self, "bit_choices", tuple(int(b) for b in self.bit_choices))
    supported = QUANTIZER_BITS[self.quantizer]
    bad = [b for b in self.bit_choices if b not in supported]
    if not self.bit_choices or bad or len(set(self.bit_choices)) != len(self.bit_choices):
      raise ValueError(f"bit_choices {self.bit_choices} for the {self.quantizer!r} quantizer "
                       f"must be distinct values from {supported}.")
    if not (isinstance(self.groups, int) and self.groups >= 1) and self.groups not in ("head",
                                                                                     "neuron"):
      raise ValueError(f"groups={self.groups!r}; use a positive count, 'head' or 'neuron'.")
    if self.learn_range and self.quantizer != "index":
      raise ValueError("learn_range applies to the 'index' quantizer only.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MatrixSpec:
  """One quantized kernel: its path, shape and sub-group partition (`groups` blocks of output
  columns, `group_widths`), and the rule's settings."""

  path: str
  shape: tuple[int, ...]
  groups: int
  quantizer: str
  bit_choices: tuple[int, ...]
  learn_range: bool = False
  activation_bits: int | None = None

  def __post_init__(self):
    try:  # An empty last sub-group, from a rule or a policy file, is refused when made.
      grid.group_widths(self.shape[-1], self.groups)
    except ValueError as e:
      raise ValueError(f"{self.path}: {e}") from None

  def input_bits(self, default: int) -> int:
    """Bits of this matrix's input, given the global activation bits."""
    return default if self.activation_bits is None else self.activation_bits

  @property
  def group_widths(self) -> tuple[int, ...]:
    """Output columns of each sub-group: ceil(N / G), the last one what remains."""
    return grid.group_widths(self.shape[-1], self.groups)

  @property
  def group_sizes(self) -> np.ndarray:
    """Weights of each sub-group `[G]` (its columns times the K rows)."""
    return math.prod(self.shape[:-1]) * np.asarray(self.group_widths, np.int64)

  @property
  def scale_floats(self) -> int:
    """float32 scale values stored per kept sub-group."""
    return SCALES_PER_GROUP[self.quantizer]

  def code_bits(self, bits: Any) -> np.ndarray:
    """Storage bits of each sub-group's codes `[G]`, sub-group g at `bits[g]` (one int: all at
    it): each of its output columns packs K codes into ceil(K / floor(32 / b)) words. That is
    b * group_sizes when floor(32 / b) divides K (1, 2, 4, 8 bits on BERT's K = 384, 768, ...);
    3-bit codes, 10 to a word, cost 3.2 bits and more."""
    bits = np.broadcast_to(np.asarray(bits, np.int64), (self.groups,))
    k = math.prod(self.shape[:-1])
    words = -(-k // (WORD_BITS // np.maximum(bits, 1)))
    return np.where(bits == 0, 0, words * WORD_BITS * np.asarray(self.group_widths, np.int64))

  def storage_bits(self, bits: Any) -> np.ndarray:
    """Storage bits of each sub-group `[G]` at `bits` (as `code_bits`): its packed codes plus its
    float32 scales (none when pruned). The one formula of every size: policies, the search's
    expected size, the knapsack, and the packed checkpoint's bytes. Per sub-group, since an
    uneven last sub-group is narrower and stores fewer codes."""
    bits = np.broadcast_to(np.asarray(bits, np.int64), (self.groups,))
    return self.code_bits(bits) + np.where(bits == 0, 0, SCALE_BITS * self.scale_floats)

  @property
  def choice_bits(self) -> np.ndarray:
    """`[G, K]`: `storage_bits` of each sub-group at each bit choice."""
    return np.stack([self.storage_bits(b) for b in self.bit_choices], axis=-1)

  def to_json(self) -> dict[str, Any]:
    out = {"shape": list(self.shape), "groups": self.groups, "quantizer": self.quantizer,
           "bit_choices": list(self.bit_choices), "learn_range": self.learn_range}
    if self.activation_bits is not None:
      out["activation_bits"] = self.activation_bits
    return out

  @classmethod
  def from_json(cls, path: str, d: Mapping[str, Any]) -> "MatrixSpec":
    return cls(path=path, shape=tuple(d["shape"]), groups=int(d["groups"]),
               quantizer=d["quantizer"], bit_choices=tuple(d["bit_choices"]),
               learn_range=bool(d.get("learn_range", False)),
               activation_bits=d.get("activation_bits"))


Plan = dict[str, MatrixSpec]  # parameter path -> MatrixSpec, sorted by path


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
  """Rules (first match wins; unmatched kernels stay float32), the model's layout and the global
  settings.

  layout: where the model keeps the matrices sizes count and the embedding tables
    (`ModelLayout`; BERT's is `mpqbert.models.BERT_LAYOUT`).

  activation_bits: bits of every quantized Dense's input (32: not quantized) during search;
    a `Policy` carries its own.
  activation_mode: "learned" (LSQ step size, trained) or "moving" (max|x| moving average,
    updated by `qapply(..., update_act_stats=True)`).
  embedding_bits: bits of the embedding tables during search (32: not quantized).
  embedding_quantizer: "symmetric" (every table, per row) or "index" (word and position tables,
    per tensor min-max, as SensiMix); the layout names the tables.
  num_heads: needed by rules with groups="head".
  binary_input_clip: the backward rule of inputs binarized to sign(x) (rules with
    activation_bits=1). None: straight through, the identity, as SensiMix's code does; c: the
    gradient only where |x| <= c (the hard-tanh rule of BinaryConnect). With unscaled 1-bit
    weights the inputs of an FFN's second matrix are GELUs of sums of hundreds of +-1 products,
    far outside [-1, 1], so a clip stops almost every gradient through that FFN.
  """

  rules: tuple[Rule, ...]
  layout: ModelLayout
  num_heads: int | None = None
  activation_bits: int = 8
  activation_mode: str = "learned"
  activation_momentum: float = 0.9
  embedding_bits: int = FULL_PRECISION
  embedding_quantizer: str = "symmetric"
  binary_input_clip: float | None = None

  def __post_init__(self):
    object.__setattr__(self, "rules", tuple(self.rules))
    if self.embedding_quantizer not in EMBEDDING_QUANTIZERS:
      raise ValueError(f"embedding_quantizer={self.embedding_quantizer!r}; use one of "
                       f"{EMBEDDING_QUANTIZERS}.")
    if not isinstance(self.layout, ModelLayout):
      raise TypeError("QuantSpec.layout must be a ModelLayout (BERT: mpqbert.models.BERT_LAYOUT).")
    if not all(isinstance(r, Rule) for r in self.rules):
      raise TypeError("QuantSpec.rules must be a sequence of Rule.")
    _check_bits_or_fp("activation_bits", self.activation_bits)
    _check_bits_or_fp("embedding_bits", self.embedding_bits)
    if self.activation_mode not in ACTIVATION_MODES:
      raise ValueError(f"activation_mode={self.activation_mode!r}; use one of "
                       f"{ACTIVATION_MODES}.")
    if not 0.0 <= self.activation_momentum < 1.0:
      raise ValueError(f"activation_momentum={self.activation_momentum} must be in [0, 1).")
    if self.binary_input_clip is not None and not self.binary_input_clip > 0:
      raise ValueError(f"binary_input_clip={self.binary_input_clip} must be positive, or None "
                       "for the straight-through identity.")
    if any(r.groups == "head" for r in self.rules) and not self.num_heads:
      raise ValueError("a rule uses groups='head': set QuantSpec.num_heads.")

  def resolve(self, path: str, shape: Sequence[int]) -> MatrixSpec | None:
    """The `MatrixSpec` of the kernel at `path`, or None when no rule matches it."""
    for rule in self.rules:
      if re.search(rule.pattern, path):
        out = int(shape[-1])
        groups = {"head": self.num_heads, "neuron": out}.get(rule.groups, rule.groups)
        # Uneven is fine (the last group smaller); MatrixSpec refuses an empty last group.
        return MatrixSpec(path=path, shape=tuple(int(d) for d in shape), groups=int(groups),
                          quantizer=rule.quantizer, bit_choices=rule.bit_choices,
                          learn_range=rule.learn_range, activation_bits=rule.activation_bits)
    return None

  def plan(self, params: Any) -> Plan:
    """Every quantized kernel of `params` (a nested dict of arrays), keyed by path."""
    plan = {}
    for path, value in sorted(flatten_params(params).items()):
      if path.split("/")[-1] == "kernel":
        matrix = self.resolve(path, np.shape(value))
        if matrix is not None:
          plan[path] = matrix
    if not plan:
      raise ValueError("no kernel of the model matches the QuantSpec rules "
                       f"{[r.pattern for r in self.rules]}; check the patterns against the "
                       "parameter paths (e.g. 'bert/encoder/layer/0/attention/self/query/kernel').")
    return plan


def flatten_params(params: Any, prefix: str = "") -> dict[str, Any]:
  """Nested dict -> {"a/b/c": leaf}."""
  if isinstance(params, Mapping):
    flat = {}
    for name, child in params.items():
      flat.update(flatten_params(child, f"{prefix}{name}/"))
    return flat
  return {prefix[:-1]: params}

