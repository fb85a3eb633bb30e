"""Architecture hyper-parameters of a BERT-style encoder, read from Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

# Activation names used by Hugging Face configs -> our names (see `bert.activation`).
SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig:
  """Shape and regularisation of a BERT encoder.

  The field names are those of Hugging Face's `BertConfig` so a `config.json` maps one to one.
  `type_vocab_size=0` means no token-type embedding (DistilBERT). `source_model_type` records the
  checkpoint family ("bert" or "distilbert"), which decides the parameter names on conversion.
  """

  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  classifier_dropout: float | None = None
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  pad_token_id: int = 0
  source_model_type: str = "bert"

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
          f"{self.num_attention_heads}; fix config.json so that heads divide the hidden size.")
    if self.hidden_act not in SUPPORTED_ACTIVATIONS:
      raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; use one of "
                       f"{SUPPORTED_ACTIVATIONS}.")
    if self.source_model_type not in ("bert", "distilbert"):
      raise ValueError(f"source_model_type={self.source_model_type!r}: only 'bert' and "
                       "'distilbert' checkpoints load into this encoder.")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def head_dropout(self) -> float:
    """Dropout before the classifier (HF: `classifier_dropout`, else `hidden_dropout_prob`)."""
    if self.classifier_dropout is None:
      return self.hidden_dropout_prob
    return self.classifier_dropout

  def replace(self, **changes: Any) -> "BertConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_hf_dict(cls, hf: Mapping[str, Any]) -> "BertConfig":
    """Builds a config from the contents of a Hugging Face `config.json` (BERT or DistilBERT)."""
    model_type = hf.get("model_type", "bert")
    if model_type == "distilbert":
      # A sinusoidal position table (`sinusoidal_pos_embds`) is stored in the checkpoint as an
      # ordinary embedding, so it needs no special case.
      return cls(
          vocab_size=hf["vocab_size"],
          hidden_size=hf["dim"],
          num_hidden_layers=hf["n_layers"],
          num_attention_heads=hf["n_heads"],
          intermediate_size=hf["hidden_dim"],
          hidden_act=hf.get("activation", "gelu"),
          hidden_dropout_prob=hf.get("dropout", 0.1),
          attention_probs_dropout_prob=hf.get("attention_dropout", 0.1),
          classifier_dropout=hf.get("seq_classif_dropout"),
          max_position_embeddings=hf.get("max_position_embeddings", 512),
          type_vocab_size=0,
          layer_norm_eps=1e-12,
          initializer_range=hf.get("initializer_range", 0.02),
          pad_token_id=hf.get("pad_token_id", 0),
          source_model_type="distilbert",
      )
    if model_type != "bert":
      raise ValueError(
          f"config.json has model_type={model_type!r}; mpqbert loads 'bert' and 'distilbert' "
          "checkpoints. Pick a BERT or DistilBERT checkpoint.")
    position_type = hf.get("position_embedding_type", "absolute")
    if position_type != "absolute":
      raise ValueError(f"position_embedding_type={position_type!r} is not supported; only "
                       "'absolute' position embeddings are implemented.")
    if hf.get("is_decoder", False) or hf.get("add_cross_attention", False):
      raise ValueError("config.json describes a decoder; mpqbert needs a BERT encoder checkpoint.")
    names = {f.name for f in dataclasses.fields(cls)} - {"source_model_type"}
    kwargs = {k: hf[k] for k in names if hf.get(k) is not None}
    return cls(**kwargs, source_model_type="bert")

  @classmethod
  def from_json_file(cls, path: str | os.PathLike) -> "BertConfig":
    with open(path, encoding="utf-8") as f:
      return cls.from_hf_dict(json.load(f))
