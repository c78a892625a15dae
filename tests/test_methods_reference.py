"""One full step of each method against float64 NumPy written from METHODS.md."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sam
from tests import harness as h

RHO, LR = 0.3, 0.01


def _adam_step_after(perturb, params, batch, weights=None):
  """Reference: ε = perturb(g, w), then Adam's first step on the gradient at w + ε."""
  w = h.to_numpy(params)
  g = h.numpy_mean_grad(w, batch, weights)
  epsilon = perturb(g, w)
  g_adv = h.numpy_mean_grad({k: w[k] + epsilon[k] for k in w}, batch, weights)
  update = h.numpy_adam_first_step(g_adv, LR)
  return {k: w[k] + update[k] for k in w}


def _run(method, loss_fn=None, **extra):
  params, batch = h.make_problem()
  loss_fn = loss_fn or h.batch_loss_fn(batch)
  tx = optax.chain(method, optax.adam(LR))
  new_params, _ = h.one_step(tx, params, loss_fn, **extra)
  return params, batch, new_params


def test_sam_step_matches_numpy():
  params, batch, new_params = _run(optax_sam.sam(RHO))

  def perturb(g, w):
    norm = h.numpy_norm(g)
    return {k: RHO * g[k] / (norm + 1e-12) for k in g}

  h.assert_tree_close(new_params, _adam_step_after(perturb, params, batch))


def test_asam_step_matches_numpy():
  eta = 0.01
  params, batch, new_params = _run(optax_sam.asam(RHO, eta))

  def perturb(g, w):
    t = {k: np.abs(w[k]) + eta for k in w}
    norm = h.numpy_norm({k: t[k] * g[k] for k in g})
    return {k: RHO * t[k] ** 2 * g[k] / norm for k in g}

  h.assert_tree_close(new_params, _adam_step_after(perturb, params, batch))


def _numpy_fsam_perturbation(scores, g, keep_ratio):
  """Global top-k over the kernel (the pool: no biases); the bias is perturbed densely."""
  k = int(keep_ratio * scores["kernel"].size)
  threshold = np.sort(scores["kernel"].ravel())[::-1][k - 1]
  mask = {"kernel": scores["kernel"] >= threshold, "bias": np.ones_like(g["bias"], bool)}
  norm = h.numpy_norm(g)
  return {key: RHO * g[key] * mask[key] / (norm + 1e-12) for key in g}, mask


@pytest.mark.parametrize("per_example_fast_path", [True, False])
def test_fsam_per_example_fisher_step_matches_numpy(per_example_fast_path):
  keep_ratio, samples = 0.4, 6
  params, batch = h.make_problem()
  loss_fn = (h.per_example_loss_fn(batch) if per_example_fast_path
             else h.batch_loss_fn(batch))
  method = optax_sam.fsam(RHO, keep_ratio, mask_every=10, fisher_samples=samples,
                          fisher_chunk_size=4)
  _, _, new_params = _run(method, loss_fn)

  def perturb(g, w):
    example_grads = h.numpy_example_grads(w, batch)[:samples]
    scores = {k: sum(eg[k] ** 2 for eg in example_grads) for k in w}
    return _numpy_fsam_perturbation(scores, g, keep_ratio)[0]

  h.assert_tree_close(new_params, _adam_step_after(perturb, params, batch))


def test_fsam_squared_gradient_fisher_step_matches_numpy():
  keep_ratio = 0.4
  params, batch, new_params = _run(
      optax_sam.fsam(RHO, keep_ratio, fisher="squared_gradient"))

  def perturb(g, w):
    return _numpy_fsam_perturbation({k: v ** 2 for k, v in g.items()}, g, keep_ratio)[0]

  h.assert_tree_close(new_params, _adam_step_after(perturb, params, batch))


def test_fsam_mask_is_refreshed_on_first_step_and_every_mask_every_steps():
  params, batch = h.make_problem()
  loss_fn = h.batch_loss_fn(batch)
  tx = optax_sam.fsam(RHO, 0.4, mask_every=3, fisher="squared_gradient")
  state = tx.init(params)
  update = jax.jit(lambda g, s: tx.update(g, s, params, loss_fn=loss_fn))
  rng = np.random.default_rng(1)
  masks = []
  for _ in range(7):  # random gradients: each refresh gives a different mask
    g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    _, state = update(g, state)
    masks.append(np.asarray(state.perturbation_state[1].mask["kernel"]))
    expected = np.square(np.asarray(g["kernel"]))
    if len(masks) in (1, 4, 7):  # steps 0, 3, 6 refresh from their own gradient
      threshold = np.sort(expected.ravel())[::-1][int(0.4 * expected.size) - 1]
      np.testing.assert_array_equal(masks[-1], expected >= threshold)
    else:
      np.testing.assert_array_equal(masks[-1], masks[-2])
  assert not np.array_equal(masks[0], masks[3])


def _numpy_gasam_perturbation(g, v_hat, max_scale, rho=RHO):
  s = {k: np.sqrt(v) for k, v in v_hat.items()}
  rms = np.sqrt(sum(np.sum(v ** 2) for v in s.values()) / sum(v.size for v in s.values()))
  s_hat = {k: np.minimum(v / rms, max_scale) for k, v in s.items()}
  norm = h.numpy_norm({k: s_hat[k] * g[k] for k in g})
  return {k: rho * s_hat[k] ** 2 * g[k] / (norm + 1e-12) for k in g}, s_hat


def test_gasam_first_step_matches_numpy():
  max_scale = 1.5  # small enough that the cap binds on some coordinates
  params, batch, new_params = _run(optax_sam.gasam(RHO, max_scale=max_scale))

  def perturb(g, w):
    epsilon, s_hat = _numpy_gasam_perturbation(g, {k: v ** 2 for k, v in g.items()},
                                               max_scale)
    assert any(np.any(v == max_scale) for v in s_hat.values())
    return epsilon

  h.assert_tree_close(new_params, _adam_step_after(perturb, params, batch))


def test_gasam_second_step_uses_the_bias_corrected_ema():
  beta = 0.9
  params, batch = h.make_problem()
  loss_fn = h.batch_loss_fn(batch)
  tx = optax.chain(optax_sam.gasam(RHO, beta=beta), optax.sgd(LR))
  params1, state = h.one_step(tx, params, loss_fn)
  params2, _ = h.one_step(tx, params1, loss_fn, state)

  w0, w1 = h.to_numpy(params), h.to_numpy(params1)
  g0, g1 = h.numpy_mean_grad(w0, batch), h.numpy_mean_grad(w1, batch)
  v = {k: (1 - beta) * g0[k] ** 2 for k in g0}
  v = {k: beta * v[k] + (1 - beta) * g1[k] ** 2 for k in g1}
  v_hat = {k: v[k] / (1 - beta ** 2) for k in v}
  epsilon, _ = _numpy_gasam_perturbation(g1, v_hat, 10.0)
  g_adv = h.numpy_mean_grad({k: w1[k] + epsilon[k] for k in w1}, batch)
  h.assert_tree_close(params2, {k: w1[k] - LR * g_adv[k] for k in w1})


def test_gasam_multi_step_ascent_matches_numpy():
  steps = 3
  params, batch, new_params = _run(optax_sam.gasam(RHO, ascent_steps=steps))

  def perturb(g, w):
    v_hat = {k: v ** 2 for k, v in g.items()}
    epsilon, s_hat = _numpy_gasam_perturbation(g, v_hat, 10.0)
    for _ in range(steps - 1):
      g_k = h.numpy_mean_grad({k: w[k] + epsilon[k] for k in w}, batch)
      step, _ = _numpy_gasam_perturbation(g_k, v_hat, 10.0)
      epsilon = {k: epsilon[k] + step[k] for k in w}
      size = h.numpy_norm({k: epsilon[k] / s_hat[k] for k in w})
      epsilon = {k: epsilon[k] * min(1.0, RHO / size) for k in w}
    return epsilon

  h.assert_tree_close(new_params, _adam_step_after(perturb, params, batch))


@pytest.mark.parametrize("method", [
    optax_sam.sam(0.0), optax_sam.asam(0.0), optax_sam.fsam(0.0, 0.3),
    optax_sam.fsam(0.0, 0.3, fisher="squared_gradient"), optax_sam.gasam(0.0),
    optax_sam.gasam(0.0, ascent_steps=2)], ids=lambda m: "")
def test_rho_zero_is_the_base_optimizer(method):
  params, batch = h.make_problem()
  loss_fn = h.batch_loss_fn(batch)
  base = optax.adamw(LR, weight_decay=0.01)
  expected, _ = h.one_step(base, params, loss_fn)
  actual, _ = h.one_step(optax.chain(method, base), params, loss_fn)
  h.assert_tree_close(actual, h.to_numpy(expected), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fisher", ["per_example", "squared_gradient"])
def test_fsam_with_keep_ratio_one_is_sam(fisher):
  params, batch = h.make_problem()
  loss_fn = h.batch_loss_fn(batch)
  sam_params, _ = h.one_step(optax.chain(optax_sam.sam(RHO), optax.adam(LR)),
                             params, loss_fn)
  fsam_params, _ = h.one_step(
      optax.chain(optax_sam.fsam(RHO, 1.0, fisher=fisher), optax.adam(LR)),
      params, loss_fn)
  h.assert_tree_close(fsam_params, h.to_numpy(sam_params), rtol=1e-6, atol=1e-7)


def test_per_example_fisher_equals_a_python_loop_over_examples():
  params, batch = h.make_problem()
  loop = {k: np.zeros(v.shape) for k, v in params.items()}
  for i in range(h.BATCH):
    example = jax.tree.map(lambda x: x[i], batch)
    grads = jax.grad(h.example_loss)(params, example)
    for k in loop:
      loop[k] += np.square(np.asarray(grads[k], np.float64))
  fisher = optax_sam.fisher.empirical_fisher(h.per_example_loss_fn(batch), params)
  h.assert_tree_close(fisher, loop)


def test_per_example_fisher_ignores_padded_rows():
  params, batch = h.make_problem()
  example_mask = jnp.array([1, 1, 0, 1, 1, 0, 1, 0], jnp.float32)
  # With PerExampleLoss rows are independent, so a padded row may even hold junk; a
  # whole-batch loss_fn shares one backward pass, where 0 · NaN would leak.
  poisoned = dict(batch, x=batch["x"].at[2].set(jnp.nan))
  real = np.flatnonzero(np.asarray(example_mask))
  only_real = jax.tree.map(lambda x: x[real], batch)
  for make_loss, rows in ((h.per_example_loss_fn, poisoned), (h.batch_loss_fn, batch)):
    masked = optax_sam.fisher.empirical_fisher(make_loss(rows), params, chunk_size=3,
                                               example_mask=example_mask)
    expected = optax_sam.fisher.empirical_fisher(make_loss(only_real), params)
    h.assert_tree_close(masked, h.to_numpy(expected), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("chunk_size", [1, 3, 5])
def test_chunked_fisher_equals_unchunked(chunk_size):
  params, batch = h.make_problem()
  for loss_fn in (h.per_example_loss_fn(batch), h.batch_loss_fn(batch)):
    whole = optax_sam.fisher.empirical_fisher(loss_fn, params, num_examples=7)
    chunked = optax_sam.fisher.empirical_fisher(loss_fn, params, num_examples=7,
                                                chunk_size=chunk_size)
    h.assert_tree_close(chunked, h.to_numpy(whole), rtol=1e-6, atol=1e-8)


def test_global_topk_threshold_keeps_exactly_k_of_the_pool():
  rng = np.random.default_rng(3)
  scores = {"a": jnp.asarray(rng.random((40, 7)), jnp.float32),
            "b": jnp.asarray(rng.random(13), jnp.float32),
            "bias": jnp.asarray(rng.random(5), jnp.float32)}
  pool = {"a": True, "b": True, "bias": False}
  mask = optax_sam.fisher.global_topk_mask(scores, pool, 0.25)
  pooled = np.concatenate([np.asarray(scores["a"]).ravel(), np.asarray(scores["b"])])
  k = int(0.25 * pooled.size)
  threshold = np.sort(pooled)[::-1][k - 1]
  assert int(np.sum(mask["a"]) + np.sum(mask["b"])) == k
  np.testing.assert_array_equal(mask["a"], np.asarray(scores["a"]) >= threshold)
  assert bool(np.all(mask["bias"]))


# ------------------------------ the two-basin toy ------------------------------
# Two quadratic basins of equal depth (0): a sharp one at -1 (curvature 40) and a wide
# one at 1.5 (curvature 1), meeting at a ridge near -0.66. With lr·40 = 1.8 gradient
# descent is stable in the sharp basin; SAM's perturbation adds a kick of lr·40·ρ on top
# of the gradient, which makes it bounce with an amplitude of about lr·λ·ρ / (2 − lr·λ)
# (0.45 here), larger than the sharp basin, so it settles in the wide one. The leaf "z"
# has zero gradient: FSAM's mask (keep_ratio 0.5 of 2 entries) must choose "w".

SHARP_MINIMUM, WIDE_MINIMUM = -1.0, 1.5


def _two_basin_loss(params):
  x = params["w"][0]
  basins = jnp.minimum(20.0 * (x - SHARP_MINIMUM) ** 2, 0.5 * (x - WIDE_MINIMUM) ** 2)
  return (basins + 0.5 * jnp.sum(params["z"] ** 2))[None]


def _descend(method, steps=400, learning_rate=0.045):
  base = optax.sgd(learning_rate)
  tx = base if method is None else optax.chain(method, base)
  params = {"w": jnp.array([-0.85]), "z": jnp.zeros(1)}

  @jax.jit
  def step(params, state):
    grads = jax.grad(lambda p: _two_basin_loss(p).mean())(params)
    updates, state = tx.update(grads, state, params, loss_fn=_two_basin_loss)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return float(params["w"][0])


def test_two_basin_gradient_descent_ends_in_the_sharp_minimum():
  assert abs(_descend(None) - SHARP_MINIMUM) < 0.01


@pytest.mark.parametrize("method", [
    optax_sam.sam(0.05), optax_sam.asam(0.05), optax_sam.fsam(0.05, 0.5, mask_every=10),
    optax_sam.gasam(0.05)], ids=["sam", "asam", "fsam", "gasam"])
def test_two_basin_sam_family_ends_in_the_wide_minimum(method):
  assert abs(_descend(method) - WIDE_MINIMUM) < 0.05


def test_fsam_step_on_a_padded_batch_equals_the_step_on_its_real_rows():
  params, batch = h.make_problem()
  example_mask = jnp.array([1, 1, 1, 1, 1, 0, 0, 0], jnp.float32)
  real = jax.tree.map(lambda x: x[:5], batch)
  tx = optax.chain(optax_sam.fsam(RHO, 0.4, fisher_chunk_size=3), optax.adam(LR))

  def step(rows, **mask):
    loss_fn = h.per_example_loss_fn(rows)
    grads = jax.grad(lambda p: optax_sam.batch_mean(loss_fn(p), mask.get("example_mask")))(
        params)
    updates, _ = tx.update(grads, tx.init(params), params, loss_fn=loss_fn, **mask)
    return optax.apply_updates(params, updates)

  padded = jax.jit(lambda b, m: step(b, example_mask=m))(batch, example_mask)
  h.assert_tree_close(padded, h.to_numpy(jax.jit(step)(real)), rtol=1e-5, atol=1e-7)
