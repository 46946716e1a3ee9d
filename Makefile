# Entry points; each does the whole set-up on a fresh machine (scripts/setup_env.sh) and stops with the
# set-up's own message when it fails.
#   make test    the test suite (Triton kernels run under TRITON_INTERPRET=1 when there is no GPU)
#   make bench   the benchmark suite on its default shapes, on whatever hardware is there
#   make gpu     on a GPU machine: build, gpu-marked tests, the GPU benchmark set, a summary of targets
#   make compile-report  every kernel specialization compiled for sm_80 and sm_90 (no GPU; about an hour of CPU)
#   make reproduce  the "Label Words are Anchors" study on SmolLM2-135M (CPU, ~20 min) into docs/reproduction/
# VENV, PYTHON and CONSTRAINTS (environment variables) choose the environment, see scripts/setup_env.sh.

.PHONY: test bench gpu gpu-dry-run compile-report reproduce lint env

SETUP = PY=$$(scripts/setup_env.sh) || { echo "make: environment set-up failed (scripts/setup_env.sh, see above)" >&2; exit 1; }
# test and reproduce also set up the real model (SmolLM2-135M) in a virtual environment; REAL_MODEL=0 skips it
SETUP_MODEL = PY=$$(REAL_MODEL=$${REAL_MODEL:-auto} scripts/setup_env.sh) || { echo "make: environment set-up failed (scripts/setup_env.sh, see above)" >&2; exit 1; }

env:
	@$(SETUP); echo "$$PY"

# one pytest worker per core, a test file per worker, where pytest-xdist is installed (requirements-test.txt);
# TEST_WORKERS=0 runs serially
test:
	@$(SETUP_MODEL); workers=$${TEST_WORKERS:-auto}; \
	xdist=$$([ "$$workers" != 0 ] && $$PY -c 'import xdist' 2>/dev/null && echo "-n $$workers --dist loadfile"); \
	$$PY -m pytest -q $$xdist tests

bench:
	@$(SETUP); $$PY -m benchmarks.run

gpu:
	@$(SETUP); $$PY scripts/gpu.py

compile-report:
	@$(SETUP); $$PY -m benchmarks.compile_report

reproduce:
	@$(SETUP_MODEL); $$PY -m fastattn_icl reproduce --out docs/reproduction

gpu-dry-run:
	@$(SETUP); $$PY scripts/gpu.py --dry-run

lint:
	@$(SETUP); $$PY -m ruff --version >/dev/null 2>&1 || $$PY -m pip install -q ruff; $$PY -m ruff check .
