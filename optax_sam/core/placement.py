"""Arrays built to match a parameter, placed where the parameter is.

Optimizer state and intermediate values that mirror a parameter (a mask, a running sum,
a random direction) must be built *from* the parameter, not from its shape: under a
``jax.sharding.Mesh`` with explicit axes, an array built from a shape is replicated on
every device, and it then breaks the types of ``lax.cond`` and ``lax.scan`` (whose
branches and carries must agree on shardings), forces a recompile when the state comes
back from the step sharded, and holds the whole parameter on every device. Every state
``init`` and every scan carry of this library goes through these functions.

Under explicit mesh axes a traced array carries its sharding in its type, and the new
array gets it (``out_sharding``). A concrete array (an eager ``init``) is placed with
``jax.device_put`` on the parameter's sharding. Under auto axes, inside ``jax.jit``, XLA
places the new array from its uses.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp


def explicit_sharding(x: Any) -> Optional[jax.sharding.NamedSharding]:
  """The sharding in ``x``'s type when ``x`` is sharded over explicit mesh axes, else None.

  ``x`` is an array, a tracer or a ``jax.ShapeDtypeStruct``.
  """
  try:
    aval = x if isinstance(x, jax.ShapeDtypeStruct) else jax.typeof(x)
  except TypeError:  # not an array (a Python bool in a mask, say)
    return None
  sharding = getattr(aval, "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  explicit = getattr(jax.sharding.AxisType, "Explicit", None)
  if mesh is None or explicit not in (getattr(mesh, "axis_types", None) or ()):
    return None
  if all(axis is None for axis in sharding.spec):
    return None
  return sharding


def _spec_for(like_sharding, shape: tuple[int, ...]):
  """``like_sharding``'s spec, with axes that do not exist or became size 1 unsharded."""
  spec = tuple(like_sharding.spec) + (None,) * len(shape)
  spec = tuple(None if size == 1 else axis for axis, size in zip(spec, shape))
  return jax.sharding.NamedSharding(like_sharding.mesh, jax.sharding.PartitionSpec(*spec))


def out_sharding(like: Any, shape: Optional[tuple[int, ...]] = None):
  """``out_sharding`` for a new array of ``shape`` (default ``like``'s) built for ``like``.

  ``shape`` must keep ``like``'s leading axes, or set them to 1 (a per-neuron draw).
  """
  if not isinstance(like, jax.core.Tracer):
    # Eagerly, an explicit out_sharding needs a mesh context; place_like moves the
    # result instead.
    return None
  sharding = explicit_sharding(like)
  if sharding is None:
    return None
  return _spec_for(sharding, jnp.shape(like) if shape is None else tuple(shape))


def place_like(value: jax.Array, like: Any) -> jax.Array:
  """Puts a concrete ``value`` built for ``like`` on ``like``'s devices (eager ``init``).

  Traced values are returned as they are: their sharding is in their type (explicit
  axes) or left to XLA (auto axes).
  """
  if isinstance(value, jax.core.Tracer) or isinstance(like, jax.core.Tracer):
    return value
  sharding = getattr(like, "sharding", None)
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return value
  if jnp.shape(value) != jnp.shape(like):
    sharding = _spec_for(sharding, jnp.shape(value))
  return jax.device_put(value, sharding)


def zeros_like(like: Any, dtype: Any = None,
               shape: Optional[tuple[int, ...]] = None) -> jax.Array:
  """Zeros shaped like ``like`` (or ``shape``), placed where ``like`` is.

  Args:
    like: the parameter (an array, concrete or traced).
    dtype: default ``like``'s.
    shape: default ``like``'s; it may set axes of ``like`` to 1 (a per-neuron count).

  Returns:
    The zeros, sharded like ``like`` (under explicit axes or when ``like`` is concrete).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> from optax_sam.core import placement
    >>> mesh = jax.make_mesh((1,), ("fsdp",))
    >>> w = jax.device_put(jnp.ones((4, 2)), NamedSharding(mesh, P("fsdp")))
    >>> placement.zeros_like(w, bool, shape=(4, 1)).sharding.spec
    P('fsdp', None)
  """
  value = jnp.zeros(jnp.shape(like) if shape is None else shape,
                    jnp.result_type(like) if dtype is None else dtype,
                    out_sharding=out_sharding(like, shape))
  return place_like(value, like)


def ones_like(like: Any, dtype: Any = None,
              shape: Optional[tuple[int, ...]] = None) -> jax.Array:
  """Ones shaped like ``like`` (or ``shape``), placed where ``like`` is."""
  value = jnp.ones(jnp.shape(like) if shape is None else shape,
                   jnp.result_type(like) if dtype is None else dtype,
                   out_sharding=out_sharding(like, shape))
  return place_like(value, like)


def broadcast_like(value: Any, like: Any, dtype: Any = None) -> jax.Array:
  """``value`` broadcast to ``like``'s shape, placed where ``like`` is."""
  value = jnp.asarray(value, dtype)
  sharding = out_sharding(like)
  if sharding is not None and explicit_sharding(value) is None:
    value = jnp.broadcast_to(value, jnp.shape(like), out_sharding=sharding)
  else:
    value = jnp.broadcast_to(value, jnp.shape(like))
  return place_like(value, like)


def bernoulli_like(key: jax.Array, p: Any, like: Any,
                   shape: Optional[tuple[int, ...]] = None) -> jax.Array:
  """``jax.random.bernoulli(key, p, shape)`` (default ``like``'s shape), placed like
  ``like``. With JAX's partitionable PRNG the values do not depend on the placement."""
  shape = jnp.shape(like) if shape is None else tuple(shape)
  value = jax.random.bernoulli(key, p, shape, out_sharding=out_sharding(like, shape))
  return place_like(value, like)


def index_like(like: Any) -> jax.Array:
  """The row-major flat index of each entry of ``like``, as uint32, placed like ``like``.

  Each device computes the indices of its own shard (no gather).
  """
  shape = jnp.shape(like)
  sharding = out_sharding(like)
  index, stride = jnp.uint32(0), 1  # A scalar's index is 0.
  for dimension in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(
        jnp.uint32, shape, dimension, out_sharding=sharding) * jnp.uint32(stride)
    stride *= shape[dimension]
  return place_like(index, like)


def normal_like(key: jax.Array, like: Any, dtype: Any = jnp.float32) -> jax.Array:
  """``jax.random.normal(key, shape, dtype)`` with ``like``'s shape, placed like ``like``."""
  value = jax.random.normal(key, jnp.shape(like), dtype, out_sharding=out_sharding(like))
  return place_like(value, like)


def zeros_like_struct(struct: jax.ShapeDtypeStruct, dtype: Any = None) -> jax.Array:
  """Zeros of a ``jax.eval_shape`` result, with the sharding its type carries (a scan's
  initial carry must have the type of the carry the body returns)."""
  sharding = explicit_sharding(struct)
  return jnp.zeros(struct.shape, struct.dtype if dtype is None else dtype,
                   out_sharding=None if sharding is None else _spec_for(sharding,
                                                                         struct.shape))


def _names(axis: Any) -> tuple:
  if axis is None:
    return ()
  return tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)


def leading_axes(tree: Any) -> frozenset:
  """The explicit mesh axes the leading (batch) axis of some leaf of ``tree`` is split over."""
  axes = set()
  for leaf in jax.tree.leaves(tree):
    sharding = explicit_sharding(leaf)
    if sharding is not None and len(sharding.spec):
      axes.update(_names(sharding.spec[0]))
  return frozenset(axes)


def gather_over(tree: Any, axes: frozenset) -> Any:
  """``tree`` with every leaf split over one of the explicit mesh ``axes`` gathered
  along them (``jax.sharding.reshard``), its other axes kept.

  ``jax.vmap`` over a batch axis split over mesh axis ``a`` cannot take an unmapped
  argument (the parameters) split over ``a`` too: under FSDP the parameters are
  gathered over ``a`` first, as the model's forward pass would gather them anyway.
  The gradient of the gather is the scatter back to the parameters' sharding.
  """
  if not axes:
    return tree

  def gather(x):
    sharding = explicit_sharding(x)
    if sharding is None:
      return x
    spec = [tuple(n for n in _names(axis) if n not in axes) for axis in sharding.spec]
    if spec == [_names(axis) for axis in sharding.spec]:
      return x
    spec = [None if not names else names[0] if len(names) == 1 else names for names in spec]
    return jax.sharding.reshard(
        x, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec)))

  return jax.tree.map(gather, tree)
