"""δ-SAM's ascent: the SAM step of a batch loss reweighted toward the sharpest examples."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optax_sam.core import loss as loss_lib
from optax_sam.core import numerics
from optax_sam.core import placement


class ReweightedAscentState(NamedTuple):
  count: jax.Array  # steps taken, for ρ and η schedules
  key: jax.Array  # raw uint32[2] PRNG key; split once per step for the random direction


def random_direction(key: jax.Array, like: Any, radius: jax.Array) -> Any:
  """A Gaussian direction shaped like ``like``, rescaled to global L2 norm ``radius``.

  Leaf ``i`` (in ``jax.tree.leaves`` order) is ``jax.random.normal(keys[i], shape,
  float32)`` with ``keys = jax.random.split(key, num_leaves)``; the whole pytree is then
  multiplied by ``radius / ‖·‖``. Returned in float32.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from optax_sam.perturbations import reweighting
    >>> r = reweighting.random_direction(jax.random.PRNGKey(0), jnp.zeros(5), 2.0)
    >>> bool(jnp.isclose(jnp.linalg.norm(r), 2.0))
    True
  """
  leaves, treedef = jax.tree.flatten(like)
  keys = jax.random.split(key, len(leaves))
  normal = [placement.normal_like(k, x) for k, x in zip(keys, leaves)]
  factor = radius / (numerics.global_norm(normal) + numerics.NORM_EPS)
  return jax.tree.unflatten(treedef, [n * factor for n in normal])


def sharpness_weights(
    loss_at_w: jax.Array,
    loss_plus: jax.Array,
    loss_minus: jax.Array,
    eta: jax.Array,
    example_mask: Optional[jax.Array] = None,
) -> jax.Array:
  """δ-SAM's per-example weights ``|l⁺ + l⁻ − 2 l| / max(|l⁺ − l⁻|, η)``, float32.

  A finite-difference estimate, along the batch's random direction, of each example's
  curvature over its slope: large for examples whose loss rises fastest in some
  direction of the ball. Padded rows (``example_mask == 0``) get weight 0.
  """
  loss_at_w, loss_plus, loss_minus = (
      jnp.asarray(x, jnp.float32) for x in (loss_at_w, loss_plus, loss_minus))
  curvature = jnp.abs(loss_plus + loss_minus - 2.0 * loss_at_w)
  slope = jnp.maximum(jnp.abs(loss_plus - loss_minus), eta)
  weights = curvature / slope
  if example_mask is not None:
    loss_lib.check_example_mask(example_mask, weights.shape[0])
    weights = weights * jnp.asarray(example_mask, jnp.float32)
  return weights


def reweighted_ascent(
    rho: numerics.ScalarOrSchedule = 0.05,
    eta: numerics.ScalarOrSchedule = 1e-4,
    seed: int = 0,
    *,
    eps: float = numerics.NORM_EPS,
) -> optax.GradientTransformationExtraArgs:
  """δ-SAM's perturbation: ``ε = ρ ∇Σ_i a_i l_i(w) / ‖∇Σ_i a_i l_i(w)‖``.

  Each step:

  1. ``key, direction_key = jax.random.split(state.key)`` and
     ``r = random_direction(direction_key, params, ρ)``, one direction for the batch;
  2. the per-example losses ``l_i(w)``, ``l_i(w + r)``, ``l_i(w − r)`` through
     ``loss_fn`` (so with the caller's batch and dropout key), none differentiated;
  3. weights ``a_i`` from :func:`sharpness_weights` (0 for padded rows), held constant;
  4. ``∇_w Σ_i a_i l_i(w)`` as one vector-Jacobian product with ``a`` as the cotangent,
     from the same ``jax.vjp`` call that produced ``l_i(w)``: no per-example gradients;
  5. scaled onto the sphere of radius ``ρ`` (norm in float32).

  The incoming gradient is not read (only its dtypes), so it costs two forward passes
  without gradient plus one forward and one backward pass. Equal weights give SAM's
  ``ε``. If every weight is 0 (a loss exactly linear along ``r``, or an all-padding
  batch), ``ε = 0`` and the descent gradient is the plain one.

  Args:
    rho: radius ``ρ >= 0`` of both the probing direction and ``ε`` (constant or schedule).
    eta: ``η > 0``, the floor of the slope in the weights' denominator.
    seed: seeds the state's PRNG key (``jax.random.PRNGKey(seed)``).
    eps: ``δ > 0`` added to the norm of the reweighted gradient.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` that needs ``params`` and a
    per-example ``loss_fn``, and accepts ``example_mask``.

  References:
    Zhou et al., `Sharpness-Aware Minimization with Dynamic Reweighting
    <https://arxiv.org/abs/2112.08772>`_, Findings of EMNLP 2022.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from optax_sam.perturbations import reweighting
    >>> params = jnp.array([0.5, -1.0])
    >>> x = jnp.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    >>> loss_fn = lambda p: jnp.log1p(jnp.exp(-x @ p))
    >>> piece = reweighting.reweighted_ascent(rho=0.1)
    >>> eps, state = piece.update(jnp.zeros(2), piece.init(params), params, loss_fn=loss_fn)
    >>> bool(jnp.isclose(jnp.linalg.norm(eps), 0.1))
    True
  """
  numerics.check_range("rho", rho, low=0.0, schedule=True)
  numerics.check_range("eta", eta, low=0.0, low_inclusive=False, schedule=True)
  numerics.check_range("eps", eps, low=0.0, low_inclusive=False)
  numerics.check_seed(seed)

  def init_fn(params: optax.Params) -> ReweightedAscentState:
    del params
    return ReweightedAscentState(count=jnp.zeros((), jnp.int32),
                                 key=jax.random.PRNGKey(seed))

  def update_fn(updates, state, params=None, *, loss_fn=None, example_mask=None,
                **extra_args):
    del extra_args
    piece = "reweighted_ascent"
    loss_fn = loss_lib.require_loss_fn(loss_fn, piece)
    params = loss_lib.require_params(params, piece)
    radius = numerics.value_at(rho, state.count)
    key, direction_key = jax.random.split(state.key)

    loss_at_w, weighted_vjp = jax.vjp(
        lambda p: loss_lib.per_example_losses(loss_fn, p, piece), params)
    direction = random_direction(direction_key, params, radius)

    def losses_at(sign):
      moved = jax.tree.map(lambda w, r: w + (sign * r).astype(w.dtype), params, direction)
      return jax.lax.stop_gradient(loss_fn(moved))

    weights = sharpness_weights(loss_at_w, losses_at(1.0), losses_at(-1.0),
                                numerics.value_at(eta, state.count), example_mask)
    (reweighted,) = weighted_vjp(weights.astype(loss_at_w.dtype))
    factor = radius / (numerics.global_norm(reweighted) + eps)
    epsilon = jax.tree.map(lambda g, u: (g.astype(jnp.float32) * factor).astype(u.dtype),
                           reweighted, updates)
    return epsilon, ReweightedAscentState(count=optax.safe_increment(state.count),
                                          key=key)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
