"""The step-cost results as a report: goals, the Markdown tables and the plots.

``benchmarks/step_cost.py`` measures and writes ``step_cost.json``; this module turns a
result (the JSON's dictionary) into ``step_cost.md`` and the figures, and evaluates the
goals. It only reads results, so a committed ``step_cost.json`` can be re-rendered
without measuring anything.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Mapping, Optional, Sequence

from benchmarks import common

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
    Goal("amortised SAM (LookSAM, k = 5) <= 1.25 x AdamW", "sam[k=5]", "adamw", 1.25),
    # δ-SAM's own passes (two forwards, two forward+backward) make 1.33 x SAM: the
    # structural floor, once the caller's clean backward pass compiles away.
    Goal("delta-SAM (plain API) <= 1.40 x SAM", "delta-sam", "sam", 1.40),
    Goal("DPS <= 1.05 x AdamW", "dps", "adamw", 1.05),
    Goal("Child-Tuning_F <= 1.03 x AdamW", "child-tuning-f", "adamw", 1.03),
    Goal("Child-Tuning_D <= 1.05 x AdamW", "child-tuning-d", "adamw", 1.05),
    # Of the library's methods only sam computes what optax.contrib.sam computes.
    Goal("SAM <= 1.0 x optax.contrib.sam (same computation)", "sam", "optax-contrib-sam",
         1.0),
    Goal("SAM no slower than PyTorch eager SAM (CPU)", "sam", "torch-sam", 1.0,
         cpu_only=True),
)
FLAT_LIMIT = 1.10  # largest-batch temp memory / smallest-batch temp memory
COLOURS = {"reference": "tab:gray", "library": "tab:blue", "torch": "tab:orange"}


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


def mib(value: Optional[int]) -> str:
  """Bytes as MiB, to three significant-ish digits; ``n/a`` for ``None``."""
  if value is None:
    return "n/a"
  size = value / 2**20
  return f"{size:,.0f}" if size >= 100 else f"{size:.1f}" if size >= 1 else f"{size:.3f}"


def ratio(value: Optional[float]) -> str:
  return "n/a" if value is None else f"{value:.3f}"


def render_markdown(result: dict[str, Any]) -> str:
  """``step_cost.md``: the stamp, the step table, the notes, the goals, the scaling."""
  meta, rows = result["meta"], result["rows"]
  header = ["row", "what", "median ms", "IQR ms", "x AdamW", "x floor",
            "compiled MiB", "peak MiB"]
  table = common.markdown_table(header, [
      [f"`{r['name']}`", r["description"], f"{r['median_s'] * 1e3:,.1f}",
       (f"{r['p25_s'] * 1e3:,.1f}-{r['p75_s'] * 1e3:,.1f}" if "p25_s" in r else "derived"),
       ratio(r["ratio_to_adamw"]), ratio(r["ratio_to_floor"]),
       mib(r["compiled_memory_bytes"]), mib(r["peak_bytes_in_use"])] for r in rows],
      align="llrrrrrr")
  goals = common.markdown_table(["goal", "measured", "limit", "status"], [
      [g["goal"], ratio(g["measured"]), f"{g['limit']:g}",
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
                    mib(p["compiled_memory_bytes"]),
                    mib((p["memory_analysis"] or {}).get("temp"))]
                   for p in result["scaling"]], align="lrrrrrr"), ""]
  return "\n".join(parts)


def plot(result: dict[str, Any], folder: pathlib.Path,
         kinds: Mapping[str, str]) -> list[pathlib.Path]:
  """Draws ``step_cost.png`` (and ``step_cost_scaling.png``) into ``folder``.

  ``kinds`` maps a row's name to ``"reference"``, ``"library"`` or ``"torch"``, its
  colour (grey, blue, orange).
  """
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
  colours = [COLOURS[kinds.get(n, "library")] for n in names]
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
