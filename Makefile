# `make demo` and `make test` work on a fresh clone: they create the virtualenv and install first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo demo-headless test test-pure lint typecheck bench clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP) $(PROXY_BUILT)

# the data plane compiled in place (setup.py); built again when its source changes, so a stale build
# never shadows an edit
PROXY_BUILT := dispatcher/.proxy-built
$(PROXY_BUILT): dispatcher/proxy.py dispatcher/proxy.pxd $(STAMP)
	$(BIN)/python setup.py --quiet build_ext --inplace
	touch $(PROXY_BUILT)

install: $(STAMP) $(PROXY_BUILT)

demo: install
	$(BIN)/ctops demo

demo-headless: install
	$(BIN)/ctops demo --headless

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# mypy: strict on the shared package, default checks on the services and tools ([tool.mypy] in pyproject.toml)
typecheck: install
	$(BIN)/mypy

# Tests mostly wait on real processes. The tests of a module that shares a fixture (its cluster, its fake)
# stay on one worker, together; the others spread over all workers, the longest modules first
# (tests/conftest.py marks and orders them); each worker hands out ports from its own range. The few
# timing-sensitive tests (marked `serial`: Redis pauses, hedging, CPU budgets) run afterwards, alone;
# both parts run, and either failing fails the target.
TEST_WORKERS ?= 3
test: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder -m "not serial"; parallel=$$?; \
	$(BIN)/pytest -m serial; serial=$$?; \
	test $$parallel -eq 0 -a $$serial -eq 0

# the tests that run in the test process alone (no Redis, no other process): seconds, for a quick check
test-pure: install
	$(BIN)/pytest -n 2 -m pure

bench: install
	$(BIN)/ctops bench proxy

clean:
	rm -rf $(VENV) .ctops .pytest_cache .mypy_cache *.egg-info build dispatcher/proxy.c dispatcher/*.so $(PROXY_BUILT)
