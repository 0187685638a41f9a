# prism: one entry point. `make demo` runs the main job end to end; `make test` runs the tests.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PYTHONUNBUFFERED := 1
export MPLBACKEND := Agg
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: venv demo test test-slow test-all lint bench-cpu clean help

help:
	@echo "make demo       - build the environment and run the main job end to end (embedded demo data)"
	@echo "make test       - build the environment and run the tests (not marked slow)"
	@echo "make test-slow  - the slow end-to-end tests"
	@echo "make lint       - ruff"

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of PyTorch first: a newer or unpinned torch would pull several GB of CUDA wheels.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,prod]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m pipelines.demo_run

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m "slow" -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf outputs .pytest_cache .ruff_cache
