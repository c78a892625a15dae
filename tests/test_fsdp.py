"""Fully sharded data parallelism (FSDP) on the 8 fake CPU devices of conftest.py.

Parameters and optimizer state are sharded along an "fsdp" mesh axis and the batch along
both axes of a ``data × fsdp = 2 × 4`` mesh, as in ZeRO-3/FSDP. For every method of the
registry (``harness.METHODS``), with explicit and auto mesh axes:

- the sharded steps equal the single-device steps (the gradients are global);
- the parameters keep their sharding, and every per-parameter state leaf (a Fisher mask,
  a strength average, DPS's statistics, Mixout's target) is sharded like its parameter,
  never replicated in full on every device;
- the state's types (shape, dtype, sharding) after a step are those after ``init``, so
  the second step does not recompile.

The cases of Optax's own contrib tests (``test_state_shape_dtype_shard_stability``:
parameters sharded over a ``jax.make_mesh`` mesh, ``init``, jitted and eager updates,
state types stable under ``lax.cond``) are ported here for every method, as is
``optax.tree.map_params``, Optax's way to build the state's shardings.
"""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import optax_sam
from tests import harness

AXIS_TYPES = ["Explicit", "Auto"]
DATA, FSDP = 2, 4
FEATURES, CLASSES, BATCH = 16, 8, 16  # every parameter axis 0 divides by FSDP
STEPS = 3  # DPS's stages are 2 steps and FSAM refreshes its mask every 2
LR = 1e-2
# Momentum SGD rather than AdamW: AdamW's g / √v turns the last bits of a tiny
# gradient entry, which summation order moves, into a visible difference.


def make_mesh(axis_type):
  kind = getattr(jax.sharding.AxisType, axis_type)
  return jax.make_mesh((DATA, FSDP), ("data", "fsdp"), axis_types=(kind, kind))


def make_problem():
  params, batch = harness.make_problem(batch=BATCH)
  rng = np.random.default_rng(1)
  params = {"kernel": jnp.asarray(rng.normal(size=(FEATURES, CLASSES)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(CLASSES,)) * 0.1, jnp.float32)}
  batch = {"x": jnp.asarray(rng.normal(size=(BATCH, FEATURES)), jnp.float32),
           "y": jnp.asarray(rng.integers(0, CLASSES, size=BATCH), jnp.int32)}
  return params, batch


def param_sharding(mesh):
  """Every parameter split along its first axis over "fsdp", replicated over "data"."""
  return {"kernel": NamedSharding(mesh, P("fsdp", None)),
          "bias": NamedSharding(mesh, P("fsdp"))}


def batch_sharding(mesh):
  return NamedSharding(mesh, P(("data", "fsdp")))


def gathered(params):
  """The forward pass's all-gather of FSDP. Under explicit axes the model says so
  (``reshard``); under auto axes XLA inserts it."""
  def gather(p):
    mesh = jax.typeof(p).sharding.mesh
    explicit = jax.sharding.AxisType.Explicit in getattr(mesh, "axis_types", ())
    return jax.sharding.reshard(p, P()) if explicit else p
  return jax.tree.map(gather, params)


def example_loss(params, example):
  return harness.example_loss(gathered(params), example)


def loss_fn_for(method):
  if method.per_example:
    return lambda batch: optax_sam.PerExampleLoss(example_loss, batch)
  return lambda batch: lambda params: example_loss(params, batch)


def method_overrides(method):
  if method.id == "child_tuning_d":  # the registry's mask fits the registry's problem
    return {"mask": {"kernel": np.arange(FEATURES * CLASSES).reshape(FEATURES, CLASSES)
                               % 3 != 0, "bias": True}}
  return {}


def optimizer(method):
  return method.optimizer(optax.sgd(LR, momentum=0.9), **method_overrides(method))


def per_parameter(tx, state, params):
  """``[(state leaf, its parameter)]`` for every per-parameter leaf of ``state``, as
  ``optax.tree.map_params`` (Optax's way to build the state's shardings) finds them."""
  masked = lambda x: isinstance(x, optax.MaskedNode)
  paths = jax.tree_util.tree_map_with_path(lambda path, _: jax.tree_util.keystr(path),
                                           params)
  marks = optax.tree.map_params(
      tx, lambda leaf, path: None if masked(leaf) else path, state, paths,
      transform_non_params=lambda _: None, is_leaf=masked)
  by_path = dict(zip(jax.tree.leaves(paths), jax.tree.leaves(params)))
  marks = jax.tree.leaves(marks, is_leaf=lambda x: x is None or masked(x))
  leaves = jax.tree.leaves(state, is_leaf=masked)
  assert len(marks) == len(leaves)
  return [(leaf, by_path[mark]) for leaf, mark in zip(leaves, marks)
          if isinstance(mark, str)]


def spec_of(x):
  """``x``'s partition spec with trailing unsharded axes dropped."""
  spec = tuple(x.sharding.spec)
  while spec and spec[-1] is None:
    spec = spec[:-1]
  return spec


def state_sharding(tx, state, mesh):
  """The state's shardings from the parameters', with ``optax.tree.map_params``."""
  return optax.tree.map_params(
      tx, lambda _, sharding: sharding, state, param_sharding(mesh),
      transform_non_params=lambda _: NamedSharding(mesh, P()),
      is_leaf=lambda x: isinstance(x, optax.MaskedNode))


# δ-SAM's weights are second differences of float32 losses, and FSDP's forward sums the
# matmul over the sharded features in another order: its steps move by a few 1e-5.
FSDP_TOLERANCE = {"delta_sam": 25.0}


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
@pytest.mark.parametrize("method", harness.each_method())
def test_fsdp_steps_equal_single_device_steps(method, axis_type):
  params, batch = make_problem()
  tx = optimizer(method)
  make_loss_fn = loss_fn_for(method)
  expected = harness.run_steps(
      harness.jitted_step(tx, make_loss_fn, params_transform=method.params_transform),
      tx, params, batch, STEPS)

  mesh = make_mesh(axis_type)
  traces = []
  step = harness.jitted_step(tx, make_loss_fn, traces, method.params_transform)
  with jax.set_mesh(mesh):
    sharded_params = jax.device_put(params, param_sharding(mesh))
    sharded_batch = jax.device_put(batch, batch_sharding(mesh))
    state = tx.init(sharded_params)
    if axis_type == "Auto":
      # Auto axes leave the placement of the step's outputs to XLA: say where the
      # parameters and the state live, as a training loop does. (Explicit axes carry
      # the shardings in the types, and the step keeps them unasked.)
      shardings = (param_sharding(mesh), state_sharding(tx, state, mesh))
      state = jax.device_put(state, shardings[1])
      step = jax.jit(step.__wrapped__, out_shardings=shardings)
    initial = state
    got_params, got_state = sharded_params, state
    for _ in range(STEPS):
      got_params, got_state = step(got_params, got_state, sharded_batch)

  scale = method.reorder_tolerance * FSDP_TOLERANCE.get(method.id, 1.0)
  harness.assert_trees_close((got_params, got_state), expected, rtol=1e-5 * scale,
                             atol=1e-6 * scale)
  # Traced once: the state came back with the shapes, dtypes and shardings it went in
  # with, so the second step reused the first one's program.
  assert len(traces) == 1
  for after, before in zip(jax.tree.leaves((got_params, got_state)),
                           jax.tree.leaves((sharded_params, initial))):
    assert after.sharding.is_equivalent_to(before.sharding, after.ndim), (
        method.id, after.shape, after.sharding, before.sharding)
  pairs = per_parameter(tx, got_state, sharded_params)
  assert pairs, "every method keeps per-parameter state (the momentum at least)"
  for leaf, param in pairs:
    assert not leaf.sharding.is_fully_replicated, (method.id, leaf.shape)
    assert spec_of(leaf) == spec_of(param), (method.id, leaf.shape, leaf.sharding)


# ----------------- Optax's contrib test cases, for every method -----------------


@pytest.mark.parametrize("method", harness.each_method())
def test_state_types_stable_and_eager_update_on_make_mesh(method):
  """Parameters sharded over a ``jax.make_mesh`` mesh (explicit axes, JAX's default):
  the state ``init`` builds has the types (shape, dtype, sharding) ``update`` returns,
  so ``update`` can be one branch of a ``lax.cond`` whose other branch keeps the state,
  and an eager (un-jitted) update gives the jitted one."""
  params, batch = make_problem()
  tx = optimizer(method)
  make_loss_fn = loss_fn_for(method)
  mesh = jax.make_mesh((DATA, FSDP), ("data", "fsdp"))
  # Outside a mesh context too, init places the per-parameter state where the parameters
  # are (scalars such as step counts stay on the default device there).
  outside = tx.init(jax.device_put(params, param_sharding(mesh)))
  with jax.set_mesh(mesh):
    params = jax.device_put(params, param_sharding(mesh))
    batch = jax.device_put(batch, batch_sharding(mesh))
    state = tx.init(params)
  sharded = [(x, y) for x, y in zip(jax.tree.leaves(outside), jax.tree.leaves(state))
             if not y.sharding.is_fully_replicated]
  assert sharded, method.id
  for x, y in sharded:
    assert x.sharding.is_equivalent_to(y.sharding, x.ndim), method.id
  with jax.set_mesh(mesh):
    loss_fn = make_loss_fn(batch)
    seen = loss_fn if method.params_transform is None else (
        lambda p: loss_fn(method.params_transform(p, state)))
    grads = jax.grad(lambda p: seen(p).mean())(params)

    @jax.jit
    def maybe_update(take, grads, state, params):
      return jax.lax.cond(take, lambda: tx.update(grads, state, params, loss_fn=loss_fn),
                          lambda: (grads, state))

    jitted = maybe_update(True, grads, state, params)
    kept = maybe_update(False, grads, state, params)
    eager = tx.update(grads, state, params, loss_fn=loss_fn)
  harness.assert_trees_close(kept, (grads, state), rtol=0, atol=0)
  harness.assert_trees_close(eager, jitted, rtol=1e-5 * method.reorder_tolerance,
                             atol=1e-6 * method.reorder_tolerance)
  for x, y in zip(jax.tree.leaves(jitted[1]), jax.tree.leaves(state)):
    assert jax.typeof(x) == jax.typeof(y), method.id


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_per_example_loss_under_fsdp(axis_type):
  """``PerExampleLoss``'s ``vmap`` over a batch split over "fsdp", with parameters split
  over "fsdp" too: under explicit axes the parameters are gathered for it, and the
  gradient comes back in the parameters' sharding."""
  params, batch = make_problem()
  expected = jax.grad(lambda p: optax_sam.PerExampleLoss(example_loss, batch)(p).mean())(
      params)
  mesh = make_mesh(axis_type)
  with jax.set_mesh(mesh):
    sharded = jax.device_put(params, param_sharding(mesh))
    sharded_batch = jax.device_put(batch, batch_sharding(mesh))
    grads = jax.jit(jax.grad(
        lambda p: optax_sam.PerExampleLoss(example_loss, sharded_batch)(p).mean()))(sharded)
  harness.assert_trees_close(grads, expected, rtol=1e-5, atol=1e-6)
  if axis_type == "Explicit":
    for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(sharded)):
      assert spec_of(g) == spec_of(p)


def test_parameter_shaped_arrays_are_built_from_the_parameter():
  """The kind of bug, not its instances: outside ``core/placement.py`` the library never
  builds an array from a parameter's shape (which drops the parameter's sharding)."""
  root = pathlib.Path(optax_sam.__file__).parent
  from_shape = re.compile(r"(jnp\.(zeros|ones|full|empty)|jax\.random\.\w+)\("
                          r"[^)]*(jnp\.shape\(|\w\.shape\b)")
  found = [f"{path.relative_to(root)}:{number}: {line.strip()}"
           for path in sorted(root.rglob("*.py")) if path.name != "placement.py"
           for number, line in enumerate(path.read_text().splitlines(), start=1)
           if from_shape.search(line) and ">>>" not in line]
  assert not found, "use optax_sam.core.placement:\n" + "\n".join(found)
