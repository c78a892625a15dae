"""DPS-Dense against a NumPy simulation of the authors' stage logic, and its variants."""

from __future__ import annotations

import math

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


def _flatten(tree):
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(path_string(p), x) for p, x in flat]


def tree_of(make):
  return jax.tree.map(make, SHAPES, is_leaf=lambda s: isinstance(s, tuple))


def gradient_sequence(steps, seed=0):
  """Gradients whose large entries move between cycles, so a stale G would show."""
  rng = np.random.default_rng(seed)
  out = []
  for t in range(steps):
    def draw(shape, t=t):
      g = rng.normal(size=shape)
      if len(shape) == 2:  # boost one column per cycle of 4 steps
        g[:, (t // 4) % shape[1]] *= 4.0
      return jnp.asarray(g, jnp.float32)
    out.append(tree_of(draw))
  return out


def numpy_dps(gradients, stage, exclude_ratio, in_scope):
  """The DPSDense schedule, per leaf: returns the masked gradients of every step."""
  outputs = []
  accumulated, masks = {}, {}
  for t, grads in enumerate(gradients):
    out = {}
    for path, g in _flatten(grads):
      g = np.asarray(g, np.float64)
      if path not in in_scope:
        out[path] = g
        continue
      position = t % (2 * stage)
      if position < stage:  # Stage I: pass through, accumulate (reset at cycle start)
        accumulated[path] = (0 if position == 0 else accumulated[path]) + g ** 2
        out[path] = g
      else:
        if position == stage:  # first step of Stage II: top ceil((1-p) n) of G
          scores = accumulated[path].ravel()
          keep = math.ceil(scores.size * (1 - exclude_ratio))
          threshold = np.sort(scores)[::-1][keep - 1]
          masks[path] = accumulated[path] >= threshold
        out[path] = g * masks[path]
    outputs.append(out)
  return outputs


# ------------------------------ the two-stage cycle ------------------------------

@pytest.mark.parametrize("exclude_ratio", [0.3, 0.5])
def test_two_cycles_match_the_numpy_schedule(exclude_ratio):
  total_steps, update_ratio = 20, 0.1  # us = int(0.1 * 20) = 2: cycles of 4 steps
  gradients = gradient_sequence(10)
  expected = numpy_dps(gradients, 2, exclude_ratio, IN_SCOPE)
  tx = optax_sam.dps(total_steps, update_ratio, exclude_ratio, scope=PAPER)
  params = tree_of(jnp.zeros)
  step = jax.jit(tx.update)
  state = tx.init(params)
  masks_by_cycle = []
  for t, grads in enumerate(gradients):
    updates, state = step(grads, state, params)
    got = dict(_flatten(updates))
    for path, value in expected[t].items():
      np.testing.assert_allclose(got[path], value, rtol=0, atol=0, err_msg=f"step {t} {path}")
    kernel = np.asarray(got["encoder/layer_0/dense/kernel"])
    if t % 4 < 2:  # Stage I: nothing masked
      assert np.all(kernel != 0)
    else:  # Stage II, from its first step: ceil((1 - p) * 12) entries kept
      assert np.sum(kernel != 0) == math.ceil(12 * (1 - exclude_ratio))
      if t % 4 == 2:
        masks_by_cycle.append(kernel != 0)
  # The second cycle chose afresh from its own Stage I (G was reset).
  assert not np.array_equal(masks_by_cycle[0], masks_by_cycle[1])


def test_state_mask_is_all_true_in_stage_one_and_the_selection_in_stage_two():
  tx = optax_sam.dps(8, 0.25, 0.5, scope=PAPER)  # us = 2
  params = tree_of(jnp.zeros)
  state = tx.init(params)
  for t, grads in enumerate(gradient_sequence(6)):
    updates, state = tx.update(grads, state, params)
    mask = np.asarray(state.inner_state.mask["encoder"]["pooler"]["kernel"])
    assert mask.all() == (t % 4 < 2)
    assert int(state.inner_state.count) == t + 1
    assert isinstance(state.inner_state.mask["classifier"]["kernel"], optax.MaskedNode)


def test_ties_at_the_threshold_are_kept():
  scores = jnp.array([[3.0, 1.0], [1.0, 0.5]])
  np.testing.assert_array_equal(subnetworks.per_matrix_topk_mask(scores, 0.5),
                                [[True, True], [True, False]])  # keep 2, but 1.0 twice


# ----------------------------------- reductions -----------------------------------

def test_exclude_ratio_zero_is_the_base_optimizer():
  gradients = gradient_sequence(8)
  base = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
  with_dps = optax.chain(optax_sam.dps(8, 0.25, 0.0), base)
  params = tree_of(lambda s: jnp.ones(s))
  states = with_dps.init(params), base.init(params)
  dps_update, base_update = jax.jit(with_dps.update), jax.jit(base.update)
  for grads in gradients:
    got, s0 = dps_update(grads, states[0], params)
    expected, s1 = base_update(grads, states[1], params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), got, expected)
    states = s0, s1


def test_gradient_mask_does_not_freeze_but_dps_frozen_does():
  gradients = gradient_sequence(4)
  make = lambda: optax.adamw(0.1, weight_decay=0.1)
  unfrozen = optax.chain(optax_sam.dps(8, 0.25, 0.5, scope=PAPER), make())
  frozen = optax_sam.dps_frozen(make(), 8, 0.25, 0.5, scope=PAPER)
  params = tree_of(lambda s: jnp.ones(s))
  s_unfrozen, s_frozen = unfrozen.init(params), frozen.init(params)
  for t, grads in enumerate(gradients):
    u_unfrozen, s_unfrozen = unfrozen.update(grads, s_unfrozen, params)
    u_frozen, s_frozen = frozen.update(grads, s_frozen, params)
    kernel = lambda u: np.asarray(u["encoder"]["layer_0"]["dense"]["kernel"])
    if t < 2:  # Stage I: identical, everything moves
      np.testing.assert_array_equal(kernel(u_frozen), kernel(u_unfrozen))
      assert np.all(kernel(u_frozen) != 0)
    else:  # Stage II: unselected entries still move under plain DPS, not when frozen
      selected = np.asarray(s_frozen.dps.inner_state.mask["encoder"]["layer_0"]["dense"]
                            ["kernel"])
      assert 0 < selected.sum() < selected.size
      assert np.all(kernel(u_frozen)[~selected] == 0)
      assert np.all(kernel(u_unfrozen)[~selected] != 0)  # momentum and weight decay
      np.testing.assert_array_equal(kernel(u_frozen)[selected], kernel(u_unfrozen)[selected])
    # Out of scope is never frozen.
    assert np.all(np.asarray(u_frozen["classifier"]["kernel"]) != 0)


def test_nan_in_an_unselected_entry_still_reaches_a_finiteness_guard():
  tx = optax.chain(optax_sam.dps(8, 0.25, 0.5),
                   optax.apply_if_finite(optax.adamw(0.1), max_consecutive_errors=3))
  params = tree_of(lambda s: jnp.ones(s))
  state = tx.init(params)
  gradients = gradient_sequence(3)
  for grads in gradients[:2]:  # Stage I
    _, state = tx.update(grads, state, params)
  selected = np.asarray(optax_sam.dps(8, 0.25, 0.5).update(
      gradients[2], state[0], params)[1].inner_state.mask["encoder"]["pooler"]["kernel"])
  row, col = np.argwhere(~selected)[0]
  kernel = gradients[2]["encoder"]["pooler"]["kernel"]
  bad = jax.tree.map(lambda g: g, gradients[2])
  bad["encoder"]["pooler"]["kernel"] = kernel.at[row, col].set(jnp.nan)
  updates, state = tx.update(bad, state, params)
  assert int(state[1].total_notfinite) == 1
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))


# ------------------------------------- scope -------------------------------------

def test_paper_scope_is_encoder_and_pooler_kernels():
  params = {"bert": {"embeddings": {"word_embeddings": {"embedding": jnp.ones((5, 4))}},
                     "encoder": {"layer": {"0": {
                         "attention": {"self": {"query": {"kernel": jnp.ones((4, 4)),
                                                          "bias": jnp.ones(4)}}},
                         "output": {"LayerNorm": {"scale": jnp.ones(4)},
                                    "dense": {"kernel": jnp.ones((4, 4))}}}}},
                     "pooler": {"dense": {"kernel": jnp.ones((4, 4))}}},
            "classifier": {"kernel": jnp.ones((4, 2))}}
  chosen = sorted(p for p, x in _flatten(params)
                  if subnetworks.encoder_dense_kernels(p, x))
  assert chosen == ["bert/encoder/layer/0/attention/self/query/kernel",
                    "bert/encoder/layer/0/output/dense/kernel",
                    "bert/pooler/dense/kernel"]


@pytest.mark.parametrize("as_pytree", [False, True])
def test_scope_can_be_overridden(as_pytree):
  only_classifier = (lambda path, leaf: path == "classifier/kernel")
  if as_pytree:
    only_classifier = tree_of(lambda s: False)
    only_classifier["classifier"]["kernel"] = True
  tx = optax_sam.dps(8, 0.25, 0.5, scope=only_classifier)
  params = tree_of(jnp.zeros)
  state = tx.init(params)
  for grads in gradient_sequence(3):
    updates, state = tx.update(grads, state, params)
  assert np.sum(np.asarray(updates["classifier"]["kernel"]) == 0) == 3  # 6 - ceil(3)
  np.testing.assert_array_equal(updates["encoder"]["pooler"]["kernel"],
                                grads["encoder"]["pooler"]["kernel"])


def test_default_scope_is_every_matrix():
  params = tree_of(jnp.zeros)
  chosen = [p for p, x in _flatten(params) if subnetworks.all_matrices(p, x)]
  assert sorted(chosen) == ["classifier/kernel", *IN_SCOPE]
  # dps masks the classifier too by default: its state holds a mask for it.
  state = optax_sam.dps(8, 0.25, 0.5).init(params)
  assert not isinstance(state.inner_state.mask["classifier"]["kernel"], optax.MaskedNode)
  assert isinstance(state.inner_state.mask["classifier"]["bias"], optax.MaskedNode)


def test_default_scope_counts_embeddings():
  params = {"embeddings": {"word": {"embedding": jnp.ones((5, 4))}},
            "dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)},
            "LayerNorm": {"scale": jnp.ones(4)}}
  chosen = sorted(p for p, x in _flatten(params) if subnetworks.all_matrices(p, x))
  assert chosen == ["dense/kernel", "embeddings/word/embedding"]


VECTORS = {"bias": jnp.ones(2), "scale": jnp.ones(3)}


@pytest.mark.parametrize("build, name, params", [
    (lambda: optax_sam.dps(100), "dps", VECTORS),
    (lambda: optax_sam.dps_frozen(optax.sgd(0.1), 100), "dps_frozen", VECTORS),
    # Matrices, but none under an encoder.
    (lambda: optax_sam.dps(100, scope=PAPER), "dps", harness.make_problem()[0]),
], ids=["default", "dps_frozen", "paper"])
def test_empty_scope_is_an_error_naming_the_method(build, name, params):
  with pytest.raises(ValueError, match=f"^{name}: scope selects no parameter"):
    build().init(params)


# ------------------------------------ errors ------------------------------------

@pytest.mark.parametrize("args, kwargs, name", [
    ((0,), {}, "total_steps"), ((10.5,), {}, "total_steps"),
    ((100, 0.0), {}, "update_ratio"), ((100, 1.5), {}, "update_ratio"),
    ((100, 0.05, 1.0), {}, "exclude_ratio"), ((100, 0.05, -0.1), {}, "exclude_ratio"),
    ((100, 0.05, optax.constant_schedule(0.3)), {}, "exclude_ratio"),
    ((10, 0.05), {}, "update_ratio \\* total_steps"),
])
def test_invalid_hyperparameters_raise_naming_the_argument(args, kwargs, name):
  with pytest.raises(ValueError, match=name):
    optax_sam.dps(*args, **kwargs)


# ------------------------ composition, jit and 8 devices ------------------------

def _toy_encoder_problem(batch_size=8):
  """Softmax regression whose weights sit under an ``encoder`` path."""
  params, batch = harness.make_problem(batch=batch_size)
  nested = {"encoder": {"dense": {"kernel": params["kernel"]}},
            "head": {"bias": params["bias"]}}

  def example_loss(p, example):
    flat = {"kernel": p["encoder"]["dense"]["kernel"], "bias": p["head"]["bias"]}
    return harness.example_loss(flat, example)

  return nested, batch, example_loss


def test_fsam_then_dps_then_adamw_equals_the_pieces_run_by_hand():
  params, batch, example_loss = _toy_encoder_problem()
  loss_fn = optax_sam.PerExampleLoss(example_loss, batch)
  fsam = optax_sam.fsam(0.1, keep_ratio=0.5, mask_every=2, fisher_samples=4)
  dps = optax_sam.dps(8, 0.25, 0.5)
  adamw = optax.adamw(1e-2, weight_decay=0.1)
  chained = optax.chain(fsam, dps, adamw)

  @jax.jit
  def step(params, state):
    grads = jax.grad(lambda p: loss_fn(p).mean())(params)
    updates, state = chained.update(grads, state, params, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), state

  @jax.jit
  def step_by_hand(p, s_fsam, s_dps, s_adamw):
    grads = jax.grad(lambda q: loss_fn(q).mean())(p)
    u, s_fsam = fsam.update(grads, s_fsam, p, loss_fn=loss_fn)
    u, s_dps = dps.update(u, s_dps, p)
    u, s_adamw = adamw.update(u, s_adamw, p)
    return [optax.apply_updates(p, u), s_fsam, s_dps, s_adamw]

  by_hand = [params, fsam.init(params), dps.init(params), adamw.init(params)]
  state = chained.init(params)
  for t in range(4):
    by_hand = step_by_hand(*by_hand)
    params, state = step(params, state)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 params, by_hand[0])
    if t >= 2:  # Stage II: DPS masked half of the SAM gradient before AdamW
      assert not np.asarray(state[1].inner_state.mask["encoder"]["dense"]["kernel"]).all()
  assert step._cache_size() == 1
