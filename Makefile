# One virtual environment for everything; torch first, pinned to the build available offline.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STORE  ?= demo/store

.PHONY: setup demo test test-all bench bench-search clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

## the whole pipeline that exists so far, on the embedded synthetic cohort
demo: setup
	$(BIN)/cmr demo --store $(STORE)

## the default (fast) test suite; `make test-all` adds the tests marked slow
test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m "slow or not slow"

bench: setup
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/encoder.py --throughput
	$(BIN)/python benchmarks/search.py --sizes 100000 --queries 300

## search at 100k / 300k / 1M rows against raw FAISS, LanceDB IVF_PQ and numpy (long)
bench-search: setup
	$(BIN)/python benchmarks/search.py --json search-bench.json

clean:
	rm -rf $(VENV) demo .pytest_cache
