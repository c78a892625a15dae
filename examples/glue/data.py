"""GLUE tasks: reading and validating, subsampling, tokenizing and length-bucketed batches.

Data comes from a local ``glue_data`` folder (the layout of ``download_glue_data.py``:
``<dir>/<Task>/{train,dev}.tsv``) or, when no folder is given, from the Hugging Face hub
copy ``nyu-mll/glue``. Labels are stored as indices into ``Task.labels``, whose order is
the hub's, so both sources agree; STS-B scores stay floats.
"""

from __future__ import annotations

import csv
import io
import dataclasses
import logging
import math
import pathlib
from typing import Iterator, Optional, Sequence

import numpy as np
import sklearn.model_selection
import transformers

HUB_DATASET = "nyu-mll/glue"
# Batches are cut from length-sorted chunks of this many batches.
BUCKET_CHUNK_BATCHES = 50
# Quantile bins that stand in for classes when a regression set is subsampled.
REGRESSION_STRATA = 5


class DataError(ValueError):
  """Input data that cannot be used: a missing file, a malformed row, a bad request."""


@dataclasses.dataclass(frozen=True)
class Task:
  """Where a GLUE task's data lives and how it is scored.

  Attributes:
    name: the command-line name, e.g. ``"rte"``.
    folder: its folder in ``glue_data``, e.g. ``"RTE"``.
    text_columns: the one or two text columns: header names, or indices for a file
      without a header.
    label_column: the label (or score) column, as a header name or index.
    labels: the label strings, in the hub's order; ``None`` for a regression task.
    metrics: the official metrics, names understood by ``metrics.compute``.
    hub_text_fields: the hub's text fields, matching ``text_columns``.
    has_header: whether the TSV files start with a header line.
    dev_file: stem of the evaluation file (``dev``, ``dev_matched``, ...).
    hub_config: the ``nyu-mll/glue`` configuration name, if not ``name``.
    hub_dev_split: the hub split that corresponds to ``dev_file``.
    score_range: the scores a regression task's labels may take.
  """

  name: str
  folder: str
  text_columns: tuple[str | int, ...]
  label_column: str | int
  labels: Optional[tuple[str, ...]]
  metrics: tuple[str, ...]
  hub_text_fields: tuple[str, ...]
  has_header: bool = True
  dev_file: str = "dev"
  hub_config: Optional[str] = None
  hub_dev_split: str = "validation"
  score_range: tuple[float, float] = (0.0, 5.0)

  @property
  def is_regression(self) -> bool:
    return self.labels is None

  @property
  def num_labels(self) -> int:
    return 1 if self.labels is None else len(self.labels)


_BINARY = ("0", "1")
_ENTAILMENT = ("entailment", "not_entailment")
_MNLI = ("entailment", "neutral", "contradiction")
_PAIR = ("sentence1", "sentence2")
TASKS: dict[str, Task] = {task.name: task for task in (
    Task("cola", "CoLA", (3,), 1, _BINARY, ("matthews_corr",), ("sentence",),
         has_header=False),
    Task("sst2", "SST-2", ("sentence",), "label", _BINARY, ("accuracy",), ("sentence",)),
    Task("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", _BINARY,
         ("f1", "accuracy"), _PAIR),
    Task("stsb", "STS-B", _PAIR, "score", None, ("pearson", "spearman"), _PAIR),
    Task("qqp", "QQP", ("question1", "question2"), "is_duplicate", _BINARY,
         ("f1", "accuracy"), ("question1", "question2")),
    Task("mnli", "MNLI", _PAIR, "gold_label", _MNLI, ("accuracy",),
         ("premise", "hypothesis"), dev_file="dev_matched",
         hub_dev_split="validation_matched"),
    Task("mnli-mm", "MNLI", _PAIR, "gold_label", _MNLI, ("accuracy",),
         ("premise", "hypothesis"), dev_file="dev_mismatched", hub_config="mnli",
         hub_dev_split="validation_mismatched"),
    Task("qnli", "QNLI", ("question", "sentence"), "label", _ENTAILMENT, ("accuracy",),
         ("question", "sentence")),
    Task("rte", "RTE", _PAIR, "label", _ENTAILMENT, ("accuracy",), _PAIR),
    Task("wnli", "WNLI", _PAIR, "label", _BINARY, ("accuracy",), _PAIR),
)}


def get_task(name: str) -> Task:
  """The task called ``name`` (case-insensitive; ``SST-2``/``STS-B`` spellings work).

  Raises:
    DataError: for an unknown name.
  """
  key = name.lower()
  key = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli"}.get(key, key)
  if key not in TASKS:
    raise DataError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
  return TASKS[key]


@dataclasses.dataclass(frozen=True)
class Split:
  """The examples of one split.

  Attributes:
    texts: per example, a tuple of one sentence or a sentence pair.
    labels: ``[n]`` label indices (int32), or scores (float32) for regression.
  """

  texts: list[tuple[str, ...]]
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.texts)

  def subset(self, indices: Sequence[int]) -> "Split":
    """The examples at ``indices``, in that order."""
    return Split([self.texts[i] for i in indices], self.labels[np.asarray(indices, int)])


def read_tsv(task: Task, path: str | pathlib.Path) -> Split:
  """Reads and validates one ``glue_data`` TSV file.

  Fields are tab-separated with no quoting (``csv.QUOTE_NONE``: GLUE sentences contain
  stray quote characters). A UTF-8 byte-order mark (MRPC has one) is ignored.

  Args:
    task: the task the file belongs to.
    path: the file.

  Returns:
    The examples.

  Raises:
    DataError: naming the path and line, if the header lacks a needed column, a row has
      the wrong number of fields, an empty text, or a label or score that is not valid.
  """
  path = pathlib.Path(path)
  texts, labels = [], []
  raw = path.read_bytes()
  try:
    content = raw.decode("utf-8-sig")
  except UnicodeDecodeError as error:
    line = raw.count(b"\n", 0, error.start) + 1
    raise DataError(f"{path}, line {line}: not UTF-8 text (byte 0x{raw[error.start]:02x})"
                    ) from None
  with io.StringIO(content, newline="") as file:
    reader = csv.reader(file, delimiter="\t", quoting=csv.QUOTE_NONE)
    columns = {}
    if task.has_header:
      header = next(reader, None) or []
      columns = {name: index for index, name in enumerate(header)}
      for column in task.text_columns + (task.label_column,):
        if column not in columns:
          raise DataError(f"{path}, line 1: expected a {task.folder} header with the "
                          f"column {column!r}, got {header!r}")
      width = len(header)
    else:
      width = 1 + max(task.text_columns + (task.label_column,))
    for row in reader:
      where = f"{path}, line {reader.line_num}"
      if len(row) != width:
        raise DataError(f"{where}: expected {width} tab-separated fields, got {len(row)}")
      text = tuple(row[columns.get(c, c)] for c in task.text_columns)
      if not all(t.strip() for t in text):
        raise DataError(f"{where}: expected non-empty text in the columns "
                        f"{list(task.text_columns)}")
      labels.append(_parse_label(task, row[columns.get(task.label_column,
                                                       task.label_column)], where))
      texts.append(text)
  if not texts:
    raise DataError(f"{path}: expected at least one example, found none")
  return Split(texts, np.asarray(labels, np.float32 if task.is_regression else np.int32))


def _parse_label(task: Task, value: str, where: str) -> int | float:
  if task.is_regression:
    low, high = task.score_range
    try:
      score = float(value)
    except ValueError:
      score = math.nan
    if not low <= score <= high:  # also false for NaN
      raise DataError(f"{where}: expected a score in [{low:g}, {high:g}] in column "
                      f"{task.label_column!r}, got {value!r}")
    return score
  if value not in task.labels:
    raise DataError(f"{where}: expected a label in {list(task.labels)} in column "
                    f"{task.label_column!r}, got {value!r}")
  return task.labels.index(value)


def load_split(task: Task, split: str, glue_dir: Optional[str | pathlib.Path]) -> Split:
  """Loads ``"train"`` or ``"dev"`` from a ``glue_data`` folder, or from the hub.

  Args:
    task: the task.
    split: ``"train"`` or ``"dev"``.
    glue_dir: the ``glue_data`` folder; ``None`` loads ``nyu-mll/glue`` from the hub.

  Returns:
    The examples.

  Raises:
    DataError: if the file is missing or malformed, or the hub cannot be reached.
  """
  if glue_dir is None:
    return _load_from_hub(task, split)
  stem = "train" if split == "train" else task.dev_file
  path = pathlib.Path(glue_dir) / task.folder / f"{stem}.tsv"
  if not path.is_file():
    if not pathlib.Path(glue_dir).is_dir():
      raise DataError(f"GLUE folder {glue_dir} does not exist")
    raise DataError(f"{path} not found (this GLUE copy has no {split} split of "
                    f"{task.folder})")
  return read_tsv(task, path)


def _load_from_hub(task: Task, split: str) -> Split:
  hub_split = "train" if split == "train" else task.hub_dev_split
  # The hub client logs every retry of an unreachable server; the error below says it once.
  hub_logger = logging.getLogger("huggingface_hub")
  level = hub_logger.level
  hub_logger.setLevel(logging.ERROR)
  try:
    # Imported here: a machine with local GLUE folders (an offline accelerator) needs no
    # hub client.
    import datasets  # pylint: disable=g-import-not-at-top
    dataset = datasets.load_dataset(HUB_DATASET, task.hub_config or task.name,
                                    split=hub_split)
  except Exception as error:  # Offline, unreachable, missing cache: all mean the same.
    reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
    raise DataError(f"no GLUE folder given (--glue-dir or GLUE_DIR) and {HUB_DATASET} "
                    f"could not be loaded from the Hugging Face hub: {reason}") from None
  finally:
    hub_logger.setLevel(level)
  texts = list(zip(*(dataset[field] for field in task.hub_text_fields)))
  labels = np.asarray(dataset["label"], np.float32 if task.is_regression else np.int32)
  return Split(texts, labels)


def stratified_subsample(split: Split, size: Optional[int], seed: int,
                         is_regression: bool) -> Split:
  """A seeded subsample of ``size`` examples with the label proportions of ``split``.

  Regression scores are stratified by quantile bins.

  Args:
    split: the examples.
    size: how many to keep; ``None`` or at least ``len(split)`` keeps them all.
    seed: seeds the choice.
    is_regression: whether labels are scores.

  Returns:
    The subsample, in the original order.

  Raises:
    DataError: if ``size`` is too small to hold every class.
  """
  if size is None or size >= len(split):
    return split
  strata = split.labels
  if is_regression:
    edges = np.quantile(strata, np.linspace(0, 1, REGRESSION_STRATA + 1)[1:-1])
    strata = np.digitize(strata, edges)
  try:
    chosen, _ = sklearn.model_selection.train_test_split(
        np.arange(len(split)), train_size=size, stratify=strata, random_state=seed)
  except ValueError as error:
    raise DataError(f"cannot draw a stratified subsample of {size}: {error}") from None
  return split.subset(np.sort(chosen))


@dataclasses.dataclass(frozen=True)
class Encoded:
  """Tokenized examples.

  Attributes:
    input_ids: per example, its token ids.
    token_type_ids: per example, its segment ids.
    labels: ``[n]`` label indices or scores.
    pad_token_id: the tokenizer's padding id.
  """

  input_ids: list[np.ndarray]
  token_type_ids: list[np.ndarray]
  labels: np.ndarray
  pad_token_id: int

  def __len__(self) -> int:
    return len(self.input_ids)

  @property
  def lengths(self) -> np.ndarray:
    """``[n]`` token counts."""
    return np.asarray([len(ids) for ids in self.input_ids])


def encode(split: Split, tokenizer: transformers.PreTrainedTokenizerBase,
           max_length: int) -> Encoded:
  """Tokenizes sentences or sentence pairs, truncating to ``max_length`` tokens.

  Args:
    split: the examples.
    tokenizer: a Hugging Face tokenizer.
    max_length: the longest token sequence kept (longest-first truncation of pairs).

  Returns:
    The token ids and segment ids of every example.
  """
  columns = list(zip(*split.texts))
  tokens = tokenizer(list(columns[0]), list(columns[1]) if len(columns) > 1 else None,
                     truncation=True, max_length=max_length, return_token_type_ids=True)
  return Encoded(
      input_ids=[np.asarray(ids, np.int32) for ids in tokens["input_ids"]],
      token_type_ids=[np.asarray(ids, np.int32) for ids in tokens["token_type_ids"]],
      labels=split.labels, pad_token_id=tokenizer.pad_token_id)


def num_batches(num_examples: int, batch_size: int) -> int:
  """Batches per pass over ``num_examples`` (the last one may be padded)."""
  return -(-num_examples // batch_size)


def batches(encoded: Encoded, batch_size: int, *, seed: Optional[int] = None,
            epoch: int = 0, pad_to_multiple_of: int = 32
            ) -> Iterator[dict[str, np.ndarray]]:
  """Padded batches of similar-length examples.

  With a ``seed`` (training), the order is a function of ``(seed, epoch)`` only: the
  examples are shuffled, cut into chunks of ``BUCKET_CHUNK_BATCHES`` batches, sorted by
  length within each chunk and batched, and the batches are shuffled. Without one
  (evaluation), examples are batched in length order. Sequences are padded to a multiple
  of ``pad_to_multiple_of`` and the last batch is filled up to ``batch_size`` with rows
  whose ``example_mask`` is 0, so a jitted step sees only a few shapes.

  Args:
    encoded: tokenized examples.
    batch_size: rows per batch.
    seed: shuffles the order (training); ``None`` for a fixed order.
    epoch: selects the epoch's order.
    pad_to_multiple_of: sequence lengths are rounded up to a multiple of this.

  Yields:
    Dicts of ``input_ids``, ``token_type_ids``, ``attention_mask`` (``[batch, length]``
    int32), ``labels`` and ``example_mask`` (``[batch]``, float32: 1 real, 0 padding).
  """
  lengths = encoded.lengths
  if seed is None:
    groups = np.array_split(np.argsort(lengths, kind="stable"),
                            num_batches(len(encoded), batch_size))
  else:
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(encoded))
    groups = []
    for start in range(0, len(order), batch_size * BUCKET_CHUNK_BATCHES):
      chunk = order[start:start + batch_size * BUCKET_CHUNK_BATCHES]
      chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
      groups += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    groups = [groups[i] for i in rng.permutation(len(groups))]
  for group in groups:
    yield _pad_batch(encoded, group, batch_size, pad_to_multiple_of)


def _pad_batch(encoded: Encoded, indices: np.ndarray, batch_size: int,
               pad_to_multiple_of: int) -> dict[str, np.ndarray]:
  longest = max(len(encoded.input_ids[i]) for i in indices)
  length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
  input_ids = np.full((batch_size, length), encoded.pad_token_id, np.int32)
  token_type_ids = np.zeros((batch_size, length), np.int32)
  attention_mask = np.zeros((batch_size, length), np.int32)
  for row, index in enumerate(indices):
    size = len(encoded.input_ids[index])
    input_ids[row, :size] = encoded.input_ids[index]
    token_type_ids[row, :size] = encoded.token_type_ids[index]
    attention_mask[row, :size] = 1
  labels = np.zeros(batch_size, encoded.labels.dtype)
  labels[:len(indices)] = encoded.labels[indices]
  example_mask = np.zeros(batch_size, np.float32)
  example_mask[:len(indices)] = 1.0
  return {"input_ids": input_ids, "token_type_ids": token_type_ids,
          "attention_mask": attention_mask, "labels": labels,
          "example_mask": example_mask}
