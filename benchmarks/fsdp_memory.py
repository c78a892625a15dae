r"""Compiled memory per device of one training step: FSDP versus replicated parameters.

  python benchmarks/fsdp_memory.py                       # BERT-base, 8 fake CPU devices
  python benchmarks/fsdp_memory.py --config tiny --output-dir /tmp/x   # seconds

For each method, the GLUE example's training step (its model, optimizer chain and
``PerExampleLoss``) is compiled twice over the same devices, never run: with the
parameters and the optimizer state replicated on every device (``data=N``, plain data
parallelism) and split over them (``fsdp=N``). The batch is split over all devices in
both. ``jax.jit(step).lower(...).compile().memory_analysis()`` gives the per-device
sizes of the arguments (parameters, optimizer state, batch), the outputs, and XLA's
temporary buffers (activations, gradients, gathered parameters); the state is donated,
so the outputs reuse the arguments' buffers. Parameters are abstract
(``jax.ShapeDtypeStruct``): nothing of the model's size is ever allocated.

Writes ``benchmarks/results/<device-kind>/fsdp_memory.{json,md}``.
"""

from __future__ import annotations

import os
import sys

# Fake CPU devices must be asked for before JAX starts (a no-op on accelerators).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import pathlib
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

if __package__ in (None, ""):  # run as a script
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import step_cost
from examples.glue import distributed
from examples.glue import methods as methods_lib
from examples.glue import model as model_lib
from examples.glue import train

SCRIPT = "benchmarks/fsdp_memory.py"
NUM_LABELS = 2
METHODS = ("adamw", "sam", "fsam")
SIZES = ("argument", "output", "alias", "temp")


def abstract_state(config: model_lib.EncoderConfig, method: methods_lib.Method):
  """``(model, tx, TrainState of jax.ShapeDtypeStruct)`` for ``method`` on ``config``."""
  model = model_lib.SequenceClassifier(config, NUM_LABELS)
  dummy = jnp.zeros((1, 8), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), dummy, dummy, dummy)["params"]
  context = methods_lib.MethodContext(
      total_steps=1000, seed=0, params=None, loss_fn_for=None, train_batches=list,
      num_train_batches=0)
  tx = methods_lib.build_optimizer(
      method, {}, context, optax.constant_schedule(2e-5), 0.01,
      train.weight_decay_mask(params), 1.0)
  state = jax.eval_shape(
      lambda p: train.TrainState(jnp.zeros((), jnp.int32), p, tx.init(p),
                                 jax.random.PRNGKey(0)), params)
  return model, tx, state


def step_memory(config: model_lib.EncoderConfig, method: methods_lib.Method,
                mesh: jax.sharding.Mesh, batch_size: int, length: int) -> dict[str, int]:
  """Per-device bytes of the compiled training step on ``mesh``."""
  model, tx, state = abstract_state(config, method)
  state_sharding = distributed.state_sharding(tx, state, state.params, mesh)
  batch_sharding = distributed.batch_sharding(mesh)
  tokens = jax.ShapeDtypeStruct((batch_size, length), jnp.int32)
  batch = {"input_ids": tokens, "attention_mask": tokens, "token_type_ids": tokens,
           "labels": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
           "example_mask": jax.ShapeDtypeStruct((batch_size,), jnp.float32)}
  step = jax.jit(
      train.make_train_step(model, tx, is_regression=False,
                            params_transform=method.params_transform),
      in_shardings=(state_sharding, batch_sharding),
      out_shardings=(state_sharding, distributed.replicated(mesh)), donate_argnums=0)
  analysis = step.lower(state, batch).compile().memory_analysis()
  sizes = {name: int(getattr(analysis, f"{name}_size_in_bytes")) for name in SIZES}
  # What the step holds at its peak: its inputs, the outputs that do not reuse them
  # (the donated state comes back in place), and the temporaries.
  sizes["total"] = sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"]
  return sizes


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog=f"python {SCRIPT}",
                                   description=__doc__.split("\n", 1)[0])
  parser.add_argument("--config", choices=tuple(step_cost.CONFIGS), default="bert-base")
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--length", type=int, default=128)
  parser.add_argument("--methods", nargs="+", choices=tuple(methods_lib.METHODS),
                      default=list(METHODS))
  parser.add_argument("--output-dir", help="default: benchmarks/results/<device-kind>")
  return parser.parse_args(argv)


def run(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  """Measures, prints and writes the table; returns what it wrote."""
  args = parse_args(argv)
  devices = jax.devices()[:args.devices]
  if len(devices) < args.devices:
    raise SystemExit(f"error: {args.devices} devices asked for, {len(devices)} found")
  config = model_lib.EncoderConfig(**step_cost.CONFIGS[args.config], hidden_dropout=0.1,
                                    attention_dropout=0.1)
  meshes = {"replicated": distributed.MeshShape(data=args.devices, fsdp=1),
            "fsdp": distributed.MeshShape(data=1, fsdp=args.devices)}
  rows = []
  for name in args.methods:
    method = methods_lib.METHODS[name]
    measured = {layout: step_memory(config, method, distributed.make_mesh(shape, devices),
                                    args.batch_size, args.length)
                for layout, shape in meshes.items()}
    rows.append({"method": name, **measured,
                 "ratio": {k: measured["fsdp"][k] / max(measured["replicated"][k], 1)
                           for k in ("argument", "temp", "total")}})
    print(f"{name}: per device, replicated {measured['replicated']['total'] / 2**20:.0f} "
          f"MiB, fsdp={args.devices} {measured['fsdp']['total'] / 2**20:.0f} MiB "
          f"(arguments ×{rows[-1]['ratio']['argument']:.3f}, "
          f"temporaries ×{rows[-1]['ratio']['temp']:.3f}, "
          f"total ×{rows[-1]['ratio']['total']:.3f})", flush=True)

  num_params = sum(x.size for x in jax.tree.leaves(
      abstract_state(config, methods_lib.METHODS["adamw"])[2].params))
  result = {"meta": {**common.stamp(SCRIPT, argv), "device": str(devices[0].device_kind),
                     "config": args.config, "parameters": num_params,
                     "devices": args.devices, "batch_size": args.batch_size,
                     "length": args.length},
            "rows": rows}
  folder = pathlib.Path(args.output_dir) if args.output_dir else (
      common.RESULTS / common.device_kind(devices[0]))
  common.write_json(folder / "fsdp_memory.json", result)
  mib = lambda b: f"{b / 2**20:,.0f}"
  table = common.markdown_table(
      ["method", "layout", "arguments MiB", "temporaries MiB", "peak MiB", "peak ratio"],
      [[row["method"], layout, mib(row[layout]["argument"]), mib(row[layout]["temp"]),
        mib(row[layout]["total"]),
        "1" if layout == "replicated" else f"{row['ratio']['total']:.3f}"]
       for row in rows for layout in ("replicated", "fsdp")])
  (folder / "fsdp_memory.md").write_text(
      f"# Compiled memory per device: FSDP versus replicated\n\n"
      f"{args.config} ({num_params / 1e6:.1f} M parameters, float32), batch "
      f"{args.batch_size} × {args.length} tokens split over {args.devices} devices; "
      f"`replicated` is data={args.devices}, `fsdp` is fsdp={args.devices}. Sizes per "
      f"device from `memory_analysis()` of the compiled step; peak = arguments + "
      f"outputs − donated + temporaries.\n\n{table}\n\n{common.stamp_markdown(result['meta'])}\n",
      encoding="utf-8")
  return result


if __name__ == "__main__":
  run()
