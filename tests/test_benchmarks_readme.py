"""The READMEs' generated tables are the committed results, and stay so."""

import json

import pytest

from benchmarks import readme


def test_generated_regions_are_the_committed_results():
  texts = [path.read_text(encoding="utf-8") for path in readme.READMES]
  for path, text in zip(readme.READMES, texts):
    assert readme.regenerate(text) == text, f"{path}: run python -m benchmarks.readme"
  for name in readme.REGIONS:
    assert sum(text.count(f"<!-- generated: {name} -->") for text in texts) == 1, name
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


def test_the_headline_shows_only_arms_every_planned_seed_finished(tmp_path, monkeypatch):
  def record(label, seeds, difference=None):
    return {"task": "stsb", "label": label, "method": label, "seeds": seeds,
            "score": {"mean": 80.0, "std": 0.5},
            "differences": {"adamw": difference} if difference else {},
            "flatness": {"top_eigenvalue": {"mean": 576.4, "std": 163.2}}}

  folder = tmp_path / "glue_quality" / "comparison"
  folder.mkdir(parents=True)
  monkeypatch.setattr(readme.common, "RESULTS", tmp_path)
  # AdamW and SAM have five planned seeds on STS-B, from two blocks; FSAM three.
  sam_difference = {"mean": -1.2, "ci_low": -4.5, "ci_high": 2.1}
  (folder / "summary.json").write_text(json.dumps({"aggregate": [
      record("adamw", [0, 1, 2, 3, 4]),
      record("sam", [0, 1, 2, 3, 4], sam_difference),
      record("fsam", [0, 1])]}))
  assert readme.comparison_headline("stsb").splitlines() == [
      "| STS-B (pearson/spearman × 100) | dev score | vs AdamW | top eigenvalue |",
      "| --- | ---: | ---: | ---: |",
      "| AdamW | 80.0 ± 0.5 |  | 576 ± 163 |",
      "| SAM (ρ 0.01) | 80.0 ± 0.5 | -1.2 [-4.5, +2.1] | 576 ± 163 |"]
  # Three of five seeds is not complete, though one block of the arm's (seeds 0-2) is.
  (folder / "summary.json").write_text(json.dumps({"aggregate": [
      record("adamw", [0, 1, 2]),
      record("sam", [0, 1, 2, 3, 4], sam_difference),
      record("fsam", [0, 1, 2])]}))
  assert [line.split(" |")[0] for line in
          readme.comparison_headline("stsb").splitlines()[2:]] == ["| SAM (ρ 0.01)",
                                                                  "| FSAM (ρ 0.01)"]
