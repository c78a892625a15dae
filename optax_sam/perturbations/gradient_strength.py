"""GA-SAM's pieces (a reconstruction): gradient strength, and the region it shapes.

The paper's exact update rule was not available (no paper body, no public code). What
is implemented is the reconstruction documented in the project's METHODS.md, kept in
three small functions so that it can be corrected in one place:

* the strength statistic, :func:`update_strength`: ``s = √v̂`` with ``v̂`` a
  bias-corrected exponential moving average of ``g²`` (``v̂ = g²`` at step 1);
* the region shape, :func:`relative_strength`: semi-axes ``ρ · ŝ`` with
  ``ŝ = min(s / rms(s), max_scale)``, so coordinates with strong historical gradients
  get the larger corruption and ``‖ε‖ <= max_scale · ρ``;
* the ascent, :func:`gradient_strength_ellipsoid`: the first-order maximiser over that
  ellipsoid, ``ε = ρ (ŝ² ⊙ g) / ‖ŝ ⊙ g‖``, optionally repeated from ``w + ε``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_sam.core import loss as loss_lib
from optax_sam.core import numerics
from optax_sam.core import placement


class GradientStrengthState(NamedTuple):
  count: jax.Array  # steps taken
  second_moment: Any  # float32 EMA of g², not bias-corrected


def update_strength(
    second_moment: Any, grads: Any, count: jax.Array, beta: float
) -> tuple[Any, Any]:
  """One EMA step of ``g²``; returns the new moment and the strength ``s = √v̂``.

  Args:
    second_moment: the previous EMA (float32 pytree), zeros before the first step.
    grads: the clean gradient.
    count: steps taken before this one.
    beta: EMA decay in ``[0, 1)``.

  Returns:
    ``(new_second_moment, strength)``, both float32 pytrees.
  """
  new_moment = jax.tree.map(
      lambda v, g: beta * v + (1.0 - beta) * jnp.square(g.astype(jnp.float32)),
      second_moment, grads)
  correction = 1.0 - jnp.asarray(beta, jnp.float32) ** (count + 1).astype(jnp.float32)
  strength = jax.tree.map(lambda v: jnp.sqrt(v / correction), new_moment)
  return new_moment, strength


def relative_strength(strength: Any, max_scale: float) -> Any:
  """``ŝ = min(s / rms(s), max_scale)``, the rms taken over every entry of the pytree."""
  leaves = jax.tree.leaves(strength)
  size = sum(x.size for x in leaves)
  rms = numerics.global_norm(strength) / jnp.sqrt(jnp.float32(max(size, 1)))
  safe_rms = jnp.where(rms > 0, rms, 1.0)
  return jax.tree.map(lambda s: jnp.minimum(s / safe_rms, max_scale), strength)


def _ellipsoid_ascent(grads: Any, axes: Any, radius: jax.Array, eps: float) -> Any:
  """``ρ (a² ⊙ g) / (‖a ⊙ g‖ + eps)``: maximises ``gᵀε`` over ``‖ε / a‖ <= ρ``."""
  scaled = jax.tree.map(lambda g, a: a * g.astype(jnp.float32), grads, axes)
  factor = radius / (numerics.global_norm(scaled) + eps)
  return jax.tree.map(lambda s, a: factor * a * s, scaled, axes)


def _project_onto_ellipsoid(epsilon: Any, axes: Any, radius: jax.Array) -> Any:
  """Radial projection onto ``‖ε / a‖ <= ρ`` (exact in the whitened coordinates)."""
  whitened = jax.tree.map(
      lambda e, a: jnp.where(a > 0, e / jnp.where(a > 0, a, 1.0), 0.0), epsilon, axes)
  size = numerics.global_norm(whitened)
  shrink = jnp.where(size > radius, radius / jnp.maximum(size, 1e-30), 1.0)
  return jax.tree.map(lambda e: e * shrink, epsilon)


def gradient_strength_ellipsoid(
    rho: numerics.ScalarOrSchedule = 0.05,
    *,
    beta: float = 0.99,
    max_scale: float = 10.0,
    ascent_steps: int = 1,
    eps: float = numerics.NORM_EPS,
) -> optax.GradientTransformationExtraArgs:
  """Ascent over an ellipsoid whose semi-axes follow each parameter's gradient strength.

  Maps the clean gradient ``g`` to ``ε = ρ (ŝ² ⊙ g) / ‖ŝ ⊙ g‖`` (see the module
  docstring: a reconstruction of GA-SAM, not the paper's verified rule). With
  ``ascent_steps = K > 1`` the ascent is repeated ``K − 1`` times from ``w + ε`` with the
  gradient there (through ``loss_fn``), each step followed by a projection back onto the
  ellipsoid; ``ŝ`` is updated once per call, from the clean gradient.

  Args:
    rho: radius ``ρ >= 0`` (constant or schedule).
    beta: EMA decay of ``g²`` in ``[0, 1)``.
    max_scale: cap ``> 0`` on the relative strength ``ŝ``.
    ascent_steps: number of ascent steps, ``>= 1``.
    eps: ``δ > 0`` added to ``‖ŝ ⊙ g‖``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (it needs ``loss_fn`` when
    ``ascent_steps > 1``).

  Example:
    >>> import jax.numpy as jnp
    >>> from optax_sam import perturbations
    >>> piece = perturbations.gradient_strength_ellipsoid(0.1)
    >>> g = jnp.array([3.0, 4.0])
    >>> eps, _ = piece.update(g, piece.init(g), g)
  """
  numerics.check_range("rho", rho, low=0.0, schedule=True)
  numerics.check_range("beta", beta, low=0.0, high=1.0, high_inclusive=False)
  numerics.check_range("max_scale", max_scale, low=0.0, low_inclusive=False)
  numerics.check_positive_int("ascent_steps", ascent_steps)
  numerics.check_range("eps", eps, low=0.0, low_inclusive=False)

  def init_fn(params: optax.Params) -> GradientStrengthState:
    return GradientStrengthState(
        count=jnp.zeros((), jnp.int32),
        second_moment=jax.tree.map(lambda p: placement.zeros_like(p, jnp.float32), params))

  def update_fn(updates, state, params=None, *, loss_fn=None, example_mask=None,
                **extra_args):
    del extra_args
    radius = numerics.value_at(rho, state.count)
    second_moment, strength = update_strength(
        state.second_moment, updates, state.count, beta)
    axes = relative_strength(strength, max_scale)
    epsilon = _ellipsoid_ascent(updates, axes, radius, eps)
    if ascent_steps > 1:
      piece = "gradient_strength_ellipsoid with ascent_steps > 1"
      loss_fn = loss_lib.require_loss_fn(loss_fn, piece)
      params = loss_lib.require_params(params, piece)

      def ascend(_, epsilon):
        perturbed = jax.tree.map(lambda w, e: w + e.astype(w.dtype), params, epsilon)
        grads = loss_lib.mean_loss_gradient(loss_fn, perturbed, example_mask)
        stepped = jax.tree.map(jnp.add, epsilon,
                               _ellipsoid_ascent(grads, axes, radius, eps))
        return _project_onto_ellipsoid(stepped, axes, radius)

      epsilon = jax.lax.fori_loop(1, ascent_steps, ascend, epsilon)
    epsilon = numerics.tree_cast_like(epsilon, updates)
    return epsilon, GradientStrengthState(
        count=optax.safe_increment(state.count), second_moment=second_moment)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
