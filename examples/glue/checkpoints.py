"""The training run's checkpoints: Orbax, sharded, safe with many hosts, settings inside.

Each checkpoint is one Orbax step folder ``<output-dir>/checkpoints/<epoch>`` holding two
items: ``state`` (the training state: every process writes its own shards of the
sharded parameters and optimizer state) and ``settings`` (the run's settings, JSON).
State and settings are written together and committed together (Orbax writes into a
temporary folder and renames it when every process is done), so a resumed run always
checks the settings of the very state it loads; a half-written checkpoint is never
listed. A checkpoint damaged later (a disk error, files lost in a copy) is passed over
for the one before it, which is why two are kept. Saving returns as soon as the state is
copied off the devices; the files are written in the background while training goes on
(``wait`` before reading them).
"""

from __future__ import annotations

import pathlib
import shutil
from typing import Any, NamedTuple, Optional

import jax
import orbax.checkpoint as ocp

KEEP = 2  # checkpoints kept: the last, and the one before in case the last is damaged


class CheckpointError(ValueError):
  """A checkpoint that cannot be resumed from (damaged, or missing its settings)."""


class Restored(NamedTuple):
  """A checkpoint read back by :meth:`Checkpoints.restore`.

  Attributes:
    state: the training state.
    settings: the run's settings saved with it.
    epoch: the epoch after which it was saved.
    damaged: why each later checkpoint could not be read (empty when the latest was).
  """
  state: Any
  settings: dict[str, Any]
  epoch: int
  damaged: tuple[str, ...]


class Checkpoints:
  """The checkpoints of one output folder.

  Args:
    directory: where the step folders live (created on the first save).
    keep: how many of the most recent checkpoints to keep.
  """

  def __init__(self, directory: pathlib.Path, keep: int = KEEP):
    self.directory = pathlib.Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=True),
        item_names=("state", "settings"))

  def latest_epoch(self) -> Optional[int]:
    """The epoch after which the last complete checkpoint was saved, if any."""
    return self._manager.latest_step()

  def save(self, epoch: int, state: Any, settings: dict[str, Any]) -> None:
    """Starts writing ``state`` and ``settings`` as the checkpoint after ``epoch``."""
    self._manager.save(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), settings=ocp.args.JsonSave(settings)))

  def restore(self, abstract_state: Any) -> Restored:
    """Reads the latest checkpoint that can be read, going back to the one before it
    when it is damaged.

    Args:
      abstract_state: the state's structure, as ``jax.ShapeDtypeStruct`` leaves carrying
        the shardings to restore to (they may differ from those it was saved with: a
        different number of devices or mesh).

    Returns:
      A :class:`Restored`: the state, its settings, its epoch, and what was wrong with
      each later checkpoint passed over (those are deleted: nothing in them can be read,
      and the epochs they held are trained again).

    Raises:
      CheckpointError: when there is none, or none can be read (the message says what is
        wrong with each).
    """
    epochs = sorted(self._manager.all_steps(), reverse=True)
    if not epochs:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    damaged = []
    for epoch in epochs:
      try:
        state, settings = self._restore_epoch(epoch, abstract_state)
      except CheckpointError as error:
        damaged.append(str(error))
        continue
      # Orbax saves no step at or below its latest one: the unreadable later checkpoints
      # would keep the epochs trained again from being checkpointed.
      for later in epochs[:len(damaged)]:
        self._manager.delete(later)
      return Restored(state, settings, epoch, tuple(damaged))
    raise CheckpointError("; ".join(damaged))

  def _restore_epoch(self, epoch: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    where = self.directory / str(epoch)
    try:
      settings = self._manager.restore(
          epoch, args=ocp.args.Composite(settings=ocp.args.JsonRestore())).settings
    except (ValueError, LookupError, OSError) as error:
      raise CheckpointError(f"the checkpoint {where} has no readable settings "
                            f"({_first_line(error)})") from None
    if not isinstance(settings, dict):
      raise CheckpointError(f"the checkpoint {where} has no readable settings")
    try:
      state = self._manager.restore(
          epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    # TensorStore reports a missing or truncated array file as a bare Exception.
    except Exception as error:  # pylint: disable=broad-exception-caught
      raise CheckpointError(f"the checkpoint {where} is damaged ({_first_line(error)})"
                            ) from None
    return state.state, settings

  def wait(self) -> None:
    """Blocks until every checkpoint started is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Finishes the writes in flight and releases the manager."""
    self._manager.close()

  def delete_all(self) -> None:
    """Removes the checkpoint folder (after :meth:`close`); one process does it."""
    if jax.process_index() == 0:
      shutil.rmtree(self.directory, ignore_errors=True)


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return (text[0] if text else type(error).__name__)[:200]


def latest_epoch(directory: pathlib.Path) -> Optional[int]:
  """The epoch of the last complete checkpoint in ``directory``, if any (creates nothing)."""
  if not pathlib.Path(directory).is_dir():
    return None
  checkpoints = Checkpoints(directory)
  try:
    return checkpoints.latest_epoch()
  finally:
    checkpoints.close()
