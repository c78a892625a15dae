"""ASAM's adaptive scaling: multiply by ``T_w = |w| + η`` element-wise."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_sam.core import loss as loss_lib
from optax_sam.core import numerics


def scale_by_parameter_magnitude(eta: float = 0.01) -> optax.GradientTransformation:
  """Maps ``u`` to ``T_w ⊙ u`` with ``T_w = |w| + η`` (Kwon et al., 2021).

  This is the paper's operator, applied to every parameter (weights and biases alike).
  ASAM's perturbation ``ρ · T² g / ‖T g‖`` is this piece, then
  :func:`scale_to_radius`, then this piece again.

  Args:
    eta: ``η >= 0``, keeps parameters at zero perturbable.

  Returns:
    A stateless ``optax.GradientTransformation`` that needs ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> from optax_sam import perturbations
    >>> tx = perturbations.scale_by_parameter_magnitude(0.5)
    >>> w = jnp.array([1.0, -2.0])
    >>> tx.update(jnp.ones(2), tx.init(w), w)[0]
    Array([1.5, 2.5], dtype=float32)
  """
  numerics.check_range("eta", eta, low=0.0)

  def update_fn(updates: Any, state: optax.EmptyState, params: Any = None):
    params = loss_lib.require_params(params, "scale_by_parameter_magnitude")
    scaled = jax.tree.map(
        lambda u, w: ((jnp.abs(w.astype(jnp.float32)) + eta) * u.astype(jnp.float32)
                      ).astype(u.dtype), updates, params)
    return scaled, state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)
