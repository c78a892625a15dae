"""``python -m examples.glue.train`` under bad input: nothing lost, nothing silently wrong.

Each kind of bad input ends in exit status 2 with one ``error:`` line naming the culprit,
or in a correct result.
"""

import json
import os
import pathlib
import shutil
import stat
import subprocess
import sys

import jax
import numpy as np
import pytest

from examples.glue import train
from tests.test_glue_train import GLUE_DIR, REPO, _argv, _final_params, needs_glue
from tests.test_glue_train import tiny_model  # pylint: disable=unused-import  # A fixture.

pytestmark = needs_glue


def _status_and_error(argv, capsys):
  """Runs the command in-process; returns its exit status and what it wrote to stderr."""
  capsys.readouterr()
  try:
    status = train.main(argv)
  except SystemExit as exit_:  # argparse's own errors.
    status = exit_.code
  return status, capsys.readouterr().err


def _assert_one_error(status, error, *fragments):
  assert status == 2, error
  assert error.startswith("error: ") and error.count("\n") == 1, error
  for fragment in fragments:
    assert fragment in error, error


def _log(folder):
  return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


# Kind 1: another run's result, reported as this one's.


def test_a_fresh_run_refuses_a_folder_holding_another_run(tiny_model, tmp_path, capsys):
  assert train.main(_argv(tiny_model, tmp_path)) == 0
  before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
  status, error = _status_and_error(_argv(tiny_model, tmp_path, "--seed", "1"), capsys)
  _assert_one_error(status, error, f"--output-dir {tmp_path} holds another run",
                    "--resume", "--overwrite")
  assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
  assert train.main(_argv(tiny_model, tmp_path, "--seed", "1", "--overwrite")) == 0
  assert sum(r["event"] == "final" for r in _log(tmp_path)) == 1


def test_an_interrupted_overwrite_never_resumes_the_old_runs_state(tiny_model, tmp_path,
                                                                   monkeypatch):
  # The scenario of the issue: a finished run A; a new run B in the same folder is
  # interrupted before its first checkpoint; `--resume` must continue B, not report A.
  flags = ("--epochs", "2", "--max-steps", "99")
  assert train.main(_argv(tiny_model, tmp_path / "a", *flags, "--stop-after-epoch", "1")
                    ) == 0  # A's checkpoint exists; A's state is what must not come back.
  assert train.main(_argv(tiny_model, tmp_path / "a", *flags, "--resume")) == 0
  b_flags = (*flags, "--seed", "3")
  assert train.main(_argv(tiny_model, tmp_path / "b", *b_flags)) == 0  # B uninterrupted.

  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt

  with monkeypatch.context() as patch:
    patch.setattr(train.checkpoints_lib.Checkpoints, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
      train.main(_argv(tiny_model, tmp_path / "a", *b_flags, "--overwrite"))
  assert train.checkpoints_lib.latest_epoch(tmp_path / "a" / train.CHECKPOINT_FILE) is None
  assert train.main(_argv(tiny_model, tmp_path / "a", *b_flags, "--resume")) == 0
  assert _log(tmp_path / "a")[0]["event"] == "start"
  assert [r["step"] for r in _log(tmp_path / "a") if r["event"] == "train"] == list(
      range(1, 7))
  jax.tree.map(np.testing.assert_array_equal, _final_params(tmp_path / "a"),
               _final_params(tmp_path / "b"))


def test_resuming_a_finished_run_reports_it_without_training_again(tiny_model, tmp_path,
                                                                    capsys, monkeypatch):
  assert train.main(_argv(tiny_model, tmp_path)) == 0
  final = _log(tmp_path)[-1]
  monkeypatch.setattr(train, "make_train_step", None)  # Training again would fail.
  capsys.readouterr()
  assert train.main(_argv(tiny_model, tmp_path, "--resume")) == 0
  assert capsys.readouterr().out.startswith(f"already finished: {tmp_path}, dev accuracy=")
  assert _log(tmp_path)[-1] == final
  status, error = _status_and_error(_argv(tiny_model, tmp_path, "--resume", "--lr", "1"),
                                    capsys)
  _assert_one_error(status, error, "different settings", "lr: 0.001 -> 1.0")


# Kind 2: non-finite or out-of-range numbers, and a run that diverges.


@pytest.mark.parametrize("flag, value, expected", [
    ("--lr", "nan", "argument --lr: expected a finite number, got 'nan'"),
    ("--lr", "0", "argument --lr: expected a number in (0, inf), got '0'"),
    ("--lr", "-1e-4", "argument --lr: expected a number in (0, inf), got '-1e-4'"),
    ("--rho", "inf", "argument --rho: expected a finite number, got 'inf'"),
    ("--rho", "-0.1", "--method sam: rho must be in"),
    ("--weight-decay", "-inf", "argument --weight-decay: expected a finite number"),
    ("--warmup-ratio", "1", "argument --warmup-ratio: expected a number in [0, 1)"),
    ("--max-grad-norm", "nan", "argument --max-grad-norm: expected a finite number"),
    ("--dropout", "1.5", "argument --dropout: expected a number in [0, 1), got '1.5'"),
    ("--keep-ratio", "NaN", "argument --keep-ratio: expected a finite number"),
])
def test_non_finite_or_out_of_range_numbers_are_refused(flag, value, expected, tiny_model,
                                                         tmp_path, capsys):
  method = "fsam" if flag == "--keep-ratio" else "sam"
  # `--flag=value`: argparse reads a lone "-inf" or "-1e-4" as an option of its own.
  status, error = _status_and_error(
      _argv(tiny_model, tmp_path, "--method", method, f"{flag}={value}"), capsys)
  _assert_one_error(status, error, expected)
  assert not (tmp_path / "log.jsonl").exists()


def _poison_from_step(monkeypatch, first_bad_step):
  """Makes every training step from ``first_bad_step`` on produce NaN parameters."""
  make = train.make_train_step

  def poisoned(*args, **kwargs):
    step_fn = make(*args, **kwargs)

    def step(state, batch):
      state, loss = step_fn(state, batch)
      bad = state.step >= first_bad_step
      params = jax.tree.map(lambda p: jax.numpy.where(bad, np.nan, p), state.params)
      return state._replace(params=params), loss

    return step

  monkeypatch.setattr(train, "make_train_step", poisoned)


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(tiny_model, tmp_path,
                                                                  capsys, monkeypatch):
  flags = ("--epochs", "2", "--max-steps", "99", "--log-every", "2")
  assert train.main(_argv(tiny_model, tmp_path / "whole", *flags)) == 0
  with monkeypatch.context() as patch:
    _poison_from_step(patch, 4)  # Epoch 2's first step; the loss is NaN from step 5.
    status, error = _status_and_error(_argv(tiny_model, tmp_path / "run", *flags), capsys)
  _assert_one_error(status, error, "the training loss (nan) became non-finite by step 5",
                    "the checkpoint of epoch 1 is kept")
  assert not (tmp_path / "run" / "model").exists()
  # Within the first epoch there is nothing to keep, and the parameters are checked
  # before any checkpoint, also when no loss record comes before it.
  with monkeypatch.context() as patch:
    _poison_from_step(patch, 3)
    status, error = _status_and_error(
        _argv(tiny_model, tmp_path / "first", *flags[:4], "--log-every", "10"), capsys)
  _assert_one_error(status, error, "the parameters became non-finite by step 3",
                    "no epoch had finished, so there is no checkpoint")
  # The kept checkpoint is good: resuming it ends where the uninterrupted run did.
  assert train.main(_argv(tiny_model, tmp_path / "run", *flags, "--resume")) == 0
  jax.tree.map(np.testing.assert_array_equal, _final_params(tmp_path / "whole"),
               _final_params(tmp_path / "run"))


def test_more_training_examples_than_the_task_has_is_refused(tiny_model, tmp_path, capsys):
  status, error = _status_and_error(_argv(tiny_model, tmp_path, "--train-size", "700"),
                                    capsys)
  _assert_one_error(status, error, "--train-size 700 exceeds the 635 training examples "
                    "of wnli")


# Kind 4: an unusable output folder or checkpoint.


def test_an_output_dir_that_cannot_hold_a_run_is_refused(tiny_model, tmp_path, capsys):
  a_file = tmp_path / "a_file"
  a_file.write_text("mine\n")
  for output_dir in (a_file, a_file / "below"):
    status, error = _status_and_error(_argv(tiny_model, output_dir), capsys)
    _assert_one_error(status, error, f"--output-dir {output_dir}: cannot write there")
  assert a_file.read_text() == "mine\n"


def _interrupted_run(tiny_model, folder):
  flags = ("--epochs", "2", "--max-steps", "99")
  assert train.main(_argv(tiny_model, folder, *flags, "--stop-after-epoch", "1")) == 0
  return _argv(tiny_model, folder, *flags, "--resume")


def _halve_every_file(checkpoint_epoch):
  for path in (p for p in checkpoint_epoch.rglob("*") if p.is_file()):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _lose_array_files(checkpoint_epoch):
  """Deletes the files holding the arrays' bytes, keeping the small metadata files, as an
  interrupted copy of the folder does."""
  data = [p for p in (checkpoint_epoch / "state").rglob("*")
          if p.is_file() and p.parent.name == "d"]
  assert data
  for path in data:
    path.unlink()


@pytest.mark.parametrize("damage, expected", [
    (_halve_every_file, ()),
    (_lose_array_files, ("is damaged",)),
])
def test_resume_with_a_corrupt_checkpoint_is_refused(damage, expected, tiny_model, tmp_path,
                                                     capsys):
  resume = _interrupted_run(tiny_model, tmp_path)
  checkpoint = tmp_path / train.CHECKPOINT_FILE
  damage(checkpoint / "1")
  status, error = _status_and_error(resume, capsys)
  _assert_one_error(status, error, "cannot resume from", str(checkpoint / "1"), *expected,
                    "--overwrite")


def test_a_damaged_last_checkpoint_is_passed_over_for_the_one_before(tiny_model, tmp_path,
                                                                     capsys):
  flags = ("--epochs", "3", "--max-steps", "99")
  assert train.main(_argv(tiny_model, tmp_path / "whole", *flags)) == 0
  folder = tmp_path / "run"
  assert train.main(_argv(tiny_model, folder, *flags, "--stop-after-epoch", "2")) == 0
  checkpoints = folder / train.CHECKPOINT_FILE
  _lose_array_files(checkpoints / "2")
  capsys.readouterr()
  resume = _argv(tiny_model, folder, *flags, "--resume")
  assert train.main([*resume, "--stop-after-epoch", "2"]) == 0
  captured = capsys.readouterr()
  assert f"warning: the checkpoint {checkpoints / '2'} is damaged" in captured.err
  assert "after epoch 1" in captured.out
  # Epoch 2 is trained again from epoch 1's checkpoint and checkpointed anew.
  assert train.checkpoints_lib.latest_epoch(checkpoints) == 2
  assert train.main(resume) == 0
  assert "warning" not in capsys.readouterr().err
  assert [r["epoch"] for r in _log(folder) if r["event"] == "eval"] == [1, 2, 3]
  jax.tree.map(np.testing.assert_array_equal, _final_params(tmp_path / "whole"),
               _final_params(folder))


@pytest.mark.parametrize("damage, expected", [
    ("delete_settings", "settings"),
    ("half_write_settings", "settings"),
    ("delete_log", "log.jsonl"),
    ("corrupt_log_line", "log.jsonl, line 2 is not JSON"),
])
def test_resume_with_damaged_settings_or_log_is_refused(damage, expected, tiny_model,
                                                        tmp_path, capsys):
  resume = _interrupted_run(tiny_model, tmp_path)
  # The settings checked on resume are those saved inside the checkpoint, with the state.
  settings = tmp_path / train.CHECKPOINT_FILE / "1" / "settings"
  log = tmp_path / train.LOG_FILE
  if damage == "delete_settings":
    shutil.rmtree(settings)
  elif damage == "half_write_settings":
    for path in settings.rglob("*"):
      if path.is_file():
        path.write_text(path.read_text()[:40])
  elif damage == "delete_log":
    log.unlink()
  else:
    lines = log.read_text().splitlines(keepends=True)
    log.write_text(lines[0] + lines[1][:10] + "\n" + "".join(lines[2:]))
  status, error = _status_and_error(resume, capsys)
  _assert_one_error(status, error, "cannot resume", expected)


def test_a_half_written_last_log_line_is_dropped_on_resume(tiny_model, tmp_path):
  resume = _interrupted_run(tiny_model, tmp_path)
  with open(tmp_path / train.LOG_FILE, "a", encoding="utf-8") as log:
    log.write('{"event": "train", "ep')  # Interrupted mid-write.
  assert train.main(resume) == 0
  assert _log(tmp_path)[-1]["event"] == "final"


# Kind 5: disk and hygiene, seen as a user sees them: a subprocess, stderr to a file.


def test_a_finished_run_writes_strict_json_plain_stderr_and_ordinary_file_modes(
    tiny_model, tmp_path):
  stderr_path = tmp_path / "stderr.txt"
  with open(stderr_path, "wb") as stderr:
    result = subprocess.run(
        [sys.executable, "-m", "examples.glue.train",
         *_argv(tiny_model, tmp_path / "run", task="stsb")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, timeout=600, check=False)
  assert result.returncode == 0, stderr_path.read_text()
  assert b"\r" not in stderr_path.read_bytes()

  def refuse(constant):
    raise ValueError(f"not JSON: {constant}")

  for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines():
    json.loads(line, parse_constant=refuse)
  model = tmp_path / "run" / "model"
  modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in model.iterdir()}
  assert len(set(modes.values())) == 1, modes
  assert modes["model.safetensors"] == 0o666 & ~_umask(), modes


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def test_the_log_writes_non_finite_numbers_as_null(tmp_path):
  path = tmp_path / "log.jsonl"
  train.append_log(path, {"event": "eval", "metrics": {"pearson": float("nan"),
                                                       "spearman": float("inf"), "x": 1.5}})
  assert json.loads(path.read_text()) == {
      "event": "eval", "metrics": {"pearson": None, "spearman": None, "x": 1.5}}
  assert train.format_metrics({"pearson": None, "x": 1.5}) == "pearson=nan x=1.5000"
