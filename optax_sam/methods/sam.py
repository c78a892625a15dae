"""SAM: sharpness-aware minimisation."""

from __future__ import annotations

from typing import Optional

import optax

from optax_sam.core import numerics
from optax_sam.core.sharpness import amortisation_period
from optax_sam.core.sharpness import every_kth_step
from optax_sam.core.sharpness import sharpness_aware
from optax_sam.perturbations.radius import scale_to_radius


def sam(
    rho: numerics.ScalarOrSchedule = 0.05,
    *,
    perturb_every: Optional[int] = None,
    reuse_alpha: Optional[float] = None,
    eps: float = numerics.NORM_EPS,
    axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  """Sharpness-aware minimisation: the gradient at ``w + ρ g / (‖g‖ + δ)``.

  Chain it before a base optimizer; its ``update`` needs ``params`` and the ``loss_fn``
  extra argument (per-example or scalar loss of the current batch). Cost: one extra
  forward and backward pass per step.

  Args:
    rho: neighbourhood radius ``ρ >= 0`` (a constant or a schedule); ``ρ = 0`` gives the
      base optimizer's step.
    perturb_every: perturb on every k-th step only (amortised steps, LookSAM);
      ``None`` or ``1`` is the method itself. A ``rho`` schedule still reads the step count.
    reuse_alpha: LookSAM's ``α >= 0`` for the steps between perturbing steps, or
      ``None`` for the clean gradient there. See :func:`optax_sam.sharpness_aware`.
    eps: ``δ > 0`` added to the gradient norm (float32).
    axis_name: per-device perturbation ("m-sharpness") inside ``shard_map``/``pmap``; see
      :func:`optax_sam.sharpness_aware`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving Generalization
    <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_sam
    >>> params = jnp.array([1.0, -2.0])
    >>> loss_fn = lambda p: jnp.sum(p ** 2, keepdims=True)  # one "example"
    >>> tx = optax.chain(optax_sam.sam(rho=0.05), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> grads = jax.grad(lambda p: loss_fn(p).mean())(params)
    >>> updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    >>> params = optax.apply_updates(params, updates)
  """
  perturb_every = amortisation_period(perturb_every, reuse_alpha)
  return sharpness_aware(scale_to_radius(every_kth_step(rho, perturb_every), eps=eps),
                         perturb_every=perturb_every, reuse_alpha=reuse_alpha,
                         axis_name=axis_name, method="sam")
