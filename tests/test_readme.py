"""The README's promises: its snippets run as written, its layout names real paths."""

import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from examples import quickstart

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


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
