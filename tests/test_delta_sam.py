"""δ-SAM against a float64 NumPy reference written from METHODS.md, and its reductions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sam
from optax_sam.perturbations import reweighting
from tests import harness

RHO, ETA, SEED = 0.5, 1e-4, 7


def redrawn_direction(key, params, rho):
  """``r`` as documented: leaf i from ``split(key, num_leaves)[i]``, scaled in float64."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  normal = [np.asarray(jax.random.normal(k, x.shape, jnp.float32), np.float64)
            for k, x in zip(keys, leaves)]
  norm = np.sqrt(sum(np.sum(n ** 2) for n in normal))
  return jax.tree.unflatten(treedef, [n * rho / norm for n in normal])


def direction_keys(seed, steps):
  """The direction key of each step: ``key, direction_key = split(key)``, from PRNGKey."""
  key, out = jax.random.PRNGKey(seed), []
  for _ in range(steps):
    key, direction_key = jax.random.split(key)
    out.append(direction_key)
  return out


def numpy_delta_sam(params, batch, direction, rho, eta, mask=None):
  """Steps 2-5 of METHODS.md in float64: returns (weights, epsilon, descent gradient)."""
  p = harness.to_numpy(params)
  mask = np.ones(len(batch["y"])) if mask is None else np.asarray(mask, np.float64)
  moved = lambda sign: {k: p[k] + sign * direction[k] for k in p}
  loss0 = harness.numpy_example_losses(p, batch)
  loss_plus = harness.numpy_example_losses(moved(1.0), batch)
  loss_minus = harness.numpy_example_losses(moved(-1.0), batch)
  weights = (np.abs(loss_plus + loss_minus - 2 * loss0)
             / np.maximum(np.abs(loss_plus - loss_minus), eta)) * mask
  grads = harness.numpy_example_grads(p, batch)
  reweighted = {k: sum(a * g[k] for a, g in zip(weights, grads)) for k in p}
  norm = harness.numpy_norm(reweighted)
  epsilon = {k: rho * reweighted[k] / norm for k in p}
  descent = harness.numpy_mean_grad({k: p[k] + epsilon[k] for k in p}, batch, mask)
  return weights, epsilon, descent


def assert_close_in_norm(actual, expected, rtol=1e-5):
  """Every entry within ``rtol · ‖expected‖`` (global norm), plus a tight entrywise check.

  δ-SAM's weights are second differences of float32 losses near 1, so float32 and
  float64 agree to a few 1e-6 of the perturbation's size, not of each entry.
  """
  actual = harness.to_numpy(actual)
  scale = harness.numpy_norm(expected)
  for key in expected:
    np.testing.assert_allclose(actual[key], expected[key], rtol=1e-3, atol=rtol * scale,
                               err_msg=f"leaf {key!r}")


def jitted_updater(tx, loss_fn, **extra):
  """``(params, state) -> tx.update(clean gradient, state, params, loss_fn=...)``, jitted."""
  @jax.jit
  def update(params, state):
    grads = harness.clean_grads(loss_fn, params)
    return tx.update(grads, state, params, loss_fn=loss_fn, **extra)
  return update


def jitted_update(tx, params, loss_fn, state=None, **extra):
  state = tx.init(params) if state is None else state
  return jitted_updater(tx, loss_fn, **extra)(params, state)


# ------------------------------- one step, two steps -------------------------------

@pytest.mark.parametrize("fast_path", [False, True])
def test_two_steps_match_numpy_reference(fast_path):
  params, batch = harness.make_problem()
  loss_fn = (harness.per_example_loss_fn if fast_path else harness.batch_loss_fn)(batch)
  piece = reweighting.reweighted_ascent(RHO, ETA, SEED)
  method = optax_sam.delta_sam(RHO, ETA, seed=SEED)
  piece_state, method_state = piece.init(params), method.init(params)
  piece_update, method_update = jitted_updater(piece, loss_fn), jitted_updater(method, loss_fn)
  for step, key in enumerate(direction_keys(SEED, 2)):
    direction = redrawn_direction(key, params, RHO)
    _, epsilon_ref, descent_ref = numpy_delta_sam(params, batch, direction, RHO, ETA)
    epsilon, piece_state = piece_update(params, piece_state)
    assert_close_in_norm(epsilon, epsilon_ref)
    descent, method_state = method_update(params, method_state)
    assert_close_in_norm(descent, descent_ref)
    assert int(piece_state.count) == step + 1
    # Move, so the second step sees new parameters as well as a new direction.
    params = jax.tree.map(lambda w, d: w - 0.3 * d, params, descent)


def test_weights_match_numpy_and_ignore_padding():
  params, batch = harness.make_problem()
  key = direction_keys(SEED, 1)[0]
  direction = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32),
                           redrawn_direction(key, params, RHO))
  losses = lambda p: harness.batch_loss_fn(batch)(p)
  moved = lambda sign: jax.tree.map(lambda w, r: w + sign * r, params, direction)
  mask = jnp.array([1, 1, 0, 1, 1, 1, 0, 1], jnp.float32)
  weights = reweighting.sharpness_weights(losses(params), losses(moved(1.0)),
                                          losses(moved(-1.0)), ETA, mask)
  expected, _, _ = numpy_delta_sam(params, batch, redrawn_direction(key, params, RHO),
                                   RHO, ETA, mask)
  # Second differences of float32 losses: absolute error ~1e-6 on weights of order 0.1.
  np.testing.assert_allclose(weights, expected, rtol=1e-4, atol=3e-5 * expected.max())
  assert np.all(np.asarray(weights)[[2, 6]] == 0) and np.all(expected[[0, 1, 3]] > 0)
  # The weights are not uniform here, so δ-SAM is not SAM on this batch.
  assert np.std(expected[expected > 0]) > 0.1 * np.mean(expected[expected > 0])


def test_example_mask_matches_numpy_reference():
  params, batch = harness.make_problem()
  mask = jnp.array([1, 0, 1, 1, 0, 1, 1, 1], jnp.float32)
  direction = redrawn_direction(direction_keys(SEED, 1)[0], params, RHO)
  _, _, descent_ref = numpy_delta_sam(params, batch, direction, RHO, ETA, mask)
  tx = optax_sam.delta_sam(RHO, ETA, seed=SEED)
  descent, _ = jitted_update(tx, params, harness.batch_loss_fn(batch), example_mask=mask)
  assert_close_in_norm(descent, descent_ref)
  # Padding matters: the unmasked step differs.
  _, _, unmasked = numpy_delta_sam(params, batch, direction, RHO, ETA)
  assert max(np.max(np.abs(descent_ref[k] - unmasked[k])) for k in unmasked) > 1e-3


def test_seed_changes_the_direction_and_is_reproducible():
  params, batch = harness.make_problem()
  loss_fn = harness.batch_loss_fn(batch)
  run = lambda seed: jitted_update(reweighting.reweighted_ascent(RHO, ETA, seed), params,
                                   loss_fn)[0]
  np.testing.assert_array_equal(run(3)["kernel"], run(3)["kernel"])
  assert np.max(np.abs(run(3)["kernel"] - run(4)["kernel"])) > 1e-4


# ----------------------------------- reductions -----------------------------------

def test_identical_examples_reduce_to_sam():
  params, batch = harness.make_problem()
  same = jax.tree.map(lambda x: jnp.repeat(x[:1], len(x), axis=0), batch)
  loss_fn = harness.batch_loss_fn(same)
  for rho in (0.05, 0.5):
    delta = optax.chain(optax_sam.delta_sam(rho, seed=SEED), optax.sgd(0.1))
    sam = optax.chain(optax_sam.sam(rho), optax.sgd(0.1))
    got, _ = jitted_update(delta, params, loss_fn)
    expected, _ = jitted_update(sam, params, loss_fn)
    harness.assert_tree_close(got, harness.to_numpy(expected), rtol=1e-5, atol=1e-7)
  # Not trivially: on the original (distinct) batch the two differ.
  got, _ = jitted_update(optax_sam.delta_sam(0.5, seed=SEED), params,
                         harness.batch_loss_fn(batch))
  expected, _ = jitted_update(optax_sam.sam(0.5), params, harness.batch_loss_fn(batch))
  assert np.max(np.abs(np.asarray(got["kernel"]) - np.asarray(expected["kernel"]))) > 1e-4


def test_rho_schedule_starting_at_zero_gives_the_clean_gradient():
  params, batch = harness.make_problem()
  loss_fn = harness.batch_loss_fn(batch)
  tx = optax_sam.delta_sam(optax.linear_schedule(0.0, 0.5, 4), seed=SEED)
  update = jitted_updater(tx, loss_fn)
  descent, state = update(params, tx.init(params))
  harness.assert_tree_close(descent, harness.to_numpy(harness.clean_grads(loss_fn, params)))
  second, _ = update(params, state)
  assert np.max(np.abs(np.asarray(second["kernel"] - descent["kernel"]))) > 1e-5


# --------------------------------- errors -----------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    (dict(rho=-0.1), "rho"), (dict(eta=0.0), "eta"), (dict(eta=-1.0), "eta"),
    (dict(eps=0.0), "eps"), (dict(seed=1.5), "seed"), (dict(seed=True), "seed"),
])
def test_invalid_hyperparameters_raise_naming_the_argument(kwargs, name):
  with pytest.raises(ValueError, match=name):
    optax_sam.delta_sam(**kwargs)


def test_scalar_loss_is_rejected_with_a_per_example_message():
  params, batch = harness.make_problem()
  tx = optax_sam.delta_sam()
  scalar = lambda p: harness.batch_loss_fn(batch)(p).mean()
  with pytest.raises(ValueError, match="per-example losses") as raised:
    tx.update(harness.clean_grads(harness.batch_loss_fn(batch), params), tx.init(params),
              params, loss_fn=scalar)
  # The piece that raised names itself; the method adds its name as a note.
  assert str(raised.value).startswith("reweighted_ascent needs per-example losses")
  assert "delta_sam" in "".join(raised.value.__notes__)


# ----------------------------------- the key ------------------------------------
# (One compile, a fixed state signature and 8 devices: the generic tests of the
# registry in tests/harness.py.)

def test_the_key_advances_every_step():
  params, batch = harness.make_problem()
  tx = optax_sam.delta_sam(0.05, seed=SEED)
  update = jitted_updater(tx, harness.batch_loss_fn(batch))
  state, keys = tx.init(params), []
  for _ in range(2):
    _, state = update(params, state)
    keys.append(np.asarray(state.perturbation_state.key))
  np.testing.assert_array_equal(keys[0], jax.random.split(jax.random.PRNGKey(SEED))[0])
  assert not np.array_equal(keys[0], keys[1])


# ------------------------- no pass computed for nothing -------------------------

def _mlp_problem():
  rng = np.random.default_rng(0)
  params = {"w1": jnp.asarray(rng.normal(size=(64, 256)) / 8, jnp.float32),
            "w2": jnp.asarray(rng.normal(size=(256, 4)) / 16, jnp.float32)}
  batch = {"x": jnp.asarray(rng.normal(size=(32, 64)), jnp.float32),
           "y": jnp.asarray(rng.integers(0, 4, size=32), jnp.int32)}

  def loss_fn(p):
    logits = jnp.tanh(batch["x"] @ p["w1"]) @ p["w2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

  return params, loss_fn


def compiled_flops(tx, params, loss_fn, clean_gradient: str) -> float:
  """FLOPs of a jitted step: ``"plain"`` hands ``tx`` the clean gradient, ``"zeros"``
  hands it zeros and runs the forward pass only (the GLUE example's old special case)."""

  def step(params, state):
    mean_loss = lambda p: jnp.mean(loss_fn(p))
    if clean_gradient == "plain":
      loss, grads = jax.value_and_grad(mean_loss)(params)
    else:
      loss, grads = mean_loss(params), jax.tree.map(jnp.zeros_like, params)
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), state, loss

  analysis = jax.jit(step).lower(params, tx.init(params)).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per computation
    analysis = analysis[0]
  return float(analysis["flops"])


# δ-SAM as it was: the same perturbation, with the mechanism reading the clean gradient.
def _delta_sam_reading_the_clean_gradient():
  return optax_sam.sharpness_aware(reweighting.reweighted_ascent(RHO),
                                   reads_clean_gradient=True)


@pytest.mark.parametrize("factory, reading", [
    (lambda: optax_sam.delta_sam(RHO), _delta_sam_reading_the_clean_gradient),
    (lambda: optax_sam.per_instance_sam(RHO, chunk_size=8), None),
], ids=["delta_sam", "per_instance_sam"])
def test_the_callers_clean_backward_pass_compiles_away(factory, reading):
  """δ-SAM and per-instance SAM do not read the clean gradient's values, so called the
  plain way their compiled step costs what it costs when handed zeros; read (as the
  finiteness guard once did), the values cost a whole backward pass more."""
  params, loss_fn = _mlp_problem()
  flops = lambda tx, how: compiled_flops(optax.chain(tx, optax.adamw(1e-3)), params,
                                         loss_fn, how)
  plain, zeros = flops(factory(), "plain"), flops(factory(), "zeros")
  backward = flops(optax.identity(), "plain") - flops(optax.identity(), "zeros")
  assert backward > 0 and plain - zeros < 0.01 * backward, (plain, zeros, backward)
  line = f"FLOPs: plain API {plain:.4g}, handed zeros {zeros:.4g}, a backward {backward:.4g}"
  if reading is not None:
    reads = flops(reading(), "plain")
    assert reads >= plain + 0.9 * backward, (reads, plain, backward)
    line += f", reading the clean gradient {reads:.4g}"
  print(line)
