r"""What each method buys on GLUE: dev scores over seeds, flatness, paired differences.

  python benchmarks/glue_quality.py --experiment calibration --commit   # AdamW recipe
  python benchmarks/glue_quality.py --experiment rho --commit           # SAM's rho sweep
  python benchmarks/glue_quality.py --experiment comparison --commit    # the comparison
  python benchmarks/glue_quality.py --experiment gpu --model PACKED/model \
      --glue-dir PACKED/glue --parallel 8                               # an accelerator
  python benchmarks/glue_quality.py --experiment comparison --tasks stsb --methods sam \
      --seeds 0 --max-steps 5                                           # a smoke run

An experiment is a list of runs: tasks x seeds x arms, where an arm is a way of training
(a ``--method`` and its flags) compared with a reference arm trained on the same task,
seed and examples. Each run is ``python -m examples.glue.train ... --output-dir <run
folder> --resume`` in a subprocess; when it ends its dev metrics (the final epoch's: the
headline; the best epoch's beside it, labelled) go to ``<run folder>/result.json``, with,
for experiments that measure it, the flatness of the final parameters
(``benchmarks/flatness.py``: top Hessian eigenvalue, sharpness, training loss on fixed
training examples). The saved model is then deleted (``--keep-models`` keeps it; the
training command deletes its own checkpoint when the run ends) and, with ``--commit``,
the run folder is committed. The
script is resumable: a run whose ``result.json`` exists is skipped, an interrupted run
continues from its last epoch, and a run that another experiment beside this one already
made with the same flags (e.g. AdamW seed 0 of the rho sweep and of the comparison) is
copied, not trained again (its ``result.json`` says ``reused_from``); a run that another
invocation is training (it holds ``<run folder>.lock``) is left to it and listed as failed
here.

The summary gives per task the dev score (the mean of the task's official metrics,
x 100) as mean +- std over seeds, the paired difference to each reference arm with a 95%
t-interval over seeds, and the flatness figures. Results go to
``benchmarks/results/glue_quality/<experiment>/`` (``summary.{json,md,png}`` and
``runs/<task>/<arm>/seed<k>/``); a run with ``--max-steps`` changes the results, so it
goes to ``runs/glue_quality/<experiment>/`` unless ``--output-dir`` says otherwise.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `examples` importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import scipy.stats

from benchmarks import common

SCRIPT = "benchmarks/glue_quality.py"
RESULT_FILE = "result.json"
FLATNESS_FILE = "flatness.json"
# Held while an invocation trains a run, beside its folder (never committed with it).
LOCK_SUFFIX = ".lock"
# Official metrics of the tasks the experiments use (examples.glue.data.TASKS agrees).
TASK_METRICS = {"rte": ("accuracy",), "mrpc": ("f1", "accuracy"),
                "stsb": ("pearson", "spearman"), "cola": ("matthews_corr",),
                "sst2": ("accuracy",), "qnli": ("accuracy",), "wnli": ("accuracy",)}
# Where the training subprocesses keep compiled steps ($JAX_COMPILATION_CACHE_DIR wins).
COMPILATION_CACHE = pathlib.Path.home() / ".cache" / "optax-sam" / "jax-compilation-cache"
# Flags that do not change a run's result (where things are, how often it logs).
_LOCATION_FLAGS = ("--glue-dir", "--output-dir", "--log-every")


@dataclasses.dataclass(frozen=True)
class Arm:
  """One way of training, compared with a reference arm on the same tasks and seeds.

  Attributes:
    label: the table's name, e.g. ``sam`` or ``sam@rho=0.01``.
    method: the training command's ``--method``.
    args: flags added after the recipe's (argparse keeps the last of a repeated flag).
    reference: the label this arm is compared with; ``None`` for a reference itself.
    x: a swept value (e.g. rho), for the sweep table and plot.
    doubles: the label of the arm this one doubles the training steps of (calibration).
  """

  label: str
  method: str
  args: tuple[str, ...] = ()
  reference: Optional[str] = "adamw"
  x: Optional[float] = None
  doubles: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Block:
  """Every arm on every task with every seed (with the experiment's recipe, unless the
  block has its own)."""

  tasks: tuple[str, ...]
  seeds: tuple[int, ...]
  arms: tuple[Arm, ...]
  recipe: Optional[Mapping[str, tuple[str, ...]]] = None


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A named set of runs and how to read them.

  Attributes:
    name: the ``--experiment`` name and the results folder.
    description: one paragraph for the summary.
    recipe: the training flags of every run, per task.
    blocks: the runs.
    references: labels every other arm is also compared with (when both ran).
    flatness: measure the flatness of each run's final parameters.
    flatness_rho: the radius of the sharpness measure.
    needs_model: whether ``--model`` must be given.
  """

  name: str
  description: str
  recipe: Mapping[str, tuple[str, ...]]
  blocks: tuple[Block, ...]
  references: tuple[str, ...] = ("adamw",)
  flatness: bool = False
  flatness_rho: float = 0.01
  needs_model: bool = False

  @property
  def tasks(self) -> list[str]:
    return list(dict.fromkeys(t for b in self.blocks for t in b.tasks))

  @property
  def arms(self) -> dict[str, Arm]:
    return {a.label: a for b in self.blocks for a in b.arms}


def _recipe(common_args: Sequence[str], per_task: Mapping[str, Sequence[str]]
            ) -> dict[str, tuple[str, ...]]:
  return {task: (*common_args, *args) for task, args in per_task.items()}


# The low-resource setting of the FSAM and DPS papers on the embedded MiniLM: a
# stratified 1000-example training subset (the same examples for every seed), the full
# dev set. Epochs, learning rate and length are from the calibration experiment (AdamW
# reaches its plateau: twice the steps move its dev score by about a point at most).
_LOW_RESOURCE = ("--train-size", "1000", "--data-seed", "0", "--batch-size", "32",
                 "--warmup-ratio", "0.1", "--weight-decay", "0.01", "--lr", "1e-4")
_SHORT = ("--max-length", "64", "--pad-to-multiple-of", "16")
_LONG = ("--max-length", "128", "--pad-to-multiple-of", "32")
CPU_RECIPE = _recipe(_LOW_RESOURCE, {
    "stsb": (*_SHORT, "--epochs", "8"), "sst2": (*_SHORT, "--epochs", "8"),
    "mrpc": (*_LONG, "--epochs", "8"), "cola": (*_SHORT, "--epochs", "8"),
    "rte": (*_LONG, "--epochs", "8")})


def _calibration_arms(epochs: Sequence[int], lr: Optional[str] = None) -> tuple[Arm, ...]:
  suffix = "" if lr is None else f",lr={lr}"
  extra = () if lr is None else ("--lr", lr)
  # Every even budget names its half, also in a block that does not run it: an arm's
  # label means the same in every block, and the comparison is made where both ran.
  return tuple(
      Arm(f"adamw@{count}ep{suffix}", "adamw", ("--epochs", str(count), *extra),
          reference=None,
          doubles=f"adamw@{count // 2}ep{suffix}" if count % 2 == 0 else None)
      for count in epochs)


EXPERIMENTS: dict[str, Experiment] = {}


def _register(experiment: Experiment) -> None:
  EXPERIMENTS[experiment.name] = experiment


_register(Experiment(
    name="calibration",
    description=(
        "AdamW alone, seed 0, on the low-resource recipe (embedded all-MiniLM-L6-v2, a "
        "stratified 1000-example training subset, the full dev set, batch 32, 10% "
        "warm-up then linear decay, weight decay 0.01): the budget at which it reaches "
        "its plateau, checked by doubling the epochs."),
    recipe=CPU_RECIPE,
    blocks=(
        Block(("stsb", "sst2", "mrpc"), (0,), _calibration_arms([4, 8, 16])),
        Block(("cola", "rte"), (0,), _calibration_arms([16])),
        # MRPC learns little at lr 1e-4 (its trivial score is 74.8), CoLA and RTE maybe
        # nothing: other learning rates before concluding.
        Block(("mrpc", "cola", "rte"), (0,), _calibration_arms([16], lr="3e-5")),
        Block(("mrpc",), (0,), _calibration_arms([8], lr="2e-4")),
    ),
    references=()))

RHO_SWEEP = (0.002, 0.005, 0.01, 0.02, 0.05)


def _rho_arms(values: Sequence[float], method: str = "sam") -> tuple[Arm, ...]:
  return tuple(Arm(f"{method}@rho={value:g}", method, ("--rho", f"{value:g}"), x=value)
               for value in values)


# The radius of each sharpness-aware method in the comparison: SAM's from the rho
# experiment (the largest radius whose dev score stays within AdamW's seed spread, so the
# flattening is as strong as the recipe bears); FSAM, delta-SAM and per-instance SAM
# perturb along a normalised direction of norm at most rho and share it; ASAM and GA-SAM
# get the radius at which their perturbation is as long as SAM's on this model:
# python -m benchmarks.perturbation_scale measures |eps|/rho at 0.39-0.55 for ASAM
# (eta 0.01) and 9.6-9.9 for GA-SAM (max_scale 10) over the first 40 steps
# (results/cpu-2core/perturbation_scale.jsonl).
COMPARISON_RHO = {"sam": 0.01, "fsam": 0.01, "delta-sam": 0.01, "per-instance-sam": 0.01,
                  "asam": 0.02, "gasam": 0.001}

_register(Experiment(
    name="rho",
    description=(
        "SAM's radius for this 22M-parameter model: SAM at each rho against AdamW, two "
        "seeds, on the calibrated low-resource recipe (the papers' rho was set for "
        "110M-355M models; SAM's normalised step moves each weight of a smaller model "
        "further); then the chosen radius checked on SST-2."),
    recipe=CPU_RECIPE,
    blocks=(Block(("stsb",), (0, 1), (Arm("adamw", "adamw", reference=None),
                                      *_rho_arms(RHO_SWEEP))),
            Block(("sst2",), (0, 1), (Arm("adamw", "adamw", reference=None),
                                      *_rho_arms([COMPARISON_RHO["sam"]])))),
    flatness=True))


def _method_arm(method: str, *args: str, label: Optional[str] = None) -> Arm:
  rho = COMPARISON_RHO.get(method)
  return Arm(label or method, method, (*(("--rho", f"{rho:g}") if rho else ()), *args))


_register(Experiment(
    name="comparison",
    description=(
        "Every method against AdamW and SAM on the calibrated low-resource recipe, three "
        "seeds (five for AdamW and SAM on STS-B), with the flatness of each run's final "
        "parameters: the methods of the papers on STS-B and SST-2 (tasks AdamW learns "
        "from 1000 examples), the other baselines and variants on STS-B."),
    recipe=CPU_RECIPE,
    blocks=(
        Block(("stsb", "sst2"), (0, 1, 2), (
            Arm("adamw", "adamw", reference=None), _method_arm("sam"), _method_arm("fsam"),
            _method_arm("delta-sam"), _method_arm("dps"))),
        Block(("stsb",), (0, 1, 2), (
            _method_arm("asam"), _method_arm("gasam"),
            _method_arm("per-instance-sam", "--chunk-size", "1"),
            _method_arm("child-tuning-d"), _method_arm("dps-mix"),
            # Mixout replaces dropout (its authors train with dropout off); on top of the
            # model's dropout 0.1, p = 0.9 underfits STS-B (one seed: dev 71.5, training
            # loss 0.69; results/glue_quality/comparison/extra/mixout-with-dropout/).
            _method_arm("mixout", "--dropout", "0"))),
        # The central question, whether SAM beats AdamW, gets five seeds where three left
        # an interval several points wide; every other arm is paired over seeds 0-2.
        Block(("stsb",), (3, 4),
              (Arm("adamw", "adamw", reference=None), _method_arm("sam"))),
    ),
    references=("adamw", "sam"),
    flatness=True))

# LookSAM's alpha sets the reused component's norm to alpha ||g|| whatever rho is; at the
# comparison's rho SAM's own orthogonal component is 1-4% of ||g|| early in fine-tuning,
# so the paper's 0.7 adds far more than SAM does, and a small alpha is tried beside it.
_AMORTISED_ARMS = (
    _method_arm("sam", "--perturb-every", "5", "--reuse-alpha", "0.7", label="looksam@k=5"),
    _method_arm("sam", "--perturb-every", "5", "--reuse-alpha", "0.05",
                label="looksam@k=5,alpha=0.05"),
    _method_arm("sam", "--perturb-every", "5", label="sam-every-5"))

_register(Experiment(
    name="looksam",
    description=(
        "Amortised SAM (issue 14) on STS-B, three seeds, the calibrated low-resource "
        "recipe: SAM perturbing every 5th step with LookSAM's reuse (the paper's alpha "
        "0.7, and 0.05) and with plain steps between, against SAM and AdamW; every SAM arm "
        "at the comparison's radius. LookSAM's claim: the reuse keeps most of SAM's gain "
        "at about 0.6x SAM's cost, the plain steps between do not."),
    recipe=CPU_RECIPE,
    blocks=(Block(("stsb",), (0, 1, 2), (
        Arm("adamw", "adamw", reference=None), _method_arm("sam"), *_AMORTISED_ARMS)),),
    references=("adamw", "sam"),
    flatness=True))

# For context: AdamW on each full training set (SST-2: one epoch of its 67k sentences).
_FULL_DATA = ("--batch-size", "32", "--warmup-ratio", "0.1", "--weight-decay", "0.01",
              "--lr", "1e-4")
FULL_DATA_RECIPE = _recipe(_FULL_DATA, {
    "stsb": (*_SHORT, "--epochs", "3"), "sst2": (*_SHORT, "--epochs", "1"),
    "mrpc": (*_LONG, "--epochs", "3"), "cola": (*_SHORT, "--epochs", "3"),
    "rte": (*_LONG, "--epochs", "3")})
_register(Experiment(
    name="full-data",
    description=(
        "For context: AdamW, seed 0, on each full training set (3 epochs; SST-2 one), "
        "batch 32, lr 1e-4, 10% warm-up then linear decay, weight decay 0.01, the "
        "embedded all-MiniLM-L6-v2."),
    recipe=FULL_DATA_RECIPE,
    blocks=(Block(("stsb", "sst2", "mrpc", "cola", "rte"), (0,),
                  (Arm("adamw@full", "adamw", reference=None),)),),
    references=()))

# The whole matrix in one command, for an accelerator (pack the model and the data first:
# benchmarks/pack.py): five seeds where the CPU experiments have three.
_GPU_SEEDS = (0, 1, 2, 3, 4)
_register(Experiment(
    name="gpu",
    description=(
        "The comparison and the amortised-SAM arms at five seeds on the calibrated "
        "low-resource recipe, and AdamW on each full training set, in one command (for "
        "an accelerator: --parallel N)."),
    recipe=CPU_RECIPE,
    blocks=(*(dataclasses.replace(block, seeds=_GPU_SEEDS)
              for block in EXPERIMENTS["comparison"].blocks),
            Block(("stsb",), _GPU_SEEDS, _AMORTISED_ARMS),
            dataclasses.replace(EXPERIMENTS["full-data"].blocks[0], recipe=FULL_DATA_RECIPE)),
    references=("adamw", "sam"),
    flatness=True))


# ---------------------------------------------------------------------------------------
# Planning and running.


@dataclasses.dataclass(frozen=True)
class Run:
  """One fine-tuning run."""

  task: str
  arm: Arm
  seed: int
  train_args: tuple[str, ...]  # everything after `python -m examples.glue.train`

  @property
  def label(self) -> str:
    return self.arm.label

  @property
  def name(self) -> str:
    return f"{self.task}/{self.label}/seed{self.seed}"

  def folder(self, root: pathlib.Path) -> pathlib.Path:
    slug = self.label.replace("@", "-").replace("=", "").replace(",", "-")
    return root / "runs" / self.task / slug / f"seed{self.seed}"


def plan(experiment: Experiment, *, tasks: Optional[Sequence[str]] = None,
         labels: Optional[Sequence[str]] = None, seeds: Optional[Sequence[int]] = None,
         model: Optional[str] = None, glue_dir: Optional[str] = None,
         max_steps: Optional[int] = None) -> list[Run]:
  """The experiment's runs (restricted to ``tasks``, ``labels``, ``seeds`` if given).

  Seed-major within each block, so an interrupted experiment has the same seeds for
  every arm; a restriction to some arms keeps their references.
  """
  wanted = None if labels is None else set(labels)
  if wanted is not None:
    wanted |= {experiment.arms[l].reference for l in set(wanted) & set(experiment.arms)
               if experiment.arms[l].reference} | {
                   r for r in experiment.references if r in experiment.arms}
  runs = []
  for block in experiment.blocks:
    for seed in block.seeds:
      if seeds is not None and seed not in seeds:
        continue
      for task in block.tasks:
        if tasks is not None and task not in tasks:
          continue
        for arm in block.arms:
          if wanted is not None and arm.label not in wanted:
            continue
          args = ["--task", task, "--method", arm.method, "--seed", str(seed),
                  *(block.recipe or experiment.recipe)[task], *arm.args]
          if model:
            args += ["--model", model]
          if glue_dir:
            args += ["--glue-dir", glue_dir]
          if max_steps:
            args += ["--max-steps", str(max_steps)]
          runs.append(Run(task=task, arm=arm, seed=seed, train_args=tuple(args)))
  return runs


def effective_flags(train_args: Sequence[str]) -> dict[str, Optional[str]]:
  """``{flag: value}`` as argparse reads ``train_args`` (the last of a repeated flag
  wins), without the flags that only say where things are."""
  flags: dict[str, Optional[str]] = {}
  args = list(train_args)
  for at, arg in enumerate(args):
    if arg.startswith("--"):
      value = args[at + 1] if at + 1 < len(args) and not args[at + 1].startswith("--") \
          else None
      flags[arg] = value
  for flag in _LOCATION_FLAGS:
    flags.pop(flag, None)
  return flags


def flag_value(train_args: Sequence[str], flag: str) -> Optional[str]:
  return effective_flags(train_args).get(flag)


class SettingsChanged(RuntimeError):
  """A finished run's result was made with other arguments than the ones planned now."""


def finished(run: Run, root: pathlib.Path) -> Optional[dict[str, Any]]:
  """The run's recorded result, if it finished with the same arguments."""
  path = run.folder(root) / RESULT_FILE
  if not path.is_file():
    return None
  result = json.loads(path.read_text(encoding="utf-8"))
  if effective_flags(result.get("train_args", ())) != effective_flags(run.train_args):
    raise SettingsChanged(
        f"{path} was made with other arguments:\n  recorded: "
        f"{' '.join(result.get('train_args', ()))}\n  planned:  {' '.join(run.train_args)}"
        f"\nUse another --output-dir, or delete that run's folder to run it again.")
  return result


def finished_elsewhere(run: Run, root: pathlib.Path, experiment: Experiment
                       ) -> Optional[pathlib.Path]:
  """The folder of a finished run of another experiment, in its folder beside ``root``
  (``<root>/../<experiment name>``), that is this very run: the same training flags and,
  if ``experiment`` measures flatness, flatness measured at its radius. ``None`` if there
  is none."""
  wanted = effective_flags(run.train_args)
  others = [root.parent / name for name in sorted(EXPERIMENTS)
            if (root.parent / name).resolve() != root.resolve()]
  for path in (path for other in others for path in sorted(
      other.glob(f"runs/{run.task}/*/seed{run.seed}/{RESULT_FILE}"))):
    folder = path.parent
    result = json.loads(path.read_text(encoding="utf-8"))
    if effective_flags(result.get("train_args", ())) != wanted:
      continue
    flatness = result.get("flatness")
    if experiment.flatness and (flatness is None
                                or flatness.get("rho") != experiment.flatness_rho):
      continue
    return folder
  return None


def adopt(run: Run, source: pathlib.Path, root: pathlib.Path, experiment: Experiment
          ) -> dict[str, Any]:
  """Copies the finished run in ``source`` (see :func:`finished_elsewhere`) into this
  run's folder, under this run's label, in place of whatever an interrupted attempt left
  there (its training checkpoint included); returns its ``result.json`` record."""
  folder = run.folder(root)
  shutil.rmtree(folder, ignore_errors=True)
  folder.mkdir(parents=True)
  for path in source.iterdir():
    if path.is_file() and path.name != RESULT_FILE:
      shutil.copy2(path, folder / path.name)
  recorded = json.loads((source / RESULT_FILE).read_text(encoding="utf-8"))
  result = result_record(run, read_log(folder),
                         recorded.get("flatness") if experiment.flatness else None)
  result["reused_from"] = str(source.relative_to(root.parent))
  common.write_json(folder / RESULT_FILE, result)
  return result


def read_log(folder: pathlib.Path) -> dict[str, Any]:
  """The final and the best epoch of a training run's ``log.jsonl``."""
  log = folder / "log.jsonl"
  records = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()
             if line.strip()]
  finals = [r for r in records if r.get("event") == "final"]
  if not finals:
    raise RuntimeError(f"{log} has no final record: the run did not finish")
  task = next((r["task"] for r in records if r.get("event") == "start"), None)
  evals = [r for r in records if r.get("event") == "eval"]
  best = max(evals, key=lambda r: score(task, r["metrics"])) if evals else None
  return {"final": finals[-1], "best": best, "epochs": evals}


def train_subprocess(run: Run, folder: pathlib.Path) -> int:
  """Runs the training command; its output goes to ``<folder>/train.out``."""
  folder.mkdir(parents=True, exist_ok=True)
  command = [sys.executable, "-m", "examples.glue.train", *run.train_args,
             "--output-dir", str(folder), "--resume"]
  # Runs of one method share their compiled steps through JAX's persistent cache.
  env = {"JAX_COMPILATION_CACHE_DIR": str(COMPILATION_CACHE), **os.environ}
  with open(folder / "train.out", "a", encoding="utf-8") as out:
    return subprocess.run(command, cwd=common.ROOT, env=env, stdout=out,
                          stderr=subprocess.STDOUT, check=False).returncode


def flatness_command(run: Run, folder: pathlib.Path, rho: float) -> list[str]:
  """``benchmarks/flatness.py`` on the run's saved model and training examples."""
  flags = effective_flags(run.train_args)
  command = [sys.executable, "-m", "benchmarks.flatness", "--model-dir",
             str(folder / "model"), "--task", run.task, "--rho", str(rho),
             "--data-seed", flags.get("--data-seed") or str(run.seed),
             "--output", str(folder / FLATNESS_FILE)]
  for flag in ("--train-size", "--max-length"):
    if flags.get(flag):
      command += [flag, flags[flag]]
  args = list(run.train_args)
  if "--glue-dir" in args:
    command += ["--glue-dir", args[args.index("--glue-dir") + 1]]
  return command


def measure_flatness_subprocess(run: Run, folder: pathlib.Path, rho: float) -> int:
  """Runs :func:`flatness_command`; its output goes to ``<folder>/flatness.out``."""
  with open(folder / "flatness.out", "a", encoding="utf-8") as out:
    return subprocess.run(flatness_command(run, folder, rho), cwd=common.ROOT, stdout=out,
                          stderr=subprocess.STDOUT, check=False).returncode


def commit_run(folder: pathlib.Path, message: str, attempts: int = 10) -> bool:
  """Commits one finished run folder (only that folder, whatever else is staged).

  Retries while another git command holds the index; returns whether it committed (a
  run that could not be committed stays on disk, for the next commit to take).
  """
  relative = str(folder.resolve().relative_to(common.ROOT))
  for attempt in range(attempts):
    added = subprocess.run(["git", "add", "-f", "--", relative], cwd=common.ROOT,
                           capture_output=True, text=True, check=False)
    committed = added.returncode == 0 and subprocess.run(
        ["git", "commit", "-q", "-m", message, "--", relative], cwd=common.ROOT,
        capture_output=True, text=True, check=False).returncode == 0
    if committed:
      return True
    time.sleep(min(2 ** attempt, 30))
  print(f"warning: could not commit {relative}; it stays on disk", file=sys.stderr)
  return False


Trainer = Callable[[Run, pathlib.Path], int]
Measurer = Callable[[Run, pathlib.Path, float], int]


@contextlib.contextmanager
def run_lock(folder: pathlib.Path) -> Iterator[None]:
  """Holds the run's lock file, ``<folder>.lock``, while the block runs.

  Two invocations whose plans share a run (two queues of experiments, say) would
  otherwise train it into the same folder at once. The operating system releases the
  lock when its process dies, so a run interrupted by a crash is resumed normally.

  Raises:
    RuntimeError: if another live process holds it.
  """
  path = folder.with_name(folder.name + LOCK_SUFFIX)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", encoding="utf-8") as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise RuntimeError(f"another invocation is training it (it holds {path})") from None
    try:
      yield
    finally:
      path.unlink(missing_ok=True)


def _train_and_measure(run: Run, folder: pathlib.Path, experiment: Experiment,
                       trainer: Trainer, measurer: Measurer) -> dict[str, Any]:
  """Trains one run and measures its flatness; returns its ``result.json`` record.

  Raises:
    RuntimeError, OSError: if either step failed, or another invocation is training the
      run (the message says where to look).
  """
  with run_lock(folder):
    status = trainer(run, folder)
    if status != 0:
      raise RuntimeError(f"exit status {status}; see {folder / 'train.out'}")
    log = read_log(folder)
    flatness = None
    if experiment.flatness:
      status = measurer(run, folder, experiment.flatness_rho)
      if status != 0:
        raise RuntimeError(f"flatness: exit status {status}; see {folder / 'flatness.out'}")
      flatness = json.loads((folder / FLATNESS_FILE).read_text(encoding="utf-8"))
    return result_record(run, log, flatness)


def execute(runs: Sequence[Run], root: pathlib.Path, experiment: Experiment, *,
            trainer: Trainer = train_subprocess,
            measurer: Measurer = measure_flatness_subprocess, keep_models: bool = False,
            commit: bool = False, parallel: int = 1, progress: bool = True
            ) -> tuple[list[dict[str, Any]], int, list[str]]:
  """Runs what has not finished, ``parallel`` at a time; returns (results, how many were
  kept, failures). Results are written, and committed, one at a time as runs end."""
  results, failures = [], []
  pending = []
  for run in runs:
    done = finished(run, root)
    if done is None and (source := finished_elsewhere(run, root, experiment)):
      done = adopt(run, source, root, experiment)
      print(f"{run.name}: the same run as {done['reused_from']}, reused")
      if commit:
        commit_run(run.folder(root), f"{experiment.name}: {run.name} "
                   f"({_headline(done)}; reused from {done['reused_from']})")
    if done is None:
      pending.append(run)
    else:
      results.append(done)
  kept = len(results)
  bar = None
  if progress and pending:
    import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm.tqdm(total=len(pending), desc=f"{experiment.name} runs", unit="run",
                    disable=None)
  with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
    futures = {pool.submit(_train_and_measure, run, run.folder(root), experiment, trainer,
                           measurer): run for run in pending}
    for future in concurrent.futures.as_completed(futures):
      run = futures[future]
      folder = run.folder(root)
      if bar is not None:
        bar.update()
      try:
        result = future.result()
      except (RuntimeError, OSError) as error:
        failures.append(f"{run.name}: {error}")
        continue
      common.write_json(folder / RESULT_FILE, result)
      if not keep_models:
        shutil.rmtree(folder / "model", ignore_errors=True)
      if commit:
        commit_run(folder, f"{experiment.name}: {run.name} ({_headline(result)})")
      results.append(result)
  if bar is not None:
    bar.close()
  return results, kept, failures


def result_record(run: Run, log: Mapping[str, Any],
                  flatness: Optional[Mapping[str, Any]]) -> dict[str, Any]:
  """What ``result.json`` keeps of a finished run (from :func:`read_log`) and its
  flatness measurement."""
  final, best = log["final"], log["best"]
  return {"task": run.task, "method": run.arm.method, "label": run.label,
          "reference": run.arm.reference, "seed": run.seed, "metrics": final["metrics"],
          "steps": final.get("step"), "time_s": final.get("time"),
          "best_epoch": None if best is None else {
              "epoch": best["epoch"], "step": best["step"], "metrics": best["metrics"]},
          "epochs": [{"epoch": r["epoch"], "metrics": r["metrics"]} for r in log["epochs"]],
          "flatness": None if flatness is None else {
              k: flatness[k] for k in (
                  "train_loss", "sharpness", "rho", "top_eigenvalue", "eigenvalue_history",
                  "eigenvalue_relative_change", "examples", "iterations",
                  "loss_and_sharpness_s", "eigenvalue_s")},
          "train_args": list(run.train_args)}


def _headline(result: Mapping[str, Any]) -> str:
  return f"dev {score(result['task'], result['metrics']):.1f}"


# ---------------------------------------------------------------------------------------
# Aggregation.


def score(task: Optional[str], metrics: Mapping[str, float]) -> float:
  """The task's dev score: the mean of its official metrics, x 100 (GLUE's convention)."""
  names = TASK_METRICS.get(task, tuple(metrics))
  return 100.0 * float(np.mean([metrics[name] for name in names]))


def mean_std(values: Sequence[float]) -> dict[str, Any]:
  values = np.asarray(values, float)
  return {"n": int(values.size), "mean": float(values.mean()) if values.size else None,
          "std": float(values.std(ddof=1)) if values.size > 1 else None}


def paired_difference(method: Mapping[int, float], reference: Mapping[int, float],
                      confidence: float = 0.95) -> dict[str, Any]:
  """Mean of ``method - reference`` over the seeds both have, with a t-interval."""
  seeds = sorted(set(method) & set(reference))
  differences = np.asarray([method[s] - reference[s] for s in seeds], float)
  n = differences.size
  out: dict[str, Any] = {"n": n, "seeds": seeds, "mean": None, "ci_low": None,
                         "ci_high": None, "half_width": None}
  if n == 0:
    return out
  out["mean"] = float(differences.mean())
  if n > 1:
    half = float(scipy.stats.t.ppf(0.5 + confidence / 2, n - 1)
                 * differences.std(ddof=1) / math.sqrt(n))
    out.update(half_width=half, ci_low=out["mean"] - half, ci_high=out["mean"] + half)
  return out


FLATNESS_FIGURES = ("top_eigenvalue", "sharpness", "train_loss")


def aggregate(results: Sequence[Mapping[str, Any]], experiment: Experiment
              ) -> list[dict[str, Any]]:
  """One record per (task, arm): scores, best-epoch scores, flatness, differences."""
  by_key: dict[tuple[str, str], dict[int, Mapping[str, Any]]] = {}
  # In seed order whatever order the runs finished in (--parallel): the same sums, bit
  # for bit.
  for r in sorted(results, key=lambda r: r["seed"]):
    by_key.setdefault((r["task"], r["label"]), {})[r["seed"]] = r
  arms = experiment.arms

  def scores(task, label, best=False):
    runs = by_key.get((task, label), {})
    return {s: score(task, (r["best_epoch"] or {}).get("metrics", r["metrics"]) if best
                     else r["metrics"]) for s, r in runs.items()}

  records = []
  for task in experiment.tasks:
    for label, arm in arms.items():
      runs = by_key.get((task, label))
      if not runs:
        continue
      final = scores(task, label)
      record = {"task": task, "label": label, "method": arm.method, "x": arm.x,
                "seeds": sorted(final), "score": mean_std([final[s] for s in sorted(final)]),
                "best_epoch_score": mean_std(list(scores(task, label, best=True).values())),
                "steps": mean_std([r.get("steps") or 0 for r in runs.values()]),
                "minutes": mean_std([(r.get("time_s") or 0) / 60 for r in runs.values()]),
                "differences": {}, "flatness": {}}
      references = [arm.reference] if arm.reference else []
      references += [r for r in experiment.references if r not in references]
      for reference in references:
        if reference != label and (task, reference) in by_key:
          record["differences"][reference] = paired_difference(final,
                                                               scores(task, reference))
      if arm.doubles and (task, arm.doubles) in by_key:
        record["differences"][arm.doubles] = paired_difference(final,
                                                               scores(task, arm.doubles))
      measured = {s: r["flatness"] for s, r in runs.items() if r.get("flatness")}
      for figure in FLATNESS_FIGURES:
        if measured:
          record["flatness"][figure] = mean_std([m[figure] for m in measured.values()])
      if measured:
        record["flatness"]["converged"] = all(
            m["eigenvalue_relative_change"] < 1e-3 for m in measured.values())
      records.append(record)
  return records


def trivial_scores(tasks: Sequence[str], glue_dir: Optional[str]) -> dict[str, float]:
  """Each task's dev score of the majority training label (a constant for STS-B)."""
  from examples.glue import data  # pylint: disable=g-import-not-at-top
  from examples.glue import metrics  # pylint: disable=g-import-not-at-top
  out = {}
  for name in tasks:
    task = data.get_task(name)
    try:
      train, dev = (data.load_split(task, split, glue_dir) for split in ("train", "dev"))
    except data.DataError:
      continue
    if task.is_regression:
      out[name] = 0.0  # a constant prediction has no correlation with anything
      continue
    labels, counts = np.unique(train.labels, return_counts=True)
    constant = np.full(len(dev), labels[np.argmax(counts)])
    out[name] = score(name, metrics.compute(task.metrics, constant, dev.labels))
  return out


def score_cell(entry: Optional[Mapping[str, Any]], digits: int = 1) -> str:
  """A mean ± std over seeds (the mean alone for one seed): a score, minutes."""
  if not entry or entry.get("mean") is None:
    return "-"
  text = f"{entry['mean']:.{digits}f}"
  if entry.get("std") is not None:
    text += f" ± {entry['std']:.{digits}f}"
  return text


def difference_cell(entry: Optional[Mapping[str, Any]]) -> str:
  """A paired difference with its 95% interval (the mean alone for one seed)."""
  if not entry or entry.get("mean") is None:
    return "-"
  text = f"{entry['mean']:+.1f}"
  if entry.get("ci_low") is not None:
    text += f" [{entry['ci_low']:+.1f}, {entry['ci_high']:+.1f}]"
  return text


def figure_cell(entry: Optional[Mapping[str, Any]]) -> str:
  """A flatness figure's mean to three significant digits, its std to the same place."""
  if not entry or entry.get("mean") is None:
    return "-"
  mean, std = entry["mean"], entry.get("std")
  if not math.isfinite(mean) or not 1e-4 <= abs(mean) < 1e6:
    decimals = None
  else:
    decimals = max(0, 2 - math.floor(math.log10(abs(mean))))
  text = f"{mean:.3g}" if decimals is None else f"{mean:.{decimals}f}"
  if std is not None:
    negligible = std <= 1e-9 * abs(mean)
    text += (" ± 0" if negligible else
             f" ± {std:.2g}" if decimals is None else f" ± {std:.{decimals}f}")
  return text


def scores_table(summary: Mapping[str, Any]) -> str:
  """The Markdown table of dev scores and paired differences of a summary."""
  records = summary["aggregate"]
  references = sorted({ref for r in records for ref in r["differences"]},
                      key=lambda ref: (ref != "adamw", ref))
  # The flatness figures beside the scores, where the experiment measured them.
  figures = ("top_eigenvalue", "sharpness") if any(r["flatness"] for r in records) else ()
  rows = []
  for r in records:
    rows.append([r["task"], f"`{r['label']}`", len(r["seeds"]), score_cell(r["score"]),
                 score_cell(r["best_epoch_score"]),
                 *(difference_cell(r["differences"].get(ref)) for ref in references),
                 *(figure_cell((r["flatness"] or {}).get(f)) for f in figures),
                 score_cell(r["minutes"])])
  return common.markdown_table(
      ["task", "arm", "seeds", "dev score (final epoch)", "best epoch (not the headline)",
       *(f"vs `{ref}`" for ref in references),
       *(("top Hessian eigenvalue", f"sharpness (ρ = {summary['flatness_rho']:g})")
         if figures else ()), "minutes per run"], rows,
      align="ll" + "r" * (4 + len(references) + len(figures)))


def render_markdown(summary: Mapping[str, Any]) -> str:
  records = summary["aggregate"]
  trivial = summary.get("trivial_scores", {})
  table = scores_table(summary)
  parts = [f"# GLUE dev quality: `{summary['experiment']}`", "",
           common.stamp_markdown(summary["meta"]), "", summary["description"], "",
           f"Runs: {summary['counts']['results']} finished of "
           f"{summary['counts']['planned']} planned "
           f"({summary['counts']['kept']} kept from earlier invocations or reused from "
           f"other experiments, {len(summary['failures'])} failed).", "",
           "Dev score: the mean of the task's official metrics x 100, mean ± std over "
           "seeds, of the final epoch (the headline) and, labelled, of each run's best "
           "epoch. Differences: mean over the seeds both arms have [paired 95% t-interval; "
           "it needs two seeds].", "", table, ""]
  if trivial:
    parts += ["Trivial dev score (the majority training label; a constant for STS-B): "
              + ", ".join(f"{t} {v:.1f}" for t, v in trivial.items()) + ".", ""]
  flat = [r for r in records if r["flatness"]]
  if flat:
    parts += ["Flatness of the final parameters on fixed training examples (dropout off): "
              "top Hessian eigenvalue (Lanczos), sharpness L(w + ρ g/‖g‖) − L(w) at "
              f"ρ = {summary['flatness_rho']}, training loss; mean ± std over seeds.", "",
              common.markdown_table(
                  ["task", "arm", "top eigenvalue", "sharpness", "training loss",
                   "converged"],
                  [[r["task"], f"`{r['label']}`",
                    *(figure_cell(r["flatness"].get(f)) for f in FLATNESS_FIGURES),
                    "yes" if r["flatness"].get("converged") else "no"] for r in flat],
                  align="llrrrl"), ""]
  if summary["failures"]:
    parts += ["Failed runs:", "", *(f"- {f}" for f in summary["failures"]), ""]
  return "\n".join(parts)


def _sweep_axis(axis: Any, swept: Sequence[Mapping[str, Any]], *, ylabel: str,
                title: str) -> None:
  """A log-scale axis over the swept values, each value labelled as written."""
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top
  values = sorted({r["x"] for r in swept})
  axis.set(xscale="log", xlabel="rho", ylabel=ylabel, title=title)
  axis.set_xticks(values, [f"{v:g}" for v in values])
  axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  axis.legend(fontsize=8)


def _reference_line(axis: Any, figure: Mapping[str, Any], label: str) -> None:
  """An unswept arm across a sweep: its mean, and a band of ± one std over seeds."""
  axis.axhline(figure["mean"], color="grey", linestyle="--", label=f"{label} (± std)")
  if figure.get("std"):
    axis.axhspan(figure["mean"] - figure["std"], figure["mean"] + figure["std"],
                 color="grey", alpha=0.15)


def _arm_axis(axis: Any, labels: Sequence[str], *, xlabel: str, title: str) -> None:
  """One row per arm, top to bottom in the experiment's order."""
  axis.set_yticks(range(len(labels)), labels)
  axis.set_ylim(len(labels) - 0.5, -0.5)
  axis.grid(axis="x", alpha=0.3)
  axis.set(xlabel=xlabel, title=title)


def _differences_panel(axis: Any, records: Sequence[Mapping[str, Any]], reference: str,
                       task: str) -> None:
  """Each arm's paired difference to ``reference`` with its 95% interval."""
  base = next(r for r in records if r["label"] == reference)
  labels = [r["label"] for r in records]
  for row, r in enumerate(records):
    difference = r["differences"].get(reference)
    if r["label"] == reference or not difference or difference["mean"] is None:
      continue
    half = difference["half_width"]
    axis.errorbar(difference["mean"], row, xerr=half if half is not None else None,
                  marker="o", capsize=3, color="tab:blue" if half is not None else "grey")
  axis.axvline(0.0, color="grey", linestyle="--")
  _arm_axis(axis, labels, xlabel=f"dev score minus {reference}'s (paired, 95% interval)",
            title=f"{task}: {reference} {score_cell(base['score'])}")


def _points_panel(axis: Any, records: Sequence[Mapping[str, Any]],
                  figures: Sequence[Optional[Mapping[str, Any]]], *, color: str,
                  xlabel: str, title: str) -> None:
  """One point per arm: a figure's mean ± std over seeds (arms without it left blank)."""
  for row, figure in enumerate(figures):
    if figure:
      axis.errorbar(figure["mean"], row, xerr=figure["std"] or None, marker="o",
                    capsize=3, color=color)
  _arm_axis(axis, [r["label"] for r in records], xlabel=xlabel, title=title)


def plot(summary: Mapping[str, Any], path: pathlib.Path) -> None:
  """Per task: the sweep of swept arms, else each arm's paired difference to the first
  reference (its dev score where there is none), and the top Hessian eigenvalue."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  records = summary["aggregate"]
  tasks = list(dict.fromkeys(r["task"] for r in records))
  flat = any(r["flatness"] for r in records)
  rows = 2 if flat else 1
  figure, axes = plt.subplots(rows, len(tasks), figsize=(5.5 * len(tasks), 3.6 * rows),
                              squeeze=False)
  for column, task in enumerate(tasks):
    mine = [r for r in records if r["task"] == task]
    swept = sorted((r for r in mine if r["x"] is not None), key=lambda r: r["x"])
    axis = axes[0][column]
    if swept:
      axis.errorbar([r["x"] for r in swept], [r["score"]["mean"] for r in swept],
                    yerr=[r["score"]["std"] or 0 for r in swept], marker="o", capsize=3,
                    label=swept[0]["method"])
      for r in mine:
        if r["x"] is None:
          _reference_line(axis, r["score"], r["label"])
      _sweep_axis(axis, swept, ylabel="dev score (final epoch)", title=task)
    else:
      reference = next((ref for ref in summary.get("references", ())
                        if any(r["label"] == ref for r in mine)), None)
      if reference:
        _differences_panel(axis, mine, reference, task)
      else:
        _points_panel(axis, mine, [r["score"] for r in mine], color="tab:blue",
                      xlabel="dev score (final epoch), mean ± std", title=task)
        trivial = summary.get("trivial_scores", {}).get(task)
        if trivial is not None:
          axis.axvline(trivial, color="grey", linestyle="--", label="trivial score")
          axis.legend(fontsize=8, loc="lower left")
    if flat and swept:  # The mechanism against the swept value.
      axis = axes[1][column]
      measured = [r for r in swept if r["flatness"]]
      eigenvalues = [r["flatness"]["top_eigenvalue"] for r in measured]
      axis.errorbar([r["x"] for r in measured], [e["mean"] for e in eigenvalues],
                    yerr=[e["std"] or 0 for e in eigenvalues], marker="o", capsize=3,
                    label=swept[0]["method"], color="tab:red")
      for r in mine:
        if r["x"] is None and r["flatness"]:
          _reference_line(axis, r["flatness"]["top_eigenvalue"], r["label"])
      _sweep_axis(axis, swept, ylabel="top Hessian eigenvalue",
                  title=f"{task}: flatness (lower is flatter)")
    elif flat:
      _points_panel(axes[1][column], mine,
                    [r["flatness"].get("top_eigenvalue") for r in mine], color="tab:red",
                    xlabel="top Hessian eigenvalue (mean ± std)",
                    title=f"{task}: flatness (lower is flatter)")
  figure.suptitle(f"GLUE dev, {summary['experiment']}")
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


def summarize(results: Sequence[Mapping[str, Any]], *, experiment: Experiment,
              meta: Mapping[str, Any], planned: int, kept: int, failures: Sequence[str],
              root: pathlib.Path, glue_dir: Optional[str]) -> dict[str, Any]:
  """Aggregates, writes ``summary.{json,md,png}`` under ``root``; returns the summary."""
  summary = {"experiment": experiment.name, "description": experiment.description,
             "meta": dict(meta), "flatness_rho": experiment.flatness_rho,
             "references": list(experiment.references),
             "counts": {"planned": planned, "results": len(results), "kept": kept},
             "failures": list(failures),
             "trivial_scores": trivial_scores(experiment.tasks, glue_dir),
             "aggregate": aggregate(results, experiment),
             "results": sorted(results, key=lambda r: (r["task"], r["label"], r["seed"]))}
  root.mkdir(parents=True, exist_ok=True)
  common.write_json(root / "summary.json", summary)
  (root / "summary.md").write_text(render_markdown(summary) + "\n", encoding="utf-8")
  if summary["aggregate"]:
    plot(summary, root / "summary.png")
  return summary


# ---------------------------------------------------------------------------------------
# Command line.


def default_glue_dir() -> Optional[str]:
  """``$GLUE_DIR``, else ``../shared/glue`` beside the checkout if it exists."""
  if os.environ.get("GLUE_DIR"):
    return os.environ["GLUE_DIR"]
  shared = common.ROOT.parent / "shared" / "glue"
  return str(shared) if shared.is_dir() else None


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog=f"python {SCRIPT}",
                                   description=__doc__.split("\n", 1)[0])
  parser.add_argument("--experiment", choices=sorted(EXPERIMENTS), required=True)
  parser.add_argument("--model", help="Hugging Face model folder (default: the embedded "
                      "all-MiniLM-L6-v2)")
  parser.add_argument("--tasks", nargs="+", help="only these of the experiment's tasks")
  parser.add_argument("--methods", nargs="+", metavar="ARM",
                      help="only these arms (and the arms they are compared with)")
  parser.add_argument("--seeds", nargs="+", type=int, help="only these seeds")
  parser.add_argument("--max-steps", type=int, help="cap every run (smoke runs; results "
                      "go to runs/glue_quality/ unless --output-dir is given)")
  parser.add_argument("--glue-dir", help="glue_data folder (default: $GLUE_DIR, else "
                      "../shared/glue if present, else the Hugging Face hub)")
  parser.add_argument("--output-dir",
                      help="default: benchmarks/results/glue_quality/<experiment>")
  parser.add_argument("--keep-models", action="store_true",
                      help="keep each run's exported model (its training checkpoint is "
                      "deleted by the training command once the run ends)")
  parser.add_argument("--parallel", type=int, default=1,
                      help="training runs at a time (an accelerator shared by several; "
                      "each gets 1/N of its memory)")
  parser.add_argument("--commit", action="store_true",
                      help="git-commit each run folder as soon as the run has finished")
  parser.add_argument("--aggregate-only", action="store_true",
                      help="only rebuild the summary from finished runs")
  parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
  args = parser.parse_args(argv)
  experiment = EXPERIMENTS[args.experiment]
  if experiment.needs_model and not args.model:
    parser.error(f"--experiment {experiment.name} needs --model")
  return args


def output_root(args: argparse.Namespace) -> pathlib.Path:
  """Committed results, unless the runs are capped (then a scratch folder)."""
  if args.output_dir:
    return pathlib.Path(args.output_dir)
  if args.max_steps:
    return common.SCRATCH / "glue_quality" / args.experiment
  return common.RESULTS / "glue_quality" / args.experiment


def run(argv: Optional[Sequence[str]] = None, *, trainer: Trainer = train_subprocess,
        measurer: Measurer = measure_flatness_subprocess) -> dict[str, Any]:
  args = parse_args(argv)
  argv = list(sys.argv[1:] if argv is None else argv)
  experiment = EXPERIMENTS[args.experiment]
  tasks = None if args.tasks is None else [t.lower().replace("-", "") for t in args.tasks]
  root = output_root(args)
  glue_dir = args.glue_dir or default_glue_dir()
  runs = plan(experiment, tasks=tasks, labels=args.methods, seeds=args.seeds,
              model=args.model, glue_dir=glue_dir, max_steps=args.max_steps)
  if args.dry_run:
    for r in runs:
      print(f"{r.folder(root)}: python -m examples.glue.train {' '.join(r.train_args)}")
    print(f"{len(runs)} runs")
    return {"planned": len(runs), "runs": runs}
  if args.parallel > 1:
    # Runs sharing one accelerator each preallocate their share of its memory, not 75%.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / args.parallel:.3f}")
  if args.aggregate_only:
    results = [done for r in runs if (done := finished(r, root)) is not None]
    kept, failures = len(results), []
  else:
    results, kept, failures = execute(runs, root, experiment, trainer=trainer,
                                      measurer=measurer, keep_models=args.keep_models,
                                      commit=args.commit, parallel=args.parallel)
  meta = common.stamp(SCRIPT, argv)
  summary = summarize(results, experiment=experiment, meta=meta, planned=len(runs),
                      kept=kept, failures=failures, root=root, glue_dir=glue_dir)
  print(render_markdown(summary))
  print(f"wrote summary.json, summary.md, summary.png to {root}")
  return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
  try:
    summary = run(argv)
  except SettingsChanged as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  return 1 if summary.get("failures") else 0


if __name__ == "__main__":
  sys.exit(main())
