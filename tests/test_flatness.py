"""optax_sam.flatness against a dense float64 Hessian and a hand computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_sam
from optax_sam import flatness
from tests import harness


def _flat_loss(params, batch):
  """The toy problem's mean loss as a function of one flat float64-able vector."""
  shapes = {k: v.shape for k, v in params.items()}
  sizes = {k: int(np.prod(s)) for k, s in shapes.items()}

  def unflatten(vector):
    out, at = {}, 0
    for k in sorted(params):
      out[k] = vector[at:at + sizes[k]].reshape(shapes[k])
      at += sizes[k]
    return out

  flat = jnp.concatenate([params[k].ravel() for k in sorted(params)])
  return (lambda vector: harness.batch_loss_fn(batch)(unflatten(vector)).mean()), flat


def test_top_eigenvalue_matches_the_dense_hessian():
  params, batch = harness.make_problem(seed=2)
  loss = lambda p: harness.batch_loss_fn(batch)(p).mean()
  estimate = jax.jit(lambda p: flatness.hessian_top_eigenvalue(
      loss, p, jax.random.key(0), num_iterations=12))(params)
  with jax.enable_x64():
    flat_loss, flat = _flat_loss(jax.tree.map(lambda x: x.astype(jnp.float64), params),
                                 batch)
    dense = np.asarray(jax.hessian(flat_loss)(flat), np.float64)
  top = np.linalg.eigvalsh(dense)[-1]
  assert float(estimate.eigenvalue) == pytest.approx(top, rel=1e-4)
  assert estimate.history.shape == (12,)
  assert float(estimate.relative_change) < 1e-5
  # Ritz values approach the top eigenvalue from below, one per iteration.
  history = np.asarray(estimate.history, np.float64)
  assert np.all(np.diff(history) >= -1e-5 * top) and np.all(history <= top * (1 + 1e-5))
  assert history[0] < 0.99 * top


def test_few_iterations_are_visibly_unconverged():
  # A spectrum of 200 evenly spaced eigenvalues in (0, 3]: 4 iterations do not resolve
  # the top one, and the history says so.
  scales = jnp.linspace(0.015, 3.0, 200)
  loss = lambda w: 0.5 * jnp.sum(scales * w ** 2)
  few = flatness.hessian_top_eigenvalue(loss, jnp.ones(200), jax.random.key(1),
                                        num_iterations=4)
  many = flatness.hessian_top_eigenvalue(loss, jnp.ones(200), jax.random.key(1),
                                         num_iterations=60)
  assert float(few.relative_change) > 1e-3 and float(few.eigenvalue) < 2.9
  assert float(many.eigenvalue) == pytest.approx(3.0, rel=1e-3)


def test_hessian_vector_product_of_a_quadratic():
  a = np.array([[2.0, 0.5], [0.5, 1.0]])
  loss = lambda w: 0.5 * w @ jnp.asarray(a, jnp.float32) @ w
  product = flatness.hessian_vector_product(loss, jnp.ones(2), jnp.array([1.0, -2.0]))
  np.testing.assert_allclose(product, a @ np.array([1.0, -2.0]), rtol=1e-6)


def test_sharpness_is_the_loss_increase_along_the_normalised_gradient():
  params, batch = harness.make_problem(seed=3)
  loss = lambda p: harness.batch_loss_fn(batch)(p).mean()
  rho = 0.05
  got = float(jax.jit(lambda p: flatness.sharpness(loss, p, rho))(params))
  # By hand, in float64: g from the closed-form gradient, L from the closed-form loss.
  p64 = harness.to_numpy(params)
  grads = harness.numpy_mean_grad(p64, batch)
  norm = harness.numpy_norm(grads)
  perturbed = {k: p64[k] + rho * grads[k] / norm for k in p64}
  expected = (harness.numpy_example_losses(perturbed, batch).mean()
              - harness.numpy_example_losses(p64, batch).mean())
  assert expected > 0
  assert got == pytest.approx(expected, rel=1e-3)


def test_sharpness_of_a_zero_gradient_is_zero_and_rho_is_checked():
  loss = lambda w: jnp.sum(w ** 2)
  assert float(flatness.sharpness(loss, jnp.zeros(3), 0.1)) == 0.0
  with pytest.raises(ValueError, match="rho"):
    flatness.sharpness(loss, jnp.zeros(3), -0.1)
  with pytest.raises(ValueError, match="num_iterations"):
    flatness.hessian_top_eigenvalue(loss, jnp.zeros(3), jax.random.key(0),
                                    num_iterations=1)


def test_public_name():
  assert optax_sam.flatness is flatness
