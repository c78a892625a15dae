"""Choosing which parameters a mask applies to: by a predicate on paths, or a pytree."""

from __future__ import annotations

from typing import Any, Callable, Union

import jax

# A predicate on a parameter's path (e.g. "encoder/layer_0/attention/query/kernel") and
# its value, or a pytree of Python bools with the structure of the parameters.
Selection = Union[Callable[[str, Any], bool], Any]


def path_string(path: tuple) -> str:
  """``("encoder", "layer_0", "kernel")``-style key path as ``"encoder/layer_0/kernel"``."""
  parts = []
  for key in path:
    for attribute in ("key", "name", "idx"):
      if hasattr(key, attribute):
        parts.append(str(getattr(key, attribute)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def select(params: Any, selection: Selection, *, argument: str) -> Any:
  """Resolves ``selection`` into a pytree of Python bools shaped like ``params``.

  Args:
    params: the parameter pytree (arrays or shape structs).
    selection: a predicate ``(path, leaf) -> bool`` or a pytree of bools.
    argument: the argument's name, for error messages.
  """
  if callable(selection):
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: bool(selection(path_string(path), leaf)), params)
  try:
    chosen = jax.tree.map(lambda _, s: bool(s), params, selection)
  except (ValueError, TypeError) as error:
    raise ValueError(
        f"{argument} must be a predicate (path, leaf) -> bool or a pytree of bools with "
        f"the structure of the parameters: {error}") from None
  return chosen


def exclude_biases_and_embeddings(path: str, leaf: Any) -> bool:
  """FSAM's candidate pool: every parameter but biases and embeddings."""
  del leaf
  parts = path.lower().split("/")
  return "bias" not in parts[-1] and not any("embed" in part for part in parts)
