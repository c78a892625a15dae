"""Mixout and DPS-Mix against a float64 NumPy reference written from METHODS.md."""

from __future__ import annotations

import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sam
from optax_sam import subnetworks
from optax_sam.core.selection import path_string
from tests import harness

SHAPES = {"encoder": {"layer_0": {"dense": {"kernel": (3, 4), "bias": (4,)}},
                      "pooler": {"kernel": (4, 2)}},
          "classifier": {"kernel": (2, 3), "bias": (3,)}}
# The papers' BERT scope: the encoder's dense kernels (the classifier is left out).
PAPER = subnetworks.encoder_dense_kernels
IN_SCOPE = ("encoder/layer_0/dense/kernel", "encoder/pooler/kernel")
LEARNING_RATE = 0.05


def tree_of(make):
  return jax.tree.map(make, SHAPES, is_leaf=lambda s: isinstance(s, tuple))


def _flatten(tree):
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {path_string(p): x for p, x in flat}


def quadratic_problem(steps, seed=0):
  """``L_t(W) = Σ ½ a ⊙ W² + b_t ⊙ W``: ``∂L/∂W = a ⊙ W + b_t``, a new ``b`` each step."""
  rng = np.random.default_rng(seed)
  curvature = tree_of(lambda s: rng.uniform(0.5, 2.0, size=s))
  offsets = [tree_of(lambda s: rng.normal(size=s)) for _ in range(steps)]
  params = tree_of(lambda s: rng.normal(size=s))
  return params, curvature, offsets


def jax_loss(params, curvature, offset):
  terms = jax.tree.map(lambda w, a, b: jnp.sum(0.5 * a * w ** 2 + b * w),
                       params, curvature, offset)
  return sum(jax.tree.leaves(terms))


def reference_draws(seed, p, steps):
  """Stage I masks of steps 0, 1, ...: the documented key chain, one split per step."""
  shapes = [_flatten(tree_of(np.zeros))[path].shape for path in IN_SCOPE]  # tree order
  key, draws = jax.random.PRNGKey(seed), []
  for _ in range(steps):
    key, mask_key = jax.random.split(key)
    keys = jax.random.split(mask_key, len(shapes))
    draws.append({path: np.broadcast_to(np.asarray(jax.random.bernoulli(
        k, 1.0 - jnp.float32(p), (*shape[:-1], 1))), shape)
                  for path, shape, k in zip(IN_SCOPE, shapes, keys)})
  return draws


def numpy_top_k(scores, exclude_ratio):
  keep = math.ceil(scores.size * (1 - exclude_ratio))
  return scores >= np.sort(scores.ravel())[::-1][keep - 1]


def numpy_dps_mix(params, curvature, offsets, *, stage, mixout_p, exclude_ratio, seed,
                  score=None):
  """DPS-Mix with plain SGD, in float64. Returns per step ``(W_eff, mask, W after)``.

  ``score`` is the paper's by default (``"damped"`` if ``us ≥ 50``, else ``"mean"``);
  ``"sum"`` ranks by ``G`` alone, for comparison.
  """
  score = score or ("damped" if stage >= 50 else "mean")
  draws = reference_draws(seed, mixout_p, len(offsets))
  weights = {k: np.asarray(v, np.float64) for k, v in _flatten(params).items()}
  pretrained = dict(weights)
  accumulated, kept, selected, stage_start = {}, {}, {}, {}
  history = []
  for t, offset in enumerate(offsets):
    position = t % (2 * stage)
    mixed, masks = {}, {}
    for path in IN_SCOPE:
      if position < stage:
        mask, target = draws[t][path], pretrained[path]
      else:
        if position == stage:
          count = np.maximum(kept[path], 1)
          scores = accumulated[path] / (1 if score == "sum" else count)
          if score == "damped":
            scores = scores * np.exp(-count / stage)
          selected[path] = numpy_top_k(scores, exclude_ratio)
          stage_start[path] = weights[path]
        mask, target = selected[path], stage_start[path]
      masks[path] = mask
      mixed[path] = ((1 - mask) * target + mask * weights[path]
                     - mixout_p * target) / (1 - mixout_p)
    flat_a, flat_b = _flatten(curvature), _flatten(offset)
    for path, w in weights.items():
      w_eff = mixed.get(path, w)
      g = flat_a[path] * w_eff + flat_b[path]
      if path in masks:
        g = masks[path] * g  # the Mixout backward: no 1/(1 − p)
        if position < stage:
          fresh = position == 0
          accumulated[path] = (0 if fresh else accumulated[path]) + g ** 2
          kept[path] = (0 if fresh else kept[path]) + masks[path][..., :1]
      weights[path] = w - LEARNING_RATE * g
    history.append((mixed, masks, dict(weights)))
  return history


def run_dps_mix(tx, params, curvature, offsets):
  """The jitted library step; per step ``(W_eff, state before, W after)``."""

  @jax.jit
  def step(params, state, offset):
    mixed = optax_sam.mixout_params(params, state)
    grads = jax.grad(lambda p: jax_loss(optax_sam.mixout_params(p, state), curvature,
                                        offset))(params)
    updates, new_state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), new_state, mixed

  state, history = tx.init(params), []
  for offset in offsets:
    before = state
    params, state, mixed = step(params, state, offset)
    history.append((mixed, before, params))
  assert step._cache_size() == 1
  return history


def _mask_of(opt_state, path):
  """The mask the coming step mixes ``path`` with, wherever the MixoutState sits."""
  is_mixout = lambda node: isinstance(node, subnetworks.MixoutState)
  (mixing,) = [n for n in jax.tree.leaves(opt_state, is_leaf=is_mixout) if is_mixout(n)]
  return np.asarray(_flatten(mixing.mask)[path])


# ------------------------------ the reference runs ------------------------------

@pytest.mark.parametrize("total_steps, update_ratio, steps, mixout_p, exclude_ratio", [
    (16, 0.125, 9, 0.3, None),  # us = 2: two cycles and a third's first step
    (8, 0.25, 5, 0.5, 0.2),  # exclude_ratio apart from mixout_p
    (100, 0.5, 52, 0.5, None),  # us = 50: the exp(−count/us) damping is on
])
def test_steps_match_the_float64_reference(total_steps, update_ratio, steps, mixout_p,
                                           exclude_ratio):
  stage = int(total_steps * update_ratio)
  params, curvature, offsets = quadratic_problem(steps)
  expected = numpy_dps_mix(params, curvature, offsets, stage=stage, mixout_p=mixout_p,
                           exclude_ratio=mixout_p if exclude_ratio is None
                           else exclude_ratio, seed=7)
  tx = optax.chain(optax_sam.dps_mix(total_steps, update_ratio, exclude_ratio=(
      mixout_p if exclude_ratio is None else exclude_ratio), mixout_p=mixout_p, seed=7,
                                     scope=PAPER),
                   optax.sgd(LEARNING_RATE))
  as_jax = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
  got = run_dps_mix(tx, as_jax(params), as_jax(curvature), [as_jax(b) for b in offsets])
  for t, ((mixed, masks, weights), (got_mixed, state, got_weights)) in enumerate(
      zip(expected, got)):
    got_mixed, got_weights = _flatten(got_mixed), _flatten(got_weights)
    for path in IN_SCOPE:
      np.testing.assert_array_equal(_mask_of(state, path), masks[path],
                                    err_msg=f"step {t} {path}")
      np.testing.assert_allclose(got_mixed[path], mixed[path], rtol=1e-5, atol=1e-5,
                                 err_msg=f"step {t} {path}")
    for path, w in weights.items():
      np.testing.assert_allclose(got_weights[path], w, rtol=1e-5, atol=1e-5,
                                 err_msg=f"step {t} {path}")
  # Stage II trained the top ceil((1 − p) n) of each matrix, not a random row draw.
  second_stage = expected[stage][1]["encoder/layer_0/dense/kernel"]
  kept = 1 - (mixout_p if exclude_ratio is None else exclude_ratio)
  assert second_stage.sum() == math.ceil(12 * kept)


def test_the_count_and_the_damping_change_the_selection():
  # Guards the us = 50 reference run above against a selection that a simpler score
  # would also give (with us = 2 the counts are too alike to tell).
  params, curvature, offsets = quadratic_problem(52)
  selected = {score: numpy_dps_mix(params, curvature, offsets, stage=50, mixout_p=0.5,
                                   exclude_ratio=0.5, seed=7, score=score)[50][1]
              for score in ("damped", "mean", "sum")}

  def differ(a, b):
    return any(not np.array_equal(selected[a][path], selected[b][path])
               for path in IN_SCOPE)

  assert differ("damped", "mean") and differ("mean", "sum")


# ------------------------------ the pieces ------------------------------

def test_mixed_weights_are_the_mixout_formula_and_keep_the_dtype():
  rng = np.random.default_rng(0)
  weights, target = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
  mask = np.broadcast_to(np.array([[True], [False], [True], [False]]), (4, 3))
  state = subnetworks.MixoutState(
      target=jnp.asarray(target, jnp.float32), mask=jnp.asarray(mask),
      p=jnp.float32(0.25), target_is_params=jnp.bool_(False), key=jax.random.PRNGKey(0))
  mixed = optax_sam.mixout_params(jnp.asarray(weights, jnp.float32), state)
  expected = ((1 - mask) * target + mask * weights - 0.25 * target) / 0.75
  np.testing.assert_allclose(mixed, expected, rtol=1e-6, atol=1e-6)
  as_bf16 = optax_sam.mixout_params(jnp.asarray(weights, jnp.bfloat16),
                                    state._replace(target=state.target.astype(jnp.bfloat16)))
  assert as_bf16.dtype == jnp.bfloat16
  at_params = optax_sam.mixout_params(jnp.asarray(weights, jnp.float32),
                                      state._replace(target_is_params=jnp.bool_(True)))
  np.testing.assert_allclose(at_params, weights, rtol=1e-6)


def test_gradient_is_the_mask_without_the_rescaling():
  rng = np.random.default_rng(1)
  weights = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  mask = jnp.broadcast_to(jnp.array([[True], [False], [True], [True]]), (4, 3))
  state = subnetworks.MixoutState(
      target=jnp.zeros((4, 3)), mask=mask, p=jnp.float32(0.5),
      target_is_params=jnp.bool_(False), key=jax.random.PRNGKey(0))
  loss = lambda w_eff: jnp.sum(jnp.sin(w_eff))
  grads = jax.grad(lambda w: loss(optax_sam.mixout_params(w, state)))(weights)
  mixed = optax_sam.mixout_params(weights, state)
  np.testing.assert_allclose(grads, mask * jnp.cos(mixed), rtol=1e-6)
  # Autodiff of the forward would scale the kept rows by 1/(1 − p) = 2.
  plain = jax.grad(lambda w: loss((mask * w) / 0.5))(weights)
  np.testing.assert_allclose(plain, 2 * grads, rtol=1e-6)


def test_masks_are_per_input_neuron_fresh_each_step_and_reproducible_from_the_seed():
  params = tree_of(jnp.zeros)
  grads = tree_of(jnp.ones)

  def masks(seed, steps=4):
    tx = optax_sam.mixout(p=0.5, seed=seed, scope=PAPER)
    state, out = tx.init(params), []
    for _ in range(steps):
      out.append({p: _mask_of(state, p) for p in IN_SCOPE})
      _, state = tx.update(grads, state, params)
    return out

  drawn = masks(seed=3)
  for step, expected in zip(drawn, reference_draws(3, 0.5, 4)):
    for path in IN_SCOPE:
      np.testing.assert_array_equal(step[path], expected[path])
      assert np.all(step[path] == step[path][:, :1])  # one draw per [in, out] row
  assert any(not np.array_equal(drawn[0][p], drawn[1][p]) for p in IN_SCOPE)
  assert all(np.array_equal(a[p], b[p]) for a, b in zip(drawn, masks(seed=3))
             for p in IN_SCOPE)
  assert any(not np.array_equal(a[p], b[p]) for a, b in zip(drawn, masks(seed=4))
             for p in IN_SCOPE)


def test_mixout_targets_the_pretrained_weights_and_leaves_the_rest_alone():
  params, curvature, offsets = quadratic_problem(3)
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  tx = optax.chain(optax_sam.mixout(p=0.6, seed=1, scope=PAPER), optax.sgd(LEARNING_RATE))
  state, current = tx.init(params), params
  for offset in offsets:
    grads = jax.grad(lambda p: jax_loss(optax_sam.mixout_params(p, state), curvature,
                                        offset))(current)
    mixed = _flatten(optax_sam.mixout_params(current, state))
    plain = _flatten(jax.grad(jax_loss)(current, curvature, offset))
    for path, w in _flatten(current).items():
      if path in IN_SCOPE:
        mask = _mask_of(state, path)
        target = np.asarray(_flatten(params)[path], np.float64)
        expected = ((1 - mask) * target + mask * np.asarray(w) - 0.6 * target) / 0.4
        np.testing.assert_allclose(mixed[path], expected, rtol=1e-5, atol=1e-5)
      else:  # out of scope: W itself, and its plain gradient
        np.testing.assert_array_equal(mixed[path], w)
        np.testing.assert_array_equal(_flatten(grads)[path], plain[path])
    updates, state = tx.update(grads, state, current)
    current = optax.apply_updates(current, updates)


def test_mixout_is_unbiased_so_evaluation_uses_the_raw_weights():
  # E[W_eff] = W over the random masks: the raw weights are what training fits on
  # average, and what the authors' layers use outside training.
  params = {"encoder": {"kernel": jnp.zeros((2, 3))}}
  trained = {"encoder": {"kernel": jnp.arange(6.0).reshape(2, 3)}}
  tx = optax_sam.mixout(p=0.7, seed=0)
  state = tx.init(params)
  mean_step = jax.jit(lambda state: (
      optax_sam.mixout_params(trained, state), tx.update(params, state, params)[1]))
  total = jnp.zeros((2, 3))
  for _ in range(4000):
    mixed, state = mean_step(state)
    total = total + mixed["encoder"]["kernel"]
  np.testing.assert_allclose(total / 4000, trained["encoder"]["kernel"], atol=0.25)


# ------------------------------ reductions ------------------------------

@pytest.mark.parametrize("make", [
    lambda: optax_sam.mixout(p=0.0),
    lambda: optax_sam.dps_mix(8, 0.25, mixout_p=0.0, exclude_ratio=0.0),
    lambda: optax_sam.dps_mix(8, 0.25, 0.0),  # mixout_p follows exclude_ratio
], ids=["mixout", "dps_mix", "dps_mix_default_p"])
def test_p_zero_is_the_base_step(make):
  params, curvature, offsets = quadratic_problem(9)
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  base = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
  with_mixing = optax.chain(make(), base)

  @jax.jit
  def mixed_step(params, state, offset):
    grads = jax.grad(lambda p: jax_loss(optax_sam.mixout_params(p, state), curvature,
                                        offset))(params)
    updates, state = with_mixing.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  @jax.jit
  def base_step(params, state, offset):
    updates, state = base.update(jax.grad(jax_loss)(params, curvature, offset), state,
                                 params)
    return optax.apply_updates(params, updates), state

  got, expected = (params, with_mixing.init(params)), (params, base.init(params))
  for offset in offsets:  # two cycles: Stage I, the selection, Stage II
    got, expected = mixed_step(*got, offset), base_step(*expected, offset)
    jax.tree.map(np.testing.assert_array_equal, got[0], expected[0])


# ------------------------------ the state ------------------------------
# (One compile and a fixed state signature, 8 devices: the generic tests of the registry
# in tests/harness.py.)

def test_mixout_params_finds_its_state_in_any_optimizer_state():
  params = tree_of(jnp.ones)
  inner = optax_sam.mixout(p=0.5)
  chained = optax.chain(optax.clip(1.0), optax.chain(inner, optax.adam(1e-3)))
  state = chained.init(params)
  by_chain = optax_sam.mixout_params(params, state)
  by_state = optax_sam.mixout_params(params, state[1][0].inner_state)
  jax.tree.map(np.testing.assert_array_equal, by_chain, by_state)
  with pytest.raises(ValueError, match="holds 0 MixoutState"):
    optax_sam.mixout_params(params, optax.adam(1e-3).init(params))
  twice = optax.chain(inner, optax_sam.dps_mix(8, 0.25))
  with pytest.raises(ValueError, match="holds 2 MixoutState"):
    optax_sam.mixout_params(params, twice.init(params))


# ------------------------------ errors ------------------------------

@pytest.mark.parametrize("make, name", [
    (lambda: optax_sam.mixout(p=1.0), "p"),
    (lambda: optax_sam.mixout(p=-0.1), "p"),
    (lambda: optax_sam.mixout(p=optax.constant_schedule(0.5)), "p"),
    (lambda: optax_sam.mixout(p=0.5, seed=1.5), "seed"),
    (lambda: optax_sam.dps_mix(0), "total_steps"),
    (lambda: optax_sam.dps_mix(100, 0.0), "update_ratio"),
    (lambda: optax_sam.dps_mix(100, 0.05, 1.0), "exclude_ratio"),
    (lambda: optax_sam.dps_mix(100, 0.05, mixout_p=1.0), "mixout_p"),
    (lambda: optax_sam.dps_mix(100, 0.05, mixout_p=optax.constant_schedule(0.3)),
     "mixout_p"),
    (lambda: optax_sam.dps_mix(10, 0.05), "update_ratio \\* total_steps"),
    (lambda: optax_sam.dps_mix(100, seed="0"), "seed"),
])
def test_invalid_hyperparameters_raise_naming_the_argument(make, name):
  with pytest.raises(ValueError, match=name):
    make()


def test_empty_scope_and_missing_params_are_errors():
  vectors = {"bias": jnp.ones(2), "scale": jnp.ones(3)}  # no matrix
  with pytest.raises(ValueError, match="^mixout: scope selects no parameter"):
    optax_sam.mixout(0.5).init(vectors)
  with pytest.raises(ValueError, match="^dps_mix: scope selects no parameter"):
    optax_sam.dps_mix(8, 0.25, scope=PAPER).init(harness.make_problem()[0])
  tx = optax_sam.dps_mix(8, 0.25)
  params = tree_of(jnp.ones)
  with pytest.raises(ValueError, match="dps_mix needs the current parameters"):
    tx.update(params, tx.init(params))


# ------------------------------ the README ------------------------------

def test_readme_mixout_snippet_trains_and_evaluates_the_raw_weights():
  readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
  snippet = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S)
                 if "mixout_params" in b)
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 6))
  batch = {"x": x, "y": jnp.argmax(x[:, :3], axis=1)}

  def per_example_loss(params, batch, key):
    del key
    hidden = jnp.tanh(batch["x"] @ params["encoder"]["dense"]["kernel"])
    logits = hidden @ params["head"]["kernel"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

  rng = np.random.default_rng(0)
  namespace = {"params": {"encoder": {"dense": {"kernel": jnp.asarray(
      rng.normal(size=(6, 8)), jnp.float32)}},
                          "head": {"kernel": jnp.zeros((8, 3))}},
               "per_example_loss": per_example_loss, "total_steps": 40}
  exec("import jax, optax, optax_sam\n" + snippet, namespace)  # pylint: disable=exec-used
  params, state = namespace["params"], namespace["state"]
  before = per_example_loss(params, batch, None).mean()
  for step in range(40):
    params, state = namespace["train_step"](params, state, batch, jax.random.PRNGKey(step))
  after = namespace["evaluate"](params, batch)
  assert np.isfinite(float(after)) and float(after) < float(before)
