"""The sharpness-aware mechanism: the one place that evaluates the gradient at ``w + ε``."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import optax

from optax_sam.core import loss as loss_lib
from optax_sam.core import numerics


class SharpnessAwareState(NamedTuple):
  """State of :func:`sharpness_aware`: the perturbation's own state."""
  perturbation_state: optax.OptState


def sharpness_aware(
    perturbation: optax.GradientTransformation,
    *,
    axis_name: Optional[str] = None,
    method: str = "sharpness_aware",
) -> optax.GradientTransformationExtraArgs:
  """Replaces the clean gradient by the gradient at the perturbed point ``w + ε``.

  Each step: ``ε = perturbation(g)`` from the clean gradient ``g`` (the incoming
  updates), then the gradient of the batch-mean loss at ``w + ε`` is evaluated through
  the ``loss_fn`` extra argument and handed to the rest of the chain. ``w`` itself never
  moves to ``w + ε``. Every sharpness-aware method of this library is this transform
  around a different perturbation; compose your own from the pieces in
  ``optax_sam.perturbations``.

  A perturbation is any optax transformation mapping the clean gradient to ``ε``. It may
  be stateful and may read ``params``, ``loss_fn`` and the other extra arguments.
  A non-finite ``ε`` is replaced by zero, so the descent gradient falls back to the plain
  gradient at ``w``; a non-finite clean gradient passes through as non-finite, for
  ``optax.apply_if_finite`` to reject the step.

  Args:
    perturbation: maps the clean gradient to the ascent perturbation ``ε``.
    axis_name: for a per-device perturbation ("m-sharpness") inside ``shard_map`` or
      ``pmap``: the incoming gradient must be the device-local one, ``ε`` is built from
      it, and the gradient at ``w + ε`` is averaged over ``axis_name``. Under
      ``shard_map`` (which tracks device variance) take the local clean gradient with
      respect to ``jax.lax.pcast(params, axis_name, to="varying")``: the gradient with
      respect to replicated parameters is already summed over devices. The perturbation
      gets ``params`` marked device-varying the same way, so the gradients it takes
      itself (a per-example Fisher, δ-SAM's reweighted pass) are local too. The
      perturbation's state (a Fisher mask, a strength average) is then per device too;
      give it ``out_specs`` that keep it per device. Leave ``None`` for the usual global
      perturbation (also under ``jax.jit`` with a sharded batch, where the gradients are
      already global).
    method: the name used in error messages, and added as a note to errors the
      perturbation raises (which name the piece that raised).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` needs ``params`` and the
    ``loss_fn`` extra argument, and accepts ``example_mask``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_sam
    >>> from optax_sam import perturbations
    >>> tx = optax.chain(
    ...     optax_sam.sharpness_aware(perturbations.scale_to_radius(0.05)),
    ...     optax.sgd(0.1))
    >>> params = jnp.array([1.0, -2.0])
    >>> loss_fn = lambda p: jnp.sum(p ** 2, keepdims=True)
    >>> grads = jax.grad(lambda p: loss_fn(p).mean())(params)
    >>> updates, _ = tx.update(grads, tx.init(params), params, loss_fn=loss_fn)
  """
  perturbation = optax.with_extra_args_support(perturbation)

  def init_fn(params: optax.Params) -> SharpnessAwareState:
    return SharpnessAwareState(perturbation_state=perturbation.init(params))

  def update_fn(
      updates: optax.Updates,
      state: SharpnessAwareState,
      params: Optional[optax.Params] = None,
      *,
      loss_fn: Optional[loss_lib.LossFn] = None,
      example_mask: Optional[jax.Array] = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, SharpnessAwareState]:
    loss_fn = loss_lib.require_loss_fn(loss_fn, method)
    params = loss_lib.require_params(params, method)
    if axis_name is not None:
      # Gradients of this device's loss with respect to replicated parameters would be
      # summed over the devices (shard_map's variance tracking): the perturbation's
      # own gradients (a per-example Fisher, δ-SAM's reweighted pass, GA-SAM's extra
      # ascent steps) and the descent gradient must stay local.
      params = numerics.device_varying(params, axis_name)
    try:
      epsilon, perturbation_state = perturbation.update(
          updates, state.perturbation_state, params,
          loss_fn=loss_fn, example_mask=example_mask, **extra_args)
    except (TypeError, ValueError) as error:
      # The perturbation's pieces name themselves; say which method they served.
      error.add_note(f"(raised while {method} computed its perturbation ε)")
      raise
    epsilon = numerics.zero_if_not_finite(epsilon)
    perturbed = jax.tree.map(lambda w, e: w + e.astype(w.dtype), params, epsilon)
    descent = loss_lib.mean_loss_gradient(loss_fn, perturbed, example_mask)
    descent = finish_descent(descent, updates, axis_name=axis_name)
    return descent, SharpnessAwareState(perturbation_state=perturbation_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def finish_descent(descent: Any, clean: Any, *, axis_name: Optional[str] = None) -> Any:
  """The end of every sharpness-aware update: guard, average over devices, cast.

  Shared by :func:`sharpness_aware` and :func:`optax_sam.per_instance_sam`, the two
  places that compute a descent gradient at perturbed points.

  Args:
    descent: the (masked) batch-mean gradient at the perturbed point(s), on this device.
    clean: the incoming clean gradient. Its values are not used, except that a
      non-finite one makes the result NaN: the descent gradient does not read it, so
      a non-finite clean gradient (a loss-scaling overflow, say) would otherwise vanish
      here instead of reaching a later finiteness guard such as
      ``optax.apply_if_finite``. The guard runs before the average, so that every
      device sees it.
    axis_name: the ``shard_map``/``pmap`` axis to average over, for per-device
      perturbations; ``None`` for none.

  Returns:
    ``descent``, averaged over ``axis_name``, in the dtypes of ``clean``.
  """
  descent = numerics.nan_unless_finite(descent, clean)
  if axis_name is not None:
    descent = jax.lax.pmean(descent, axis_name)
  return numerics.tree_cast_like(descent, clean)
