"""Diagonal Fisher information estimates."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from optax_sam.core import loss as loss_lib
from optax_sam.fisher import per_example


def empirical_fisher(
    loss_fn: loss_lib.LossFn,
    params: Any,
    *,
    num_examples: Optional[int] = None,
    chunk_size: Optional[int] = None,
    example_mask: Optional[jax.Array] = None,
) -> Any:
  """``F = Σ_i (∇l_i)²`` over the first ``num_examples`` examples (float32).

  The per-example (empirical Fisher) estimator of FSAM's paper: per-example gradients
  with ``jax.vmap``, ``chunk_size`` at a time, so memory is bounded by the chunk.

  Args:
    loss_fn: per-example loss function of the batch (see ``optax_sam.PerExampleLoss``
      for the fast path).
    params: where to evaluate the gradients.
    num_examples: how many examples of the batch to use (default: all).
    chunk_size: examples per ``vmap`` chunk (default: all at once).
    example_mask: ``[batch]``, 0 for padded rows, which then add nothing.

  Returns:
    A float32 pytree shaped like ``params``.

  Example:
    >>> import jax.numpy as jnp, optax_sam
    >>> batch = {"x": jnp.eye(2)}
    >>> loss = optax_sam.PerExampleLoss(lambda p, ex: ex["x"] @ p, batch)
    >>> optax_sam.fisher.empirical_fisher(loss, jnp.zeros(2))
    Array([1., 1.], dtype=float32)
  """
  def squared_gradient(example_loss, p):
    return jax.tree.map(lambda g: jnp.square(g.astype(jnp.float32)),
                        jax.grad(example_loss)(p))

  return per_example.sum_over_examples(
      squared_gradient, loss_fn, params, num_examples=num_examples,
      chunk_size=chunk_size, example_mask=example_mask, method="empirical_fisher")


def squared_gradient_fisher(grads: Any) -> Any:
  """``F = g²``, the square of the batch-mean gradient (FSAM's released code), float32."""
  return jax.tree.map(lambda g: jnp.square(g.astype(jnp.float32)), grads)
