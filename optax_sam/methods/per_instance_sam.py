"""Per-instance SAM: every example gets its own worst-case perturbation."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optax_sam.core import loss as loss_lib
from optax_sam.core import numerics
from optax_sam.core import sharpness
from optax_sam.fisher import per_example


class PerInstanceSAMState(NamedTuple):
  count: jax.Array  # steps taken: for a ρ schedule and the perturbing steps
  orthogonal: Any  # LookSAM's g_v (see optax_sam.SharpnessAwareState), or ()


def per_instance_sam(
    rho: numerics.ScalarOrSchedule = 0.05,
    *,
    chunk_size: Optional[int] = None,
    perturb_every: Optional[int] = None,
    reuse_alpha: Optional[float] = None,
    eps: float = numerics.NORM_EPS,
    axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  """Exact per-instance SAM: the (masked) mean of ``∇l_i(w + ε_i)``, ``ε_i`` per example.

  Each example gets the SAM perturbation of its own loss,
  ``ε_i = ρ ∇l_i(w) / (‖∇l_i(w)‖ + δ)``, and the update is
  ``(1 / Σ_i m_i) Σ_i m_i ∇l_i(w + ε_i)`` with ``m`` the ``example_mask`` (all ones by
  default). This is the stronger adversary ``(1/N) Σ_i max_{‖ε_i‖≤ρ} l_i(w + ε_i)`` that
  :func:`optax_sam.delta_sam` approximates, the upper reference of its paper. Since
  ``ε`` differs per example it is not a :func:`optax_sam.sharpness_aware` composition:
  examples are processed with ``jax.vmap`` ``chunk_size`` at a time under ``lax.scan``,
  so memory holds ``chunk_size`` per-example gradients and perturbed parameter copies
  whatever the batch size. A batch of one is SAM.

  Cost: per example, two forward and two backward passes of that example alone when
  ``loss_fn`` is a :class:`optax_sam.PerExampleLoss` — about SAM's arithmetic, but
  unbatched within what a chunk can vectorise (the paper measured about 7× δ-SAM's wall
  time). With any other ``loss_fn`` each example costs two forward and two backward
  passes of the *whole batch* (``loss_fn(p)[i]``). The incoming clean gradient's values
  are not read (unless ``perturb_every > 1``), so under ``jax.jit`` XLA drops the
  caller's backward pass that made it; a non-finite gradient of an example shows in
  the output by itself. Extra state: a step count (and LookSAM's ``g_v``).

  Many devices: under ``jax.jit`` with the batch sharded, nothing changes. Inside
  ``shard_map``, pass ``axis_name``: each device then handles its own examples and the
  device means are averaged. Per-device ("m-sharpness") perturbations mean nothing new
  here, since every example already has its own; the result is the global step
  whenever the devices hold equally many real examples (with uneven padding, it is the
  mean of the devices' masked means, as for the other methods' ``axis_name``).

  Args:
    rho: radius ``ρ >= 0`` of each example's perturbation (constant or schedule).
    chunk_size: examples per ``vmap`` chunk, ``>= 1``; ``None`` for the whole batch at
      once (fastest, memory linear in the batch).
    perturb_every: perturb on every k-th step only (amortised steps); ``None`` or
      ``1`` is the method itself. See :func:`optax_sam.sharpness_aware`.
    reuse_alpha: LookSAM's ``α`` for the steps between perturbing steps, or ``None``
      for the clean gradient there. See :func:`optax_sam.sharpness_aware`.
    eps: ``δ > 0`` added to each per-example gradient norm (float32).
    axis_name: the ``shard_map``/``pmap`` axis of a training step that runs per device;
      ``loss_fn`` then holds this device's examples. See above.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` needs ``params`` and a
    per-example ``loss_fn``, and accepts ``example_mask``.

  References:
    Zhou et al., `Sharpness-Aware Minimization with Dynamic Reweighting
    <https://arxiv.org/abs/2112.08772>`_, Findings of EMNLP 2022 (the per-instance
    adversary, Section 3).

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_sam
    >>> batch = {"x": jnp.arange(12.0).reshape(4, 3) / 10, "y": jnp.array([0, 1, 1, 0])}
    >>> def example_loss(p, ex):
    ...   logits = ex["x"] @ p["kernel"] + p["bias"]
    ...   return optax.softmax_cross_entropy_with_integer_labels(logits, ex["y"])
    >>> loss_fn = optax_sam.PerExampleLoss(example_loss, batch)
    >>> params = {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}
    >>> tx = optax.chain(optax_sam.per_instance_sam(0.05, chunk_size=2), optax.sgd(0.1))
    >>> grads = jax.grad(lambda p: loss_fn(p).mean())(params)
    >>> updates, state = tx.update(grads, tx.init(params), params, loss_fn=loss_fn)
  """
  numerics.check_range("rho", rho, low=0.0, schedule=True)
  numerics.check_range("eps", eps, low=0.0, low_inclusive=False)
  if chunk_size is not None:
    numerics.check_positive_int("chunk_size", chunk_size)
  perturb_every = sharpness.amortisation_period(perturb_every, reuse_alpha)
  method = "per_instance_sam"

  def init_fn(params: optax.Params) -> PerInstanceSAMState:
    return PerInstanceSAMState(
        count=jnp.zeros((), jnp.int32),
        orthogonal=sharpness.init_orthogonal(
            params, reuse_alpha is not None and perturb_every > 1))

  def update_fn(updates, state, params=None, *, loss_fn=None, example_mask=None,
                **extra_args):
    del extra_args
    loss_fn = loss_lib.require_loss_fn(loss_fn, method)
    params = loss_lib.require_params(params, method)
    batch_size = per_example.batch_size_of(loss_fn, params, method)
    radius = numerics.value_at(rho, state.count)
    if axis_name is not None:
      # Per-example gradients of this device's examples, not summed over the devices.
      params = numerics.device_varying(params, axis_name)

    def perturbed_gradient(example_loss, p: Any) -> Any:
      gradient = jax.grad(example_loss)(p)
      factor = radius / (numerics.global_norm(gradient) + eps)
      perturbed = jax.tree.map(
          lambda w, g: w + (g.astype(jnp.float32) * factor).astype(w.dtype), p, gradient)
      return jax.grad(example_loss)(perturbed)

    def perturbed_step(clean, inner_state, params):
      del clean  # only its dtypes are used, by finish_descent
      total = per_example.sum_over_examples(
          perturbed_gradient, loss_fn, params, chunk_size=chunk_size,
          example_mask=example_mask, method=method)
      count = loss_lib.example_count(example_mask, batch_size)
      return jax.tree.map(lambda t: t / count, total), inner_state

    descent, _, orthogonal = sharpness.amortised(
        perturbed_step, updates, (), params, state.count, state.orthogonal,
        perturb_every=perturb_every, reuse_alpha=reuse_alpha)
    descent = sharpness.finish_descent(descent, updates, axis_name=axis_name)
    return descent, PerInstanceSAMState(count=optax.safe_increment(state.count),
                                        orthogonal=orthogonal)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
