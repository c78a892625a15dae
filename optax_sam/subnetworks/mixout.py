"""Mixout: the loss sees weights mixed toward a target, one input neuron at a time.

Mixout changes the weights the forward pass uses, so it comes in two halves: the
optimizer half (:func:`mixout`, :func:`optax_sam.dps_mix`) keeps the target and the mask
of the coming step in its state, and :func:`mixout_params`, applied to the parameters
inside the training loss, mixes them and masks their gradient.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optax_sam.core import numerics
from optax_sam.core import placement
from optax_sam.core import selection as selection_lib
from optax_sam.subnetworks import scope as scope_lib


class MixoutState(NamedTuple):
  """What :func:`mixout_params` reads: the mixing of the coming step.

  Out-of-scope leaves of ``target`` and ``mask`` are ``optax.MaskedNode``.
  """
  target: Any  # T, the weights mixed in where the mask is False
  mask: Any  # M, bool, True where the trained weight is kept
  p: jax.Array  # float32 mixout probability
  # DPS-Mix's first Stage II step mixes toward the weights of that very step, which the
  # optimizer cannot know one step ahead.
  target_is_params: jax.Array  # bool scalar: use the current parameters as T
  key: jax.Array  # raw uint32[2] PRNG key of the next random mask


def input_neuron_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape of one Bernoulli draw per input neuron of a weight of ``shape``.

  Flax keeps the output features on the last axis (a ``Dense`` kernel is ``[in, out]``),
  so a neuron's outgoing weights are a row: every axis but the last is drawn, the last is
  broadcast. A vector (``ndim <= 1``) is drawn entry by entry, as in the authors' code.
  """
  return shape if len(shape) <= 1 else (*shape[:-1], 1)


def input_neuron_masks(key: jax.Array, like: Any, p_keep: jax.Array) -> Any:
  """One ``Bernoulli(p_keep)`` draw per input neuron of each leaf of ``like``, broadcast.

  Leaf ``i`` (in ``jax.tree.leaves`` order) is ``jax.random.bernoulli(keys[i], p_keep,
  input_neuron_shape(shape))`` broadcast to ``shape``, with ``keys = jax.random.split(key,
  num_leaves)``.
  """
  leaves, treedef = jax.tree.flatten(like)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [
      placement.broadcast_like(
          placement.bernoulli_like(k, p_keep, x, input_neuron_shape(jnp.shape(x))), x)
      for k, x in zip(keys, leaves)])


@jax.custom_vjp
def _mix(weights: jax.Array, target: jax.Array, mask: jax.Array, p: jax.Array) -> jax.Array:
  w, t = weights.astype(jnp.float32), target.astype(jnp.float32)
  m = mask.astype(jnp.float32)
  return (((1.0 - m) * t + m * w - p * t) / (1.0 - p)).astype(weights.dtype)


def _mix_forward(weights, target, mask, p):
  return _mix(weights, target, mask, p), mask


def _mix_backward(mask, cotangent):
  # The authors' backward: the mask alone, without the 1/(1 − p) that autodiff of the
  # forward would add.
  return cotangent * mask.astype(cotangent.dtype), None, None, None


_mix.defvjp(_mix_forward, _mix_backward)


def _find_mixout_state(opt_state: Any) -> MixoutState:
  if isinstance(opt_state, MixoutState):
    return opt_state
  found = [node for node in jax.tree.leaves(
      opt_state, is_leaf=lambda node: isinstance(node, MixoutState))
           if isinstance(node, MixoutState)]
  if len(found) != 1:
    raise ValueError(
        f"mixout_params: the optimizer state holds {len(found)} MixoutState(s); it needs "
        f"exactly one. Build the optimizer with optax_sam.mixout(...) or "
        f"optax_sam.dps_mix(...) (once) and pass its state, or pass the MixoutState "
        f"itself.")
  return found[0]


def mixout_params(params: optax.Params, opt_state: optax.OptState) -> optax.Params:
  """The weights the training loss sees: ``((1 − M)·T + M·W − p·T) / (1 − p)``.

  Call it on the parameters **inside** the training loss, before the model, with the
  state of the optimizer built by :func:`mixout` or :func:`optax_sam.dps_mix`::

    loss = lambda p: loss_of(optax_sam.mixout_params(p, opt_state), batch)

  ``W`` is ``params``, ``T``, ``M`` and ``p`` come from the state, which holds them for
  the coming step (the optimizer prepares the next step's mask in each ``update``).
  The gradient with respect to ``W`` is ``M ⊙ ∂L/∂W_eff``, as the Mixout authors'
  backward has it: the mask without the ``1/(1 − p)`` factor autodiff of the forward
  would give. Parameters outside the optimizer's scope pass through.

  Evaluate, checkpoint and export ``params`` themselves, never this: Mixout is a
  training-time regularizer (with a random mask, ``E[W_eff] = W``), and the authors'
  layers use ``W`` when not training.

  Args:
    params: the parameters ``W``.
    opt_state: the optimizer state: a :class:`MixoutState`, or any state holding exactly
      one (an ``optax.chain`` state, an ``optax.MaskedState``, ...).

  Returns:
    ``W_eff``, with the structure and dtypes of ``params``.

  Raises:
    ValueError: if ``opt_state`` holds no :class:`MixoutState`, or several.

  Example:
    >>> import jax, jax.numpy as jnp, optax_sam
    >>> params = {"encoder": {"kernel": jnp.ones((2, 3))}, "head": jnp.ones(3)}
    >>> tx = optax_sam.mixout(p=0.5, seed=0)
    >>> state = tx.init(params)
    >>> params = {"encoder": {"kernel": 3 * jnp.ones((2, 3))}, "head": jnp.ones(3)}
    >>> mixed = optax_sam.mixout_params(params, state)  # rows of T = 1 or (3 − ½)/½ = 5
    >>> mixed["encoder"]["kernel"]
    Array([[1., 1., 1.],
           [5., 5., 5.]], dtype=float32)
  """
  state = _find_mixout_state(opt_state)

  def mix(weights, target, mask):
    if isinstance(target, optax.MaskedNode):
      return weights
    return _mix(weights, jnp.where(state.target_is_params, weights, target), mask, state.p)

  return jax.tree.map(mix, params, state.target, state.mask)


def _copy(params: Any) -> Any:
  # Own buffers, so a jitted step that donates its state never donates one twice.
  return jax.tree.map(jnp.copy, params)


def random_mixout_state(params: Any, p: Any, seed: int) -> MixoutState:
  """The state of a first step that mixes toward ``params`` with a random mask."""
  key, mask_key = jax.random.split(jax.random.PRNGKey(seed))
  p = jnp.asarray(p, jnp.float32)
  return MixoutState(target=_copy(params), mask=input_neuron_masks(mask_key, params, 1.0 - p),
                     p=p, target_is_params=jnp.zeros((), bool), key=key)


def _mixout_all_leaves(p: float, seed: int) -> optax.GradientTransformation:

  def init_fn(params: optax.Params) -> MixoutState:
    return random_mixout_state(params, p, seed)

  def update_fn(updates, state, params=None):
    del params
    key, mask_key = jax.random.split(state.key)
    mask = input_neuron_masks(mask_key, updates, 1.0 - state.p)
    return updates, state._replace(mask=mask, key=key)

  return optax.GradientTransformation(init_fn, update_fn)


def check_mixout_p(name: str, p: Any) -> None:
  """Raises ``ValueError`` naming ``name`` unless ``p`` is a number in ``[0, 1)``."""
  if callable(p):
    raise ValueError(f"{name} must be a number, not a schedule: the optimizer state "
                     f"carries it to mixout_params; got {p!r}.")
  numerics.check_range(name, p, low=0.0, high=1.0, high_inclusive=False)


def mixout(
    p: float = 0.9,
    seed: int = 0,
    *,
    scope: Optional[selection_lib.Selection] = None,
) -> optax.GradientTransformationExtraArgs:
  """Mixout toward the pre-trained weights: the optimizer half of the regularizer.

  Each step, each input neuron of each in-scope weight keeps its trained outgoing
  weights with probability ``1 − p`` and is otherwise replaced by the pre-trained ones
  (the parameters given to ``init``), rescaled so that ``E[W_eff] = W``:
  ``W_eff = ((1 − M)·W₀ + M·W − p·W₀) / (1 − p)``. The loss must see ``W_eff``: apply
  :func:`mixout_params` to the parameters inside it. The gradient reaching this
  transform is then ``M ⊙ ∂L/∂W_eff``; it passes through unchanged, and the state moves
  on to the next step's mask. Evaluate with the parameters themselves.

  Masks are Flax-shaped: one draw per row of a ``[in, out]`` kernel
  (:func:`input_neuron_shape`). The key is in the state: ``init`` splits
  ``jax.random.PRNGKey(seed)`` into ``key, mask_key`` and draws the first step's mask with
  :func:`input_neuron_masks` of ``mask_key`` over the in-scope leaves; each ``update``
  splits the key the same way to draw the next step's mask.

  Cost: no extra pass; the loss's forward pass mixes each in-scope weight once. Extra
  state: a copy of the in-scope pre-trained weights, one bool per in-scope parameter,
  a PRNG key.

  Args:
    p: mixout probability in ``[0, 1)``, a number: the chance that a neuron's weights are
      replaced. The authors' examples use 0.9 with dropout turned off. ``p = 0`` trains
      as without Mixout.
    seed: seed of the masks.
    scope: the mixed parameters: a predicate ``(path, leaf) -> bool`` on
      ``"a/b/kernel"``-style paths or a pytree of bools; the default is the one of
      :func:`optax_sam.dps`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (extra arguments are ignored); its state
    is an ``optax.MaskedState`` around a :class:`MixoutState`.

  References:
    Lee, Cho and Kang, `Mixout: Effective Regularization to Finetune Large-scale
    Pretrained Language Models <https://arxiv.org/abs/1909.11299>`_, ICLR 2020; code at
    https://github.com/bloodwass/mixout.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_sam
    >>> params = {"encoder": {"kernel": jnp.zeros((3, 2))}, "head": jnp.zeros(2)}
    >>> tx = optax.chain(optax_sam.mixout(p=0.5), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> loss = lambda p: jnp.sum(p["encoder"]["kernel"] - 1.0) + jnp.sum(p["head"])
    >>> grads = jax.grad(lambda p: loss(optax_sam.mixout_params(p, state)))(params)
    >>> grads["encoder"]["kernel"]  # rows mixed out get no gradient
    Array([[0., 0.],
           [1., 1.],
           [1., 1.]], dtype=float32)
    >>> updates, state = tx.update(grads, state, params)
  """
  check_mixout_p("p", p)
  numerics.check_seed(seed)
  return optax.masked(_mixout_all_leaves(p, seed), scope_lib.resolve_scope(scope, "mixout"))
