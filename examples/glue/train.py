r"""Fine-tunes a BERT-family encoder on a GLUE task with an optax-sam method.

  python -m examples.glue.train --task sst2 --method fsam --glue-dir ../shared/glue \
      --train-size 2000 --epochs 1 --lr 1e-4 --max-length 64

Each epoch ends with an evaluation on the dev set, a line in ``<output-dir>/log.jsonl``,
an updated ``<output-dir>/curves.png`` and a checkpoint from which ``--resume``
continues to the same final parameters as an uninterrupted run (the last two are kept:
a damaged last checkpoint is passed over, with a warning, for the one before). The
fine-tuned model is written to ``<output-dir>/model`` as a Hugging Face folder, and the
training checkpoint is then deleted (``--keep-checkpoint`` keeps it).

The step runs over a ``data × fsdp`` mesh of devices (``--mesh``): the batch is split
over all of them, and the parameters and optimizer state over ``fsdp`` (fully sharded data
parallelism); the default is plain data parallelism over the local devices. Several
hosts run one process each, joined by ``jax.distributed`` (detected on TPU pods, SLURM
and Open MPI, else ``--coordinator-address``, ``--num-processes``, ``--process-id``);
each feeds its own share of every batch, and process 0 writes the log, the plots and the
model. Checkpoints are Orbax's: every process writes its own shards, and a run may
resume on another number of devices or mesh.

A fresh run refuses an ``--output-dir`` that holds another run unless ``--overwrite``
is given (``--resume`` continues it instead). A training loss or parameters that become
non-finite stop the run; the checkpoint of the last finished epoch is kept.

Exit status: 0 on success (also after ``--stop-after-epoch``, or when ``--resume`` finds
the run finished); 2 for bad usage or input (unknown task or method, a number that is not
finite or out of range, malformed data file, missing model file, unusable output folder or
checkpoint) and for a diverged run, with one line ``error: ...`` on stderr; anything else
is a bug and prints a traceback.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import pathlib
import shutil
import sys
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
import tqdm

import optax_sam
from optax_sam.core import numerics
from examples.glue import checkpoints as checkpoints_lib
from examples.glue import data
from examples.glue import distributed
from examples.glue import flags
from examples.glue import methods
from examples.glue import metrics
from examples.glue import model as model_lib
from examples.glue import pretrained

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

# Arguments that may differ between an interrupted run and its resumption.
# The devices (their number, the mesh, the processes) may change too: the checkpoint is
# restored onto the new shardings.
_RESUME_FREE_ARGS = ("resume", "overwrite", "stop_after_epoch", "output_dir", "log_every",
                     "keep_checkpoint", "num_devices", "mesh", "coordinator_address",
                     "num_processes", "process_id")
LOG_FILE, SETTINGS_FILE, CURVES_FILE = "log.jsonl", "run_config.json", "curves.png"
CHECKPOINT_FILE, MODEL_FOLDER = "checkpoints", "model"
# What a run writes into its output folder, the checkpoint first: starting over removes
# that before anything else, so no later step can pair an old state with new settings.
RUN_FILES = (CHECKPOINT_FILE, MODEL_FOLDER, CURVES_FILE, LOG_FILE, SETTINGS_FILE)


class UsageError(ValueError):
  """A request the command cannot carry out (reported as ``error: ...``, exit 2)."""


class DivergedError(RuntimeError):
  """The training loss or the parameters became non-finite (``error: ...``, exit 2)."""


class _Parser(argparse.ArgumentParser):
  """Reports usage errors as one ``error: ...`` line with exit status 2."""

  def error(self, message: str):
    self.exit(2, f"error: {message}\n")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  """Parses the command line."""
  parser = _Parser(prog="python -m examples.glue.train",
                   description=__doc__.split("\n", 1)[0])
  parser.add_argument("--task", required=True, help=", ".join(data.TASKS))
  parser.add_argument("--method", default="adamw", help=", ".join(methods.METHODS))
  parser.add_argument("--model", help="Hugging Face model folder (default: the embedded "
                      "all-MiniLM-L6-v2)")
  parser.add_argument("--glue-dir", help="glue_data folder (default: $GLUE_DIR, else the "
                      "Hugging Face hub)")
  parser.add_argument("--train-size", type=flags.positive_int,
                      help="stratified subsample of the training set")
  parser.add_argument("--epochs", type=flags.positive_int, default=3)
  parser.add_argument("--max-steps", type=flags.positive_int, help="stop after this many steps")
  parser.add_argument("--batch-size", type=flags.positive_int, default=32)
  parser.add_argument("--max-length", type=flags.positive_int, default=128,
                      help="tokens per example")
  parser.add_argument("--pad-to-multiple-of", type=flags.positive_int, default=32,
                      help="batches are padded to a multiple of this many tokens (each "
                      "new length compiles the step once; smaller wastes less on padding)")
  parser.add_argument("--lr", type=flags.float_in(0, low_open=True), default=2e-5,
                      help="peak learning rate, > 0")
  parser.add_argument("--warmup-ratio", type=flags.float_in(0, 1, high_open=True),
                      default=0.06, help="fraction of the steps spent warming up, in [0, 1)")
  parser.add_argument("--weight-decay", type=flags.float_in(0), default=0.01)
  parser.add_argument("--adam-beta2", type=flags.float_in(0, 1, low_open=True,
                                                          high_open=True),
                      default=0.999, help="AdamW's second-moment decay, in (0, 1)")
  parser.add_argument("--max-grad-norm", type=flags.float_in(0), default=1.0,
                      help="global-norm clipping; 0 disables")
  parser.add_argument("--dropout", type=flags.float_in(0, 1, high_open=True),
                      help="override the model's dropout, in [0, 1)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--data-seed", type=int,
                      help="seeds the --train-size subsample (default: --seed); fix it to "
                      "train every seed on the same examples")
  parser.add_argument("--num-devices", type=flags.positive_int,
                      help="local devices to run on (default: all; one process only)")
  parser.add_argument("--mesh", type=_mesh_shape, default=distributed.MeshShape(),
                      help="data=N,fsdp=M: the batch is split over all N·M devices, the "
                      "parameters and optimizer state over the M of fsdp (default: "
                      "fsdp=1, data parallelism over every device)")
  parser.add_argument("--coordinator-address",
                      help="host:port of process 0, for a multi-host run where JAX does "
                      "not detect the cluster (with --num-processes and --process-id)")
  parser.add_argument("--num-processes", type=flags.positive_int)
  parser.add_argument("--process-id", type=int)
  parser.add_argument("--output-dir", help="default: runs/<task>-<method>-<seed>")
  parser.add_argument("--resume", action="store_true",
                      help="continue the run in --output-dir from its checkpoint, if any "
                      "(a finished run is reported, not repeated)")
  parser.add_argument("--overwrite", action="store_true",
                      help="start afresh in an --output-dir that holds another run, "
                      "deleting that run (without it, such a folder is refused)")
  parser.add_argument("--keep-checkpoint", action="store_true",
                      help="keep the training checkpoint of a finished run (by default it "
                      "is deleted once the model is exported)")
  parser.add_argument("--stop-after-epoch", type=flags.positive_int,
                      help="exit after checkpointing this epoch (resume later)")
  parser.add_argument("--log-every", type=flags.positive_int, default=10,
                      help="steps per loss record")
  methods.add_flags(parser)
  return parser.parse_args(argv)


def _mesh_shape(text: str) -> distributed.MeshShape:
  try:
    return distributed.parse_mesh(text)
  except ValueError as error:
    raise argparse.ArgumentTypeError(str(error)) from None


class TrainState(NamedTuple):
  """Everything that changes during training.

  Attributes:
    step: optimizer steps taken.
    params: the model parameters.
    opt_state: the optimizer state.
    dropout_key: the run's dropout key; step ``t`` uses ``fold_in(dropout_key, t)``.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  dropout_key: jax.Array


def example_loss(params: Any, example: dict[str, jax.Array], *,
                 model: model_lib.SequenceClassifier, is_regression: bool,
                 deterministic: bool = False) -> jax.Array:
  """Loss of one example: cross-entropy, or squared error for regression.

  Args:
    params: model parameters.
    example: one row of a batch (no batch axis); needs ``dropout_key`` unless
      ``deterministic``.
    model: the classifier.
    is_regression: whether ``labels`` is a score.
    deterministic: disables dropout.

  Returns:
    The scalar loss.
  """
  outputs = model.apply(
      {"params": params}, example["input_ids"], example["attention_mask"],
      example["token_type_ids"], deterministic=deterministic,
      rngs=None if deterministic else {"dropout": example["dropout_key"]})
  if is_regression:
    return jnp.square(outputs[0] - example["labels"])
  return optax.softmax_cross_entropy_with_integer_labels(outputs, example["labels"])


def weight_decay_mask(params: Any) -> Any:
  """True for every parameter but biases and LayerNorm parameters."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not (path[-1].key == "bias"
                           or any("LayerNorm" in key.key for key in path)), params)


def learning_rate_schedule(peak: float, total_steps: int,
                           warmup_ratio: float) -> optax.Schedule:
  """Linear warmup over ``warmup_ratio`` of the steps, then linear decay to zero."""
  warmup = int(warmup_ratio * total_steps)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup),
       optax.linear_schedule(peak, 0.0, total_steps - warmup)], [warmup])


def make_train_step(model: model_lib.SequenceClassifier,
                    tx: optax.GradientTransformation, is_regression: bool, *,
                    params_transform: Optional[Callable[[Any, Any], Any]] = None):
  """The training step ``(state, batch) -> (state, mean loss)``, to be jitted.

  Every example gets its own dropout key, so the per-example loss is a function of the
  example alone (``optax_sam.PerExampleLoss``); the method's second pass reuses the batch
  and the keys of the clean gradient. Every method gets the clean gradient; one that
  does not read its values (δ-SAM) costs no backward pass for it, since XLA drops what
  nothing reads. ``params_transform(params, opt_state)``, if given, is what the loss
  sees in place of the parameters (Mixout's mixed weights).
  """
  per_example = functools.partial(example_loss, model=model, is_regression=is_regression)

  def train_step(state: TrainState, batch: dict[str, jax.Array]
                 ) -> tuple[TrainState, jax.Array]:
    example_mask = batch["example_mask"]
    keys = jax.random.split(jax.random.fold_in(state.dropout_key, state.step),
                            example_mask.shape[0])
    examples = {name: value for name, value in batch.items() if name != "example_mask"}
    loss_of = per_example if params_transform is None else (
        lambda params, example: per_example(params_transform(params, state.opt_state),
                                            example))
    loss_fn = optax_sam.PerExampleLoss(loss_of, dict(examples, dropout_key=keys))
    mean_loss = lambda params: optax_sam.batch_mean(loss_fn(params), example_mask)
    loss, grads = jax.value_and_grad(mean_loss)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params,
                                   loss_fn=loss_fn, example_mask=example_mask)
    params = optax.apply_updates(state.params, updates)
    return TrainState(state.step + 1, params, opt_state, state.dropout_key), loss

  return train_step


def deterministic_loss_fn_for(model: model_lib.SequenceClassifier, is_regression: bool):
  """``batch -> loss_fn``: the masked mean loss of a batch without dropout."""
  per_example = functools.partial(example_loss, model=model, is_regression=is_regression,
                                  deterministic=True)

  def loss_fn_for(batch):
    examples = {name: value for name, value in batch.items() if name != "example_mask"}
    losses = optax_sam.PerExampleLoss(per_example, examples)
    return lambda params: optax_sam.batch_mean(losses(params), batch["example_mask"])

  return loss_fn_for


def _json_safe(value: Any) -> Any:
  """``value`` with every non-finite float replaced by ``None`` (JSON has no NaN)."""
  if isinstance(value, dict):
    return {key: _json_safe(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(item) for item in value]
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def append_log(path: pathlib.Path, record: dict[str, Any]) -> None:
  """Appends one line of strict JSON (non-finite numbers are written as ``null``)."""
  with open(path, "a", encoding="utf-8") as log:
    log.write(json.dumps(_json_safe(record), allow_nan=False) + "\n")


def read_log(path: pathlib.Path) -> list[dict[str, Any]]:
  """The records of a run's log; a half-written last line (an interrupted write) is dropped.

  Raises:
    UsageError: if the log is missing or a line before the last is not JSON.
  """
  try:
    lines = path.read_text(encoding="utf-8").splitlines()
  except (OSError, UnicodeDecodeError) as error:
    raise UsageError(f"cannot resume: cannot read the run's log {path} ({error})") from None
  records = []
  for number, line in enumerate(lines, start=1):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if number < len(lines):
        raise UsageError(f"cannot resume: {path}, line {number} is not JSON") from None
  return records


def truncate_log(path: pathlib.Path, step: int) -> None:
  """Drops the records an interrupted run wrote after its checkpoint at ``step``."""
  kept = [r for r in read_log(path) if r["event"] != "final" and r.get("step", 0) <= step]
  path.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in kept),
                  encoding="utf-8")


def plot_curves(log_path: pathlib.Path, image_path: pathlib.Path) -> None:
  """Plots the training loss and the dev metrics of a JSON-lines log against steps."""
  records = read_log(log_path)
  train = [r for r in records if r["event"] == "train"]
  evals = [r for r in records if r["event"] == "eval"]
  figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(10, 4))
  loss_axis.plot([r["step"] for r in train], [r["loss"] for r in train])
  loss_axis.set(xlabel="step", ylabel="training loss", title="training loss")
  for name in (evals[0]["metrics"] if evals else {}):
    metric_axis.plot([r["step"] for r in evals], [r["metrics"][name] for r in evals],
                     marker="o", label=name)
  metric_axis.set(xlabel="step", ylabel="dev metric", title="dev")
  metric_axis.legend()
  figure.tight_layout()
  figure.savefig(image_path, dpi=100)
  plt.close(figure)


def read_settings(config_path: pathlib.Path) -> dict[str, Any]:
  """The settings a run wrote when it started (before its first checkpoint).

  Raises:
    UsageError: if they are missing or unreadable.
  """
  try:
    return json.loads(config_path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
    raise UsageError(f"cannot resume: the run's settings {config_path} are missing or "
                     f"unreadable ({type(error).__name__}); start afresh with "
                     "--overwrite") from None


def _check_resumable(saved: dict[str, Any], run_config: dict[str, Any]) -> None:
  changed = {k: (saved.get(k), v) for k, v in run_config.items() if saved.get(k) != v}
  if changed:
    details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
    raise UsageError(f"--resume with different settings than the checkpointed run "
                     f"({details})")


def prepare_output_dir(output_dir: pathlib.Path, *, resume: bool, overwrite: bool) -> None:
  """Creates ``output_dir`` if needed; refuses to start afresh over another run.

  Raises:
    UsageError: if the folder cannot be created or written, or holds a run that neither
      ``resume`` nor ``overwrite`` says what to do with.
  """
  try:
    output_dir.mkdir(parents=True, exist_ok=True)
    probe = output_dir / f".write-test-{jax.process_index()}"
    probe.write_bytes(b"")
    probe.unlink()
  except OSError as error:
    raise UsageError(f"--output-dir {output_dir}: cannot write there "
                     f"({error.strerror or error})") from None
  used = [name for name in RUN_FILES if (output_dir / name).exists()]
  if used and not (resume or overwrite):
    raise UsageError(f"--output-dir {output_dir} holds another run ({', '.join(used)}): "
                     "continue it with --resume, or replace it with --overwrite")


def remove_run(output_dir: pathlib.Path) -> None:
  """Deletes what an earlier run wrote in ``output_dir``, its checkpoint first."""
  for name in RUN_FILES:
    path = output_dir / name
    if path.is_dir():
      shutil.rmtree(path)
    else:
      path.unlink(missing_ok=True)


def select_method(args: argparse.Namespace) -> tuple[methods.Method, dict[str, Any]]:
  """The ``--method`` and the hyperparameters given for it.

  Raises:
    UsageError: for an unknown method or a flag it does not take.
  """
  if args.method not in methods.METHODS:
    raise UsageError(f"unknown method {args.method!r}; choose one of "
                     f"{', '.join(methods.METHODS)}")
  method = methods.METHODS[args.method]
  try:
    return method, methods.hyperparameters_from_args(method, args)
  except ValueError as error:
    raise UsageError(str(error)) from None


def select_mesh(num_devices: Optional[int], shape: distributed.MeshShape,
                batch_size: int) -> jax.sharding.Mesh:
  """The mesh: over every device of every process, or the first ``num_devices`` local
  devices of a single process.

  Raises:
    UsageError: if there are fewer devices, the mesh does not fit them, or they do not
      divide ``batch_size``.
  """
  devices = jax.devices()
  if num_devices is not None:
    if jax.process_count() > 1:
      raise UsageError("--num-devices applies to a single process; with several, every "
                       "device of every process is used")
    if num_devices > len(devices):
      raise UsageError(f"--num-devices {num_devices}: only {len(devices)} local devices")
    devices = devices[:num_devices]
  try:
    mesh = distributed.make_mesh(shape, devices)
  except ValueError as error:
    raise UsageError(f"--mesh: {error} (see --num-devices)") from None
  if batch_size % len(devices):
    raise UsageError(f"--batch-size {batch_size} is not divisible by the {len(devices)} "
                     "devices it is sharded over (see --num-devices)")
  return mesh


def format_metrics(values: dict[str, Optional[float]]) -> str:
  """``name=value`` pairs for a summary line (``None``, a logged non-finite value: nan)."""
  return " ".join(f"{name}={math.nan if value is None else value:.4f}"
                  for name, value in values.items())


def diverged(what: str, step: int, checkpoint_path: pathlib.Path,
             last_good_epoch: int) -> DivergedError:
  """The error that stops a run whose loss or parameters became non-finite."""
  kept = (f"the checkpoint of epoch {last_good_epoch} is kept in {checkpoint_path}"
          if last_good_epoch else "no epoch had finished, so there is no checkpoint")
  return DivergedError(f"{what} became non-finite by step {step}; stopped ({kept}). "
                       "A lower --lr or --rho, or --max-grad-norm, may help")


def train(args: argparse.Namespace) -> Optional[dict[str, float]]:
  """Runs the fine-tuning that ``args`` describes.

  Args:
    args: the parsed command line.

  Returns:
    The final dev metrics, or ``None`` when stopped by ``--stop-after-epoch``.

  Raises:
    UsageError, data.DataError, pretrained.PretrainedModelError: bad usage or input.
  """
  started = time.time()
  try:
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  except (ValueError, RuntimeError) as error:
    raise UsageError(f"cannot join the other processes: {error}") from None
  lead = jax.process_index() == 0  # the one process that writes files and prints
  task = data.get_task(args.task)
  method, hyperparameters = select_method(args)
  mesh = select_mesh(args.num_devices, args.mesh, args.batch_size)
  if args.reuse_alpha is not None and (args.perturb_every or 1) == 1:
    raise UsageError("--reuse-alpha sets the steps between perturbing steps: give "
                     "--perturb-every > 1 too")
  output_dir = pathlib.Path(args.output_dir
                            or f"runs/{task.name}-{method.name}-{args.seed}")
  prepare_output_dir(output_dir, resume=args.resume, overwrite=args.overwrite)
  distributed.barrier("output folder checked")  # before process 0 writes into it

  # Model and data.
  model_dir = args.model or pretrained.default_model_dir()
  initial = pretrained.load_pretrained(model_dir, task.num_labels, args.seed,
                                       args.dropout)
  tokenizer = pretrained.load_tokenizer(model_dir)
  config = initial.config
  positions = config.max_positions - (config.pad_token_id + 1
                                      if config.padding_aware_positions else 0)
  multiple = args.pad_to_multiple_of
  if math.ceil(args.max_length / multiple) * multiple > positions:
    raise UsageError(f"--max-length {args.max_length} (padded to a multiple of "
                     f"{multiple}) exceeds the model's {positions} positions")
  glue_dir = args.glue_dir or os.environ.get("GLUE_DIR")
  data_seed = args.seed if args.data_seed is None else args.data_seed
  full_train_split = data.load_split(task, "train", glue_dir)
  if args.train_size is not None and args.train_size > len(full_train_split):
    raise UsageError(f"--train-size {args.train_size} exceeds the "
                     f"{len(full_train_split)} training examples of {task.name}")
  train_split = data.stratified_subsample(full_train_split, args.train_size, data_seed,
                                          task.is_regression)
  train_set = data.encode(train_split, tokenizer, args.max_length)
  dev_set = data.encode(data.load_split(task, "dev", glue_dir), tokenizer,
                        args.max_length)
  steps_per_epoch = data.num_batches(len(train_set), args.batch_size)
  total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
  num_epochs = math.ceil(total_steps / steps_per_epoch)
  epoch_batches = functools.partial(data.batches, train_set, args.batch_size,
                                    seed=args.seed, pad_to_multiple_of=multiple)
  model = model_lib.SequenceClassifier(config, task.num_labels)

  # Optimizer and the state's placement: the batch over every device, the parameters
  # and every parameter-shaped piece of optimizer state over "fsdp".
  context = methods.MethodContext(
      total_steps=total_steps, seed=args.seed, params=initial.params,
      loss_fn_for=deterministic_loss_fn_for(model, task.is_regression),
      train_batches=lambda: epoch_batches(epoch=0), num_train_batches=steps_per_epoch)
  try:
    tx = methods.build_optimizer(
        method, hyperparameters, context,
        learning_rate_schedule(args.lr, total_steps, args.warmup_ratio),
        args.weight_decay, weight_decay_mask(initial.params),
        args.max_grad_norm or None, args.adam_beta2)
  except ValueError as error:
    raise UsageError(f"--method {method.name}: {error}") from None

  def initial_state(params):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), dropout_key=jax.random.PRNGKey(args.seed))

  abstract_state = jax.eval_shape(initial_state, initial.params)
  state_sharding = distributed.state_sharding(tx, abstract_state, initial.params, mesh)
  batch_sharding = distributed.batch_sharding(mesh)
  replicated = distributed.replicated(mesh)

  # Output folder: resume, report a finished run, or start afresh.
  log_path, config_path = output_dir / LOG_FILE, output_dir / SETTINGS_FILE
  checkpoint_path = output_dir / CHECKPOINT_FILE
  run_config = {k: v for k, v in sorted(vars(args).items()) if k not in _RESUME_FREE_ARGS}
  first_epoch = 0
  finished = args.resume and log_path.is_file() and [
      r for r in read_log(log_path) if r["event"] == "final"]
  if finished:
    _check_resumable(read_settings(config_path), run_config)
    if lead:
      print(f"already finished: {output_dir}, dev "
            f"{format_metrics(finished[-1]['metrics'])}")
    return finished[-1]["metrics"]
  resuming = args.resume and checkpoints_lib.latest_epoch(checkpoint_path) is not None
  if not resuming:
    if args.resume and config_path.exists():  # Interrupted before its first checkpoint.
      _check_resumable(read_settings(config_path), run_config)
    if lead:
      remove_run(output_dir)
      config_path.write_text(json.dumps(run_config, indent=2) + "\n", encoding="utf-8")
      append_log(log_path, {
          "event": "start", "task": task.name, "method": method.name,
          "hyperparameters": hyperparameters, "devices": mesh.size,
          "mesh": dict(mesh.shape), "processes": jax.process_count(),
          "train_examples": len(train_set), "total_steps": total_steps,
          "fresh_head_modules": list(initial.fresh_modules)})
    distributed.barrier("fresh output folder")
  checkpoints = checkpoints_lib.Checkpoints(checkpoint_path)
  try:
    if resuming:
      # The settings checked are those saved with the state, in the same checkpoint.
      try:
        state, saved_settings, first_epoch, damaged = checkpoints.restore(jax.tree.map(
            lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
            abstract_state, state_sharding))
      except checkpoints_lib.CheckpointError as error:
        raise UsageError(f"cannot resume from {checkpoint_path}: {error}; start afresh "
                         "with --overwrite") from None
      if lead:
        for problem in damaged:
          print(f"warning: {problem}; deleted it and resuming from an earlier "
                "checkpoint", file=sys.stderr)
      _check_resumable(saved_settings, run_config)
      if lead:
        truncate_log(log_path, int(state.step))
        print(f"resuming {output_dir} after epoch {first_epoch}, step {int(state.step)}")
    else:
      state = jax.jit(initial_state, out_shardings=state_sharding)(
          distributed.put(initial.params, state_sharding.params))
    train_step = jax.jit(make_train_step(model, tx, task.is_regression,
                                         params_transform=method.params_transform),
                         in_shardings=(state_sharding, batch_sharding),
                         out_shardings=(state_sharding, replicated), donate_argnums=0)
    # The outputs come back whole on every process: evaluation is global.
    predict = jax.jit(
        lambda params, batch: model.apply({"params": params}, batch["input_ids"],
                                          batch["attention_mask"], batch["token_type_ids"]),
        in_shardings=(state_sharding.params, batch_sharding), out_shardings=replicated)

    def evaluate_dev() -> dict[str, float]:
      return metrics.evaluate(
          lambda batch: predict(state.params,
                                distributed.global_batch(batch, batch_sharding)),
          dev_set, task, args.batch_size, multiple)

    params_finite = jax.jit(numerics.tree_all_finite)
    dev_metrics = None
    step = int(state.step)
    progress = tqdm.tqdm(total=total_steps, initial=step,
                         desc=f"{task.name} {method.name}", disable=None if lead else True)
    for epoch in range(first_epoch, num_epochs):
      losses = []
      for batch in epoch_batches(epoch=epoch):
        if step == total_steps:
          break
        state, loss = train_step(state, distributed.global_batch(batch, batch_sharding))
        step += 1
        losses.append(loss)
        progress.update()
        if len(losses) == args.log_every or step == total_steps:
          mean_loss = float(np.mean(jax.device_get(losses)))
          losses = []
          if not math.isfinite(mean_loss):
            progress.close()
            raise diverged(f"the training loss ({mean_loss})", step, checkpoint_path,
                           epoch)
          progress.set_postfix(loss=f"{mean_loss:.4f}")
          if lead:
            append_log(log_path, {"event": "train", "epoch": epoch + 1, "step": step,
                                  "loss": mean_loss, "time": time.time() - started})
      if not params_finite(state.params):
        progress.close()
        raise diverged("the parameters", step, checkpoint_path, epoch)
      dev_metrics = evaluate_dev()
      if lead:
        progress.write(f"epoch {epoch + 1}/{num_epochs} (step {step}): dev "
                       f"{format_metrics(dev_metrics)}")
        append_log(log_path, {"event": "eval", "epoch": epoch + 1, "step": step,
                              "metrics": dev_metrics, "time": time.time() - started})
      # Written in the background while the next epoch trains.
      checkpoints.save(epoch + 1, state, run_config)
      if lead:
        plot_curves(log_path, output_dir / CURVES_FILE)
      if args.stop_after_epoch == epoch + 1 and epoch + 1 < num_epochs:
        progress.close()
        if lead:
          print(f"stopped after epoch {epoch + 1} of {num_epochs}; continue with --resume")
        return None
    progress.close()

    if dev_metrics is None:  # Resumed a finished run.
      dev_metrics = evaluate_dev()
    params = distributed.gather(state.params)
    if lead:
      pretrained.save_pretrained(output_dir / MODEL_FOLDER, params, initial.hf_config,
                                 task.labels)
      tokenizer.save_pretrained(str(output_dir / MODEL_FOLDER))
      elapsed = time.time() - started
      append_log(log_path, {"event": "final", "step": step, "metrics": dev_metrics,
                            "time": elapsed})
      print(f"final {task.name} {method.name} seed={args.seed}: dev "
            f"{format_metrics(dev_metrics)} ({step} steps, {elapsed:.0f} s)")
  finally:
    checkpoints.close()  # the writes in flight finish, whatever stopped the run
  if not args.keep_checkpoint:  # The run is complete without it: the model is exported.
    distributed.barrier("checkpoints closed")
    checkpoints.delete_all()
  return dev_metrics


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Command-line entry point; returns the exit status."""
  args = parse_args(argv)
  try:
    train(args)
  except (UsageError, DivergedError, data.DataError,
          pretrained.PretrainedModelError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
