# Two commands do all the set-up: `make train` and `make test` (each creates .venv on first use).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/vision/deit_tiny.yaml
PYTEST_ARGS ?=
# Test files shared out to one worker per core (pytest-xdist), each computing on one thread (tests/conftest.py):
# most tests are tiny models, process start-ups and waits, which one thread runs as fast as two.
# `make test XDIST=` runs in one process.
XDIST ?= -n auto --dist loadfile

.PHONY: install install-dev train test test-fast lint bench clean

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# What training needs (the runtime dependencies), with pip's progress shown: the first install downloads
# PyTorch. Reinstalled whenever the declared dependencies or the tested pins change.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -c constraints.txt -e .
	touch $@

# Every extra plus the test tools and reference implementations. DeepSpeed ships as source: DS_BUILD_OPS=0
# installs it without compiling its CUDA ops, which it builds on first use instead.
$(VENV)/.installed-dev: $(VENV)/.installed
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $@

train: install
	$(BIN)/zoo fit --config $(CONFIG)

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The whole suite but GPU tests (what CI runs); the slowest 15 tests are listed at the end.
test: lint
	$(BIN)/python -m pytest -m "not gpu" $(XDIST) --durations=15 $(PYTEST_ARGS)

# The inner loop: no quality runs, no process spawning (at most 5 minutes on 2 cores).
test-fast: install-dev
	$(BIN)/python -m pytest -m "not gpu and not slow and not distributed" $(XDIST) --durations=15 $(PYTEST_ARGS)

# One script per question; each prints a table and writes benchmarks/results/<name>.json.
bench: install-dev
	@for script in benchmarks/*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
