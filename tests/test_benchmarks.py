"""The GLUE quality harness: what it computes and writes, on synthetic result files."""

import json
import math

import numpy as np
import pytest
import scipy.stats

from benchmarks import common
from benchmarks import glue_quality


def _fake_trainer(scores, calls):
  """Writes a training run's log.jsonl with a made-up final dev metric."""

  def trainer(run, folder):
    calls.append((run.task, run.label, run.seed))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model").mkdir()
    (folder / "checkpoint.msgpack").write_bytes(b"x")
    value = scores[(run.task, run.label, run.seed)]
    metrics = ({"accuracy": value} if run.task == "rte"
               else {"pearson": value, "spearman": value - 0.02})
    (folder / "log.jsonl").write_text(
        json.dumps({"event": "start"}) + "\n"
        + json.dumps({"event": "final", "step": 5, "metrics": metrics, "time": 1.0}) + "\n")
    return 0

  return trainer


SCORES = {}
for _seed, (_adamw, _sam) in enumerate(((0.60, 0.63), (0.62, 0.66), (0.58, 0.60))):
  SCORES[("rte", "adamw", _seed)] = _adamw
  SCORES[("rte", "sam", _seed)] = _sam
  SCORES[("stsb", "adamw", _seed)] = _adamw + 0.2
  SCORES[("stsb", "sam", _seed)] = _sam + 0.2


def test_glue_quality_aggregates_and_skips_finished_runs(tmp_path):
  argv = ["--profile", "cpu-small", "--tasks", "RTE", "STS-B", "--methods", "sam",
          "--seeds", "0", "1", "2", "--max-steps", "5", "--output-dir", str(tmp_path)]
  calls = []
  summary = glue_quality.run(argv, trainer=_fake_trainer(SCORES, calls))
  assert len(calls) == 12 and summary["counts"]["skipped"] == 0
  run_folder = tmp_path / "runs" / "rte" / "sam" / "seed1"
  assert (run_folder / "result.json").is_file()
  assert not (run_folder / "model").exists()  # the saved model is deleted by default
  assert not (run_folder / "checkpoint.msgpack").exists()

  records = {r["label"]: r for r in summary["aggregate"]}
  sam_rte = records["sam"]["tasks"]["rte"]
  values = [63.0, 66.0, 60.0]
  assert sam_rte["mean"] == pytest.approx(np.mean(values))
  assert sam_rte["std"] == pytest.approx(np.std(values, ddof=1))
  differences = np.array([3.0, 4.0, 2.0])
  half = scipy.stats.t.ppf(0.975, 2) * differences.std(ddof=1) / math.sqrt(3)
  d = sam_rte["difference"]
  assert d["mean"] == pytest.approx(3.0)
  assert d["ci_low"] == pytest.approx(3.0 - half) and d["ci_high"] == pytest.approx(3.0 + half)
  # STS-B's score is the mean of Pearson and Spearman, x 100.
  assert records["adamw"]["tasks"]["stsb"]["mean"] == pytest.approx(
      100 * np.mean([0.80 - 0.01, 0.82 - 0.01, 0.78 - 0.01]))
  average = records["sam"]["tasks"]["average"]
  assert average["n"] == 3 and average["difference"]["mean"] == pytest.approx(3.0)
  assert "difference" not in records["adamw"]["tasks"]["rte"]
  for name in ("summary.json", "summary.md", "summary.png"):
    assert (tmp_path / name).is_file()
  markdown = (tmp_path / "summary.md").read_text()
  assert "| `sam` | `adamw` | +3.0 [" in markdown

  # A second invocation keeps every finished run and runs only what is missing.
  (tmp_path / "runs" / "stsb" / "sam" / "seed2" / "result.json").unlink()
  calls.clear()
  again = glue_quality.run(argv, trainer=_fake_trainer(SCORES, calls))
  assert calls == [("stsb", "sam", 2)]
  assert again["counts"]["skipped"] == 11
  assert again["aggregate"] == summary["aggregate"]


def test_glue_quality_refuses_results_made_with_other_arguments(tmp_path):
  argv = ["--tasks", "rte", "--methods", "sam", "--seeds", "0", "--output-dir",
          str(tmp_path)]
  glue_quality.run([*argv, "--max-steps", "5"], trainer=_fake_trainer(SCORES, []))
  with pytest.raises(glue_quality.SettingsChanged, match="other arguments"):
    glue_quality.run([*argv, "--max-steps", "6"], trainer=_fake_trainer(SCORES, []))


def test_glue_quality_records_failures_and_goes_on(tmp_path):
  calls = []
  good = _fake_trainer(SCORES, calls)

  def flaky(run, folder):
    return 1 if run.label == "sam" else good(run, folder)

  summary = glue_quality.run(["--tasks", "rte", "--methods", "sam", "--seeds", "0", "1",
                              "--output-dir", str(tmp_path)], trainer=flaky)
  assert len(summary["failures"]) == 2 and summary["counts"]["results"] == 2
  assert not (tmp_path / "runs" / "rte" / "sam" / "seed0" / "result.json").exists()


def test_paired_difference_needs_two_seeds_for_an_interval():
  one = glue_quality.paired_difference({0: 70.0, 1: 71.0}, {0: 68.0})
  assert one["n"] == 1 and one["mean"] == 2.0 and one["ci_low"] is None
  none = glue_quality.paired_difference({0: 70.0}, {1: 68.0})
  assert none["n"] == 0 and none["mean"] is None


def test_paper_profile_plan():
  profile = glue_quality.PROFILES["paper"]
  runs = glue_quality.plan(profile, ["rte", "stsb"], ["adamw", "fsam", "dps", "delta-sam"],
                           [0, 1], model="/m", glue_dir=None, max_steps=None)
  labels = {(r.task, r.label) for r in runs}
  assert ("rte", "adamw") in labels and ("rte", "adamw@subnetwork") in labels
  dps = next(r for r in runs if r.method == "dps")
  assert dps.baseline == "adamw@subnetwork" and "--dropout" in dps.train_args
  assert "16" == dps.train_args[dps.train_args.index("--batch-size") + 1]
  fsam_rte = next(r for r in runs if r.method == "fsam" and r.task == "rte")
  assert fsam_rte.baseline == "adamw"
  assert fsam_rte.train_args[fsam_rte.train_args.index("--lr") + 1] == "2e-5"
  delta_stsb = next(r for r in runs if r.method == "delta-sam" and r.task == "stsb")
  assert delta_stsb.train_args[delta_stsb.train_args.index("--rho") + 1] == "0.01"
  assert all("--model" in r.train_args for r in runs)
  assert len(runs) == 2 * 5 * 2  # (adamw x 2 recipes + 3 methods) x 2 tasks x 2 seeds


def test_cpu_small_plan_is_seed_major_with_the_papers_rho():
  profile = glue_quality.PROFILES["cpu-small"]
  runs = glue_quality.plan(profile, ["rte", "stsb"], ["adamw", "sam", "per-instance-sam"],
                           [0, 1], model=None, glue_dir=None, max_steps=None)
  # An interrupted profile leaves every method with the same seeds.
  assert [r.seed for r in runs] == [0] * 6 + [1] * 6

  def flag(run, name):
    return run.train_args[run.train_args.index(name) + 1]

  by_key = {(r.task, r.method, r.seed): r for r in runs}
  assert flag(by_key["rte", "sam", 0], "--rho") == "5e-3"
  assert flag(by_key["stsb", "per-instance-sam", 1], "--rho") == "0.01"
  assert flag(by_key["stsb", "per-instance-sam", 1], "--chunk-size") == "1"
  assert "--rho" not in by_key["rte", "adamw", 0].train_args


def test_glue_quality_agrees_with_the_training_command():
  from examples.glue import data  # pylint: disable=g-import-not-at-top
  from examples.glue import methods  # pylint: disable=g-import-not-at-top
  from examples.glue import train  # pylint: disable=g-import-not-at-top
  assert set(glue_quality.ALL_METHODS) == set(methods.METHODS)
  for task, names in glue_quality.TASK_METRICS.items():
    assert data.get_task(task).metrics == names, task
  # Every flag a profile passes is one the training command takes.
  for profile in glue_quality.PROFILES.values():
    for setting in profile.settings:
      extra = [a for args in (*setting.task_args.values(), *setting.method_args.values())
               for a in args]
      parsed = vars(train.parse_args(["--task", "rte", *setting.train_args, *extra]))
      for flag in (a for a in (*setting.train_args, *extra) if a.startswith("--")):
        assert parsed[flag[2:].replace("-", "_")] is not None, flag


def test_glue_quality_keeps_results_when_only_the_data_folder_moved(tmp_path):
  argv = ["--tasks", "rte", "--methods", "sam", "--seeds", "0", "--output-dir",
          str(tmp_path)]
  glue_quality.run([*argv, "--glue-dir", "/a"], trainer=_fake_trainer(SCORES, []))
  calls = []
  again = glue_quality.run([*argv, "--glue-dir", "/b"], trainer=_fake_trainer(SCORES, calls))
  assert calls == [] and again["counts"]["skipped"] == 2


BENCHMARKS_README = common.RESULTS.parent / "README.md"


def test_readme_quality_tables_are_the_committed_summary():
  # The README's cpu-small tables are pasted from summary.md; re-tabulating without
  # updating the README (or the reverse) must not go unnoticed.
  summary = common.RESULTS / "glue_quality" / "cpu-small" / "summary.md"
  readme = BENCHMARKS_README.read_text().splitlines()
  rows = [line for line in summary.read_text().splitlines() if line.startswith("| `")]
  assert rows
  assert [line for line in rows if line not in readme] == []
