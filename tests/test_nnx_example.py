"""The Flax examples: the NNX quickstart and the README's "Using it from Flax" snippets."""

import pathlib
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_sam
from examples import nnx_quickstart

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLAX_SECTION = (ROOT / "README.md").read_text().split("## Using it from Flax", 1)[1].split(
    "\n## ", 1)[0]


def _snippet(marker: str) -> str:
  return next(b for b in re.findall(r"```python\n(.*?)```", FLAX_SECTION, flags=re.S)
              if marker in b)


def _toy_batch(size=64):
  x = jax.random.normal(jax.random.PRNGKey(0), (size, 20))
  return {"x": x, "y": jnp.argmax(x[:, :4], axis=1)}


def _mean_loss(logits, batch):
  return float(optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean())


def test_nnx_quickstart_script_runs_and_learns():
  result = subprocess.run([sys.executable, "examples/nnx_quickstart.py"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=True)
  accuracy = float(re.search(r"train accuracy ([0-9.]+)", result.stdout).group(1))
  assert accuracy > 0.8


def test_nnx_step_is_the_functional_step_with_the_same_dropout_key():
  batch, keys = _toy_batch(), [jax.random.PRNGKey(s) for s in range(3)]
  model = nnx_quickstart.Classifier(20, 16, 4, rngs=nnx.Rngs(0))
  tx = optax.chain(optax_sam.sam(0.1), optax.adamw(1e-2))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = jax.tree.map(jnp.copy, params)

  def functional_loss(params, key):  # the same model as a function of its parameters
    logits = nnx.merge(graphdef, params, rest)(batch["x"], rngs=nnx.Rngs(dropout=key))
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

  @jax.jit
  def functional_step(params, state, key):
    loss_fn = lambda p: functional_loss(p, key)
    grads = jax.grad(lambda p: loss_fn(p).mean())(params)
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), state

  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  state = tx.init(params)
  for key in keys:
    nnx_quickstart.train_step(model, optimizer, batch, key)
    params, state = functional_step(params, state, key)
    for got, expected in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                             jax.tree.leaves(params), strict=True):
      np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_readme_linen_snippet_trains():
  class Linen(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      hidden = nn.Dropout(0.1, deterministic=not train)(nn.relu(nn.Dense(32)(x)))
      return nn.Dense(4)(hidden)

  model, batch = Linen(), _toy_batch()
  namespace = {"model": model, "params": model.init(jax.random.PRNGKey(1),
                                                    batch["x"])["params"]}
  exec(_snippet("train_state"), namespace)  # pylint: disable=exec-used
  state = namespace["state"]
  before = _mean_loss(model.apply({"params": state.params}, batch["x"]), batch)
  for step in range(50):
    state = namespace["train_step"](state, batch, jax.random.PRNGKey(step))
  assert int(state.step) == 50
  after = _mean_loss(model.apply({"params": state.params}, batch["x"]), batch)
  assert after < 0.8 * before


def test_readme_nnx_snippet_trains():
  model, batch = nnx_quickstart.Classifier(20, 32, 4, rngs=nnx.Rngs(1)), _toy_batch()
  namespace = {"model": model}
  exec("import optax, optax_sam\n" + _snippet("nnx.Optimizer"),  # pylint: disable=exec-used
       namespace)
  model.eval()
  before = _mean_loss(model(batch["x"]), batch)
  model.train()
  for step in range(50):
    namespace["train_step"](model, namespace["optimizer"], batch, jax.random.PRNGKey(step))
  model.eval()
  assert _mean_loss(model(batch["x"]), batch) < 0.8 * before
