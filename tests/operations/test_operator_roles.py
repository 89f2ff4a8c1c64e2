"""Operator commands under row-level security: never an empty success.

With tenant row-level security enabled, the application role sees only the rows of
the tenant it acts for, and none without one. An erasure, a prune, statistics or an
export run as that role would find nothing and report success; they must act as the
tables' owner (the migration URL) or refuse and say so.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from agents_sessions import RowLevelSecurityFilteredError, dispose_all, get_store, upgrade
from agents_sessions.cli import cli
from agents_sessions.errors import ExitCode
from agents_sessions.ops.doctor import diagnose
from agents_sessions.ops.retention import erase_user
from tests.conftest import PostgresServer

pytestmark = pytest.mark.postgres_only


@dataclass
class Roles:
    owner_url: str
    app_url: str


def _as_role(url: str, role: str) -> str:
    return make_url(url).set(username=role, password=None).render_as_string(hide_password=False)


@pytest.fixture
def roles(postgres_server: PostgresServer) -> Iterator[Roles]:
    """A database owned by an owner role, an app role with row access, RLS enabled,
    and user u1 with one conversation of two messages."""
    admin_url = postgres_server.create_database()
    suffix = uuid.uuid4().hex[:8]
    owner, app = f"op_owner_{suffix}", f"op_app_{suffix}"
    admin = create_engine(make_url(admin_url).set(drivername="postgresql+psycopg2"))
    with admin.begin() as connection:
        connection.execute(text(f'CREATE ROLE "{owner}" LOGIN'))
        connection.execute(text(f'CREATE ROLE "{app}" LOGIN'))
        connection.execute(text(f'GRANT CREATE, USAGE ON SCHEMA public TO "{owner}"'))
        connection.execute(text(f'GRANT USAGE ON SCHEMA public TO "{app}"'))
        connection.execute(
            text(
                f'ALTER DEFAULT PRIVILEGES FOR ROLE "{owner}" IN SCHEMA public '
                f'GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO "{app}"'
            )
        )
    owner_url, app_url = _as_role(admin_url, owner), _as_role(admin_url, app)
    upgrade(owner_url)
    with get_store(owner_url).transaction() as repos:
        repos.conversations.upsert("c-u1", user_id="u1")
        repos.messages.append(
            "c-u1", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
        )
    result = invoke("--database-url", owner_url, "rls", "enable", "--yes")
    assert result.exit_code == 0, result.output
    try:
        yield Roles(owner_url=owner_url, app_url=app_url)
    finally:
        dispose_all()
        database = make_url(admin_url).database
        with admin.begin() as connection:
            connection.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    f"WHERE datname = '{database}' AND pid <> pg_backend_pid()"
                )
            )
            for role in (owner, app):
                connection.execute(text(f'REASSIGN OWNED BY "{role}" TO CURRENT_USER'))
                connection.execute(text(f'DROP OWNED BY "{role}"'))
                connection.execute(text(f'DROP ROLE "{role}"'))
        admin.dispose()


def invoke(*args: str) -> Result:
    result = CliRunner().invoke(cli, list(args), prog_name="agents-sessions")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def _u1_messages(owner_url: str) -> int:
    with get_store(owner_url).read() as repos:
        return repos.messages.count("c-u1")


def test_erase_as_a_role_row_level_security_filters_refuses_instead_of_an_empty_success(
    roles: Roles,
) -> None:
    result = invoke("--database-url", roles.app_url, "erase", "--user", "u1", "--yes")
    assert result.exit_code == ExitCode.DATABASE, result.output
    assert "erased" not in result.stdout
    assert "row-level security" in result.stderr
    assert "DATABASE_MIGRATION_URL" in result.stderr
    assert _u1_messages(roles.owner_url) == 2


def test_prune_stats_and_export_as_a_filtered_role_refuse_too(roles: Roles) -> None:
    for command in (
        ["prune", "--older-than", "1s", "--yes"],
        ["prune", "--older-than", "1s", "--dry-run"],
        ["stats"],
        ["export", "-o", "-"],
        ["conversations", "list"],
    ):
        result = invoke("--database-url", roles.app_url, *command)
        assert result.exit_code == ExitCode.DATABASE, (command, result.output)
        assert "row-level security" in result.stderr, command
    assert _u1_messages(roles.owner_url) == 2


def test_erase_acts_as_the_owner_through_the_migration_url_when_the_app_role_is_filtered(
    roles: Roles, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", roles.app_url)
    monkeypatch.setenv("DATABASE_MIGRATION_URL", roles.owner_url)
    result = invoke("erase", "--user", "u1", "--yes", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert (document["conversations"], document["messages"]) == (1, 2)
    assert "://op_owner_" in document["database"]  # the database it used
    assert "runs as the owner" in result.stderr
    assert _u1_messages(roles.owner_url) == 0


def test_the_python_erase_refuses_a_store_whose_role_is_filtered(roles: Roles) -> None:
    with pytest.raises(RowLevelSecurityFilteredError, match="row-level security"):
        erase_user(get_store(roles.app_url), "u1")
    assert _u1_messages(roles.owner_url) == 2


def test_doctor_warns_that_row_level_security_filters_the_role(roles: Roles) -> None:
    as_app = diagnose(roles.app_url).check("row_level_security")
    assert as_app.status == "warn"
    assert as_app.advice is not None and "DATABASE_MIGRATION_URL" in as_app.advice
    assert diagnose(roles.owner_url).check("row_level_security").status == "ok"
    shown = invoke("--database-url", roles.app_url, "doctor")
    assert "row_level_security" in shown.stdout and "WARN" in shown.stdout
