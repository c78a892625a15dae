"""Float32 reductions, dtype casting and the finiteness guard every method shares."""

from __future__ import annotations

import math
from typing import Any, Union

import jax
import jax.numpy as jnp
import optax

ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]

# Added to a norm before dividing by it. 1e-12 is representable in float32, which is the
# dtype every norm here is accumulated in, whatever the parameter dtype.
NORM_EPS = 1e-12


def global_norm(tree: Any) -> jax.Array:
  """L2 norm over every leaf of ``tree``, accumulated in float32."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def tree_all_finite(tree: Any) -> jax.Array:
  """A scalar bool: True when no leaf of ``tree`` holds a NaN or an infinity."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.asarray(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def tree_cast_like(tree: Any, like: Any) -> Any:
  """Casts every leaf of ``tree`` to the dtype of the matching leaf of ``like``."""
  return jax.tree.map(lambda x, y: x.astype(y.dtype), tree, like)


# Both guards branch once with lax.cond rather than select per leaf: the result is the
# same, and a per-leaf select over every parameter triples the step's compile time.


def zero_if_not_finite(tree: Any) -> Any:
  """Returns ``tree``, or zeros of its shape if any leaf is NaN or infinite."""
  return jax.lax.cond(tree_all_finite(tree), lambda t: t,
                      lambda t: jax.tree.map(jnp.zeros_like, t), tree)


def nan_unless_finite(tree: Any, reference: Any) -> Any:
  """Returns ``tree``, or NaNs of its shape if any leaf of ``reference`` is not finite."""
  return jax.lax.cond(tree_all_finite(reference), lambda t: t,
                      lambda t: jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), t), tree)


def varying_axes(x: Any) -> frozenset:
  """The ``shard_map`` mesh axes over which ``x`` varies (empty outside ``shard_map``).

  ``x`` is an array or a ``jax.ShapeDtypeStruct`` from ``jax.eval_shape``.
  """
  aval = x if isinstance(x, jax.ShapeDtypeStruct) else jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10
  if manual is not None:
    return frozenset(manual.varying)
  return frozenset(getattr(aval, "vma", ()) or ())  # earlier releases


def device_varying(tree: Any, axis_name: str) -> Any:
  """Marks replicated leaves as varying over ``axis_name`` inside ``shard_map``.

  The gradient of a device-local loss with respect to a replicated value is summed over
  the devices by ``shard_map``'s variance tracking; with respect to a varying value it
  stays local, which is what a per-device perturbation needs. Outside ``shard_map``
  (no variance tracking) the tree is returned as it is.
  """
  def cast(x):
    if axis_name in varying_axes(x) or not _inside_shard_map(axis_name):
      return x
    return jax.lax.pcast(x, axis_name, to="varying")
  return jax.tree.map(cast, tree)


def match_varying(tree: Any, like: Any) -> Any:
  """Casts ``tree`` to vary over every ``shard_map`` axis some leaf of ``like`` varies over.

  Lets per-device state (a mask kept from an earlier step) and a freshly computed,
  device-varying value be the two branches of one ``lax.cond``.
  """
  axes = tuple(sorted(frozenset().union(*map(varying_axes, jax.tree.leaves(like)))))
  if not axes:
    return tree
  def cast(x):
    missing = tuple(a for a in axes if a not in varying_axes(x))
    return jax.lax.pcast(x, missing, to="varying") if missing else x
  return jax.tree.map(cast, tree)


def _inside_shard_map(axis_name: str) -> bool:
  """True when ``axis_name`` is a manual (``shard_map``) axis of the current trace."""
  mesh = jax.sharding.get_abstract_mesh()
  manual = getattr(jax.sharding.AxisType, "Manual", None)
  names = getattr(mesh, "axis_names", ()) or ()
  types = getattr(mesh, "axis_types", ()) or ()
  return any(n == axis_name and t == manual for n, t in zip(names, types))


def value_at(value: ScalarOrSchedule, count: jax.Array) -> jax.Array:
  """Evaluates a constant-or-schedule hyperparameter at step ``count`` in float32."""
  if callable(value):
    value = value(count)
  return jnp.asarray(value, jnp.float32)


def is_concrete_number(value: Any) -> bool:
  """True for a Python or NumPy number we can range-check at construction.

  Schedules and traced arrays (``optax.inject_hyperparams`` passes hyperparameters as
  arrays) are checked only where they are used.
  """
  if callable(value):
    return False
  try:
    jnp.asarray(value)
  except TypeError:
    return False
  return not isinstance(value, jax.core.Tracer) and jnp.ndim(value) == 0


def check_range(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    schedule: bool = False,
) -> None:
  """Raises ``ValueError`` naming ``name`` and the allowed range if ``value`` is outside
  it or not finite.

  Args:
    name: the argument's name, for the message.
    value: a number, an array (``optax.inject_hyperparams`` passes arrays, traced under
      ``jax.jit``: those are checked only where they are used), or a schedule.
    low, high, low_inclusive, high_inclusive: the allowed interval.
    schedule: whether ``value`` may be an optax schedule (a callable of the step count,
      evaluated with :func:`value_at`). Where it may not, a callable raises here, at
      construction, rather than failing later inside a traced update.
  """
  if callable(value) and not schedule:
    raise ValueError(
        f"{name} takes a number, not a schedule: got {value!r}. Pass a constant (under "
        f"optax.inject_hyperparams it may still change between steps).")
  if not is_concrete_number(value):
    return
  v = float(value)
  ok = math.isfinite(v)  # no hyperparameter means anything at NaN or infinity
  if low is not None:
    ok = ok and (v >= low if low_inclusive else v > low)
  if high is not None:
    ok = ok and (v <= high if high_inclusive else v < high)
  if not ok:
    left = "-inf" if low is None else f"{low}"
    right = "inf" if high is None else f"{high}"
    interval = (("(" if low is None or not low_inclusive else "[") + f"{left}, {right}" +
                ("]" if high is not None and high_inclusive else ")"))
    raise ValueError(f"{name} must be in {interval}, got {value!r}.")


def check_static_number(name: str, value: Any, fixes: str) -> None:
  """Raises ``ValueError`` unless ``value`` is a concrete number (no schedule, no tracer).

  For float arguments that fix a shape or a Python-level length: ``fixes`` says which,
  for the message (e.g. ``"the stage length"``).
  """
  if not is_concrete_number(value):
    raise ValueError(f"{name} must be a number, not a schedule or a traced value: it "
                     f"fixes {fixes}; got {value!r}.{_static_args_hint(name, value)}")


def check_positive_int(name: str, value: Any, *, minimum: int = 1) -> None:
  """Raises ``ValueError`` unless ``value`` is an integer >= ``minimum``."""
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    hint = _static_args_hint(name, value)
    if hint:
      hint = (" It fixes shapes or loop lengths, so it cannot be an array or a traced "
              "value." + hint)
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.{hint}")


def _static_args_hint(name: str, value: Any) -> str:
  """For an array argument: how to keep it a Python number under inject_hyperparams."""
  if not (hasattr(value, "shape") and hasattr(value, "dtype")):
    return ""
  # optax.inject_hyperparams turns every numeric argument into an array.
  return f" With optax.inject_hyperparams, list it in static_args=({name!r},)."


def check_seed(seed: Any) -> None:
  """Raises ``ValueError`` unless ``seed`` is an integer (Python, NumPy, or 0-d array)."""
  dtype = getattr(seed, "dtype", None)
  integer = (isinstance(seed, int) and not isinstance(seed, bool)) or (
      dtype is not None and jnp.issubdtype(dtype, jnp.integer) and jnp.ndim(seed) == 0)
  if not integer:
    raise ValueError(f"seed must be an integer, got {seed!r}.")
