"""The FSDP memory benchmark: what it compiles, measures and writes (on a tiny encoder)."""

import json

import jax

from benchmarks import fsdp_memory


def test_fsdp_divides_the_state_over_the_devices(tmp_path):
  previous = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)  # compile fast
  try:
    result = fsdp_memory.run(["--config", "tiny", "--batch-size", "8", "--length", "16",
                              "--methods", "adamw", "--output-dir", str(tmp_path)])
  finally:
    jax.config.update("jax_disable_most_optimizations", previous)
  (row,) = result["rows"]
  replicated, fsdp = row["replicated"], row["fsdp"]
  # Parameters and AdamW's two moments dominate the arguments; split 8 ways, they shrink
  # to about an eighth (the batch and the scalars stay whole).
  assert fsdp["argument"] < 0.2 * replicated["argument"], row
  assert fsdp["total"] < replicated["total"], row
  assert json.loads((tmp_path / "fsdp_memory.json").read_text())["rows"] == result["rows"]
  table = (tmp_path / "fsdp_memory.md").read_text()
  assert "| adamw | fsdp |" in table and "tiny" in table
