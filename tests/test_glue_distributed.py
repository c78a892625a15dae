"""The GLUE example on many devices (FSDP) and many processes, and its Orbax checkpoints."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from examples.glue import checkpoints as checkpoints_lib
from examples.glue import distributed
from examples.glue import train
from tests.test_glue_train import GLUE_DIR, REPO, _argv, _final_params, _run, needs_glue
from tests.test_glue_train import tiny_model  # pylint: disable=unused-import  # A fixture.


def _assert_params_close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)


@pytest.mark.parametrize("text, expected", [
    ("data=2,fsdp=4", distributed.MeshShape(2, 4)),
    ("fsdp=8", distributed.MeshShape(None, 8)),
    (" data = 8 ", distributed.MeshShape(8, 1)),
])
def test_mesh_flag_parses(text, expected):
  assert distributed.parse_mesh(text) == expected


@pytest.mark.parametrize("text", ["data=0", "fsdp=2,fsdp=2", "model=2", "data=2;fsdp=2", ""])
def test_bad_mesh_flag_is_refused(text):
  with pytest.raises(ValueError, match="expected data=N,fsdp=M"):
    distributed.parse_mesh(text)


def test_fsdp_spec_splits_the_largest_divisible_axis():
  assert distributed.fsdp_spec((30522, 768), 8) == jax.sharding.PartitionSpec(None, "fsdp")
  assert distributed.fsdp_spec((768, 3072), 4) == jax.sharding.PartitionSpec(None, "fsdp")
  assert distributed.fsdp_spec((2,), 4) == jax.sharding.PartitionSpec()
  assert distributed.fsdp_spec((768,), 1) == jax.sharding.PartitionSpec()


@needs_glue
@pytest.mark.parametrize("method", ["fsam", "dps-mix"])
def test_fsdp_run_matches_one_device(method, tiny_model, tmp_path):
  """Parameters and optimizer state split over 4 devices, the batch over 8."""
  flags = ("--method", method, *(("--update-ratio", "0.5") if method == "dps-mix" else ()))
  _run(tiny_model, tmp_path / "one", *flags)
  records = _run(tiny_model, tmp_path / "fsdp", *flags, "--num-devices", "8",
                 "--mesh", "data=2,fsdp=4")
  assert records[0]["mesh"] == {"data": 2, "fsdp": 4} and records[0]["devices"] == 8
  _assert_params_close(_final_params(tmp_path / "one"), _final_params(tmp_path / "fsdp"))


@needs_glue
@pytest.mark.parametrize("method_flags", [
    ("--method", "fsam", "--fisher", "squared_gradient", "--mask-every", "2"),
    # State outside the method's scope (optax.masked), and per-neuron counts.
    ("--method", "dps-mix", "--update-ratio", "0.25"),
], ids=["fsam", "dps-mix"])
def test_resume_on_another_mesh_ends_where_the_uninterrupted_run_does(method_flags,
                                                                      tiny_model, tmp_path):
  """Saved from one device, restored onto a 2 × 2 mesh with the state split in two."""
  flags = (*method_flags, "--epochs", "2", "--max-steps", "99")
  _run(tiny_model, tmp_path / "whole", *flags)
  _run(tiny_model, tmp_path / "parts", *flags, "--stop-after-epoch", "1")
  _run(tiny_model, tmp_path / "parts", *flags, "--resume", "--num-devices", "4",
       "--mesh", "data=2,fsdp=2")
  _assert_params_close(_final_params(tmp_path / "whole"), _final_params(tmp_path / "parts"))


@needs_glue
def test_a_finished_run_deletes_its_checkpoint_unless_asked_to_keep_it(tiny_model,
                                                                      tmp_path):
  flags = ("--epochs", "2", "--max-steps", "99")
  _run(tiny_model, tmp_path / "default", *flags)
  assert not (tmp_path / "default" / train.CHECKPOINT_FILE).exists()
  assert (tmp_path / "default" / "model" / "model.safetensors").is_file()
  _run(tiny_model, tmp_path / "kept", *flags, "--keep-checkpoint")
  # The last checkpoints are kept (the two epochs here), each with its settings.
  assert checkpoints_lib.latest_epoch(tmp_path / "kept" / train.CHECKPOINT_FILE) == 2
  assert sorted(p.name for p in (tmp_path / "kept" / train.CHECKPOINT_FILE).iterdir()
                ) == ["1", "2"]


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


@needs_glue
def test_two_processes_of_two_devices_match_one_process_of_four(tiny_model, tmp_path):
  """Two processes joined by jax.distributed (CPU collectives over gloo), each feeding
  its half of every batch, with the parameters split across them (fsdp=2): the final
  parameters are those of one process on four devices."""
  mesh = ("--mesh", "data=2,fsdp=2")
  flags = ("--method", "sam", "--max-steps", "3", *mesh)
  _run(tiny_model, tmp_path / "single", *flags, "--num-devices", "4")

  argv = [a for a in _argv(tiny_model, tmp_path / "multi", *flags)]
  at = argv.index("--num-devices")
  del argv[at:at + 2]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", JAX_PLATFORMS="cpu")
  address = f"localhost:{_free_port()}"
  processes = [subprocess.Popen(
      [sys.executable, "-m", "examples.glue.train", *argv, "--coordinator-address",
       address, "--num-processes", "2", "--process-id", str(index)],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for index in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  for process, output in zip(processes, outputs):
    assert process.returncode == 0, output
  assert "final wnli sam" in outputs[0] and "final wnli" not in outputs[1]  # one writer
  log = (tmp_path / "multi" / "log.jsonl").read_text().splitlines()
  assert '"processes": 2' in log[0] and '"devices": 4' in log[0]
  _assert_params_close(_final_params(tmp_path / "single"), _final_params(tmp_path / "multi"))
