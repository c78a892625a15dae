"""Child-Tuning F and D against references from METHODS.md, and their composition."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sam
from optax_sam import subnetworks
from tests import harness

SEED = 5
PAPER = subnetworks.encoder_dense_kernels  # the papers' BERT scope


def encoder_params(rng=None):
  rng = np.random.default_rng(0) if rng is None else rng
  draw = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return {"encoder": {"layer_0": {"kernel": draw(3, 4), "bias": draw(4)},
                      "layer_1": {"kernel": draw(4, 4)}},
          "classifier": {"kernel": draw(4, 2)}}


def in_scope_kernels(tree):
  return [tree["encoder"]["layer_0"]["kernel"], tree["encoder"]["layer_1"]["kernel"]]


# --------------------------------- Child-Tuning_F ---------------------------------

def numpy_mix32(h):
  """MurmurHash3's 32-bit finaliser in NumPy uint32 arithmetic."""
  h = h ^ (h >> np.uint32(16))
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> np.uint32(13))
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> np.uint32(16))


def redrawn_f_masks(seed, steps, like, p_keep):
  """Masks per step as documented: ``key, mask_key = split(key)``, one raw key
  ``(k0, k1)`` per leaf, entry ``n`` kept when ``mix(mix(n ^ k0) + k1) >> 8`` is below
  ``floor(p_keep · 2²⁴)``."""
  key, out = jax.random.PRNGKey(seed), []
  threshold = np.uint32(np.floor(np.float32(p_keep) * np.float32(2.0**24)))
  for _ in range(steps):
    key, mask_key = jax.random.split(key)
    keys = np.asarray(jax.random.split(mask_key, len(like)), np.uint32)
    masks = []
    for (k0, k1), x in zip(keys, like):
      index = np.arange(x.size, dtype=np.uint32).reshape(x.shape)
      with np.errstate(over="ignore"):
        hashed = numpy_mix32(numpy_mix32(index ^ k0) + k1)
      masks.append((hashed >> np.uint32(8)) < threshold)
    out.append(masks)
  return out


def test_child_tuning_f_matches_redrawn_masks_and_rescales():
  p_keep = 0.3
  params = encoder_params()
  tx = optax_sam.child_tuning_f(p_keep, seed=SEED, scope=PAPER)
  step = jax.jit(tx.update)
  state = tx.init(params)
  grads = [encoder_params(np.random.default_rng(t + 1)) for t in range(3)]
  masks = redrawn_f_masks(SEED, 3, in_scope_kernels(params), p_keep)
  for t in range(3):
    updates, state = step(grads[t], state, params)
    for got, g, mask in zip(in_scope_kernels(updates), in_scope_kernels(grads[t]), masks[t]):
      expected = np.where(mask, np.asarray(g, np.float64) / p_keep, 0.0)
      np.testing.assert_allclose(got, expected, rtol=1e-6)
      assert 0 < mask.sum() < mask.size
    # Out of scope (bias, head) passes through untouched.
    np.testing.assert_array_equal(updates["encoder"]["layer_0"]["bias"],
                                  grads[t]["encoder"]["layer_0"]["bias"])
    np.testing.assert_array_equal(updates["classifier"]["kernel"],
                                  grads[t]["classifier"]["kernel"])
  assert not np.array_equal(masks[0][1], masks[1][1])  # fresh every step


def test_child_tuning_f_is_unbiased_and_keeps_p_keep():
  params = {"encoder": {"kernel": jnp.ones((400, 500))}}
  tx = optax_sam.child_tuning_f(0.3, seed=0)
  updates, _ = tx.update(params, tx.init(params), params)
  kept = np.asarray(updates["encoder"]["kernel"]) != 0
  assert abs(kept.mean() - 0.3) < 0.005  # 200 000 draws: std 0.001
  assert abs(np.asarray(updates["encoder"]["kernel"]).mean() - 1.0) < 0.02


def test_child_tuning_f_masks_are_bernoulli_with_independent_entries_and_steps():
  """Fixed seed, 40 steps of a 100 x 500 matrix (2 000 000 draws): the kept fraction,
  the update's mean and variance (``E = 1``, ``Var = (1 − p) / p`` for a gradient of
  ones), and no correlation between neighbouring entries, rows or steps."""
  p = 0.3
  params = {"encoder": {"kernel": jnp.ones((100, 500))}}
  tx = optax_sam.child_tuning_f(p, seed=11)
  step = jax.jit(tx.update)
  state, draws = tx.init(params), []
  for _ in range(40):
    updates, state = step(params, state, params)
    draws.append(np.asarray(updates["encoder"]["kernel"], np.float64))
  draws = np.stack(draws)
  kept = draws != 0
  n = kept.size
  assert abs(kept.mean() - p) < 4 * np.sqrt(p * (1 - p) / n)
  assert abs(draws.mean() - 1.0) < 4 * np.sqrt((1 - p) / p / n)
  assert abs(draws.var() / ((1 - p) / p) - 1.0) < 0.01
  per_step = kept.reshape(40, -1).mean(axis=1)  # binomial spread across steps
  assert np.std(per_step) < 2 * np.sqrt(p * (1 - p) / kept[0].size)
  centred = kept - p
  for a, b in ((centred[:, :, 1:], centred[:, :, :-1]),  # neighbouring entries
               (centred[:, 1:], centred[:, :-1]),  # neighbouring rows
               (centred[1:], centred[:-1])):  # consecutive steps
    correlation = (a * b).mean() / (p * (1 - p))
    assert abs(correlation) < 4 / np.sqrt(a.size), correlation


def test_child_tuning_f_accepts_a_p_keep_schedule():
  params = {"encoder": {"kernel": jnp.ones((300, 300))}}
  tx = optax_sam.child_tuning_f(optax.linear_schedule(1.0, 0.2, 1), seed=0)
  state = tx.init(params)
  first, state = tx.update(params, state, params)
  second, _ = tx.update(params, state, params)
  np.testing.assert_array_equal(first["encoder"]["kernel"], 1.0)  # p_keep(0) = 1
  assert abs((np.asarray(second["encoder"]["kernel"]) != 0).mean() - 0.2) < 0.01


@pytest.mark.parametrize("kwargs, name", [
    (dict(p_keep=0.0), "p_keep"), (dict(p_keep=1.5), "p_keep"), (dict(seed=0.5), "seed"),
])
def test_child_tuning_f_invalid_hyperparameters(kwargs, name):
  with pytest.raises(ValueError, match=name):
    optax_sam.child_tuning_f(**kwargs)


def test_scope_override_and_empty_scope():
  params = encoder_params()
  everything = optax_sam.child_tuning_f(0.5, scope=lambda path, leaf: True)
  updates, _ = everything.update(params, everything.init(params), params)
  assert np.any(np.asarray(updates["classifier"]["kernel"]) == 0)
  by_default = optax_sam.child_tuning_f(0.5)  # every matrix: the classifier's too
  updates, _ = by_default.update(params, by_default.init(params), params)
  assert np.any(np.asarray(updates["classifier"]["kernel"]) == 0)
  np.testing.assert_array_equal(updates["encoder"]["layer_0"]["bias"],
                                params["encoder"]["layer_0"]["bias"])
  with pytest.raises(ValueError, match="^child_tuning_f: scope selects no parameter"):
    optax_sam.child_tuning_f().init({"bias": jnp.ones(3)})
  with pytest.raises(ValueError, match="^child_tuning_f: scope selects no parameter"):
    optax_sam.child_tuning_f(scope=PAPER).init(harness.make_problem()[0])


# --------------------------------- Child-Tuning_D ---------------------------------

def test_child_tuning_d_multiplies_by_the_fixed_mask():
  params = encoder_params()
  mask = jax.tree.map(lambda p: jnp.asarray(np.random.default_rng(1).random(p.shape) < 0.5),
                      params)
  mask["classifier"]["kernel"] = True  # a Python bool keeps the whole leaf
  tx = optax_sam.child_tuning_d(mask)
  state = tx.init(params)
  for t in range(2):
    grads = encoder_params(np.random.default_rng(t + 7))
    updates, state = jax.jit(tx.update)(grads, state, params)
    kernel = lambda tree: tree["encoder"]["layer_1"]["kernel"]
    np.testing.assert_array_equal(kernel(updates),
                                  np.where(kernel(mask), kernel(grads), 0))
    np.testing.assert_array_equal(updates["classifier"]["kernel"],
                                  grads["classifier"]["kernel"])


def test_child_tuning_d_rejects_a_mask_of_the_wrong_structure():
  with pytest.raises(ValueError, match="structure of the parameters"):
    optax_sam.child_tuning_d({"a": True}).init(encoder_params())


def _regression_problem():
  """A linear model under ``encoder`` (two kernels) plus a head, and 5 batches."""
  rng = np.random.default_rng(3)
  params = encoder_params(rng)
  batches = [{"x": jnp.asarray(rng.normal(size=(6, 3)) * (1 + i), jnp.float32),
              "y": jnp.asarray(rng.normal(size=(6, 2)), jnp.float32)} for i in range(5)]

  def loss_fn_for(batch):
    def loss_fn(p):
      hidden = batch["x"] @ p["encoder"]["layer_0"]["kernel"] + p["encoder"]["layer_0"]["bias"]
      hidden = jnp.tanh(hidden) @ p["encoder"]["layer_1"]["kernel"]
      return jnp.sum((hidden @ p["classifier"]["kernel"] - batch["y"]) ** 2, axis=1)
    return loss_fn

  return params, batches, loss_fn_for


def numpy_squared_gradient_sum(params, batches, loss_fn_for):
  """``Σ_b (∇ mean_i l_i)²`` with float64 gradients (x64 off, so by float64 finite math)."""
  total = None
  for batch in batches:
    grads = jax.grad(lambda p: loss_fn_for(batch)(p).mean())(params)
    squares = jax.tree.map(lambda g: np.asarray(g, np.float64) ** 2, grads)
    total = squares if total is None else jax.tree.map(np.add, total, squares)
  return total


def test_child_tuning_d_mask_is_a_global_top_k_of_squared_batch_gradients():
  params, batches, loss_fn_for = _regression_problem()
  keep_ratio = 0.3
  calls = []

  def counting_loss_fn_for(batch):
    calls.append(1)
    return loss_fn_for(batch)

  mask = optax_sam.child_tuning_d_mask(counting_loss_fn_for, params, batches, keep_ratio,
                                       scope=PAPER)
  assert len(calls) == 1  # traced once, run for all 5 batches

  scores = numpy_squared_gradient_sum(params, batches, loss_fn_for)
  pooled = np.concatenate([s.ravel() for s in in_scope_kernels(scores)])
  k = int(keep_ratio * pooled.size)
  threshold = np.sort(pooled)[::-1][k - 1]
  for got, score in zip(in_scope_kernels(mask), in_scope_kernels(scores)):
    np.testing.assert_array_equal(got, score >= threshold)
  assert sum(int(np.sum(m)) for m in in_scope_kernels(mask)) == k
  # Global, not per matrix: the two kernels keep different fractions.
  fractions = [float(np.mean(m)) for m in in_scope_kernels(mask)]
  assert abs(fractions[0] - fractions[1]) > 0.1, fractions
  # Out of scope: kept entirely, full shape.
  assert mask["encoder"]["layer_0"]["bias"].shape == (4,)
  assert np.all(mask["encoder"]["layer_0"]["bias"]) and np.all(mask["classifier"]["kernel"])


def test_child_tuning_d_mask_accepts_a_one_pass_iterator():
  params, batches, loss_fn_for = _regression_problem()
  harness.assert_trees_close(
      optax_sam.child_tuning_d_mask(loss_fn_for, params, iter(batches)),
      optax_sam.child_tuning_d_mask(loss_fn_for, params, batches), rtol=0, atol=0)


def test_child_tuning_d_mask_rejects_no_batches():
  params, _, loss_fn_for = _regression_problem()
  with pytest.raises(ValueError, match="batches is empty"):
    optax_sam.child_tuning_d_mask(loss_fn_for, params, [])


@pytest.mark.parametrize("keep_ratio", [0.0, 1.5, optax.constant_schedule(0.3)])
def test_child_tuning_d_mask_invalid_keep_ratio(keep_ratio):
  params, batches, loss_fn_for = _regression_problem()
  with pytest.raises(ValueError, match="keep_ratio"):
    optax_sam.child_tuning_d_mask(loss_fn_for, params, batches, keep_ratio)


# --------------------------- composition, jit, devices ---------------------------

def test_sam_then_child_tuning_f_equals_masked_sam_gradient():
  params, batch = harness.make_problem()
  loss_fn = harness.batch_loss_fn(batch)
  everything = lambda path, leaf: True
  tx = optax.chain(optax_sam.sam(0.1), optax_sam.child_tuning_f(0.5, SEED, scope=everything),
                   optax.sgd(1.0))
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(1)
    grads = harness.clean_grads(loss_fn, params)
    return tx.update(grads, state, params, loss_fn=loss_fn)

  state = tx.init(params)
  sam = optax_sam.sam(0.1)
  for t in range(2):
    grads = harness.clean_grads(loss_fn, params)
    sam_gradient, _ = sam.update(grads, sam.init(params), params, loss_fn=loss_fn)
    updates, state = step(params, state)
    leaves = jax.tree.leaves(sam_gradient)  # bias, kernel
    masks = redrawn_f_masks(SEED, t + 1, leaves, 0.5)[t]
    for got, g, m in zip(jax.tree.leaves(updates), leaves, masks):
      np.testing.assert_allclose(got, -np.where(m, np.asarray(g) / 0.5, 0.0), rtol=1e-6,
                                 atol=1e-8)
  assert len(traces) == 1 and step._cache_size() == 1
