"""The benchmarks README's hand-made GLUE quality tables are the committed summary's.

(The step-cost harness: tests/test_step_cost.py; the README's generated step-cost
tables: tests/test_benchmarks_readme.py.)
"""

from benchmarks import common

BENCHMARKS_README = common.RESULTS.parent / "README.md"


def test_readme_quality_tables_are_the_committed_summary():
  # The README's cpu-small tables are pasted from summary.md; re-tabulating without
  # updating the README (or the reverse) must not go unnoticed.
  summary = common.RESULTS / "glue_quality" / "cpu-small" / "summary.md"
  readme = BENCHMARKS_README.read_text().splitlines()
  rows = [line for line in summary.read_text().splitlines() if line.startswith("| `")]
  assert rows
  assert [line for line in rows if line not in readme] == []
