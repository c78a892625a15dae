"""benchmarks/glue_quality.py: planning, resumption and aggregation on synthetic runs."""

import dataclasses
import json
import math
import os
import pathlib
import subprocess

import numpy as np
import pytest
import scipy.stats

from benchmarks import common
from benchmarks import glue_quality
from examples.glue import data
from examples.glue import methods
from examples.glue import train

GLUE_DIR = pathlib.Path(os.environ.get("GLUE_DIR", common.ROOT.parent / "shared" / "glue"))
needs_glue = pytest.mark.skipif(not GLUE_DIR.is_dir(),
                                reason=f"GLUE data not found at {GLUE_DIR} (set GLUE_DIR)")

Arm, Block = glue_quality.Arm, glue_quality.Block
TOY = glue_quality.Experiment(
    name="toy", description="a test experiment", recipe=glue_quality.CPU_RECIPE,
    blocks=(Block(("rte", "stsb"), (0, 1, 2), (
        Arm("adamw", "adamw", reference=None), Arm("sam", "sam", ("--rho", "0.01")),
        Arm("fsam", "fsam", ("--rho", "0.01"), reference="adamw"))),
            Block(("rte",), (0, 1), (Arm("gasam", "gasam"),))),
    references=("adamw", "sam"), flatness=True)


@pytest.fixture(autouse=True)
def toy_experiment(monkeypatch):
  monkeypatch.setitem(glue_quality.EXPERIMENTS, "toy", TOY)


def _fake_trainer(scores, calls):
  """Writes a training run's log.jsonl: two epochs, the first 1 point better."""

  def trainer(run, folder):
    calls.append((run.task, run.label, run.seed))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model").mkdir()
    value = scores[(run.task, run.label, run.seed)]

    def metrics(v):
      return ({"accuracy": v} if run.task == "rte" else {"pearson": v, "spearman": v - 0.02})

    records = [{"event": "start", "task": run.task},
               {"event": "eval", "epoch": 1, "step": 3, "metrics": metrics(value + 0.01)},
               {"event": "eval", "epoch": 2, "step": 6, "metrics": metrics(value)},
               {"event": "final", "step": 6, "metrics": metrics(value), "time": 120.0}]
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return 0

  return trainer


def _fake_measurer(run, folder, rho):
  eigenvalue = {"adamw": 50.0, "sam": 30.0, "fsam": 40.0, "gasam": 45.0}[run.label]
  glue_quality.common.write_json(folder / glue_quality.FLATNESS_FILE, {
      "train_loss": 0.1, "sharpness": eigenvalue / 1000 + run.seed * 1e-3, "rho": rho,
      "top_eigenvalue": eigenvalue + run.seed, "eigenvalue_history": [1.0, eigenvalue],
      "eigenvalue_relative_change": 1e-5, "examples": 64, "iterations": 2,
      "loss_and_sharpness_s": 1.0, "eigenvalue_s": 2.0})
  return 0


SCORES = {}
for _seed, (_adamw, _sam, _fsam) in enumerate(((0.60, 0.63, 0.64), (0.62, 0.66, 0.63),
                                               (0.58, 0.60, 0.61))):
  for _task, _shift in (("rte", 0.0), ("stsb", 0.2)):
    SCORES[(_task, "adamw", _seed)] = _adamw + _shift
    SCORES[(_task, "sam", _seed)] = _sam + _shift
    SCORES[(_task, "fsam", _seed)] = _fsam + _shift
    SCORES[(_task, "gasam", _seed)] = _adamw + _shift


def _run(argv, calls=None, trainer=None):
  return glue_quality.run(["--experiment", "toy", *argv],
                          trainer=trainer or _fake_trainer(SCORES, [] if calls is None
                                                           else calls),
                          measurer=_fake_measurer)


def test_aggregates_scores_differences_and_flatness_and_skips_finished_runs(tmp_path):
  argv = ["--output-dir", str(tmp_path)]
  calls = []
  summary = _run(argv, calls)
  assert len(calls) == 2 * 3 * 3 + 2 and summary["counts"]["kept"] == 0
  run_folder = tmp_path / "runs" / "rte" / "sam" / "seed1"
  result = json.loads((run_folder / "result.json").read_text())
  assert not (run_folder / "model").exists()  # the saved model is deleted by default
  assert result["best_epoch"]["epoch"] == 1 and result["flatness"]["top_eigenvalue"] == 31.0

  records = {(r["task"], r["label"]): r for r in summary["aggregate"]}
  fsam_rte = records["rte", "fsam"]
  assert fsam_rte["score"]["mean"] == pytest.approx(np.mean([64.0, 63.0, 61.0]))
  assert fsam_rte["score"]["std"] == pytest.approx(np.std([64.0, 63.0, 61.0], ddof=1))
  assert fsam_rte["best_epoch_score"]["mean"] == pytest.approx(np.mean([65.0, 64.0, 62.0]))
  # Against AdamW and against SAM, paired over seeds with a t-interval.
  for reference, differences in (("adamw", [4.0, 1.0, 3.0]), ("sam", [1.0, -3.0, 1.0])):
    d = fsam_rte["differences"][reference]
    half = scipy.stats.t.ppf(0.975, 2) * np.std(differences, ddof=1) / math.sqrt(3)
    assert d["mean"] == pytest.approx(np.mean(differences))
    assert d["ci_low"] == pytest.approx(np.mean(differences) - half)
  assert set(records["rte", "adamw"]["differences"]) == {"sam"}
  assert records["rte", "gasam"]["differences"]["adamw"]["n"] == 2
  # STS-B's score is the mean of Pearson and Spearman, x 100.
  assert records["stsb", "adamw"]["score"]["mean"] == pytest.approx(
      100 * np.mean([0.80 - 0.01, 0.82 - 0.01, 0.78 - 0.01]))
  flatness = records["rte", "sam"]["flatness"]
  assert flatness["top_eigenvalue"]["mean"] == pytest.approx(31.0)
  assert flatness["converged"]
  for name in ("summary.json", "summary.md", "summary.png"):
    assert (tmp_path / name).is_file()
  markdown = (tmp_path / "summary.md").read_text()
  assert "| rte | `fsam` | 3 | 62.7 ± 1.5 | 63.7 ± 1.5 | +2.7 [" in markdown
  assert "| rte | `sam` | 31.0 ± 1.0 | 0.0310 ± 0.0010 | 0.100 ± 0 | yes |" in markdown
  # The scores table carries the flatness figures beside the differences.
  assert "| top Hessian eigenvalue | sharpness (ρ = 0.01) | minutes per run |" in markdown
  assert ("| rte | `sam` | 3 | 63.0 ± 3.0 | 64.0 ± 3.0 | +3.0 [+0.5, +5.5] | - | 31.0 ± 1.0 | "
          "0.0310 ± 0.0010 | 2.0 ± 0.0 |") in markdown

  # A second invocation keeps every finished run and runs only what is missing.
  (tmp_path / "runs" / "stsb" / "sam" / "seed2" / "result.json").unlink()
  calls.clear()
  again = _run(argv, calls)
  assert calls == [("stsb", "sam", 2)]
  assert again["counts"]["kept"] == 19
  assert again["aggregate"] == summary["aggregate"]


def test_restricting_the_arms_keeps_their_references():
  runs = glue_quality.plan(TOY, labels=["fsam"], seeds=[0], tasks=["rte"])
  assert [r.label for r in runs] == ["adamw", "sam", "fsam"]
  runs = glue_quality.plan(TOY, labels=["gasam"])
  assert {r.label for r in runs} == {"adamw", "sam", "gasam"}
  # Seed-major within a block: an interrupted experiment has the same seeds everywhere.
  seeds = [r.seed for r in glue_quality.plan(TOY) if r.label != "gasam"]
  assert seeds == sorted(seeds)


def test_arm_flags_override_the_recipe_as_argparse_reads_them():
  flags = glue_quality.effective_flags(
      ["--epochs", "8", "--lr", "1e-4", "--epochs", "16", "--resume", "--glue-dir", "/x"])
  assert flags == {"--epochs": "16", "--lr": "1e-4", "--resume": None}


def test_refuses_results_made_with_other_arguments(tmp_path):
  argv = ["--tasks", "rte", "--methods", "adamw", "--seeds", "0", "--output-dir",
          str(tmp_path)]
  _run([*argv, "--max-steps", "5"])
  with pytest.raises(glue_quality.SettingsChanged, match="other arguments"):
    _run([*argv, "--max-steps", "6"])


def test_keeps_results_when_only_the_data_folder_moved(tmp_path):
  argv = ["--tasks", "rte", "--methods", "sam", "--seeds", "0", "--output-dir",
          str(tmp_path)]
  _run([*argv, "--glue-dir", "/a"])
  calls = []
  again = _run([*argv, "--glue-dir", "/b"], calls)
  assert calls == [] and again["counts"]["kept"] == 2


def test_records_failures_and_goes_on(tmp_path):
  calls = []
  good = _fake_trainer(SCORES, calls)

  def flaky(run, folder):
    return 1 if run.label == "sam" else good(run, folder)

  summary = _run(["--tasks", "rte", "--methods", "sam", "--seeds", "0", "1",
                  "--output-dir", str(tmp_path)], trainer=flaky)
  assert len(summary["failures"]) == 2 and summary["counts"]["results"] == 2
  assert not (tmp_path / "runs" / "rte" / "sam" / "seed0" / "result.json").exists()


def test_a_run_another_invocation_is_training_is_left_to_it(tmp_path):
  folder = tmp_path / "runs" / "rte" / "sam" / "seed0"
  calls = []
  with glue_quality.run_lock(folder):
    summary = _run(["--tasks", "rte", "--methods", "sam", "--seeds", "0",
                    "--output-dir", str(tmp_path)], calls)
  assert ("rte", "sam", 0) not in calls and ("rte", "adamw", 0) in calls
  assert summary["failures"] == [
      f"rte/sam/seed0: another invocation is training it (it holds {folder}.lock)"]
  # Released, the run trains, and no lock file is left beside it.
  _run(["--tasks", "rte", "--methods", "sam", "--seeds", "0", "--output-dir",
        str(tmp_path)], calls)
  assert ("rte", "sam", 0) in calls and (folder / "result.json").exists()
  assert not list(tmp_path.rglob("*.lock"))


def test_capped_runs_do_not_touch_the_committed_results():
  capped = glue_quality.parse_args(["--experiment", "toy", "--max-steps", "5"])
  assert glue_quality.output_root(capped) == common.ROOT / "runs" / "glue_quality" / "toy"
  full = glue_quality.parse_args(["--experiment", "toy"])
  assert glue_quality.output_root(full) == common.RESULTS / "glue_quality" / "toy"


def test_paired_difference_needs_two_seeds_for_an_interval():
  one = glue_quality.paired_difference({0: 70.0, 1: 71.0}, {0: 68.0})
  assert one["n"] == 1 and one["mean"] == 2.0 and one["ci_low"] is None
  none = glue_quality.paired_difference({0: 70.0}, {1: 68.0})
  assert none["n"] == 0 and none["mean"] is None


def test_flatness_is_measured_on_the_examples_the_run_trained_on(tmp_path):
  (run,) = [r for r in glue_quality.plan(TOY, tasks=["stsb"], seeds=[2], glue_dir="/glue")
            if r.label == "adamw"]
  command = glue_quality.flatness_command(run, tmp_path, 0.01)
  flags = glue_quality.effective_flags(command[3:])
  assert flags["--train-size"] == "1000" and flags["--data-seed"] == "0"
  assert flags["--max-length"] == "64" and flags["--rho"] == "0.01"
  assert command[command.index("--glue-dir") + 1] == "/glue"
  assert flags["--model-dir"] == str(tmp_path / "model")


def test_every_experiment_speaks_the_training_command():
  for task, names in glue_quality.TASK_METRICS.items():
    assert data.get_task(task).metrics == names, task
  for experiment in glue_quality.EXPERIMENTS.values():
    for run in glue_quality.plan(experiment):
      parsed = vars(train.parse_args(list(run.train_args)))
      assert run.arm.method in methods.METHODS, run.name
      for flag, value in glue_quality.effective_flags(run.train_args).items():
        assert parsed[flag[2:].replace("-", "_")] is not None, (run.name, flag)
        if value is not None:
          assert str(parsed[flag[2:].replace("-", "_")]) in (value, str(float(value))
                                                              if value[0].isdigit() else
                                                              value), (run.name, flag)


@needs_glue
def test_trivial_scores_are_the_majority_label():
  scores = glue_quality.trivial_scores(["mrpc", "stsb", "cola"], str(GLUE_DIR))
  dev = data.load_split(data.get_task("mrpc"), "dev", str(GLUE_DIR))
  positive = float(np.mean(dev.labels == 1))
  f1 = 2 * positive / (1 + positive)
  assert scores["mrpc"] == pytest.approx(100 * (f1 + positive) / 2)
  assert scores["stsb"] == 0.0 and scores["cola"] == 0.0


def test_commit_run_commits_only_that_folder(tmp_path, monkeypatch):
  repo = tmp_path / "repo"
  folder = repo / "results" / "runs" / "rte" / "sam" / "seed0"
  folder.mkdir(parents=True)
  git = lambda *a: subprocess.run(["git", *a], cwd=repo, check=True, capture_output=True,
                                  text=True).stdout
  git("init", "-q")
  git("config", "user.email", "t@example.com")
  git("config", "user.name", "t")
  (repo / "other.txt").write_text("staged elsewhere")
  git("add", "other.txt")
  (folder / "result.json").write_text("{}")
  monkeypatch.setattr(common, "ROOT", repo)
  glue_quality.commit_run(folder, "toy: rte/sam/seed0")
  assert git("log", "--format=%s") == "toy: rte/sam/seed0\n"
  assert git("show", "--name-only", "--format=").split() == [
      "results/runs/rte/sam/seed0/result.json"]
  assert git("diff", "--cached", "--name-only").split() == ["other.txt"]


def test_parallel_runs_give_the_same_summary(tmp_path, monkeypatch):
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")  # restored afterwards
  # Not side by side: a second experiment folder beside the first would reuse its runs.
  serial = _run(["--output-dir", str(tmp_path / "serial" / "toy")])
  parallel = _run(["--output-dir", str(tmp_path / "parallel" / "toy"), "--parallel", "4"])
  assert parallel["counts"]["kept"] == 0
  assert parallel["aggregate"] == serial["aggregate"]
  assert len(parallel["results"]) == len(serial["results"]) == 20


def test_the_summary_does_not_depend_on_the_order_runs_finished_in(tmp_path):
  results = _run(["--output-dir", str(tmp_path)])["results"]
  shuffled = [results[i] for i in np.random.default_rng(0).permutation(len(results))]
  assert (glue_quality.aggregate(shuffled, TOY) == glue_quality.aggregate(results, TOY)
          == glue_quality.aggregate(results[::-1], TOY))


def test_a_run_another_experiment_made_with_the_same_flags_is_reused(tmp_path,
                                                                     monkeypatch):
  sweep = glue_quality.Experiment(
      name="sweep", description="", recipe=glue_quality.CPU_RECIPE,
      blocks=(Block(("rte",), (0,), (
          Arm("adamw", "adamw", reference=None),
          Arm("sam@rho=0.01", "sam", ("--rho", "0.01")),
          Arm("sam@rho=0.02", "sam", ("--rho", "0.02")))),), flatness=True)
  monkeypatch.setitem(glue_quality.EXPERIMENTS, "sweep", sweep)
  glue_quality.run(["--experiment", "sweep", "--output-dir", str(tmp_path / "sweep")],
                   trainer=_fake_trainer({("rte", "adamw", 0): 0.6,
                                          ("rte", "sam@rho=0.01", 0): 0.63,
                                          ("rte", "sam@rho=0.02", 0): 0.5}, []),
                   measurer=_fake_measurer_as("sam"))
  interrupted = tmp_path / "toy" / "runs" / "rte" / "sam" / "seed0" / "checkpoints"
  interrupted.mkdir(parents=True)
  calls = []
  summary = _run(["--tasks", "rte", "--seeds", "0", "--output-dir", str(tmp_path / "toy")],
                 calls)
  assert not interrupted.exists()
  assert sorted(calls) == [("rte", "fsam", 0), ("rte", "gasam", 0)]
  assert summary["counts"] == {"planned": 4, "results": 4, "kept": 2}
  sam = next(r for r in summary["results"] if r["label"] == "sam")
  assert sam["reused_from"] == "sweep/runs/rte/sam-rho0.01/seed0"
  assert sam["metrics"] == {"accuracy": 0.63} and sam["reference"] == "adamw"
  assert sam["flatness"]["top_eigenvalue"] == 30.0
  assert (tmp_path / "toy" / "runs" / "rte" / "sam" / "seed0" / "log.jsonl").is_file()
  again = []
  _run(["--tasks", "rte", "--seeds", "0", "--output-dir", str(tmp_path / "toy")], again)
  assert again == []


def test_a_run_measured_at_another_flatness_radius_is_not_reused(tmp_path, monkeypatch):
  argv = ["--tasks", "rte", "--methods", "adamw", "--seeds", "0"]
  first = []
  _run([*argv, "--output-dir", str(tmp_path / "toy")], first)
  monkeypatch.setitem(glue_quality.EXPERIMENTS, "toy",
                      dataclasses.replace(TOY, flatness_rho=0.05))
  second = []
  _run([*argv, "--output-dir", str(tmp_path / "other")], second)
  assert second == first == [("rte", "adamw", 0), ("rte", "sam", 0)]


def _fake_measurer_as(label):
  """:func:`_fake_measurer`, reading every run as the arm ``label``."""

  def measurer(run, folder, rho):
    return _fake_measurer(dataclasses.replace(run, arm=dataclasses.replace(
        run.arm, label=label if run.arm.method == "sam" else run.arm.label)), folder, rho)

  return measurer


def test_the_accelerator_experiment_is_the_whole_matrix_at_five_seeds():
  flags = lambda runs: {tuple(sorted(glue_quality.effective_flags(r.train_args).items()))
                        for r in runs}
  gpu = flags(glue_quality.plan(glue_quality.EXPERIMENTS["gpu"]))
  for name in ("comparison", "looksam", "full-data"):
    assert flags(glue_quality.plan(glue_quality.EXPERIMENTS[name])) <= gpu, name
  seeds = {r.seed for r in glue_quality.plan(glue_quality.EXPERIMENTS["gpu"], tasks=["sst2"])
           if r.label == "fsam"}
  assert seeds == {0, 1, 2, 3, 4}
