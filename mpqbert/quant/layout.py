"""`ModelLayout`: which parameters of a model the size accounting and embedding quantization see.

The quantizer core knows no model. A model names, as regexes (`re.search`) over parameter paths
such as "bert/encoder/layer/0/output/dense/kernel", the weight matrices whose storage is the
reported `size_mb` and the embedding tables that `embedding_bits` quantizes; BERT's is
`mpqbert.models.BERT_LAYOUT`.
"""

from __future__ import annotations

import dataclasses
import re

EMBEDDING_QUANTIZERS = ("symmetric", "index")
_NOTHING = r"(?!)"  # A regex that matches no path.


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelLayout:
  """Regexes over parameter paths (hashable: a `QuantSpec` holds one as jit-static metadata).

  matrices: the weight matrices `size_mb` counts (the part a policy compresses; those a policy
    leaves out count at 32 bits). Every other parameter is `size_mb_other`.
  embedding_tables: the tables the "symmetric" embedding quantizer quantizes (per row).
  index_embedding_tables: the tables the "index" embedding quantizer quantizes (per tensor
    min-max, SensiMix's recipe).
  """

  name: str
  matrices: str
  embedding_tables: str = _NOTHING
  index_embedding_tables: str = _NOTHING

  def __post_init__(self):
    for field in ("matrices", "embedding_tables", "index_embedding_tables"):
      try:
        re.compile(getattr(self, field))
      except re.error as e:
        raise ValueError(f"ModelLayout {self.name!r}: {field}={getattr(self, field)!r} is not a "
                         f"valid regex: {e}") from None

  def is_matrix(self, path: str) -> bool:
    """Whether `path` is one of the weight matrices whose storage is `size_mb`."""
    return re.search(self.matrices, path) is not None

  def is_table(self, path: str, embedding_quantizer: str) -> bool:
    """Whether `embedding_quantizer` quantizes the table at `path` (when embedding_bits < 32)."""
    if embedding_quantizer not in EMBEDDING_QUANTIZERS:
      raise ValueError(f"embedding_quantizer={embedding_quantizer!r}; use one of "
                       f"{EMBEDDING_QUANTIZERS}.")
    tables = (self.embedding_tables if embedding_quantizer == "symmetric"
              else self.index_embedding_tables)
    return re.search(tables, path) is not None
