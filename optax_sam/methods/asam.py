"""ASAM: adaptive (scale-invariant) sharpness-aware minimisation."""

from __future__ import annotations

from typing import Optional

import optax

from optax_sam.core import numerics
from optax_sam.core.sharpness import amortisation_period
from optax_sam.core.sharpness import every_kth_step
from optax_sam.core.sharpness import sharpness_aware
from optax_sam.perturbations.parameter_scaling import parameter_magnitude_ellipsoid


def asam(
    rho: numerics.ScalarOrSchedule = 0.5,
    eta: float = 0.01,
    *,
    perturb_every: Optional[int] = None,
    reuse_alpha: Optional[float] = None,
    eps: float = numerics.NORM_EPS,
    axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  """Adaptive SAM: the gradient at ``w + ρ T² g / ‖T g‖`` with ``T = |w| + η``.

  The maximiser of the first-order loss over the scale-invariant region
  ``‖T⁻¹ ε‖ ≤ ρ`` of the paper, with ``T_w = |w| + η`` applied to every parameter,
  biases included (the paper's definition; some ports use ``|w|`` alone or exempt
  biases). The paper's ρ is about ten times SAM's; on MiniLM-L6 an equally long step
  takes about twice SAM's ρ (``python -m benchmarks.perturbation_scale``). Its
  perturbation is :func:`optax_sam.perturbations.parameter_magnitude_ellipsoid`.

  Args:
    rho: radius ``ρ >= 0`` of the adaptive region (constant or schedule).
    eta: ``η >= 0`` in ``T = |w| + η``.
    perturb_every: perturb on every k-th step only (amortised steps, LookSAM);
      ``None`` or ``1`` is the method itself. A ``rho`` schedule still reads the step count.
    reuse_alpha: LookSAM's ``α >= 0`` for the steps between perturbing steps, or
      ``None`` for the clean gradient there. See :func:`optax_sam.sharpness_aware`.
    eps: ``δ > 0`` added to ``‖T g‖``.
    axis_name: per-device perturbation; see :func:`optax_sam.sharpness_aware`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
    Learning of Deep Neural Networks <https://arxiv.org/abs/2102.11600>`_, ICML 2021.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_sam
    >>> params = jnp.array([1.0, -2.0])
    >>> loss_fn = lambda p: jnp.sum(p ** 2, keepdims=True)
    >>> tx = optax.chain(optax_sam.asam(rho=0.5), optax.sgd(0.1))
    >>> grads = jax.grad(lambda p: loss_fn(p).mean())(params)
    >>> updates, _ = tx.update(grads, tx.init(params), params, loss_fn=loss_fn)
  """
  perturb_every = amortisation_period(perturb_every, reuse_alpha)
  perturbation = parameter_magnitude_ellipsoid(every_kth_step(rho, perturb_every), eta,
                                               eps=eps)
  return sharpness_aware(perturbation, perturb_every=perturb_every,
                         reuse_alpha=reuse_alpha, axis_name=axis_name, method="asam")
