"""BERT's parameter layout for quantization: its weight matrices, embedding tables and the spec
that quantizes every encoder layer.

`mpqbert.quant` knows no model; this module tells it where BERT (and DistilBERT converted to
BERT's names, `models/convert.py`) keeps the parts that sizes count and policies compress.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from mpqbert import quant

# The encoder's weight matrices (attention Q/K/V/O and both FFN matrices of every layer): the
# part whose size is `size_mb` (../shared/DESIGN.md). Embedding tables, quantized when
# embedding_bits < 32: every table per row (symmetric, max-abs scale) with embedding_quantizer
# "symmetric"; the word and position tables per tensor (min-max index, SensiMix's recipe) with
# "index".
BERT_LAYOUT = quant.ModelLayout(
    name="bert",
    matrices=(r"encoder/layer/\d+/(attention/self/(query|key|value)|attention/output/dense|"
              r"intermediate/dense|output/dense)/kernel$"),
    embedding_tables=r"embeddings/(word|position|token_type)_embeddings/embedding$",
    index_embedding_tables=r"embeddings/(word|position)_embeddings/embedding$")

# The matrix kinds of a BERT layer, for per-kind settings in `bert_encoder_spec`.
BERT_MATRIX_KINDS = {
    "qkv": r"encoder/layer/\d+/attention/self/(query|key|value)/kernel$",
    "attention_output": r"encoder/layer/\d+/attention/output/dense/kernel$",
    "ffn_in": r"encoder/layer/\d+/intermediate/dense/kernel$",
    "ffn_out": r"encoder/layer/\d+/output/dense/kernel$",
}

# Megatron-style model parallelism (`train.model_parallel`, `mpqbert.train.sharding`): Q, K, V
# and the FFN's first matrix split by output columns (whole heads / FFN neurons per device), the
# attention output and FFN output matrices by input rows, so each layer's attention and FFN block
# needs one all-reduce of its output. (regex, "column" | "row") pairs.
BERT_MODEL_PARALLEL = (
    (BERT_MATRIX_KINDS["qkv"], "column"),
    (BERT_MATRIX_KINDS["ffn_in"], "column"),
    (BERT_MATRIX_KINDS["attention_output"], "row"),
    (BERT_MATRIX_KINDS["ffn_out"], "row"),
)


def bert_encoder_spec(*, quantizer: str = "symmetric",
                      groups: quant.Groups | Mapping[str, quant.Groups] = 1,
                      bit_choices: Sequence[int] = (0, 2, 4, 8), num_heads: int | None = None,
                      **spec_kwargs) -> quant.QuantSpec:
  """A spec quantizing the six matrices of every encoder layer (`BERT_LAYOUT.matrices`).

  `groups` is one setting for all, or a mapping over the kinds of `BERT_MATRIX_KINDS`
  ("qkv", "attention_output", "ffn_in", "ffn_out"), e.g. {"qkv": "head", "ffn_in": 128, ...}.
  """
  if isinstance(groups, Mapping):
    if set(groups) != set(BERT_MATRIX_KINDS):
      raise ValueError(f"groups per kind needs exactly the kinds {sorted(BERT_MATRIX_KINDS)}; "
                       f"got {sorted(groups)}.")
    per_kind = dict(groups)
  else:
    per_kind = dict.fromkeys(BERT_MATRIX_KINDS, groups)
  rules = tuple(quant.Rule(pattern=BERT_MATRIX_KINDS[kind], quantizer=quantizer, groups=g,
                           bit_choices=tuple(bit_choices)) for kind, g in per_kind.items())
  return quant.QuantSpec(rules=rules, layout=BERT_LAYOUT, num_heads=num_heads, **spec_kwargs)
