"""Every third-party import is declared in pyproject.toml, so a fresh install has it."""

import ast
import importlib.metadata
import pathlib
import re
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
CORE = ("optax_sam",)
EVERYTHING = ("optax_sam", "examples", "benchmarks", "tests", "scripts")
# Import names whose distribution is named otherwise, for modules not installed here.
DISTRIBUTION_OF = {"sklearn": "scikit-learn", "yaml": "pyyaml",
                   "orbax": "orbax-checkpoint"}


def _normalise(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
  return _normalise(re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0])


def _third_party_imports(folders) -> dict[str, list[str]]:
  """Top-level module -> the places that import it, for modules outside the project."""
  local = {path.name for path in ROOT.iterdir() if path.is_dir()}
  found: dict[str, list[str]] = {}
  for folder in folders:
    for path in sorted((ROOT / folder).rglob("*.py")):
      for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
          names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
          names = [node.module]
        else:
          continue
        for name in names:
          top = name.split(".")[0]
          if top not in sys.stdlib_module_names and top not in local | {"__future__"}:
            found.setdefault(top, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
  return found


def _undeclared(folders, declared: set[str]) -> dict[str, list[str]]:
  installed = importlib.metadata.packages_distributions()
  undeclared = {}
  for module, places in _third_party_imports(folders).items():
    distributions = {_normalise(d) for d in installed.get(module, ())}
    distributions = distributions or {_normalise(DISTRIBUTION_OF.get(module, module))}
    if not distributions & declared:
      undeclared[module] = places
  return undeclared


def test_every_import_is_declared_in_some_extra():
  declared = {_requirement_name(r) for group in [PROJECT["dependencies"],
                                                 *PROJECT["optional-dependencies"].values()]
              for r in group}
  assert _undeclared(EVERYTHING, declared) == {}


def test_the_library_imports_only_its_core_dependencies():
  core = {_requirement_name(r) for r in PROJECT["dependencies"]}
  assert core == {"jax", "optax"}
  assert _undeclared(CORE, core) == {}


def test_the_check_finds_an_undeclared_import(tmp_path, monkeypatch):
  # The check itself can fail: scikit-learn, imported by the example, is not core.
  declared = {_requirement_name(r) for r in PROJECT["dependencies"]}
  assert "sklearn" in _undeclared(["examples"], declared)
