"""Destructive commands mark the WAL with a named restore point first, and say so.

``erase``, ``prune``, ``conversations delete``, ``import`` into a database that holds
conversations and ``migrate downgrade`` call ``pg_create_restore_point`` before they
change anything and print its name once (stderr; ``restore_point`` in ``--json``).
A role that may not create one, and SQLite, get one line saying why, and the
command still runs. That recovering to such a point really undoes the command is
tests/cluster/test_point_in_time_recovery.py's drill.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import text, update
from sqlalchemy.engine import make_url

from agents_sessions import dispose_all, get_store
from agents_sessions.cli import cli
from agents_sessions.db.migrate import history
from agents_sessions.db.models import conversations_table
from agents_sessions.ops.recovery import MAX_RESTORE_POINT_NAME_BYTES, restore_point_name
from tests.conftest import PostgresServer

NAME = re.compile(r"^agents-sessions-(?P<command>[a-z-]+)-\d{8}T\d{6}\.\d{3}Z$")


@pytest.fixture(autouse=True)
def _close_pools() -> Iterator[None]:
    yield
    dispose_all()


def run(url: str, *args: str, input: str | None = None) -> Result:
    """``agents-sessions --database-url URL ARGS...`` in this process."""
    result = CliRunner().invoke(
        cli, ["--database-url", url, *args], input=input, prog_name="agents-sessions"
    )
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def migrated(url: str) -> str:
    result = run(url, "migrate", "upgrade")
    assert result.exit_code == 0, result.output
    return url


def fill(url: str, *conversations: tuple[str, str]) -> None:
    """(conversation id, user id) pairs, one message each."""
    store = get_store(url)
    for conversation_id, user_id in conversations:
        with store.transaction() as repositories:
            repositories.conversations.upsert(conversation_id, user_id=user_id)
            repositories.messages.append(conversation_id, [{"role": "user", "content": "hi"}])


def assert_created(result: Result, command: str) -> dict[str, Any]:
    """The command succeeded with a restore point for ``command``, named once on stderr."""
    assert result.exit_code == 0, result.output
    point: dict[str, Any] = json.loads(result.stdout)["restore_point"]
    assert point["created"] is True, point
    match = NAME.match(point["name"])
    assert match is not None and match["command"] == command, point["name"]
    assert point["lsn"] and point["at"]
    assert result.stderr.count(point["name"]) == 2  # the line names it, then says to use it
    assert result.stderr.count("restore point") == 1
    return point


@pytest.fixture
def postgres_database(postgres_server: PostgresServer) -> str:
    return migrated(postgres_server.create_database())


def test_each_destructive_command_creates_a_named_restore_point_first(
    postgres_database: str, tmp_path: Path
) -> None:
    url = postgres_database
    fill(url, ("c-delete", "ann"), ("c-erase", "bob"), ("c-old", "cid"), ("c-kept", "dan"))

    assert_created(
        run(url, "conversations", "delete", "c-delete", "--yes", "--json"), "conversations-delete"
    )
    assert_created(run(url, "erase", "--user", "bob", "--yes", "--json"), "erase")

    with get_store(url).engine.begin() as connection:
        connection.execute(
            update(conversations_table)
            .where(conversations_table.c.id == "c-old")
            .values(updated_at=datetime.now(timezone.utc) - timedelta(days=100))
        )
    pruned = run(url, "prune", "--older-than", "90d", "--yes", "--json")
    assert_created(pruned, "prune")
    assert json.loads(pruned.stdout)["conversations"] == 1

    export = tmp_path / "export.jsonl"
    assert run(url, "export", "--output", str(export)).exit_code == 0
    assert_created(run(url, "import", str(export), "--json"), "import")

    downgraded = run(url, "migrate", "downgrade", "-1", "--yes")
    assert downgraded.exit_code == 0, downgraded.output
    (line,) = [line for line in downgraded.stderr.splitlines() if "restore point" in line]
    assert re.search(r"'agents-sessions-migrate-downgrade-\d{8}T\d{6}\.\d{3}Z'", line), line
    assert history()[1].revision in downgraded.stdout  # it did downgrade


def test_nothing_destroyed_means_no_restore_point(
    postgres_database: str, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    url = postgres_database
    fill(url, ("c-1", "ann"))
    # A dry run, a prune with nothing to delete, a declined erase.
    dry = run(url, "prune", "--older-than", "1d", "--dry-run", "--json")
    assert dry.exit_code == 0 and "restore_point" not in json.loads(dry.stdout)
    nothing = run(url, "prune", "--older-than", "1d", "--yes", "--json")
    assert json.loads(nothing.stdout)["restore_point"] is None
    declined = run(url, "erase", "--user", "ann", input="n\n")
    assert declined.exit_code != 0 and "restore point" not in declined.stderr
    # Importing into an empty database overwrites nothing.
    export = tmp_path / "export.jsonl"
    assert run(url, "export", "--output", str(export)).exit_code == 0
    empty = migrated(postgres_server.create_database())
    imported = run(empty, "import", str(export), "--json")
    assert imported.exit_code == 0, imported.output
    assert json.loads(imported.stdout)["restore_point"] is None
    for result in (dry, nothing, imported):
        assert "restore point" not in result.stderr


@pytest.fixture
def app_role(postgres_database: str, postgres_server: PostgresServer) -> Iterator[str]:
    """A URL of a login role that may change the tables but not create restore points."""
    role = f"as_rp_{uuid.uuid4().hex[:8]}"
    postgres_server.execute(f'CREATE ROLE "{role}" LOGIN')
    engine = get_store(postgres_database).engine
    with engine.begin() as connection:
        connection.execute(
            text(
                "GRANT SELECT, INSERT, UPDATE, DELETE ON conversations, messages, usage_logs, "
                f'conversation_branches, run_states, append_keys TO "{role}"'
            )
        )
        connection.execute(text(f'GRANT SELECT ON alembic_version TO "{role}"'))
    try:
        yield make_url(postgres_database).set(username=role).render_as_string(hide_password=False)
    finally:
        dispose_all()
        with engine.begin() as connection:
            # Also revokes what was granted on pg_create_restore_point in this database.
            connection.execute(text(f'DROP OWNED BY "{role}"'))
        postgres_server.execute(f'DROP ROLE "{role}"')


def test_a_role_that_may_not_is_told_once_how_to_allow_it_and_the_command_runs(
    app_role: str, postgres_database: str
) -> None:
    fill(app_role, ("c-1", "ann"), ("c-2", "bob"))
    role = str(make_url(app_role).username)

    result = run(app_role, "erase", "--user", "ann", "--yes", "--json")

    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["conversations"] == 1  # erased all the same
    point = document["restore_point"]
    assert point["created"] is False and point["name"] is None
    grant = f"GRANT EXECUTE ON FUNCTION pg_create_restore_point(text) TO {role}"
    assert grant in point["skipped_because"]
    # The moment is still known: recovery can target the time instead.
    assert point["at"] is not None
    (line,) = result.stderr.splitlines()
    assert line.startswith("no restore point before this erase") and "recovery_target_time" in line

    # The advice works. Functions belong to a database: the grant is made in this one.
    with get_store(postgres_database).engine.begin() as connection:
        connection.execute(text(grant))
    allowed = run(app_role, "erase", "--user", "bob", "--yes", "--json")
    assert_created(allowed, "erase")


def test_sqlite_has_no_restore_points_and_says_so(tmp_path: Path) -> None:
    url = migrated(f"sqlite:///{tmp_path / 'sessions.sqlite3'}")
    fill(url, ("c-1", "ann"))

    result = run(url, "erase", "--user", "ann", "--yes", "--json")

    assert result.exit_code == 0, result.output
    point = json.loads(result.stdout)["restore_point"]
    assert (
        point["created"] is False
        and "SQLite has no point-in-time recovery" in (point["skipped_because"])
    )
    assert result.stderr.count("no restore point") == 1


def test_restore_point_names_fit_postgresql_and_sort_by_time() -> None:
    moment = datetime(2026, 11, 30, 4, 5, 6, 789_000, tzinfo=timezone.utc)
    name = restore_point_name("migrate-downgrade", moment)
    assert name == "agents-sessions-migrate-downgrade-20261130T040506.789Z"
    assert len(name.encode()) < MAX_RESTORE_POINT_NAME_BYTES
    later = restore_point_name("migrate-downgrade", moment + timedelta(milliseconds=1))
    assert name < later
    with pytest.raises(ValueError, match="too long"):
        restore_point_name("x" * 40, moment)
