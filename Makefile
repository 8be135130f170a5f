# The habits, one command each. Everything runs from the project's own virtualenv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.installed-runtime
DEV := $(VENV)/.installed-dev

.PHONY: install install-runtime run test lint format bench schema image up clean

# `make run` needs only the service's own dependencies; everything else needs the dev tools.
install-runtime: $(RUNTIME)
install: $(DEV)

$(RUNTIME): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $(RUNTIME)

$(DEV): $(RUNTIME)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(DEV)

run: install-runtime
	$(BIN)/score-ingest run

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The benchmark needs wrk (Debian's package) and a few packages of its own (bench/requirements.txt).
bench: install-runtime
	@command -v wrk >/dev/null 2>&1 || { [ "$$(id -u)" -eq 0 ] && apt-get update -qq && apt-get install -y -qq wrk; } || { echo "make bench needs wrk: run apt-get install -y wrk as root" >&2; exit 1; }
	$(BIN)/python -m pip install --quiet -r bench/requirements.txt
	$(BIN)/python -m bench.run $(BENCH_ARGS)

schema: install
	$(BIN)/score-ingest schema > shared/score-message.schema.json
	$(BIN)/score-ingest schema --batch > shared/score-batch-message.schema.json

image:
	docker build -f deploy/Dockerfile -t score-ingest:local .

up:
	docker compose -f deploy/compose.yaml up --build

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
