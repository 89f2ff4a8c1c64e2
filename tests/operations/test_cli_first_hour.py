"""What a new user and an operator hit in the first hour, kept fixed.

Errors that say what to do (bad URL parameters, unencoded passwords, the wrong
role, a schema behind head, an unreachable server), the database named on every
failure, and a command line that behaves like a Unix tool (a closed pipe, global
options after the subcommand, confirmations, missing directories).
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from agents_sessions import dispose_all, get_store, upgrade
from agents_sessions.cli import cli
from agents_sessions.db.migrate import head_revision, history
from agents_sessions.errors import ExitCode
from agents_sessions.ops.tenancy import row_level_security_status
from tests.conftest import PostgresServer

SCRIPT = Path(sys.executable).with_name("agents-sessions")
PASSWORD = "s3cr3t-pw"


@pytest.fixture(autouse=True)
def _close_pools() -> Iterator[None]:
    yield
    dispose_all()


def run(*args: str, input: str | None = None) -> Result:
    result = CliRunner().invoke(cli, list(args), input=input, prog_name="agents-sessions")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@pytest.fixture
def sqlite_db(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'first-hour.sqlite3'}"
    upgrade(url)
    return url


# ------------------------------------------------------------ errors that say what to do


def test_a_failing_command_names_its_database_without_the_password_and_what_to_check() -> None:
    url = f"postgresql://someone:{PASSWORD}@127.0.0.1:1/agents?connect_timeout=2"
    result = run("--database-url", url, "stats")
    assert result.exit_code == ExitCode.DATABASE, result.output
    assert "database: postgresql://someone:***@127.0.0.1:1/agents" in result.stderr
    assert "agents-sessions doctor" in result.stderr
    assert "host and port" in result.stderr
    assert PASSWORD not in result.output


@pytest.mark.parametrize(
    ("parameter", "suggestion"),
    [
        ("pool_sise=5", "pool_size"),
        ("max_overflw=3", "max_overflow"),
        ("sslmod=require", "sslmode"),
    ],
)
def test_a_misspelt_url_parameter_is_bad_configuration_naming_the_nearest_name(
    parameter: str, suggestion: str
) -> None:
    url = f"postgresql://someone:{PASSWORD}@127.0.0.1:1/agents?{parameter}"
    result = run("--database-url", url, "stats")
    assert result.exit_code == ExitCode.CONFIGURATION, result.output
    assert f"did you mean {suggestion!r}" in result.stderr
    assert PASSWORD not in result.output


@pytest.mark.postgres_only
@pytest.mark.parametrize("parameter", ["frobnicate=1", "sslmode=bogus", "keepalives=abc"])
def test_an_option_libpq_refuses_is_bad_configuration_not_an_unreachable_server(
    postgres_url: str, parameter: str
) -> None:
    separator = "&" if "?" in postgres_url else "?"
    result = run("--database-url", f"{postgres_url}{separator}{parameter}", "stats")
    assert result.exit_code == ExitCode.CONFIGURATION, result.output
    assert "libpq refuses" in result.stderr


def test_an_unencoded_at_sign_in_the_password_says_to_percent_encode_it() -> None:
    result = run("--database-url", "postgresql://app:hun@ter:2x@db.internal:5432/agents", "stats")
    assert result.exit_code == ExitCode.CONFIGURATION, result.output
    assert "percent-encode" in result.stderr and "%40" in result.stderr
    assert "ter:2x" not in result.output


def test_a_database_behind_head_names_itself_and_does_not_suggest_auto_migration(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'empty.sqlite3'}"
    result = run("--database-url", url, "stats")
    assert result.exit_code == ExitCode.SCHEMA, result.output
    assert "migrate upgrade" in result.stderr
    assert str(tmp_path / "empty.sqlite3") in result.stderr.split("database:")[0]
    assert "AUTO_MIGRATE=true" not in result.stderr
    assert "never migrate" in result.stderr


def test_a_bad_setting_is_named_by_its_environment_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AGENTS_SESSIONS_MAX_ITEM_BYTES", "lots")
    result = run("stats")
    assert result.exit_code == ExitCode.CONFIGURATION, result.output
    assert "AGENTS_SESSIONS_MAX_ITEM_BYTES" in result.stderr


def test_downgrade_by_one_step_names_the_revision_it_goes_to(sqlite_db: str) -> None:
    head = head_revision()
    (previous,) = next(info.down_revisions for info in history() if info.revision == head)
    result = run("--database-url", sqlite_db, "migrate", "downgrade", "-1", input="n\n")
    assert result.exit_code == ExitCode.PROBLEM, result.output
    assert f"from {head} to {previous} (-1)?" in result.stderr
    assert "to -1?" not in result.stderr


@pytest.fixture
def app_role_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A database migrated by the superuser, and a role that may only connect to it."""
    admin_url = postgres_server.create_database()
    role = f"first_hour_app_{uuid.uuid4().hex[:8]}"
    admin = create_engine(make_url(admin_url).set(drivername="postgresql+psycopg2"))
    with admin.begin() as connection:
        connection.execute(text(f'CREATE ROLE "{role}" LOGIN'))
        connection.execute(text(f'REVOKE CREATE ON SCHEMA public FROM "{role}", PUBLIC'))
    try:
        yield make_url(admin_url).set(username=role).render_as_string(hide_password=False)
    finally:
        dispose_all()
        with admin.begin() as connection:
            connection.execute(text(f'DROP OWNED BY "{role}"'))
            connection.execute(text(f'DROP ROLE "{role}"'))
        admin.dispose()


@pytest.mark.postgres_only
def test_migrating_or_enabling_rls_as_the_app_role_says_to_use_the_owner(
    app_role_url: str,
) -> None:
    refused = run("--database-url", app_role_url, "migrate", "upgrade")
    assert refused.exit_code == ExitCode.DATABASE, refused.output
    assert "permission denied" in refused.stderr
    assert "DATABASE_MIGRATION_URL" in refused.stderr and "owner" in refused.stderr

    owner_url = make_url(app_role_url).set(username="postgres").render_as_string(False)
    upgrade(owner_url)
    with create_engine(owner_url).begin() as connection:  # row access, no ownership
        role = make_url(app_role_url).username
        connection.execute(text(f'GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{role}"'))
    refused = run("--database-url", app_role_url, "rls", "enable", "--yes")
    assert refused.exit_code == ExitCode.DATABASE, refused.output
    assert "must be owner" in refused.stderr
    assert "DATABASE_MIGRATION_URL" in refused.stderr


# ------------------------------------------------------------ the embedded default


def test_a_missing_url_is_an_error_when_the_embedded_default_is_forbidden(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AGENTS_SESSIONS_REQUIRE_DATABASE_URL", "true")
    result = run("stats")
    assert result.exit_code == ExitCode.CONFIGURATION, result.output
    assert "DATABASE_URL" in result.stderr
    assert not (tmp_path / "xdg").exists(), "no SQLite file may be created"


# ------------------------------------------------------------ a Unix tool


def _big_conversation(url: str) -> None:
    with get_store(url).transaction() as repos:
        repos.conversations.upsert("big")
        repos.messages.append(
            "big", [{"role": "user", "content": f"{i} " + "x" * 1000} for i in range(300)]
        )


@pytest.mark.parametrize(
    "command",
    [["conversations", "show", "big"], ["conversations", "show", "big", "--json"], ["export"]],
    ids=" ".join,
)
def test_a_reader_closing_the_pipe_ends_the_command_quietly_with_status_0(
    sqlite_db: str, command: list[str]
) -> None:
    _big_conversation(sqlite_db)
    shell = (
        f"'{SCRIPT}' --database-url '{sqlite_db}' {' '.join(command)} | head -c 100 >/dev/null;"
        ' echo "status=${PIPESTATUS[0]}" >&2'
    )
    finished = subprocess.run(
        ["bash", "-c", shell], capture_output=True, text=True, timeout=120, check=False
    )
    assert "status=0" in finished.stderr, finished.stderr
    assert "Broken pipe" not in finished.stderr and "Error" not in finished.stderr


def test_global_options_are_accepted_after_the_subcommand(sqlite_db: str) -> None:
    for arguments in (
        ["stats", "--json", "--database-url", sqlite_db],
        ["migrate", "current", f"--database-url={sqlite_db}", "--json"],
    ):
        result = run(*arguments)
        assert result.exit_code == 0, (arguments, result.output)
    current = json.loads(run("migrate", "current", "--json", "--database-url", sqlite_db).stdout)
    assert current["state"] == "at_head"


def test_prune_asks_before_deleting_and_deletes_nothing_when_declined(sqlite_db: str) -> None:
    with get_store(sqlite_db).transaction() as repos:
        repos.conversations.upsert("old")
        repos.messages.append("old", [{"role": "user", "content": "hi"}])
    with get_store(sqlite_db).transaction() as repos:
        repos.connection.execute(text("UPDATE conversations SET updated_at = '2000-01-01'"))
    declined = run("--database-url", sqlite_db, "prune", "--older-than", "1d", input="n\n")
    assert declined.exit_code == ExitCode.PROBLEM, declined.output
    assert "Delete them?" in declined.stderr and "1 conversations" in declined.stderr
    with get_store(sqlite_db).read() as repos:
        assert repos.messages.count("old") == 1
    done = run("--database-url", sqlite_db, "prune", "--older-than", "1d", input="y\n")
    assert done.exit_code == 0, done.output
    with get_store(sqlite_db).read() as repos:
        assert repos.conversations.get("old") is None


@pytest.mark.postgres_only
def test_rls_enable_asks_first(postgres_server: PostgresServer) -> None:
    url = postgres_server.create_database()
    upgrade(url)
    declined = run("--database-url", url, "rls", "enable", input="n\n")
    assert declined.exit_code == ExitCode.PROBLEM, declined.output
    assert "Enable it?" in declined.stderr
    with get_store(url).read() as repos:
        assert not any(row_level_security_status(repos.connection).values())
    assert run("--database-url", url, "rls", "enable", input="y\n").exit_code == 0
    assert run("--database-url", url, "rls", "disable").exit_code == 0


def test_backup_and_export_into_a_missing_directory_are_errors(
    sqlite_db: str, tmp_path: Path
) -> None:
    missing = tmp_path / "no" / "such"
    backup = run("--database-url", sqlite_db, "backup", "--dir", str(missing))
    assert backup.exit_code == ExitCode.CONFIGURATION, backup.output
    assert "--mkdir" in backup.stderr
    export = run("--database-url", sqlite_db, "export", "-o", str(missing / "x.jsonl"))
    assert export.exit_code == ExitCode.CONFIGURATION, export.output
    assert "does not exist" in export.stderr
    assert not (tmp_path / "no").exists()
    made = run("--database-url", sqlite_db, "backup", "--dir", str(missing), "--mkdir")
    assert made.exit_code == 0, made.output


def test_a_failure_keeps_its_exit_status_when_its_reader_leaves_early(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'never-migrated.sqlite3'}"
    shell = f"'{SCRIPT}' --database-url '{url}' stats 2>&1 | head -c 5 >/dev/null;"
    shell += ' echo "status=${PIPESTATUS[0]}"'
    finished = subprocess.run(
        ["bash", "-c", shell], capture_output=True, text=True, timeout=120, check=False
    )
    assert f"status={int(ExitCode.SCHEMA)}" in finished.stdout, finished.stdout
