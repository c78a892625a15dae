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
import functools
import json
import math
import os
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

# Row name -> what it computes (the Markdown table's second column).
DESCRIPTIONS = {
    "adamw": "AdamW alone: one gradient evaluation",
    "floor": "hand-written SAM step: two gradient evaluations + AdamW (the floor)",
    "optax-contrib-sam": "optax.contrib.sam, opaque mode (normalize + sgd(rho) adversary)",
    "sam": "optax_sam.sam",
    "asam": "optax_sam.asam",
    "fsam[normal]": "optax_sam.fsam, a step that keeps the mask",
    "fsam[refresh]": "optax_sam.fsam, a step that refreshes the mask (per-example Fisher)",
    "fsam": "optax_sam.fsam, amortised: ((N-1) normal + refresh) / N",
    "gasam": "optax_sam.gasam",
    "delta-sam": "optax_sam.delta_sam",
    "per-instance-sam": "optax_sam.per_instance_sam (chunked vmap)",
    "dps": "optax_sam.dps (Stage I/II step; selection step excluded)",
    "child-tuning-f": "optax_sam.child_tuning_f",
    "child-tuning-d": "optax_sam.child_tuning_d (fixed mask; mask pass excluded)",
    "torch-adamw": "PyTorch eager: BertModel + linear head, AdamW",
    "torch-sam": "PyTorch eager: the same SAM + AdamW step",
}
REFERENCE_ROWS = ("adamw", "floor", "optax-contrib-sam")
LIBRARY_ROWS = ("sam", "asam", "fsam", "gasam", "delta-sam", "per-instance-sam", "dps",
                "child-tuning-f", "child-tuning-d")
TORCH_ROWS = ("torch-adamw", "torch-sam")
ALL_ROWS = REFERENCE_ROWS + LIBRARY_ROWS + TORCH_ROWS


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


class BatchedPerExampleLoss(optax_sam.PerExampleLoss):
  """A :class:`optax_sam.PerExampleLoss` whose batch losses come from one batched call.

  Calling it runs the model on the whole batch at once; the methods that need
  per-example gradients (FSAM's Fisher, per-instance SAM) still find ``example_loss``
  and differentiate each example on its own. Both give the same losses.
  """

  def __init__(self, example_loss, batch_loss, batch):
    super().__init__(example_loss, batch)
    self.batch_loss = batch_loss

  def __call__(self, params):
    return self.batch_loss(params, self.batch)


def loss_functions(module: model_lib.SequenceClassifier):
  """``(batch_loss, example_loss)``: per-example cross-entropy, batched or of one row."""

  def batch_loss(params, batch):
    logits = module.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                          batch["token_type_ids"], deterministic=True)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch["labels"])

  def example_loss(params, example):
    return batch_loss(params, jax.tree.map(lambda x: x[None], example))[0]

  return batch_loss, example_loss


# ---------------------------------------------------------------------------------------
# Rows.


@dataclasses.dataclass
class Row:
  """One timed step.

  ``run()`` performs one step and blocks until it is done; ``memory`` holds the compiled
  memory analysis.
  """

  name: str
  run: Callable[[], None]
  memory: Optional[dict[str, int]] = None
  compile_s: Optional[float] = None
  note: Optional[str] = None
  times: list[float] = dataclasses.field(default_factory=list)


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
                  note: Optional[str] = None) -> Row:
  """Compiles ``function(*inputs)``; each run feeds output ``feed_back`` into its input.

  ``feed_back`` is the index of the argument (and output) carried from step to step, the
  optimizer state; the parameters are shared by all rows and not updated, so the rows
  hold one copy of them between steps.
  """
  started = time.perf_counter()
  compiled = jax.jit(function).lower(*inputs).compile()
  compile_s = time.perf_counter() - started
  carried = list(inputs)

  def run():
    outputs = compiled(*carried)
    jax.block_until_ready(outputs)
    if feed_back is not None and isinstance(outputs, tuple):
      carried[feed_back] = outputs[feed_back]

  return Row(name, run, _memory_analysis(compiled), compile_s, note)


def _adamw() -> optax.GradientTransformation:
  return optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)


def _method(name: str, args: argparse.Namespace, params: Any
            ) -> optax.GradientTransformation:
  """The library transform of a row (chained before AdamW by the caller)."""
  if name == "sam":
    return optax_sam.sam(RHO)
  if name == "asam":
    return optax_sam.asam(0.5)
  if name == "fsam[normal]":  # the mask is refreshed at the first (warm-up) step only
    return optax_sam.fsam(RHO, mask_every=NEVER)
  if name == "fsam[refresh]":
    return optax_sam.fsam(RHO, mask_every=1)
  if name == "gasam":
    return optax_sam.gasam(RHO)
  if name == "delta-sam":
    return optax_sam.delta_sam(RHO)
  if name == "per-instance-sam":
    return optax_sam.per_instance_sam(RHO, chunk_size=args.per_instance_chunk)
  if name == "dps":  # a long run: every timed step is in Stage I, none selects
    return optax_sam.dps(total_steps=NEVER)
  if name == "child-tuning-f":
    return optax_sam.child_tuning_f(0.3)
  if name == "child-tuning-d":
    return optax_sam.child_tuning_d(random_child_mask(params, 0.3))
  raise KeyError(name)


def random_child_mask(params: Any, keep: float) -> Any:
  """A fixed random child network (the mask's values do not change the step's cost)."""
  in_scope = selection_lib.select(params, optax_sam.subnetworks.encoder_dense_kernels,
                                  argument="scope")
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  chosen = jax.tree.leaves(in_scope)
  masks = [jax.random.bernoulli(k, keep, x.shape) if c else jnp.ones(x.shape, bool)
           for k, x, c in zip(keys, leaves, chosen)]
  return jax.tree.unflatten(treedef, masks)


def jax_row(name: str, setup: Setup, args: argparse.Namespace) -> Row:
  """Builds and compiles the step of row ``name``."""
  batch_loss, example_loss = loss_functions(setup.module)

  def mean_loss(params, batch):
    return jnp.mean(batch_loss(params, batch))

  grad = jax.value_and_grad(mean_loss)

  if name == "adamw":
    tx = _adamw()

    def step(params, opt_state, batch):
      loss, grads = grad(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

  elif name == "floor":
    tx = _adamw()

    def step(params, opt_state, batch):
      loss, grads = grad(params, batch)
      norm = optax.tree.norm(grads)
      perturbed = jax.tree.map(lambda w, g: w + RHO / (norm + NORM_EPS) * g, params, grads)
      _, grads = grad(perturbed, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

  elif name == "optax-contrib-sam":
    tx = optax.contrib.sam(_adamw(),
                           optax.chain(optax.contrib.normalize(), optax.sgd(RHO)),
                           opaque_mode=True)

    def step(params, opt_state, batch):
      loss, grads = grad(params, batch)
      grad_fn = lambda p, _: jax.grad(mean_loss)(p, batch)
      updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
      return optax.apply_updates(params, updates), opt_state, loss

  else:
    tx = optax.chain(_method(name, args, setup.params), _adamw())

    def step(params, opt_state, batch):
      loss_fn = BatchedPerExampleLoss(example_loss, batch_loss, batch)
      loss, grads = grad(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params, loss_fn=loss_fn)
      return optax.apply_updates(params, updates), opt_state, loss

  opt_state = jax.jit(tx.init)(setup.params)
  return _compiled_row(name, step, setup.params, opt_state, setup.batch, feed_back=1)


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

  def make(name: str) -> Row:
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)

    def adamw_step():
      optimizer.zero_grad(set_to_none=True)
      backward()
      optimizer.step()

    def sam_step():
      optimizer.zero_grad(set_to_none=True)
      backward()
      with torch.no_grad():
        grads = [p.grad for p in params]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))  # pylint: disable=protected-access
        epsilon = torch._foreach_mul(grads, RHO / (norm + NORM_EPS))  # pylint: disable=protected-access
        torch._foreach_add_(params, epsilon)  # pylint: disable=protected-access
      optimizer.zero_grad(set_to_none=True)
      backward()
      with torch.no_grad():
        torch._foreach_sub_(params, epsilon)  # pylint: disable=protected-access
      optimizer.step()

    return Row(name, adamw_step if name == "torch-adamw" else sam_step,
               note=f"torch {torch.__version__}, {threads} threads")

  return [make(name) for name in TORCH_ROWS if name in args.methods], None


def scaling_rows(setup: Setup, args: argparse.Namespace) -> list[tuple[dict, Row]]:
  """Per-example Fisher and per-instance SAM at each (batch size, chunk size) point."""
  batch_loss, example_loss = loss_functions(setup.module)
  points = sorted({(b, args.scaling_fixed_chunk) for b in args.scaling_batch_sizes}
                  | {(args.scaling_fixed_batch, c) for c in args.scaling_chunk_sizes})
  rows = []
  for batch_size, chunk in points:
    chunk = min(chunk, batch_size)
    batch = jax.tree.map(lambda x, b=batch_size: jnp.asarray(x[:b]), setup.big_batch)

    def fisher(params, batch, chunk=chunk):
      loss_fn = BatchedPerExampleLoss(example_loss, batch_loss, batch)
      return optax_sam.fisher.empirical_fisher(loss_fn, params, chunk_size=chunk)

    tx = optax_sam.per_instance_sam(RHO, chunk_size=chunk)

    def per_instance(params, state, batch, tx=tx):
      loss_fn = BatchedPerExampleLoss(example_loss, batch_loss, batch)
      return tx.update(params, state, params, loss_fn=loss_fn)

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
          row.times.append(time.perf_counter() - began)
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
  """One record per row, FSAM amortised, ratios to AdamW and to the floor."""
  records = {}
  for row in rows:
    record = {"name": row.name, "description": DESCRIPTIONS.get(row.name, row.name),
              **time_stats(row.times), "compile_s": row.compile_s,
              "compiled_memory_bytes": (row.memory or {}).get("compiled"),
              "memory_analysis": row.memory, "peak_bytes_in_use": peaks.get(row.name)}
    if row.note:
      record["note"] = row.note
    records[row.name] = record
  if "fsam[normal]" in records and "fsam[refresh]" in records:
    normal, refresh = records["fsam[normal]"], records["fsam[refresh]"]
    n = args.fsam_mask_every
    records["fsam"] = {
        "name": "fsam", "description": DESCRIPTIONS["fsam"].replace("N", str(n)),
        "median_s": ((n - 1) * normal["median_s"] + refresh["median_s"]) / n,
        "derived_from": {"fsam[normal]": n - 1, "fsam[refresh]": 1, "divisor": n},
        "compiled_memory_bytes": max(normal["compiled_memory_bytes"] or 0,
                                     refresh["compiled_memory_bytes"] or 0) or None,
        "peak_bytes_in_use": max([p for p in (normal["peak_bytes_in_use"],
                                              refresh["peak_bytes_in_use"]) if p],
                                 default=None)}
  order = [n for n in (*REFERENCE_ROWS, "sam", "asam", "fsam", "fsam[normal]",
                       "fsam[refresh]", *LIBRARY_ROWS[3:], *TORCH_ROWS) if n in records]
  out = [records[n] for n in order]
  for record in out:
    for reference in ("adamw", "floor"):
      ref = records.get(reference)
      record[f"ratio_to_{reference}"] = (record["median_s"] / ref["median_s"]
                                         if ref else None)
  return out


@dataclasses.dataclass(frozen=True)
class Goal:
  """``numerator / denominator <= limit`` (ratios of median step times)."""
  name: str
  numerator: str
  denominator: str
  limit: float
  cpu_only: bool = False


GOALS = (
    Goal("SAM <= 1.02 x floor", "sam", "floor", 1.02),
    Goal("FSAM (refresh amortised) <= 1.05 x SAM", "fsam", "sam", 1.05),
    Goal("GA-SAM <= 1.03 x SAM", "gasam", "sam", 1.03),
    Goal("delta-SAM <= 1.25 x SAM", "delta-sam", "sam", 1.25),
    Goal("DPS <= 1.05 x AdamW", "dps", "adamw", 1.05),
    Goal("Child-Tuning_F <= 1.05 x AdamW", "child-tuning-f", "adamw", 1.05),
    Goal("Child-Tuning_D <= 1.05 x AdamW", "child-tuning-d", "adamw", 1.05),
    # Of the library's methods only sam computes what optax.contrib.sam computes.
    Goal("SAM <= 1.0 x optax.contrib.sam (same computation)", "sam", "optax-contrib-sam",
         1.0),
    Goal("SAM no slower than PyTorch eager SAM (CPU)", "sam", "torch-sam", 1.0,
         cpu_only=True),
)
FLAT_LIMIT = 1.10  # largest-batch temp memory / smallest-batch temp memory


def evaluate_goals(rows: Sequence[dict[str, Any]], scaling: Sequence[dict[str, Any]],
                   fixed_chunk: int, backend: str) -> list[dict[str, Any]]:
  """Each goal with its measured value and ``met`` (``None``: not measured here)."""
  medians = {r["name"]: r["median_s"] for r in rows}
  goals = []
  for goal in GOALS:
    record = {"goal": goal.name, "limit": goal.limit, "measured": None, "met": None,
              "from": f"median({goal.numerator}) / median({goal.denominator})"}
    if goal.cpu_only and backend != "cpu":
      record["why_not_measured"] = "CPU-only goal"
    elif goal.numerator in medians and goal.denominator in medians:
      record["measured"] = medians[goal.numerator] / medians[goal.denominator]
      record["met"] = bool(record["measured"] <= goal.limit)
    else:
      record["why_not_measured"] = "row not measured in this run"
    goals.append(record)
  for function, label in (("empirical_fisher", "per-example Fisher"),
                          ("per_instance_sam", "per_instance_sam")):
    points = sorted((p for p in scaling if p["function"] == function
                     and p["chunk_size"] == fixed_chunk), key=lambda p: p["batch_size"])
    record = {"goal": f"{label} memory flat in batch size at chunk {fixed_chunk}",
              "limit": FLAT_LIMIT, "measured": None, "met": None,
              "from": "compiled temp bytes at the largest / smallest batch size"}
    if len(points) >= 2 and points[0]["memory_analysis"]:
      small, large = points[0], points[-1]
      record["measured"] = (large["memory_analysis"]["temp"]
                            / max(small["memory_analysis"]["temp"], 1))
      record["met"] = bool(record["measured"] <= FLAT_LIMIT)
      record["from"] += (f" (batch {large['batch_size']} vs {small['batch_size']}; "
                         f"the batch grew {large['batch_size'] / small['batch_size']:g}x)")
    else:
      record["why_not_measured"] = "fewer than two batch sizes at the fixed chunk size"
    goals.append(record)
  return goals


def _mb(value: Optional[int]) -> str:
  if value is None:
    return "n/a"
  mib = value / 2**20
  return f"{mib:,.0f}" if mib >= 100 else f"{mib:.1f}" if mib >= 1 else f"{mib:.3f}"


def _ratio(value: Optional[float]) -> str:
  return "n/a" if value is None else f"{value:.3f}"


def render_markdown(result: dict[str, Any]) -> str:
  meta, rows = result["meta"], result["rows"]
  header = ["row", "what", "median ms", "IQR ms", "x AdamW", "x floor",
            "compiled MiB", "peak MiB"]
  table = common.markdown_table(header, [
      [f"`{r['name']}`", r["description"], f"{r['median_s'] * 1e3:,.1f}",
       (f"{r['p25_s'] * 1e3:,.1f}-{r['p75_s'] * 1e3:,.1f}" if "p25_s" in r else "derived"),
       _ratio(r["ratio_to_adamw"]), _ratio(r["ratio_to_floor"]),
       _mb(r["compiled_memory_bytes"]), _mb(r["peak_bytes_in_use"])] for r in rows],
      align="llrrrrrr")
  goals = common.markdown_table(["goal", "measured", "limit", "status"], [
      [g["goal"], _ratio(g["measured"]), f"{g['limit']:g}",
       {True: "met", False: "**missed**", None: "not measured"}[g["met"]]]
      for g in result["goals"]], align="lrrl")
  s = meta["settings"]
  parts = [
      f"# Step cost: {meta['device_kind']}", "",
      common.stamp_markdown(meta),
      f"- model: {meta['model']}",
      f"- batch {s['batch_size']} x length {s['length']}; {s['rounds']} interleaved rounds "
      f"x {s['repeats']} steps per row after {s['warmup']} warm-up steps; medians",
      f"- load average (1, 5, 15 min) before / after: {meta['load_average_before']} / "
      f"{meta['load_average_after']}; whole run {meta['wall_s']:.0f} s (compiling "
      f"included)",
  ]
  if meta.get("note"):
    parts.append(f"- note: {meta['note']}")
  if not meta.get("complete", True):
    parts.append("- status: written before the scaling study finished")
  if result["scaling"]:
    parts.append(f"- scaling study: {s['scaling_rounds']} interleaved rounds x "
                 f"{s['repeats']} calls per point after {s['warmup']} warm-up calls")
  parts += ["", table, "", "Notes:", ""]
  parts += [f"- {n}" for n in result["notes"]]
  parts += ["", "## Goals", "", goals, ""]
  if result["scaling"]:
    parts += ["## Per-example work against chunk size and batch size", "",
              common.markdown_table(
                  ["function", "batch", "chunk", "median ms", "ms / example",
                   "compiled MiB", "temp MiB"],
                  [[p["function"], p["batch_size"], p["chunk_size"],
                    f"{p['median_s'] * 1e3:,.1f}",
                    f"{p['median_s'] * 1e3 / p['batch_size']:,.2f}",
                    _mb(p["compiled_memory_bytes"]),
                    _mb((p["memory_analysis"] or {}).get("temp"))]
                   for p in result["scaling"]], align="lrrrrrr"), ""]
  return "\n".join(parts)


def plot(result: dict[str, Any], folder: pathlib.Path) -> list[pathlib.Path]:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  meta, rows = result["meta"], result["rows"]
  title = f"{meta['device_kind']}: {meta['model'].split(':')[0]}, batch " \
          f"{meta['settings']['batch_size']} x {meta['settings']['length']}"
  figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(13, 0.45 * len(rows) + 2),
                                                  sharey=True)
  names = [r["name"] for r in rows][::-1]
  medians = [r["median_s"] * 1e3 for r in rows][::-1]
  colours = ["tab:gray" if n in REFERENCE_ROWS else "tab:orange" if n in TORCH_ROWS
             else "tab:blue" for n in names]
  bars = time_axis.barh(names, medians, color=colours)
  for bar, row in zip(bars, rows[::-1]):
    if row["ratio_to_adamw"] is not None:
      time_axis.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                     f" {row['ratio_to_adamw']:.2f}x", va="center", fontsize=8)
  time_axis.set(xlabel="median step time (ms); label: x AdamW", title=title)
  memory = [(r["compiled_memory_bytes"] or 0) / 2**20 for r in rows][::-1]
  memory_axis.barh(names, memory, color=colours)
  memory_axis.set(xlabel="compiled memory (MiB): temp + argument + output",
                  title="memory")
  figure.tight_layout()
  paths = [folder / "step_cost.png"]
  figure.savefig(paths[0], dpi=110)
  plt.close(figure)

  if result["scaling"]:
    fixed_chunk = meta["settings"]["scaling_fixed_chunk"]
    fixed_batch = meta["settings"]["scaling_fixed_batch"]
    figure, axes = plt.subplots(2, 2, figsize=(11, 8))
    for function, marker in (("empirical_fisher", "o"), ("per_instance_sam", "s")):
      by_batch = sorted((p for p in result["scaling"] if p["function"] == function
                         and p["chunk_size"] == min(fixed_chunk, p["batch_size"])),
                        key=lambda p: p["batch_size"])
      by_chunk = sorted((p for p in result["scaling"] if p["function"] == function
                         and p["batch_size"] == fixed_batch),
                        key=lambda p: p["chunk_size"])
      for axis_row, points, key in ((0, by_batch, "batch_size"), (1, by_chunk, "chunk_size")):
        xs = [p[key] for p in points]
        axes[axis_row][0].plot(xs, [p["median_s"] * 1e3 for p in points], marker=marker,
                               label=function)
        axes[axis_row][1].plot(xs, [(p["memory_analysis"] or {}).get("temp", 0) / 2**20
                                    for p in points], marker=marker, label=function)
    for axis_row, label in ((0, f"batch size (chunk {fixed_chunk})"),
                            (1, f"chunk size (batch {fixed_batch})")):
      axes[axis_row][0].set(xlabel=label, ylabel="median time (ms)")
      axes[axis_row][1].set(xlabel=label, ylabel="compiled temp memory (MiB)")
      for axis in axes[axis_row]:
        axis.set_xscale("log", base=2)
        axis.legend()
    figure.suptitle(f"{meta['device_kind']}: per-example work")
    figure.tight_layout()
    paths.append(folder / "step_cost_scaling.png")
    figure.savefig(paths[1], dpi=110)
    plt.close(figure)
  return paths


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
  names = []
  for name in methods:
    if name == "fsam":
      names += ["fsam[normal]", "fsam[refresh]"]
    elif name not in TORCH_ROWS:
      names.append(name)
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
  row_notes = {
      "fsam": f"fsam: amortised from two measured rows, ((N-1) * median(fsam[normal]) + "
              f"median(fsam[refresh])) / N with N = mask_every = {args.fsam_mask_every}; "
              "fsam[refresh] is fsam(mask_every=1), whose every step recomputes the "
              f"per-example Fisher ({min(32, args.batch_size)} examples, chunks of 8) "
              "and the global top-k",
      "dps": "dps: a Stage I/II step; the selection step (per-matrix top-k, once per "
             "cycle of 2 x 5% of the run) is not in the row",
      "child-tuning-d": "child-tuning-d: a fixed random 30% mask of the encoder's dense "
                        "kernels; the gradient pass that chooses the mask before "
                        "training is not in the row",
      "per-instance-sam": f"per-instance-sam: chunk size {args.per_instance_chunk}",
      "torch-sam": f"torch rows: torch.set_num_threads({threads}), the number of cores "
                   "JAX's CPU backend spreads its work over; SAM written with foreach "
                   "ops (perturb in place, second backward, restore, AdamW step)",
  }
  notes += [note for name, note in row_notes.items() if name in args.methods]
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
    result["goals"] = evaluate_goals(records, result["scaling"], args.scaling_fixed_chunk,
                                     backend)
    folder.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(result)
    result["files"] = [str(p.name) for p in plot(result, folder)] + [
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
