# Quick start: `make demo` (set up + CPU demo) and `make test` (set up + test suite).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/cftjax: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test-deps: $(BIN)/cftjax
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,tpu-compile]'
	touch $@

.PHONY: demo test
demo: $(BIN)/cftjax
	$(BIN)/cftjax train --config configs/demo_cft.py

test: $(VENV)/.test-deps
	$(BIN)/pytest -q -n auto --maxprocesses 4 --dist loadfile tests
