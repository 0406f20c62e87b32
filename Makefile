# Set-up is part of every target: the virtual environment is created (and refreshed when
# pyproject.toml changes) before anything runs.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: sweep test lint

sweep: $(VENV)/.installed  ## the main job: a real sweep on the embedded default
	$(BIN)/kdsweep run sweeps/specs/digits_kd.yaml

test: $(VENV)/.installed  ## the whole test suite
	$(BIN)/python -m pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check .

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; assert (3, 11) <= sys.version_info[:2] < (3, 13), "kdsweep needs Python 3.11 or 3.12, found " + sys.version'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@
