"""Gradient accumulation with the sharpness-aware methods.

``optax.MultiSteps`` calls the inner transform on every micro-step and masks the result,
so a SAM transform inside it runs its second pass once per micro-step and the update it
emits uses only the last micro-batch at ``w + ε``. The tests below pin that down, then
check the library's path, ``optax_sam.microbatched_loss``: the full-batch step, computed
one micro-batch at a time, with a single second pass per update.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sam
from tests import harness

LR = 0.1
BATCH = 16


def assert_trees_close(actual, expected, rtol=2e-5, atol=1e-6):
  harness.assert_trees_close(actual, expected, rtol, atol)


def batch_loss(params, batch):
  """Per-example losses of a (micro-)batch: the harness model, batched."""
  return harness.example_loss(params, batch)


def micro_batches(batch, k):
  size = BATCH // k
  return [jax.tree.map(lambda x: x[i * size:(i + 1) * size], batch) for i in range(k)]


def counting(loss_fn, counter):
  """``loss_fn`` that counts its evaluations at run time (not its traces)."""

  def bump():
    counter[0] += 1

  def counted(params):
    jax.debug.callback(bump)
    return loss_fn(params)

  return counted


# ----------------------------- optax.MultiSteps: the pitfall -----------------------------

def test_multisteps_runs_second_pass_every_micro_step_on_last_micro_batch():
  k = 4
  params, batch = harness.make_problem(batch=BATCH)
  micro = micro_batches(batch, k)
  tx = optax.MultiSteps(optax.chain(optax_sam.sam(0.1), optax.sgd(LR)), every_k_schedule=k)
  evaluations = [0]

  @jax.jit
  def micro_step(state, params, mb):
    loss_fn = harness.batch_loss_fn(mb)
    grads = harness.clean_grads(loss_fn, params)
    return tx.update(grads, state, params, loss_fn=counting(loss_fn, evaluations))

  state = tx.init(params)
  per_micro_step = []
  for i, mb in enumerate(micro):
    before = evaluations[0]
    updates, state = micro_step(state, params, mb)
    jax.effects_barrier()
    per_micro_step.append(evaluations[0] - before)
    if i < k - 1:
      assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates))
  # The second pass ran on every micro-step, not once per update.
  assert per_micro_step == [1] * k

  # What was emitted: ε from the accumulated (full-batch) gradient, but the descent
  # gradient of the last micro-batch alone at w + ε.
  full_loss = harness.batch_loss_fn(batch)
  g_full = harness.clean_grads(full_loss, params)
  eps = jax.tree.map(lambda g: 0.1 * g / optax.tree.norm(g_full), g_full)
  last = harness.clean_grads(harness.batch_loss_fn(micro[-1]),
                             jax.tree.map(jnp.add, params, eps))
  assert_trees_close(updates, jax.tree.map(lambda g: -LR * g, last))
  # ... which is not the full-batch SAM step.
  full = optax.chain(optax_sam.sam(0.1), optax.sgd(LR))
  full_updates, _ = full.update(g_full, full.init(params), params, loss_fn=full_loss)
  assert harness.max_abs_diff(updates, full_updates) > 1e-3


# ------------------------- optax_sam.microbatched_loss: the fix -------------------------

@pytest.mark.parametrize("k", [1, 2, 4, 16])
def test_microbatched_loss_values_and_gradient(k):
  params, batch = harness.make_problem(batch=BATCH)
  loss_fn = optax_sam.microbatched_loss(batch_loss, batch, k)
  full = harness.batch_loss_fn(batch)
  np.testing.assert_allclose(loss_fn(params), full(params), rtol=1e-6)
  assert_trees_close(harness.clean_grads(loss_fn, params), harness.clean_grads(full, params))


# Micro-batching applies to the methods that differentiate the batch loss; the
# per-example ones would index the micro-batched loss one example at a time.
MICROBATCHED = harness.each_method(lambda m: m.loss_calls is not None)


@pytest.mark.parametrize("method", MICROBATCHED)
def test_microbatched_steps_equal_full_batch_steps(method):
  k = 4
  params, batch = harness.make_problem(batch=BATCH)
  tx = method.optimizer(optax.sgd(LR), **({method.live: 0.1} if method.live else {}))

  @functools.partial(jax.jit, static_argnums=0)
  def step(micro, params, state, batch):
    if micro:
      loss_fn = optax_sam.microbatched_loss(batch_loss, batch, k)
    else:
      loss_fn = harness.batch_loss_fn(batch)
    grads = harness.clean_grads(loss_fn, params)
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), updates, state

  trajectories = []
  for micro in (False, True):
    p, state, trajectory = params, tx.init(params), []
    for _ in range(3):
      p, updates, state = step(micro, p, state, batch)
      trajectory.append((updates, state))
    trajectories.append(trajectory)
  full, micro = trajectories
  assert_trees_close(micro, full, rtol=2e-5 * method.reorder_tolerance,
                     atol=1e-6 * method.reorder_tolerance)
  assert harness.max_abs_diff(full[0][0], full[1][0]) > 1e-4  # the steps are not all alike


@pytest.mark.parametrize("method", MICROBATCHED)
def test_microbatched_second_pass_once_per_update(method):
  """The optimizer evaluates the (micro-batched) loss once per update for the second
  pass, whatever the number of micro-batches (plus once per extra GA-SAM ascent step,
  three more for δ-SAM's probes), and the micro-batch loss is traced a number of times
  independent of k."""
  params, batch = harness.make_problem(batch=BATCH)
  grads = harness.clean_grads(harness.batch_loss_fn(batch), params)
  expected_evaluations, expected_traces = method.loss_calls
  traces_per_k = {}
  for k in (2, 8):
    traces, evaluations = [], [0]

    def traced_batch_loss(p, b):
      traces.append(1)
      return batch_loss(p, b)

    tx = method.with_live(0.1)
    loss_fn = counting(optax_sam.microbatched_loss(traced_batch_loss, batch, k), evaluations)
    update = lambda g, s, p: tx.update(g, s, p, loss_fn=loss_fn)
    if k == 8:  # run it, counting evaluations
      jax.jit(update)(grads, tx.init(params), params)
      jax.effects_barrier()
      assert evaluations[0] == expected_evaluations
    else:  # tracing is enough to count traces
      jax.make_jaxpr(update)(grads, tx.init(params), params)
    traces_per_k[k] = len(traces)
  assert traces_per_k[2] == traces_per_k[8] == expected_traces


def test_microbatched_loss_rejects_bad_splits():
  _, batch = harness.make_problem(batch=BATCH)
  with pytest.raises(ValueError, match="divisible by num_microbatches=3"):
    optax_sam.microbatched_loss(batch_loss, batch, 3)
  with pytest.raises(ValueError, match="num_microbatches"):
    optax_sam.microbatched_loss(batch_loss, batch, 0)
  with pytest.raises(ValueError, match="same leading axis"):
    optax_sam.microbatched_loss(batch_loss, {**batch, "y": batch["y"][:8]}, 2)
