# dspex-tasks. `make test` runs all three test layers and starts what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
PYTEST_WORKERS ?= 3

.PHONY: install test test-fast test-unit test-redis test-system test-clients lint typecheck demo bench constraints clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# All three layers (unit, redis, system). A private redis-server is started by the
# tests themselves on a free port unless DSPEX_TEST_REDIS_URL names a dedicated DB.
# Test modules run on PYTEST_WORKERS processes (pytest-xdist, a module stays on one process): the system tests
# mostly wait on workers, timeouts and the mock LM's latency, so 3 processes on 2 cores take ~40% of the serial
# time. PYTEST_WORKERS=0 runs them in one. Tests marked `serial` (a timing bound that the parallel load breaks)
# run alone afterwards.
test: $(STAMP)
	-@bash scripts/ci-deps.sh
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile -m "not serial" $(PYTEST_ARGS)
	$(PY) -m pytest -q -m serial $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m unit $(PYTEST_ARGS)

test-unit: test-fast

test-redis: $(STAMP)
	$(PY) -m pytest -q -m redis $(PYTEST_ARGS)

test-system: $(STAMP)
	$(PY) -m pytest -q -m system $(PYTEST_ARGS)

# Clients generated from the gateway's live OpenAPI document: the Python one (also part of `make test`) and the
# TypeScript one (openapi-typescript + tsc --strict; npm installs both into .cache/ts-client on first use).
test-clients: $(STAMP)
	DSPEX_TEST_TYPESCRIPT=1 $(PY) -m pytest -q tests/redis/test_gateway_clients.py $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check dspex_tasks signatures workers tests benchmarks
	$(VENV)/bin/mypy --strict dspex_tasks

typecheck: lint

# Runs the main job end to end: a private Redis when DSPEX_REDIS_URL does not answer,
# worker processes, a batch across sessions and signatures, a result table.
demo: $(STAMP)
	$(PY) -m dspex_tasks demo

bench: $(STAMP)
	$(PY) benchmarks/run.py

# deploy/constraints.txt: the versions deploy/Dockerfile builds, i.e. the closure of `pip install ".[flower,gateway]"`
# at this venv's versions (pip freeze + pip install --dry-run --report). Rerun after changing dependencies.
constraints: $(STAMP)
	$(PY) deploy/constraints.py --python $(PY)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
