"""Writes the PyTorch reference outputs that ``tests/test_glue_model.py`` checks against.

Runs Hugging Face ``transformers`` (PyTorch, CPU) on

* the embedded all-MiniLM-L6-v2 checkpoint (BERT layout), for a few short sentences and
  sentence pairs padded to a common length -> ``tests/fixtures/minilm_parity.npz``;
* a tiny randomly initialised RoBERTa (saved to ``tests/fixtures/tiny_roberta/``), whose
  position ids depend on padding -> ``tests/fixtures/tiny_roberta_parity.npz``.

Each ``.npz`` holds the inputs, the last hidden states and the pooler outputs (float32).
Run once from the repository root (needs ``torch``)::

  python -m scripts.make_parity_fixture
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch
import transformers

from examples.glue import pretrained

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures"
FIRST = ["The cat sat on the mat.", "A short one.", "Is this a question?",
         "Padding makes this batch ragged, which the mask must hide."]
SECOND = [None, "And its partner sentence.", None, "Yes."]
TINY_ROBERTA = transformers.RobertaConfig(
    vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=64, max_position_embeddings=34, type_vocab_size=1, pad_token_id=1,
    bos_token_id=0, eos_token_id=2)


def _save_outputs(path: pathlib.Path, model: torch.nn.Module,
                  inputs: dict[str, torch.Tensor]) -> None:
  with torch.no_grad():
    outputs = model.eval()(**inputs)
  np.savez_compressed(
      path, **{name: value.numpy().astype(np.int32) for name, value in inputs.items()},
      last_hidden_state=outputs.last_hidden_state.numpy().astype(np.float32),
      pooler_output=outputs.pooler_output.numpy().astype(np.float32))
  print(f"wrote {path} ({path.stat().st_size} bytes)")


def minilm() -> None:
  folder = pretrained.default_model_dir()
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
  # Encode single sentences and pairs separately, then pad them all to one length.
  inputs = tokenizer.pad([tokenizer(a, b) for a, b in zip(FIRST, SECOND)],
                         return_tensors="pt")
  _save_outputs(FIXTURES / "minilm_parity.npz",
                transformers.AutoModel.from_pretrained(str(folder)), dict(inputs))


def tiny_roberta() -> None:
  torch.manual_seed(0)
  model = transformers.RobertaModel(TINY_ROBERTA)
  model.save_pretrained(FIXTURES / "tiny_roberta")
  lengths = [12, 7, 3]
  input_ids = torch.full((len(lengths), max(lengths)), TINY_ROBERTA.pad_token_id)
  for row, length in enumerate(lengths):
    input_ids[row, :length] = torch.randint(3, TINY_ROBERTA.vocab_size, (length,))
  inputs = {"input_ids": input_ids,
            "attention_mask": (input_ids != TINY_ROBERTA.pad_token_id).long(),
            "token_type_ids": torch.zeros_like(input_ids)}
  _save_outputs(FIXTURES / "tiny_roberta_parity.npz", model, inputs)


if __name__ == "__main__":
  FIXTURES.mkdir(parents=True, exist_ok=True)
  minilm()
  tiny_roberta()
