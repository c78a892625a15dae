"""Per-instance SAM against a Python loop over examples; chunking and memory.

One compile, a fixed state signature, 8 devices and ``axis_name``: the generic tests of
the registry in tests/harness.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sam
from tests import harness

RHO = 0.3


def numpy_per_instance(params, batch, rho, mask=None):
  """``Σ_i m_i ∇l_i(w + ρ ∇l_i / ‖∇l_i‖) / Σ_i m_i``, one example at a time, float64."""
  p = harness.to_numpy(params)
  n = len(batch["y"])
  mask = np.ones(n) if mask is None else np.asarray(mask, np.float64)
  total = {k: np.zeros_like(v) for k, v in p.items()}
  for i in range(n):
    example = {k: np.asarray(v)[i:i + 1] for k, v in batch.items()}
    (g,) = harness.numpy_example_grads(p, example)
    norm = harness.numpy_norm(g)
    (g_at_eps,) = harness.numpy_example_grads(
        {k: p[k] + rho * g[k] / norm for k in p}, example)
    for k in p:
      total[k] += mask[i] * g_at_eps[k]
  return {k: v / mask.sum() for k, v in total.items()}


def jitted_update(tx, params, loss_fn, state=None, **extra):
  state = tx.init(params) if state is None else state
  grads = harness.clean_grads(loss_fn, params)
  return jax.jit(lambda g, s, p: tx.update(g, s, p, loss_fn=loss_fn, **extra))(
      grads, state, params)


# ------------------------------- reference and masks -------------------------------

@pytest.mark.parametrize("fast_path", [True, False])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_matches_python_loop_over_examples(fast_path, chunk_size):
  params, batch = harness.make_problem()
  loss_fn = (harness.per_example_loss_fn if fast_path else harness.batch_loss_fn)(batch)
  descent, state = jitted_update(optax_sam.per_instance_sam(RHO, chunk_size=chunk_size),
                                 params, loss_fn)
  harness.assert_tree_close(descent, numpy_per_instance(params, batch, RHO))
  assert int(state.count) == 1


@pytest.mark.parametrize("fast_path", [True, False])
def test_example_mask_gives_the_masked_mean(fast_path):
  params, batch = harness.make_problem()
  loss_fn = (harness.per_example_loss_fn if fast_path else harness.batch_loss_fn)(batch)
  mask = jnp.array([1, 1, 0, 1, 0, 1, 1, 1], jnp.float32)
  descent, _ = jitted_update(optax_sam.per_instance_sam(RHO, chunk_size=4), params,
                             loss_fn, example_mask=mask)
  expected = numpy_per_instance(params, batch, RHO, mask)
  harness.assert_tree_close(descent, expected)
  unmasked = numpy_per_instance(params, batch, RHO)
  assert max(np.max(np.abs(expected[k] - unmasked[k])) for k in expected) > 1e-3


def test_differs_from_sam_on_a_real_batch():
  params, batch = harness.make_problem()
  loss_fn = harness.per_example_loss_fn(batch)
  got, _ = jitted_update(optax_sam.per_instance_sam(RHO), params, loss_fn)
  sam, _ = jitted_update(optax_sam.sam(RHO), params, loss_fn)
  assert np.max(np.abs(np.asarray(got["kernel"] - sam["kernel"]))) > 1e-3


@pytest.mark.parametrize("fast_path", [True, False])
def test_batch_of_one_is_sam(fast_path):
  params, batch = harness.make_problem(batch=1)
  loss_fn = (harness.per_example_loss_fn if fast_path else harness.batch_loss_fn)(batch)
  for rho in (0.05, 0.5):
    got, _ = jitted_update(optax.chain(optax_sam.per_instance_sam(rho), optax.sgd(0.1)),
                           params, loss_fn)
    expected, _ = jitted_update(optax.chain(optax_sam.sam(rho), optax.sgd(0.1)), params,
                                loss_fn)
    harness.assert_tree_close(got, harness.to_numpy(expected), rtol=1e-6, atol=1e-7)


def test_rho_zero_is_the_clean_gradient():
  params, batch = harness.make_problem()
  loss_fn = harness.per_example_loss_fn(batch)
  descent, _ = jitted_update(optax_sam.per_instance_sam(0.0, chunk_size=2), params, loss_fn)
  harness.assert_tree_close(descent, harness.to_numpy(harness.clean_grads(loss_fn, params)))


# ------------------------------ chunking and memory ------------------------------

@pytest.mark.parametrize("chunk_size", [1, 3, 8, 100])
def test_chunked_equals_unchunked(chunk_size):
  params, batch = harness.make_problem()
  loss_fn = harness.per_example_loss_fn(batch)
  unchunked, _ = jitted_update(optax_sam.per_instance_sam(RHO), params, loss_fn)
  chunked, _ = jitted_update(optax_sam.per_instance_sam(RHO, chunk_size=chunk_size), params,
                             loss_fn)
  harness.assert_tree_close(chunked, harness.to_numpy(unchunked), rtol=1e-6, atol=1e-7)


def _temp_bytes(batch_size, chunk_size, features=256, classes=16):
  """Compiled scratch memory of one per-instance SAM update (the batch is an argument)."""
  rng = np.random.default_rng(0)
  params = {"kernel": jnp.zeros((features, classes)), "bias": jnp.zeros(classes)}
  batch = {"x": jnp.asarray(rng.normal(size=(batch_size, features)), jnp.float32),
           "y": jnp.zeros(batch_size, jnp.int32)}
  tx = optax_sam.per_instance_sam(RHO, chunk_size=chunk_size)

  def update(params, batch):
    loss_fn = optax_sam.PerExampleLoss(harness.example_loss, batch)
    return tx.update(params, tx.init(params), params, loss_fn=loss_fn)[0]

  compiled = jax.jit(update).lower(params, batch).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_memory_does_not_grow_with_the_batch():
  per_example_bytes = 256 * 16 * 4  # one per-example gradient of the kernel
  chunked = {b: _temp_bytes(b, chunk_size=4) for b in (16, 64)}
  unchunked = {b: _temp_bytes(b, chunk_size=None) for b in (16, 64)}
  # Unchunked scratch holds per-example gradients (and perturbed copies) of the whole
  # batch, so it at least doubles from 16 to 64 examples; chunked holds 4 of them,
  # whatever the batch (only the index bookkeeping grows, by a few bytes per example).
  assert unchunked[64] >= 2 * unchunked[16]
  assert unchunked[16] >= 16 * per_example_bytes
  assert chunked[64] - chunked[16] <= per_example_bytes // 4
  assert chunked[64] < unchunked[64] / 4


# ------------------------------------ errors ------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    (dict(rho=-1.0), "rho"), (dict(chunk_size=0), "chunk_size"),
    (dict(chunk_size=2.5), "chunk_size"), (dict(eps=0.0), "eps"),
])
def test_invalid_hyperparameters_raise_naming_the_argument(kwargs, name):
  with pytest.raises(ValueError, match=name):
    optax_sam.per_instance_sam(**kwargs)


def test_scalar_loss_is_rejected_with_a_per_example_message():
  params, batch = harness.make_problem()
  tx = optax_sam.per_instance_sam()
  scalar = lambda p: harness.batch_loss_fn(batch)(p).mean()
  with pytest.raises(ValueError, match="per_instance_sam needs per-example losses"):
    tx.update(params, tx.init(params), params, loss_fn=scalar)
