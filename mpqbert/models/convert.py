"""Hugging Face PyTorch-style state dicts (BERT, DistilBERT) -> Flax parameter trees.

Names map one to one: `a.b.weight` of a Linear is `a/b/kernel` (transposed), of an Embedding is
`a/b/embedding`, of a LayerNorm is `a/b/scale`. DistilBERT names are first renamed to BERT names.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import numpy as np
from flax import traverse_util

Params = dict[str, Any]

# DistilBERT name -> BERT name (after the `distilbert.` prefix is removed).
_DISTILBERT_RENAMES = (
    (r"^transformer\.layer\.", "encoder.layer."),
    (r"\.attention\.q_lin\.", ".attention.self.query."),
    (r"\.attention\.k_lin\.", ".attention.self.key."),
    (r"\.attention\.v_lin\.", ".attention.self.value."),
    (r"\.attention\.out_lin\.", ".attention.output.dense."),
    (r"\.sa_layer_norm\.", ".attention.output.LayerNorm."),
    (r"\.ffn\.lin1\.", ".intermediate.dense."),
    (r"\.ffn\.lin2\.", ".output.dense."),
    (r"\.output_layer_norm\.", ".output.LayerNorm."),
)
# Checkpoint prefixes of task models (`BertForSequenceClassification` stores `bert.<...>`).
_ENCODER_PREFIXES = ("bert.", "distilbert.")


def _bert_name(name: str, source_model_type: str) -> str:
  for prefix in _ENCODER_PREFIXES:
    if name.startswith(prefix):
      name = name[len(prefix):]
      break
  if source_model_type == "distilbert":
    for pattern, replacement in _DISTILBERT_RENAMES:
      name = re.sub(pattern, replacement, name)
  # Old TF-converted checkpoints call LayerNorm parameters gamma/beta.
  return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$",
                                                                 "LayerNorm.bias", name))


def _flax_leaf(module_path: tuple[str, ...], leaf: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  if leaf == "bias":
    return "bias", value
  if module_path[-1] == "LayerNorm":
    return "scale", value
  if module_path[-1].endswith("_embeddings"):
    return "embedding", value
  return "kernel", value.T  # torch Linear stores [out, in]; Flax Dense wants [in, out].


def state_dict_to_encoder_params(state: Mapping[str, np.ndarray],
                                 source_model_type: str = "bert") -> Params:
  """Converts a HF state dict to the Flax tree of `BertModel` (embeddings, encoder, pooler).

  Task heads (`classifier.*`, `pre_classifier.*`), MLM/NSP heads and buffers are dropped: the
  caller builds the head it needs.
  """
  flat: dict[tuple[str, ...], np.ndarray] = {}
  for raw_name, value in state.items():
    name = _bert_name(raw_name, source_model_type)
    if not name.startswith(("embeddings.", "encoder.", "pooler.")) or name.endswith("position_ids"):
      continue
    *module_path, leaf = name.split(".")
    leaf, array = _flax_leaf(tuple(module_path), leaf, np.asarray(value, dtype=np.float32))
    flat[tuple(module_path) + (leaf,)] = array
  return traverse_util.unflatten_dict(flat)


def classifier_params(state: Mapping[str, np.ndarray]) -> Params | None:
  """The `classifier` Dense of a BertForSequenceClassification checkpoint, if it has one."""
  if "classifier.weight" not in state:
    return None
  return {"kernel": np.asarray(state["classifier.weight"], np.float32).T,
          "bias": np.asarray(state["classifier.bias"], np.float32)}


# Modules a checkpoint may lack; they keep their fresh initialisation (DistilBERT has no pooler,
# an encoder-only checkpoint has no classifier).
_MAY_STAY_FRESH = ("pooler", "classifier")


def check_and_merge(expected: Params, loaded: Params, source: str) -> Params:
  """Returns `expected` with every leaf found in `loaded`, after checking names and shapes.

  `expected` is the model's freshly initialised tree. A leaf missing from the checkpoint is an
  error unless it belongs to `_MAY_STAY_FRESH`; a shape disagreement means the checkpoint belongs
  to another model.
  """
  want = traverse_util.flatten_dict(expected, sep="/")
  have = traverse_util.flatten_dict(loaded, sep="/")
  missing = sorted(k for k in want
                   if k not in have and not set(k.split("/")) & set(_MAY_STAY_FRESH))
  if missing:
    raise ValueError(
        f"checkpoint {source} lacks {len(missing)} parameters the model needs, e.g. "
        f"{missing[:4]}. It is not a BERT/DistilBERT checkpoint of this architecture; use the "
        "config.json that was saved with these weights.")
  mismatched = [f"{k}: checkpoint {have[k].shape} vs config {tuple(want[k].shape)}"
                for k in want if k in have and have[k].shape != tuple(want[k].shape)]
  if mismatched:
    raise ValueError(
        f"checkpoint {source} does not match its config: {'; '.join(mismatched[:4])}"
        f"{' ...' if len(mismatched) > 4 else ''}. The weights come from another model; keep "
        "config.json and the weights file from the same checkpoint.")
  merged = {k: (have[k] if k in have else want[k]) for k in want}
  return jax.tree.map(np.asarray, traverse_util.unflatten_dict(merged, sep="/"))


def encoder_params_to_state_dict(params: Params) -> dict[str, np.ndarray]:
  """Inverse of `state_dict_to_encoder_params` (BERT names): Flax tree -> HF state dict."""
  state = {}
  for path, value in traverse_util.flatten_dict(params).items():
    *module_path, leaf = path
    value = np.asarray(value, np.float32)
    if leaf == "kernel":
      leaf, value = "weight", value.T
    elif leaf in ("scale", "embedding"):
      leaf = "weight"
    state[".".join(module_path + [leaf])] = np.ascontiguousarray(value)
  return state
