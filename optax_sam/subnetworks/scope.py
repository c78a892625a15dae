"""Which parameters a subnetwork method masks: the encoder's dense-layer weight matrices."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax

from optax_sam.core import selection as selection_lib

_ENCODER_PARTS = ("encoder", "pooler")
_NEVER_PARTS = ("embed", "layernorm", "layer_norm")


def encoder_dense_kernels(path: str, leaf: Any) -> bool:
  """DPS's scope: weight matrices of the encoder's and pooler's dense layers.

  True for a ``kernel`` with at least two axes whose path has a part containing
  ``encoder`` or ``pooler`` (e.g. ``"encoder/layer_0/attention/query/kernel"``,
  ``"bert/pooler/dense/kernel"``). Embeddings, LayerNorm parameters, biases and anything
  outside the encoder (the classifier head) are out of scope.

  Example:
    >>> import jax.numpy as jnp
    >>> from optax_sam import subnetworks
    >>> subnetworks.encoder_dense_kernels("encoder/layer_0/output/kernel", jnp.ones((4, 2)))
    True
    >>> subnetworks.encoder_dense_kernels("classifier/kernel", jnp.ones((4, 2)))
    False
  """
  parts = path.lower().split("/")
  if parts[-1] != "kernel" or len(getattr(leaf, "shape", ())) < 2:
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
  chosen = encoder_dense_kernels if scope is None else scope

  def scope_of(tree: Any) -> Any:
    selected = selection_lib.select(tree, chosen, argument="scope")
    if not any(jax.tree.leaves(selected)):
      default = (" The default scope keeps 2-D `kernel`s under an `encoder` or `pooler` "
                 "path." if scope is None else "")
      raise ValueError(
          f"{method}: scope selects no parameter, so the method would do nothing."
          f"{default} Pass scope=, a predicate (path, leaf) -> bool on 'a/b/kernel'-style "
          f"paths or a pytree of bools.")
    return selected

  return scope_of
