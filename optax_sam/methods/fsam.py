"""FSAM: sharpness-aware minimisation with a Fisher mask on the perturbation."""

from __future__ import annotations

from typing import Optional

import optax

from optax_sam.core import numerics
from optax_sam.core import selection as selection_lib
from optax_sam.core.sharpness import amortisation_period
from optax_sam.core.sharpness import every_kth_step
from optax_sam.core.sharpness import sharpness_aware
from optax_sam.perturbations.fisher_mask import FisherEstimator
from optax_sam.perturbations.fisher_mask import fisher_mask
from optax_sam.perturbations.radius import scale_to_radius


def fsam(
    rho: numerics.ScalarOrSchedule = 0.05,
    keep_ratio: float = 0.1,
    mask_every: int = 100,
    *,
    fisher: FisherEstimator = "per_example",
    fisher_samples: int = 32,
    fisher_chunk_size: Optional[int] = 8,
    pool: Optional[selection_lib.Selection] = None,
    perturb_every: Optional[int] = None,
    reuse_alpha: Optional[float] = None,
    eps: float = numerics.NORM_EPS,
    axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  """Fisher-mask SAM: the gradient at ``w + ρ (g ⊙ m) / (‖g‖ + δ)``.

  ``m`` keeps the ``keep_ratio`` fraction of the candidate pool (all parameters but
  biases and embeddings, by default) with the largest diagonal Fisher information,
  chosen globally and refreshed on the first step and every ``mask_every`` steps;
  parameters outside the pool are perturbed densely. Only the perturbation is masked:
  the gradient at ``w + ε`` updates every parameter. The norm is of the full gradient
  and the masked perturbation is not renormalised (the authors' code), so
  ``‖ε‖ <= ρ``. Unlike the released code, the perturbation is not zeroed on refresh
  steps. ``keep_ratio = 1`` is SAM.

  Cost: SAM's two passes per step, plus on refresh steps the Fisher estimate: for
  ``fisher="per_example"``, one backward pass per sampled example (per example when
  ``loss_fn`` is a :class:`optax_sam.PerExampleLoss`, else of the whole batch); for
  ``"squared_gradient"``, nothing. Extra state: one bool per parameter.

  Args:
    rho: radius ``ρ >= 0`` (constant or schedule).
    keep_ratio: fraction in ``(0, 1]`` of the pool that is perturbed.
    mask_every: refresh period in steps, ``>= 1``. With ``perturb_every = k`` the mask
      is refreshed on perturbing steps, every ``k ⌈mask_every / k⌉`` steps.
    fisher: ``"per_example"`` (empirical Fisher, the paper; default) or
      ``"squared_gradient"`` (``g²``, the authors' code).
    fisher_samples: examples of the batch used by the per-example estimator.
    fisher_chunk_size: examples per ``vmap`` chunk (bounds memory); ``None`` for all.
    pool: predicate on parameter paths or pytree of bools choosing the candidates.
    perturb_every: perturb on every k-th step only (amortised steps, LookSAM);
      ``None`` or ``1`` is the method itself. A ``rho`` schedule still reads the step count.
    reuse_alpha: LookSAM's ``α >= 0`` for the steps between perturbing steps, or
      ``None`` for the clean gradient there. See :func:`optax_sam.sharpness_aware`.
    eps: ``δ > 0`` added to ``‖g‖``.
    axis_name: per-device perturbation; see :func:`optax_sam.sharpness_aware`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params`` and
    ``loss_fn`` (per-example losses for the per-example estimator).

  References:
    Zhong et al., `Improving Sharpness-Aware Minimization with Fisher Mask for Better
    Generalization on Language Models <https://arxiv.org/abs/2210.05497>`_, Findings of
    EMNLP 2022.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_sam
    >>> params = {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}
    >>> x, y = jnp.ones((4, 3)), jnp.zeros((4, 2))
    >>> loss_fn = lambda p: jnp.sum((x @ p["kernel"] + p["bias"] - y) ** 2, axis=1)
    >>> tx = optax.chain(optax_sam.fsam(rho=0.05, keep_ratio=0.5), optax.adamw(1e-3))
    >>> grads = jax.grad(lambda p: loss_fn(p).mean())(params)
    >>> updates, _ = tx.update(grads, tx.init(params), params, loss_fn=loss_fn)
  """
  perturb_every = amortisation_period(perturb_every, reuse_alpha)
  numerics.check_positive_int("mask_every", mask_every)
  perturbation = optax.chain(
      scale_to_radius(every_kth_step(rho, perturb_every), eps=eps),
      # The mask's count advances on perturbing steps only.
      fisher_mask(keep_ratio, -(-mask_every // perturb_every), fisher=fisher, fisher_samples=fisher_samples,
                  fisher_chunk_size=fisher_chunk_size, pool=pool),
  )
  return sharpness_aware(perturbation, perturb_every=perturb_every,
                         reuse_alpha=reuse_alpha, axis_name=axis_name, method="fsam")
