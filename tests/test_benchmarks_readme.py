"""benchmarks/README.md's generated tables are the committed results, and stay so."""

import pytest

from benchmarks import readme


def test_generated_regions_are_the_committed_results():
  text = readme.README.read_text(encoding="utf-8")
  assert readme.regenerate(text) == text, "run: python -m benchmarks.readme"
  for name in readme.REGIONS:
    assert text.count(f"<!-- generated: {name} -->") == 1, name
  assert readme.main(["--check"]) == 0


def test_regenerate_rewrites_region_bodies_only():
  regions = {"a": lambda: "| x |\n", "b": lambda: "B"}
  text = ("intro\n<!-- generated: a -->\nold\nlines\n<!-- end generated -->\nmiddle\n"
          "<!-- generated: b -->\n<!-- end generated -->\nend\n")
  assert readme.regenerate(text, regions) == (
      "intro\n<!-- generated: a -->\n| x |\n<!-- end generated -->\nmiddle\n"
      "<!-- generated: b -->\nB\n<!-- end generated -->\nend\n")
  with pytest.raises(ValueError, match="unknown generated region 'c'"):
    readme.regenerate("<!-- generated: c -->\n<!-- end generated -->\n", regions)
  with pytest.raises(ValueError, match="lacks its '<!-- end generated -->'"):
    readme.regenerate("<!-- generated: a -->\nno end\n", regions)


def test_a_goal_is_met_or_missed_only_where_every_run_agrees():
  verdict = readme._verdict  # pylint: disable=protected-access

  def goals(*measured, limit=1.05):
    return [{"measured": m, "limit": limit, "met": m <= limit} for m in measured]

  assert verdict(goals(1.0, 1.04)) == "met"
  assert verdict(goals(1.0, 1.06)) == "not resolved"
  assert verdict(goals(1.06, 1.081)) == "**missed by 1.0–3.1 points**"
  assert verdict(goals(1.5, 1.7)) == "**missed by 45–65 points**"
  assert verdict(goals(1.06, 1.06)) == "**missed by 1.0 points**"
