"""δ-SAM: sharpness-aware minimisation with dynamic reweighting."""

from __future__ import annotations

from typing import Optional

import optax

from optax_sam.core import numerics
from optax_sam.core.sharpness import amortisation_period
from optax_sam.core.sharpness import every_kth_step
from optax_sam.core.sharpness import sharpness_aware
from optax_sam.perturbations.reweighting import reweighted_ascent


def delta_sam(
    rho: numerics.ScalarOrSchedule = 0.05,
    eta: numerics.ScalarOrSchedule = 1e-4,
    *,
    seed: int = 0,
    perturb_every: Optional[int] = None,
    reuse_alpha: Optional[float] = None,
    eps: float = numerics.NORM_EPS,
    axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  """δ-SAM: the gradient at ``w + ε``, ``ε`` the SAM step of a reweighted batch loss.

  Approximates the per-instance adversary ``(1/N) Σ_i max_{‖ε_i‖≤ρ} l_i(w + ε_i)``
  (:func:`optax_sam.per_instance_sam`) with one perturbation for the batch: examples are
  weighted by ``a_i = |l_i(w+r) + l_i(w−r) − 2 l_i(w)| / max(|l_i(w+r) − l_i(w−r)|, η)``
  along one random direction ``‖r‖ = ρ``, and
  ``ε = ρ ∇Σ_i a_i l_i(w) / ‖∇Σ_i a_i l_i(w)‖``. The descent gradient is that of the
  *unweighted* (masked) mean loss at ``w + ε``. Equal weights give SAM. The random
  direction comes from a PRNG key in the state, seeded by ``seed`` and split every
  step, so the transform is pure and runs are reproducible; see
  :func:`optax_sam.perturbations.reweighting.reweighted_ascent` for the exact key
  handling.

  Cost per step, beyond the caller's clean gradient: two forward passes without
  gradient (at ``w ± r``), one forward and one backward pass for the reweighted gradient
  and one forward and one backward pass at ``w + ε``. The clean gradient's values are
  not read (with ``perturb_every = 1``), so under ``jax.jit`` XLA drops the backward
  pass that made it: call it as every other method, nothing is computed for nothing.
  Its finiteness is that of what δ-SAM computes itself. Extra state: a PRNG key and a
  step count. With ``perturb_every > 1`` the key and the count for ``eta`` advance on
  perturbing steps only.

  Args:
    rho: radius ``ρ >= 0`` (constant or schedule). The paper uses 0.05 for base models,
      0.02 for large ones and 0.01 on STS-B.
    eta: ``η > 0``, the floor of the weights' denominator (the paper: 1e-4; 5e-4 on RTE).
    seed: seed of the random directions.
    perturb_every: perturb on every k-th step only (amortised steps, LookSAM);
      ``None`` or ``1`` is the method itself. A ``rho`` schedule still reads the step count.
    reuse_alpha: LookSAM's ``α >= 0`` for the steps between perturbing steps, or
      ``None`` for the clean gradient there. See :func:`optax_sam.sharpness_aware`.
    eps: ``δ > 0`` added to the norm of the reweighted gradient.
    axis_name: per-device perturbation ("m-sharpness") inside ``shard_map``/``pmap``; see
      :func:`optax_sam.sharpness_aware`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` needs ``params`` and a
    ``loss_fn`` returning per-example losses, and accepts ``example_mask``.

  References:
    Zhou et al., `Sharpness-Aware Minimization with Dynamic Reweighting
    <https://arxiv.org/abs/2112.08772>`_, Findings of EMNLP 2022.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_sam
    >>> params = {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}
    >>> x, y = jnp.arange(12.0).reshape(4, 3) / 10, jnp.array([0, 1, 1, 0])
    >>> def loss_fn(p):
    ...   logits = x @ p["kernel"] + p["bias"]
    ...   return optax.softmax_cross_entropy_with_integer_labels(logits, y)
    >>> tx = optax.chain(optax_sam.delta_sam(rho=0.05), optax.adamw(1e-3))
    >>> grads = jax.grad(lambda p: loss_fn(p).mean())(params)
    >>> updates, state = tx.update(grads, tx.init(params), params, loss_fn=loss_fn)
    >>> params = optax.apply_updates(params, updates)
  """
  perturb_every = amortisation_period(perturb_every, reuse_alpha)
  perturbation = reweighted_ascent(every_kth_step(rho, perturb_every),
                                   every_kth_step(eta, perturb_every), seed, eps=eps)
  # The reweighted pass makes its own gradient at w: the clean one's values are unread,
  # so the caller's clean backward pass compiles away.
  return sharpness_aware(perturbation, perturb_every=perturb_every,
                         reuse_alpha=reuse_alpha, reads_clean_gradient=False,
                         axis_name=axis_name, method="delta_sam")
