"""FSAM's Fisher mask: keep the perturbation only on the most informative parameters."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optax_sam.core import loss as loss_lib
from optax_sam.core import numerics
from optax_sam.core import placement
from optax_sam.core import selection as selection_lib
from optax_sam.fisher import estimators
from optax_sam.fisher import per_example
from optax_sam.fisher import topk

FisherEstimator = Literal["per_example", "squared_gradient"]


class FisherMaskState(NamedTuple):
  count: jax.Array  # steps taken; the mask is refreshed when count % mask_every == 0
  mask: Any  # pytree of bool arrays shaped like the parameters


def fisher_mask(
    keep_ratio: float = 0.1,
    mask_every: int = 100,
    *,
    fisher: FisherEstimator = "per_example",
    fisher_samples: int = 32,
    fisher_chunk_size: Optional[int] = 8,
    pool: Optional[selection_lib.Selection] = None,
) -> optax.GradientTransformationExtraArgs:
  """Multiplies the incoming perturbation by a global top-k Fisher-information mask.

  On the first step and every ``mask_every`` steps after it (inside ``lax.cond``, so
  other steps pay nothing), a diagonal Fisher estimate ``F`` is computed at the current
  parameters and the ``keep_ratio`` fraction of pooled entries with the largest ``F``
  is kept, globally across the pytree. Entries outside the pool (by default biases and
  embeddings) are always kept, as in the authors' code. Placed after
  :func:`scale_to_radius`, it gives FSAM's ``ρ (g ⊙ m) / ‖g‖``: the norm is of the full
  gradient and the masked result is not renormalised.

  Args:
    keep_ratio: fraction in ``(0, 1]`` of the pool to perturb (``1`` perturbs all).
    mask_every: refresh period in steps, ``>= 1``.
    fisher: ``"per_example"`` — ``F = Σ_i (∇l_i)²`` over the first ``fisher_samples``
      examples of the batch, per-example gradients by ``jax.vmap`` in chunks of
      ``fisher_chunk_size`` (needs per-example losses from ``loss_fn``; fast with
      :class:`optax_sam.PerExampleLoss`); or ``"squared_gradient"`` — ``F = g²`` from the
      incoming update (the authors' code; any positive rescaling of ``g`` selects the same
      entries, so it may follow :func:`scale_to_radius`).
    fisher_samples: examples used by the per-example estimator, ``>= 1``.
    fisher_chunk_size: examples per ``vmap`` chunk, ``>= 1``; ``None`` for all at once.
    pool: which parameters compete for the top-k: a predicate ``(path, leaf) -> bool`` on
      ``"a/b/kernel"``-style paths or a pytree of bools. Default: everything but biases
      and embeddings.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` that needs ``params`` (and ``loss_fn``
    for the per-example estimator).

  References:
    Zhong et al., `Improving Sharpness-Aware Minimization with Fisher Mask for Better
    Generalization on Language Models <https://arxiv.org/abs/2210.05497>`_, 2022.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from optax_sam import perturbations
    >>> piece = perturbations.fisher_mask(0.5, fisher="squared_gradient")
    >>> params = {"kernel": jnp.zeros(4)}
    >>> g = {"kernel": jnp.array([1.0, -3.0, 0.5, 2.0])}
    >>> piece.update(g, piece.init(params), params)[0]["kernel"]
    Array([ 0., -3.,  0.,  2.], dtype=float32)
  """
  numerics.check_static_number("keep_ratio", keep_ratio, "how many entries the mask keeps")
  numerics.check_range("keep_ratio", keep_ratio, low=0.0, high=1.0, low_inclusive=False)
  numerics.check_positive_int("mask_every", mask_every)
  numerics.check_positive_int("fisher_samples", fisher_samples)
  if fisher_chunk_size is not None:
    numerics.check_positive_int("fisher_chunk_size", fisher_chunk_size)
  if fisher not in ("per_example", "squared_gradient"):
    raise ValueError(
        f"fisher must be 'per_example' or 'squared_gradient', got {fisher!r}.")
  pool = selection_lib.exclude_biases_and_embeddings if pool is None else pool

  def init_fn(params: optax.Params) -> FisherMaskState:
    selection_lib.select(params, pool, argument="pool")  # fail early on a bad pool
    return FisherMaskState(
        count=jnp.zeros((), jnp.int32),
        mask=jax.tree.map(lambda p: placement.ones_like(p, bool), params))

  def update_fn(updates, state, params=None, *, loss_fn=None, example_mask=None,
                **extra_args):
    del extra_args
    params = loss_lib.require_params(params, "fisher_mask")
    if fisher == "per_example":
      piece = "fisher_mask with fisher='per_example'"
      loss_fn = loss_lib.require_loss_fn(loss_fn, piece)
      per_example.batch_size_of(loss_fn, params, piece)

    def refreshed_mask(updates, params, _):
      if fisher == "per_example":
        scores = estimators.empirical_fisher(
            loss_fn, params, num_examples=fisher_samples, chunk_size=fisher_chunk_size,
            example_mask=example_mask)
      else:
        scores = estimators.squared_gradient_fisher(updates)
      in_pool = selection_lib.select(params, pool, argument="pool")
      mask = topk.global_topk_mask(scores, in_pool, keep_ratio)
      return numerics.match_varying(mask, updates)

    kept_mask = numerics.match_varying(state.mask, updates)
    mask = jax.lax.cond(state.count % mask_every == 0, refreshed_mask,
                        lambda _, __, kept: kept, updates, params, kept_mask)
    masked = jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), updates, mask)
    return masked, FisherMaskState(count=optax.safe_increment(state.count), mask=mask)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
