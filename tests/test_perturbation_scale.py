"""The perturbation-scale benchmark's norm ratios against hand computations."""

import numpy as np
import jax.numpy as jnp

from benchmarks import perturbation_scale
from optax_sam import perturbations


PARAMS = {"a": jnp.array([1.0, -0.5, 0.0]), "b": jnp.array([[2.0, 0.1]])}
GRADIENT = {"a": jnp.array([0.3, -1.0, 2.0]), "b": jnp.array([[0.5, 4.0]])}


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(tree[k], np.float64)) for k in ("a", "b")])


def test_asam_ratio_is_the_norm_of_t_squared_g_over_t_g():
  eta = 0.01
  scale = np.abs(_flat(PARAMS)) + eta
  g = _flat(GRADIENT)
  expected = np.linalg.norm(scale ** 2 * g) / np.linalg.norm(scale * g)
  ratio = perturbation_scale.perturbation_norm_ratio(
      perturbations.parameter_magnitude_ellipsoid(1.0, eta), PARAMS, GRADIENT)
  np.testing.assert_allclose(ratio, expected, rtol=1e-5)


def test_gasam_ratio_uses_the_capped_relative_strength_of_the_gradient():
  max_scale = 1.5
  g = _flat(GRADIENT)
  strength = np.abs(g)
  relative = np.minimum(strength / np.sqrt(np.mean(strength ** 2)), max_scale)
  expected = np.linalg.norm(relative ** 2 * g) / np.linalg.norm(relative * g)
  ratio = perturbation_scale.perturbation_norm_ratio(
      perturbations.gradient_strength_ellipsoid(1.0, max_scale=max_scale), PARAMS,
      GRADIENT)
  np.testing.assert_allclose(ratio, expected, rtol=1e-5)
  assert ratio <= max_scale
