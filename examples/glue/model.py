"""A BERT-family Transformer encoder with a sentence(-pair) classification head.

The layout follows BERT (Devlin et al., 2019) and RoBERTa (Liu et al., 2019): token,
position and token-type embeddings, post-LayerNorm encoder layers, a tanh pooler over the
first token and a linear classifier. Parameter paths name what each leaf is, so that
path-based rules (weight decay, FSAM's candidate pool, DPS's scope) can pick them out::

  embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding
  embeddings/LayerNorm/{scale,bias}
  encoder/layer_<i>/attention/{query,key,value,output}/{kernel,bias}
  encoder/layer_<i>/attention/LayerNorm/{scale,bias}
  encoder/layer_<i>/{intermediate,output}/{kernel,bias}
  encoder/layer_<i>/LayerNorm/{scale,bias}
  pooler/{kernel,bias}
  classifier/{kernel,bias}

Dense kernels are stored ``[in_features, out_features]``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(nn.gelu, approximate=False),
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
    "relu": nn.relu,
}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Shape and regularisation of a BERT-family encoder.

  Attributes:
    vocab_size: number of token ids.
    hidden_size: width of every hidden state.
    num_layers: number of encoder layers.
    num_heads: attention heads per layer; must divide ``hidden_size``.
    intermediate_size: width of the feed-forward block.
    max_positions: rows of the position-embedding table.
    type_vocab_size: rows of the token-type (segment) table; 1 for RoBERTa.
    hidden_act: feed-forward activation, a key of ``ACTIVATIONS``.
    hidden_dropout: dropout on embeddings, sub-layer outputs and the pooled feature.
    attention_dropout: dropout on the attention probabilities.
    layer_norm_eps: LayerNorm epsilon.
    pad_token_id: id of the padding token.
    padding_aware_positions: RoBERTa's position ids: real tokens are numbered from
      ``pad_token_id + 1`` and padding tokens get ``pad_token_id``; BERT's are
      ``0 .. length - 1``.
    initializer_range: standard deviation of the normal initialiser of new weights.
  """

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_positions: int
  type_vocab_size: int
  hidden_act: str = "gelu"
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0
  padding_aware_positions: bool = False
  initializer_range: float = 0.02

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                       f"num_heads {self.num_heads}.")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; use one of "
                       f"{sorted(ACTIVATIONS)}.")


def _dense(config: EncoderConfig, features: int, name: str) -> nn.Dense:
  return nn.Dense(features, name=name,
                  kernel_init=nn.initializers.normal(config.initializer_range))


def _layer_norm(config: EncoderConfig) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=config.layer_norm_eps, name="LayerNorm")


def _project_add_and_norm(config: EncoderConfig, update: jax.Array, residual: jax.Array,
                          deterministic: bool) -> jax.Array:
  """BERT's sub-layer output: dense ``output`` projection, dropout, residual, LayerNorm.

  Called inside a compact module, so ``output`` and ``LayerNorm`` are that module's
  children (the checkpoint's ``...attention.output.*`` and ``...output.*`` tensors).
  """
  output = _dense(config, config.hidden_size, "output")(update)
  output = nn.Dropout(config.hidden_dropout)(output, deterministic=deterministic)
  return _layer_norm(config)(output + residual)


class Embeddings(nn.Module):
  """Sum of token, position and token-type embeddings, then LayerNorm and dropout."""

  config: EncoderConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array,
               deterministic: bool) -> jax.Array:
    config = self.config
    if config.padding_aware_positions:
      is_token = (input_ids != config.pad_token_id).astype(jnp.int32)
      position_ids = jnp.cumsum(is_token, axis=-1) * is_token + config.pad_token_id
    else:
      position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
    init = nn.initializers.normal(config.initializer_range)
    embed = lambda rows, name: nn.Embed(rows, config.hidden_size, embedding_init=init,
                                        name=name)
    hidden = (embed(config.vocab_size, "word_embeddings")(input_ids)
              + embed(config.max_positions, "position_embeddings")(position_ids)
              + embed(config.type_vocab_size, "token_type_embeddings")(token_type_ids))
    hidden = _layer_norm(config)(hidden)
    return nn.Dropout(config.hidden_dropout)(hidden, deterministic=deterministic)


class SelfAttention(nn.Module):
  """Multi-head self-attention with a residual connection and post-LayerNorm."""

  config: EncoderConfig

  @nn.compact
  def __call__(self, hidden: jax.Array, attention_mask: jax.Array,
               deterministic: bool) -> jax.Array:
    config = self.config
    head_shape = hidden.shape[:-1] + (config.num_heads,
                                      config.hidden_size // config.num_heads)
    query, key, value = (
        _dense(config, config.hidden_size, name)(hidden).reshape(head_shape)
        for name in ("query", "key", "value"))
    use_dropout = not deterministic and config.attention_dropout > 0
    context = nn.dot_product_attention(
        query, key, value,
        mask=attention_mask[..., None, None, :].astype(bool),
        dropout_rng=self.make_rng("dropout") if use_dropout else None,
        dropout_rate=config.attention_dropout,
        broadcast_dropout=False,
        deterministic=not use_dropout)
    return _project_add_and_norm(config, context.reshape(hidden.shape), hidden,
                                 deterministic)


class EncoderLayer(nn.Module):
  """Self-attention followed by the feed-forward block, each with post-LayerNorm."""

  config: EncoderConfig

  @nn.compact
  def __call__(self, hidden: jax.Array, attention_mask: jax.Array,
               deterministic: bool) -> jax.Array:
    config = self.config
    hidden = SelfAttention(config, name="attention")(hidden, attention_mask, deterministic)
    inner = ACTIVATIONS[config.hidden_act](
        _dense(config, config.intermediate_size, "intermediate")(hidden))
    return _project_add_and_norm(config, inner, hidden, deterministic)


class Encoder(nn.Module):
  """A stack of ``config.num_layers`` encoder layers named ``layer_0``, ``layer_1``, ..."""

  config: EncoderConfig

  @nn.compact
  def __call__(self, hidden: jax.Array, attention_mask: jax.Array,
               deterministic: bool) -> jax.Array:
    for index in range(self.config.num_layers):
      hidden = EncoderLayer(self.config, name=f"layer_{index}")(
          hidden, attention_mask, deterministic)
    return hidden


class SequenceClassifier(nn.Module):
  """Encoder, tanh pooler over the first token, dropout and a linear classifier.

  Attributes:
    config: the encoder's shape.
    num_labels: number of classes; 1 gives a regression head.
  """

  config: EncoderConfig
  num_labels: int

  def setup(self):
    config = self.config
    self.embeddings = Embeddings(config)
    self.encoder = Encoder(config)
    self.pooler = _dense(config, config.hidden_size, "pooler")
    self.head_dropout = nn.Dropout(config.hidden_dropout)
    self.classifier = _dense(config, self.num_labels, "classifier")

  def encode(self, input_ids: jax.Array, attention_mask: jax.Array,
             token_type_ids: jax.Array, deterministic: bool = True) -> jax.Array:
    """Last hidden states of the encoder.

    Args:
      input_ids: ``[..., length]`` token ids.
      attention_mask: ``[..., length]``, 1 for tokens to attend to, 0 for padding.
      token_type_ids: ``[..., length]`` segment ids (zeros for RoBERTa).
      deterministic: disables dropout; otherwise a ``"dropout"`` rng is required.

    Returns:
      ``[..., length, hidden_size]`` hidden states.
    """
    hidden = self.embeddings(input_ids, token_type_ids, deterministic)
    return self.encoder(hidden, attention_mask, deterministic)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
               token_type_ids: jax.Array, deterministic: bool = True) -> jax.Array:
    """Classification logits (or the regression output when ``num_labels == 1``).

    Args: as for ``encode``.

    Returns:
      ``[..., num_labels]`` logits.
    """
    hidden = self.encode(input_ids, attention_mask, token_type_ids, deterministic)
    return self.classify(hidden, deterministic)

  def classify(self, hidden: jax.Array, deterministic: bool = True) -> jax.Array:
    """The head: tanh pooler over the first position, dropout, linear classifier.

    Args:
      hidden: ``[..., length, hidden_size]`` hidden states from ``encode``.
      deterministic: disables dropout.

    Returns:
      ``[..., num_labels]`` logits.
    """
    pooled = jnp.tanh(self.pooler(hidden[..., 0, :]))
    return self.classifier(self.head_dropout(pooled, deterministic=deterministic))
