r"""Packs a model and GLUE tasks into one small folder, for a machine that cannot download.

  python -m benchmarks.pack --output runs/pack                  # embedded MiniLM + 5 tasks
  python -m benchmarks.pack --output runs/pack --tasks stsb sst2 --model PATH

Writes ``<output>/model/`` (``config.json``, the tokenizer files and
``model.safetensors`` with every floating-point tensor in bfloat16, half the size of
float32; the training command loads it back to float32), ``<output>/glue/<Task>/``
(the tasks' ``train.tsv`` and ``dev.tsv``, unchanged) and ``<output>/MANIFEST.json``
(each file's size and SHA-256). It refuses to write more than ``--limit-mib`` (56 MiB:
64 MiB travel to a lent accelerator, the working tree included). On the other machine::

  python benchmarks/glue_quality.py --experiment gpu --model runs/pack/model \
      --glue-dir runs/pack/glue
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import shutil
import sys
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `examples` importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import ml_dtypes  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
import safetensors
import safetensors.numpy

from examples.glue import data
from examples.glue import pretrained

DEFAULT_TASKS = ("stsb", "sst2", "mrpc", "cola", "rte")
MODEL_FILES = (pretrained.CONFIG_FILE, *pretrained.TOKENIZER_FILES, "tokenizer_config.json",
               "special_tokens_map.json")
MIB = 2 ** 20


class PackTooLarge(ValueError):
  """The pack would exceed its size limit."""


def _sha256(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def write_bfloat16_weights(source: pathlib.Path, target: pathlib.Path) -> None:
  """Copies a safetensors file with its floating-point tensors cast to bfloat16."""
  tensors = {}
  with safetensors.safe_open(source, framework="numpy") as opened:
    metadata = opened.metadata()
    for name in opened.keys():
      value = opened.get_tensor(name)
      floating = np.issubdtype(value.dtype, np.floating) or value.dtype == ml_dtypes.bfloat16
      tensors[name] = value.astype(ml_dtypes.bfloat16) if floating else value
  safetensors.numpy.save_file(tensors, target, metadata=metadata)


def pack(output: pathlib.Path, *, model_dir: pathlib.Path, tasks: Sequence[str],
         glue_dir: pathlib.Path, limit_mib: float = 64.0) -> dict:
  """Writes the pack (see the module docstring); returns its manifest.

  Raises:
    PackTooLarge: if the files would exceed ``limit_mib`` (nothing is left behind).
    data.DataError, pretrained.PretrainedModelError: for a missing task file or model file.
  """
  if output.exists():
    shutil.rmtree(output)
  try:
    (output / "model").mkdir(parents=True)
    for name in MODEL_FILES:
      if (model_dir / name).is_file():
        shutil.copyfile(model_dir / name, output / "model" / name)
    weights = model_dir / pretrained.WEIGHTS_FILE
    if not weights.is_file():
      raise pretrained.PretrainedModelError(f"missing model file {weights}")
    write_bfloat16_weights(weights, output / "model" / pretrained.WEIGHTS_FILE)
    for name in tasks:
      task = data.get_task(name)
      for split in ("train", task.dev_file):
        source = glue_dir / task.folder / f"{split}.tsv"
        if not source.is_file():
          raise data.DataError(f"missing GLUE file {source}")
        (output / "glue" / task.folder).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, output / "glue" / task.folder / source.name)
    files = sorted(p for p in output.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    if total > limit_mib * MIB:
      raise PackTooLarge(f"the pack would be {total / MIB:.1f} MiB, over the "
                         f"{limit_mib:g} MiB limit; pack fewer tasks")
    manifest = {"model": str(model_dir), "tasks": list(tasks),
                "weights_dtype": "bfloat16", "total_bytes": total,
                "files": {str(p.relative_to(output)): {"bytes": p.stat().st_size,
                                                       "sha256": _sha256(p)}
                          for p in files}}
    (output / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n",
                                          encoding="utf-8")
    return manifest
  except BaseException:
    shutil.rmtree(output, ignore_errors=True)
    raise


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.pack",
                                   description=__doc__.split("\n", 1)[0])
  parser.add_argument("--output", required=True, help="the folder to (re)create")
  parser.add_argument("--model", help="a Hugging Face folder (default: the embedded "
                      "all-MiniLM-L6-v2)")
  parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
  parser.add_argument("--glue-dir", help="glue_data folder (default: $GLUE_DIR, else "
                      "../shared/glue)")
  parser.add_argument("--limit-mib", type=float, default=56.0,
                      help="largest pack (default 56: 64 MiB travel with the working tree, "
                      "which takes about 8)")
  args = parser.parse_args(argv)
  from benchmarks import glue_quality  # pylint: disable=g-import-not-at-top
  glue_dir = args.glue_dir or glue_quality.default_glue_dir()
  if glue_dir is None:
    parser.error("no GLUE folder: pass --glue-dir or set GLUE_DIR")
  try:
    manifest = pack(pathlib.Path(args.output),
                    model_dir=pathlib.Path(args.model or pretrained.default_model_dir()),
                    tasks=args.tasks, glue_dir=pathlib.Path(glue_dir),
                    limit_mib=args.limit_mib)
  except (PackTooLarge, data.DataError, pretrained.PretrainedModelError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  print(f"wrote {args.output}: {len(manifest['files'])} files, "
        f"{manifest['total_bytes'] / MIB:.1f} MiB")
  return 0


if __name__ == "__main__":
  sys.exit(main())
