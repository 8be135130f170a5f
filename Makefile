# The habits, one command each. Everything runs from the project's own virtualenv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.installed-runtime
DEV := $(VENV)/.installed-dev

.PHONY: install install-runtime run test test-cluster test-unit lint format bench chaos schema image up clean

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

# Tests (README "Testing"): everything but the serial and cluster tests in parallel, each
# pytest-xdist worker with a database and a vhost of its own (the tests on the tests' own
# RabbitMQ node in one worker: --dist loadgroup), then the serial tests (they load
# the whole machine) one at a time. Both passes run whatever the first gives; exit 5 is a pass
# that PYTEST_ARGS left without tests. A run starts hundreds of Python processes: they keep
# their bytecode even where PYTHONDONTWRITEBYTECODE is set. The cluster tests (nodes of their
# own, minutes) are `make test-cluster`; CI runs both.
TEST_WORKERS ?= 4

test: export PYTHONDONTWRITEBYTECODE :=
test: install
	@status=0; \
	$(BIN)/python -m pytest -m "not serial and not cluster" -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS) || status=$$?; \
	[ $$status -eq 5 ] && status=0; \
	$(BIN)/python -m pytest -m "serial and not cluster" $(PYTEST_ARGS) || { code=$$?; [ $$code -eq 5 ] || status=$$code; }; \
	exit $$status

# A 3-node RabbitMQ cluster and a PostgreSQL pair on this machine (tests/cluster/), as root.
test-cluster: export PYTHONDONTWRITEBYTECODE :=
test-cluster: install
	$(BIN)/python -m pytest -m cluster $(PYTEST_ARGS)

# Unit tests only: no PostgreSQL or RabbitMQ needed (a unit test that reaches for one fails).
test-unit: export PYTHONDONTWRITEBYTECODE :=
test-unit: install
	$(BIN)/python -m pytest -m unit $(PYTEST_ARGS)

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

# Faults under load on a cluster of real nodes (chaos/run.py): 3 RabbitMQ nodes in network
# namespaces and a PostgreSQL pair, so it runs as root. `make chaos SEED=3 DURATION=30` repeats
# a run's faults (which node, when); CHAOS_ARGS passes more (--scenario NAME, --json PATH).
chaos: install
	$(BIN)/python -m chaos.run $(if $(SEED),--seed $(SEED)) $(if $(DURATION),--duration $(DURATION)) $(CHAOS_ARGS)

schema: install
	$(BIN)/score-ingest schema > shared/score-message.schema.json
	$(BIN)/score-ingest schema --batch > shared/score-batch-message.schema.json

image:
	docker build -f deploy/Dockerfile -t score-ingest:local .

up:
	docker compose -f deploy/compose.yaml up --build

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
