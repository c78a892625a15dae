"""The benchmark harnesses: what they compute and write, not how fast anything is."""

import json
import math
import re
import types

import jax
import numpy as np
import pytest
import scipy.stats

from benchmarks import common
from benchmarks import glue_quality
from benchmarks import step_cost

# A two-layer random encoder, four rows of sixteen tokens, the two reference rows and SAM
# (compiling dominates the test's time), and a two-point batch sweep for the scaling study.
TINY_ARGS = [
    "--config", "tiny", "--batch-size", "4", "--length", "16", "--rounds", "2",
    "--repeats", "1", "--warmup", "1", "--methods", "adamw", "floor", "sam",
    "--no-torch", "--scaling-batch-sizes", "2", "4",
    "--scaling-chunk-sizes", "2", "--scaling-fixed-chunk", "2",
    "--scaling-fixed-batch", "4", "--note", "test run",
]


@pytest.fixture(scope="module")
def step_result(tmp_path_factory):
  folder = tmp_path_factory.mktemp("step_cost")
  # Compiling fast matters here, the timings do not.
  previous = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    result = step_cost.run([*TINY_ARGS, "--output-dir", str(folder)])
  finally:
    jax.config.update("jax_disable_most_optimizations", previous)
  return result, folder


def test_timings_are_positive(step_result):
  result, _ = step_result
  names = {r["name"] for r in result["rows"]}
  assert names == {"adamw", "floor", "sam"}
  for row in result["rows"]:
    assert row["median_s"] > 0
    assert row["n"] == 2 and len(row["samples_s"]) == 2  # rounds x repeats
    assert all(t > 0 for t in row["samples_s"])
    # Samples are stored to the microsecond; the median is of the unrounded times.
    assert row["median_s"] == pytest.approx(float(np.median(row["samples_s"])), abs=1e-6)


def test_only_publish_replaces_the_committed_results():
  committed = common.RESULTS / "cpu-2core"
  for argv in ([], ["--quick"], ["--methods", "adamw", "sam"]):
    folder = step_cost.output_folder(step_cost.parse_args(argv), "cpu-2core")
    assert folder == common.ROOT / "runs" / "step_cost" / "cpu-2core", argv
  assert step_cost.output_folder(step_cost.parse_args(["--publish"]), "cpu-2core") == committed
  with pytest.raises(SystemExit):
    step_cost.parse_args(["--publish", "--output-dir", "/tmp/x"])


def test_ratios_come_from_the_same_run(step_result):
  result, folder = step_result
  saved = json.loads((folder / "step_cost.json").read_text())
  for rows in (result["rows"], saved["rows"]):
    median = {r["name"]: r["median_s"] for r in rows}
    for row in rows:
      assert row["ratio_to_adamw"] == pytest.approx(row["median_s"] / median["adamw"],
                                                    rel=1e-12)
      assert row["ratio_to_floor"] == pytest.approx(row["median_s"] / median["floor"],
                                                    rel=1e-12)


def test_fsam_is_amortised_over_mask_every():
  args = step_cost.parse_args(["--fsam-mask-every", "10"])
  rows = [step_cost.Row(name, run=None, times=times, memory={"compiled": 5})
          for name, times in (("adamw", [1.0, 1.2, 1.1]), ("floor", [2.0, 2.0, 2.0]),
                              ("fsam[normal]", [2.1, 2.3, 2.2]),
                              ("fsam[refresh]", [4.0, 5.0, 6.0]))]
  records = {r["name"]: r for r in step_cost.build_rows_json(rows, args, {})}
  assert records["fsam"]["median_s"] == pytest.approx((9 * 2.2 + 5.0) / 10)
  assert records["fsam"]["ratio_to_adamw"] == pytest.approx((9 * 2.2 + 5.0) / 10 / 1.1)
  assert records["fsam[refresh]"]["ratio_to_floor"] == pytest.approx(2.5)
  assert [r["name"] for r in step_cost.build_rows_json(rows, args, {})] == [
      "adamw", "floor", "fsam", "fsam[normal]", "fsam[refresh]"]


def test_memory_is_reported(step_result):
  result, _ = step_result
  for row in result["rows"]:
    assert row["compiled_memory_bytes"] > 0
    assert row["peak_bytes_in_use"] is None  # the CPU backend does not report it
  assert any("peak device memory" in note for note in result["notes"])
  for point in result["scaling"]:
    analysis = point["memory_analysis"]
    assert point["compiled_memory_bytes"] == (
        analysis["temp"] + analysis["argument"] + analysis["output"])
    assert point["median_s"] > 0
  assert {(p["function"], p["batch_size"], p["chunk_size"]) for p in result["scaling"]} == {
      (f, b, 2) for f in ("empirical_fisher", "per_instance_sam") for b in (2, 4)}


def test_files_are_written_and_stamped(step_result):
  result, folder = step_result
  for name in ("step_cost.json", "step_cost.md", "step_cost.png", "step_cost_scaling.png"):
    assert (folder / name).is_file(), name
  for name in ("step_cost.png", "step_cost_scaling.png"):
    assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  meta = json.loads((folder / "step_cost.json").read_text())["meta"]
  for package in ("jax", "optax", "flax", "python", "optax_sam"):
    assert meta["versions"][package], package
  assert meta["command"].startswith("python benchmarks/step_cost.py --config tiny")
  assert meta["device_kind"] == common.device_kind(jax.devices()[0])
  assert meta["device"] and meta["note"] == "test run"
  markdown = (folder / "step_cost.md").read_text()
  assert meta["command"] in markdown
  assert f"jax {meta['versions']['jax']}" in markdown
  assert meta["device_kind"] in markdown
  assert "## Goals" in markdown and "| `sam` |" in markdown


def test_goals_are_computed_from_the_measured_numbers(step_result):
  result, _ = step_result
  median = {r["name"]: r["median_s"] for r in result["rows"]}
  goals = {g["goal"]: g for g in result["goals"]}
  sam_floor = goals["SAM <= 1.02 x floor"]
  assert sam_floor["measured"] == pytest.approx(median["sam"] / median["floor"])
  assert sam_floor["met"] == (sam_floor["measured"] <= 1.02)
  for name in ("FSAM (refresh amortised) <= 1.05 x SAM", "DPS <= 1.05 x AdamW"):
    assert goals[name]["measured"] is None and goals[name]["met"] is None
  flat = [g for g in result["goals"] if "flat in batch size" in g["goal"]]
  assert len(flat) == 2
  for goal, function in zip(flat, ("empirical_fisher", "per_instance_sam")):
    temp = {p["batch_size"]: p["memory_analysis"]["temp"] for p in result["scaling"]
            if p["function"] == function}
    assert goal["measured"] == pytest.approx(temp[4] / temp[2])
    assert goal["met"] == (goal["measured"] <= step_cost.FLAT_LIMIT)


def test_goal_evaluation_on_synthetic_rows():
  rows = [{"name": n, "median_s": t} for n, t in (
      ("adamw", 1.0), ("floor", 2.0), ("sam", 2.2), ("fsam", 2.2), ("gasam", 2.5),
      ("delta-sam", 2.6), ("dps", 1.04), ("child-tuning-f", 1.2),
      ("child-tuning-d", 1.0), ("optax-contrib-sam", 2.4), ("torch-sam", 4.0))]
  scaling = [{"function": f, "batch_size": b, "chunk_size": 4,
              "memory_analysis": {"temp": t}}
             for f, b, t in (("empirical_fisher", 8, 100), ("empirical_fisher", 32, 105),
                             ("per_instance_sam", 8, 100), ("per_instance_sam", 32, 400))]
  goals = {g["goal"]: g for g in step_cost.evaluate_goals(rows, scaling, 4, "cpu")}
  expected = {
      "SAM <= 1.02 x floor": (1.1, False),
      "FSAM (refresh amortised) <= 1.05 x SAM": (1.0, True),
      "GA-SAM <= 1.03 x SAM": (2.5 / 2.2, False),
      "delta-SAM <= 1.25 x SAM": (2.6 / 2.2, True),
      "DPS <= 1.05 x AdamW": (1.04, True),
      "Child-Tuning_F <= 1.05 x AdamW": (1.2, False),
      "Child-Tuning_D <= 1.05 x AdamW": (1.0, True),
      "SAM <= 1.0 x optax.contrib.sam (same computation)": (2.2 / 2.4, True),
      "SAM no slower than PyTorch eager SAM (CPU)": (0.55, True),
      "per-example Fisher memory flat in batch size at chunk 4": (1.05, True),
      "per_instance_sam memory flat in batch size at chunk 4": (4.0, False),
  }
  assert set(goals) == set(expected)
  for name, (measured, met) in expected.items():
    assert goals[name]["measured"] == pytest.approx(measured), name
    assert goals[name]["met"] is met, name
  on_gpu = {g["goal"]: g for g in step_cost.evaluate_goals(rows, scaling, 4, "gpu")}
  assert on_gpu["SAM no slower than PyTorch eager SAM (CPU)"]["met"] is None


def test_device_kind_names():
  cpu = types.SimpleNamespace(platform="cpu", device_kind="cpu")
  gpu = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
  tpu = types.SimpleNamespace(platform="tpu", device_kind="TPU v4")
  assert common.device_kind(cpu) == f"cpu-{common.cpu_count()}core"
  assert common.device_kind(gpu) == "gpu-nvidia-h100"
  assert common.device_kind(tpu) == "tpu-v4"


# ---------------------------------------------------------------------------------------
# glue_quality: aggregation and resumption, on synthetic result files.


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


def test_torch_rows_run_a_step():
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  args = step_cost.parse_args(["--config", "tiny", "--batch-size", "2", "--length", "8",
                               "--methods", "torch-adamw", "torch-sam", "--no-scaling"])
  setup = step_cost.make_setup(args)
  rows, why_not = step_cost.torch_rows(setup, args, threads=1)
  assert why_not is None and [r.name for r in rows] == ["torch-adamw", "torch-sam"]
  for row in rows:
    row.run()
    assert "1 threads" in row.note


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


def test_readme_step_cost_figures_are_the_committed_run():
  # The README's cpu-2core tables are a hand-made digest of step_cost.json (rounded
  # medians, ratios, and the goals' "this run" column); they must not drift from it.
  run = json.loads((common.RESULTS / "cpu-2core" / "step_cost.json").read_text())
  readme = BENCHMARKS_README.read_text()
  section = readme[readme.index("### Step cost: `cpu-2core`"):readme.index("### GLUE quality")]
  row_pattern = re.compile(r"^\| `([^`]+)`[^|]*\| ([\d,]+) \|[^|]*\| ([\d.]+) \| ([\d.]+) \|",
                           re.MULTILINE)
  readme_rows = {name: rest for name, *rest in row_pattern.findall(section)}
  assert set(readme_rows) == {row["name"] for row in run["rows"]}
  for row in run["rows"]:
    expected = [f"{round(row['median_s'] * 1000):,}", f"{row['ratio_to_adamw']:.3f}",
                f"{row['ratio_to_floor']:.3f}"]
    assert readme_rows[row["name"]] == expected, row["name"]
  goal_table = section[section.index("| goal | this run |"):].split("\n\n")[0]
  this_run_column = [line.split(" | ")[1] for line in goal_table.splitlines()[2:]]
  assert this_run_column == [f"{goal['measured']:.3f}" for goal in run["goals"]]
