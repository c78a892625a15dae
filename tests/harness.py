"""A small problem every method is tested on, THE method registry, and float64 twins.

The model is softmax regression on a fixed random batch: ``params = {"kernel": [D, C],
"bias": [C]}``, per-example cross-entropy losses. ``METHODS`` lists every method of the
library once, with what the generic tests need to know about it; a generic test runs
over ``each_method(...)``. ``numpy_*`` functions compute the same quantities in float64
from first principles, for references written from METHODS.md.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

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


# ------------------------------- the method registry -------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Method:
  """One method as the generic tests see it.

  Attributes:
    id: the test id.
    factory: the library constructor.
    kwargs: fixed keyword arguments: sizes and periods small enough that the toy
      problem exercises the whole method within three steps.
    static_args: what ``optax.inject_hyperparams`` must keep static (arguments that fix
      shapes, loop lengths or Python control flow).
    schedules: the float hyperparameters that accept a schedule; the generic tests vary
      the first (the "live" one). Every other float hyperparameter must refuse one.
    sharpness_aware: takes ``rho``, needs ``loss_fn``, takes ``axis_name``.
    per_example: its ``loss_fn`` is a ``PerExampleLoss`` (it differentiates examples one
      by one); otherwise the batched forward pass.
    reads_clean_gradient: whether the output of a first step depends on the clean
      gradient's values (δ-SAM and per-instance SAM do not read them at all, unless
      amortised, whose later steps do).
    wraps_base: the constructor takes the base optimizer first (``dps_frozen``).
    params_transform: ``(params, opt_state) -> params`` the training loss sees (Mixout's
      mixed weights); the whole-step tests apply it.
    loss_calls: ``(evaluations, traces)`` of ``loss_fn`` per update, for the
      micro-batching tests; ``None`` where micro-batching does not apply.
    reorder_tolerance: factor on the tolerances of the tests that compare one step
      computed in two orders (micro-batches, devices).
  """

  id: str
  factory: Callable[..., optax.GradientTransformation]
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  static_args: tuple[str, ...] = ()
  schedules: tuple[str, ...] = ()
  sharpness_aware: bool = False
  per_example: bool = False
  reads_clean_gradient: bool = True
  wraps_base: bool = False
  params_transform: Optional[Callable[[Any, Any], Any]] = None
  loss_calls: Optional[tuple[int, int]] = None
  reorder_tolerance: float = 1.0

  @property
  def perturb_every(self) -> int:
    """The amortisation period: only every k-th step reads ``rho``."""
    return self.kwargs.get("perturb_every") or 1

  @property
  def live(self) -> Optional[str]:
    """The hyperparameter the tests change and schedule (``rho``, ``p_keep``), if any."""
    return self.schedules[0] if self.schedules else None

  def _arguments(self, overrides):
    base = (optax.identity(),) if self.wraps_base else ()
    return base, {**self.kwargs, **overrides}

  def transform(self, **overrides) -> optax.GradientTransformation:
    """The method, to chain before a base optimizer (``dps_frozen`` around identity)."""
    base, kwargs = self._arguments(overrides)
    return self.factory(*base, **kwargs)

  def with_live(self, value, **overrides) -> optax.GradientTransformation:
    """:meth:`transform` with the live hyperparameter set to ``value`` (if it has one)."""
    live = {self.live: value} if self.live else {}
    return self.transform(**live, **overrides)

  def injected(self, value, **overrides) -> optax.GradientTransformation:
    """:meth:`with_live` through ``optax.inject_hyperparams``."""
    base, kwargs = self._arguments(overrides)
    if self.live:
      kwargs[self.live] = value
    factory = optax.inject_hyperparams(self.factory, static_args=self.static_args)
    return factory(*base, **kwargs)

  def optimizer(self, base: optax.GradientTransformation,
                **overrides) -> optax.GradientTransformation:
    """The method before ``base`` (for ``dps_frozen``: around it)."""
    if self.wraps_base:
      return self.factory(base, **{**self.kwargs, **overrides})
    return optax.chain(self.transform(**overrides), base)

  def loss_fn(self, batch):
    return (per_example_loss_fn if self.per_example else batch_loss_fn)(batch)

  def float_hyperparameters(self) -> list[str]:
    """The constructor's arguments whose default is a float."""
    return [name for name, p in inspect.signature(self.factory).parameters.items()
            if isinstance(p.default, float)]


FSAM_STATIC = ("keep_ratio", "mask_every", "fisher_samples", "fisher_chunk_size")
DPS = dict(total_steps=8, update_ratio=0.25, exclude_ratio=0.5)  # stages of 2 steps
DPS_STATIC = ("total_steps", "update_ratio", "exclude_ratio")
# Child-Tuning_D's fixed mask for the toy problem's parameters.
CHILD_MASK = {"kernel": np.arange(FEATURES * CLASSES).reshape(FEATURES, CLASSES) % 3 != 0,
              "bias": True}

METHODS: tuple[Method, ...] = (
    Method("sam", optax_sam.sam, schedules=("rho",), sharpness_aware=True,
           loss_calls=(1, 1)),
    Method("asam", optax_sam.asam, {"eta": 0.01}, schedules=("rho",),
           sharpness_aware=True, loss_calls=(1, 1)),
    Method("fsam_per_example", optax_sam.fsam,
           dict(keep_ratio=0.5, mask_every=2, fisher="per_example", fisher_samples=6,
                fisher_chunk_size=4),
           FSAM_STATIC, ("rho",), sharpness_aware=True, per_example=True),
    Method("fsam_squared_gradient", optax_sam.fsam,
           dict(keep_ratio=0.5, mask_every=2, fisher="squared_gradient"), FSAM_STATIC,
           ("rho",), sharpness_aware=True, loss_calls=(1, 1)),
    # GA-SAM's two extra ascent steps run in a fori_loop: evaluated twice, traced once.
    Method("gasam_1", optax_sam.gasam, dict(ascent_steps=1, beta=0.9), ("ascent_steps",),
           ("rho",), sharpness_aware=True, loss_calls=(1, 1)),
    Method("gasam_3", optax_sam.gasam, dict(ascent_steps=3, beta=0.9), ("ascent_steps",),
           ("rho",), sharpness_aware=True, loss_calls=(3, 2)),
    # δ-SAM evaluates the loss at w (with its VJP), w + r, w - r and w + ε. Its weights
    # are second differences of float32 losses: summing those in another order moves
    # the step by a few 1e-6 of its size, not of each entry.
    Method("delta_sam", optax_sam.delta_sam, {"seed": 7}, schedules=("rho", "eta"),
           sharpness_aware=True, reads_clean_gradient=False, loss_calls=(4, 4),
           reorder_tolerance=4.0),
    # Amortised (LookSAM) steps: the first step perturbs, the second reuses g_v. δ-SAM's
    # first step, as every step of δ-SAM, does not read the clean gradient's values.
    # LookSAM rescales g_v to α‖g‖, so float32 noise in δ-SAM's perturbed gradient grows
    # by ‖g‖/‖g_v‖ (about 20 here at ρ = 0.3, 120 at ρ = 0.05) in the steps between.
    # The same amplification reaches SAM's g_v once its sums run over a sharded axis.
    Method("sam_looksam", optax_sam.sam, dict(perturb_every=2, reuse_alpha=0.7),
           ("perturb_every",), ("rho",), sharpness_aware=True, loss_calls=(1, 1),
           reorder_tolerance=25.0),
    Method("delta_sam_looksam", optax_sam.delta_sam,
           dict(rho=0.3, seed=7, perturb_every=2, reuse_alpha=0.7), ("perturb_every",),
           ("rho", "eta"), sharpness_aware=True, reads_clean_gradient=False,
           loss_calls=(4, 4), reorder_tolerance=25.0),
    Method("per_instance_sam", optax_sam.per_instance_sam, {"chunk_size": 3},
           ("chunk_size",), ("rho",), sharpness_aware=True, per_example=True,
           reads_clean_gradient=False),
    Method("dps", optax_sam.dps, DPS, DPS_STATIC),
    Method("dps_frozen", optax_sam.dps_frozen, DPS, DPS_STATIC, wraps_base=True),
    Method("child_tuning_f", optax_sam.child_tuning_f, {"seed": 3}, schedules=("p_keep",)),
    Method("child_tuning_d", optax_sam.child_tuning_d, {"mask": CHILD_MASK}),
    Method("mixout", optax_sam.mixout, {"p": 0.4, "seed": 2},
           params_transform=optax_sam.mixout_params),
    Method("dps_mix", optax_sam.dps_mix, DPS, DPS_STATIC,
           params_transform=optax_sam.mixout_params),
)


def each_method(where: Callable[[Method], bool] = lambda method: True) -> list:
  """``pytest.param`` per registry entry that ``where`` admits, with the entry's id."""
  return [pytest.param(m, id=m.id) for m in METHODS if where(m)]


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


def jitted_step(tx, make_loss_fn, traces=None, params_transform=None):
  """A jitted ``(params, state, batch) -> (params, state)`` step of ``tx``.

  ``make_loss_fn(batch)`` builds the loss_fn; each trace appends to ``traces`` if given.
  With ``params_transform``, the clean gradient is that of the loss of
  ``params_transform(params, state)`` (Mixout's mixed weights).
  """
  @jax.jit
  def step(params, state, batch):
    if traces is not None:
      traces.append(1)
    loss_fn = make_loss_fn(batch)
    seen = loss_fn if params_transform is None else (
        lambda p: loss_fn(params_transform(p, state)))
    grads = clean_grads(seen, params)
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), state
  return step


def run_steps(step, tx, params, batch, steps, sharding=None):
  """``steps`` calls of ``step`` from ``tx.init``; params and state put on ``sharding``.

  Returns the final ``(params, state)``.
  """
  state = tx.init(params)
  if sharding is not None:
    params, state = jax.device_put((params, state), sharding)
  for _ in range(steps):
    params, state = step(params, state, batch)
  return params, state


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
                               rtol=rtol, atol=atol, strict=True)


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
