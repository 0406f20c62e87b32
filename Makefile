# Set-up is part of every target: the virtual environment is created (and refreshed when
# pyproject.toml changes) before anything runs.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# Debian's Chromium, for the real-browser test of the MLflow UI (Playwright's own browser
# download cannot reach its host from CI). sudo only when not root.
CHROMIUM ?= /usr/bin/chromium
# Fashion-MNIST's IDX files, from Debian's dataset-fashion-mnist package (the fashion_mnist dataset's
# default root; tests and the Fashion-MNIST spec read it).
FASHION_MNIST ?= /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(if $(filter 0,$(shell id -u)),,$(shell command -v sudo))

.PHONY: sweep test lint

sweep: $(VENV)/.installed  ## the main job: a real sweep on the embedded default
	$(BIN)/kdsweep run sweeps/specs/digits_kd.yaml

test: $(VENV)/.installed $(CHROMIUM) $(FASHION_MNIST)  ## the whole test suite (tests/test_browser.py drives Chromium)
	$(BIN)/python -m pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check .

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; assert (3, 11) <= sys.version_info[:2] < (3, 13), "kdsweep needs Python 3.11 or 3.12, found " + sys.version'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# Installed only when missing: the file itself is the target.
$(CHROMIUM):
	$(SUDO) apt-get update
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium

$(FASHION_MNIST):
	$(SUDO) apt-get update
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends dataset-fashion-mnist
