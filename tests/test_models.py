"""The Flax BERT against Hugging Face's PyTorch models, its injection point, and loading errors."""

from __future__ import annotations

import json
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mpqbert import models

GOLDEN = Path(__file__).parent / "golden" / "minilm_hidden.npz"
SENTENCES = [
    ("A man is playing a guitar on the street.", "Someone plays music outside."),
    ("The committee postponed the vote until next week because several members were absent.",
     "The vote was delayed."),
    ("Short.", "Also short."),
]
TOL = 1e-4


@pytest.fixture(scope="module")
def minilm():
  return models.load_pretrained("minilm")


def _hidden(model, params, ids, mask, types):
  return np.asarray(model.apply({"params": params}, jnp.asarray(ids), attention_mask=mask,
                                token_type_ids=types, deterministic=True))


def _random_batch(vocab: int, types: int, batch=3, seq=17, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, vocab, (batch, seq)).astype(np.int32)
  mask = np.ones((batch, seq), np.int32)
  for row, length in enumerate(rng.integers(4, seq, batch)):
    mask[row, length:] = 0
    ids[row, length:] = 0
  token_types = (rng.integers(0, max(types, 1), (batch, seq)) * mask).astype(np.int32)
  return ids, mask, token_types


def _torch_outputs(torch, reference, ids, mask, types=None):
  """The reference's first output (last hidden states or logits) as NumPy."""
  inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
  with torch.no_grad():
    out = reference(**{k: torch.from_numpy(v).long() for k, v in inputs.items() if v is not None})
  return out[0].numpy()


def test_minilm_matches_golden_without_torch(minilm):
  """Golden fixture made by tests/make_golden.py with PyTorch's BertModel."""
  golden = np.load(GOLDEN)
  model, params = minilm
  ours = _hidden(model, params, golden["input_ids"], golden["attention_mask"],
                 golden["token_type_ids"])
  assert golden["attention_mask"].min() == 0, "the golden batch must contain padding"
  np.testing.assert_allclose(ours, golden["hidden"], atol=TOL, rtol=0)


def test_minilm_matches_pytorch_on_padded_sentences(minilm, embedded_dir):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  tokenizer = models.load_tokenizer("minilm")
  enc = tokenizer([a for a, _ in SENTENCES], [b for _, b in SENTENCES], padding=True,
                  return_tensors="np")
  assert enc["attention_mask"].min() == 0
  reference = transformers.BertModel.from_pretrained(str(embedded_dir)).eval()
  expected = _torch_outputs(torch, reference, enc["input_ids"], enc["attention_mask"],
                            enc["token_type_ids"])
  model, params = minilm
  ours = _hidden(model, params, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
  np.testing.assert_allclose(ours, expected, atol=TOL, rtol=0)


def test_minilm_cut_to_two_layers_matches_pytorch_and_checks_the_count(embedded_dir):
  """`num_layers=2` keeps MiniLM's first 2 layers: transformers' BertModel built with
  num_hidden_layers=2 from the same checkpoint (it drops layers 2-5) gives the same states."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  reference = transformers.BertModel.from_pretrained(str(embedded_dir), num_hidden_layers=2).eval()
  ids, mask, types = _random_batch(reference.config.vocab_size, 2)
  expected = _torch_outputs(torch, reference, ids, mask, types)
  model, params = models.load_pretrained("minilm", num_layers=2)
  assert model.config.num_hidden_layers == 2
  np.testing.assert_allclose(_hidden(model, params, ids, mask, types), expected, atol=TOL, rtol=0)
  with pytest.raises(ValueError, match="model_layers=7, but .* has 6 layers; use 1 to 6"):
    models.pretrained_config("minilm", 7)


@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "torch_bin"])
def test_random_bert_of_another_shape_matches_pytorch(tmp_path, safe_serialization):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  hf_config = transformers.BertConfig(vocab_size=997, hidden_size=48, num_hidden_layers=3,
                                      num_attention_heads=6, intermediate_size=80,
                                      type_vocab_size=3, max_position_embeddings=40,
                                      hidden_act="gelu_new", layer_norm_eps=1e-7)
  reference = transformers.BertModel(hf_config).eval()
  reference.save_pretrained(tmp_path)
  if not safe_serialization:  # transformers 5 writes only safetensors: make the legacy file.
    (tmp_path / "model.safetensors").unlink()
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
  ids, mask, types = _random_batch(997, 3)
  expected = _torch_outputs(torch, reference, ids, mask, types)
  model, params = models.load_pretrained(tmp_path)
  assert model.config.num_hidden_layers == 3 and model.config.type_vocab_size == 3
  np.testing.assert_allclose(_hidden(model, params, ids, mask, types), expected,
                             atol=TOL, rtol=0)


def test_distilbert_matches_pytorch(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(1)
  hf_config = transformers.DistilBertConfig(vocab_size=801, dim=64, n_layers=2, n_heads=4,
                                            hidden_dim=96, max_position_embeddings=32)
  reference = transformers.DistilBertModel(hf_config).eval()
  reference.save_pretrained(tmp_path)
  ids, mask, _ = _random_batch(801, 0, seed=3)
  expected = _torch_outputs(torch, reference, ids, mask)
  model, params = models.load_pretrained(tmp_path)
  assert model.config.type_vocab_size == 0 and "token_type_embeddings" not in params["embeddings"]
  np.testing.assert_allclose(_hidden(model, params, ids, mask, None), expected,
                             atol=TOL, rtol=0)


def test_sequence_classifier_checkpoint_matches_pytorch_logits(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(2)
  hf_config = transformers.BertConfig(vocab_size=500, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=64,
                                      max_position_embeddings=32, num_labels=3)
  reference = transformers.BertForSequenceClassification(hf_config).eval()
  reference.save_pretrained(tmp_path)
  ids, mask, types = _random_batch(500, 2, seed=4)
  expected = _torch_outputs(torch, reference, ids, mask, types)
  model, params = models.load_pretrained(tmp_path, num_labels=3)
  logits = model.apply({"params": params}, ids, attention_mask=mask, token_type_ids=types)
  np.testing.assert_allclose(np.asarray(logits), expected, atol=TOL, rtol=0)


def test_heads_and_bare_encoder_shapes(tiny_model_dir):
  ids, mask, types = _random_batch(1000, 2, batch=2, seq=9)
  bare, bare_params = models.load_pretrained(tiny_model_dir)
  assert "pooler" not in bare_params  # The bare encoder never builds its pooler.
  assert _hidden(bare, bare_params, ids, mask, types).shape == (2, 9, 32)
  for num_labels in (1, 2, 3):
    model, params = models.load_pretrained(tiny_model_dir, num_labels=num_labels, seed=5)
    logits = model.apply({"params": params}, ids, attention_mask=mask, token_type_ids=types)
    assert logits.shape == (2, num_labels) and logits.dtype == jnp.float32
    # The encoder is the checkpoint's, the head is fresh.
    np.testing.assert_array_equal(params["bert"]["encoder"]["layer"]["1"]["output"]["dense"]["kernel"],
                                  bare_params["encoder"]["layer"]["1"]["output"]["dense"]["kernel"])
  with pytest.raises(ValueError, match="num_labels"):
    models.load_pretrained(tiny_model_dir, num_labels=0)


def test_injection_point_sees_every_attention_and_ffn_dense(tiny_model_dir):
  """Intercepting `quantize_operands` acts exactly like editing the kernels by hand."""
  model, params = models.load_pretrained(tiny_model_dir)
  ids, mask, types = _random_batch(1000, 2, batch=2, seq=9)
  seen = []

  def halve_ffn_input_kernels(next_fun, args, kwargs, context):
    if context.method_name != "quantize_operands":
      return next_fun(*args, **kwargs)
    seen.append("/".join(context.module.path))
    x, kernel = args
    return x, kernel * 0.5 if context.module.path[-2:] == ("intermediate", "dense") else kernel

  with nn.intercept_methods(halve_ffn_input_kernels):
    intercepted = _hidden(model, params, ids, mask, types)
  expected_paths = {f"encoder/layer/{i}/{m}" for i in range(2) for m in (
      "attention/self/query", "attention/self/key", "attention/self/value",
      "attention/output/dense", "intermediate/dense", "output/dense")}
  assert set(seen) == expected_paths and len(seen) == len(expected_paths)

  flat = traverse_util.flatten_dict(params, sep="/")
  edited = {k: v * 0.5 if k.endswith("intermediate/dense/kernel") else v for k, v in flat.items()}
  by_hand = _hidden(model, traverse_util.unflatten_dict(edited, sep="/"), ids, mask, types)
  np.testing.assert_allclose(intercepted, by_hand, atol=1e-6)
  assert np.abs(intercepted - _hidden(model, params, ids, mask, types)).max() > 1e-3


def test_remat_gives_the_same_outputs_and_gradients(tiny_model_dir):
  ids, mask, types = _random_batch(1000, 2, batch=2, seq=9)
  plain, params = models.load_pretrained(tiny_model_dir, num_labels=2)
  remat, _ = models.load_pretrained(tiny_model_dir, num_labels=2, remat=True)

  def loss(model, p):
    logits = model.apply({"params": p}, ids, attention_mask=mask, token_type_ids=types,
                         deterministic=False, rngs={"dropout": jax.random.key(0)})
    return jnp.sum(logits**2)

  grads_plain = jax.grad(lambda p: loss(plain, p))(params)
  grads_remat = jax.grad(lambda p: loss(remat, p))(params)
  chex.assert_trees_all_close(grads_plain, grads_remat, atol=1e-5, rtol=1e-4)


def test_dropout_is_explicit_and_bfloat16_runs(tiny_model_dir):
  ids, mask, types = _random_batch(1000, 2, batch=2, seq=9)
  model, params = models.load_pretrained(tiny_model_dir)
  run = lambda key: model.apply({"params": params}, ids, attention_mask=mask, token_type_ids=types,
                                deterministic=False, rngs={"dropout": jax.random.key(key)})
  assert not np.allclose(run(0), run(1))
  np.testing.assert_array_equal(run(0), run(0))
  fp32 = _hidden(model, params, ids, mask, types)
  bf16_model, _ = models.load_pretrained(tiny_model_dir, dtype=jnp.bfloat16)
  bf16 = bf16_model.apply({"params": params}, ids, attention_mask=mask, token_type_ids=types)
  assert bf16.dtype == jnp.bfloat16
  assert np.abs(np.asarray(bf16, np.float32) - fp32).max() < 0.1


def test_loading_errors_name_the_problem_and_the_fix(tmp_path, tiny_model_dir):
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no config.json"):
    models.load_pretrained(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    models.load_pretrained(str(tmp_path / "nowhere"))

  # Weights of the tiny model under a config that says hidden 64: the checkpoint of another model.
  wrong = tmp_path / "wrong_config"
  wrong.mkdir()
  (wrong / "model.safetensors").write_bytes((tiny_model_dir / "model.safetensors").read_bytes())
  config = json.loads((tiny_model_dir / "config.json").read_text())
  (wrong / "config.json").write_text(json.dumps({**config, "hidden_size": 64,
                                                 "intermediate_size": 128}))
  with pytest.raises(ValueError, match="does not match its config"):
    models.load_pretrained(wrong)

  (wrong / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
  with pytest.raises(ValueError, match="model_type='gpt2'"):
    models.load_pretrained(wrong)

  no_weights = tmp_path / "no_weights"
  no_weights.mkdir()
  (no_weights / "config.json").write_text(json.dumps(config))
  with pytest.raises(FileNotFoundError, match="no model.safetensors"):
    models.load_pretrained(no_weights)


def test_offline_hub_name_explains_the_offline_alternatives(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  import huggingface_hub.constants
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  with pytest.raises(OSError, match="'minilm'"):
    models.load_pretrained("no-such-user/no-such-bert-model")


def test_save_pretrained_round_trips(tmp_path, tiny_model_dir):
  model, params = models.load_pretrained(tiny_model_dir)
  models.save_pretrained(tmp_path, model.config, params)
  _, again = models.load_pretrained(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, params, again)
