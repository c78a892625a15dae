"""Scale the incoming direction onto the L2 sphere of radius ρ (SAM's ascent step)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_sam.core import numerics


class ScaleToRadiusState(NamedTuple):
  count: jax.Array  # steps taken, for a ρ schedule


def scale_to_radius(
    rho: numerics.ScalarOrSchedule = 0.05,
    *,
    eps: float = numerics.NORM_EPS,
) -> optax.GradientTransformation:
  """Maps ``u`` to ``ρ · u / (‖u‖ + eps)``, the norm taken over the whole pytree.

  Applied to the clean gradient this is SAM's first-order maximiser of the loss in the
  ball ``‖ε‖ ≤ ρ``. The norm is accumulated in float32 and the result keeps the input
  dtypes; a zero input gives a zero (finite) output.

  Args:
    rho: radius ``ρ >= 0``, a constant or an optax schedule of the step count.
    eps: ``δ > 0`` added to the norm; must be representable in float32.

  Returns:
    A stateless-in-shape ``optax.GradientTransformation`` (it counts steps for ``rho``).

  Example:
    >>> import jax.numpy as jnp
    >>> from optax_sam import perturbations
    >>> tx = perturbations.scale_to_radius(0.5)
    >>> u = jnp.array([3.0, 4.0])
    >>> tx.update(u, tx.init(u))[0]
    Array([0.3, 0.4], dtype=float32)
  """
  numerics.check_range("rho", rho, low=0.0, schedule=True)
  numerics.check_range("eps", eps, low=0.0, low_inclusive=False)

  def init_fn(params: optax.Params) -> ScaleToRadiusState:
    del params
    return ScaleToRadiusState(count=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    radius = numerics.value_at(rho, state.count)
    factor = radius / (numerics.global_norm(updates) + eps)
    scaled = jax.tree.map(lambda u: (u.astype(jnp.float32) * factor).astype(u.dtype),
                          updates)
    return scaled, ScaleToRadiusState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)
