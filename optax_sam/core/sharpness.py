"""The sharpness-aware mechanism: the one place that evaluates the gradient at ``w + ε``."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optax_sam.core import loss as loss_lib
from optax_sam.core import numerics
from optax_sam.core import placement


class SharpnessAwareState(NamedTuple):
  """State of :func:`sharpness_aware`.

  Attributes:
    perturbation_state: the perturbation's own state. It advances on perturbing steps
      only (every step unless ``perturb_every > 1``).
    count: steps taken (int32); step ``count`` perturbs when
      ``count % perturb_every == 0``, so the first step does.
    orthogonal: LookSAM's ``g_v`` from the last perturbing step, float32, shaped like
      the parameters: the part of the perturbed gradient orthogonal to that step's
      clean gradient. ``()`` unless ``reuse_alpha`` is set and ``perturb_every > 1``.
  """
  perturbation_state: optax.OptState
  count: jax.Array
  orthogonal: Any


def sharpness_aware(
    perturbation: optax.GradientTransformation,
    *,
    perturb_every: Optional[int] = None,
    reuse_alpha: Optional[float] = None,
    reads_clean_gradient: bool = True,
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
  ``optax.apply_if_finite`` to reject the step (unless ``reads_clean_gradient=False``).

  Amortised steps (LookSAM): with ``perturb_every = k > 1`` only every k-th step (the
  first included) runs the perturbation and the second gradient pass; the steps between
  cost what the base optimizer costs. On those steps the output is the clean gradient
  ``g`` itself (``reuse_alpha=None``), or, with ``reuse_alpha = α``,
  ``g + α (‖g‖ / ‖g_v‖) g_v`` where ``g_v`` is the component of the last perturbed
  gradient ``g_s`` orthogonal to that step's clean gradient ``g₀``,
  ``g_v = g_s − (⟨g_s, g₀⟩ / ‖g₀‖²) g₀`` (global inner products and norms, float32). The
  choice runs inside ``lax.cond``, so under ``jax.jit`` the steps between do not
  evaluate the loss again. Plain gradients between perturbing steps lose most of what
  SAM gains; reusing ``g_v`` (``α ≈ 0.7``) is reported to keep most of it (Liu et
  al.). A zero ``g`` or ``g_v`` gives the plain gradient, never NaN. The perturbation's
  state only advances on perturbing steps: its step count (ρ schedules, FSAM's refresh
  period, GA-SAM's average) counts those steps. The methods' constructors rescale their
  schedules so that a schedule still reads the step count.

  Args:
    perturbation: maps the clean gradient to the ascent perturbation ``ε``.
    perturb_every: ``k >= 1``: perturb on every k-th step. ``None`` (the default) or
      ``1`` is the method itself, unchanged. It fixes the program's structure: under
      ``optax.inject_hyperparams`` list it in ``static_args``.
    reuse_alpha: ``α >= 0``, or ``None``: what the steps between perturbing steps
      return, LookSAM's ``g + α (‖g‖ / ‖g_v‖) g_v``, or (``None``) the clean gradient.
      Costs one float32 per parameter of state when ``perturb_every > 1``. The reused
      part has norm ``α ‖g‖`` whatever ρ is, while SAM's own is ``‖g_v‖``, often a few
      percent of ``‖g‖`` at fine-tuning radii: take α of that size (the paper's 0.7 kept
      a MiniLM fine-tuning at ρ = 0.01 from learning at all).
    reads_clean_gradient: whether the perturbation reads the *values* of the incoming
      gradient. ``False`` (δ-SAM's reweighted pass, which builds its own) lets the
      mechanism not read them either, so under ``jax.jit`` XLA drops the caller's clean
      backward pass; finiteness is then that of what the method computes. Steps that
      reuse the clean gradient (``perturb_every > 1``) read it whatever this says.
    axis_name: for a per-device perturbation ("m-sharpness") inside ``shard_map`` or
      ``pmap``: the incoming gradient must be the device-local one, ``ε`` is built from
      it, and the gradient at ``w + ε`` is averaged over ``axis_name``. Under
      ``shard_map`` (which tracks device variance) take the local clean gradient with
      respect to ``jax.lax.pcast(params, axis_name, to="varying")``: the gradient with
      respect to replicated parameters is already summed over devices. The perturbation
      gets ``params`` marked device-varying the same way, so the gradients it takes
      itself (a per-example Fisher, δ-SAM's reweighted pass) are local too. The
      perturbation's state (a Fisher mask, a strength average) is then per device too;
      give it ``out_specs`` that keep it per device (LookSAM's ``g_v`` as well: each
      device reuses its own, and the steps between average the devices' results).
      Leave ``None`` for the usual global perturbation (also under ``jax.jit`` with a
      sharded batch, where the gradients are already global).
    method: the name used in error messages, and added as a note to errors the
      perturbation raises (which name the piece that raised).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` needs ``params`` and the
    ``loss_fn`` extra argument, and accepts ``example_mask``.

  References:
    Liu et al., `Towards Efficient and Scalable Sharpness-Aware Minimization
    <https://arxiv.org/abs/2203.02714>`_, CVPR 2022 (LookSAM, the amortised steps).

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_sam
    >>> from optax_sam import perturbations
    >>> tx = optax.chain(
    ...     optax_sam.sharpness_aware(perturbations.scale_to_radius(0.05),
    ...                               perturb_every=5, reuse_alpha=0.05),
    ...     optax.sgd(0.1))
    >>> params = jnp.array([1.0, -2.0])
    >>> loss_fn = lambda p: jnp.sum(p ** 2, keepdims=True)
    >>> state = tx.init(params)
    >>> for _ in range(3):  # one perturbing step, then two that reuse g_v
    ...   grads = jax.grad(lambda p: loss_fn(p).mean())(params)
    ...   updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    ...   params = optax.apply_updates(params, updates)
  """
  perturb_every = amortisation_period(perturb_every, reuse_alpha)
  perturbation = optax.with_extra_args_support(perturbation)
  keeps_orthogonal = reuse_alpha is not None and perturb_every > 1

  def init_fn(params: optax.Params) -> SharpnessAwareState:
    return SharpnessAwareState(
        perturbation_state=perturbation.init(params),
        count=jnp.zeros((), jnp.int32),
        orthogonal=init_orthogonal(params, keeps_orthogonal))

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

    def perturbed_step(clean, perturbation_state, params):
      try:
        epsilon, perturbation_state = perturbation.update(
            clean, perturbation_state, params,
            loss_fn=loss_fn, example_mask=example_mask, **extra_args)
      except (TypeError, ValueError) as error:
        # The perturbation's pieces name themselves; say which method they served.
        error.add_note(f"(raised while {method} computed its perturbation ε)")
        raise
      epsilon = numerics.zero_if_not_finite(epsilon)
      perturbed = jax.tree.map(lambda w, e: w + e.astype(w.dtype), params, epsilon)
      descent = loss_lib.mean_loss_gradient(loss_fn, perturbed, example_mask)
      if reads_clean_gradient:
        descent = guard_clean(descent, clean)
      return descent, perturbation_state

    descent, perturbation_state, orthogonal = amortised(
        perturbed_step, updates, state.perturbation_state, params, state.count,
        state.orthogonal, perturb_every=perturb_every, reuse_alpha=reuse_alpha)
    descent = finish_descent(descent, updates, axis_name=axis_name)
    return descent, SharpnessAwareState(perturbation_state=perturbation_state,
                                        count=optax.safe_increment(state.count),
                                        orthogonal=orthogonal)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------- amortisation -----------------------------------


def amortisation_period(perturb_every: Optional[int], reuse_alpha: Any) -> int:
  """The period ``k`` that ``perturb_every`` asks for (``None``: 1), checked.

  ``None`` rather than ``1`` is the default so that ``optax.inject_hyperparams``, which
  turns numeric defaults into arrays, leaves it static without ``static_args``.

  Raises:
    ValueError: for a ``perturb_every`` or ``reuse_alpha`` out of range.
  """
  if perturb_every is not None:
    numerics.check_positive_int("perturb_every", perturb_every)
  if reuse_alpha is not None:
    numerics.check_range("reuse_alpha", reuse_alpha, low=0.0)
  return 1 if perturb_every is None else perturb_every


def init_orthogonal(params: Any, keep: bool) -> Any:
  """LookSAM's stored ``g_v``: float32 zeros shaped like ``params``, or ``()``."""
  if not keep:
    return ()
  return jax.tree.map(lambda p: placement.zeros_like(p, jnp.float32), params)


def every_kth_step(value: Any, perturb_every: int) -> Any:
  """A schedule of the perturbing steps that reads the step count.

  The perturbation's own count advances once per perturbing step, and perturbing step
  ``j`` is step ``j · perturb_every``; constants (and the arrays
  ``optax.inject_hyperparams`` passes, already evaluated at the step) are returned as
  they are.
  """
  if not callable(value) or perturb_every == 1:
    return value
  return lambda count: value(count * perturb_every)


def orthogonal_component(perturbed: Any, clean: Any) -> Any:
  """``g_s − (⟨g_s, g⟩ / ‖g‖²) g`` in float32; zero where it would not be finite.

  A zero ``g`` leaves ``g_s`` whole. Inner product and norm are over the whole pytree.
  """
  perturbed = jax.tree.map(lambda x: x.astype(jnp.float32), perturbed)
  clean = jax.tree.map(lambda x: x.astype(jnp.float32), clean)
  # An elementwise product and a sum rather than vdot: a contraction over an axis that
  # is sharded on explicit mesh axes needs its output sharding spelled out.
  inner = sum(jnp.sum(s * g) for s, g in zip(jax.tree.leaves(perturbed),
                                              jax.tree.leaves(clean)))
  squared = jnp.square(numerics.global_norm(clean))
  coefficient = jnp.where(squared > 0, inner / jnp.where(squared > 0, squared, 1.0), 0.0)
  orthogonal = jax.tree.map(lambda s, g: s - coefficient * g, perturbed, clean)
  return numerics.zero_if_not_finite(orthogonal)


def reuse_orthogonal(clean: Any, orthogonal: Any, alpha: Any) -> Any:
  """LookSAM's step between perturbing steps: ``g + α (‖g‖ / ‖g_v‖) g_v``.

  In the dtypes of ``clean``; a zero ``g_v`` gives ``g``.
  """
  norm_v = numerics.global_norm(orthogonal)
  factor = jnp.where(
      norm_v > 0,
      jnp.asarray(alpha, jnp.float32) * numerics.global_norm(clean)
      / jnp.where(norm_v > 0, norm_v, 1.0),
      0.0)
  return jax.tree.map(lambda g, v: (g.astype(jnp.float32) + factor * v).astype(g.dtype),
                      clean, orthogonal)


def amortised(
    perturbed_step: Callable[[Any, Any, Any], tuple[Any, Any]],
    clean: Any,
    inner_state: Any,
    params: Any,
    count: jax.Array,
    orthogonal: Any,
    *,
    perturb_every: int,
    reuse_alpha: Optional[Any],
) -> tuple[Any, Any, Any]:
  """Runs ``perturbed_step`` on every ``perturb_every``-th step, reuses it between.

  Shared by :func:`sharpness_aware` and :func:`optax_sam.per_instance_sam`.

  Args:
    perturbed_step: ``(clean, inner_state, params) -> (descent, inner_state)``, the
      method's (device-local) gradient at the perturbed point(s).
    clean: the incoming clean gradient.
    inner_state: the method's state, advanced by ``perturbed_step`` only.
    params: the parameters.
    count: the step count; step ``count`` perturbs when ``count % perturb_every == 0``.
    orthogonal: the stored ``g_v`` (``()`` unless LookSAM).
    perturb_every: ``k``.
    reuse_alpha: ``α``, or ``None`` for the clean gradient between perturbing steps.

  Returns:
    ``(descent, inner_state, orthogonal)``; on the steps between, ``descent`` is in the
    dtypes of ``clean``.
  """
  if perturb_every == 1:
    descent, inner_state = perturbed_step(clean, inner_state, params)
    return descent, inner_state, orthogonal

  # Everything the branches need goes in as operands, so that each branch's work
  # (above all the second pass) happens inside it and only on its steps.
  def perturb(operands):
    clean, inner_state, params, orthogonal = operands
    descent, inner_state = perturbed_step(clean, inner_state, params)
    descent = numerics.tree_cast_like(descent, clean)
    if reuse_alpha is not None:
      orthogonal = orthogonal_component(descent, clean)
    return _varying_like((descent, inner_state, orthogonal), (clean, params))

  def reuse(operands):
    clean, inner_state, params, orthogonal = operands
    descent = clean if reuse_alpha is None else reuse_orthogonal(
        clean, orthogonal, reuse_alpha)
    return _varying_like((descent, inner_state, orthogonal), (clean, params))

  return jax.lax.cond(count % perturb_every == 0, perturb, reuse,
                      (clean, inner_state, params, orthogonal))


def _varying_like(tree: Any, like: Any) -> Any:
  # Under shard_map both branches of a cond must vary over the same devices: the
  # perturbing branch makes its outputs device-varying, the other passes state through.
  return numerics.match_varying(tree, like)


def guard_clean(descent: Any, clean: Any) -> Any:
  """``descent``, or NaNs if the clean gradient is not finite.

  The descent gradient does not read the clean gradient, so a non-finite one (a
  loss-scaling overflow, say) would otherwise vanish here instead of reaching a later
  finiteness guard such as ``optax.apply_if_finite``. Only for methods that read the
  clean gradient's values: it reads them too. It runs before any average over
  devices, so that every device sees it.
  """
  return numerics.nan_unless_finite(descent, clean)


def finish_descent(descent: Any, clean: Any, *, axis_name: Optional[str] = None) -> Any:
  """The end of every sharpness-aware update: average over devices, cast.

  Shared by :func:`sharpness_aware` and :func:`optax_sam.per_instance_sam`, the two
  places that compute a descent gradient at perturbed points.

  Args:
    descent: the (masked) batch-mean gradient at the perturbed point(s), on this device.
    clean: the incoming clean gradient; only its dtypes are read.
    axis_name: the ``shard_map``/``pmap`` axis to average over, for per-device
      perturbations; ``None`` for none.

  Returns:
    ``descent``, averaged over ``axis_name``, in the dtypes of ``clean``.
  """
  if axis_name is not None:
    descent = jax.lax.pmean(descent, axis_name)
  return numerics.tree_cast_like(descent, clean)
