"""GLUE reading, validation, subsampling, batching and metrics, on the real TSV files."""

import math
import os
import pathlib

import numpy as np
import pytest

from examples.glue import data
from examples.glue import metrics
from examples.glue import pretrained

GLUE_DIR = pathlib.Path(os.environ.get(
    "GLUE_DIR", pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "glue"))
needs_glue = pytest.mark.skipif(not GLUE_DIR.is_dir(),
                                reason=f"GLUE data not found at {GLUE_DIR} (set GLUE_DIR)")


@pytest.fixture(scope="module")
def tokenizer():
  return pretrained.load_tokenizer(pretrained.default_model_dir())


# First dev row of each task family, read by eye from the files.
FIRST_DEV_ROWS = {
    "cola": (("The sailors rode the breeze clear of the rocks.",), 1),
    "sst2": (("it 's a charming and often affecting journey . ",), 1),
    "mrpc": (("He said the foodservice pie business doesn't fit the company's long-term "
              "growth strategy.",
              '"The foodservice pie business does not fit our long-term growth strategy.'),
             1),
    "rte": (("Dana Reeve, the widow of the actor Christopher Reeve, has died of lung "
             "cancer at age 44, according to the Christopher Reeve Foundation.",
             "Christopher Reeve had an accident."), 1),
    "stsb": (("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing."),
             5.0),
}


def _rank(values):
  """Ranks from 1, ties sharing their average rank."""
  values = list(values)
  ordered = sorted(values)
  return [sum(i + 1 for i, v in enumerate(ordered) if v == x) / ordered.count(x)
          for x in values]


def _pearson(x, y):
  x, y = np.asarray(x, float), np.asarray(y, float)
  dx, dy = x - x.mean(), y - y.mean()
  return float((dx * dy).sum() / math.sqrt((dx * dx).sum() * (dy * dy).sum()))


def _by_hand(metric, predictions, labels):
  pairs = list(zip(predictions, labels))
  tp = sum(p == 1 and l == 1 for p, l in pairs)
  tn = sum(p == 0 and l == 0 for p, l in pairs)
  fp = sum(p == 1 and l == 0 for p, l in pairs)
  fn = sum(p == 0 and l == 1 for p, l in pairs)
  if metric == "accuracy":
    return sum(p == l for p, l in pairs) / len(pairs)
  if metric == "f1":
    return 2 * tp / (2 * tp + fp + fn)
  if metric == "matthews_corr":
    return (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
  if metric == "pearson":
    return _pearson(predictions, labels)
  if metric == "spearman":
    return _pearson(_rank(predictions), _rank(labels))
  raise AssertionError(metric)


def _token_score(input_ids, attention_mask):
  """A deterministic stand-in for a model: a number that varies from example to example."""
  return (np.asarray(input_ids) * np.asarray(attention_mask)).sum(-1) % 1009


@needs_glue
@pytest.mark.parametrize("task_name", ["cola", "sst2", "mrpc", "rte", "stsb"])
def test_real_rows_tokenize_batch_and_score_like_a_hand_computation(task_name, tokenizer):
  task = data.get_task(task_name)
  dev = data.load_split(task, "dev", GLUE_DIR)
  assert (dev.texts[0], dev.labels[0]) == FIRST_DEV_ROWS[task_name]
  rows = dev.subset(range(12))
  encoded = data.encode(rows, tokenizer, max_length=128)

  def predict(batch):
    score = _token_score(batch["input_ids"], batch["attention_mask"])
    if task.is_regression:
      return (score / 200.0)[:, None]
    return np.eye(task.num_labels)[score % task.num_labels]

  # Batches of 5 (the last one padded), in length order: predictions must stay with
  # their labels.
  got = metrics.evaluate(predict, encoded, task, batch_size=5)
  predictions = []
  for text in rows.texts:
    tokens = tokenizer(*text)
    score = _token_score(tokens["input_ids"], tokens["attention_mask"])
    predictions.append(score / 200.0 if task.is_regression else score % task.num_labels)
  expected = {m: _by_hand(m, predictions, rows.labels.tolist()) for m in task.metrics}
  assert set(got) == set(task.metrics)
  for metric in task.metrics:
    assert got[metric] == pytest.approx(expected[metric], abs=1e-9)
  if not task.is_regression:  # The stand-in is neither always right nor always wrong.
    assert 0 < expected.get("accuracy", 0.5) < 1


@needs_glue
def test_every_local_file_reads_with_the_published_counts():
  counts = {("cola", "train"): (8551, [2528, 6023]), ("sst2", "dev"): (872, [428, 444]),
            ("mrpc", "train"): (3668, [1194, 2474]), ("rte", "train"): (2490, [1249, 1241]),
            ("wnli", "train"): (635, [323, 312]), ("qnli", "dev"): (5463, [2702, 2761])}
  for (name, split), (size, per_label) in counts.items():
    loaded = data.load_split(data.get_task(name), split, GLUE_DIR)
    assert len(loaded) == size
    assert np.bincount(loaded.labels).tolist() == per_label
  scores = data.load_split(data.get_task("stsb"), "train", GLUE_DIR).labels
  assert len(scores) == 5749 and scores.min() == 0.0 and scores.max() == 5.0


@needs_glue
def test_missing_training_split_is_explained():
  with pytest.raises(data.DataError, match=r"QNLI/train.tsv not found .*no train split"):
    data.load_split(data.get_task("qnli"), "train", GLUE_DIR)


def _write(folder, task_folder, text, name="train.tsv"):
  (folder / task_folder).mkdir(parents=True, exist_ok=True)
  (folder / task_folder / name).write_text(text, encoding="utf-8")


@pytest.mark.parametrize("task_name, folder, text, message", [
    ("rte", "RTE", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\n",
     r"RTE/train.tsv, line 3: expected 4 tab-separated fields, got 3"),
    ("rte", "RTE", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n",
     r"line 2: expected a label in \['entailment', 'not_entailment'\].*got 'maybe'"),
    ("rte", "RTE", "index\tpremise\thypothesis\tlabel\n0\ta\tb\tentailment\n",
     r"line 1: expected a RTE header with the column 'sentence1'"),
    ("stsb", "STS-B", "\t".join(["c"] * 7 + ["sentence1", "sentence2", "score"]) + "\n"
     + "\t".join(["x"] * 9 + ["high"]) + "\n",
     r"line 2: expected a score in \[0, 5\] in column 'score', got 'high'"),
    *[("stsb", "STS-B", "\t".join(["c"] * 7 + ["sentence1", "sentence2", "score"]) + "\n"
       + "\t".join(["x"] * 9 + ["4.0"]) + "\n" + "\t".join(["x"] * 9 + [score]) + "\n",
       rf"STS-B/train.tsv, line 3: expected a score in \[0, 5\] in column 'score', "
       rf"got '{score}'") for score in ("nan", "NaN", "inf", "5.2", "-0.5", "1e9")],
    ("cola", "CoLA", "gj04\t1\t\tFine.\ngj04\t0\t*\t\n",
     r"CoLA/train.tsv, line 2: expected non-empty text"),
])
def test_malformed_files_name_path_line_and_expectation(tmp_path, task_name, folder, text,
                                                        message):
  _write(tmp_path, folder, text)
  with pytest.raises(data.DataError, match=message):
    data.load_split(data.get_task(task_name), "train", tmp_path)


def test_a_byte_that_is_not_utf8_names_the_file_and_line(tmp_path):
  (tmp_path / "RTE").mkdir()
  (tmp_path / "RTE" / "train.tsv").write_bytes(
      b"index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n"
      b"1\tcaf\xe9\tb\tentailment\n")
  with pytest.raises(data.DataError, match=r"RTE/train.tsv, line 3: not UTF-8 text "
                                           r"\(byte 0xe9\)"):
    data.load_split(data.get_task("rte"), "train", tmp_path)


def test_byte_order_mark_and_stray_quotes_are_read_as_text(tmp_path):
  _write(tmp_path, "MRPC", "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
         '1\t1\t2\tHe said "hi.\tShe said "bye"\n')
  split = data.load_split(data.get_task("mrpc"), "train", tmp_path)
  assert split.texts == [('He said "hi.', 'She said "bye"')]
  assert split.labels.tolist() == [1]


def test_unknown_task_and_aliases():
  assert data.get_task("SST-2") is data.TASKS["sst2"]
  assert data.get_task("STS-B").is_regression
  assert data.get_task("mnli-mm").dev_file == "dev_mismatched"
  with pytest.raises(data.DataError, match="unknown task 'squad'; choose one of cola"):
    data.get_task("squad")


def test_without_a_folder_offline_the_hub_error_is_one_clear_line(monkeypatch):
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(data.DataError) as error:
    data.load_split(data.get_task("rte"), "dev", None)
  assert "no GLUE folder given (--glue-dir or GLUE_DIR)" in str(error.value)
  assert "\n" not in str(error.value)


def _toy_split(labels):
  return data.Split([(f"example {i}",) for i in range(len(labels))], np.asarray(labels))


def test_stratified_subsample_keeps_label_proportions_and_depends_on_the_seed():
  split = _toy_split(np.array([0] * 300 + [1] * 100, np.int32))
  first = data.stratified_subsample(split, 40, seed=0, is_regression=False)
  assert np.bincount(first.labels).tolist() == [30, 10]
  again = data.stratified_subsample(split, 40, seed=0, is_regression=False)
  other = data.stratified_subsample(split, 40, seed=1, is_regression=False)
  assert first.texts == again.texts and first.texts != other.texts
  assert data.stratified_subsample(split, 1000, seed=0, is_regression=False) is split
  with pytest.raises(data.DataError, match="cannot draw a stratified subsample of 1"):
    data.stratified_subsample(split, 1, seed=0, is_regression=False)


def test_regression_subsample_is_stratified_by_score_quantiles():
  scores = np.linspace(0.0, 5.0, 500).astype(np.float32)
  chosen = data.stratified_subsample(_toy_split(scores), 50, seed=0, is_regression=True)
  counts = np.histogram(chosen.labels, bins=np.quantile(scores, np.linspace(0, 1, 6)))[0]
  assert counts.tolist() == [10] * 5


def _toy_encoded(lengths):
  return data.Encoded(
      input_ids=[np.arange(1, n + 1, dtype=np.int32) + 100 * i for i, n in
                 enumerate(lengths)],
      token_type_ids=[np.zeros(n, np.int32) for n in lengths],
      labels=np.arange(len(lengths), dtype=np.int32), pad_token_id=0)


def test_training_batches_cover_every_example_once_in_an_order_fixed_by_seed_and_epoch():
  rng = np.random.default_rng(0)
  encoded = _toy_encoded(rng.integers(3, 70, size=203))
  order = lambda **kw: np.concatenate(
      [b["labels"][b["example_mask"] > 0] for b in data.batches(encoded, 8, **kw)])
  epoch0 = order(seed=1, epoch=0)
  assert sorted(epoch0.tolist()) == list(range(203))
  np.testing.assert_array_equal(epoch0, order(seed=1, epoch=0))
  assert not np.array_equal(epoch0, order(seed=1, epoch=1))
  assert not np.array_equal(epoch0, order(seed=2, epoch=0))
  assert len(list(data.batches(encoded, 8, seed=1))) == data.num_batches(203, 8) == 26


def test_batches_are_padded_to_fixed_shapes_with_masks():
  encoded = _toy_encoded([5, 40, 3, 33, 7])
  shapes = set()
  for batch in data.batches(encoded, 4, seed=0, pad_to_multiple_of=32):
    shapes.add(batch["input_ids"].shape)
    real = batch["example_mask"] > 0
    for row in np.flatnonzero(real):
      index = batch["labels"][row]
      size = len(encoded.input_ids[index])
      np.testing.assert_array_equal(batch["input_ids"][row, :size],
                                    encoded.input_ids[index])
      assert batch["attention_mask"][row].tolist() == [1] * size + [0] * (
          batch["input_ids"].shape[1] - size)
    assert not batch["attention_mask"][~real].any()
  assert shapes <= {(4, 32), (4, 64)}
  eval_lengths = [b["attention_mask"].sum(1).max() for b in data.batches(encoded, 2)]
  assert eval_lengths == sorted(eval_lengths)  # Evaluation batches go in length order.
