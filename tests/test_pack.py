"""benchmarks/pack.py: a model and GLUE tasks packed small, and loaded back."""

import json
import os
import pathlib

import jax
import numpy as np
import pytest

from benchmarks import pack
from examples.glue import pretrained

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
GLUE_DIR = pathlib.Path(os.environ.get("GLUE_DIR", FIXTURES.parents[2] / "shared" / "glue"))
needs_glue = pytest.mark.skipif(not GLUE_DIR.is_dir(),
                                reason=f"GLUE data not found at {GLUE_DIR} (set GLUE_DIR)")


@needs_glue
def test_pack_round_trip(tmp_path):
  model_dir = FIXTURES / "tiny_roberta"
  manifest = pack.pack(tmp_path / "pack", model_dir=model_dir, tasks=["rte", "stsb"],
                       glue_dir=GLUE_DIR)
  # The tasks' files are copied unchanged.
  for folder in ("RTE", "STS-B"):
    for split in ("train.tsv", "dev.tsv"):
      packed = tmp_path / "pack" / "glue" / folder / split
      assert packed.read_bytes() == (GLUE_DIR / folder / split).read_bytes()
      assert manifest["files"][f"glue/{folder}/{split}"]["bytes"] == packed.stat().st_size
  assert json.loads((tmp_path / "pack" / "MANIFEST.json").read_text()) == manifest
  # The weights are half the size and load back to float32 within bfloat16's rounding.
  weights = manifest["files"]["model/model.safetensors"]["bytes"]
  assert weights < 0.6 * (model_dir / "model.safetensors").stat().st_size
  original = pretrained.load_pretrained(model_dir, num_labels=2)
  packed = pretrained.load_pretrained(tmp_path / "pack" / "model", num_labels=2)
  assert packed.hf_config == original.hf_config
  for a, b in zip(jax.tree.leaves(original.params), jax.tree.leaves(packed.params)):
    assert b.dtype == np.float32
    np.testing.assert_allclose(b, a, rtol=2 ** -8, atol=1e-30)
  assert any(np.any(np.asarray(a) != np.asarray(b)) for a, b in zip(
      jax.tree.leaves(original.params["encoder"]), jax.tree.leaves(packed.params["encoder"])))


@needs_glue
def test_a_pack_over_the_limit_is_refused_and_removed(tmp_path):
  with pytest.raises(pack.PackTooLarge, match="over the 0.01 MiB limit"):
    pack.pack(tmp_path / "pack", model_dir=FIXTURES / "tiny_roberta", tasks=["rte"],
              glue_dir=GLUE_DIR, limit_mib=0.01)
  assert not (tmp_path / "pack").exists()
  status = pack.main(["--output", str(tmp_path / "pack"), "--model",
                      str(FIXTURES / "tiny_roberta"), "--tasks", "rte", "--glue-dir",
                      str(GLUE_DIR), "--limit-mib", "0.01"])
  assert status == 2


def test_a_missing_task_file_is_an_error(tmp_path):
  with pytest.raises(pack.data.DataError, match="missing GLUE file"):
    pack.pack(tmp_path / "pack", model_dir=FIXTURES / "tiny_roberta", tasks=["rte"],
              glue_dir=tmp_path)
