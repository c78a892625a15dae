"""Every method composes with the rest of Optax, compiles once and keeps its numerics.

The generic tests run over the registry of ``tests/harness.py`` (``harness.METHODS``),
filtered by capability where a test applies to some methods only. Compiling is most of
the cost here, so the jitted reference step (``plain_step``) takes the method's live
hyperparameter (ρ, Child-Tuning_F's p_keep) as a traced argument and is shared by the
tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sam
from optax_sam import perturbations
from tests import harness

EVERY_METHOD = harness.each_method()
SCHEDULABLE = harness.each_method(lambda m: m.live is not None)
LR = 0.1
BY_ID = {m.id: m for m in harness.METHODS}


def problem(method):
  params, batch = harness.make_problem()
  return params, batch, method.loss_fn(batch)


@functools.cache
def plain_step(method):
  """Jitted ``chain(method(value), sgd(LR)).update``. The live hyperparameter is traced,
  so one compile serves every value (a float and the same value as an array give the
  same step)."""

  def step(value, grads, state, params, batch):
    tx = optax.chain(method.with_live(value), optax.sgd(LR))
    return tx.update(grads, state, params, loss_fn=method.loss_fn(batch))

  return jax.jit(step)


def plain_init(method, params):
  return optax.chain(method.with_live(0.05), optax.sgd(LR)).init(params)


def jit_update(tx, loss_fn):
  return jax.jit(lambda g, s, p: tx.update(g, s, p, loss_fn=loss_fn))


def assert_trees_close(actual, expected, rtol=1e-6, atol=1e-7):
  harness.assert_trees_close(actual, expected, rtol, atol)


def assert_trees_differ(a, b, atol=1e-5):
  assert harness.max_abs_diff(a, b) > atol, "the trees agree"


def all_zero(tree):
  return all(not np.any(np.asarray(x)) for x in jax.tree.leaves(tree))


def tree_finite(tree):
  return all(np.all(np.isfinite(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree))


# --------------------------- optax.inject_hyperparams ---------------------------

@pytest.mark.parametrize("method", EVERY_METHOD)
def test_inject_hyperparams_matches_plain_and_the_hyperparameter_is_live(method):
  params, batch, loss_fn = problem(method)
  grads = harness.clean_grads(loss_fn, params)
  tx = optax.chain(method.injected(0.05), optax.sgd(LR))
  state = tx.init(params)
  if method.live:
    assert float(state[0].hyperparams[method.live]) == pytest.approx(0.05)

  def plain(value):
    return plain_step(method)(value, grads, plain_init(method, params), params, batch)[0]

  step = jit_update(tx, loss_fn)
  updates, new_state = step(grads, state, params)
  assert_trees_close(updates, plain(0.05))
  assert int(new_state[0].count) == 1  # the wrapper's state advanced
  if not method.live:
    return
  # Changing the injected value in the state changes the step, to the plain one at 0.4.
  state[0].hyperparams[method.live] = jnp.asarray(0.4, jnp.float32)
  updates_04, _ = step(grads, state, params)
  assert_trees_close(updates_04, plain(0.4))
  assert_trees_differ(updates_04, updates)


# ------------------- one compile, a fixed state signature, schedules -------------------

@pytest.mark.parametrize("method", EVERY_METHOD)
def test_jit_compiles_once_with_fixed_state_signature(method):
  """Five whole training steps (clean gradient, method, AdamW, apply_updates): through
  FSAM's refreshes and a whole DPS cycle (stages of two steps) into the next."""
  params, batch = harness.make_problem()
  tx = method.optimizer(optax.adamw(1e-2))
  traces = []
  step = harness.jitted_step(tx, method.loss_fn, traces, method.params_transform)
  state = tx.init(params)
  signature = harness.signature(state)
  for _ in range(5):
    params, state = step(params, state, batch)
    assert harness.signature(state) == signature
  assert len(traces) == 1 and step._cache_size() == 1
  assert tree_finite(params)


@pytest.mark.parametrize("method", SCHEDULABLE)
def test_schedule_gives_the_constant_steps_without_recompiling(method):
  params, batch, loss_fn = problem(method)
  schedule = optax.linear_schedule(0.02, 0.3, transition_steps=3)
  tx = optax.chain(method.with_live(schedule), optax.sgd(LR))
  traces = []

  @jax.jit
  def step(grads, state, params):
    traces.append(1)
    return tx.update(grads, state, params, loss_fn=loss_fn)

  const = plain_step(method)
  state = tx.init(params)
  signatures = [harness.signature(state)]
  for k in range(3):
    grads = harness.clean_grads(loss_fn, params)
    updates, new_state = step(grads, state, params)
    # The constant method, fed the same state, reproduces step k with schedule(k), and
    # not with the next value.
    expected, expected_state = const(float(schedule(k)), grads, state, params, batch)
    assert_trees_close(updates, expected)
    assert_trees_close(new_state, expected_state)
    if k % method.perturb_every == 0:  # amortised: the steps between do not read rho
      assert_trees_differ(updates,
                          const(float(schedule(k + 1)), grads, state, params, batch)[0])
    params, state = optax.apply_updates(params, updates), new_state
    signatures.append(harness.signature(state))
  # Three steps, one trace and one executable; the state keeps its shapes and dtypes.
  assert len(traces) == 1
  assert step._cache_size() == 1
  assert all(s == signatures[0] for s in signatures)


# ----------------------------- unknown extra kwargs -----------------------------

@pytest.mark.parametrize("method", EVERY_METHOD)
def test_unknown_extra_kwargs_are_ignored(method):
  """Alone, and in a chain with adamw (the chain hands every extra argument to each)."""
  params, batch, loss_fn = problem(method)
  grads = harness.clean_grads(loss_fn, params)
  extra = dict(foo=1, dropout_key=jax.random.key(0))
  tx = method.with_live(0.05)
  descent, _ = tx.update(grads, tx.init(params), params, loss_fn=loss_fn, **extra)
  expected, _ = plain_step(method)(0.05, grads, plain_init(method, params), params, batch)
  assert_trees_close(jax.tree.map(lambda d: -LR * d, descent), expected)

  chained = optax.chain(method.with_live(0.05), optax.adamw(1e-2, weight_decay=0.1))
  updates, _ = chained.update(grads, chained.init(params), params, loss_fn=loss_fn, **extra)
  # adamw's first step on the descent gradient d: -lr (d / (|d| + 1e-8) + wd · w).
  adam = harness.numpy_adam_first_step(harness.to_numpy(descent), 1e-2)
  weights = harness.to_numpy(params)
  harness.assert_tree_close(updates, {k: adam[k] - 1e-2 * 0.1 * weights[k] for k in adam},
                            rtol=1e-5, atol=1e-7)


# ---------------------------------- finiteness ----------------------------------

@pytest.mark.parametrize("method", EVERY_METHOD)
def test_apply_if_finite_rejects_nan_gradient_then_proceeds(method):
  params, batch, loss_fn = problem(method)
  tx = optax.apply_if_finite(optax.chain(method.with_live(0.05), optax.sgd(LR)),
                             max_consecutive_errors=2)
  grads = harness.clean_grads(loss_fn, params)
  nan_grads = {**grads, "kernel": grads["kernel"].at[1, 2].set(jnp.nan)}

  @jax.jit
  def run(grads, nan_grads, params):
    state0 = tx.init(params)
    rejected = tx.update(nan_grads, state0, params, loss_fn=loss_fn)
    return state0, rejected, tx.update(grads, rejected[1], params, loss_fn=loss_fn)

  state0, (updates, state), (updates2, state2) = run(grads, nan_grads, params)
  assert_trees_close(optax.apply_updates(params, updates), params, rtol=0, atol=0)
  assert int(state.notfinite_count) == 1 and int(state.total_notfinite) == 1
  assert not bool(state.last_finite)
  assert_trees_close(state.inner_state, state0.inner_state, rtol=0, atol=0)
  # The finite step proceeds from the untouched inner state: the plain first step.
  assert int(state2.notfinite_count) == 0 and int(state2.total_notfinite) == 1
  assert bool(state2.last_finite)
  expected, _ = plain_step(method)(0.05, grads, plain_init(method, params), params, batch)
  assert_trees_close(updates2, expected)
  assert not all_zero(updates2)


@pytest.mark.parametrize("method", EVERY_METHOD)
def test_nonfinite_clean_gradient_stays_nonfinite(method):
  """An infinite clean gradient with a finite loss (a loss-scaling overflow, say) leaves
  the method's output non-finite, so a guard placed after it (around the base optimizer
  only) still rejects the step instead of applying the plain gradient at ``w``."""
  params, _, loss_fn = problem(method)
  grads = harness.clean_grads(loss_fn, params)
  bad_grads = {**grads, "bias": grads["bias"].at[0].set(jnp.inf)}
  tx = method.with_live(0.05)
  descent, _ = tx.update(bad_grads, tx.init(params), params, loss_fn=loss_fn)
  # δ-SAM and per-instance SAM never read the clean gradient (so that XLA can drop
  # the pass that made it): their finiteness is that of what they compute.
  assert tree_finite(descent) == (not method.reads_clean_gradient)
  descent, _ = tx.update(grads, tx.init(params), params, loss_fn=loss_fn)  # control
  assert tree_finite(descent)


@pytest.mark.parametrize("method", harness.each_method(lambda m: m.sharpness_aware))
def test_nonfinite_gradients_of_the_loss_make_a_nonfinite_step(method):
  """A loss whose gradients overflow while its values stay finite: every method's
  output is non-finite, whether it reads the clean gradient or computes its own."""

  @jax.custom_jvp
  def overflowing(x):
    return x

  @overflowing.defjvp
  def _(primals, tangents):
    return primals[0], tangents[0] * jnp.inf

  params, batch = harness.make_problem()
  poisoned = method.loss_fn(batch)
  if isinstance(poisoned, optax_sam.PerExampleLoss):
    poisoned = optax_sam.PerExampleLoss(
        lambda p, ex: harness.example_loss(jax.tree.map(overflowing, p), ex), batch)
  else:
    poisoned = harness.batch_loss_fn(batch)
    poisoned = (lambda f: lambda p: f(jax.tree.map(overflowing, p)))(poisoned)
  grads = harness.clean_grads(poisoned, params)
  assert not tree_finite(grads)
  tx = method.with_live(0.05)
  descent, _ = tx.update(grads, tx.init(params), params, loss_fn=poisoned)
  assert not tree_finite(descent)


# --------------------------- zero gradient, bfloat16 ---------------------------

@pytest.mark.parametrize("method", EVERY_METHOD)
def test_zero_gradient_gives_finite_step(method):
  """A zero clean gradient gives a finite step and a usable state.

  For the methods whose ε comes from the clean gradient, ε = 0 and the step is the
  plain gradient at ``w``; δ-SAM and per-instance SAM do not read its values, so their
  step is the one the true clean gradient gives; a gradient mask passes zeros.
  """
  params, batch, loss_fn = problem(method)
  step = plain_step(method)
  zeros = jax.tree.map(jnp.zeros_like, params)
  grads = harness.clean_grads(loss_fn, params)
  updates, state = step(0.05, zeros, plain_init(method, params), params, batch)
  assert tree_finite((updates, state))
  if not method.sharpness_aware:
    expected = jax.tree.map(jnp.zeros_like, params)
  elif method.reads_clean_gradient:
    expected = jax.tree.map(lambda g: -LR * g, grads)
  else:
    expected, _ = step(0.05, grads, plain_init(method, params), params, batch)
  assert_trees_close(updates, expected, rtol=1e-6, atol=1e-8)
  # The state left by a zero gradient is usable: the next, ordinary step is finite and
  # (for the sharpness-aware methods) perturbed: it differs from the plain gradient step.
  updates, state = step(0.05, grads, state, params, batch)
  assert tree_finite((updates, state))
  if method.sharpness_aware:
    assert_trees_differ(updates, jax.tree.map(lambda g: -LR * g, grads), atol=1e-6)


def _low_precision_ops(jaxpr, found):
  """Reductions, roots, divisions and powers that read a bfloat16 operand."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("reduce_sum", "reduce_max", "sqrt", "rsqrt", "div", "square",
                              "integer_pow", "pow"):
      if any(getattr(v.aval, "dtype", None) == jnp.bfloat16 for v in eqn.invars):
        found.append(eqn.primitive.name)
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (tuple, list)) else (value,)):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          _low_precision_ops(sub, found)
  return found


@pytest.mark.parametrize("method", EVERY_METHOD)
def test_bfloat16_params(method):
  params32, batch, loss_fn = problem(method)
  params16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params32)

  def run(params, step, steps=2):
    state = init_state = plain_init(method, params)
    all_updates = []
    for _ in range(steps):
      grads = harness.clean_grads(loss_fn, params)
      updates, state = step(grads, state, params)
      all_updates.append(updates)
      params = optax.apply_updates(params, updates)
    return all_updates, init_state, state

  tx = optax.chain(method.with_live(0.1), optax.sgd(LR))
  eager = functools.partial(tx.update, loss_fn=loss_fn)  # one run, not worth compiling
  updates16, init16, state16 = run(params16, eager)
  updates32, _, _ = run(params32, lambda g, s, p: plain_step(method)(0.1, g, s, p, batch))
  for updates in updates16:
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
  assert harness.signature(state16) == harness.signature(init16)
  # Close to the float32 run (bfloat16 keeps 8 bits: about 0.4% per rounding).
  for u16, u32 in zip(updates16, updates32):
    assert_trees_close(u16, u32, rtol=3e-2, atol=2e-3)

  # Every norm, division and reduction of the step runs in float32. The model computes
  # in float32 (float32 inputs; its matmul reads the bf16 kernel with a float32 result),
  # so any bfloat16 reduction, root or division would be the method's.
  grads16 = harness.clean_grads(loss_fn, params16)
  jaxpr = jax.make_jaxpr(lambda g, s, p: tx.update(g, s, p, loss_fn=loss_fn))(
      grads16, init16, params16)
  assert _low_precision_ops(jaxpr.jaxpr, []) == []


def test_scale_to_radius_bfloat16_matches_float64_rounding():
  """The norm is float32: almost every bf16 output is the float64 value rounded."""
  rng = np.random.default_rng(3)
  u = jnp.asarray(rng.normal(size=4096) * np.exp(rng.normal(size=4096)), jnp.bfloat16)
  tx = perturbations.scale_to_radius(0.7)
  out, _ = tx.update(u, tx.init(u))
  assert out.dtype == jnp.bfloat16
  u64 = np.asarray(u, np.float64)
  rounded = np.asarray(jnp.asarray(0.7 * u64 / np.linalg.norm(u64), jnp.bfloat16), np.float64)
  assert np.mean(np.asarray(out, np.float64) != rounded) < 0.01
  # A norm accumulated in bfloat16 would be visibly off: the check can tell.
  norm16 = jnp.sqrt(jnp.sum(jnp.square(u)).astype(jnp.bfloat16))
  assert abs(float(norm16) - np.linalg.norm(u64)) / np.linalg.norm(u64) > 1e-4


# ------------------------------ non-finite epsilon ------------------------------

def test_nonfinite_epsilon_is_zeroed():
  """A NaN or infinite ε, whole or in one entry, is replaced by zero: the descent
  gradient is then the plain gradient at ``w``."""
  params, _, loss_fn = problem(BY_ID["sam"])
  grads = harness.clean_grads(loss_fn, params)

  def perturbation(bad, everywhere):
    def poison(updates, params):
      del params
      if everywhere:
        return jax.tree.map(lambda u: jnp.full_like(u, bad), updates)
      return {"kernel": updates["kernel"].at[0, 0].set(bad), "bias": updates["bias"] + 0.3}
    return optax_sam.sharpness_aware(optax.stateless(poison))

  poisoned = [perturbation(bad, everywhere)
              for bad in (jnp.nan, jnp.inf, -jnp.inf) for everywhere in (True, False)]
  # The same perturbation without the non-finite entry is not zeroed (the check can tell).
  control = optax_sam.sharpness_aware(optax.stateless(
      lambda u, p: jax.tree.map(lambda x: x + 0.3, u)))

  @jax.jit
  def run(grads, params):
    return [tx.update(grads, tx.init(params), params, loss_fn=loss_fn)[0]
            for tx in poisoned + [control]]

  *descents, perturbed = run(grads, params)
  for descent in descents:
    assert_trees_close(descent, grads)
  assert_trees_differ(perturbed, grads)


# ---------------------------- user-composed perturbations ----------------------------

def test_composed_perturbation_equals_asam():
  asam, sam = BY_ID["asam"], BY_ID["sam"]
  params, batch, loss_fn = problem(asam)
  composed = optax.chain(
      optax_sam.sharpness_aware(optax.chain(
          perturbations.scale_by_parameter_magnitude(0.01),
          perturbations.scale_to_radius(0.5),
          perturbations.scale_by_parameter_magnitude(0.01))),
      optax.sgd(LR))
  grads = harness.clean_grads(loss_fn, params)
  got, _ = jit_update(composed, loss_fn)(grads, composed.init(params), params)
  expected, _ = plain_step(asam)(0.5, grads, plain_init(asam, params), params, batch)
  assert_trees_close(got, expected)
  other, _ = plain_step(sam)(0.5, grads, plain_init(sam, params), params, batch)
  assert_trees_differ(got, other)
