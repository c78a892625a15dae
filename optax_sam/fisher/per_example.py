"""Sums of per-example quantities, computed with ``jax.vmap`` in memory-bounded chunks."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from optax_sam.core import loss as loss_lib
from optax_sam.core import numerics
from optax_sam.core import placement

ExampleLoss = Callable[[Any], jax.Array]  # params -> scalar loss of one example
PerExampleFn = Callable[[ExampleLoss, Any], Any]  # (example loss, params) -> pytree


def batch_size_of(loss_fn: loss_lib.LossFn, params: Any, method: str) -> int:
  """Number of examples ``loss_fn`` returns losses for (checked to be per-example)."""
  if isinstance(loss_fn, loss_lib.PerExampleLoss):
    # Shapes only: slicing a row out of a batch sharded over explicit mesh axes fails.
    first = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[1:], jnp.result_type(x)), loss_fn.batch)
    shape = jax.eval_shape(loss_fn.example_loss, params, first).shape
    if shape:
      raise ValueError(
          f"{method} needs per-example losses, but PerExampleLoss's example_loss returns "
          f"shape {shape} for one example. Return that example's loss as a scalar.")
    return loss_fn.batch_size
  shape = jax.eval_shape(loss_fn, params).shape
  if len(shape) != 1:
    raise ValueError(
        f"{method} needs per-example losses, but loss_fn returns shape {shape}. Return "
        f"the unreduced loss of each example (shape [batch]).")
  return shape[0]


def _replicate_if_explicitly_sharded(x: jax.Array) -> jax.Array:
  """Gathers an array sharded over explicit mesh axes, so rows can be picked by index.

  With explicit sharding (the default of ``jax.make_mesh``) JAX refuses to slice single
  rows out of a sharded axis; on auto-sharded or unsharded arrays this is a no-op.
  """
  sharding = placement.explicit_sharding(x)
  if sharding is None:
    return x
  return jax.sharding.reshard(
      x, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))


def _example_loss(loss_fn: loss_lib.LossFn, index: jax.Array) -> ExampleLoss:
  if isinstance(loss_fn, loss_lib.PerExampleLoss):
    batch = jax.tree.map(_replicate_if_explicitly_sharded, loss_fn.batch)
    example = jax.tree.map(lambda x: x[index], batch)
    return lambda p: loss_fn.example_loss(p, example)
  # Any loss_fn works, at the price of a whole-batch forward per example.
  return lambda p: _replicate_if_explicitly_sharded(loss_fn(p))[index]


def sum_over_examples(
    per_example_fn: PerExampleFn,
    loss_fn: loss_lib.LossFn,
    params: Any,
    *,
    num_examples: Optional[int] = None,
    chunk_size: Optional[int] = None,
    example_mask: Optional[jax.Array] = None,
    method: str = "sum_over_examples",
) -> Any:
  """``Σ_{i < n} per_example_fn(l_i, params)`` in float32, ``chunk_size`` examples at a time.

  ``l_i`` is the loss of example ``i`` as a function of the parameters. Each chunk is
  evaluated with ``jax.vmap`` and chunks run one after another under ``lax.scan``, so peak
  memory holds ``chunk_size`` per-example results, whatever ``n``.

  When ``loss_fn`` is a :class:`optax_sam.PerExampleLoss`, example ``i`` is evaluated on its
  own. Any other ``loss_fn`` is evaluated on the whole batch and indexed, which gives the
  same values at ``batch`` times the compute.

  Args:
    per_example_fn: ``(l_i, params) -> pytree``, e.g. the squared gradient of ``l_i``.
    loss_fn: the batch's per-example loss function.
    params: the parameters.
    num_examples: use the first ``n`` examples of the batch (default: all).
    chunk_size: examples per ``vmap`` chunk (default: all at once).
    example_mask: ``[batch]``, 1 for real rows and 0 for padding; padded rows add
      nothing (default: every row is real).
    method: the name used in error messages.

  Returns:
    The sum, a pytree of float32 arrays shaped like ``per_example_fn``'s output.
  """
  batch = batch_size_of(loss_fn, params, method)
  n = batch if num_examples is None else min(int(num_examples), batch)
  chunk = n if chunk_size is None else max(1, min(int(chunk_size), n))
  num_chunks = -(-n // chunk)
  flat = jnp.arange(num_chunks * chunk)
  indices = jnp.minimum(flat, n - 1).reshape(num_chunks, chunk)
  weights = (flat < n).astype(jnp.float32).reshape(num_chunks, chunk)

  if example_mask is not None:
    loss_lib.check_example_mask(example_mask, batch)
    real = _replicate_if_explicitly_sharded(jnp.asarray(example_mask, jnp.float32))

  def one_example(index, weight):
    if example_mask is not None:
      weight = weight * real[index]
    value = per_example_fn(_example_loss(loss_fn, index), params)
    # `where`, not a product: a padded row's value may be non-finite.
    return jax.tree.map(lambda x: jnp.where(weight > 0, x.astype(jnp.float32) * weight, 0.0),
                        value)

  def one_chunk(total, chunk_inputs):
    values = jax.vmap(one_example)(*chunk_inputs)
    return jax.tree.map(lambda t, v: t + jnp.sum(v, axis=0), total, values), None

  shapes = jax.eval_shape(one_example, indices[0, 0], weights[0, 0])
  # Inside shard_map the sums vary over the devices the examples do; so must the carry.
  zeros = jax.tree.map(
      lambda s: numerics.match_varying(placement.zeros_like_struct(s, jnp.float32), s),
      shapes)
  total, _ = jax.lax.scan(one_chunk, zeros, (indices, weights))
  return total
