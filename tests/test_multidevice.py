"""Data parallelism on the 8 fake CPU devices of conftest.py.

Under ``jax.jit`` with the batch sharded along a "data" axis and replicated parameters,
the gradients are global, so every method of the registry (``harness.METHODS``) must
give exactly the single-device steps (a global perturbation), with explicit and auto
mesh axes. Inside ``shard_map`` with ``axis_name``, each device builds its own ε from
its local gradient ("m-sharpness") and the gradients at the perturbed points are
averaged: that is checked for every sharpness-aware method against the method run on
each shard alone, and for SAM, ASAM and FSAM against a float64 loop over the shards.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import optax_sam
from tests import harness

try:
  from jax import shard_map
except ImportError:  # older JAX
  from jax.experimental.shard_map import shard_map

DEVICES = 8
PER_DEVICE = 2
BATCH = DEVICES * PER_DEVICE
LR = 0.1
AXIS_TYPES = ["Explicit", "Auto"]


def assert_trees_close(actual, expected, rtol=1e-5, atol=1e-6):
  harness.assert_trees_close(actual, expected, rtol, atol)


@pytest.fixture(scope="module")
def mesh():
  assert len(jax.devices()) >= DEVICES, "conftest.py should give 8 CPU devices"
  return Mesh(np.array(jax.devices()[:DEVICES]), ("data",))


def data_parallel_run(tx, make_loss_fn, axis_type, steps=3, params_transform=None):
  """``steps`` jitted training steps on one device and data-parallel on 8.

  Returns ``(one device, eight devices, traces, the compiled step's HLO text)``: the
  final (params, state) of each, and how many times the step was traced.
  """
  params, batch = harness.make_problem(batch=BATCH)
  traces = []
  step = harness.jitted_step(tx, make_loss_fn, traces, params_transform)
  expected = harness.run_steps(step, tx, params, batch, steps)
  sharded, replicated = harness.data_parallel(batch, axis_type)
  assert len(sharded["x"].addressable_shards) == DEVICES
  assert sharded["x"].addressable_shards[0].data.shape == (PER_DEVICE, harness.FEATURES)
  got = harness.run_steps(step, tx, params, sharded, steps, sharding=replicated)
  traced = len(traces)
  params_r, state_r = jax.device_put((params, tx.init(params)), replicated)
  hlo = step.lower(params_r, state_r, sharded).compile().as_text()
  return expected, got, traced, hlo


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
@pytest.mark.parametrize("method", harness.each_method())
def test_sharded_batch_gives_single_device_steps(method, axis_type):
  """Batch over a "data" axis, replicated parameters: the gradients are global, so
  every method gives the single-device steps (a global perturbation)."""
  tx = method.optimizer(optax.adamw(1e-2))
  expected, got, traced, hlo = data_parallel_run(tx, method.loss_fn, axis_type,
                                                 params_transform=method.params_transform)
  # It really ran on the devices together: the compiled step communicates. (Under
  # explicit axes per-instance SAM gathers the batch for its chunks; the all-reduce it
  # had came from the clean gradient, whose pass it no longer reads.)
  assert "all-reduce" in hlo or "all-gather" in hlo
  assert got[0]["kernel"].sharding.is_fully_replicated
  scale = method.reorder_tolerance
  assert_trees_close(got, expected, rtol=1e-5 * scale, atol=1e-6 * scale)
  assert traced == 2  # once per input sharding, never again across steps


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_methods_chained_on_eight_devices(axis_type):
  """Gradient masks after a sharpness-aware method, as the README composes them."""
  mask = jax.tree.map(lambda p: p > 0, harness.make_problem()[0])
  tx = optax.chain(optax_sam.sam(0.1), optax_sam.dps(**harness.DPS),
                   optax_sam.child_tuning_f(0.5), optax_sam.child_tuning_d(mask),
                   optax.adamw(1e-2))
  expected, got, traced, _ = data_parallel_run(tx, harness.batch_loss_fn, axis_type)
  assert_trees_close(got, expected)
  assert traced == 2


# ------------------------------- m-sharpness -------------------------------

def numpy_msharpness_descent(params, batch, perturb):
  """mean_d ∇L_d(w + ε_d), ε_d = perturb(w, g_d), from each shard alone, in float64."""
  params = harness.to_numpy(params)
  total = {k: np.zeros_like(v) for k, v in params.items()}
  for d in range(DEVICES):
    shard = jax.tree.map(lambda x: np.asarray(x)[d * PER_DEVICE:(d + 1) * PER_DEVICE], batch)
    eps = perturb(params, harness.numpy_mean_grad(params, shard))
    descent = harness.numpy_mean_grad({k: params[k] + eps[k] for k in params}, shard)
    total = {k: total[k] + descent[k] / DEVICES for k in params}
  return total


def numpy_sam_eps(rho):
  def perturb(params, grads):
    del params
    norm = harness.numpy_norm(grads)
    return {k: rho * g / norm for k, g in grads.items()}
  return perturb


def numpy_asam_eps(rho, eta):
  def perturb(params, grads):
    t = {k: np.abs(w) + eta for k, w in params.items()}
    norm = harness.numpy_norm({k: t[k] * grads[k] for k in grads})
    return {k: rho * t[k] ** 2 * grads[k] / norm for k in grads}
  return perturb


@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("factory, perturb", [
    (lambda axis: optax_sam.sam(0.3, axis_name=axis), numpy_sam_eps(0.3)),
    (lambda axis: optax_sam.asam(1.0, 0.01, axis_name=axis), numpy_asam_eps(1.0, 0.01)),
], ids=["sam", "asam"])
def test_per_device_perturbation_in_shard_map(factory, perturb, check_vma, mesh):
  params, batch = harness.make_problem(batch=BATCH)
  tx = factory("data")

  def local_step(params, state, local_batch):
    # Each device hands its LOCAL clean gradient. With check_vma, the gradient with
    # respect to replicated (invariant) params would already be summed over devices,
    # so it is taken with respect to a device-varying copy.
    loss_fn = harness.batch_loss_fn(local_batch)
    local = jax.lax.pcast(params, "data", to="varying") if check_vma else params
    grads = harness.clean_grads(loss_fn, local)
    return tx.update(grads, state, params, loss_fn=loss_fn)

  step = jax.jit(shard_map(local_step, mesh=mesh, in_specs=(P(), P(), P("data")),
                           out_specs=(P(), P()), check_vma=check_vma))
  descent, state = step(params, tx.init(params), batch)
  # The step counts (the perturbation's and the mechanism's), replicated.
  assert [int(x) for x in jax.tree.leaves(state)] == [1, 1]

  expected = numpy_msharpness_descent(params, batch, perturb)
  harness.assert_tree_close(descent, expected, rtol=1e-5, atol=1e-6)

  # It is not the global perturbation: ε from the full-batch gradient.
  params64 = harness.to_numpy(params)
  batch64 = jax.tree.map(np.asarray, batch)
  eps = perturb(params64, harness.numpy_mean_grad(params64, batch64))
  global_descent = harness.numpy_mean_grad(
      {k: params64[k] + eps[k] for k in params64}, batch64)
  assert harness.max_abs_diff(descent, global_descent) > 1e-3
  # And the global one is what the same method without axis_name gives under jit.
  plain = factory(None)
  loss_fn = harness.batch_loss_fn(batch)
  got_global, _ = jax.jit(lambda g, s, p: plain.update(g, s, p, loss_fn=loss_fn))(
      harness.clean_grads(loss_fn, params), plain.init(params), params)
  harness.assert_tree_close(got_global, global_descent, rtol=1e-5, atol=1e-6)


def per_device_descent(tx, make_loss_fn, params, batch, mesh):
  """``tx``'s first update inside ``shard_map`` (variance checks on), from each device's
  local clean gradient; the (averaged, replicated) descent gradient."""

  def local_descent(params, local_batch):
    loss_fn = make_loss_fn(local_batch)
    grads = harness.clean_grads(loss_fn, jax.lax.pcast(params, "data", to="varying"))
    return tx.update(grads, tx.init(params), params, loss_fn=loss_fn)[0]

  return jax.jit(shard_map(local_descent, mesh=mesh, in_specs=(P(), P("data")),
                           out_specs=P(), check_vma=True))(params, batch)


@pytest.mark.parametrize("factory", [
    lambda axis: optax_sam.fsam(0.3, 1.0, fisher="squared_gradient", axis_name=axis),
    lambda axis: optax_sam.fsam(0.3, 1.0, fisher_chunk_size=2, axis_name=axis),
], ids=["fsam_squared_gradient", "fsam_per_example"])
def test_per_device_fisher_mask_under_variance_checks(factory, mesh):
  """The Fisher top-k runs on device-varying scores; keep_ratio = 1 is per-device SAM."""
  params, batch = harness.make_problem(batch=BATCH)
  descent = per_device_descent(factory("data"), harness.batch_loss_fn, params, batch, mesh)
  expected = numpy_msharpness_descent(params, batch, numpy_sam_eps(0.3))
  harness.assert_tree_close(descent, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", harness.each_method(lambda m: m.sharpness_aware))
def test_axis_name_in_shard_map_is_each_shard_alone_then_averaged(method, mesh):
  """Every sharpness-aware method with ``axis_name``: each device's step is the method
  run on its shard alone (its own ε, its own state), and the results are averaged."""
  params, batch = harness.make_problem(batch=BATCH)
  descent = per_device_descent(method.with_live(0.3, axis_name="data"), method.loss_fn,
                               params, batch, mesh)
  alone = method.with_live(0.3)

  @jax.jit
  def shard_descent(shard):
    loss_fn = method.loss_fn(shard)
    grads = harness.clean_grads(loss_fn, params)
    return alone.update(grads, alone.init(params), params, loss_fn=loss_fn)[0]

  shards = [jax.tree.map(lambda x: x[d * PER_DEVICE:(d + 1) * PER_DEVICE], batch)
            for d in range(DEVICES)]
  expected = jax.tree.map(lambda *x: sum(x) / DEVICES, *map(shard_descent, shards))
  assert_trees_close(descent, expected)
