"""``agents-sessions backup`` and ``restore``: whole-database round trips, retention, errors.

The PostgreSQL round trip really drops the database and restores into a new empty
one of the same name with the ``pg_dump``/``psql`` on PATH; the SQLite one deletes
the file. Both then compare every row of the three tables, ids included.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import sqlite3
import subprocess
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from click.testing import CliRunner, Result
from sqlalchemy.engine import make_url

from agents_sessions import ConfigurationError, dispose_all, get_store
from agents_sessions.cli import cli
from agents_sessions.errors import ExitCode
from agents_sessions.ops.backup import (
    backup_database,
    backup_file_name,
    backup_label,
    libpq_arguments,
)
from agents_sessions.ops.restore_guard import psql_supports_restrict
from tests.conftest import PostgresServer
from tests.operations.test_cli_data import ITEMS, FreshUrl, fill_store, items_of, table_rows
from tests.support.pgcluster import Cluster

PASSWORD = "s3cret-Pa55 'quoted'"


@pytest.fixture(autouse=True)
def _close_pools() -> Iterator[None]:
    yield
    dispose_all()


def run(url: str, *args: str) -> Result:
    """``agents-sessions --database-url URL ARGS...`` in this process."""
    result = CliRunner().invoke(cli, ["--database-url", url, *args], prog_name="agents-sessions")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def backup(url: str, directory: Path, *args: str) -> dict[str, Any]:
    result = run(url, "backup", "--dir", str(directory), "--mkdir", "--json", *args)
    assert result.exit_code == 0, result.output
    summary: dict[str, Any] = json.loads(result.stdout)
    return summary


def restore(url: str, path: Path) -> Result:
    return run(url, "restore", str(path), "--json")


# --------------------------------------------------------------------------- round trips


def test_postgres_backup_drop_restore_keeps_every_row(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    url = postgres_server.create_database()
    conversation_ids = fill_store(url)
    before = table_rows(url)

    summary = backup(url, tmp_path / "backups")

    path = Path(summary["file"])
    assert path.parent == tmp_path / "backups"
    assert path.name.startswith("agents-sessions-") and path.name.endswith(".sql.gz")
    assert summary["size_bytes"] == path.stat().st_size > 0
    assert path.stat().st_mode & 0o077 == 0  # the owner's only: it holds every conversation
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left over

    name = make_url(url).database
    dispose_all()  # our pools hold connections into it
    postgres_server.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    postgres_server.execute(f'CREATE DATABASE "{name}"')
    result = restore(url, path)

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["size_bytes"] == path.stat().st_size
    after = table_rows(url)
    assert after == before  # every row, ids and timestamps included
    for conversation_id in conversation_ids:
        assert items_of(after, conversation_id) == ITEMS
    # The identity sequences came back too: new rows get new ids, history stays ordered.
    with get_store(url).transaction() as repos:
        repos.messages.append("alice-conv-0", [{"role": "user", "content": "after restore"}])
    newest = table_rows(url)["messages"]
    assert max(row[0] for row in newest) > max(row[0] for row in before["messages"])


def test_sqlite_backup_delete_restore_keeps_every_row(tmp_path: Path) -> None:
    database = tmp_path / "data" / "sessions.sqlite3"
    url = f"sqlite:///{database}"
    fill_store(url)
    before = table_rows(url)

    summary = backup(url, tmp_path / "backups")

    path = Path(summary["file"])
    assert path.name.startswith("agents-sessions-sessions-") and path.name.endswith(".sqlite3.gz")
    dispose_all()
    for leftover in database.parent.iterdir():  # the file and its -wal/-shm
        leftover.unlink()
    result = restore(url, path)

    assert result.exit_code == 0, result.output
    assert table_rows(url) == before
    with get_store(url).read() as repos:
        assert repos.messages.all("bob-conv-1") == ITEMS


def test_sqlite_backup_is_consistent_while_a_writer_holds_uncommitted_changes(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'live.sqlite3'}"
    fill_store(url, users=("alice",))
    before = table_rows(url)
    store = get_store(url)
    with store.transaction() as repos:  # a write in progress (holds the write lock)
        repos.messages.append("alice-conv-0", [{"role": "user", "content": "uncommitted"}])
        summary = backup(url, tmp_path / "backups")
    restored = f"sqlite:///{tmp_path / 'restored.sqlite3'}"
    assert restore(restored, Path(summary["file"])).exit_code == 0
    assert table_rows(restored) == before


# --------------------------------------------------------------------------- refusals


def test_restore_refuses_a_database_that_already_has_tables(
    fresh_database_url: FreshUrl, tmp_path: Path
) -> None:
    source = fresh_database_url()
    fill_store(source, users=("alice",))
    path = Path(backup(source, tmp_path / "backups")["file"])
    target = fresh_database_url()
    get_store(target).ensure_schema()  # migrated: our tables exist, empty
    before = table_rows(target)

    result = restore(target, path)

    assert result.exit_code == ExitCode.PROBLEM, result.output
    assert "already holds tables" in result.stderr
    assert table_rows(target) == before


def test_restore_rejects_a_file_that_is_not_a_backup_of_that_kind(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    not_gzip = tmp_path / "notes.sql.gz"
    not_gzip.write_text("hello")
    sqlite_backup = tmp_path / "other.sqlite3.gz"
    sqlite_backup.write_bytes(gzip.compress(b"SQLite format 3\x00" + bytes(100)))
    url = postgres_server.create_database()

    for path, message in ((not_gzip, "not a gzip"), (sqlite_backup, "not a PostgreSQL")):
        result = restore(url, path)
        assert result.exit_code == ExitCode.CONFIGURATION, result.output
        assert message in result.stderr


# --------------------------------------------------------------------------- retention


def test_keep_days_deletes_only_old_backups_of_this_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sessions.sqlite3'}"
    fill_store(url, users=("alice",))
    directory = tmp_path / "backups"
    directory.mkdir()
    now = datetime.now(timezone.utc)
    label = backup_label(url)

    def ours(days: int, label: str = label) -> Path:
        path = directory / backup_file_name(label, "sqlite", now - timedelta(days=days))
        path.write_bytes(b"old")
        return path

    expired = [ours(8), ours(30)]
    kept = [
        ours(6),
        ours(1),
        # Another database's backup, even one whose name reads the same.
        ours(30, label=backup_label(f"sqlite:///{tmp_path / 'elsewhere' / 'sessions.sqlite3'}")),
        directory / backup_file_name(label, "postgresql", now - timedelta(days=30)),
        directory / "agents-sessions-sessions-notes.txt",
        directory / "precious.sql.gz",
        directory / ("x" + expired[0].name),
        # Named before labels carried a fingerprint: never deleted automatically.
        directory / "agents-sessions-sessions-20000101T000000000000Z.sqlite3.gz",
    ]
    for path in kept[3:]:
        path.write_bytes(b"not ours")

    summary = backup(url, directory, "--keep-days", "7")

    assert sorted(summary["removed"]) == sorted(map(str, expired))
    remaining = set(directory.iterdir())
    assert remaining == {*kept, Path(summary["file"])}


def test_backup_labels_tell_apart_look_alike_names_and_servers() -> None:
    labels = {
        backup_label("postgresql://u@db1:5432/adv_bk"),
        backup_label("postgresql://u@db1:5432/adv_bk_é"),
        backup_label("postgresql://u@db1:5432/adv_bk%20"),
        backup_label("postgresql://u@db2:5432/adv_bk"),
        backup_label("postgresql://u@db1:5433/adv_bk"),
        backup_label("postgresql://u@db1/adv_bk?host=db3"),
        backup_label("sqlite:////srv/a/adv_bk.sqlite3"),
        backup_label("sqlite:////srv/b/adv_bk.sqlite3"),
    }
    assert len(labels) == 8
    # The same database reached as another user, or with other options, is the same.
    assert backup_label("postgresql://u@DB1/adv_bk") == backup_label(
        "postgresql://other:pw@db1:5432/adv_bk?sslmode=require&pool_size=3"
    )
    for label in labels:
        assert re.fullmatch(r"[A-Za-z0-9_.-]+", label) and not label.startswith((".", "-"))
    hostile = backup_label("postgresql://u@h/" + "../" * 50 + "x\x00y")
    assert "/" not in hostile and len(hostile) <= 60


# --------------------------------------------------------------------------- tools


def test_missing_pg_dump_is_a_tool_error(
    postgres_server: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = postgres_server.create_database()
    get_store(url).ensure_schema()
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))

    result = run(url, "backup", "--dir", str(tmp_path / "backups"), "--mkdir")

    assert result.exit_code == ExitCode.TOOL
    assert "pg_dump was not found on PATH" in result.stderr
    assert not list((tmp_path / "backups").iterdir())


def test_a_failed_pg_dump_leaves_no_file_and_never_shows_the_password(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    server = make_url(postgres_server.create_database())
    url = server.set(password=PASSWORD, database="no_such_database_here").render_as_string(
        hide_password=False
    )

    result = run(url, "backup", "--dir", str(tmp_path / "backups"), "--mkdir")

    assert result.exit_code == ExitCode.TOOL, result.output
    assert "pg_dump failed" in result.stderr
    assert "no_such_database_here" in result.stderr  # pg_dump's own message is shown
    assert "s3cret" not in result.output
    assert not list((tmp_path / "backups").iterdir())  # no backup, no temporary


def test_libpq_arguments_keep_the_password_off_the_command_line() -> None:
    arguments = libpq_arguments(
        "postgresql+psycopg2://app:p%40ss%27w@db.example:6432/agents"
        "?sslmode=require&pool_size=20&max_overflow=5&application_name=nightly job"
    )

    assert arguments.conninfo == (
        "host='db.example' port='6432' user='app' dbname='agents' "
        "application_name='nightly job' sslmode='require'"
    )
    assert arguments.environment == {"PGPASSWORD": "p@ss'w"}
    assert "p@ss" not in repr(arguments)
    with pytest.raises(ConfigurationError, match="sslpassword"):
        libpq_arguments("postgresql://app@db/agents?sslpassword=secret")
    with pytest.raises(ConfigurationError, match="not a PostgreSQL URL"):
        libpq_arguments("sqlite:///x.db")


def test_backup_and_restore_authenticate_with_a_password(
    throwaway_cluster: Cluster, tmp_path: Path
) -> None:
    # Our own server, so its authentication can be switched to passwords (SCRAM).
    cluster = throwaway_cluster
    cluster.execute("ALTER ROLE postgres PASSWORD %s", [PASSWORD])
    hba = cluster.data_dir / "pg_hba.conf"
    hba.write_text(hba.read_text().replace("127.0.0.1/32 trust", "127.0.0.1/32 scram-sha-256"))
    cluster.execute("SELECT pg_reload_conf()")
    cluster.execute('CREATE DATABASE "source"')
    cluster.execute('CREATE DATABASE "target"')
    no_password = cluster.url("source")
    with_password = cluster.url("source", password=PASSWORD)
    probe = subprocess.run(
        ["psql", "--no-password", "--dbname", no_password, "-c", "SELECT 1"],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "PGPASSWORD"},
        check=False,
    )
    assert probe.returncode != 0  # the server really asks for the password now
    fill_store(with_password, users=("alice",))
    before = table_rows(with_password)

    result = backup_database(with_password, tmp_path / "backups", keep_days=None)
    restored = run(cluster.url("target", password=PASSWORD), "restore", str(result.path))

    assert restored.exit_code == 0, restored.output
    assert PASSWORD not in restored.output
    assert table_rows(cluster.url("target", password=PASSWORD)) == before


# --------------------------------------------------------------------------- tampered files


def _tampered_dump(path: Path, tamper: Any) -> Path:
    """A copy of the pg_dump backup ``path`` with its SQL text rewritten by ``tamper``."""
    sql = gzip.decompress(path.read_bytes()).decode()
    altered = path.with_name("altered-" + path.name)
    altered.write_bytes(gzip.compress(tamper(sql).encode()))
    return altered


def _without_guard(sql: str) -> str:
    return "\n".join(line for line in sql.splitlines() if "restrict " not in line) + "\n"


@pytest.mark.parametrize(
    "plant",
    [
        # pg_dump's guard removed and a shell command on a line of its own.
        lambda sql, cmd: _without_guard(sql).replace(
            "SET lock_timeout = 0;", f"SET lock_timeout = 0;\n\\! {cmd}"
        ),
        # The same, hidden after SQL on one line (psql reads a backslash mid-line too).
        lambda sql, cmd: _without_guard(sql).replace(
            "SET lock_timeout = 0;", f"SET lock_timeout = 0; \\! {cmd}"
        ),
        # The guard kept, but lifted with its own key (the key is in the file).
        lambda sql, cmd: sql.replace(
            "SET lock_timeout = 0;",
            "SET lock_timeout = 0;\n\\unrestrict "
            + sql.split("\\restrict ", 1)[1].split("\n", 1)[0]
            + f"\n\\! {cmd}",
        ),
    ],
    ids=["own-line", "mid-line", "guard-lifted"],
)
def test_restore_never_runs_a_meta_command_planted_in_a_backup(
    postgres_server: PostgresServer, tmp_path: Path, plant: Any
) -> None:
    source = postgres_server.create_database()
    fill_store(source, users=("alice",))
    original = Path(backup(source, tmp_path / "backups")["file"])
    marker = tmp_path / "planted-command-ran"
    altered = _tampered_dump(original, lambda sql: plant(sql, f"touch {marker}"))
    target = postgres_server.create_database()

    result = restore(target, altered)

    assert result.exit_code == ExitCode.CONFIGURATION, result.output
    assert "meta-command" in result.stderr and "nothing was restored" in result.stderr
    assert not marker.exists()
    assert table_rows_or_none(target) is None  # nothing restored


def table_rows_or_none(url: str) -> Any:
    """None when the database holds no tables at all."""
    engine = sqlalchemy.create_engine(url.replace("postgresql://", "postgresql+psycopg2://", 1))
    try:
        with engine.connect() as connection:
            count = connection.execute(
                sqlalchemy.text(
                    "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN "
                    "('pg_catalog', 'information_schema')"
                )
            ).scalar_one()
    finally:
        engine.dispose()
    return None if count == 0 else count


def test_restore_accepts_backslashes_inside_copy_data(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    source = postgres_server.create_database()
    store = get_store(source)
    tricky = [{"role": "user", "content": "\\! touch /tmp/x\n\\.\n\\restrict k"}]
    with store.transaction() as repos:
        repos.messages.append("c", tricky)
    path = Path(backup(source, tmp_path / "backups")["file"])
    target = postgres_server.create_database()

    assert restore(target, path).exit_code == 0
    with get_store(target).read() as repos:
        assert repos.messages.all("c") == tricky


@pytest.mark.parametrize(
    "planted",
    [
        "CREATE TRIGGER copy_out AFTER INSERT ON messages BEGIN "
        "INSERT INTO messages (conversation_id, role, content, item, created_at) "
        "SELECT 'attacker', new.role, new.content, new.item, new.created_at; END",
        "CREATE VIEW everything AS SELECT * FROM messages",
        "CREATE TABLE stash (x text)",
    ],
    ids=["trigger", "view", "table"],
)
def test_sqlite_restore_refuses_schema_objects_that_are_not_ours(
    tmp_path: Path, planted: str
) -> None:
    database = tmp_path / "source.sqlite3"
    fill_store(f"sqlite:///{database}", users=("alice",))
    dispose_all()
    with sqlite3.connect(database) as connection:
        connection.execute(planted)
    connection.close()
    path = Path(backup(f"sqlite:///{database}", tmp_path / "backups")["file"])
    destination = tmp_path / "restored.sqlite3"

    result = restore(f"sqlite:///{destination}", path)

    assert result.exit_code == ExitCode.CONFIGURATION, result.output
    assert "never creates" in result.stderr
    assert planted.split()[1].lower() in result.stderr
    assert not destination.exists()


def test_restore_requires_a_psql_that_knows_restrict() -> None:
    assert psql_supports_restrict("psql (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)")
    assert psql_supports_restrict("psql (PostgreSQL) 18.1")
    assert psql_supports_restrict("psql (PostgreSQL) 17.6")
    assert not psql_supports_restrict("psql (PostgreSQL) 17.5")
    assert not psql_supports_restrict("psql (PostgreSQL) 15.13")
    assert not psql_supports_restrict("psql (PostgreSQL) 12.22")
    assert not psql_supports_restrict("something else")
