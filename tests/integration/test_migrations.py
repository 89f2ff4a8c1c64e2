"""The Alembic migrations: one head, a schema equal to the models, up/down, the CLI,
concurrent upgrades, auto-migration on first use, and migrations inside the wheel.

Every test gets empty databases of its own (``fresh_database_url``), on SQLite and on
PostgreSQL, so the order the tests run in does not matter.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, create_engine, inspect, text
from sqlalchemy.pool import NullPool

from agents_sessions import (
    PostgreSQLSession,
    SchemaNotAtHeadError,
    Settings,
    dispose_all,
    get_store,
    load_settings,
    upgrade,
)
from agents_sessions.db.engine import parse_database_url
from agents_sessions.db.migrate import alembic_config, current_revision, head_revision
from agents_sessions.db.models import Base, comparison_filter, is_modelled
from tests.conftest import PostgresServer

# Migrations start from empty databases; on a cluster the fixtures hand out distributed ones.
pytestmark = pytest.mark.not_on_citus(
    "migrations run on empty databases; tests/citus migrates its own"
)

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER_SCRIPT = REPO_ROOT / "tests" / "support" / "migration_workers.py"

EXPECTED_COLUMNS = {
    "conversations": {
        "id",
        "user_id",
        "created_at",
        "updated_at",
        "metadata",
        "current_branch",
        "expires_at",
    },
    "messages": {
        "id",
        "conversation_id",
        "role",
        "content",
        "item",
        "created_at",
        "append_key",
        "branch_id",
    },
    "usage_logs": {
        "id",
        "conversation_id",
        "run_id",
        "response_id",
        "model",
        "requests",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "timestamp",
        "branch_id",
        "turn_message_id",
        "request_index",
        "cached_tokens",
        "reasoning_tokens",
        "input_tokens_details",
        "output_tokens_details",
    },
    "conversation_branches": {
        "conversation_id",
        "branch_id",
        "parent_branch_id",
        "fork_before_id",
        "state",
        "created_at",
    },
}
NULLABLE_COLUMNS = {
    "conversations": {"user_id", "current_branch", "expires_at"},
    "messages": {"append_key"},
    "usage_logs": {
        "run_id",
        "response_id",
        "branch_id",
        "turn_message_id",
        "request_index",
        "input_tokens_details",
        "output_tokens_details",
    },
    "conversation_branches": {"parent_branch_id", "fork_before_id"},
}
PRIMARY_KEYS = {"conversation_branches": ["conversation_id", "branch_id"]}
SCHEMA_TABLES = set(EXPECTED_COLUMNS)
CONCURRENT_PROCESSES = 5
SUBPROCESS_TIMEOUT = 120

FreshUrl = Callable[[], str]


# --------------------------------------------------------------------------- helpers


@contextmanager
def connect(url: str) -> Iterator[Connection]:
    """A plain connection to ``url`` (no pool, no package engine state)."""
    engine = create_engine(parse_database_url(url).url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            yield connection
    finally:
        engine.dispose()


def table_names(url: str) -> set[str]:
    with connect(url) as connection:
        return set(inspect(connection).get_table_names())


def revision_of(url: str) -> str | None:
    with connect(url) as connection:
        return current_revision(connection)


def version_rows(url: str) -> list[str]:
    with connect(url) as connection:
        return list(connection.execute(text("SELECT version_num FROM alembic_version")).scalars())


def expected_primary_key(table: str, dialect_name: str) -> list[str]:
    """The key at head: led by the distribution column on PostgreSQL (Citus-ready);
    SQLite keeps its rowid key."""
    if table in PRIMARY_KEYS:
        return PRIMARY_KEYS[table]
    if table == "conversations" or dialect_name == "sqlite":
        return ["id"]
    return ["conversation_id", "id"]


def assert_schema_at_head(url: str) -> None:
    with connect(url) as connection:
        inspector = inspect(connection)
        assert set(inspector.get_table_names()) >= SCHEMA_TABLES
        for table, expected in EXPECTED_COLUMNS.items():
            columns = {column["name"]: column for column in inspector.get_columns(table)}
            assert set(columns) == expected, table
            nullable = {name for name, column in columns.items() if column["nullable"]}
            assert nullable == NULLABLE_COLUMNS.get(table, set()), table
            key = inspector.get_pk_constraint(table)["constrained_columns"]
            assert key == expected_primary_key(table, connection.dialect.name), table
        assert current_revision(connection) == head_revision()


def subprocess_env(database_url: str | None = None, **extra: str) -> dict[str, str]:
    """This process's environment without any database settings, plus ``extra``."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name != "DATABASE_URL" and not name.startswith("AGENTS_SESSIONS_")
    }
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    env.update(extra)
    return env


def run(
    args: Sequence[str], *, cwd: Path, env: dict[str, str], timeout: float = SUBPROCESS_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def alembic_cli(*args: str) -> list[str]:
    """The ``alembic`` command line of this virtualenv (run it with ``cwd=REPO_ROOT``)."""
    return [sys.executable, "-m", "alembic", *args]


def describe(
    process: subprocess.CompletedProcess[str] | subprocess.Popen[str], out: str, err: str
) -> str:
    """A failed subprocess, for an assertion message."""
    return f"exit {process.returncode}\n--- stdout\n{out}\n--- stderr\n{err}"


@contextmanager
def started(processes: list[subprocess.Popen[str]]) -> Iterator[list[subprocess.Popen[str]]]:
    """Kill (only) these child processes if the test leaves before they finish."""
    try:
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


# --------------------------------------------------------------------------- revisions


def test_migrations_have_a_single_head_that_is_the_head_revision() -> None:
    script = ScriptDirectory.from_config(alembic_config())

    heads = script.get_heads()

    assert len(heads) == 1, heads
    assert heads[0] == head_revision()


def test_upgrade_of_an_empty_database_creates_the_three_tables_at_head(
    fresh_database_url: FreshUrl,
) -> None:
    url = fresh_database_url()
    assert table_names(url) == set()

    upgrade(url)

    assert_schema_at_head(url)
    assert version_rows(url) == [head_revision()]


def test_models_match_the_migrated_schema(fresh_database_url: FreshUrl) -> None:
    url = fresh_database_url()
    upgrade(url)

    # `alembic check` raises when autogenerate would write a migration.
    command.check(alembic_config(database_url=url))

    with connect(url) as connection:
        context = MigrationContext.configure(
            connection,
            opts={
                "compare_type": True,
                "include_object": comparison_filter(connection.dialect.name),
                "include_name": is_modelled,
            },
        )
        assert compare_metadata(context, Base.metadata) == []


def test_every_revision_upgrades_and_downgrades_one_step_at_a_time(
    fresh_database_url: FreshUrl,
) -> None:
    url = fresh_database_url()
    config = alembic_config(database_url=url)
    script = ScriptDirectory.from_config(config)
    revisions = list(reversed(list(script.walk_revisions("base", "heads"))))
    assert revisions, "no revisions found"
    assert revisions[-1].revision == head_revision()

    for revision in revisions:
        command.upgrade(config, "+1")
        assert revision_of(url) == revision.revision
    assert_schema_at_head(url)

    for revision in reversed(revisions):
        assert revision_of(url) == revision.revision
        command.downgrade(config, "-1")
        assert revision_of(url) == revision.down_revision

    remaining = table_names(url)
    assert not remaining & SCHEMA_TABLES, remaining
    if "alembic_version" in remaining:
        assert version_rows(url) == []

    command.upgrade(config, "head")
    assert_schema_at_head(url)


# --------------------------------------------------------------------------- command line


def test_offline_sql_needs_no_server_and_never_prints_the_password() -> None:
    database_url = "postgresql://someone:s3cretpw@db.invalid:5432/x"

    result = run(
        alembic_cli("upgrade", "head", "--sql"),
        cwd=REPO_ROOT,
        env=subprocess_env(database_url),
    )

    report = describe(result, result.stdout, result.stderr)
    assert result.returncode == 0, report
    for table in SCHEMA_TABLES:
        assert f"CREATE TABLE {table}" in result.stdout, report
    assert "INSERT INTO alembic_version (version_num) VALUES ('0001')" in result.stdout, report
    assert f"UPDATE alembic_version SET version_num='{head_revision()}'" in result.stdout, report
    assert "s3cretpw" not in result.stdout + result.stderr


def test_alembic_cli_upgrades_the_database_from_database_url(
    fresh_database_url: FreshUrl,
) -> None:
    url = fresh_database_url()
    env = subprocess_env(url)

    upgraded = run(alembic_cli("upgrade", "head"), cwd=REPO_ROOT, env=env)
    assert upgraded.returncode == 0, describe(upgraded, upgraded.stdout, upgraded.stderr)
    assert_schema_at_head(url)

    current = run(alembic_cli("current"), cwd=REPO_ROOT, env=env)
    assert current.returncode == 0, describe(current, current.stdout, current.stderr)
    assert f"{head_revision()} (head)" in current.stdout


def test_concurrent_cli_upgrades_of_one_database_all_succeed(
    fresh_database_url: FreshUrl,
) -> None:
    url = fresh_database_url()
    env = subprocess_env(url)

    processes = [
        subprocess.Popen(
            alembic_cli("upgrade", "head"),
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(CONCURRENT_PROCESSES)
    ]
    with started(processes):
        outputs = [process.communicate(timeout=SUBPROCESS_TIMEOUT) for process in processes]

    failures = [
        describe(process, out, err)
        for process, (out, err) in zip(processes, outputs, strict=True)
        if process.returncode != 0
    ]
    assert not failures, "\n\n".join(failures)
    assert_schema_at_head(url)
    assert version_rows(url) == [head_revision()]


# --------------------------------------------------------------------------- first use


def test_concurrent_first_use_auto_migrates_once_and_every_write_lands(
    fresh_database_url: FreshUrl, tmp_path: Path
) -> None:
    url = fresh_database_url()
    env = subprocess_env()

    processes = [
        subprocess.Popen(
            [sys.executable, str(WORKER_SCRIPT), url, str(number)],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for number in range(CONCURRENT_PROCESSES)
    ]
    with started(processes):
        # Every worker has imported the package; release them all at once.
        for process in processes:
            assert process.stdout is not None
            line = process.stdout.readline()
            if line.strip() != "ready":
                out, err = process.communicate(timeout=SUBPROCESS_TIMEOUT)
                pytest.fail("worker did not start:\n" + describe(process, line + out, err))
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        outputs = [process.communicate(timeout=SUBPROCESS_TIMEOUT) for process in processes]

    failures = [
        describe(process, out, err)
        for process, (out, err) in zip(processes, outputs, strict=True)
        if process.returncode != 0 or "done" not in out
    ]
    assert not failures, "\n\n".join(failures)
    assert_schema_at_head(url)
    assert version_rows(url) == [head_revision()]
    with connect(url) as connection:
        rows = connection.execute(text("SELECT conversation_id, content FROM messages")).all()
    assert sorted(tuple(row) for row in rows) == [
        (f"worker-{number}", f"hello from {number}") for number in range(CONCURRENT_PROCESSES)
    ]


def test_with_auto_migrate_off_an_empty_database_is_reported_not_migrated(
    fresh_database_url: FreshUrl, conversation_id: str
) -> None:
    url = fresh_database_url()
    dispose_all()
    session = PostgreSQLSession(
        conversation_id, database_url=url, settings=Settings(auto_migrate=False)
    )

    with pytest.raises(SchemaNotAtHeadError, match="alembic upgrade head"):
        asyncio.run(session.get_items())

    tables = table_names(url)
    assert "conversations" not in tables, tables
    assert "alembic_version" not in tables, tables

    upgrade(url)
    # A failed schema check is not remembered: the same session works once migrated...
    assert asyncio.run(session.get_items()) == []
    # ... and so does a session on a brand-new engine.
    dispose_all()
    fresh_session = PostgreSQLSession(
        conversation_id, database_url=url, settings=Settings(auto_migrate=False)
    )
    asyncio.run(fresh_session.add_items([{"role": "user", "content": "hi"}]))
    assert asyncio.run(fresh_session.get_items()) == [{"role": "user", "content": "hi"}]
    dispose_all()


@pytest.mark.parametrize("auto_migrate", [True, False], ids=["auto_migrate", "no_auto_migrate"])
def test_a_database_ahead_of_the_package_is_reported(
    fresh_database_url: FreshUrl, conversation_id: str, auto_migrate: bool
) -> None:
    url = fresh_database_url()
    upgrade(url)
    with connect(url) as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
        connection.commit()
    dispose_all()
    session = PostgreSQLSession(
        conversation_id, database_url=url, settings=Settings(auto_migrate=auto_migrate)
    )

    with pytest.raises(SchemaNotAtHeadError, match="9999"):
        asyncio.run(session.get_items())

    # Nothing was touched: the unknown revision stays, the tables stay.
    assert version_rows(url) == ["9999"]
    assert table_names(url) >= SCHEMA_TABLES
    dispose_all()


# --------------------------------------------------------------------------- packaging


def _build_wheel(source: Path, out: Path) -> subprocess.CompletedProcess[str]:
    base = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out)]
    env = subprocess_env(PIP_DISABLE_PIP_VERSION_CHECK="1")
    result = run([*base, "--no-build-isolation", str(source)], cwd=source, env=env)
    if result.returncode != 0:
        # The virtualenv's setuptools may be too old (or lack `wheel`): let pip fetch
        # the build requirements declared in pyproject.toml.
        result = run([*base, str(source)], cwd=source, env=env)
    return result


def test_the_wheel_ships_the_migrations_and_migrates_without_a_checkout(
    tmp_path: Path,
) -> None:
    # Build from a clean copy, so the checkout gets no build/ or egg-info debris.
    source = tmp_path / "source"
    shutil.copytree(
        REPO_ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            ".matrix",
            "tests",
            "build",
            "dist",
            "*.egg-info",
            "__pycache__",
            ".*_cache",
        ),
    )
    wheels = tmp_path / "wheels"
    built = _build_wheel(source, wheels)
    assert built.returncode == 0, describe(built, built.stdout, built.stderr)
    (wheel,) = wheels.glob("agents_sessions-*.whl")

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for shipped in (
            "agents_sessions/migrations/__init__.py",
            "agents_sessions/migrations/env.py",
            "agents_sessions/migrations/script.py.mako",
            "agents_sessions/migrations/versions/__init__.py",
            "agents_sessions/migrations/versions/0001_initial_schema.py",
            "agents_sessions/migrations/versions/0002_message_append_keys.py",
        ):
            assert shipped in names, sorted(names)
        unpacked = tmp_path / "unpacked"
        archive.extractall(unpacked)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    database = tmp_path / "w.db"
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "import agents_sessions\n"
        "from agents_sessions.db.migrate import migrations_directory, upgrade\n"
        f"root = {str(unpacked)!r}\n"
        "assert agents_sessions.__file__.startswith(root), agents_sessions.__file__\n"
        "assert str(migrations_directory()).startswith(root), migrations_directory()\n"
        "assert not Path('alembic.ini').exists()\n"
        f"upgrade({f'sqlite:///{database}'!r})\n"
    )
    migrated = run(
        [sys.executable, "-c", code],
        cwd=elsewhere,
        env=subprocess_env(PYTHONPATH=str(unpacked)),
    )

    assert migrated.returncode == 0, describe(migrated, migrated.stdout, migrated.stderr)
    assert_schema_at_head(f"sqlite:///{database}")


def test_sqlite_messages_keep_autoincrement_through_every_downgrade_and_upgrade(
    tmp_path: Path,
) -> None:
    # Without AUTOINCREMENT SQLite may reuse the id of a popped newest row, and
    # history order (by id) and id-based paging would break.
    url = f"sqlite:///{tmp_path / 'steps.sqlite3'}"
    config = alembic_config(database_url=url)
    command.upgrade(config, "head")
    command.downgrade(config, "0001")
    with connect(url) as connection:
        sql = connection.execute(
            text("SELECT sql FROM sqlite_master WHERE name = 'messages'")
        ).scalar_one()
    assert "AUTOINCREMENT" in sql
    command.upgrade(config, "head")
    with connect(url) as connection:
        sql = connection.execute(
            text("SELECT sql FROM sqlite_master WHERE name = 'messages'")
        ).scalar_one()
    assert "AUTOINCREMENT" in sql and "append_key" in sql


@pytest.mark.postgres_only
def test_append_keys_prepared_by_hand_without_blocking_writes_are_kept(
    postgres_server: PostgresServer,
) -> None:
    """The 0002 docstring's procedure for very large tables works as written."""
    url = postgres_server.create_database()
    config = alembic_config(database_url=url)
    command.upgrade(config, "0001")
    engine = create_engine(parse_database_url(url).url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(
                text("ALTER TABLE messages ADD COLUMN IF NOT EXISTS append_key text")
            )
            connection.execute(
                text(
                    "CREATE UNIQUE INDEX CONCURRENTLY uq_messages_conversation_id_append_key "
                    "ON messages (conversation_id, append_key) WHERE append_key IS NOT NULL"
                )
            )
    finally:
        engine.dispose()
    command.upgrade(config, "head")
    assert_schema_at_head(url)


@pytest.mark.postgres_only
def test_a_migration_url_to_another_database_than_the_stores_is_a_clear_error(
    postgres_server: PostgresServer,
) -> None:
    configured, other = postgres_server.create_database(), postgres_server.create_database()
    settings = load_settings(migration_url=configured)
    store = get_store(other, settings=settings)
    # Migrating through migration_url leaves the store's own database empty: said, not hidden.
    with pytest.raises(SchemaNotAtHeadError, match="migration_url"):
        store.ensure_schema()
    assert revision_of(other) is None


@pytest.mark.postgres_only
def test_distributable_keys_prepared_by_hand_without_blocking_writes_are_adopted(
    postgres_server: PostgresServer,
) -> None:
    """The 0004 docstring's procedure for very large tables works as written."""
    url = postgres_server.create_database()
    config = alembic_config(database_url=url)
    command.upgrade(config, "0003")
    engine = create_engine(parse_database_url(url).url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            for table in ("messages", "usage_logs"):
                connection.execute(
                    text(
                        f"CREATE UNIQUE INDEX CONCURRENTLY pk_{table}_next "
                        f"ON {table} (conversation_id, id)"
                    )
                )
        command.upgrade(config, "head")
        assert_schema_at_head(url)
        with engine.connect() as connection:
            indexes = set(
                connection.execute(
                    text("SELECT indexname FROM pg_indexes WHERE tablename = 'messages'")
                ).scalars()
            )
        # The prepared index became the key; the history index it duplicates is gone.
        assert indexes == {
            "pk_messages",
            "ix_messages_created_at",
            "uq_messages_conversation_id_append_key",
            # Later revisions' own: a branch's rows (0005) and the full-text index (0008).
            "ix_messages_conversation_id_branch_id_id",
            "ix_messages_content_search",
        }
    finally:
        engine.dispose()
