#!/usr/bin/env bash
# Prepare a Python environment for fastattn_icl and print the interpreter to use (last line).
#
# - If $PYTHON (default python3) already imports torch, that interpreter is used in place, so a GPU
#   user keeps their own CUDA build of torch.
# - Otherwise a virtual environment is made in $VENV (default .venv) with the pinned CPU build
#   $TORCH_SPEC (default torch==2.13.0), so CI never pulls the multi-GB CUDA wheels.
# Then the test/benchmark requirements are installed and the package is built in place
# (--no-build-isolation, so the extension compiles against the torch that will import it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ -x "$VENV/bin/python" ]; then
    PY="$VENV/bin/python"
elif ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m venv "$VENV" >&2
    PY="$VENV/bin/python"
fi
"$PY" -c "import torch" >/dev/null 2>&1 || "$PY" -m pip install -q "$TORCH_SPEC" >&2
"$PY" -m pip install -q -r requirements-dev.txt >&2
"$PY" -m pip install -q --no-build-isolation -e . >&2
echo "$PY"
