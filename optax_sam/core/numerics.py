"""Float32 reductions, dtype casting and the finiteness guard every method shares."""

from __future__ import annotations

from typing import Any, Callable, Union

import chex
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


def tree_to_float32(tree: Any) -> Any:
  return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def tree_cast_like(tree: Any, like: Any) -> Any:
  """Casts every leaf of ``tree`` to the dtype of the matching leaf of ``like``."""
  return jax.tree.map(lambda x, y: x.astype(y.dtype), tree, like)


def zero_if_not_finite(tree: Any) -> Any:
  """Returns ``tree``, or zeros of its shape if any leaf is NaN or infinite."""
  finite = tree_all_finite(tree)
  return jax.tree.map(lambda x: jnp.where(finite, x, jnp.zeros_like(x)), tree)


def nan_unless_finite(tree: Any, reference: Any) -> Any:
  """Returns ``tree``, or NaNs of its shape if any leaf of ``reference`` is not finite."""
  finite = tree_all_finite(reference)
  return jax.tree.map(lambda x: jnp.where(finite, x, jnp.full_like(x, jnp.nan)), tree)


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
) -> None:
  """Raises ``ValueError`` naming ``name`` and the allowed range if ``value`` is outside.

  Schedules and traced values pass through unchecked (see ``is_concrete_number``).
  """
  if not is_concrete_number(value):
    return
  v = float(value)
  ok = v == v  # rejects NaN
  if low is not None:
    ok = ok and (v >= low if low_inclusive else v > low)
  if high is not None:
    ok = ok and (v <= high if high_inclusive else v < high)
  if not ok:
    left = "-inf" if low is None else f"{low}"
    right = "inf" if high is None else f"{high}"
    interval = (("[" if low_inclusive else "(") + f"{left}, {right}" +
                ("]" if high_inclusive else ")"))
    raise ValueError(f"{name} must be in {interval}, got {value!r}.")


def check_positive_int(name: str, value: Any, *, minimum: int = 1) -> None:
  """Raises ``ValueError`` unless ``value`` is an integer >= ``minimum``."""
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def safe_increment(count: chex.Array) -> chex.Array:
  return optax.safe_increment(count)


Predicate = Callable[[tuple, jax.Array], bool]
