"""Which parameters a subnetwork method masks or mixes: by default every matrix.

The default, :func:`all_matrices`, is a rule on shapes alone, so it means the same on
every model. The papers' BERT setting (the encoder's dense-layer weight matrices) is
:func:`encoder_dense_kernels`; pass it as ``scope=`` to reproduce them.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax

from optax_sam.core import selection as selection_lib

_ENCODER_PARTS = ("encoder", "pooler")
_NEVER_PARTS = ("embed", "layernorm", "layer_norm")


def all_matrices(path: str, leaf: Any) -> bool:
  """The default scope: every parameter with at least two axes.

  Weight matrices (and convolution kernels) are in; biases, LayerNorm scales and other
  vectors are out. **Embedding tables count**: they are matrices, and telling them
  apart would need a guess about parameter names. The papers' BERT setting leaves them
  (and the classifier head) out: pass ``scope=encoder_dense_kernels`` for it.

  Example:
    >>> import jax.numpy as jnp
    >>> from optax_sam import subnetworks
    >>> subnetworks.all_matrices("decoder/mlp/kernel", jnp.ones((4, 2)))
    True
    >>> subnetworks.all_matrices("decoder/mlp/bias", jnp.ones(2))
    False
  """
  del path
  return len(getattr(leaf, "shape", ())) >= 2


def encoder_dense_kernels(path: str, leaf: Any) -> bool:
  """The papers' BERT scope: weight matrices of the encoder's and pooler's dense layers.

  DPS's released code and Child-Tuning's BERT setting. True for a ``kernel`` with at
  least two axes whose path has a part containing ``encoder`` or ``pooler`` (e.g.
  ``"encoder/layer_0/attention/query/kernel"``, ``"bert/pooler/dense/kernel"``).
  Embeddings, LayerNorm parameters, biases and anything outside the encoder (the
  classifier head) are out of scope.

  Example:
    >>> import jax.numpy as jnp
    >>> from optax_sam import subnetworks
    >>> subnetworks.encoder_dense_kernels("encoder/layer_0/output/kernel", jnp.ones((4, 2)))
    True
    >>> subnetworks.encoder_dense_kernels("classifier/kernel", jnp.ones((4, 2)))
    False
  """
  parts = path.lower().split("/")
  if parts[-1] != "kernel" or not all_matrices(path, leaf):
    return False
  if any(never in part for part in parts for never in _NEVER_PARTS):
    return False
  return any(inside in part for part in parts[:-1] for inside in _ENCODER_PARTS)


def resolve_scope(
    scope: Optional[selection_lib.Selection],
    method: str,
) -> Callable[[Any], Any]:
  """Returns ``tree -> pytree of bools`` for ``optax.masked``, failing on an empty scope.

  A scope that selects nothing would silently turn the method into the base optimizer,
  so it is an error that says how to choose the parameters.
  """
  chosen = all_matrices if scope is None else scope

  def scope_of(tree: Any) -> Any:
    selected = selection_lib.select(tree, chosen, argument="scope")
    if not any(jax.tree.leaves(selected)):
      default = (" The default scope keeps every parameter with at least two axes, and "
                 "this model has none." if scope is None else "")
      raise ValueError(
          f"{method}: scope selects no parameter, so the method would do nothing."
          f"{default} Pass scope=, a predicate (path, leaf) -> bool on 'a/b/kernel'-style "
          f"paths or a pytree of bools.")
    return selected

  return scope_of
