"""The loss_fn contract: PerExampleLoss and its optional batched forward pass."""

from __future__ import annotations

import jax
import numpy as np
import optax

import optax_sam
from tests import harness


def test_batch_loss_serves_the_whole_batch_and_example_loss_each_example():
  params, batch = harness.make_problem()
  traced = {"batch": 0, "example": 0}

  def batch_loss(p, rows):
    traced["batch"] += 1
    return harness.example_loss(p, rows)

  def example_loss(p, row):
    traced["example"] += 1
    return harness.example_loss(p, row)

  both = optax_sam.PerExampleLoss(example_loss, batch, batch_loss=batch_loss)
  plain = optax_sam.PerExampleLoss(harness.example_loss, batch)
  np.testing.assert_allclose(both(params), plain(params), rtol=1e-6)
  assert traced == {"batch": 1, "example": 0}

  # Per-example gradients come from example_loss alone, and give the same step.
  traced.update(batch=0, example=0)
  grads = harness.clean_grads(plain, params)
  per_instance = optax_sam.per_instance_sam(0.3, chunk_size=4)
  update = lambda loss_fn: per_instance.update(grads, per_instance.init(params), params,
                                               loss_fn=loss_fn)[0]
  harness.assert_trees_close(update(both), update(plain), rtol=1e-6, atol=1e-7)
  assert traced["batch"] == 0 and traced["example"] > 0

  # SAM's second pass is a whole-batch pass: batch_loss, not the vmap of example_loss.
  traced.update(batch=0, example=0)
  sam = optax.chain(optax_sam.sam(0.3), optax.sgd(0.1))
  jax.eval_shape(lambda g, s, p: sam.update(g, s, p, loss_fn=both), grads, sam.init(params),
                 params)
  assert traced == {"batch": 1, "example": 0}
