"""The README quickstart: FSAM + AdamW on a small softmax-regression problem.

Run: python examples/quickstart.py
"""

import jax
import jax.numpy as jnp
import optax

import optax_sam


def per_example_loss(params, batch, key):
  """Cross-entropy of each example, with dropout on the inputs."""
  keep = jax.random.bernoulli(key, 0.9, batch["x"].shape)
  x = jnp.where(keep, batch["x"] / 0.9, 0.0)
  logits = x @ params["kernel"] + params["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


def main() -> None:
  data_key, init_key, step_key = jax.random.split(jax.random.PRNGKey(0), 3)
  true_kernel = jax.random.normal(data_key, (20, 4))
  x = jax.random.normal(init_key, (512, 20))
  batch = {"x": x, "y": jnp.argmax(x @ true_kernel, axis=1)}
  params = {"kernel": jnp.zeros((20, 4)), "bias": jnp.zeros(4)}

  tx = optax.chain(
      optax_sam.fsam(rho=0.05, keep_ratio=0.1, mask_every=100),
      optax.adamw(1e-2, weight_decay=0.01),
  )
  state = tx.init(params)

  @jax.jit
  def train_step(params, state, batch, key):
    loss_fn = lambda p: per_example_loss(p, batch, key)  # -> shape [batch]
    grads = jax.grad(lambda p: loss_fn(p).mean())(params)
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), state

  for step in range(201):
    params, state = train_step(params, state, batch, jax.random.fold_in(step_key, step))
    if step % 50 == 0:
      loss = per_example_loss(params, batch, jax.random.PRNGKey(1)).mean()
      print(f"step {step:3d}  loss {float(loss):.4f}")
  accuracy = jnp.mean(jnp.argmax(batch["x"] @ params["kernel"] + params["bias"], 1)
                      == batch["y"])
  print(f"train accuracy {float(accuracy):.3f}")


if __name__ == "__main__":
  main()
