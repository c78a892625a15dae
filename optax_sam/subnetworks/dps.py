"""DPS: dynamic parameter selection, the subnetwork with the largest accumulated gradients."""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optax_sam.core import numerics
from optax_sam.core import placement
from optax_sam.core import selection as selection_lib
from optax_sam.fisher import topk
from optax_sam.subnetworks import scope as scope_lib


class DPSState(NamedTuple):
  """State of :func:`dps` for the in-scope parameters (inside ``optax.MaskedState``)."""
  count: jax.Array  # steps taken
  squared_gradient_sum: Any  # G = Σ g² over the current cycle's Stage I, float32
  mask: Any  # bool mask applied at the latest step: all True in Stage I, top-k in Stage II


def _stage_length(total_steps: int, update_ratio: float) -> int:
  return int(update_ratio * total_steps)


def per_matrix_topk_mask(scores: jax.Array, exclude_ratio: float) -> jax.Array:
  """Keeps the ``ceil((1 − exclude_ratio) · n)`` largest of ``scores`` (ties kept).

  A threshold from :func:`optax_sam.fisher.kth_largest` (no sort), as the DPS code's
  ``scores >= sorted(scores)[k − 1]``.
  """
  keep = math.ceil(scores.size * (1.0 - exclude_ratio))
  threshold = topk.kth_largest([scores], keep)
  return scores.astype(jnp.float32) >= threshold


def _dps_all_leaves(total_steps: int, update_ratio: float,
                    exclude_ratio: float) -> optax.GradientTransformation:
  """DPS on every leaf it is given (``dps`` restricts it to the scope)."""
  stage = _stage_length(total_steps, update_ratio)

  def init_fn(params: optax.Params) -> DPSState:
    return DPSState(
        count=jnp.zeros((), jnp.int32),
        squared_gradient_sum=jax.tree.map(
            lambda p: placement.zeros_like(p, jnp.float32), params),
        mask=jax.tree.map(lambda p: placement.ones_like(p, bool), params))

  def update_fn(updates, state, params=None):
    del params
    position = state.count % (2 * stage)
    in_stage_one = position < stage
    cycle_start = position == 0
    selection_step = position == stage

    squares = jax.tree.map(lambda g: jnp.square(g.astype(jnp.float32)), updates)
    accumulated = jax.tree.map(
        lambda total, sq: jnp.where(in_stage_one,
                                    jnp.where(cycle_start, 0.0, total) + sq, total),
        state.squared_gradient_sum, squares)
    selected = jax.lax.cond(
        selection_step,
        lambda sums, _: jax.tree.map(lambda g: per_matrix_topk_mask(g, exclude_ratio),
                                     sums),
        lambda _, mask: mask,
        state.squared_gradient_sum, state.mask)
    mask = jax.tree.map(lambda m: jnp.logical_or(m, in_stage_one), selected)
    # A product, as in the authors' code: a NaN stays visible to a finiteness guard.
    masked = jax.tree.map(lambda g, m: g * m.astype(g.dtype), updates, mask)
    return masked, DPSState(count=optax.safe_increment(state.count),
                            squared_gradient_sum=accumulated, mask=mask)

  return optax.GradientTransformation(init_fn, update_fn)


def _check_dps_arguments(total_steps, update_ratio, exclude_ratio) -> None:
  numerics.check_positive_int("total_steps", total_steps)
  numerics.check_static_number("update_ratio", update_ratio, "the stage length")
  numerics.check_static_number("exclude_ratio", exclude_ratio,
                               "how many entries of each matrix are kept")
  numerics.check_range("update_ratio", update_ratio, low=0.0, high=1.0,
                       low_inclusive=False)
  numerics.check_range("exclude_ratio", exclude_ratio, low=0.0, high=1.0,
                       high_inclusive=False)
  if _stage_length(total_steps, update_ratio) < 1:
    raise ValueError(
        f"update_ratio * total_steps must be at least 1 (the stage length "
        f"int(update_ratio * total_steps)), got update_ratio={update_ratio!r}, "
        f"total_steps={total_steps!r}.")


def dps(
    total_steps: int,
    update_ratio: float = 0.05,
    exclude_ratio: float = 0.3,
    *,
    scope: Optional[selection_lib.Selection] = None,
) -> optax.GradientTransformationExtraArgs:
  """DPS-Dense: train the subnetwork of each matrix whose gradients were largest.

  Steps run in cycles of two stages of ``us = int(update_ratio · total_steps)`` steps,
  Stage I first (the authors' code, ``DPSDense``):

  * Stage I: the gradient passes through and ``G += g²`` accumulates per entry
    (``G`` restarts at the first step of each cycle);
  * first step of Stage II: in each in-scope matrix separately, the
    ``ceil((1 − exclude_ratio) · n)`` entries with the largest ``G`` are selected
    (ties at the threshold kept). The mask is computed *before* that step's gradient is
    used and applies to it already, as in the code (it is built in the forward pass,
    ``G`` holds Stage I only);
  * Stage II: the gradient is multiplied by that mask.

  Place it before clipping and the base optimizer, as the authors do:
  ``optax.chain(dps(...), optax.clip_by_global_norm(1.0), optax.adamw(...))``. Masked
  entries are then *not frozen*: momentum and decoupled weight decay still move them
  (the paper's behaviour). :func:`dps_frozen` keeps them still instead.

  Only the ``scope`` parameters are masked; others pass through. The count keeps
  cycling past ``total_steps``. ``exclude_ratio = 0`` is the base optimizer.

  Cost: no extra pass; one top-k threshold per matrix per cycle (a bisection of 32
  counting passes over ``G``, inside ``lax.cond``). Extra state: one float32 and one
  bool per in-scope parameter.

  Args:
    total_steps: the run's number of optimizer steps (fixes the stage length).
    update_ratio: stage length as a fraction of ``total_steps``, in ``(0, 1]``; the
      paper's 0.05 gives about 10 cycles per run.
    exclude_ratio: the paper's ``p``, fraction in ``[0, 1)`` of each matrix whose
      gradient is dropped in Stage II.
    scope: the masked parameters: a predicate ``(path, leaf) -> bool`` on
      ``"a/b/kernel"``-style paths or a pytree of bools. Default
      :func:`optax_sam.subnetworks.all_matrices`: every parameter with at least two
      axes, embedding tables and the head included; vectors (biases, LayerNorms)
      update densely. The paper's setting is
      ``scope=optax_sam.subnetworks.encoder_dense_kernels`` (the encoder's and pooler's
      dense kernels only). Each selected leaf is one "matrix" for the top-k.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (extra arguments are ignored); its state
    is an ``optax.MaskedState`` around a :class:`DPSState`.

  References:
    Zhang et al., `Fine-Tuning Pre-Trained Language Models Effectively by Optimizing
    Subnetworks Adaptively <https://arxiv.org/abs/2211.01642>`_, NeurIPS 2022; code at
    https://github.com/ZhangHaojie077/DPS.

  Example:
    >>> import jax.numpy as jnp, optax, optax_sam
    >>> params = {"encoder": {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}}
    >>> tx = optax_sam.dps(total_steps=4, update_ratio=0.5, exclude_ratio=0.5)
    >>> # the bias is a vector, outside the default scope: it passes through
    >>> state = tx.init(params)
    >>> steps = [[[1.0, 2.0], [3.0, 4.0]], [[4.0, 0.0], [0.0, 3.0]], [[1.0, 1.0], [1.0, 1.0]]]
    >>> for g in steps:
    ...   grads = {"encoder": {"dense": {"kernel": jnp.array(g), "bias": jnp.ones(2)}}}
    ...   updates, state = tx.update(grads, state)
    >>> updates["encoder"]["dense"]["kernel"]  # G = [[17, 4], [9, 25]]: keep 2 largest
    Array([[1., 0.],
           [0., 1.]], dtype=float32)
  """
  return _scoped_dps(total_steps, update_ratio, exclude_ratio, scope, "dps")


def _scoped_dps(total_steps, update_ratio, exclude_ratio, scope, method
                ) -> optax.GradientTransformationExtraArgs:
  """:func:`dps`, with ``method`` naming it in the empty-scope error."""
  _check_dps_arguments(total_steps, update_ratio, exclude_ratio)
  return optax.masked(_dps_all_leaves(total_steps, update_ratio, exclude_ratio),
                      scope_lib.resolve_scope(scope, method))


class DPSFrozenState(NamedTuple):
  dps: optax.OptState  # the state of :func:`dps`
  base: optax.OptState  # the base optimizer's state


def _applied_mask(dps_state: optax.OptState) -> Any:
  """The mask :func:`dps` applied at its latest step (``MaskedNode`` out of scope)."""
  return dps_state.inner_state.mask


def dps_frozen(
    base_optimizer: optax.GradientTransformation,
    total_steps: int,
    update_ratio: float = 0.05,
    exclude_ratio: float = 0.3,
    *,
    scope: Optional[selection_lib.Selection] = None,
) -> optax.GradientTransformationExtraArgs:
  """DPS that also freezes the unselected entries: ``base_optimizer``'s update is masked.

  **An addition, not the paper.** :func:`dps` masks only the gradient, so in Stage II the
  base optimizer's momentum and weight decay still move the unselected entries. This
  wrapper runs ``optax.chain(dps(...), base_optimizer)`` and multiplies the final update
  by the same mask, so the unselected entries do not move at all in Stage II (the base
  optimizer's internal state still evolves, seeing zero gradients there). In Stage I
  everything updates.

  Args:
    base_optimizer: the rest of the chain, e.g.
      ``optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(2e-5))``.
    total_steps, update_ratio, exclude_ratio, scope: as in :func:`dps`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (extra arguments reach
    ``base_optimizer``) whose state is a :class:`DPSFrozenState`.

  Example:
    >>> import jax.numpy as jnp, optax, optax_sam
    >>> params = {"encoder": {"kernel": jnp.ones((2, 2))}}
    >>> tx = optax_sam.dps_frozen(optax.adamw(0.1), total_steps=2, update_ratio=0.5,
    ...                           exclude_ratio=0.5)
    >>> state = tx.init(params)
    >>> for g in ([[1.0, 2.0], [3.0, 4.0]], [[1.0, 1.0], [1.0, 1.0]]):
    ...   updates, state = tx.update({"encoder": {"kernel": jnp.array(g)}}, state, params)
    >>> updates["encoder"]["kernel"] != 0  # weight decay is masked too
    Array([[False, False],
           [ True,  True]], dtype=bool)
  """
  selector = _scoped_dps(total_steps, update_ratio, exclude_ratio, scope, "dps_frozen")
  base_optimizer = optax.with_extra_args_support(base_optimizer)

  def init_fn(params: optax.Params) -> DPSFrozenState:
    return DPSFrozenState(dps=selector.init(params), base=base_optimizer.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    masked, dps_state = selector.update(updates, state.dps, params)
    final, base_state = base_optimizer.update(masked, state.base, params, **extra_args)
    frozen = jax.tree.map(
        lambda u, m: u if isinstance(m, optax.MaskedNode) else u * m.astype(u.dtype),
        final, _applied_mask(dps_state))
    return frozen, DPSFrozenState(dps=dps_state, base=base_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
