r"""The generated regions of the READMEs: tables made from committed results.

A region of the README is delimited by two comments, each alone on its line::

  <!-- generated: step-cost cpu-2core -->
  ...
  <!-- end generated -->

and ``REGIONS`` maps its name to a function that returns its Markdown, read from the
committed result files. Rewrite every region of ``READMES`` after publishing new results::

  python -m benchmarks.readme           # rewrites README.md and benchmarks/README.md
  python -m benchmarks.readme --check   # exit status 1 if a region is out of date

Adding a generated table is one entry in ``REGIONS`` and one pair of comments.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import pathlib
import re
import sys
from typing import Any, Callable, Mapping, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import common  # pylint: disable=wrong-import-position
from benchmarks import glue_quality  # pylint: disable=wrong-import-position
from benchmarks import step_cost_report  # pylint: disable=wrong-import-position

READMES = (common.ROOT / "README.md", common.ROOT / "benchmarks" / "README.md")
# Each comment stands alone on its line.
_REGION = re.compile(
    r"^(<!-- generated: (?P<name>[^>]+?) -->\n)(?P<body>.*?)^(<!-- end generated -->)$",
    re.S | re.M)
_START = re.compile(r"^<!-- generated: ([^>]+?) -->$", re.M)


def _load(path: pathlib.Path) -> dict[str, Any]:
  return json.loads(path.read_text(encoding="utf-8"))


def _ms(seconds: float) -> str:
  return f"{round(seconds * 1000):,}"


def _row_label(record: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
  label = f"`{record['name']}`"
  if "derived_from" in record:
    label += f" (amortised, N = {record['derived_from']['divisor']})"
  elif record["name"] == "per-instance-sam":
    label += f" (chunk {settings['per_instance_chunk']})"
  return label


def step_cost_rows(kind: str) -> str:
  """The step table of ``results/<kind>/step_cost.json``: medians, IQR, ratios, memory."""
  result = _load(common.RESULTS / kind / "step_cost.json")
  settings = result["meta"]["settings"]
  rows = []
  for r in result["rows"]:
    iqr = f"{_ms(r['p25_s'])}–{_ms(r['p75_s'])}" if "p25_s" in r else "derived"
    rows.append([_row_label(r, settings), _ms(r["median_s"]), iqr,
                 step_cost_report.ratio(r["ratio_to_adamw"]),
                 step_cost_report.ratio(r["ratio_to_floor"]),
                 step_cost_report.mib(r["compiled_memory_bytes"])])
  return common.markdown_table(
      ["row", "median ms", "IQR ms", "x AdamW", "x floor", "compiled MiB"], rows,
      align="lrrrrr")


def _verdict(goals: Sequence[Mapping[str, Any]]) -> str:
  """Met or missed only where every run agrees; by how many points it was missed."""
  if any(g["met"] is None for g in goals):
    return "not measured in every run"
  if all(g["met"] for g in goals):
    return "met"
  if any(g["met"] for g in goals):
    return "not resolved"
  points = sorted((g["measured"] - g["limit"]) * 100 for g in goals)
  digits = 0 if points[-1] >= 10 else 1
  span = "–".join(dict.fromkeys(f"{p:.{digits}f}" for p in (points[0], points[-1])))
  return f"**missed by {span} points**"


def step_cost_goals(kind: str, repeats: Sequence[str]) -> str:
  """Each goal over the published run of ``kind`` and its kept repeats, with a verdict.

  Args:
    kind: the device kind, ``results/<kind>/``.
    repeats: sub-folders of ``results/<kind>/`` holding other runs' ``step_cost.json``.
  """
  folder = common.RESULTS / kind
  runs = [_load(folder / "step_cost.json")] + [_load(folder / r / "step_cost.json")
                                              for r in repeats]
  header = ["goal", "limit"] + [
      f"{run['meta']['settings']['rounds']} x {run['meta']['settings']['repeats']}"
      for run in runs] + ["over the runs"]
  rows = []
  for goal in runs[0]["goals"]:
    # Matched by name: a run made before a goal was added (or its limit changed) did
    # not evaluate it.
    same = [next((g for g in run["goals"] if g["goal"] == goal["goal"]),
                 {"measured": None, "met": None}) for run in runs]
    rows.append([goal["goal"], f"{goal['limit']:g}",
                 *(step_cost_report.ratio(g["measured"]) for g in same), _verdict(same)])
  return common.markdown_table(header, rows, align="lr" + "r" * len(runs) + "l")


# How README.md names each arm of the comparison.
_METHOD_NAMES = {
    "adamw": "AdamW", "sam": "SAM", "fsam": "FSAM", "delta-sam": "δ-SAM",
    "asam": "ASAM", "gasam": "GA-SAM", "per-instance-sam": "per-instance SAM",
    "dps": "DPS", "dps-mix": "DPS-Mix", "child-tuning-d": "Child-Tuning_D",
    "mixout": "Mixout"}


def comparison_headline(task: str) -> str:
  """README.md's table of one task of the comparison: the arms every seed has finished.

  Dev score of the final epoch, its paired difference to AdamW with the 95% interval and
  the top Hessian eigenvalue; an arm still missing a planned seed is left out, so that the
  table only ever shows complete arms.
  """
  # Here, not at the top: it imports transformers, which no other region needs.
  from examples.glue import data  # pylint: disable=g-import-not-at-top
  summary = _load(common.RESULTS / "glue_quality" / "comparison" / "summary.json")
  experiment = glue_quality.EXPERIMENTS["comparison"]
  # Over all blocks: an arm may have seeds in several (AdamW and SAM on STS-B do).
  planned = collections.Counter(
      run.label for run in glue_quality.plan(experiment, tasks=[task]))
  rows = []
  for r in summary["aggregate"]:
    if r["task"] != task or len(r["seeds"]) < planned.get(r["label"], 1):
      continue
    name = _METHOD_NAMES.get(r["method"], r["method"])
    rho = glue_quality.COMPARISON_RHO.get(r["label"])
    rows.append([f"{name} (ρ {rho:g})" if rho else name,
                 glue_quality.score_cell(r["score"]),
                 "" if r["label"] == "adamw" else
                 glue_quality.difference_cell(r["differences"].get("adamw")),
                 glue_quality.figure_cell((r["flatness"] or {}).get("top_eigenvalue"))])
  title = (f"{data.get_task(task).folder} "
           f"({'/'.join(glue_quality.TASK_METRICS[task])} × 100)")
  return common.markdown_table(
      [title, "dev score", "vs AdamW", "top eigenvalue"], rows, align="lrrr")


# Region name -> its Markdown, from committed files.
def glue_quality_scores(experiment: str) -> str:
  """The scores table of ``results/glue_quality/<experiment>/summary.json``."""
  summary = _load(common.RESULTS / "glue_quality" / experiment / "summary.json")
  counts = summary["counts"]
  return (glue_quality.scores_table(summary) + f"\n\n{counts['results']} of "
          f"{counts['planned']} planned runs finished; trivial scores: "
          + ", ".join(f"{t} {v:.1f}" for t, v in summary.get("trivial_scores", {}).items())
          + ".\n")


REGIONS: dict[str, Callable[[], str]] = {
    "what-the-methods-buy stsb": functools.partial(comparison_headline, "stsb"),
    "what-the-methods-buy sst2": functools.partial(comparison_headline, "sst2"),
    "glue-quality calibration": functools.partial(glue_quality_scores, "calibration"),
    "glue-quality rho": functools.partial(glue_quality_scores, "rho"),
    "glue-quality looksam": functools.partial(glue_quality_scores, "looksam"),
    "glue-quality comparison": functools.partial(glue_quality_scores, "comparison"),
    "glue-quality full-data": functools.partial(glue_quality_scores, "full-data"),
    "step-cost cpu-2core": functools.partial(step_cost_rows, "cpu-2core"),
    "step-cost-goals cpu-2core": functools.partial(
        step_cost_goals, "cpu-2core", ("repeat-5x2", "repeat-3x1")),
}


def regenerate(text: str,
               regions: Optional[Mapping[str, Callable[[], str]]] = None) -> str:
  """``text`` with the body of every generated region rewritten.

  Raises:
    ValueError: for a region without its end comment, or whose name is not registered.
  """
  regions = REGIONS if regions is None else regions
  closed = [m.group("name") for m in _REGION.finditer(text)]
  opened = _START.findall(text)
  if opened != closed:
    raise ValueError(f"a generated region lacks its '<!-- end generated -->': opened "
                     f"{opened}, closed {closed}")

  def body(match: re.Match) -> str:
    name = match.group("name")
    if name not in regions:
      raise ValueError(f"unknown generated region {name!r}; known: {sorted(regions)}")
    return match.group(1) + regions[name]().rstrip("\n") + "\n" + match.group(4)

  return _REGION.sub(body, text)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.readme",
                                   description=__doc__.split("\n", 1)[0])
  parser.add_argument("--check", action="store_true",
                      help="do not write; exit 1 if a region is out of date")
  args = parser.parse_args(argv)
  stale = []
  for readme in READMES:
    text = readme.read_text(encoding="utf-8")
    fresh = regenerate(text)
    if args.check:
      stale += [readme] if fresh != text else []
      continue
    readme.write_text(fresh, encoding="utf-8")
    print(f"regenerated {len(_START.findall(text))} region(s) of {readme}")
  for readme in stale:
    print(f"{readme} has out-of-date generated regions: run python -m benchmarks.readme",
          file=sys.stderr)
  return 1 if stale else 0


if __name__ == "__main__":
  sys.exit(main())
