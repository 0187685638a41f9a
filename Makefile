# prism: one entry point. `make demo` runs the main job end to end; `make test` runs the tests.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PYTHONUNBUFFERED := 1
export MPLBACKEND := Agg
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: venv demo test test-slow test-all lint bench-cpu clean help dvc-remote

help:
	@echo "make demo       - build the environment and run the main job end to end (embedded demo data)"
	@echo "make test       - build the environment and run the tests (not marked slow)"
	@echo "make test-slow  - the slow end-to-end tests"
	@echo "make lint       - ruff"
	@echo "make dvc-remote DVC_BUCKET=B [DVC_ENDPOINT=URL] - share outputs through s3://B/prism"

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
