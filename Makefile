# prism: one entry point. `make demo` runs the main job end to end; `make test` runs the tests.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PYTHONUNBUFFERED := 1
export MPLBACKEND := Agg
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: venv demo test test-slow test-all lint bench-cpu clean help dvc-remote lock

help:
	@echo "make demo       - build the environment and run the main job end to end (embedded demo data)"
	@echo "make test       - build the environment and run the tests (not marked slow)"
	@echo "make test-slow  - the slow end-to-end tests"
	@echo "make lint       - ruff"
	@echo "make lock       - re-resolve requirements.lock from pyproject.toml (pip-tools)"
	@echo "make dvc-remote DVC_BUCKET=B [DVC_ENDPOINT=URL] - share outputs through s3://B/prism"

# The environment: PyTorch's CPU build first (a newer or unpinned torch would pull several GB of
# CUDA wheels), then every other package at the version requirements.lock pins (nothing is
# resolved at install time), then prism itself without dependencies.
$(STAMP): pyproject.toml requirements.lock
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

# Re-resolve requirements.lock from pyproject.toml's ranges (pip-tools in a throwaway venv; torch
# held at the CPU build's version, and left out of the lock: each install picks its own build).
lock:
	rm -rf .lockenv && $(PY) -m venv .lockenv && .lockenv/bin/pip install -q pip-tools
	echo "torch==2.13.0" > .lockenv/torch.txt
	CUSTOM_COMPILE_COMMAND="make lock" .lockenv/bin/pip-compile -q --extra test --extra prod --strip-extras --unsafe-package torch \
	  --no-emit-index-url --no-emit-find-links \
	  -c .lockenv/torch.txt --output-file requirements.lock pyproject.toml
	rm -rf .lockenv

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m pipelines.demo_run

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m "slow" -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

# The team's DVC storage: the shipped remote "s3" (.dvc/config) pointed at s3://$(DVC_BUCKET)/prism
# and made this clone's default (written to .dvc/config.local, not committed). Credentials come
# from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or a profile), as for boto3.
# Without it, the default remote is the local folder ~/.cache/prism/dvc-remote.
dvc-remote:
	@test -n "$(DVC_BUCKET)" || { echo "set DVC_BUCKET=<bucket> (and DVC_ENDPOINT=<url> for an S3 service other than AWS)"; exit 2; }
	$(BIN)/dvc remote modify --local s3 url s3://$(DVC_BUCKET)/prism
	$(if $(DVC_ENDPOINT),$(BIN)/dvc remote modify --local s3 endpointurl $(DVC_ENDPOINT))
	$(BIN)/dvc remote default --local s3

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf outputs .pytest_cache .ruff_cache
