# agents_sessions — every target sets up its own virtualenv on first use.
#   make demo    the main job: an agent conversation stored on the embedded SQLite file
#                (or on $DATABASE_URL), then its history and token usage printed
#   make test    the test suite (PostgreSQL tests use $TEST_DATABASE_URL, or Docker)
#   make lint    ruff + mypy
#   make migrate alembic upgrade head on $DATABASE_URL

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: venv demo test lint format migrate clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/01_basic_postgres.py

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

migrate: $(STAMP)
	$(BIN)/alembic upgrade head

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
