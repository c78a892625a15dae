"""Bad input fails early, with a message that names the argument and what is allowed."""

from __future__ import annotations

import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sam
from optax_sam import perturbations
from tests import harness


@pytest.mark.parametrize("build, message", [
    (lambda: optax_sam.sam(rho=-1.0), "rho must be in [0.0, inf)"),
    (lambda: optax_sam.sam(rho=0.05, eps=0.0), "eps must be in (0.0, inf)"),
    (lambda: optax_sam.asam(rho=0.5, eta=-1.0), "eta must be in [0.0, inf)"),
    (lambda: optax_sam.fsam(keep_ratio=0.0), "keep_ratio must be in (0.0, 1.0]"),
    (lambda: optax_sam.fsam(keep_ratio=1.5), "keep_ratio must be in (0.0, 1.0]"),
    (lambda: optax_sam.fsam(mask_every=0), "mask_every must be an integer >= 1"),
    (lambda: optax_sam.fsam(mask_every=2.5), "mask_every must be an integer >= 1"),
    (lambda: optax_sam.fsam(fisher="bogus"),
     "fisher must be 'per_example' or 'squared_gradient'"),
    (lambda: optax_sam.fsam(fisher_samples=0), "fisher_samples must be an integer >= 1"),
    (lambda: optax_sam.fsam(fisher_chunk_size=0),
     "fisher_chunk_size must be an integer >= 1"),
    (lambda: optax_sam.gasam(beta=1.0), "beta must be in [0.0, 1.0)"),
    (lambda: optax_sam.gasam(max_scale=0.0), "max_scale must be in (0.0, inf)"),
    (lambda: optax_sam.gasam(ascent_steps=0), "ascent_steps must be an integer >= 1"),
    (lambda: perturbations.scale_to_radius(float("nan")), "rho must be in [0.0, inf)"),
    (lambda: optax_sam.sam(rho=float("inf")), "rho must be in [0.0, inf), got inf"),
    (lambda: optax_sam.delta_sam(eta=float("inf")), "eta must be in (0.0, inf), got inf"),
    (lambda: optax_sam.gasam(max_scale=float("inf")), "max_scale must be in (0.0, inf)"),
    (lambda: optax_sam.dps(100, update_ratio=float("nan")), "update_ratio must be in"),
], ids=lambda x: None if callable(x) else x)
def test_invalid_hyperparameter_raises_value_error(build, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    build()


def test_valid_boundaries_are_accepted():
  optax_sam.sam(rho=0.0)
  optax_sam.asam(eta=0.0)
  optax_sam.fsam(keep_ratio=1.0, mask_every=1, fisher_samples=1, fisher_chunk_size=None)
  optax_sam.gasam(beta=0.0, ascent_steps=1)
  optax_sam.sam(rho=optax.linear_schedule(0.0, 0.1, 10))  # schedules pass unchecked


def _problem():
  params, batch = harness.make_problem()
  loss_fn = harness.batch_loss_fn(batch)
  return params, loss_fn, harness.clean_grads(loss_fn, params)


@pytest.mark.parametrize("method", harness.each_method(lambda m: m.sharpness_aware))
def test_missing_loss_fn_raises_type_error_saying_what_to_pass(method):
  params, _, grads = _problem()
  tx = method.transform()
  state = tx.init(params)
  with pytest.raises(TypeError, match="loss_fn="):
    jax.jit(lambda g, s, p: tx.update(g, s, p))(grads, state, params)
  chained = optax.chain(tx, optax.sgd(0.1))
  with pytest.raises(TypeError, match="loss_fn="):
    jax.eval_shape(lambda g, s, p: chained.update(g, s, p), grads, chained.init(params),
                   params)


def test_non_callable_loss_fn_raises_type_error():
  params, loss_fn, grads = _problem()
  tx = optax_sam.sam(0.05)
  with pytest.raises(TypeError, match="must be callable"):
    tx.update(grads, tx.init(params), params, loss_fn=loss_fn(params))


def test_missing_params_raises():
  params, loss_fn, grads = _problem()
  tx = optax_sam.sam(0.05)
  with pytest.raises(ValueError, match="needs the current parameters"):
    tx.update(grads, tx.init(params), loss_fn=loss_fn)


def test_fsam_per_example_rejects_scalar_loss():
  params, loss_fn, grads = _problem()
  scalar_loss = lambda p: loss_fn(p).mean()
  tx = optax_sam.fsam(0.05, fisher="per_example")
  with pytest.raises(ValueError, match="per-example losses"):
    jax.eval_shape(lambda g, s, p: tx.update(g, s, p, loss_fn=scalar_loss),
                   grads, tx.init(params), params)
  # The squared-gradient estimator needs no per-example losses.
  tx = optax_sam.fsam(0.05, fisher="squared_gradient")
  jax.eval_shape(lambda g, s, p: tx.update(g, s, p, loss_fn=scalar_loss),
                 grads, tx.init(params), params)


def test_sam_accepts_a_scalar_loss():
  params, loss_fn, grads = _problem()
  tx = optax_sam.sam(0.05)

  @jax.jit
  def both(grads, params):
    state = tx.init(params)
    return (tx.update(grads, state, params, loss_fn=lambda p: loss_fn(p).mean())[0],
            tx.update(grads, state, params, loss_fn=loss_fn)[0])

  scalar, per_example = both(grads, params)
  for a, b in zip(jax.tree.leaves(scalar), jax.tree.leaves(per_example)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # ... and it is the perturbed gradient, not the clean one.
  assert max(float(jnp.max(jnp.abs(a - g))) for a, g in
             zip(jax.tree.leaves(scalar), jax.tree.leaves(grads))) > 1e-4


def test_per_example_loss_rejects_mismatched_leading_axes():
  _, batch = harness.make_problem()
  bad = {**batch, "y": batch["y"][:5]}
  with pytest.raises(ValueError, match=r"same leading \(batch\) axis.*\[5, 8\]"):
    optax_sam.PerExampleLoss(harness.example_loss, bad)
  assert optax_sam.PerExampleLoss(harness.example_loss, batch).batch_size == 8


def test_structural_arguments_under_inject_hyperparams_say_use_static_args():
  """inject_hyperparams turns every numeric argument into an array; arguments that fix
  shapes or loop lengths then fail with a message naming static_args."""
  params, loss_fn, grads = _problem()
  with pytest.raises(ValueError, match=re.escape("static_args=('ascent_steps',)")):
    optax.inject_hyperparams(optax_sam.gasam)(rho=0.05).init(params)
  with pytest.raises(ValueError, match=re.escape("static_args=('mask_every',)")):
    optax.inject_hyperparams(optax_sam.fsam)(rho=0.05).init(params)
  # keep_ratio is fine as a concrete array at init, but traced under jit.
  tx = optax.inject_hyperparams(
      optax_sam.fsam, static_args=("mask_every", "fisher_samples", "fisher_chunk_size"))(
          rho=0.05, fisher="squared_gradient")
  state = tx.init(params)
  with pytest.raises(ValueError, match=re.escape("static_args=('keep_ratio',)")):
    jax.eval_shape(lambda g, s, p: tx.update(g, s, p, loss_fn=loss_fn), grads, state, params)


def test_keep_ratio_schedule_is_rejected():
  with pytest.raises(ValueError, match="keep_ratio must be a number, not a schedule"):
    optax_sam.fsam(keep_ratio=optax.constant_schedule(0.5))


# -------------- schedules: accepted where documented, refused elsewhere --------------

def _schedule_cases():
  """(constructor, float argument, accepts a schedule) for every float hyperparameter of
  every registry constructor and of the perturbation pieces."""
  pieces = [
      (perturbations.scale_to_radius, ("rho",)),
      (perturbations.scale_by_parameter_magnitude, ()),
      (perturbations.parameter_magnitude_ellipsoid, ("rho",)),
      (perturbations.fisher_mask, ()),
      (perturbations.gradient_strength_ellipsoid, ("rho",)),
      (perturbations.reweighted_ascent, ("rho", "eta")),
  ]
  constructors = {m.factory: (m, m.schedules) for m in harness.METHODS}
  cases = []
  for factory, (method, schedules) in constructors.items():
    for name in method.float_hyperparameters():
      cases.append(pytest.param(factory, dict(method.kwargs), method.wraps_base, name,
                                name in schedules, id=f"{method.id}-{name}"))
  for factory, schedules in pieces:
    signature = inspect.signature(factory).parameters.items()
    for name in (n for n, p in signature if isinstance(p.default, float)):
      cases.append(pytest.param(factory, {}, False, name, name in schedules,
                                id=f"{factory.__name__}-{name}"))
  return cases


@pytest.mark.parametrize("factory, kwargs, wraps_base, name, accepted", _schedule_cases())
def test_a_schedule_is_accepted_where_documented_and_refused_at_construction_elsewhere(
    factory, kwargs, wraps_base, name, accepted):
  default = inspect.signature(factory).parameters[name].default
  kwargs = {**kwargs, name: optax.constant_schedule(default)}
  base = (optax.identity(),) if wraps_base else ()
  if accepted:
    factory(*base, **kwargs)
  else:
    with pytest.raises(ValueError, match=rf"^{name} .*not a schedule"):
      factory(*base, **kwargs)


# ---------------- errors name the perturbation piece that raised them ----------------

@pytest.mark.parametrize("piece, loss, expected", [
    (lambda: perturbations.reweighted_ascent(0.1), "scalar",
     "reweighted_ascent needs per-example losses"),
    (lambda: optax.chain(perturbations.scale_to_radius(0.1),
                         perturbations.fisher_mask(0.5)), "scalar",
     "fisher_mask with fisher='per_example' needs per-example losses"),
    (lambda: perturbations.gradient_strength_ellipsoid(0.1, ascent_steps=2), None,
     "gradient_strength_ellipsoid with ascent_steps > 1 needs the loss"),
    (lambda: perturbations.reweighted_ascent(0.1), None,
     "reweighted_ascent needs the loss"),
], ids=["reweighting", "fisher_mask", "gradient_strength", "reweighting_no_loss"])
def test_a_composed_perturbation_names_its_piece_and_no_method(piece, loss, expected):
  params, loss_fn, grads = _problem()
  scalar_loss = lambda p: loss_fn(p).mean()
  piece = optax.with_extra_args_support(piece())
  extra = {} if loss is None else {"loss_fn": scalar_loss}
  with pytest.raises((TypeError, ValueError), match=re.escape(expected)) as raised:
    jax.eval_shape(lambda g, s, p: piece.update(g, s, p, **extra), grads,
                   piece.init(params), params)
  for method in ("delta_sam", "fsam", "gasam"):
    assert method not in str(raised.value)
  if loss is None:
    return
  # Through the mechanism the message is the same, and a note names the method.
  tx = optax_sam.sharpness_aware(piece, method="my_method")
  with pytest.raises(ValueError, match=re.escape(expected)) as raised:
    jax.eval_shape(lambda g, s, p: tx.update(g, s, p, **extra), grads, tx.init(params),
                   params)
  assert "(raised while my_method computed its perturbation ε)" in raised.value.__notes__



# ----------------------- shapes of loss_fn's output and example_mask -----------------------

SHARPNESS_AWARE = [m for m in harness.METHODS if m.sharpness_aware]


@pytest.mark.parametrize("method", SHARPNESS_AWARE, ids=lambda m: m.id)
def test_a_column_of_losses_with_an_example_mask_is_refused(method):
  # [batch, 1] losses times a [batch] mask broadcast to [batch, batch]: the gradient
  # would silently come out several times too large.
  params, batch = harness.make_problem()
  column = lambda p: harness.batch_loss_fn(batch)(p)[:, None]
  if method.per_example:
    column = optax_sam.PerExampleLoss(
        lambda p, example: harness.example_loss(p, example)[None], batch)
  tx = method.transform()
  grads = harness.clean_grads(harness.batch_loss_fn(batch), params)
  mask = jnp.ones(harness.BATCH)
  with pytest.raises(ValueError, match=r"shape \[batch\]|per-example losses"):
    jax.jit(lambda g, s, p: tx.update(g, s, p, loss_fn=column, example_mask=mask))(
        grads, tx.init(params), params)


@pytest.mark.parametrize("method", SHARPNESS_AWARE, ids=lambda m: m.id)
def test_an_example_mask_of_the_wrong_length_is_refused(method):
  params, batch = harness.make_problem()
  tx = method.transform()
  loss_fn = method.loss_fn(batch)
  grads = harness.clean_grads(loss_fn, params)
  short = jnp.ones(harness.BATCH - 1)
  with pytest.raises(ValueError, match=re.escape(
      f"example_mask has shape ({harness.BATCH - 1},), but loss_fn's batch has "
      f"{harness.BATCH} examples: pass one entry per example, shape ({harness.BATCH},)")):
    jax.jit(lambda g, s, p: tx.update(g, s, p, loss_fn=loss_fn, example_mask=short))(
        grads, tx.init(params), params)


def test_batch_mean_says_what_shape_it_expected():
  with pytest.raises(ValueError, match=re.escape(
      "loss_fn returned losses of shape (4, 1) together with an example_mask of shape "
      "(4,): return one loss per example, shape [batch]")):
    optax_sam.batch_mean(jnp.ones((4, 1)), jnp.ones(4))
  assert float(optax_sam.batch_mean(jnp.arange(4.0), jnp.array([1, 1, 0, 0]))) == 0.5
