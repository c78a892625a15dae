"""The ``loss_fn`` calling convention shared by every method.

Methods that need more than the clean gradient receive the loss as an extra argument::

  updates, state = tx.update(grads, state, params, loss_fn=loss_fn)

``loss_fn`` takes the parameters and returns the loss of each example of the current
batch, shape ``[batch]`` (a scalar loss is accepted by methods that only need the batch
gradient). It must close over the same batch and dropout key the caller used for the
clean gradient. An optional extra argument ``example_mask`` (shape ``[batch]``, 1 for real
rows, 0 for padding) makes every batch mean a masked mean.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from optax_sam.core import placement

LossFn = Callable[[Any], jax.Array]

_CALLING_CONVENTION = (
    "pass it as a keyword argument: tx.update(grads, state, params, "
    "loss_fn=lambda p: per_example_losses(p, batch)), where the function returns the "
    "loss of each example of the batch the gradient came from (shape [batch])")


class PerExampleLoss:
  """A ``loss_fn`` built from a single-example loss, with fast per-example gradients.

  Calling it returns the per-example losses of ``batch``, so it satisfies the
  ``loss_fn`` convention: by mapping ``example_loss`` over the leading axis with
  ``jax.vmap``, or with one call of ``batch_loss`` when given. Methods that need
  per-example gradients (the per-example Fisher of ``fsam``, ``per_instance_sam``)
  recognise it and differentiate each example on its own through ``example_loss``,
  which costs one backward pass per example rather than one backward pass of the whole
  batch per example.

  Args:
    example_loss: ``(params, example) -> scalar``; ``example`` is one row of ``batch``.
      Put a per-example dropout key in ``batch`` if the model needs one.
    batch: a pytree whose leaves share a leading batch axis.
    batch_loss: optional ``(params, batch) -> [batch]`` per-example losses from one
      batched call, used for the whole-batch passes (the clean gradient, the gradient
      at ``w + ε``) instead of the ``vmap`` of ``example_loss``. Give it when the model
      already has a batched loss whose program differs from the ``vmap`` (a fused or
      sharded attention kernel, sharding annotations on the batch axis): the
      whole-batch passes then run that program, and only the per-example passes use
      ``example_loss``. It must return what the ``vmap`` of ``example_loss`` returns;
      nothing checks that. Under FSDP with explicit mesh axes (parameters split over a
      mesh axis the batch is split over too), the ``vmap`` first gathers the
      parameters over that axis, all of them at once; a ``batch_loss`` that gathers
      layer by layer keeps less of the model on each device.

  Example:
    >>> import jax.numpy as jnp, optax_sam
    >>> batch = {"x": jnp.ones((4, 3)), "y": jnp.zeros(4)}
    >>> loss = lambda p, ex: (ex["x"] @ p - ex["y"]) ** 2
    >>> optax_sam.PerExampleLoss(loss, batch)(jnp.ones(3)).shape
    (4,)
    >>> batched = lambda p, b: (b["x"] @ p - b["y"]) ** 2  # the same losses, one call
    >>> optax_sam.PerExampleLoss(loss, batch, batch_loss=batched)(jnp.ones(3)).shape
    (4,)
  """

  def __init__(self, example_loss: Callable[[Any, Any], jax.Array], batch: Any, *,
               batch_loss: Optional[Callable[[Any, Any], jax.Array]] = None):
    sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
    if len(sizes) != 1:
      raise ValueError(
          f"PerExampleLoss: every leaf of batch needs the same leading (batch) axis, "
          f"got sizes {sorted(sizes)}.")
    self.example_loss = example_loss
    self.batch_loss = batch_loss
    self.batch = jax.tree.map(jnp.asarray, batch)  # NumPy rows cannot be picked by a tracer
    self.batch_size = sizes.pop()

  def __call__(self, params: Any) -> jax.Array:
    if self.batch_loss is not None:
      return self.batch_loss(params, self.batch)
    # Under FSDP with explicit mesh axes, jax.vmap cannot map a batch axis split over
    # a mesh axis that the (unmapped) parameters are split over too.
    params = placement.gather_over(params, placement.leading_axes(self.batch))
    return jax.vmap(self.example_loss, in_axes=(None, 0))(params, self.batch)

  def example(self, index: jax.Array) -> Any:
    """Row ``index`` of the batch (``index`` may be traced)."""
    return jax.tree.map(lambda x: x[index], self.batch)


def require_loss_fn(loss_fn: Optional[LossFn], method: str) -> LossFn:
  """Raises a ``TypeError`` that says what to pass when ``loss_fn`` is missing."""
  if loss_fn is None:
    raise TypeError(f"{method} needs the loss of the current batch: {_CALLING_CONVENTION}.")
  if not callable(loss_fn):
    raise TypeError(f"{method}: loss_fn must be callable, got {type(loss_fn).__name__}; "
                    f"{_CALLING_CONVENTION}.")
  return loss_fn


def require_params(params: Any, method: str) -> Any:
  if params is None:
    raise ValueError(f"{method} needs the current parameters: call "
                     "tx.update(grads, state, params, loss_fn=...).")
  return params


def per_example_losses(loss_fn: LossFn, params: Any, method: str) -> jax.Array:
  """Calls ``loss_fn`` and checks that it returned one loss per example."""
  losses = loss_fn(params)
  if jnp.ndim(losses) != 1:
    raise ValueError(
        f"{method} needs per-example losses, but loss_fn returned shape "
        f"{jnp.shape(losses)}. Return the unreduced loss of each example (shape "
        f"[batch]), e.g. optax.softmax_cross_entropy_with_integer_labels(logits, labels) "
        f"without the .mean().")
  return losses


def batch_mean(losses: jax.Array, example_mask: Optional[jax.Array] = None) -> jax.Array:
  """Mean of ``losses`` over real examples; a scalar loss is returned as it is.

  Accumulated in float32. With ``example_mask`` (1 real, 0 padding), padded rows count
  for nothing; an all-padding batch gives 0 rather than NaN.
  """
  losses = jnp.asarray(losses).astype(jnp.float32)
  if losses.ndim == 0:
    return losses
  if example_mask is None:
    return jnp.mean(losses)
  if losses.ndim != 1:
    # A [batch, 1] loss times a [batch] mask would broadcast to [batch, batch].
    raise ValueError(
        f"loss_fn returned losses of shape {losses.shape} together with an example_mask "
        f"of shape {jnp.shape(example_mask)}: return one loss per example, shape "
        f"[batch] (squeeze the trailing axis), so that each is weighted by its row of "
        f"the mask.")
  check_example_mask(example_mask, losses.shape[0])
  weights = jnp.asarray(example_mask, jnp.float32)
  return jnp.sum(losses * weights) / example_count(example_mask, losses.shape[0])


def example_count(example_mask: Optional[jax.Array], batch_size: int) -> jax.Array:
  """What a (masked) batch mean divides by, in float32.

  ``batch_size`` without a mask; with ``example_mask`` (1 real, 0 padding) the number of
  real rows, at least 1, so that an all-padding batch gives 0 rather than NaN.
  """
  if example_mask is None:
    return jnp.asarray(batch_size, jnp.float32)
  check_example_mask(example_mask, batch_size)
  return jnp.maximum(jnp.sum(jnp.asarray(example_mask, jnp.float32)), 1.0)


def check_example_mask(example_mask: Optional[jax.Array], batch_size: int) -> None:
  """Raises ``ValueError`` unless ``example_mask`` is ``None`` or has shape
  ``[batch_size]`` (checked while tracing: shapes are static)."""
  if example_mask is not None and jnp.shape(example_mask) != (batch_size,):
    raise ValueError(
        f"example_mask has shape {jnp.shape(example_mask)}, but loss_fn's batch has "
        f"{batch_size} examples: pass one entry per example, shape ({batch_size},), 1 "
        f"for a real row and 0 for padding.")


def mean_loss_gradient(loss_fn: LossFn, params: Any,
                       example_mask: Optional[jax.Array] = None) -> Any:
  """Gradient of the (masked) batch-mean loss, in the dtypes of ``params``."""
  return jax.grad(lambda p: batch_mean(loss_fn(p), example_mask))(params)


def microbatched_loss(
    batch_loss: Callable[[Any, Any], jax.Array],
    batch: Any,
    num_microbatches: int,
) -> LossFn:
  """A ``loss_fn`` that evaluates ``batch`` in ``num_microbatches`` sequential pieces.

  This is the gradient-accumulation path for the sharpness-aware methods. Wrapping them
  in ``optax.MultiSteps`` is wrong for SAM: MultiSteps calls the inner transform on every
  micro-step (discarding all but the last result), so the second gradient pass runs
  k times per update and the one that is kept sees only the last micro-batch. Instead,
  build the loss of the whole batch from micro-batches: the forward and backward passes
  run one micro-batch at a time under ``lax.scan`` with ``jax.checkpoint``, so activation
  memory is that of one micro-batch, and both the clean gradient and the gradient at
  ``w + ε`` are exactly those of the full batch, each computed once.

  Args:
    batch_loss: ``(params, microbatch) -> per-example losses [micro_batch]``.
    batch: pytree whose leaves share a leading axis divisible by ``num_microbatches``.
    num_microbatches: how many pieces to split the batch into.

  Returns:
    ``loss_fn(params) -> [batch]`` per-example losses, in batch order.

  Example:
    >>> import jax, jax.numpy as jnp, optax_sam
    >>> batch = {"x": jnp.ones((8, 3)), "y": jnp.zeros(8)}
    >>> per_batch = lambda p, b: (b["x"] @ p - b["y"]) ** 2
    >>> loss_fn = optax_sam.microbatched_loss(per_batch, batch, num_microbatches=4)
    >>> loss_fn(jnp.ones(3)).shape
    (8,)
  """
  if isinstance(num_microbatches, bool) or not isinstance(num_microbatches, int) \
      or num_microbatches < 1:
    raise ValueError(f"num_microbatches must be an integer >= 1, got {num_microbatches!r}.")
  sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
  if len(sizes) != 1 or next(iter(sizes)) % num_microbatches:
    raise ValueError(
        f"microbatched_loss: every leaf of batch needs the same leading axis, divisible "
        f"by num_microbatches={num_microbatches}; got leading sizes {sorted(sizes)}.")
  size = sizes.pop()
  pieces = jax.tree.map(
      lambda x: x.reshape((num_microbatches, size // num_microbatches) + x.shape[1:]),
      batch)

  def loss_fn(params: Any) -> jax.Array:
    body = jax.checkpoint(lambda micro: batch_loss(params, micro))
    return jax.lax.map(body, pieces).reshape(size)

  return loss_fn
