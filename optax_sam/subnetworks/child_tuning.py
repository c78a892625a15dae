"""Child-Tuning: update only a child network, drawn at random (F) or from the task (D)."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optax_sam.core import loss as loss_lib
from optax_sam.core import numerics
from optax_sam.core import placement
from optax_sam.core import selection as selection_lib
from optax_sam.fisher import topk
from optax_sam.subnetworks import scope as scope_lib


class ChildTuningFState(NamedTuple):
  """State of :func:`child_tuning_f` (inside ``optax.MaskedState``)."""
  count: jax.Array  # steps taken, for a p_keep schedule
  key: jax.Array  # raw uint32[2] PRNG key, split once per step


def _mix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def bernoulli_masks(key: jax.Array, like: Any, p_keep: jax.Array) -> Any:
  """One ``Bernoulli(p_keep)`` bool mask per leaf of ``like``, from a keyed hash.

  Leaf ``i`` (in ``jax.tree.leaves`` order) gets the raw key ``(k0, k1) =
  jax.random.split(key, num_leaves)[i]``; its entry at flat (row-major) index ``n`` is
  kept when ``h >> 8 < floor(p_keep · 2²⁴)`` with ``h = mix(mix(n ^ k0) + k1)`` and
  ``mix`` MurmurHash3's 32-bit finaliser. Each leaf is thus a fixed function of the
  key and the index: reproducible from the seed, and the same however the leaf is
  sharded. ``p_keep`` is resolved to ``2⁻²⁴`` (``jax.random.bernoulli`` to ``2⁻²³``).
  Threefry, JAX's default generator, spends about fifty integer operations per 32 random
  bits; the hash about twenty, which is what makes a per-step mask over every parameter
  cheap (on CPU a tenth of threefry's time). Not for cryptography.
  """
  leaves, treedef = jax.tree.flatten(like)
  keys = jax.random.split(key, len(leaves))
  threshold = jnp.floor(jnp.asarray(p_keep, jnp.float32) * 2.0**24).astype(jnp.uint32)
  masks = []
  for k, x in zip(keys, leaves):
    shape = jnp.shape(x)
    size = math.prod(shape)
    if size >= 2**32:
      raise ValueError(f"bernoulli_masks: a leaf of {size} entries is more than the "
                       "hash's 32-bit index can count.")
    index = placement.index_like(x)
    hashed = _mix32(_mix32(index ^ k[0]) + k[1])
    masks.append((hashed >> 8) < threshold)
  return jax.tree.unflatten(treedef, masks)


def _child_tuning_f_all_leaves(p_keep: numerics.ScalarOrSchedule,
                               seed: int) -> optax.GradientTransformation:

  def init_fn(params: optax.Params) -> ChildTuningFState:
    del params
    return ChildTuningFState(count=jnp.zeros((), jnp.int32), key=jax.random.PRNGKey(seed))

  def update_fn(updates, state, params=None):
    del params
    keep = numerics.value_at(p_keep, state.count)
    key, mask_key = jax.random.split(state.key)
    masks = bernoulli_masks(mask_key, updates, keep)
    scale = 1.0 / keep
    scaled = jax.tree.map(
        lambda g, m: jnp.where(m, g.astype(jnp.float32) * scale, 0.0).astype(g.dtype),
        updates, masks)
    return scaled, ChildTuningFState(count=optax.safe_increment(state.count), key=key)

  return optax.GradientTransformation(init_fn, update_fn)


def child_tuning_f(
    p_keep: numerics.ScalarOrSchedule = 0.3,
    seed: int = 0,
    *,
    scope: Optional[selection_lib.Selection] = None,
) -> optax.GradientTransformationExtraArgs:
  """Child-Tuning_F: each step, keep each gradient entry with probability ``p_keep``.

  The in-scope gradient is multiplied by a fresh ``Bernoulli(p_keep) / p_keep`` mask
  every step, an unbiased, task-free random child network. The key is in the state
  (``jax.random.PRNGKey(seed)``, split as ``key, mask_key = jax.random.split(key)`` each
  step; the masks are :func:`bernoulli_masks` of ``mask_key`` over the in-scope leaves),
  so the transform is pure and reproducible. Place it before the base optimizer; like
  the authors' ``ChildTuningAdamW``, momentum and weight decay still move the dropped
  entries.

  Cost: no extra pass; the masks come from a keyed integer hash of each entry's index
  (:func:`bernoulli_masks`), a few operations per entry rather than threefry's many.
  Extra state: a PRNG key and a step count.

  Args:
    p_keep: probability in ``(0, 1]`` of keeping an entry (the paper's ``p_F``; 0.3),
      a constant or a schedule.
    seed: seed of the masks.
    scope: the masked parameters (predicate on paths or pytree of bools). Default
      :func:`optax_sam.subnetworks.all_matrices`: every parameter with at least two
      axes, embedding tables included. The paper's BERT setting is
      ``scope=optax_sam.subnetworks.encoder_dense_kernels``; the authors' code masks
      every parameter its optimizer holds (``scope=lambda path, leaf: True``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (extra arguments are ignored); its state
    is an ``optax.MaskedState`` around a :class:`ChildTuningFState`.

  References:
    Xu et al., `Raise a Child in Large Language Model: Towards Effective and
    Generalizable Fine-tuning <https://arxiv.org/abs/2109.05687>`_, EMNLP 2021.

  Example:
    >>> import jax.numpy as jnp, optax, optax_sam
    >>> params = {"encoder": {"kernel": jnp.ones((2, 3))}, "head": jnp.ones(3)}
    >>> tx = optax.chain(optax_sam.child_tuning_f(p_keep=0.5), optax.adamw(1e-3))
    >>> updates, state = tx.update(params, tx.init(params), params)
  """
  numerics.check_range("p_keep", p_keep, low=0.0, high=1.0, low_inclusive=False,
                       schedule=True)
  numerics.check_seed(seed)
  return optax.masked(_child_tuning_f_all_leaves(p_keep, seed),
                      scope_lib.resolve_scope(scope, "child_tuning_f"))


class ChildTuningDState(NamedTuple):
  mask: Any  # the fixed bool mask, shaped like (or broadcastable to) the parameters


def child_tuning_d(mask: Any) -> optax.GradientTransformationExtraArgs:
  """Child-Tuning_D: multiply the gradient by a fixed mask chosen before training.

  Build the mask with :func:`child_tuning_d_mask` (the task-driven child network: the
  entries with the largest accumulated squared gradients). The gradient is not
  rescaled. The mask lives in the state, not in the compiled program, so a large model's
  mask is an argument of the jitted step rather than a constant folded into it.

  Cost: no extra pass. Extra state: the mask (one bool per parameter, placed like the
  parameter).

  Args:
    mask: a pytree with the parameters' structure whose leaves are bool arrays (or
      Python bools, or anything broadcastable to the leaf): True where the gradient is
      kept.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (extra arguments are ignored).

  References:
    Xu et al., `Raise a Child in Large Language Model: Towards Effective and
    Generalizable Fine-tuning <https://arxiv.org/abs/2109.05687>`_, EMNLP 2021.

  Example:
    >>> import jax.numpy as jnp, optax_sam
    >>> params = {"kernel": jnp.ones(3), "bias": jnp.ones(1)}
    >>> tx = optax_sam.child_tuning_d({"kernel": jnp.array([True, False, True]),
    ...                                "bias": True})
    >>> tx.update(params, tx.init(params))[0]["kernel"]
    Array([1., 0., 1.], dtype=float32)
  """

  def init_fn(params: optax.Params) -> ChildTuningDState:
    if not jax.tree.leaves(params):
      # optax.tree.map_params's placeholder (or no parameters at all): the mask is a
      # tree shaped like the parameters, which is what the placeholder stands for.
      return ChildTuningDState(mask=params)
    try:
      # Placed like each parameter, so that a sharded parameter's mask is sharded too.
      fixed = jax.tree.map(lambda p, m: placement.broadcast_like(m, p, bool), params, mask)
    except (ValueError, TypeError) as error:
      raise ValueError(
          f"child_tuning_d: mask must have the structure of the parameters with bool "
          f"leaves broadcastable to each parameter: {error}") from None
    return ChildTuningDState(mask=fixed)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    masked = jax.tree.map(lambda g, m: g * m.astype(g.dtype), updates, state.mask)
    return masked, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def child_tuning_d_mask(
    loss_fn_for: Callable[[Any], loss_lib.LossFn],
    params: Any,
    batches: Iterable[Any],
    keep_ratio: float = 0.3,
    scope: Optional[selection_lib.Selection] = None,
) -> Any:
  """Child-Tuning_D's child network: the top ``keep_ratio`` of accumulated ``g²``.

  One pass over ``batches`` at fixed ``params`` accumulates, for the in-scope
  parameters, the squared gradient of each batch's mean loss
  (``F = Σ_batches (∇L_batch)²``, the authors' Fisher estimate); then one **global**
  top-k over all in-scope entries keeps the ``keep_ratio`` fraction with the largest
  ``F`` (a threshold, no sort; ties kept). Out-of-scope parameters are kept entirely.
  The gradient step is jitted once per distinct batch shape.

  Args:
    loss_fn_for: ``batch -> loss_fn``, where ``loss_fn(params)`` returns the batch's
      per-example losses (their mean is differentiated) or its scalar loss (use that to
      exclude padding with a masked mean). It is traced under ``jax.jit``.
    params: the pre-trained parameters.
    batches: an iterable of batches, typically one epoch of the training data (wrap it
      in a progress bar such as ``tqdm.tqdm(batches)`` to watch the pass).
    keep_ratio: fraction in ``(0, 1]`` of the in-scope entries to keep (the paper's
      ``p_D``; 0.3).
    scope: the parameters that compete (predicate on paths or pytree of bools). Default
      :func:`optax_sam.subnetworks.all_matrices`: every parameter with at least two
      axes, embedding tables included. The paper's BERT setting is
      ``scope=optax_sam.subnetworks.encoder_dense_kernels``; the authors' code pools
      every parameter whose name contains ``layer`` (LayerNorms and biases of the
      encoder layers too).

  Returns:
    A pytree of bool arrays shaped like ``params``, for :func:`child_tuning_d`.

  Example:
    >>> import jax.numpy as jnp, optax_sam
    >>> params = {"encoder": {"kernel": jnp.zeros((2, 2))}, "head": jnp.zeros(2)}
    >>> batches = [jnp.array([[1.0, 2.0], [0.5, 3.0]])] * 3
    >>> loss_fn_for = lambda x: lambda p: x @ p["encoder"]["kernel"] @ jnp.ones(2)
    >>> mask = optax_sam.child_tuning_d_mask(loss_fn_for, params, batches, keep_ratio=0.5)
    >>> mask["encoder"]["kernel"]
    Array([[False, False],
           [ True,  True]], dtype=bool)
  """
  numerics.check_static_number("keep_ratio", keep_ratio, "the number of kept entries")
  numerics.check_range("keep_ratio", keep_ratio, low=0.0, high=1.0, low_inclusive=False)
  in_scope = scope_lib.resolve_scope(scope, "child_tuning_d_mask")(params)

  def pooled(tree):
    return jax.tree.map(lambda x, chosen: x if chosen else None, tree, in_scope)

  @jax.jit
  def accumulate(total, params, batch):
    loss_fn = loss_fn_for(batch)
    grads = jax.grad(lambda p: loss_lib.batch_mean(loss_fn(p)))(params)
    return jax.tree.map(lambda t, g: t + jnp.square(g.astype(jnp.float32)), total,
                        pooled(grads))

  total = jax.tree.map(lambda p: placement.zeros_like(p, jnp.float32), pooled(params))
  seen = 0
  for batch in batches:
    total = accumulate(total, params, batch)
    seen += 1
  if not seen:
    raise ValueError("child_tuning_d_mask: batches is empty; pass the training batches.")

  scores = jax.tree.map(lambda p, t: jnp.zeros((), jnp.float32) if t is None else t,
                        params, total, is_leaf=lambda x: x is None)
  kept = topk.global_topk_mask(scores, in_scope, keep_ratio)
  return jax.tree.map(lambda p, m: placement.broadcast_like(m, p, bool), params, kept)

