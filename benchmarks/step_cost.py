r"""Cost of one training step of every method on the Flax BERT-family encoder.

  python benchmarks/step_cost.py --quick            # CPU, a few minutes
  python benchmarks/step_cost.py                    # embedded MiniLM, batch 32, length 128
  python benchmarks/step_cost.py --config bert-large  # random weights, for accelerators

Every row is one jitted step ``(params, opt_state, batch) -> (params, opt_state, loss)``:
the clean gradient, the method, AdamW and ``apply_updates``. The rows are timed in one
process and **interleaved**: each round runs ``--repeats`` steps of every row in turn
(starting from a different row each round), so drift of the machine hits all rows alike.
Times are medians over all rounds, after warm-up, each step ended by
``block_until_ready``. Ratios are ratios of those medians, from the same run.

Memory: the compiled step's ``memory_analysis()`` (temp + argument + output bytes, the
"compiled memory"), available on every backend; and, where the backend reports it
(``device.memory_stats()``: GPU, TPU), the peak bytes in use, measured for each row in a
fresh subprocess (a process-wide peak cannot be reset between rows).

A second study times the per-example work (the per-example Fisher of FSAM and
per-instance SAM) against chunk size and batch size.

Results go to ``runs/step_cost/<device-kind>/`` (or ``--output-dir``): ``step_cost.json``,
``step_cost.md`` and ``step_cost.png`` / ``step_cost_scaling.png``, stamped with the
device, the versions and the command. ``--publish`` writes them to
``benchmarks/results/<device-kind>/`` instead, replacing the committed table: quick and
ad-hoc runs never touch it unless told to.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `examples` importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

import optax_sam
from benchmarks import common
from benchmarks import step_cost_report as report
from examples.glue import model as model_lib
from examples.glue import pretrained as pretrained_lib
from optax_sam.core import selection as selection_lib

SCRIPT = "benchmarks/step_cost.py"
NUM_LABELS = 2
LEARNING_RATE = 2e-5
WEIGHT_DECAY = 0.01
RHO = 0.05
NORM_EPS = 1e-12
# The largest mask_every whose count check never fires again after the first step.
NEVER = 2**30
# DPS's and Child-Tuning's scope in their papers, as in the GLUE example.
PAPER_SCOPE = optax_sam.subnetworks.encoder_dense_kernels

# Random-weight encoders of the papers' sizes (BERT's vocabulary and positions).
CONFIGS: dict[str, dict[str, int]] = {
    "bert-base": dict(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12,
                      intermediate_size=3072, max_positions=512, type_vocab_size=2),
    "bert-large": dict(vocab_size=30522, hidden_size=1024, num_layers=24, num_heads=16,
                       intermediate_size=4096, max_positions=512, type_vocab_size=2),
    # For the tests: a two-layer encoder that compiles in about a second.
    "tiny": dict(vocab_size=512, hidden_size=32, num_layers=2, num_heads=2,
                 intermediate_size=64, max_positions=64, type_vocab_size=2),
}
CONFIG_CHOICES = ("minilm", *CONFIGS)


# ---------------------------------------------------------------------------------------
# Model, batch and loss.


@dataclasses.dataclass
class Setup:
  """The model and data every row shares."""

  config: model_lib.EncoderConfig
  module: model_lib.SequenceClassifier
  params: Any
  batch: dict[str, jax.Array]  # the main batch
  big_batch: dict[str, np.ndarray]  # rows for the scaling study (sliced per batch size)
  model_dir: Optional[pathlib.Path]  # the checkpoint folder (None: random weights)
  description: str


def random_batch(rng: np.random.Generator, size: int, length: int,
                 vocab_size: int) -> dict[str, np.ndarray]:
  """Sentence pairs of full ``length`` (no padding): the most work per row."""
  input_ids = rng.integers(5, vocab_size, size=(size, length), dtype=np.int32)
  token_type_ids = np.zeros((size, length), np.int32)
  token_type_ids[:, length // 2:] = 1
  return {"input_ids": input_ids, "token_type_ids": token_type_ids,
          "attention_mask": np.ones((size, length), np.int32),
          "labels": rng.integers(0, NUM_LABELS, size=size, dtype=np.int32)}


def make_setup(args: argparse.Namespace) -> Setup:
  """Loads the checkpoint (or draws random weights) and a random batch."""
  if args.model_dir or args.config == "minilm":
    folder = pathlib.Path(args.model_dir or pretrained_lib.default_model_dir())
    pretrained = pretrained_lib.load_pretrained(folder, NUM_LABELS, seed=0, dropout=0.0)
    config, params = pretrained.config, pretrained.params
    description = f"checkpoint {folder.name if args.model_dir else 'all-MiniLM-L6-v2'}"
  else:
    folder = None
    config = model_lib.EncoderConfig(**CONFIGS[args.config], hidden_dropout=0.0,
                                      attention_dropout=0.0)
    module = model_lib.SequenceClassifier(config, NUM_LABELS)
    dummy = jnp.zeros((1, 8), jnp.int32)
    params = jax.jit(module.init)(jax.random.key(0), dummy, dummy, dummy)["params"]
    description = f"{args.config}, random weights"
  if args.length > config.max_positions:
    raise SystemExit(f"error: --length {args.length} exceeds the model's "
                     f"{config.max_positions} positions")
  module = model_lib.SequenceClassifier(config, NUM_LABELS)
  rng = np.random.default_rng(0)
  largest = max([args.batch_size, *args.scaling_batch_sizes])
  big_batch = random_batch(rng, largest, args.length, config.vocab_size)
  batch = jax.tree.map(lambda x: jnp.asarray(x[:args.batch_size]), big_batch)
  size = sum(x.size for x in jax.tree.leaves(params))
  description += (f": {config.num_layers} layers, hidden {config.hidden_size}, "
                  f"{size / 1e6:.1f} M parameters, float32, dropout off")
  return Setup(config, module, params, batch, big_batch, folder, description)


@dataclasses.dataclass(frozen=True)
class Losses:
  """The model's per-example cross-entropy, as every row's step uses it.

  Attributes:
    batch_loss: ``(params, batch) -> [batch]`` losses from one batched forward pass.
    example_loss: ``(params, example) -> scalar``, the loss of one row.
  """

  batch_loss: Callable[[Any, Any], jax.Array]
  example_loss: Callable[[Any, Any], jax.Array]

  def mean_loss(self, params: Any, batch: Any) -> jax.Array:
    return jnp.mean(self.batch_loss(params, batch))

  def loss_fn(self, batch: Any) -> optax_sam.PerExampleLoss:
    """The library's ``loss_fn``: the batched forward pass for the whole-batch passes;
    the methods that need per-example gradients (FSAM's Fisher, per-instance SAM)
    differentiate ``example_loss`` one example at a time. Both give the same losses."""
    return optax_sam.PerExampleLoss(self.example_loss, batch, batch_loss=self.batch_loss)


def loss_functions(module: model_lib.SequenceClassifier) -> Losses:
  """The classifier's per-example cross-entropy, batched and of one row."""

  def batch_loss(params, batch):
    logits = module.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                          batch["token_type_ids"], deterministic=True)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch["labels"])

  def example_loss(params, example):
    return batch_loss(params, jax.tree.map(lambda x: x[None], example))[0]

  return Losses(batch_loss, example_loss)


# ---------------------------------------------------------------------------------------
# Rows.


@dataclasses.dataclass
class Row:
  """One timed step.

  ``run()`` performs ``cycle`` steps (one, unless the row is amortised over a cycle of
  steps that differ) and blocks until they are done; a time is that of a run divided
  by ``cycle``. ``memory`` holds the compiled memory analysis.
  """

  name: str
  run: Callable[[], None]
  memory: Optional[dict[str, int]] = None
  compile_s: Optional[float] = None
  note: Optional[str] = None
  times: list[float] = dataclasses.field(default_factory=list)
  cycle: int = 1


def _memory_analysis(compiled) -> Optional[dict[str, int]]:
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend has it
    return None
  if analysis is None:
    return None
  parts = {name: int(getattr(analysis, f"{name}_size_in_bytes", 0) or 0)
           for name in ("temp", "argument", "output", "alias", "generated_code")}
  parts["compiled"] = parts["temp"] + parts["argument"] + parts["output"]
  return parts


def _compiled_row(name: str, function: Callable, *inputs, feed_back: int = 0,
                  note: Optional[str] = None, cycle: int = 1) -> Row:
  """Compiles ``function(*inputs)``; each run feeds output ``feed_back`` into its input.

  ``feed_back`` is the index of the argument (and output) carried from step to step, the
  optimizer state; the parameters are shared by all rows and not updated, so the rows
  hold one copy of them between steps. A run is ``cycle`` consecutive steps.
  """
  started = time.perf_counter()
  compiled = jax.jit(function).lower(*inputs).compile()
  compile_s = time.perf_counter() - started
  carried = list(inputs)

  def run():
    for _ in range(cycle):
      outputs = compiled(*carried)
      if feed_back is not None and isinstance(outputs, tuple):
        carried[feed_back] = outputs[feed_back]
    jax.block_until_ready(outputs)

  return Row(name, run, _memory_analysis(compiled), compile_s, note, cycle=cycle)


def _adamw() -> optax.GradientTransformation:
  return optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)


# A JAX row's builder: (losses, args, params) -> (optimizer, step), where
# step(params, opt_state, batch) -> (params, opt_state, loss) is jitted by the caller.
Step = Callable[[Any, Any, Any], tuple[Any, Any, jax.Array]]
StepBuilder = Callable[[Losses, argparse.Namespace, Any],
                       tuple[optax.GradientTransformation, Step]]


def _training_step(losses: Losses, update: Callable[..., Any]) -> Step:
  """The step every JAX row shares: the clean gradient, ``update``, ``apply_updates``.

  ``update(grads, opt_state, params, batch) -> (updates, opt_state)`` is the row's own
  part.
  """
  grad = jax.value_and_grad(losses.mean_loss)

  def step(params, opt_state, batch):
    loss, grads = grad(params, batch)
    updates, opt_state = update(grads, opt_state, params, batch)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def _adamw_step(losses: Losses, args: argparse.Namespace, params: Any):
  del args, params
  tx = _adamw()
  return tx, _training_step(losses, lambda grads, state, params, batch: tx.update(
      grads, state, params))


def _floor_step(losses: Losses, args: argparse.Namespace, params: Any):
  del args, params
  tx = _adamw()

  def update(grads, opt_state, params, batch):
    norm = optax.tree.norm(grads)
    perturbed = jax.tree.map(lambda w, g: w + RHO / (norm + NORM_EPS) * g, params, grads)
    return tx.update(jax.grad(losses.mean_loss)(perturbed, batch), opt_state, params)

  return tx, _training_step(losses, update)


def _optax_contrib_sam_step(losses: Losses, args: argparse.Namespace, params: Any):
  del args, params
  tx = optax.contrib.sam(_adamw(), optax.chain(optax.contrib.normalize(), optax.sgd(RHO)),
                         opaque_mode=True)

  def update(grads, opt_state, params, batch):
    grad_fn = lambda p, _: jax.grad(losses.mean_loss)(p, batch)
    return tx.update(grads, opt_state, params, grad_fn=grad_fn)

  return tx, _training_step(losses, update)


def _library(method: Callable[[argparse.Namespace, Any], optax.GradientTransformation]
             ) -> StepBuilder:
  """A library row: ``optax.chain(method(args, params), adamw)`` called with ``loss_fn``."""

  def build(losses: Losses, args: argparse.Namespace, params: Any):
    tx = optax.chain(method(args, params), _adamw())
    return tx, _training_step(losses, lambda grads, state, params, batch: tx.update(
        grads, state, params, loss_fn=losses.loss_fn(batch)))

  return build


@dataclasses.dataclass(frozen=True)
class TorchContext:
  """What a PyTorch row's step needs: the module, the parameters, its own AdamW, and
  ``backward()``, which runs the batch's forward and backward pass."""
  torch: Any
  params: list[Any]
  optimizer: Any
  backward: Callable[[], None]


def _torch_adamw_step(ctx: TorchContext) -> Callable[[], None]:
  def step():
    ctx.optimizer.zero_grad(set_to_none=True)
    ctx.backward()
    ctx.optimizer.step()
  return step


def _torch_sam_step(ctx: TorchContext) -> Callable[[], None]:
  torch = ctx.torch

  def step():
    ctx.optimizer.zero_grad(set_to_none=True)
    ctx.backward()
    with torch.no_grad():
      grads = [p.grad for p in ctx.params]
      norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))  # pylint: disable=protected-access
      epsilon = torch._foreach_mul(grads, RHO / (norm + NORM_EPS))  # pylint: disable=protected-access
      torch._foreach_add_(ctx.params, epsilon)  # pylint: disable=protected-access
    ctx.optimizer.zero_grad(set_to_none=True)
    ctx.backward()
    with torch.no_grad():
      torch._foreach_sub_(ctx.params, epsilon)  # pylint: disable=protected-access
    ctx.optimizer.step()

  return step


def random_child_mask(params: Any, keep: float) -> Any:
  """A fixed random child network (the mask's values do not change the step's cost)."""
  in_scope = selection_lib.select(params, PAPER_SCOPE, argument="scope")
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  chosen = jax.tree.leaves(in_scope)
  masks = [jax.random.bernoulli(k, keep, x.shape) if c else jnp.ones(x.shape, bool)
           for k, x, c in zip(keys, leaves, chosen)]
  return jax.tree.unflatten(treedef, masks)


def _amortised_fsam(records: dict[str, dict[str, Any]],
                    args: argparse.Namespace) -> dict[str, Any]:
  """The ``fsam`` record from its two measured rows: ((N-1) normal + refresh) / N."""
  normal, refresh = records["fsam[normal]"], records["fsam[refresh]"]
  n = args.fsam_mask_every
  return {
      "name": "fsam", "description": ROW_BY_NAME["fsam"].description.replace("N", str(n)),
      "median_s": ((n - 1) * normal["median_s"] + refresh["median_s"]) / n,
      "derived_from": {"fsam[normal]": n - 1, "fsam[refresh]": 1, "divisor": n},
      "compiled_memory_bytes": max(normal["compiled_memory_bytes"] or 0,
                                   refresh["compiled_memory_bytes"] or 0) or None,
      "peak_bytes_in_use": max([p for p in (normal["peak_bytes_in_use"],
                                            refresh["peak_bytes_in_use"]) if p],
                               default=None)}


REFERENCE, LIBRARY, TORCH = "reference", "library", "torch"
# LookSAM's α, the paper's default, for the amortised rows.
LOOKSAM_ALPHA = 0.7
AMORTISED_PERIODS = (2, 5, 10)


@dataclasses.dataclass(frozen=True)
class RowSpec:
  """One row of the table. Adding a row is adding one ``RowSpec`` to ``ROWS``.

  Attributes:
    name: the row's name (``--methods``, the tables, ``step_cost.json``).
    kind: ``"reference"``, ``"library"`` or ``"torch"`` (the plot's colours).
    description: what it computes (the table's second column).
    step: a JAX row's builder, ``(losses, args, params) -> (optimizer, step)``;
      ``_library(method)`` for a library transform chained before AdamW.
    torch_step: a PyTorch row's builder, ``TorchContext -> step()``.
    note: ``(args, torch threads) -> str``, a line for the notes when the row runs.
    measured_as: a derived row's measured rows (run in its place).
    derive: ``(records, args) -> record``, a derived row's record from theirs.
    selectable: offered by ``--methods`` (not the rows measured for a derived one).
    cycle: steps per timed run, for a row whose steps differ in a fixed cycle (an
      amortised method perturbing every ``cycle`` steps): its time is a run's over
      ``cycle``, the mean step of the cycle.
  """

  name: str
  kind: str
  description: str
  step: Optional[StepBuilder] = None
  torch_step: Optional[Callable[[TorchContext], Callable[[], None]]] = None
  note: Optional[Callable[[argparse.Namespace, int], str]] = None
  measured_as: tuple[str, ...] = ()
  derive: Optional[Callable[[dict, argparse.Namespace], dict]] = None
  selectable: bool = True
  cycle: int = 1


def _amortised_note(args: argparse.Namespace, threads: int) -> str:
  del args, threads
  return ("sam[k=K], fsam[k=K]: LookSAM (perturb_every=K, reuse_alpha="
          f"{LOOKSAM_ALPHA}), timed over whole cycles of K steps (one perturbing step, "
          "K-1 that reuse g_v): the mean step. fsam[k=K] keeps its first mask; its "
          "refresh, every 100 steps, adds what fsam adds over fsam[normal]")


def _amortised_rows(method: str, build: Callable[[int], optax.GradientTransformation]
                    ) -> list[RowSpec]:
  """``method[k=K]`` rows: ``build(K)`` before AdamW for each period in AMORTISED_PERIODS."""
  return [RowSpec(f"{method}[k={k}]", LIBRARY,
                  f"optax_sam.{method}, LookSAM every {k} steps (alpha {LOOKSAM_ALPHA}): "
                  f"mean step of a cycle",
                  _library(lambda a, p, k=k: build(k)), cycle=k, note=_amortised_note)
          for k in AMORTISED_PERIODS]


# Every row, in the order of the tables.
ROWS: tuple[RowSpec, ...] = (
    RowSpec("adamw", REFERENCE, "AdamW alone: one gradient evaluation", _adamw_step),
    RowSpec("floor", REFERENCE,
            "hand-written SAM step: two gradient evaluations + AdamW (the floor)",
            _floor_step),
    RowSpec("optax-contrib-sam", REFERENCE,
            "optax.contrib.sam, opaque mode (normalize + sgd(rho) adversary)",
            _optax_contrib_sam_step),
    RowSpec("sam", LIBRARY, "optax_sam.sam", _library(lambda a, p: optax_sam.sam(RHO))),
    RowSpec("asam", LIBRARY, "optax_sam.asam", _library(lambda a, p: optax_sam.asam(0.5))),
    RowSpec("fsam", LIBRARY, "optax_sam.fsam, amortised: ((N-1) normal + refresh) / N",
            measured_as=("fsam[normal]", "fsam[refresh]"), derive=_amortised_fsam,
            note=lambda args, threads: (
                f"fsam: amortised from two measured rows, ((N-1) * median(fsam[normal]) "
                f"+ median(fsam[refresh])) / N with N = mask_every = "
                f"{args.fsam_mask_every}; fsam[refresh] is fsam(mask_every=1), whose "
                f"every step recomputes the per-example Fisher "
                f"({min(32, args.batch_size)} examples, chunks of 8) and the global top-k")),
    # The mask is refreshed at the first (warm-up) step only.
    RowSpec("fsam[normal]", LIBRARY, "optax_sam.fsam, a step that keeps the mask",
            _library(lambda a, p: optax_sam.fsam(RHO, mask_every=NEVER)), selectable=False),
    RowSpec("fsam[refresh]", LIBRARY,
            "optax_sam.fsam, a step that refreshes the mask (per-example Fisher)",
            _library(lambda a, p: optax_sam.fsam(RHO, mask_every=1)), selectable=False),
    RowSpec("gasam", LIBRARY, "optax_sam.gasam", _library(lambda a, p: optax_sam.gasam(RHO))),
    *(_amortised_rows("sam", lambda k: optax_sam.sam(
        RHO, perturb_every=k, reuse_alpha=LOOKSAM_ALPHA))),
    *(_amortised_rows("fsam", lambda k: optax_sam.fsam(
        RHO, mask_every=NEVER, perturb_every=k, reuse_alpha=LOOKSAM_ALPHA))),
    RowSpec("delta-sam", LIBRARY, "optax_sam.delta_sam",
            _library(lambda a, p: optax_sam.delta_sam(RHO))),
    RowSpec("per-instance-sam", LIBRARY, "optax_sam.per_instance_sam (chunked vmap)",
            _library(lambda a, p: optax_sam.per_instance_sam(
                RHO, chunk_size=a.per_instance_chunk)),
            note=lambda args, threads: (
                f"per-instance-sam: chunk size {args.per_instance_chunk}")),
    # A long run: every timed step is in Stage I, none selects.
    RowSpec("dps", LIBRARY, "optax_sam.dps (Stage I/II step; selection step excluded)",
            _library(lambda a, p: optax_sam.dps(total_steps=NEVER, scope=PAPER_SCOPE)),
            note=lambda args, threads: (
                "dps: a Stage I/II step; the selection step (per-matrix top-k, once per "
                "cycle of 2 x 5% of the run) is not in the row")),
    RowSpec("child-tuning-f", LIBRARY, "optax_sam.child_tuning_f",
            _library(lambda a, p: optax_sam.child_tuning_f(0.3, scope=PAPER_SCOPE))),
    RowSpec("child-tuning-d", LIBRARY,
            "optax_sam.child_tuning_d (fixed mask; mask pass excluded)",
            _library(lambda a, p: optax_sam.child_tuning_d(random_child_mask(p, 0.3))),
            note=lambda args, threads: (
                "child-tuning-d: a fixed random 30% mask of the encoder's dense kernels; "
                "the gradient pass that chooses the mask before training is not in the "
                "row")),
    RowSpec("torch-adamw", TORCH, "PyTorch eager: BertModel + linear head, AdamW",
            torch_step=_torch_adamw_step),
    RowSpec("torch-sam", TORCH, "PyTorch eager: the same SAM + AdamW step",
            torch_step=_torch_sam_step,
            note=lambda args, threads: (
                f"torch rows: torch.set_num_threads({threads}), the number of cores JAX's "
                "CPU backend spreads its work over; SAM written with foreach ops (perturb "
                "in place, second backward, restore, AdamW step)")),
)
ROW_BY_NAME = {spec.name: spec for spec in ROWS}
ALL_ROWS = tuple(spec.name for spec in ROWS if spec.selectable)  # --methods
TORCH_ROWS = tuple(spec.name for spec in ROWS if spec.kind == TORCH)
KINDS = {spec.name: spec.kind for spec in ROWS}


def jax_row(name: str, setup: Setup, args: argparse.Namespace) -> Row:
  """Builds and compiles the step of row ``name``."""
  spec = ROW_BY_NAME[name]
  tx, step = spec.step(loss_functions(setup.module), args, setup.params)
  opt_state = jax.jit(tx.init)(setup.params)
  return _compiled_row(name, step, setup.params, opt_state, setup.batch, feed_back=1,
                       cycle=spec.cycle)


def torch_rows(setup: Setup, args: argparse.Namespace, threads: int
               ) -> tuple[list[Row], Optional[str]]:
  """PyTorch eager rows on the CPU, or none and the reason."""
  if jax.default_backend() != "cpu":
    return [], ("PyTorch rows skipped: the comparison is for CPU (JAX holds the "
                "accelerator's memory)")
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    return [], f"PyTorch rows skipped: {error} (pip install -e '.[bench-torch]')"
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  config = setup.config
  if setup.model_dir is not None:
    encoder = transformers.AutoModel.from_pretrained(
        str(setup.model_dir), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  else:
    encoder = transformers.BertModel(transformers.BertConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_positions,
        type_vocab_size=config.type_vocab_size, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0))
  head = torch.nn.Linear(config.hidden_size, NUM_LABELS)
  encoder.train()
  params = [p for p in (*encoder.parameters(), *head.parameters()) if p.requires_grad]
  batch = {k: torch.from_numpy(np.asarray(v).astype(np.int64))
           for k, v in setup.batch.items()}

  def backward():
    pooled = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     token_type_ids=batch["token_type_ids"]).pooler_output
    loss = torch.nn.functional.cross_entropy(head(pooled), batch["labels"])
    loss.backward()

  def make(spec: RowSpec) -> Row:
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    step = spec.torch_step(TorchContext(torch, params, optimizer, backward))
    return Row(spec.name, step, note=f"torch {torch.__version__}, {threads} threads")

  return [make(spec) for spec in ROWS if spec.kind == TORCH and spec.name in args.methods
          ], None


def scaling_rows(setup: Setup, args: argparse.Namespace) -> list[tuple[dict, Row]]:
  """Per-example Fisher and per-instance SAM at each (batch size, chunk size) point."""
  losses = loss_functions(setup.module)
  points = sorted({(b, args.scaling_fixed_chunk) for b in args.scaling_batch_sizes}
                  | {(args.scaling_fixed_batch, c) for c in args.scaling_chunk_sizes})
  rows = []
  for batch_size, chunk in points:
    chunk = min(chunk, batch_size)
    batch = jax.tree.map(lambda x, b=batch_size: jnp.asarray(x[:b]), setup.big_batch)

    def fisher(params, batch, chunk=chunk):
      return optax_sam.fisher.empirical_fisher(losses.loss_fn(batch), params,
                                               chunk_size=chunk)

    tx = optax_sam.per_instance_sam(RHO, chunk_size=chunk)

    def per_instance(params, state, batch, tx=tx):
      return tx.update(params, state, params, loss_fn=losses.loss_fn(batch))

    info = {"batch_size": batch_size, "chunk_size": chunk}
    rows.append(({**info, "function": "empirical_fisher"},
                 _compiled_row(f"fisher[b={batch_size},c={chunk}]", fisher, setup.params,
                               batch, feed_back=None)))
    rows.append(({**info, "function": "per_instance_sam"},
                 _compiled_row(f"per-instance-sam[b={batch_size},c={chunk}]",
                               per_instance, setup.params, tx.init(setup.params), batch,
                               feed_back=1)))
  return rows


# ---------------------------------------------------------------------------------------
# Timing.


def interleaved_timing(rows: Sequence[Row], rounds: int, repeats: int, warmup: int,
                       desc: str) -> None:
  """Warms every row up, then times ``rounds`` round-robin passes of ``repeats`` steps."""
  for row in tqdm.tqdm(rows, desc=f"{desc}: warm-up", unit="row", leave=False):
    for _ in range(warmup):
      row.run()
  with tqdm.tqdm(total=rounds * len(rows) * repeats, desc=f"{desc}: timing",
                 unit="step") as progress:
    for round_index in range(rounds):
      start = round_index % len(rows)
      for row in [*rows[start:], *rows[:start]]:
        for _ in range(repeats):
          began = time.perf_counter()
          row.run()
          row.times.append((time.perf_counter() - began) / row.cycle)
          progress.update()


def time_stats(times: Sequence[float]) -> dict[str, Any]:
  quartiles = np.percentile(times, [25, 75]) if times else [math.nan] * 2
  return {"median_s": statistics.median(times), "p25_s": float(quartiles[0]),
          "p75_s": float(quartiles[1]), "min_s": min(times), "n": len(times),
          "samples_s": [round(t, 6) for t in times]}


# ---------------------------------------------------------------------------------------
# Peak device memory, one subprocess per row.


def device_reports_memory() -> bool:
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return False
  return bool(stats) and "peak_bytes_in_use" in stats


def peak_memory_of_row(name: str, args: argparse.Namespace) -> Optional[int]:
  """Runs this script for row ``name`` alone in a fresh process; its peak bytes in use."""
  model = ["--model-dir", args.model_dir] if args.model_dir else ["--config", args.config]
  command = [sys.executable, str(pathlib.Path(__file__).resolve()), *model,
             "--batch-size", str(args.batch_size), "--length", str(args.length),
             "--per-instance-chunk", str(args.per_instance_chunk), "--no-scaling",
             "--no-torch", "--peak-memory", "off", "--measure-peak-row", name]
  done = subprocess.run(command, capture_output=True, text=True, check=False,
                        cwd=common.ROOT)
  for line in done.stdout.splitlines():
    if line.startswith("PEAK "):
      return json.loads(line[5:])
  print(f"peak memory of {name}: subprocess failed:\n{done.stderr[-2000:]}",
        file=sys.stderr)
  return None


def measure_peak_row(name: str, args: argparse.Namespace) -> None:
  """The subprocess side: build one row, run it, print its peak."""
  setup = make_setup(args)
  row = jax_row(name, setup, args)
  for _ in range(2):
    row.run()
  stats = jax.devices()[0].memory_stats() or {}
  print("PEAK " + json.dumps(stats.get("peak_bytes_in_use")))


# ---------------------------------------------------------------------------------------
# Results: table, goals, plots.


def build_rows_json(rows: Sequence[Row], args: argparse.Namespace,
                    peaks: dict[str, Optional[int]]) -> list[dict[str, Any]]:
  """One record per row, in table order, derived rows added, ratios to AdamW and floor."""
  records = {}
  for row in rows:
    spec = ROW_BY_NAME.get(row.name)
    record = {"name": row.name, "description": spec.description if spec else row.name,
              **time_stats(row.times), "compile_s": row.compile_s,
              "compiled_memory_bytes": (row.memory or {}).get("compiled"),
              "memory_analysis": row.memory, "peak_bytes_in_use": peaks.get(row.name)}
    if row.note:
      record["note"] = row.note
    records[row.name] = record
  for spec in ROWS:
    if spec.derive and all(name in records for name in spec.measured_as):
      records[spec.name] = spec.derive(records, args)
  out = [records[spec.name] for spec in ROWS if spec.name in records]
  for record in out:
    for reference in ("adamw", "floor"):
      ref = records.get(reference)
      record[f"ratio_to_{reference}"] = (record["median_s"] / ref["median_s"]
                                         if ref else None)
  return out


# ---------------------------------------------------------------------------------------
# Command line.


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog=f"python {SCRIPT}",
                                   description=__doc__.split("\n", 1)[0])
  parser.add_argument("--config", choices=CONFIG_CHOICES, default="minilm",
                      help="minilm: the embedded all-MiniLM-L6-v2 checkpoint (default); "
                      "bert-base / bert-large: random weights of those sizes; tiny: tests")
  parser.add_argument("--model-dir", help="a Hugging Face folder instead of --config")
  parser.add_argument("--batch-size", type=int, help="rows per batch (default 32; quick 16)")
  parser.add_argument("--length", type=int, help="tokens per row (default 128; quick 64)")
  parser.add_argument("--rounds", type=int, help="interleaved rounds (default 7; quick 3)")
  parser.add_argument("--repeats", type=int, help="steps per row per round (default 3; "
                      "quick 1)")
  parser.add_argument("--warmup", type=int, help="untimed steps per row (default 2; "
                      "quick 1)")
  parser.add_argument("--methods", nargs="+", choices=ALL_ROWS, metavar="ROW",
                      help=f"rows to run (default all): {' '.join(ALL_ROWS)}")
  parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows")
  parser.add_argument("--torch-threads", type=int,
                      help="PyTorch threads (default: the cores JAX's CPU backend uses)")
  parser.add_argument("--per-instance-chunk", type=int, default=8,
                      help="chunk size of the per-instance-sam row")
  parser.add_argument("--fsam-mask-every", type=int, default=100,
                      help="FSAM's refresh period for the amortised row (default: the "
                      "library default, 100)")
  parser.add_argument("--no-scaling", action="store_true",
                      help="skip the per-example scaling study")
  parser.add_argument("--scaling-batch-sizes", type=int, nargs="+",
                      help="batch sizes at the fixed chunk (default 8 16 32 64; quick 8 16)")
  parser.add_argument("--scaling-chunk-sizes", type=int, nargs="+",
                      help="chunk sizes at the fixed batch (default 1 2 4 8 16 32; "
                      "quick 1 4)")
  parser.add_argument("--scaling-fixed-chunk", type=int, help="default 8; quick 4")
  parser.add_argument("--scaling-fixed-batch", type=int, help="default 32; quick 16")
  parser.add_argument("--scaling-rounds", type=int,
                      help="interleaved rounds of the scaling study (default: --rounds; "
                      "quick 2)")
  parser.add_argument("--peak-memory", choices=("auto", "off", "subprocess"),
                      default="auto", help="peak device memory per row in a subprocess "
                      "(auto: where the backend reports it)")
  parser.add_argument("--quick", action="store_true",
                      help="a short run for a CPU: batch 16, length 64, 3 rounds of 1 "
                      "step, a three-point scaling grid")
  parser.add_argument("--output-dir", help="default: runs/step_cost/<device-kind>")
  parser.add_argument("--publish", action="store_true",
                      help="write to benchmarks/results/<device-kind>, replacing the "
                      "committed results")
  parser.add_argument("--note", help="a remark stamped on the results (e.g. shared cores)")
  parser.add_argument("--measure-peak-row", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.publish and args.output_dir:
    parser.error("--publish writes to benchmarks/results/<device-kind>; drop --output-dir")
  quick = args.quick
  defaults = dict(batch_size=16 if quick else 32, length=64 if quick else 128,
                  rounds=3 if quick else 7, repeats=1 if quick else 3,
                  warmup=1 if quick else 2,
                  scaling_batch_sizes=[8, 16] if quick else [8, 16, 32, 64],
                  scaling_chunk_sizes=[1, 4] if quick else [1, 2, 4, 8, 16, 32],
                  scaling_fixed_chunk=4 if quick else 8,
                  scaling_fixed_batch=16 if quick else 32)
  if args.scaling_rounds is None and quick:
    args.scaling_rounds = 2
  for name, value in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  if args.scaling_rounds is None:
    args.scaling_rounds = args.rounds
  args.methods = list(args.methods or ALL_ROWS)
  if args.no_torch:
    args.methods = [m for m in args.methods if m not in TORCH_ROWS]
  if args.no_scaling:
    args.scaling_batch_sizes = []
    args.scaling_chunk_sizes = []
  return args


def output_folder(args: argparse.Namespace, kind: str) -> pathlib.Path:
  """Where results go: the committed folder only with ``--publish``."""
  if args.publish:
    return common.RESULTS / kind
  return pathlib.Path(args.output_dir or common.SCRATCH / "step_cost" / kind)


def _step_row_names(methods: Sequence[str]) -> list[str]:
  """The JAX rows to compile, in ``methods``' order (a derived row's measured rows)."""
  names = []
  for name in methods:
    spec = ROW_BY_NAME[name]
    if spec.kind != TORCH:
      names += spec.measured_as or [name]
  return names


def run(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  """Runs the benchmark that ``argv`` describes; returns (and writes) the results."""
  args = parse_args(argv)
  if args.measure_peak_row:
    measure_peak_row(args.measure_peak_row, args)
    return {}
  started = time.perf_counter()
  argv = list(sys.argv[1:] if argv is None else argv)
  device = jax.devices()[0]
  backend = jax.default_backend()
  kind = common.device_kind(device)
  meta = common.stamp(SCRIPT, argv)
  meta.update(device=f"{device.platform}: {device.device_kind} ({kind}), "
              f"1 of {jax.device_count()} device(s)", device_kind=kind, backend=backend,
              load_average_before=common.load_average(), note=args.note)
  threads = args.torch_threads or common.cpu_count()
  notes = []

  setup = make_setup(args)
  meta["model"] = setup.description
  rows = []
  for name in tqdm.tqdm(_step_row_names(args.methods), desc="compiling", unit="row"):
    rows.append(jax_row(name, setup, args))
  if any(m in TORCH_ROWS for m in args.methods):
    extra, why_not = torch_rows(setup, args, threads)
    rows += extra
    if why_not:
      notes.append(why_not)
  interleaved_timing(rows, args.rounds, args.repeats, args.warmup, "step cost")

  peaks: dict[str, Optional[int]] = {}
  measure_peaks = (args.peak_memory == "subprocess"
                   or (args.peak_memory == "auto" and device_reports_memory()))
  if measure_peaks:
    for row in tqdm.tqdm([r for r in rows if r.name not in TORCH_ROWS],
                         desc="peak memory (subprocess per row)", unit="row"):
      peaks[row.name] = peak_memory_of_row(row.name, args)
  else:
    notes.append(f"peak device memory: not reported by the {backend} backend "
                 "(device.memory_stats() is None); see the compiled memory")

  meta["settings"] = {k: getattr(args, k) for k in (
      "config", "model_dir", "batch_size", "length", "rounds", "repeats", "warmup",
      "methods", "per_instance_chunk", "fsam_mask_every", "scaling_batch_sizes",
      "scaling_chunk_sizes", "scaling_fixed_chunk", "scaling_fixed_batch",
      "scaling_rounds")}
  meta["settings"]["torch_threads"] = threads
  notes.append(
      "every JAX step: clean gradient + method + AdamW(lr 2e-5, wd 0.01) + "
      "apply_updates, jitted; parameters float32, dropout off, full-length sentence "
      "pairs, random labels; the loss is the batched per-example cross-entropy "
      "(per-example paths differentiate one example at a time)")
  notes += list(dict.fromkeys(spec.note(args, threads) for spec in ROWS
                             if spec.note and spec.name in args.methods))
  notes.append(
      "compiled memory: temp + argument + output bytes of the compiled step "
      "(memory_analysis); arguments include the shared parameters, the row's optimizer "
      "state and the batch")
  records = build_rows_json(rows, args, peaks)
  result = {"meta": meta, "rows": records, "scaling": [], "notes": notes}
  folder = output_folder(args, kind)

  def write(final: bool) -> str:
    meta["load_average_after"] = common.load_average()
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    meta["complete"] = final
    result["goals"] = report.evaluate_goals(records, result["scaling"],
                                            args.scaling_fixed_chunk, backend)
    folder.mkdir(parents=True, exist_ok=True)
    markdown = report.render_markdown(result)
    result["files"] = [str(p.name) for p in report.plot(result, folder, KINDS)] + [
        "step_cost.json", "step_cost.md"]
    common.write_json(folder / "step_cost.json", result)
    (folder / "step_cost.md").write_text(markdown + "\n", encoding="utf-8")
    return markdown

  has_scaling = bool(args.scaling_batch_sizes or args.scaling_chunk_sizes)
  # The step table is on disk before the (longer-running) scaling study starts.
  write(final=not has_scaling)
  if has_scaling:
    points = scaling_rows(setup, args)
    interleaved_timing([row for _, row in points], args.scaling_rounds, args.repeats,
                       args.warmup, "scaling")
    for info, row in points:
      result["scaling"].append({
          **info, **time_stats(row.times), "compile_s": row.compile_s,
          "compiled_memory_bytes": (row.memory or {}).get("compiled"),
          "memory_analysis": row.memory})
  markdown = write(final=True)
  print(markdown)
  print(f"\nwrote {', '.join(result['files'])} to {folder}")
  return result


def main(argv: Optional[Sequence[str]] = None) -> int:
  run(argv)
  return 0


if __name__ == "__main__":
  sys.exit(main())
