"""GA-SAM: gradient-strength adaptive sharpness-aware minimisation (a reconstruction)."""

from __future__ import annotations

from typing import Optional

import optax

from optax_sam.core import numerics
from optax_sam.core.sharpness import amortisation_period
from optax_sam.core.sharpness import every_kth_step
from optax_sam.core.sharpness import sharpness_aware
from optax_sam.perturbations.gradient_strength import gradient_strength_ellipsoid


def gasam(
    rho: numerics.ScalarOrSchedule = 0.05,
    *,
    beta: float = 0.99,
    max_scale: float = 10.0,
    ascent_steps: int = 1,
    perturb_every: Optional[int] = None,
    reuse_alpha: Optional[float] = None,
    eps: float = numerics.NORM_EPS,
    axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  """GA-SAM as reconstructed here: SAM over an ellipsoid shaped by gradient strength.

  **The paper's exact update rule could not be obtained** (no paper body, no public
  code). What is known: GA-SAM treats a train/test shift as a virtual parameter
  corruption and sets the corruption strength per parameter and over time from a
  gradient-strength statistic, possibly with several ascent steps. This implements the
  reconstruction in the project's METHODS.md: strength ``s = √v̂`` (bias-corrected EMA
  of ``g²``, decay ``beta``), relative strength ``ŝ = min(s / rms(s), max_scale)``,
  ellipsoid semi-axes ``ρ ŝ``, and its first-order maximiser
  ``ε = ρ (ŝ² ⊙ g) / ‖ŝ ⊙ g‖``. Coordinates with strong historical gradients get the
  larger corruption. The opposite scaling (axes ∝ 1/s, from a Gauss-Newton curvature)
  was rejected: it is largest on the weakest, noisiest gradients and unbounded as
  ``v → 0``. The pieces live in ``optax_sam.perturbations.gradient_strength``.

  Cost: SAM's two passes per step, plus one forward+backward pass per extra ascent
  step. Extra state: one float32 per parameter.

  Args:
    rho: base radius ``ρ >= 0`` (constant or schedule); ``‖ε‖ <= max_scale · ρ``.
    beta: EMA decay of ``g²`` in ``[0, 1)``. With ``perturb_every > 1`` the average
      is updated on perturbing steps only.
    max_scale: cap ``> 0`` on ``ŝ``.
    ascent_steps: ascent steps ``>= 1``; more than one needs ``loss_fn`` per step.
    perturb_every: perturb on every k-th step only (amortised steps, LookSAM);
      ``None`` or ``1`` is the method itself. A ``rho`` schedule still reads the step count.
    reuse_alpha: LookSAM's ``α >= 0`` for the steps between perturbing steps, or
      ``None`` for the clean gradient there. See :func:`optax_sam.sharpness_aware`.
    eps: ``δ > 0`` added to ``‖ŝ ⊙ g‖``.
    axis_name: per-device perturbation; see :func:`optax_sam.sharpness_aware`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Zhang et al., `GA-SAM: Gradient-Strength based Adaptive Sharpness-Aware
    Minimization for Improved Generalization <https://arxiv.org/abs/2210.06895>`_,
    EMNLP 2022.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_sam
    >>> params = jnp.array([1.0, -2.0])
    >>> loss_fn = lambda p: jnp.sum(p ** 2, keepdims=True)
    >>> tx = optax.chain(optax_sam.gasam(rho=0.05), optax.sgd(0.1))
    >>> grads = jax.grad(lambda p: loss_fn(p).mean())(params)
    >>> updates, _ = tx.update(grads, tx.init(params), params, loss_fn=loss_fn)
  """
  perturb_every = amortisation_period(perturb_every, reuse_alpha)
  perturbation = gradient_strength_ellipsoid(
      every_kth_step(rho, perturb_every), beta=beta, max_scale=max_scale, ascent_steps=ascent_steps, eps=eps)
  return sharpness_aware(perturbation, perturb_every=perturb_every,
                         reuse_alpha=reuse_alpha, axis_name=axis_name, method="gasam")
