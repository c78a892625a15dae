"""Pieces shared by the benchmark scripts: run stamps, device names, file writing."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import re
import shlex
import subprocess
import sys
from typing import Any, Optional, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"  # committed results
SCRATCH = ROOT / "runs"  # ad-hoc results (git-ignored)

_PACKAGES = ("jax", "jaxlib", "optax", "flax", "numpy", "transformers", "torch", "scipy")


def cpu_count() -> int:
  """CPU cores this process may run on (its affinity mask, else ``os.cpu_count``)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def cpu_model() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_kind(device: Any) -> str:
  """A folder name for the machine: ``cpu-2core``, ``gpu-nvidia-h100``, ``tpu-v4``."""
  if device.platform == "cpu":
    return f"cpu-{cpu_count()}core"
  tokens = _slug(device.device_kind).split("-")
  if device.platform == "tpu":
    tokens = [t for t in tokens if t != "tpu"]
    return "tpu-" + "-".join(tokens[:2])
  return f"{device.platform}-" + "-".join(tokens[:2])


def versions() -> dict[str, Optional[str]]:
  """Versions of Python, this library and the packages the benchmarks touch."""
  found: dict[str, Optional[str]] = {"python": platform.python_version()}
  for name in _PACKAGES:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      found[name] = None
  import optax_sam  # pylint: disable=g-import-not-at-top
  found["optax_sam"] = optax_sam.__version__
  return found


def git_revision() -> Optional[str]:
  """``<commit>`` of the checkout, with ``+dirty`` when the working tree has changes."""
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None
  return commit + ("+dirty" if dirty else "")


def load_average() -> Optional[list[float]]:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except (AttributeError, OSError):
    return None


def command_line(script: str, argv: Optional[Sequence[str]]) -> str:
  """The command that reproduces this run, as typed from the repository root."""
  args = list(sys.argv[1:] if argv is None else argv)
  return shlex.join(["python", script, *args])


def stamp(script: str, argv: Optional[Sequence[str]]) -> dict[str, Any]:
  """What every result file carries: command, time, versions, revision, host."""
  return {
      "command": command_line(script, argv),
      "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime(
          "%Y-%m-%d %H:%M:%S"),
      "versions": versions(),
      "git": git_revision(),
      "host": {"cpu": cpu_model(), "cpu_cores": cpu_count(),
               "system": f"{platform.system()} {platform.machine()}"},
  }


def write_json(path: pathlib.Path, payload: Any) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_suffix(path.suffix + ".partial")
  partial.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n",
                     encoding="utf-8")
  os.replace(partial, path)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]],
                   align: Optional[str] = None) -> str:
  """A GitHub Markdown table; ``align`` is one of ``l``/``r`` per column."""
  align = align or "l" + "r" * (len(header) - 1)
  rule = ["---:" if a == "r" else "---" for a in align]
  lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def stamp_markdown(meta: dict[str, Any]) -> str:
  """The stamp as a few Markdown lines."""
  v = meta["versions"]
  packages = ", ".join(f"{k} {v[k]}" for k in
                       ("jax", "jaxlib", "optax", "flax", "optax_sam", "torch")
                       if v.get(k))
  lines = [f"- command: `{meta['command']}`",
           f"- date (UTC): {meta['date_utc']}; git: {meta.get('git') or 'unknown'}",
           f"- host: {meta['host']['cpu']}, {meta['host']['cpu_cores']} cores, "
           f"{meta['host']['system']}",
           f"- python {v['python']}; {packages}"]
  if meta.get("device"):
    lines.insert(2, f"- device: {meta['device']}")
  return "\n".join(lines)
