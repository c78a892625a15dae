"""DPS-Mix: DPS whose subnetwork is trained through Mixout rather than a gradient mask."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optax_sam.core import numerics
from optax_sam.core import placement
from optax_sam.core import selection as selection_lib
from optax_sam.subnetworks import scope as scope_lib
from optax_sam.subnetworks.dps import _check_dps_arguments  # pylint: disable=protected-access
from optax_sam.subnetworks.dps import _stage_length  # pylint: disable=protected-access
from optax_sam.subnetworks.dps import per_matrix_topk_mask
from optax_sam.subnetworks.mixout import MixoutState
from optax_sam.subnetworks.mixout import check_mixout_p
from optax_sam.subnetworks.mixout import input_neuron_masks
from optax_sam.subnetworks.mixout import input_neuron_shape
from optax_sam.subnetworks.mixout import random_mixout_state

# The authors damp the score of often-kept entries only when stages are this long.
_DAMPING_MIN_STAGE = 50


class DPSMixState(NamedTuple):
  """State of :func:`dps_mix` for the in-scope parameters (inside ``optax.MaskedState``)."""
  mixout: MixoutState  # the coming step's target and mask
  count: jax.Array  # steps taken
  pretrained: Any  # Stage I's target: the parameters given to init
  squared_gradient_sum: Any  # G = Σ (M ⊙ g)² over the cycle's Stage I, float32
  kept_steps: Any  # per input neuron: the cycle's Stage I steps at which it was kept, int32


def _kept_neurons(mask: jax.Array) -> jax.Array:
  """The per-input-neuron draw of a Stage I mask (constant along the output axis)."""
  return mask if mask.ndim <= 1 else mask[..., :1]


def selection_scores(squared_gradient_sum: jax.Array, kept_steps: jax.Array,
                     stage: int) -> jax.Array:
  """DPS-Mix's score: ``G / max(count, 1)``, times ``exp(−max(count, 1)/us)`` if us ≥ 50.

  ``G`` sums the squared gradients of the steps at which the entry was kept, so the
  score is their mean; the damping favours entries that were kept less often. (An entry
  never kept has ``G = 0``, so the ``max`` does not change any score.)
  """
  kept = jnp.maximum(kept_steps, 1).astype(jnp.float32)
  scores = squared_gradient_sum / kept
  if stage >= _DAMPING_MIN_STAGE:
    scores = scores * jnp.exp(-kept / stage)
  return scores


def _dps_mix_all_leaves(total_steps: int, update_ratio: float, exclude_ratio: float,
                        mixout_p: float, seed: int) -> optax.GradientTransformation:
  """DPS-Mix on every leaf it is given (``dps_mix`` restricts it to the scope)."""
  stage = _stage_length(total_steps, update_ratio)

  def init_fn(params: optax.Params) -> DPSMixState:
    return DPSMixState(
        mixout=random_mixout_state(params, mixout_p, seed),
        count=jnp.zeros((), jnp.int32),
        pretrained=jax.tree.map(jnp.copy, params),  # own buffers, as the target's
        squared_gradient_sum=jax.tree.map(
            lambda p: placement.zeros_like(p, jnp.float32), params),
        kept_steps=jax.tree.map(
            lambda p: placement.zeros_like(p, jnp.int32, input_neuron_shape(p.shape)),
            params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("dps_mix needs the current parameters (the target of Stage II): "
                       "call tx.update(grads, state, params).")
    mixing = state.mixout
    position = state.count % (2 * stage)
    in_stage_one = position < stage
    cycle_start = position == 0

    def accumulate(total, increment):
      return jnp.where(in_stage_one, jnp.where(cycle_start, 0, total) + increment, total)

    squared_gradient_sum = jax.tree.map(
        lambda total, g, m: accumulate(total, jnp.square(g.astype(jnp.float32)) * m),
        state.squared_gradient_sum, updates, mixing.mask)
    kept_steps = jax.tree.map(
        lambda total, m: accumulate(total, _kept_neurons(m).astype(jnp.int32)),
        state.kept_steps, mixing.mask)

    next_position = (state.count + 1) % (2 * stage)
    next_in_stage_one = next_position < stage
    key, mask_key = jax.random.split(mixing.key)
    random = input_neuron_masks(mask_key, updates, 1.0 - mixing.p)
    selected = jax.lax.cond(
        next_position == stage,
        lambda sums, kept_steps, _: jax.tree.map(
            lambda g, kept: per_matrix_topk_mask(
                selection_scores(g, kept, stage), exclude_ratio),
            sums, kept_steps),
        lambda _, __, mask: mask,
        squared_gradient_sum, kept_steps, mixing.mask)
    mask = jax.tree.map(lambda r, s: jnp.where(next_in_stage_one, r, s), random, selected)
    # Stage II mixes toward the weights it started from: this step's, when it is the
    # first of Stage II (target_is_params stood in for them in this step's forward).
    target = jax.tree.map(
        lambda pretrained, previous, current: jnp.where(
            next_in_stage_one, pretrained, jnp.where(position == stage, current, previous)),
        state.pretrained, mixing.target, params)
    mixing = mixing._replace(target=target, mask=mask,
                             target_is_params=next_position == stage, key=key)
    return updates, DPSMixState(mixout=mixing, count=optax.safe_increment(state.count),
                                pretrained=state.pretrained,
                                squared_gradient_sum=squared_gradient_sum,
                                kept_steps=kept_steps)

  return optax.GradientTransformation(init_fn, update_fn)


def dps_mix(
    total_steps: int,
    update_ratio: float = 0.05,
    exclude_ratio: float = 0.3,
    *,
    mixout_p: Optional[float] = None,
    seed: int = 0,
    scope: Optional[selection_lib.Selection] = None,
) -> optax.GradientTransformationExtraArgs:
  """DPS-Mix: DPS's adaptive subnetwork, trained through Mixout (the optimizer half).

  The loss must see the mixed weights: apply :func:`optax_sam.mixout_params` to the
  parameters inside it, with this optimizer's state. Evaluate with the parameters
  themselves. Steps run in the cycles of :func:`optax_sam.dps` (two stages of
  ``us = int(update_ratio · total_steps)`` steps, Stage I first); as in the authors'
  code (``DPSMix``):

  * Stage I: Mixout toward the pre-trained weights (the parameters given to ``init``)
    with a fresh random mask per input neuron, ``Bernoulli(1 − mixout_p)``, each step,
    as :func:`optax_sam.mixout`. Per entry, ``G += (M ⊙ g)²`` and, per input neuron,
    ``count += M`` (the steps at which it was kept) accumulate, both restarting at the
    cycle's first step;
  * first step of Stage II: in each in-scope matrix, the ``ceil((1 − exclude_ratio)·n)``
    entries with the largest :func:`selection_scores` ``G / max(count, 1)`` (times
    ``exp(−max(count, 1)/us)`` when ``us ≥ 50``) are selected, ties kept;
  * Stage II: Mixout with that fixed entry-wise mask toward the weights at the start of
    Stage II, still with ``mixout_p`` in the rescaling.

  The gradient the loss gives is ``M ⊙ ∂L/∂W_eff`` (masked by :func:`mixout_params`); it
  passes through unchanged. Place it before clipping and the base optimizer, as
  :func:`optax_sam.dps`; its masked-out entries are not frozen either (momentum and
  weight decay still move them). ``mixout_p = 0`` (with ``exclude_ratio`` left to
  follow it) is the base optimizer.

  Cost: no extra pass; the loss's forward pass mixes each in-scope weight once, and one
  top-k threshold per matrix per cycle. Extra state: two copies of the in-scope weights
  (pre-trained and Stage II's target), one float32 and one bool per in-scope parameter,
  one int32 per input neuron, a PRNG key and a step count.

  Args:
    total_steps: the run's number of optimizer steps (fixes the stage length).
    update_ratio: stage length as a fraction of ``total_steps``, in ``(0, 1]``.
    exclude_ratio: fraction in ``[0, 1)`` of each matrix mixed back in Stage II.
    mixout_p: mixout probability in ``[0, 1)``. Default: ``exclude_ratio``, as in the
      authors' code, where one ``p`` sets both.
    seed: seed of Stage I's masks; they are drawn as in :func:`optax_sam.mixout`, one
      key split per step.
    scope: the mixed parameters, as in :func:`optax_sam.dps` (each selected leaf is one
      matrix for the top-k).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (extra arguments are ignored); its state
    is an ``optax.MaskedState`` around a :class:`DPSMixState`.

  References:
    Zhang et al., `Fine-Tuning Pre-Trained Language Models Effectively by Optimizing
    Subnetworks Adaptively <https://arxiv.org/abs/2211.01642>`_, NeurIPS 2022; code at
    https://github.com/ZhangHaojie077/DPS.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_sam
    >>> params = {"encoder": {"kernel": jnp.arange(1.0, 7.0).reshape(3, 2)},
    ...           "head": jnp.zeros(2)}
    >>> tx = optax.chain(optax_sam.dps_mix(total_steps=4, update_ratio=0.5), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> loss = lambda p: jnp.sum(p["encoder"]["kernel"] ** 2) + jnp.sum(p["head"])
    >>> for _ in range(2):  # Stage I
    ...   grads = jax.grad(lambda p: loss(optax_sam.mixout_params(p, state)))(params)
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> dps_state = state[0].inner_state
    >>> dps_state.kept_steps["encoder"]["kernel"]  # Stage I steps each row was kept
    Array([[2],
           [1],
           [2]], dtype=int32)
    >>> dps_state.mixout.mask["encoder"]["kernel"]  # Stage II: ceil(0.7 * 6) = 5 kept
    Array([[False,  True],
           [ True,  True],
           [ True,  True]], dtype=bool)
  """
  if mixout_p is None:
    mixout_p = exclude_ratio
  _check_dps_arguments(total_steps, update_ratio, exclude_ratio)
  check_mixout_p("mixout_p", mixout_p)
  numerics.check_seed(seed)
  return optax.masked(
      _dps_mix_all_leaves(total_steps, update_ratio, exclude_ratio, mixout_p, seed),
      scope_lib.resolve_scope(scope, "dps_mix"))
