"""A small problem every method is tested on, with float64 NumPy twins of its pieces.

The model is softmax regression on a fixed random batch: ``params = {"kernel": [D, C],
"bias": [C]}``, per-example cross-entropy losses. ``numpy_*`` functions compute the same
quantities in float64 from first principles, for references written from METHODS.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_sam

FEATURES, CLASSES, BATCH = 5, 3, 8


def make_problem(seed: int = 0, batch: int = BATCH):
  """Returns ``(params, batch)``: float32 JAX arrays from a fixed NumPy RNG."""
  rng = np.random.default_rng(seed)
  params = {
      "kernel": jnp.asarray(rng.normal(size=(FEATURES, CLASSES)), jnp.float32),
      "bias": jnp.asarray(rng.normal(size=(CLASSES,)) * 0.1, jnp.float32),
  }
  data = {
      "x": jnp.asarray(rng.normal(size=(batch, FEATURES)), jnp.float32),
      "y": jnp.asarray(rng.integers(0, CLASSES, size=batch), jnp.int32),
  }
  return params, data


def example_loss(params, example):
  logits = example["x"] @ params["kernel"] + params["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, example["y"])


def batch_loss_fn(batch):
  """``loss_fn`` for ``batch``: per-example losses from one batched forward pass."""
  return lambda params: example_loss(params, batch)


def per_example_loss_fn(batch):
  return optax_sam.PerExampleLoss(example_loss, batch)


def clean_grads(loss_fn, params):
  return jax.grad(lambda p: loss_fn(p).mean())(params)


def one_step(tx, params, loss_fn, state=None, **extra):
  """One jitted ``tx.update`` + apply, from the clean gradient of ``loss_fn``."""
  state = tx.init(params) if state is None else state

  @jax.jit
  def step(params, state):
    grads = clean_grads(loss_fn, params)
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn, **extra)
    return optax.apply_updates(params, updates), state

  return step(params, state)


def jitted_step(tx, make_loss_fn, traces=None):
  """A jitted ``(params, state, batch) -> (params, state)`` step of ``tx``.

  ``make_loss_fn(batch)`` builds the loss_fn; each trace appends to ``traces`` if given.
  """
  @jax.jit
  def step(params, state, batch):
    if traces is not None:
      traces.append(1)
    loss_fn = make_loss_fn(batch)
    grads = clean_grads(loss_fn, params)
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), state
  return step


def run_steps(step, tx, params, batch, steps, sharding=None):
  """``steps`` calls of ``step`` from ``tx.init``; params and state put on ``sharding``."""
  state = tx.init(params)
  if sharding is not None:
    params, state = jax.device_put((params, state), sharding)
  for _ in range(steps):
    params, state = step(params, state, batch)
  return params


def data_parallel(batch, axis_type):
  """``(sharded batch, replicated sharding)`` on an 8-device mesh of ``axis_type``."""
  mesh = jax.make_mesh((8,), ("data",),
                       axis_types=(getattr(jax.sharding.AxisType, axis_type),))
  sharded = jax.device_put(batch, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("data")))
  return sharded, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def signature(tree):
  """Shapes, dtypes and weak-type flags of every leaf: what a retrace would key on."""
  return jax.tree.map(lambda a: (jnp.shape(a), jnp.asarray(a).dtype,
                                 getattr(a, "weak_type", False)), tree)


def max_abs_diff(a, b):
  return max(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def assert_trees_close(actual, expected, rtol, atol):
  """Leaf-by-leaf closeness of two pytrees of the same structure."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(e, np.float64),
                               rtol=rtol, atol=atol)


# ----------------------------- float64 NumPy twins -----------------------------

def to_numpy(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def numpy_example_losses(params, batch):
  logits = np.asarray(batch["x"], np.float64) @ params["kernel"] + params["bias"]
  logits = logits - logits.max(axis=1, keepdims=True)
  log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  return -log_probs[np.arange(len(batch["y"])), np.asarray(batch["y"])]


def numpy_example_grads(params, batch):
  """Per-example gradients ``[{kernel: [D, C], bias: [C]} for each example]``."""
  x = np.asarray(batch["x"], np.float64)
  logits = x @ params["kernel"] + params["bias"]
  probs = np.exp(logits - logits.max(axis=1, keepdims=True))
  probs /= probs.sum(axis=1, keepdims=True)
  residual = probs.copy()
  residual[np.arange(len(x)), np.asarray(batch["y"])] -= 1.0
  return [{"kernel": np.outer(x[i], residual[i]), "bias": residual[i]}
          for i in range(len(x))]


def numpy_mean_grad(params, batch, weights=None):
  grads = numpy_example_grads(params, batch)
  weights = np.ones(len(grads)) if weights is None else np.asarray(weights, np.float64)
  total = weights.sum()
  return {k: sum(w * g[k] for w, g in zip(weights, grads)) / total for k in params}


def numpy_norm(tree):
  return np.sqrt(sum(np.sum(np.square(v)) for v in tree.values()))


def numpy_adam_first_step(grads, learning_rate):
  """The first Adam update (bias-corrected): ``-lr · g / (|g| + 1e-8)``."""
  return {k: -learning_rate * g / (np.abs(g) + 1e-8) for k, g in grads.items()}


def assert_tree_close(actual, expected, rtol=1e-5, atol=1e-6):
  actual = to_numpy(actual)
  for key in expected:
    np.testing.assert_allclose(actual[key], expected[key], rtol=rtol, atol=atol,
                               err_msg=f"leaf {key!r}")
