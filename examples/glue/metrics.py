"""The official GLUE metrics, from scikit-learn and SciPy.

CoLA: Matthews correlation. STS-B: Pearson and Spearman correlation. MRPC and QQP: F1 of
the positive class and accuracy. Every other task: accuracy.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import scipy.stats
import sklearn.metrics

from examples.glue import data

METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": lambda predictions, labels: sklearn.metrics.accuracy_score(
        labels, predictions),
    "f1": lambda predictions, labels: sklearn.metrics.f1_score(labels, predictions),
    "matthews_corr": lambda predictions, labels: sklearn.metrics.matthews_corrcoef(
        labels, predictions),
    "pearson": lambda predictions, labels: scipy.stats.pearsonr(
        predictions, labels).statistic,
    "spearman": lambda predictions, labels: scipy.stats.spearmanr(
        predictions, labels).statistic,
}


def predictions_from_outputs(outputs: np.ndarray, is_regression: bool) -> np.ndarray:
  """Class predictions (argmax of the logits) or regression scores.

  Args:
    outputs: ``[n, num_labels]`` model outputs.
    is_regression: whether the single output is a score.

  Returns:
    ``[n]`` predicted label indices or scores.
  """
  return outputs[:, 0] if is_regression else np.argmax(outputs, axis=-1)


def compute(names: Sequence[str], predictions: np.ndarray,
            labels: np.ndarray) -> dict[str, float]:
  """Evaluates the named metrics.

  Args:
    names: keys of ``METRICS``, e.g. ``Task.metrics``.
    predictions: ``[n]`` predicted label indices or scores.
    labels: ``[n]`` true label indices or scores.

  Returns:
    ``{name: value}`` as Python floats.
  """
  predictions, labels = np.asarray(predictions), np.asarray(labels)
  return {name: float(METRICS[name](predictions, labels)) for name in names}


def evaluate(predict: Callable[[dict[str, np.ndarray]], np.ndarray],
             encoded: data.Encoded, task: data.Task, batch_size: int,
             pad_to_multiple_of: int = 32) -> dict[str, float]:
  """Scores a predictor on tokenized examples with the task's metrics.

  Args:
    predict: ``batch -> [batch, num_labels]`` model outputs, for batches of
      ``data.batches``.
    encoded: the evaluation examples.
    task: their task.
    batch_size: rows per batch.
    pad_to_multiple_of: as for ``data.batches``.

  Returns:
    ``{metric: value}`` over the real (unpadded) rows.
  """
  outputs, labels = [], []
  for batch in data.batches(encoded, batch_size, pad_to_multiple_of=pad_to_multiple_of):
    real = batch["example_mask"] > 0
    outputs.append(np.asarray(predict(batch))[real])
    labels.append(batch["labels"][real])
  predictions = predictions_from_outputs(np.concatenate(outputs), task.is_regression)
  return compute(task.metrics, predictions, np.concatenate(labels))
