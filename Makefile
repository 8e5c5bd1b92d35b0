# One entry point for a fresh machine: `make quickstart` (set up + the main job), `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision are pinned together: timm imports torchvision, and other pairs fail to import here.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup quickstart test test-fast test-quickstart lint bench clean

$(VENV)/.installed: pyproject.toml requirements-data.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e ".[dev]" $(TORCH_PINS)
	$(BIN)/python -m pip install -q --no-deps -r requirements-data.txt
	touch $@

setup: $(VENV)/.installed

quickstart: setup
	$(BIN)/papa-merge quickstart

# Tests and merge/'s doctests (pyproject.toml). test: everything but the `full` run (CI); test-fast: not the `slow`
# training runs either (the daily run); test-quickstart: the whole default quickstart on MNIST, checked.
test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

test-quickstart: setup
	$(BIN)/python -m pytest --run-full -m full

# ruff's rules are in pyproject.toml (tests/ and benchmarks/ allow longer lines: their ruff.toml).
lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/bench_soup.py

clean:
	rm -rf $(VENV) .pytest_cache
