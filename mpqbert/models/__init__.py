"""Flax BERT/DistilBERT encoder, task heads and checkpoint loading."""

from mpqbert.models.bert import (BertForSequenceClassification, BertModel, QuantizableDense,
                                 attention_mask_bias)
from mpqbert.models.config import BertConfig
from mpqbert.models.layout import (BERT_LAYOUT, BERT_MATRIX_KINDS, BERT_MODEL_PARALLEL,
                                   bert_encoder_spec)
from mpqbert.models.pretrained import (EMBEDDED_MODEL, build_model, init_params, load_pretrained,
                                       load_tokenizer, pretrained_config, read_state_dict,
                                       resolve_model_dir, save_pretrained)

__all__ = [
    "BERT_LAYOUT", "BERT_MATRIX_KINDS", "BERT_MODEL_PARALLEL", "BertConfig",
    "BertForSequenceClassification", "BertModel", "EMBEDDED_MODEL", "QuantizableDense",
    "attention_mask_bias", "bert_encoder_spec",
    "build_model", "init_params", "load_pretrained", "load_tokenizer", "pretrained_config",
    "read_state_dict", "resolve_model_dir", "save_pretrained",
]
