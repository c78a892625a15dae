"""The step-cost benchmark: what it computes and writes, not how fast anything is."""

import json
import types

import jax
import numpy as np
import pytest

from benchmarks import common
from benchmarks import step_cost
from benchmarks import step_cost_report

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
    assert goal["met"] == (goal["measured"] <= step_cost_report.FLAT_LIMIT)


def test_goal_evaluation_on_synthetic_rows():
  rows = [{"name": n, "median_s": t} for n, t in (
      ("adamw", 1.0), ("floor", 2.0), ("sam", 2.2), ("fsam", 2.2), ("gasam", 2.5),
      ("delta-sam", 2.6), ("dps", 1.04), ("child-tuning-f", 1.2),
      ("child-tuning-d", 1.0), ("optax-contrib-sam", 2.4), ("torch-sam", 4.0),
      ("sam[k=5]", 1.3))]
  scaling = [{"function": f, "batch_size": b, "chunk_size": 4,
              "memory_analysis": {"temp": t}}
             for f, b, t in (("empirical_fisher", 8, 100), ("empirical_fisher", 32, 105),
                             ("per_instance_sam", 8, 100), ("per_instance_sam", 32, 400))]
  goals = {g["goal"]: g for g in step_cost_report.evaluate_goals(rows, scaling, 4, "cpu")}
  expected = {
      "SAM <= 1.02 x floor": (1.1, False),
      "FSAM (refresh amortised) <= 1.05 x SAM": (1.0, True),
      "GA-SAM <= 1.03 x SAM": (2.5 / 2.2, False),
      "amortised SAM (LookSAM, k = 5) <= 1.25 x AdamW": (1.3, False),
      "delta-SAM (plain API) <= 1.40 x SAM": (2.6 / 2.2, True),
      "DPS <= 1.05 x AdamW": (1.04, True),
      "Child-Tuning_F <= 1.03 x AdamW": (1.2, False),
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
  on_gpu = {g["goal"]: g for g in step_cost_report.evaluate_goals(rows, scaling, 4, "gpu")}
  assert on_gpu["SAM no slower than PyTorch eager SAM (CPU)"]["met"] is None


def test_device_kind_names():
  cpu = types.SimpleNamespace(platform="cpu", device_kind="cpu")
  gpu = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
  tpu = types.SimpleNamespace(platform="tpu", device_kind="TPU v4")
  assert common.device_kind(cpu) == f"cpu-{common.cpu_count()}core"
  assert common.device_kind(gpu) == "gpu-nvidia-h100"
  assert common.device_kind(tpu) == "tpu-v4"


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


def test_the_row_table_is_the_command_line_and_the_table_order():
  assert step_cost.ALL_ROWS == (
      "adamw", "floor", "optax-contrib-sam", "sam", "asam", "fsam", "gasam",
      "sam[k=2]", "sam[k=5]", "sam[k=10]", "fsam[k=2]", "fsam[k=5]", "fsam[k=10]",
      "delta-sam",
      "per-instance-sam", "dps", "child-tuning-f", "child-tuning-d", "torch-adamw",
      "torch-sam")
  assert len(step_cost.ROW_BY_NAME) == len(step_cost.ROWS)
  for spec in step_cost.ROWS:
    # Each row is built one way: a JAX step, a PyTorch step, or from measured rows.
    builders = [spec.step is not None, spec.torch_step is not None, bool(spec.measured_as)]
    assert sum(builders) == 1, spec.name
    assert (spec.torch_step is not None) == (spec.kind == step_cost.TORCH), spec.name
    assert bool(spec.measured_as) == (spec.derive is not None), spec.name
    assert all(not step_cost.ROW_BY_NAME[m].selectable for m in spec.measured_as)
  parsed = step_cost.parse_args(["--methods", "fsam", "adamw", "torch-sam"])
  assert step_cost._step_row_names(parsed.methods) == [  # pylint: disable=protected-access
      "fsam[normal]", "fsam[refresh]", "adamw"]


def test_every_jax_row_builds_a_step():
  """Each JAX row's builder gives an optimizer and a step that trace on a tiny model."""
  args = step_cost.parse_args([*TINY_ARGS, "--methods", *step_cost.ALL_ROWS])
  setup = step_cost.make_setup(args)
  losses = step_cost.loss_functions(setup.module)
  for spec in step_cost.ROWS:
    if spec.step is None:
      continue
    tx, step = spec.step(losses, args, setup.params)
    state = jax.eval_shape(tx.init, setup.params)
    _, new_state, loss = jax.eval_shape(step, setup.params, state, setup.batch)
    assert loss.shape == () and jax.tree.structure(new_state) == jax.tree.structure(state)


def test_an_amortised_row_times_whole_cycles():
  """``sam[k=5]`` runs five steps per timed run (one perturbing, four reusing g_v) and
  records a fifth of the run's time; the optimizer state goes round the cycle."""
  args = step_cost.parse_args([*TINY_ARGS, "--methods", "sam[k=5]"])
  setup = step_cost.make_setup(args)
  row = step_cost.jax_row("sam[k=5]", setup, args)
  assert row.cycle == 5
  step_cost.interleaved_timing([row], rounds=2, repeats=1, warmup=1, desc="test")
  assert len(row.times) == 2 and all(t > 0 for t in row.times)
  spec = step_cost.ROW_BY_NAME["sam[k=5]"]
  assert spec.cycle == 5 and "LookSAM" in spec.description
