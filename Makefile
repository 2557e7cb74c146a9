# `make demo` and `make test` work on a fresh clone: they create the virtualenv and install first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo demo-headless test lint typecheck bench clean

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

# tests mostly wait on real processes; two workers on two cores (three starved timing-sensitive tests); a module stays on one worker
# (its cluster fixtures are started once), and each worker hands out ports from its own range
TEST_WORKERS ?= 2
test: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile

bench: install
	$(BIN)/ctops bench proxy

clean:
	rm -rf $(VENV) .ctops .pytest_cache .mypy_cache *.egg-info build dispatcher/proxy.c dispatcher/*.so $(PROXY_BUILT)
