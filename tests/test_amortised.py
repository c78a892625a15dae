"""Amortised sharpness-aware steps (``perturb_every``, ``reuse_alpha``: LookSAM).

Every k-th step perturbs; the steps between return the clean gradient ``g`` or, with
``α``, ``g + α (‖g‖ / ‖g_v‖) g_v`` where ``g_v`` is the part of the last perturbed
gradient orthogonal to that step's clean gradient (METHODS.md, "amortised steps").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import optax_sam
from optax_sam.core import sharpness
from tests import harness

try:
  from jax import shard_map
except ImportError:  # older JAX
  from jax.experimental.shard_map import shard_map

LR, RHO, ALPHA = 0.1, 0.3, 0.7
# The sharpness-aware methods as they are today (the registry's amortised variants out).
BASE = harness.each_method(
    lambda m: m.sharpness_aware and "perturb_every" not in m.kwargs)
CONSTRUCTORS = [optax_sam.sam, optax_sam.asam, optax_sam.fsam, optax_sam.gasam,
                optax_sam.delta_sam, optax_sam.per_instance_sam]


def run(tx, loss_fn_of, params, batch, steps):
  """``steps`` jitted training steps of ``chain(tx, sgd(LR))``; params after each."""
  opt = optax.chain(tx, optax.sgd(LR))
  step = harness.jitted_step(opt, loss_fn_of)
  state, out = opt.init(params), []
  for _ in range(steps):
    params, state = step(params, state, batch)
    out.append(params)
  return out, state


# --------------------------------- k = 1 is today's ---------------------------------

@pytest.mark.parametrize("method", BASE)
def test_perturb_every_one_is_the_method_exactly(method):
  params, batch = harness.make_problem()
  expected, _ = run(method.with_live(RHO), method.loss_fn, params, batch, 3)
  for extra in (dict(perturb_every=1), dict(perturb_every=1, reuse_alpha=ALPHA)):
    got, state = run(method.with_live(RHO, **extra), method.loss_fn, params, batch, 3)
    for a, b in zip(got, expected):
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert state[0].orthogonal == ()  # no g_v kept when every step perturbs


# ------------------------ float64 reference of LookSAM's update ------------------------

def numpy_looksam(params, batch, steps, k, alpha):
  """SAM every ``k`` steps, LookSAM's reuse (or the plain gradient) between, then SGD."""
  w = harness.to_numpy(params)
  batch = jax.tree.map(np.asarray, batch)
  dot = lambda a, b: sum(np.sum(a[key] * b[key]) for key in a)
  out, orthogonal = [], None
  for t in range(steps):
    g = harness.numpy_mean_grad(w, batch)
    if t % k == 0:
      norm = harness.numpy_norm(g)
      g_s = harness.numpy_mean_grad({key: w[key] + RHO * g[key] / (norm + 1e-12)
                                     for key in w}, batch)
      coefficient = dot(g_s, g) / dot(g, g)
      orthogonal = {key: g_s[key] - coefficient * g[key] for key in w}
      descent = g_s
    elif alpha is None:
      descent = g
    else:
      factor = alpha * harness.numpy_norm(g) / harness.numpy_norm(orthogonal)
      descent = {key: g[key] + factor * orthogonal[key] for key in w}
    w = {key: w[key] - LR * descent[key] for key in w}
    out.append(w)
  return out


@pytest.mark.parametrize("alpha", [ALPHA, None], ids=["looksam", "plain_between"])
def test_sam_every_three_steps_matches_float64_reference(alpha):
  params, batch = harness.make_problem()
  got, state = run(optax_sam.sam(RHO, perturb_every=3, reuse_alpha=alpha),
                   harness.batch_loss_fn, params, batch, 7)
  expected = numpy_looksam(params, batch, 7, 3, alpha)
  for step, (a, e) in enumerate(zip(got, expected)):
    harness.assert_tree_close(a, e, rtol=1e-5, atol=1e-6)
  assert int(state[0].count) == 7
  assert int(state[0].perturbation_state.count) == 3  # steps 0, 3, 6 perturbed
  # The reuse matters: LookSAM's steps between are not the plain ones.
  plain = numpy_looksam(params, batch, 2, 3, None)[-1]
  looksam = numpy_looksam(params, batch, 2, 3, ALPHA)[-1]
  assert harness.max_abs_diff(plain, looksam) > 1e-4


@pytest.mark.parametrize("method", BASE)
def test_steps_between_reuse_the_methods_own_perturbed_gradient(method):
  """For every method: the perturbing step is the method's; the next two steps are
  ``g + α (‖g‖/‖g_v‖) g_v`` (float64) with ``g_v`` from the method's perturbed gradient."""
  params, batch = harness.make_problem()
  loss_fn = method.loss_fn(batch)
  tx = method.with_live(RHO, perturb_every=3, reuse_alpha=ALPHA)
  today = method.with_live(RHO)
  update = jax.jit(lambda t, g, s, p: t.update(g, s, p, loss_fn=loss_fn),
                   static_argnums=0)
  g0 = harness.clean_grads(loss_fn, params)
  g_s, _ = update(today, g0, today.init(params), params)
  descent, state = update(tx, g0, tx.init(params), params)
  harness.assert_trees_close(descent, g_s, rtol=1e-6, atol=1e-7)

  g0, g_s = harness.to_numpy(g0), harness.to_numpy(g_s)
  dot = lambda a, b: sum(np.sum(a[key] * b[key]) for key in a)
  g_v = {k: g_s[k] - dot(g_s, g0) / dot(g0, g0) * g0[k] for k in g0}
  harness.assert_tree_close(state.orthogonal, g_v, rtol=1e-4, atol=1e-6)
  for _ in range(2):
    params = jax.tree.map(lambda w, d: w - LR * d, params, descent)
    g = harness.clean_grads(loss_fn, params)
    descent, state = update(tx, g, state, params)
    g = harness.to_numpy(g)
    factor = ALPHA * harness.numpy_norm(g) / harness.numpy_norm(g_v)
    harness.assert_tree_close(descent, {k: g[k] + factor * g_v[k] for k in g},
                              rtol=1e-4, atol=1e-6)


# ------------------------------- the passes skipped -------------------------------

@pytest.mark.parametrize("factory, per_perturbing_step", [
    (lambda: optax_sam.sam(RHO, perturb_every=2, reuse_alpha=ALPHA), 1),
    (lambda: optax_sam.delta_sam(RHO, perturb_every=2), 4),
    (lambda: optax_sam.gasam(RHO, ascent_steps=2, perturb_every=2, reuse_alpha=ALPHA), 2),
], ids=["sam", "delta_sam", "gasam_2"])
def test_steps_between_do_not_evaluate_the_loss_under_jit(factory, per_perturbing_step):
  params, batch = harness.make_problem()
  evaluations = [0]

  def bump():
    evaluations[0] += 1

  def counted(p):
    jax.debug.callback(bump)
    return harness.example_loss(p, batch)

  tx = optax.chain(factory(), optax.sgd(LR))

  @jax.jit
  def step(params, state):
    grads = harness.clean_grads(harness.batch_loss_fn(batch), params)  # not counted
    updates, state = tx.update(grads, state, params, loss_fn=counted)
    return optax.apply_updates(params, updates), state

  state, seen = tx.init(params), []
  for _ in range(5):
    before = evaluations[0]
    params, state = step(params, state)
    jax.effects_barrier()
    seen.append(evaluations[0] - before)
  assert seen == [per_perturbing_step, 0, per_perturbing_step, 0, per_perturbing_step]


# ----------------------------------- numerics -----------------------------------

def test_zero_orthogonal_or_zero_gradient_gives_the_plain_gradient():
  g = {"a": jnp.array([1.0, -2.0]), "b": jnp.array(3.0, jnp.bfloat16)}
  zero = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), g)
  got = sharpness.reuse_orthogonal(g, zero, ALPHA)
  assert jax.tree.map(lambda x: x.dtype, got) == jax.tree.map(lambda x: x.dtype, g)
  harness.assert_trees_close(got, g, 0, 0)
  zero_g = jax.tree.map(jnp.zeros_like, g)
  v = jax.tree.map(lambda x: jnp.ones(x.shape, jnp.float32), g)
  harness.assert_trees_close(sharpness.reuse_orthogonal(zero_g, v, ALPHA), zero_g, 0, 0)
  # A zero clean gradient at the perturbing step keeps g_s whole; a NaN gives zero.
  harness.assert_trees_close(sharpness.orthogonal_component(v, zero_g), v, 0, 0)
  nan = jax.tree.map(lambda x: jnp.full(x.shape, jnp.nan), v)
  harness.assert_trees_close(sharpness.orthogonal_component(nan, g), zero, 0, 0)


def test_orthogonal_component_is_orthogonal():
  _, batch = harness.make_problem()
  g = harness.clean_grads(harness.batch_loss_fn(batch), harness.make_problem(1)[0])
  g_s = harness.clean_grads(harness.batch_loss_fn(batch), harness.make_problem(2)[0])
  g_v = sharpness.orthogonal_component(g_s, g)
  inner = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(g_v),
                                                    jax.tree.leaves(g)))
  assert abs(inner) < 1e-5 * float(optax.tree.norm(g_s) * optax.tree.norm(g))


def test_schedules_read_the_step_count():
  schedule = optax.linear_schedule(0.0, 1.0, transition_steps=10)
  rescaled = sharpness.every_kth_step(schedule, 5)
  assert [float(rescaled(j)) for j in range(3)] == [0.0, 0.5, 1.0]
  assert sharpness.every_kth_step(0.05, 5) == 0.05
  assert sharpness.every_kth_step(schedule, 1) is schedule


def test_fsam_refreshes_its_mask_on_the_perturbing_step_of_its_period():
  """mask_every counts steps: k = 2 and mask_every = 4 refresh on steps 0, 4, 8."""
  tx = optax_sam.fsam(RHO, 0.5, mask_every=4, fisher="squared_gradient", perturb_every=2)
  fisher_state = tx.init(harness.make_problem()[0]).perturbation_state[1]
  assert int(fisher_state.count) == 0
  params, batch = harness.make_problem()
  _, state = run(tx, harness.batch_loss_fn, params, batch, 5)
  # Perturbing steps 0, 2, 4: the mask's own count is 3, refreshed at counts 0 and 2.
  assert int(state[0].perturbation_state[1].count) == 3


@pytest.mark.parametrize("constructor", CONSTRUCTORS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("kwargs, name", [
    (dict(perturb_every=0), "perturb_every"),
    (dict(perturb_every=2.0), "perturb_every"),
    (dict(perturb_every=2, reuse_alpha=-0.1), "reuse_alpha"),
    (dict(perturb_every=2, reuse_alpha=float("nan")), "reuse_alpha"),
    (dict(perturb_every=2, reuse_alpha=lambda count: 0.5), "reuse_alpha"),
])
def test_invalid_amortisation_raises_naming_the_argument(constructor, kwargs, name):
  with pytest.raises(ValueError, match=f"^{name}"):
    constructor(**kwargs)


# ---------------------------------- many devices ----------------------------------

def test_per_device_looksam_in_shard_map_matches_float64():
  """``axis_name``: each device keeps its own g_v; the steps between average the
  devices' ``g_d + α (‖g_d‖/‖g_v,d‖) g_v,d``."""
  devices, per_device = 8, 2
  mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
  params, batch = harness.make_problem(batch=devices * per_device)
  tx = optax_sam.sam(RHO, perturb_every=2, reuse_alpha=ALPHA, axis_name="data")

  def local(params, local_batch):
    loss_fn = harness.batch_loss_fn(local_batch)
    state, descents = tx.init(params), []
    for _ in range(2):
      grads = harness.clean_grads(loss_fn, jax.lax.pcast(params, "data", to="varying"))
      descent, state = tx.update(grads, state, params, loss_fn=loss_fn)
      params = jax.tree.map(lambda w, d: w - LR * d, params, descent)
      descents.append(descent)
    return descents

  got = jax.jit(shard_map(local, mesh=mesh, in_specs=(P(), P("data")), out_specs=P(),
                          check_vma=True))(params, batch)

  w = harness.to_numpy(params)
  shards = [jax.tree.map(lambda x: np.asarray(x)[d * per_device:(d + 1) * per_device],
                         batch) for d in range(devices)]
  dot = lambda a, b: sum(np.sum(a[k] * b[k]) for k in a)
  mean = lambda trees: {k: sum(t[k] for t in trees) / len(trees) for k in w}
  first, orthogonal = [], []
  for shard in shards:
    g = harness.numpy_mean_grad(w, shard)
    norm = harness.numpy_norm(g)
    g_s = harness.numpy_mean_grad({k: w[k] + RHO * g[k] / norm for k in w}, shard)
    first.append(g_s)
    orthogonal.append({k: g_s[k] - dot(g_s, g) / dot(g, g) * g[k] for k in w})
  harness.assert_tree_close(got[0], mean(first), rtol=1e-5, atol=1e-6)
  w = {k: w[k] - LR * mean(first)[k] for k in w}
  second = []
  for shard, g_v in zip(shards, orthogonal):
    g = harness.numpy_mean_grad(w, shard)
    factor = ALPHA * harness.numpy_norm(g) / harness.numpy_norm(g_v)
    second.append({k: g[k] + factor * g_v[k] for k in w})
  harness.assert_tree_close(got[1], mean(second), rtol=1e-5, atol=1e-6)
