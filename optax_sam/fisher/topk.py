"""Global top-k over a pytree of scores, found as a threshold rather than by sorting."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from optax_sam.core import numerics
from optax_sam.core import placement

# float32 +inf as int32: the largest bit pattern of a non-negative, non-NaN float32.
_INF_BITS = 0x7F800000


def _nonnegative_bits(x: jax.Array) -> jax.Array:
  """Order-preserving int32 view of non-negative float32 scores (NaN counted as 0)."""
  x = jnp.where(jnp.isnan(x), 0.0, jnp.maximum(x.astype(jnp.float32), 0.0))
  return jax.lax.bitcast_convert_type(x, jnp.int32)


def kth_largest(scores: list[jax.Array], k: int) -> jax.Array:
  """The ``k``-th largest value among all entries of ``scores`` (non-negative floats).

  Bisects on the float32 bit pattern: 31 counting passes over the scores, no sort and no
  concatenation, so memory stays at the size of the scores and time is linear in them.

  Returns:
    A float32 scalar ``t`` such that at least ``k`` entries are ``>= t`` and fewer than
    ``k`` are ``> t``.
  """
  bits = [_nonnegative_bits(s) for s in scores]

  def count_at_least(threshold):
    return sum(jnp.sum(b >= threshold, dtype=jnp.int32) for b in bits)

  def halve(_, bounds):
    low, high = bounds
    middle = low + (high - low) // 2
    keep_low = count_at_least(middle) >= k
    return (jnp.where(keep_low, middle, low), jnp.where(keep_low, high, middle))

  bounds = (jnp.int32(0), jnp.int32(_INF_BITS + 1))
  # Inside shard_map the counts vary over the devices the scores vary over; the loop's
  # carry must start with the same type.
  varying = tuple(sorted(frozenset().union(*(numerics.varying_axes(b) for b in bits))))
  if varying:
    bounds = jax.lax.pcast(bounds, varying, to="varying")
  low, _ = jax.lax.fori_loop(0, 32, halve, bounds)
  return jax.lax.bitcast_convert_type(low, jnp.float32)


def global_topk_mask(scores: Any, pool: Any, keep_ratio: float) -> Any:
  """Keeps the top ``keep_ratio`` fraction of the pooled entries of ``scores``, globally.

  Args:
    scores: pytree of non-negative scores (e.g. a Fisher diagonal).
    pool: pytree of Python bools, same structure: which leaves compete for the top-k.
      Leaves outside the pool are kept entirely.
    keep_ratio: fraction in ``(0, 1]`` of the pooled entries to keep
      (``max(1, floor(keep_ratio · |pool|))`` of them; ties at the threshold are kept).

  Returns:
    A pytree of bool arrays shaped like ``scores``.
  """
  leaves, treedef = jax.tree.flatten(scores)
  in_pool = treedef.flatten_up_to(pool)
  pooled = [s for s, p in zip(leaves, in_pool) if p]
  if not pooled:
    return jax.tree.map(lambda s: placement.ones_like(s, bool), scores)
  size = sum(s.size for s in pooled)
  k = max(1, int(keep_ratio * size))
  threshold = kth_largest(pooled, k)
  masks = [_nonnegative_bits(s) >= jax.lax.bitcast_convert_type(threshold, jnp.int32)
           if p else placement.ones_like(s, bool) for s, p in zip(leaves, in_pool)]
  return jax.tree.unflatten(treedef, masks)
