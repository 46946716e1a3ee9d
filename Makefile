# Two entry points, each doing the whole set-up on a fresh machine (see scripts/setup_env.sh).
#   make bench   the benchmark suite on its default shapes, on whatever hardware is there
#   make test    the test suite (Triton kernels run under TRITON_INTERPRET=1 when there is no GPU)

.PHONY: test bench lint env

env:
	@scripts/setup_env.sh >/dev/null

test:
	PY=$$(scripts/setup_env.sh | tail -n 1) && $$PY -m pytest -q tests

bench:
	PY=$$(scripts/setup_env.sh | tail -n 1) && $$PY -m benchmarks.run

lint:
	PY=$$(scripts/setup_env.sh | tail -n 1) && $$PY -m ruff check . && $$PY -m ruff format --check .
