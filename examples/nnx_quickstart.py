"""FSAM + AdamW on a small Flax NNX model, through ``nnx.Optimizer``.

``nnx.Optimizer.update(model, grads, **kwargs)`` forwards ``loss_fn=`` to ``tx.update``,
but ``tx.update`` works on the pure parameter state, not on the module: the ``loss_fn``
it calls receives that state, so it must merge it back into a module first
(:func:`loss_of_params`).

Run: python examples/nnx_quickstart.py
"""

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import optax_sam


class Classifier(nnx.Module):
  """One hidden layer with dropout; ``rngs`` carries the dropout key of a call."""

  def __init__(self, features: int, hidden: int, classes: int, *, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(features, hidden, rngs=rngs)
    self.dropout = nnx.Dropout(0.1)
    self.out = nnx.Linear(hidden, classes, rngs=rngs)

  def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    return self.out(self.dropout(nnx.relu(self.hidden(x)), rngs=rngs))


def loss_of_params(model: nnx.Module, per_example_loss: Callable[[nnx.Module], jax.Array]
                   ) -> Callable[[nnx.State], jax.Array]:
  """``params -> per_example_loss(model with params)``: the ``loss_fn`` for ``tx.update``."""
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  return lambda params: per_example_loss(nnx.merge(graphdef, params, rest))


@nnx.jit
def train_step(model: Classifier, optimizer: nnx.Optimizer, batch: dict[str, jax.Array],
               key: jax.Array) -> None:
  """One FSAM step, in place; both gradient passes see the same dropout key."""

  def per_example_loss(model):  # -> shape [batch]
    logits = model(batch["x"], rngs=nnx.Rngs(dropout=key))
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

  grads = nnx.grad(lambda model: per_example_loss(model).mean())(model)
  optimizer.update(model, grads, loss_fn=loss_of_params(model, per_example_loss))


def main() -> None:
  data_key, init_key, step_key = jax.random.split(jax.random.PRNGKey(0), 3)
  true_kernel = jax.random.normal(data_key, (20, 4))
  x = jax.random.normal(init_key, (512, 20))
  batch = {"x": x, "y": jnp.argmax(x @ true_kernel, axis=1)}

  model = Classifier(20, 64, 4, rngs=nnx.Rngs(0))
  tx = optax.chain(
      optax_sam.fsam(rho=0.05, keep_ratio=0.1, mask_every=100),
      optax.adamw(1e-2, weight_decay=0.01),
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  for step in range(201):
    train_step(model, optimizer, batch, jax.random.fold_in(step_key, step))
    if step % 50 == 0:
      logits = model(batch["x"], rngs=nnx.Rngs(dropout=1))
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
      print(f"step {step:3d}  loss {float(loss):.4f}")
  model.eval()  # dropout off
  accuracy = jnp.mean(jnp.argmax(model(batch["x"]), axis=1) == batch["y"])
  print(f"train accuracy {float(accuracy):.3f}")


if __name__ == "__main__":
  main()
