# agents_sessions — every target sets up its own virtualenv on first use.
#   make demo    the main job: an agent conversation stored on the embedded SQLite file
#                (or on $DATABASE_URL), then its history and token usage printed
#   make test    the test suite (PostgreSQL: $TEST_DATABASE_URL, else a local server found
#                as libpq would, else Docker; one closing line says what was skipped)
#   make test-pgbouncer  the core behaviour tests again, through a transaction-pooling
#                PgBouncer in front of a throwaway server (needs pgbouncer + PostgreSQL binaries)
#   make test-citus  the core behaviour tests and tests/citus on a throwaway Citus cluster
#                (needs the Citus extension installed into the local PostgreSQL)
#   make test-matrix  the core behaviour suite on the lowest declared dependency versions
#                and on Python 3.10, 3.12 and 3.13 (.ci/matrix.py; venvs under .matrix/;
#                MATRIX_LEGS="lowest py3.12" picks legs)
#   make lint    ruff + mypy + the import contract (lint-imports)
#   make migrate alembic upgrade head on $DATABASE_URL
#   make db-up   PostgreSQL 16 + pgAdmin in Docker (docker/compose.yaml), then migrate;
#                passwords from the environment or docker/.env (see docker/.env.example)
#   make db-down stop them; the data volume stays (REMOVE_VOLUMES=1 deletes it)
#   make bench   side-by-side benchmark vs the Agents SDK backends (installs .[dev,bench]);
#                BENCH_ARGS="--quick" for a smoke run; needs local PostgreSQL (+ Redis)
#                then the explorer's page timings on 100,000 conversations (benchmarks/ui_pages.py)
#   make bench-citus  the turn workload on a throwaway Citus cluster beside one server
#   make bench-mixed  Runner turns on the event loop beside K callers of worker-thread
#                transactions: turns/s and server connections opened (MIXED_BENCH_ARGS)
#   make bench-memory  RSS over the SDK alone after importing a backend and after its
#                first turn: ours, the SDK's, and the libraries under ours
#   make bench-search  recall: search p50 on 1,000,000 messages, and the index's cost to
#                add_items (also run by make bench; SEARCH_BENCH_ARGS="--quick")
#   make profile our throughput workload under py-spy + pyinstrument -> benchmarks/results/
#   make soak    4 processes x 400 conversations for 120 s while their connections are
#                killed; verifies every history (SOAK_ARGS="--shared" etc.; local PostgreSQL)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: venv demo test test-pgbouncer test-citus test-matrix lint format migrate db-up db-down bench bench-citus bench-branching bench-mixed bench-memory bench-search profile soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

BENCH_STAMP := $(VENV)/.installed-bench
BENCH_ARGS ?=
# e.g. UI_BENCH_ARGS="--conversations 10000 --requests 20" for a smoke run of the page timings
UI_BENCH_ARGS ?=
SEARCH_BENCH_ARGS ?=

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	touch $(BENCH_STAMP)

demo: $(STAMP)
	$(BIN)/python examples/01_basic_postgres.py

test: $(STAMP)
	$(BIN)/python -m pytest

# What the package promises behind PgBouncer (transaction pooling): the core behaviour
# suite, tests/integration, in tests/conftest.py's PgBouncer mode; tests marked
# direct_connection_only are skipped there, with their reason.
test-pgbouncer: $(STAMP)
	AGENTS_SESSIONS_TEST_PGBOUNCER=1 $(BIN)/python -m pytest tests/integration -q

# The store on a throwaway Citus cluster (a coordinator and two workers): the core
# behaviour suite in tests/conftest.py's Citus mode (tables distributed), then the Citus
# suite (single-shard proof, faults, operator commands). Needs the Citus extension in
# the local PostgreSQL: ../shared/citus/install-citus on this project's machines.
test-citus: $(STAMP)
	AGENTS_SESSIONS_TEST_CITUS=1 $(BIN)/python -m pytest tests/integration tests/citus -q

# The supported-versions proof (.ci/matrix.py): each leg gets a virtualenv of its own under
# .matrix/, made by uv (installed here on first use), and runs tests/unit + tests/integration.
MATRIX_STAMP := $(VENV)/.installed-matrix
MATRIX_LEGS ?=

$(MATRIX_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet "uv>=0.5"
	touch $(MATRIX_STAMP)

test-matrix: $(MATRIX_STAMP)
	$(BIN)/python .ci/matrix.py $(MATRIX_LEGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

migrate: $(STAMP)
	$(BIN)/alembic upgrade head

COMPOSE ?= docker compose -f docker/compose.yaml

db-up:
	$(COMPOSE) up -d --wait postgres pgadmin
	$(COMPOSE) run --rm --build migrate

# Keeps the postgres-data volume unless asked: `make db-down REMOVE_VOLUMES=1`
# (or `docker compose -f docker/compose.yaml down --volumes`) deletes the data.
db-down:
	$(COMPOSE) down $(if $(filter 1 yes true,$(REMOVE_VOLUMES)),--volumes)

bench: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.bench $(BENCH_ARGS)
	$(BIN)/python -m benchmarks.ui_pages $(UI_BENCH_ARGS)
	$(BIN)/python -m benchmarks.search $(if $(findstring --quick,$(BENCH_ARGS)),--quick) $(SEARCH_BENCH_ARGS)

# The turn workload on a throwaway Citus cluster (coordinator + 2 workers on this machine)
# beside one server: a correctness-under-distribution figure, not a speed-up claim.
bench-citus: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.bench --only agents_sessions,citus --workloads throughput $(BENCH_ARGS)

# Branching a 10,000-item conversation, ours against the SDK's AdvancedSQLiteSession.
bench-branching: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.branching --database-url $${BENCH_DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/postgres}

bench-mixed: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.mixed_load --database-url $${BENCH_DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/postgres} $(MIXED_BENCH_ARGS)

# RSS an agent app pays for a backend over the SDK alone, in fresh interpreters.
bench-memory: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.memory_footprint --database-url $${BENCH_DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/postgres}

# Recall alone: search p50 on 1,000,000 messages (SEARCH_BENCH_ARGS="--quick": 100,000).
bench-search: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.search $(SEARCH_BENCH_ARGS)

profile: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.bench --profile $(BENCH_ARGS)

SOAK_ARGS ?=

soak: $(STAMP)
	$(BIN)/python -m benchmarks.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .matrix build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
