"""Many devices and many hosts: the device mesh, FSDP shardings, global batches.

The training step runs under ``jax.jit`` over a ``data × fsdp`` mesh: each batch is
split over both axes, and every parameter, with every optimizer-state leaf shaped like
it, is split over ``fsdp`` along its largest axis that the ``fsdp`` size divides
(fully sharded data parallelism; leaves too small to split are replicated). ``fsdp=1``
is plain data parallelism. Several processes (hosts) join through
``jax.distributed.initialize`` and see one mesh over all their devices; each process
feeds its own share of every global batch.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class MeshShape:
  """Sizes of the mesh axes; ``None`` for "the devices left over"."""
  data: Optional[int] = None
  fsdp: int = 1


def parse_mesh(text: str) -> MeshShape:
  """Parses ``data=N,fsdp=M`` (either part may be left out; a missing ``data`` takes
  the devices that ``fsdp`` leaves).

  Raises:
    ValueError: for anything else.
  """
  sizes = {}
  for part in text.split(","):
    match = re.fullmatch(r"\s*(data|fsdp)\s*=\s*([0-9]+)\s*", part)
    if not match or int(match[2]) < 1 or match[1] in sizes:
      raise ValueError(f"expected data=N,fsdp=M with positive integers, got {text!r}")
    sizes[match[1]] = int(match[2])
  return MeshShape(**sizes)


def make_mesh(shape: MeshShape, devices: Optional[list[Any]] = None) -> Mesh:
  """A ``data × fsdp`` mesh over ``devices`` (default: every device of every process).

  The axes are auto (``jax.sharding.AxisType.Auto``): the model needs no sharding
  annotations of its own, XLA places the all-gathers and reduce-scatters of FSDP.

  Raises:
    ValueError: when the sizes do not multiply to the number of devices.
  """
  devices = jax.devices() if devices is None else list(devices)
  data = shape.data if shape.data is not None else len(devices) // shape.fsdp
  if data * shape.fsdp != len(devices) or data < 1:
    raise ValueError(f"a mesh of data={shape.data or '?'} × fsdp={shape.fsdp} does not "
                     f"fit the {len(devices)} devices")
  # jax.make_mesh orders the devices process by process, and where JAX knows the
  # topology (TPU slices) so that neighbours on the mesh are neighbours on the links.
  return jax.make_mesh((data, shape.fsdp), AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Every batch: the leading (example) axis split over both mesh axes."""
  return NamedSharding(mesh, P(AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
  """Splits the largest axis that ``fsdp`` divides (the first of equals) over "fsdp"."""
  if fsdp == 1:
    return P()
  candidates = [axis for axis, size in enumerate(shape) if size % fsdp == 0]
  if not candidates:
    return P()
  axis = max(candidates, key=lambda a: (shape[a], -a))
  return P(*(("fsdp" if a == axis else None) for a in range(len(shape))))


def params_sharding(params: Any, mesh: Mesh) -> Any:
  """A ``NamedSharding`` per leaf of ``params`` (arrays or ``jax.ShapeDtypeStruct``)."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda p: NamedSharding(mesh, fsdp_spec(np.shape(p), fsdp)), params)


def state_sharding(tx: optax.GradientTransformation, state: Any, params: Any,
                   mesh: Mesh) -> Any:
  """The shardings of ``state`` (a pytree holding ``tx``'s state and other leaves).

  Every leaf of ``tx.init(params)`` that is a copy of the parameter tree (moments,
  masks, Fisher sums) is split like its parameter (``optax.tree.map_params``); every
  other leaf (step counts, PRNG keys) is replicated.

  Args:
    tx: the optimizer.
    state: the training state; its ``opt_state`` field is ``tx``'s state.
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
    mesh: the mesh.
  """
  rest = jax.tree.map(lambda _: replicated(mesh), state)
  by_params = params_sharding(params, mesh)

  def like_param(leaf, sharding):
    if isinstance(leaf, optax.MaskedNode):  # a parameter outside the method's scope
      return leaf
    # A leaf may drop axes of its parameter to 1 (a count per input neuron): those
    # axes stay whole.
    spec = [axis if size % mesh.shape.get(axis, 1) == 0 and size > 1 else None
            for axis, size in zip(tuple(sharding.spec) + (None,) * np.ndim(leaf),
                                  np.shape(leaf))]
    return NamedSharding(mesh, P(*spec))

  opt_state = optax.tree.map_params(
      tx, like_param, state.opt_state, by_params,
      transform_non_params=lambda _: replicated(mesh),
      is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  return rest._replace(params=by_params, opt_state=opt_state)


def process_rows(sharding: NamedSharding, num_rows: int) -> slice:
  """The rows of a global batch of ``num_rows`` that this process's devices hold.

  Raises:
    ValueError: if they are not one contiguous block (a mesh that interleaves the
      processes' devices).
  """
  starts = sorted({index[0].start or 0 for index in
                   sharding.addressable_devices_indices_map((num_rows,)).values()})
  share = num_rows // sharding.mesh.size * len(sharding.addressable_devices)
  first, last = starts[0], starts[-1] + num_rows // sharding.mesh.size
  if last - first != share:
    raise ValueError("this process's devices do not hold one block of the batch's rows")
  return slice(first, last)


def global_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, Any]:
  """The global array of ``batch``, built from this process's rows of it only.

  Every process computes the same ``batch`` (the data order depends only on the seed
  and the epoch); each hands over only the rows its own devices hold.
  """
  def build(value):
    rows = process_rows(sharding, len(value))
    return jax.make_array_from_process_local_data(sharding, value[rows], value.shape)
  return {name: build(value) for name, value in batch.items()}


def initialize(coordinator_address: Optional[str], num_processes: Optional[int],
               process_id: Optional[int]) -> None:
  """Joins the processes of a multi-host run (``jax.distributed.initialize``).

  With no arguments, JAX detects the cluster where the platform says what it is (Cloud
  TPU, SLURM, Open MPI, Kubernetes); otherwise all three must be given. A lone process
  with nothing to detect stays a single-process run.

  Raises:
    ValueError: when only some of the three are given.
  """
  given = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in given) and any(v is None for v in given):
    raise ValueError("--coordinator-address, --num-processes and --process-id go "
                     "together (or none of them, to detect the cluster)")
  if jax.distributed.is_initialized():
    return
  if coordinator_address is not None:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return
  try:
    jax.distributed.initialize()
  except ValueError:
    pass  # no cluster to detect: a single process
  except RuntimeError:
    pass  # JAX already runs in this process (called from Python): a single process


def put(tree: Any, shardings: Any) -> Any:
  """Global arrays of ``tree``'s host values (the same on every process), placed on
  ``shardings``; each process copies in only the pieces its own devices hold."""
  def place(value, sharding):
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
  return jax.tree.map(place, tree, shardings)


def gather(tree: Any) -> Any:
  """Host (NumPy) copies of every leaf of ``tree``, on every process (a collective: every
  process must call it)."""
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def barrier(name: str) -> None:
  """Waits until every process gets here (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
