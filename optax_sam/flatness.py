"""Measures of how flat a minimum is: the top Hessian eigenvalue and SAM's sharpness.

These are the quantities sharpness-aware methods are meant to lower, so they are the
first check that a method does what it claims on a real model: compare them, at the
parameters each optimizer ends at, on the same examples with dropout off.

Both take ``loss``, a function of the parameters returning a scalar (e.g. the mean loss
of a fixed set of examples; build it with :func:`optax_sam.microbatched_loss` when the
set does not fit one forward pass). Norms and inner products are accumulated in float32.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from optax_sam.core import numerics
from optax_sam.core import placement

ScalarLoss = Callable[[Any], jax.Array]


class EigenvalueEstimate(NamedTuple):
  """The result of :func:`hessian_top_eigenvalue`.

  Attributes:
    eigenvalue: the largest Ritz value after the last iteration, float32.
    history: ``[num_iterations]`` the largest Ritz value after each iteration; it has
      converged when its last entries agree.
    relative_change: ``|λ_k − λ_{k−1}| / |λ_k|`` between the last two iterations.
  """

  eigenvalue: jax.Array
  history: jax.Array
  relative_change: jax.Array


def hessian_vector_product(loss: ScalarLoss, params: Any, vector: Any) -> Any:
  """``H v`` for the Hessian ``H`` of ``loss`` at ``params``, by forward-over-reverse.

  Costs about one forward and two backward passes; ``H`` is never formed.

  Args:
    loss: ``params -> scalar``.
    params: where the Hessian is taken.
    vector: a pytree shaped like ``params``.

  Returns:
    ``H v``, shaped like ``params``.
  """
  return jax.jvp(jax.grad(loss), (params,), (vector,))[1]


def _dot(a: Any, b: Any) -> jax.Array:
  return sum(jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _combine(a: Any, scale_a: jax.Array, b: Any, scale_b: jax.Array) -> Any:
  """``scale_a · a + scale_b · b`` in float32, in the dtypes of ``a``."""
  return jax.tree.map(
      lambda x, y: (scale_a * x.astype(jnp.float32)
                    + scale_b * y.astype(jnp.float32)).astype(x.dtype), a, b)


def _largest_ritz_values(alphas: jax.Array, betas: jax.Array) -> jax.Array:
  """The largest eigenvalue of each leading ``k x k`` block of the Lanczos matrix."""
  size = alphas.shape[0]
  tridiagonal = (jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1))
  masks = jnp.arange(size)[None, :] < jnp.arange(1, size + 1)[:, None]  # [k, size]

  def largest(mask):
    block = jnp.where(mask[:, None] & mask[None, :], tridiagonal, 0.0)
    # Rows outside the block are pushed far below every eigenvalue of the block.
    floor = jnp.min(alphas) - 2 * jnp.sum(jnp.abs(betas)) - 1.0
    block = block + jnp.diag(jnp.where(mask, 0.0, floor))
    return jnp.linalg.eigvalsh(block)[-1]

  return jax.vmap(largest)(masks)


def hessian_top_eigenvalue(loss: ScalarLoss, params: Any, key: jax.Array, *,
                           num_iterations: int = 20) -> EigenvalueEstimate:
  """The largest Hessian eigenvalue, by the Lanczos method on ``H v``.

  Starts from a Gaussian direction drawn from ``key``; each iteration is one
  Hessian-vector product and the estimate is the largest eigenvalue of the Lanczos
  tridiagonal matrix (a Ritz value), which approaches the largest eigenvalue of ``H``
  from below, much faster than power iteration. The three-term recurrence keeps only
  two vectors the size of the parameters (no reorthogonalisation: lost orthogonality
  repeats converged Ritz values, it does not move the largest one). Read ``history``
  (or ``relative_change``) before trusting the value.

  Args:
    loss: ``params -> scalar``, deterministic (dropout off, fixed examples).
    params: where the Hessian is taken.
    key: a PRNG key for the starting direction.
    num_iterations: Hessian-vector products to run (at least 2).

  Returns:
    An :class:`EigenvalueEstimate`.

  References:
    Lanczos, `An iteration method for the solution of the eigenvalue problem of linear
    differential and integral operators
    <https://doi.org/10.6028/jres.045.026>`_, 1950; Ghorbani et al., `An Investigation
    into Neural Net Optimization via Hessian Eigenvalue Density
    <https://arxiv.org/abs/1901.10159>`_, 2019 (Lanczos on deep-network Hessians).

  Example:
    >>> import jax, jax.numpy as jnp, optax_sam
    >>> loss = lambda w: 0.5 * (3.0 * w[0] ** 2 + w[1] ** 2 - w[2] ** 2)
    >>> estimate = optax_sam.flatness.hessian_top_eigenvalue(
    ...     loss, jnp.ones(3), jax.random.key(0), num_iterations=3)
    >>> round(float(estimate.eigenvalue), 4)
    3.0
  """
  numerics.check_positive_int("num_iterations", num_iterations, minimum=2)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  start = jax.tree.unflatten(treedef, [
      placement.normal_like(k, x).astype(jnp.asarray(x).dtype)
      for k, x in zip(keys, leaves)])
  start = _combine(start, jax.lax.rsqrt(_dot(start, start)), start, 0.0)

  def iteration(carry, _):
    vector, previous, beta = carry
    product = hessian_vector_product(loss, params, vector)
    alpha = _dot(vector, product)
    residual = _combine(_combine(product, 1.0, vector, -alpha), 1.0, previous, -beta)
    next_beta = jnp.sqrt(jnp.maximum(_dot(residual, residual), 0.0))
    # An invariant subspace (beta = 0) ends the recurrence: later rows stay decoupled.
    next_vector = _combine(residual, jnp.where(next_beta > 0, 1.0 / next_beta, 0.0),
                           residual, 0.0)
    return (next_vector, vector, next_beta), (alpha, next_beta)

  zeros = jax.tree.map(jnp.zeros_like, start)
  _, (alphas, betas) = jax.lax.scan(iteration, (start, zeros, jnp.zeros((), jnp.float32)),
                                    length=num_iterations)
  history = _largest_ritz_values(alphas, betas)
  last, previous = history[-1], history[-2]
  change = jnp.abs(last - previous) / jnp.maximum(jnp.abs(last), 1e-30)
  return EigenvalueEstimate(eigenvalue=last, history=history, relative_change=change)


def sharpness(loss: ScalarLoss, params: Any, rho: float) -> jax.Array:
  """SAM's sharpness ``L(w + ρ g/‖g‖) − L(w)`` at ``params``, with ``g = ∇L(w)``.

  The loss increase along SAM's first-order worst-case direction of length ``rho``;
  about ``ρ‖g‖ + ρ²/2 · ĝᵀHĝ`` for small ``rho``. A zero gradient gives 0.

  Args:
    loss: ``params -> scalar``, deterministic.
    params: the point ``w``.
    rho: the radius (fixed across the runs being compared).

  Returns:
    The float32 loss increase.

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, 2021.

  Example:
    >>> import jax.numpy as jnp, optax_sam
    >>> loss = lambda w: jnp.sum(w ** 2)
    >>> round(float(optax_sam.flatness.sharpness(loss, jnp.array([3.0, 4.0]), 0.5)), 4)
    5.25
  """
  numerics.check_range("rho", rho, low=0.0)
  value, grads = jax.value_and_grad(loss)(params)
  norm = numerics.global_norm(grads)
  scale = jnp.where(norm > 0, rho / jnp.where(norm > 0, norm, 1.0), 0.0)
  perturbed = _combine(params, 1.0, grads, scale)
  return (loss(perturbed) - value).astype(jnp.float32)
