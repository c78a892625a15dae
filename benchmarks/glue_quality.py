r"""Fine-tunes every method (and plain AdamW) on GLUE tasks over seeds; dev-set table.

  python benchmarks/glue_quality.py --profile cpu-small        # hours on a CPU
  python benchmarks/glue_quality.py --profile paper --model /path/to/bert-large-cased
  python benchmarks/glue_quality.py --profile cpu-small --tasks rte --methods adamw sam \
      --seeds 0 --max-steps 5 --output-dir /tmp/smoke        # a smoke run

Each run is ``python -m examples.glue.train ... --output-dir <run folder>`` in a
subprocess. When it ends, its final dev metrics are written to ``<run folder>/result.json``
and its checkpoint and saved model are deleted (``--keep-models`` keeps them). The script
is resumable: a run whose ``result.json`` exists is kept and skipped, and an interrupted
run continues from its last epoch checkpoint (``--resume`` of the training command).

The table gives, per task, the dev score (the mean of the task's official metrics, x 100)
as mean +- standard deviation over seeds, and the difference to AdamW trained with the
same setting, with a paired 95% confidence interval over seeds (t distribution).
Results go to ``benchmarks/results/glue_quality/<profile>/``: ``summary.json``,
``summary.md``, ``summary.png`` and ``runs/<task>/<method>/seed<k>/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `examples` importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import scipy.stats

from benchmarks import common

SCRIPT = "benchmarks/glue_quality.py"
RESULT_FILE = "result.json"
# Official metrics of the tasks the profiles use (examples.glue.data.TASKS agrees).
TASK_METRICS = {"rte": ("accuracy",), "mrpc": ("f1", "accuracy"),
                "stsb": ("pearson", "spearman"), "cola": ("matthews_corr",),
                "sst2": ("accuracy",), "qnli": ("accuracy",), "wnli": ("accuracy",)}
ALL_METHODS = ("adamw", "sam", "asam", "fsam", "gasam", "delta-sam", "per-instance-sam",
               "dps", "dps-frozen", "child-tuning-f", "child-tuning-d")
BASELINE = "adamw"
# Where the training subprocesses keep compiled steps ($JAX_COMPILATION_CACHE_DIR wins).
COMPILATION_CACHE = pathlib.Path.home() / ".cache" / "optax-sam" / "jax-compilation-cache"


@dataclasses.dataclass(frozen=True)
class Setting:
  """A training recipe; every method trained with it is compared to AdamW trained with it.

  Attributes:
    name: its label; the AdamW run of a setting other than the first is called
      ``adamw@<name>``.
    train_args: flags of ``examples.glue.train`` for every task.
    task_args: extra flags per task.
    method_args: extra flags per method, and per (method, task).
  """

  name: str
  train_args: tuple[str, ...]
  task_args: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  method_args: Mapping[Any, tuple[str, ...]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Profile:
  """What a profile runs.

  Attributes:
    name: ``cpu-small`` or ``paper``.
    tasks: GLUE task names (the training command's spelling).
    seeds: the seeds.
    settings: the training recipes; the first is the default.
    method_setting: the setting of each method (default: the first).
    needs_model: whether ``--model`` must be given.
    description: one line for the summary.
  """

  name: str
  tasks: tuple[str, ...]
  seeds: tuple[int, ...]
  settings: tuple[Setting, ...]
  method_setting: Mapping[str, str]
  needs_model: bool
  description: str


_SUBNETWORK_METHODS = ("dps", "dps-frozen", "child-tuning-f", "child-tuning-d")

# The papers' perturbation radii (METHODS.md): FSAM's grid middle for SAM, FSAM and
# GA-SAM, 10x that for ASAM (its radius is relative to |w|); delta-SAM's large-model values
# (rho 0.02, 0.01 on STS-B; eta 1e-4, 5e-4 on RTE), also for per-instance SAM, its upper
# reference.
_PAPERS_RHO: Mapping[Any, tuple[str, ...]] = {
    "sam": ("--rho", "5e-3"), "fsam": ("--rho", "5e-3"), "gasam": ("--rho", "5e-3"),
    "asam": ("--rho", "5e-2"),
    "delta-sam": ("--rho", "0.02", "--eta", "1e-4"),
    ("delta-sam", "stsb"): ("--rho", "0.01", "--eta", "1e-4"),
    ("delta-sam", "rte"): ("--rho", "0.02", "--eta", "5e-4"),
    "per-instance-sam": ("--rho", "0.02"),
    ("per-instance-sam", "stsb"): ("--rho", "0.01"),
}


def _with_chunk_size(method_args: Mapping[Any, tuple[str, ...]], chunk_size: str
                     ) -> dict[Any, tuple[str, ...]]:
  """``method_args`` with per-instance SAM's ``--chunk-size`` added."""

  def with_chunk(key: Any, args: tuple[str, ...]) -> tuple[str, ...]:
    method = key[0] if isinstance(key, tuple) else key
    return (*args, "--chunk-size", chunk_size) if method == "per-instance-sam" else args

  return {key: with_chunk(key, args) for key, args in method_args.items()}

PROFILES: dict[str, Profile] = {
    "cpu-small": Profile(
        name="cpu-small", tasks=("rte", "mrpc", "stsb", "cola"), seeds=(0, 1, 2),
        settings=(Setting("default", (
            "--train-size", "1000", "--epochs", "2", "--batch-size", "32",
            "--max-length", "64", "--pad-to-multiple-of", "16", "--lr", "1e-4",
            "--warmup-ratio", "0.06", "--weight-decay", "0.01"),
            # At 2 epochs CoLA stays at the majority class (MCC 0) for AdamW.
            task_args={"cola": ("--epochs", "4")},
            # Per-example gradients one at a time: the cheapest chunk on a CPU.
            method_args=_with_chunk_size(_PAPERS_RHO, "1")),),
        method_setting={}, needs_model=False,
        description=("embedded all-MiniLM-L6-v2, stratified 1000-example training "
                     "subsets, 2 epochs (CoLA 4), batch 32, max length 64, lr 1e-4 (not "
                     "tuned), the papers' rho for the sharpness-aware methods, library "
                     "defaults otherwise")),
    "paper": Profile(
        name="paper", tasks=("rte", "mrpc", "stsb", "cola"), seeds=(0, 1, 2, 3, 4),
        settings=(
            # FSAM's recipe (Zhong et al. 2022), used for every sharpness-aware method.
            Setting("sam-family", (
                "--epochs", "10", "--batch-size", "32", "--max-length", "128",
                "--warmup-ratio", "0.06", "--weight-decay", "0.01", "--adam-beta2", "0.98"),
                task_args={"rte": ("--lr", "2e-5"), "stsb": ("--lr", "2e-5"),
                           "mrpc": ("--lr", "1e-5"), "cola": ("--lr", "1e-5"),
                           "sst2": ("--lr", "1e-5")},
                method_args=_with_chunk_size(_PAPERS_RHO, "4")),
            # DPS's recipe (Zhang et al. 2022), used for DPS and Child-Tuning.
            Setting("subnetwork", (
                "--epochs", "3", "--batch-size", "16", "--max-length", "128",
                "--lr", "2e-5", "--warmup-ratio", "0.1", "--weight-decay", "0.01",
                "--dropout", "0", "--max-grad-norm", "1.0")),
        ),
        method_setting={m: "subnetwork" for m in _SUBNETWORK_METHODS},
        needs_model=True,
        description=("the papers' recipes on a large checkpoint (--model): FSAM's for the "
                     "sharpness-aware methods, DPS's for DPS and Child-Tuning, each "
                     "against AdamW trained the same way; full training sets")),
}


# ---------------------------------------------------------------------------------------
# Planning and running.


@dataclasses.dataclass(frozen=True)
class Run:
  """One fine-tuning run."""

  task: str
  method: str  # the training command's --method
  label: str  # the table's name: the method, or adamw@<setting>
  baseline: str  # the label this run is compared with
  seed: int
  train_args: tuple[str, ...]  # everything after `python -m examples.glue.train`

  def folder(self, root: pathlib.Path) -> pathlib.Path:
    return root / "runs" / self.task / self.label.replace("@", "-at-") / f"seed{self.seed}"


def _label(method: str, setting: Setting, profile: Profile) -> str:
  if method == BASELINE and setting.name != profile.settings[0].name:
    return f"{BASELINE}@{setting.name}"
  return method


def plan(profile: Profile, tasks: Sequence[str], methods: Sequence[str],
         seeds: Sequence[int], *, model: Optional[str], glue_dir: Optional[str],
         max_steps: Optional[int]) -> list[Run]:
  """Every run: each method with its setting, and AdamW with every setting in use."""
  settings = {s.name: s for s in profile.settings}
  jobs = []  # (method, setting)
  for method in methods:
    if method == BASELINE:
      continue
    jobs.append((method, settings[profile.method_setting.get(method,
                                                            profile.settings[0].name)]))
  used = {setting.name for _, setting in jobs} or {profile.settings[0].name}
  if BASELINE in methods or jobs:
    jobs = [(BASELINE, s) for s in profile.settings if s.name in used] + jobs
  runs = []
  # Seed-major, so that an interrupted profile has the same seeds for every method.
  for seed in seeds:
    for task in tasks:
      for method, setting in jobs:
        args = ["--task", task, "--method", method, "--seed", str(seed),
                *setting.train_args, *setting.task_args.get(task, ())]
        args += setting.method_args.get((method, task),
                                        setting.method_args.get(method, ()))
        if model:
          args += ["--model", model]
        if glue_dir:
          args += ["--glue-dir", glue_dir]
        if max_steps:
          args += ["--max-steps", str(max_steps)]
        runs.append(Run(task=task, method=method,
                        label=_label(method, setting, profile),
                        baseline=_label(BASELINE, setting, profile), seed=seed,
                        train_args=tuple(args)))
  return runs


class SettingsChanged(RuntimeError):
  """A finished run's result was made with other arguments than the ones planned now."""


def _comparable(train_args: Sequence[str]) -> tuple[str, ...]:
  """The arguments that decide a run's result (where the data folder is does not)."""
  args = list(train_args)
  if "--glue-dir" in args:
    at = args.index("--glue-dir")
    del args[at:at + 2]
  return tuple(args)


def finished(run: Run, root: pathlib.Path) -> Optional[dict[str, Any]]:
  """The run's recorded result, if it finished with the same arguments."""
  path = run.folder(root) / RESULT_FILE
  if not path.is_file():
    return None
  result = json.loads(path.read_text(encoding="utf-8"))
  if _comparable(result.get("train_args", ())) != _comparable(run.train_args):
    raise SettingsChanged(
        f"{path} was made with other arguments:\n  recorded: "
        f"{' '.join(result.get('train_args', ()))}\n  planned:  {' '.join(run.train_args)}"
        f"\nUse another --output-dir, or delete that run's folder to run it again.")
  return result


def final_metrics(folder: pathlib.Path) -> dict[str, Any]:
  """The ``final`` record of a training run's ``log.jsonl``."""
  log = folder / "log.jsonl"
  records = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()
             if line.strip()]
  final = [r for r in records if r.get("event") == "final"]
  if not final:
    raise RuntimeError(f"{log} has no final record: the run did not finish")
  return final[-1]


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


Trainer = Callable[[Run, pathlib.Path], int]


def execute(runs: Sequence[Run], root: pathlib.Path, *, trainer: Trainer = train_subprocess,
            keep_models: bool = False, progress: bool = True
            ) -> tuple[list[dict[str, Any]], list[str], list[str]]:
  """Runs what has not finished; returns (results, labels of skipped, failures)."""
  results, skipped, failures = [], [], []
  pending = []
  for run in runs:
    done = finished(run, root)
    if done is None:
      pending.append(run)
    else:
      results.append(done)
      skipped.append(f"{run.task}/{run.label}/seed{run.seed}")
  iterator: Iterable[Run] = pending
  if progress and pending:
    import tqdm  # pylint: disable=g-import-not-at-top
    iterator = tqdm.tqdm(pending, desc="fine-tuning runs", unit="run")
  for run in iterator:
    folder = run.folder(root)
    status = trainer(run, folder)
    try:
      if status != 0:
        raise RuntimeError(f"exit status {status}; see {folder / 'train.out'}")
      final = final_metrics(folder)
    except (RuntimeError, OSError) as error:
      failures.append(f"{run.task}/{run.label}/seed{run.seed}: {error}")
      continue
    result = {"task": run.task, "method": run.method, "label": run.label,
              "baseline": run.baseline, "seed": run.seed, "metrics": final["metrics"],
              "steps": final.get("step"), "time_s": final.get("time"),
              "train_args": list(run.train_args)}
    common.write_json(folder / RESULT_FILE, result)
    if not keep_models:
      shutil.rmtree(folder / "model", ignore_errors=True)
      (folder / "checkpoint.msgpack").unlink(missing_ok=True)
    results.append(result)
  return results, skipped, failures


# ---------------------------------------------------------------------------------------
# Aggregation.


def score(task: str, metrics: Mapping[str, float]) -> float:
  """The task's dev score: the mean of its official metrics, x 100 (GLUE's convention)."""
  names = TASK_METRICS.get(task, tuple(metrics))
  return 100.0 * float(np.mean([metrics[name] for name in names]))


def mean_std(values: Sequence[float]) -> dict[str, Any]:
  values = np.asarray(values, float)
  return {"n": int(values.size), "mean": float(values.mean()) if values.size else None,
          "std": float(values.std(ddof=1)) if values.size > 1 else None}


def paired_difference(method: Mapping[int, float], baseline: Mapping[int, float],
                      confidence: float = 0.95) -> dict[str, Any]:
  """Mean of ``method - baseline`` over the seeds both have, with a t-interval."""
  seeds = sorted(set(method) & set(baseline))
  differences = np.asarray([method[s] - baseline[s] for s in seeds], float)
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


def aggregate(results: Sequence[Mapping[str, Any]], tasks: Sequence[str]
              ) -> list[dict[str, Any]]:
  """One record per method label: per task (and the task average) scores and differences.

  The average is over the tasks of ``tasks``, per seed, for the seeds that have every
  task.
  """
  scores: dict[str, dict[str, dict[int, float]]] = {}
  baselines: dict[str, str] = {}
  for r in results:
    scores.setdefault(r["label"], {}).setdefault(r["task"], {})[r["seed"]] = score(
        r["task"], r["metrics"])
    baselines[r["label"]] = r.get("baseline", BASELINE)
  for label, by_task in scores.items():
    common_seeds = set.intersection(*(set(by_task.get(t, {})) for t in tasks)) \
        if all(t in by_task for t in tasks) else set()
    by_task["average"] = {s: float(np.mean([by_task[t][s] for t in tasks]))
                          for s in sorted(common_seeds)}
  records = []
  for label in sorted(scores, key=lambda l: (not l.startswith(BASELINE), l)):
    baseline = baselines[label]
    record = {"label": label, "baseline": baseline, "tasks": {}}
    for task in [*tasks, "average"]:
      values = scores[label].get(task, {})
      entry = {"seeds": sorted(values), **mean_std([values[s] for s in sorted(values)])}
      if label != baseline:
        entry["difference"] = paired_difference(values,
                                                scores.get(baseline, {}).get(task, {}))
      record["tasks"][task] = entry
    records.append(record)
  return records


def _cell(entry: Mapping[str, Any]) -> str:
  if not entry or entry.get("mean") is None:
    return "-"
  text = f"{entry['mean']:.1f}"
  if entry.get("std") is not None:
    text += f" ± {entry['std']:.1f}"
  return text


def _difference_cell(entry: Optional[Mapping[str, Any]]) -> str:
  if not entry or entry.get("mean") is None:
    return "-"
  text = f"{entry['mean']:+.1f}"
  if entry.get("ci_low") is not None:
    text += f" [{entry['ci_low']:+.1f}, {entry['ci_high']:+.1f}]"
  return text


def render_markdown(summary: Mapping[str, Any]) -> str:
  tasks = [*summary["tasks"], "average"]
  records = summary["aggregate"]
  score_table = common.markdown_table(
      ["method", *tasks], [[f"`{r['label']}`", *(_cell(r["tasks"][t]) for t in tasks)]
                           for r in records], align="l" + "r" * len(tasks))
  difference_table = common.markdown_table(
      ["method", "vs", *tasks],
      [[f"`{r['label']}`", f"`{r['baseline']}`",
        *(_difference_cell(r["tasks"][t].get("difference")) for t in tasks)]
       for r in records if r["label"] != r["baseline"]], align="ll" + "r" * len(tasks))
  meta = summary["meta"]
  parts = [f"# GLUE dev quality: profile `{summary['profile']}`", "",
           common.stamp_markdown(meta), f"- profile: {summary['description']}",
           f"- runs: {summary['counts']['results']} finished of {summary['counts']['planned']}"
           f" planned ({summary['counts']['skipped']} kept from earlier invocations, "
           f"{len(summary['failures'])} failed)", "",
           "Dev score (mean of the task's official metrics, x 100): mean ± std over seeds.",
           "", score_table, "",
           "Difference to AdamW trained with the same recipe: mean over seeds [paired 95% "
           "confidence interval, t distribution]; the interval needs two seeds or more.", "",
           difference_table, ""]
  if summary["failures"]:
    parts += ["Failed runs:", "", *(f"- {f}" for f in summary["failures"]), ""]
  return "\n".join(parts)


def plot(summary: Mapping[str, Any], path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  tasks = [*summary["tasks"], "average"]
  records = [r for r in summary["aggregate"] if r["label"] != r["baseline"]]
  figure, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 0.4 * len(records) + 2),
                              sharey=True, squeeze=False)
  labels = [r["label"] for r in records][::-1]
  for axis, task in zip(axes[0], tasks):
    means, errors = [], []
    for r in records[::-1]:
      d = r["tasks"][task].get("difference") or {}
      means.append(d.get("mean") if d.get("mean") is not None else np.nan)
      errors.append(d.get("half_width") or 0.0)
    colours = ["tab:green" if (m or 0) >= 0 else "tab:red" for m in means]
    axis.barh(labels, means, xerr=errors, color=colours, capsize=3)
    axis.axvline(0.0, color="black", linewidth=0.8)
    axis.set(title=task, xlabel="dev score - AdamW")
  seeds = sorted({r["seed"] for r in summary["results"]})
  figure.suptitle(f"GLUE dev, profile {summary['profile']}: difference to AdamW, paired 95% "
                  f"CI over seeds (seeds {', '.join(map(str, seeds))}; an interval needs "
                  "two)")
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


def summarize(results: Sequence[Mapping[str, Any]], *, profile: Profile,
              tasks: Sequence[str], meta: Mapping[str, Any], planned: int, skipped: int,
              failures: Sequence[str], root: pathlib.Path) -> dict[str, Any]:
  """Aggregates, writes ``summary.{json,md,png}`` under ``root``; returns the summary."""
  summary = {"profile": profile.name, "description": profile.description,
             "tasks": list(tasks), "meta": dict(meta),
             "counts": {"planned": planned, "results": len(results), "skipped": skipped},
             "failures": list(failures), "aggregate": aggregate(results, tasks),
             "results": list(results)}
  root.mkdir(parents=True, exist_ok=True)
  common.write_json(root / "summary.json", summary)
  markdown = render_markdown(summary)
  (root / "summary.md").write_text(markdown + "\n", encoding="utf-8")
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
  parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu-small")
  parser.add_argument("--model", help="Hugging Face folder (required by the paper "
                      "profile: a BERT-large or RoBERTa-large checkpoint)")
  parser.add_argument("--tasks", nargs="+", help="override the profile's tasks")
  parser.add_argument("--methods", nargs="+", choices=ALL_METHODS, metavar="METHOD",
                      help=f"override the methods ({' '.join(ALL_METHODS)}); AdamW is "
                      "always run as the baseline")
  parser.add_argument("--seeds", nargs="+", type=int, help="override the seeds")
  parser.add_argument("--max-steps", type=int, help="cap every run (smoke runs)")
  parser.add_argument("--glue-dir", help="glue_data folder (default: $GLUE_DIR, else "
                      "../shared/glue if present, else the Hugging Face hub)")
  parser.add_argument("--output-dir",
                      help="default: benchmarks/results/glue_quality/<profile>")
  parser.add_argument("--keep-models", action="store_true",
                      help="keep each run's checkpoint and saved model")
  parser.add_argument("--aggregate-only", action="store_true",
                      help="only rebuild the summary from finished runs")
  parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
  args = parser.parse_args(argv)
  profile = PROFILES[args.profile]
  if profile.needs_model and not args.model:
    parser.error(f"--profile {profile.name} needs --model (a BERT-large or RoBERTa-large "
                 "Hugging Face folder)")
  return args


def run(argv: Optional[Sequence[str]] = None, *, trainer: Trainer = train_subprocess
        ) -> dict[str, Any]:
  args = parse_args(argv)
  argv = list(sys.argv[1:] if argv is None else argv)
  profile = PROFILES[args.profile]
  tasks = [t.lower().replace("-", "") for t in (args.tasks or profile.tasks)]
  methods = list(args.methods or ALL_METHODS)
  if BASELINE not in methods:
    methods.insert(0, BASELINE)
  seeds = list(args.seeds if args.seeds is not None else profile.seeds)
  root = pathlib.Path(args.output_dir) if args.output_dir else (
      common.RESULTS / "glue_quality" / profile.name)
  runs = plan(profile, tasks, methods, seeds, model=args.model,
              glue_dir=args.glue_dir or default_glue_dir(), max_steps=args.max_steps)
  if args.dry_run:
    for r in runs:
      print(f"{r.folder(root)}: python -m examples.glue.train {' '.join(r.train_args)}")
    return {"planned": len(runs)}
  if args.aggregate_only:
    results = [done for r in runs if (done := finished(r, root)) is not None]
    skipped, failures = [r for r in results], []
  else:
    results, skipped, failures = execute(runs, root, trainer=trainer,
                                         keep_models=args.keep_models)
  meta = common.stamp(SCRIPT, argv)
  summary = summarize(results, profile=profile, tasks=tasks, meta=meta, planned=len(runs),
                      skipped=len(skipped), failures=failures, root=root)
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
