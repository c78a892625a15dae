"""ASAM's adaptive scaling by ``T_w = |w| + η`` and the ascent over its ellipsoid."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_sam.core import loss as loss_lib
from optax_sam.core import numerics
from optax_sam.perturbations.radius import scale_to_radius


def scale_by_parameter_magnitude(eta: float = 0.01) -> optax.GradientTransformation:
  """Maps ``u`` to ``T_w ⊙ u`` with ``T_w = |w| + η`` (Kwon et al., 2021).

  This is the paper's operator, applied to every parameter (weights and biases alike).
  ASAM's perturbation, :func:`parameter_magnitude_ellipsoid`, is this piece, then
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


def parameter_magnitude_ellipsoid(
    rho: numerics.ScalarOrSchedule = 0.5,
    eta: float = 0.01,
    *,
    eps: float = numerics.NORM_EPS,
) -> optax.GradientTransformation:
  """ASAM's ascent: maps ``g`` to ``ε = ρ · T² g / (‖T g‖ + eps)`` with ``T = |w| + η``.

  The first-order maximiser of the loss over the ellipsoid ``‖T⁻¹ ε‖ ≤ ρ`` (Kwon et
  al., 2021): :func:`scale_by_parameter_magnitude`, :func:`scale_to_radius`, then
  :func:`scale_by_parameter_magnitude` again. ``‖ε‖ / ρ`` depends on the model's
  weights; ``python -m benchmarks.perturbation_scale`` measures it, to match the
  length of SAM's step.

  Args:
    rho: radius ``ρ >= 0`` of the ellipsoid (constant or schedule).
    eta: ``η >= 0`` in ``T = |w| + η``.
    eps: ``δ > 0`` added to ``‖T g‖``.

  Returns:
    An ``optax.GradientTransformation`` that needs ``params``.

  References:
    Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
    Learning of Deep Neural Networks <https://arxiv.org/abs/2102.11600>`_, ICML 2021.

  Example:
    >>> import jax.numpy as jnp
    >>> from optax_sam import perturbations
    >>> piece = perturbations.parameter_magnitude_ellipsoid(1.0, eta=0.0)
    >>> w, g = jnp.array([1.0, 2.0]), jnp.array([4.0, 1.0])
    >>> piece.update(g, piece.init(w), w)[0]  # T g = [4, 2], T² g = [4, 4]
    Array([0.8944272, 0.8944272], dtype=float32)
  """
  return optax.chain(scale_by_parameter_magnitude(eta),
                     scale_to_radius(rho, eps=eps),
                     scale_by_parameter_magnitude(eta))
