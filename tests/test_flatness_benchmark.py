"""benchmarks/flatness.py on the embedded checkpoint: the measured loss is the batch's."""

import os
import pathlib

import jax
import numpy as np
import pytest

from benchmarks import flatness
from examples.glue import data
from examples.glue import model as model_lib
from examples.glue import pretrained
from examples.glue import train

GLUE_DIR = pathlib.Path(os.environ.get("GLUE_DIR", pathlib.Path(__file__).resolve()
                                       .parents[2] / "shared" / "glue"))


@pytest.mark.skipif(not GLUE_DIR.is_dir(), reason=f"GLUE data not found at {GLUE_DIR}")
@pytest.mark.parametrize("micro_batch", [4, 0])
def test_measure_reports_the_mean_loss_of_the_fixed_examples(micro_batch):
  task = data.get_task("stsb")
  folder = pretrained.default_model_dir()
  model_params = pretrained.load_pretrained(folder, task.num_labels)
  model = model_lib.SequenceClassifier(model_params.config, task.num_labels)
  batch = flatness.measurement_batch(
      task, pretrained.load_tokenizer(folder), glue_dir=str(GLUE_DIR), train_size=1000,
      data_seed=0, examples=6, max_length=32, micro_batch=4)
  result = flatness.measure(model_params.params, model, batch, is_regression=True,
                            micro_batch=micro_batch, rho=0.01, iterations=2)
  rows = [{k: v[i] for k, v in batch.items() if k != "example_mask"}
          for i in np.flatnonzero(batch["example_mask"])]
  expected = np.mean([float(train.example_loss(model_params.params, jax.tree.map(
      np.asarray, row), model=model, is_regression=True, deterministic=True))
                      for row in rows])
  assert result["examples"] == len(rows) == 6
  np.testing.assert_allclose(result["train_loss"], expected, rtol=1e-5)
  assert result["sharpness"] > 0 and result["top_eigenvalue"] > 0
