r"""How flat is a fine-tuned model? Top Hessian eigenvalue, sharpness and training loss.

  python -m benchmarks.flatness --model-dir runs/stsb-sam-0/model --task stsb \
      --train-size 1000 --data-seed 0 --output runs/stsb-sam-0/flatness.json

Measured on a fixed set of training examples — a stratified ``--examples`` of the
``--train-size`` subsample drawn with ``--data-seed`` (the subsample the runs trained
on), chosen with a fixed seed, so every run is measured on the same examples — with
dropout off, as the mean per-example loss of one padded batch evaluated in micro-batches:

* ``train_loss``: that loss;
* ``sharpness``: ``L(w + ρ g/‖g‖) − L(w)`` at ``--rho`` (:func:`optax_sam.flatness.sharpness`);
* ``top_eigenvalue``: the largest Hessian eigenvalue
  (:func:`optax_sam.flatness.hessian_top_eigenvalue`: Lanczos), with every iterate in
  ``eigenvalue_history`` and the last relative change, to show it converged.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import sys
import time
from typing import Any, Callable, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `examples` importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp

import optax_sam
from benchmarks import common
from examples.glue import data
from examples.glue import model as model_lib
from examples.glue import pretrained as pretrained_lib
from examples.glue import train

# Fixed so that every run is measured on the same examples and from the same start.
SUBSET_SEED = 12345
EIGENVECTOR_SEED = 0


def measurement_batch(task: data.Task, tokenizer, *, glue_dir: Optional[str],
                      train_size: Optional[int], data_seed: int, examples: int,
                      max_length: int, micro_batch: int) -> dict[str, Any]:
  """The fixed examples, as one batch padded to a multiple of ``micro_batch`` rows."""
  trained_on = data.stratified_subsample(data.load_split(task, "train", glue_dir),
                                         train_size, data_seed, task.is_regression)
  chosen = data.stratified_subsample(trained_on, examples, SUBSET_SEED, task.is_regression)
  encoded = data.encode(chosen, tokenizer, max_length)
  rows = data.num_batches(len(encoded), micro_batch) * micro_batch if micro_batch else len(
      encoded)
  (batch,) = data.batches(encoded, rows, pad_to_multiple_of=16)
  return batch


def measurement_loss(model: model_lib.SequenceClassifier, batch: dict[str, Any], *,
                     is_regression: bool, micro_batch: int) -> Callable[[Any], jax.Array]:
  """``params -> `` the mean per-example loss on ``batch``, dropout off (in micro-batches
  of ``micro_batch`` rows; ``0``: one example at a time)."""
  example_loss = functools.partial(train.example_loss, model=model,
                                   is_regression=is_regression, deterministic=True)
  example_mask = jnp.asarray(batch["example_mask"])
  examples = {k: jnp.asarray(v) for k, v in batch.items() if k != "example_mask"}
  if micro_batch:
    per_batch = lambda p, micro: jax.vmap(example_loss, in_axes=(None, 0))(p, micro)
    losses = optax_sam.microbatched_loss(per_batch, examples,
                                         len(example_mask) // micro_batch)
  else:
    losses = optax_sam.PerExampleLoss(example_loss, examples)
  return lambda p: optax_sam.batch_mean(losses(p), example_mask)


def measure(params: Any, model: model_lib.SequenceClassifier, batch: dict[str, Any], *,
            is_regression: bool, micro_batch: int, rho: float,
            iterations: int) -> dict[str, Any]:
  """Training loss, sharpness at ``rho`` and the top Hessian eigenvalue on ``batch``."""
  loss = measurement_loss(model, batch, is_regression=is_regression,
                          micro_batch=micro_batch)

  timings = {}
  started = time.perf_counter()
  train_loss = float(jax.jit(loss)(params))
  sharpness = float(jax.jit(lambda p: optax_sam.flatness.sharpness(loss, p, rho))(params))
  timings["loss_and_sharpness_s"] = time.perf_counter() - started
  started = time.perf_counter()
  estimate = jax.jit(lambda p: optax_sam.flatness.hessian_top_eigenvalue(
      loss, p, jax.random.key(EIGENVECTOR_SEED), num_iterations=iterations))(params)
  history = [float(x) for x in jax.device_get(estimate.history)]
  timings["eigenvalue_s"] = time.perf_counter() - started
  return {"train_loss": train_loss, "sharpness": sharpness, "rho": rho,
          "top_eigenvalue": history[-1], "eigenvalue_history": history,
          "eigenvalue_relative_change": float(estimate.relative_change),
          "examples": int(jnp.asarray(batch["example_mask"]).sum()), "iterations": iterations,
          **{k: round(v, 2) for k, v in timings.items()}}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.flatness",
                                   description=__doc__.split("\n", 1)[0])
  parser.add_argument("--model-dir", required=True, help="a fine-tuned model folder")
  parser.add_argument("--task", required=True)
  parser.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR"))
  parser.add_argument("--train-size", type=int, help="the runs' --train-size")
  parser.add_argument("--data-seed", type=int, default=0, help="the runs' --data-seed")
  parser.add_argument("--examples", type=int, default=64, help="examples measured on")
  parser.add_argument("--max-length", type=int, default=128)
  parser.add_argument("--micro-batch", type=int, default=0,
                      help="evaluate in micro-batches of this many rows (less memory, "
                      "slower: activations are recomputed); 0: one batch")
  parser.add_argument("--rho", type=float, default=0.01, help="radius of the sharpness")
  parser.add_argument("--iterations", type=int, default=12,
                      help="Lanczos iterations (Hessian-vector products)")
  parser.add_argument("--output", help="write the JSON here (default: print it)")
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  task = data.get_task(args.task)
  pretrained = pretrained_lib.load_pretrained(args.model_dir, task.num_labels)
  if pretrained.fresh_modules:
    raise SystemExit(f"error: {args.model_dir} has no fine-tuned "
                     f"{', '.join(pretrained.fresh_modules)}")
  model = model_lib.SequenceClassifier(pretrained.config, task.num_labels)
  batch = measurement_batch(task, pretrained_lib.load_tokenizer(args.model_dir),
                            glue_dir=args.glue_dir, train_size=args.train_size,
                            data_seed=args.data_seed, examples=args.examples,
                            max_length=args.max_length, micro_batch=args.micro_batch)
  result = measure(pretrained.params, model, batch, is_regression=task.is_regression,
                   micro_batch=args.micro_batch, rho=args.rho, iterations=args.iterations)
  result.update(task=task.name, train_size=args.train_size, data_seed=args.data_seed,
                subset_seed=SUBSET_SEED, max_length=args.max_length,
                versions=common.versions())
  text = json.dumps(result, indent=2)
  if args.output:
    common.write_json(pathlib.Path(args.output), result)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
