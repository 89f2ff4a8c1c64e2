"""Least-privilege roles: the owner migrates, the application role can only read and write rows.

Against the real PostgreSQL server: roles are cluster-wide, so each test creates roles
with names of its own and drops them at the end.
"""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg2
import psycopg2.errors
import pytest
from agents import Agent, Runner
from agents.testing import ModelStep, ScriptedModel, assistant_message
from agents.usage import Usage
from click.testing import CliRunner
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url

from agents_sessions import PostgreSQLSession, SchemaNotAtHeadError, dispose_all, load_settings
from agents_sessions.cli import cli
from agents_sessions.db.migrate import downgrade, head_revision, upgrade
from agents_sessions.errors import DatabaseError
from agents_sessions.ops.roles import least_privilege_sql
from tests.conftest import PostgresServer

pytestmark = [
    pytest.mark.postgres_only,
    pytest.mark.not_on_citus("the roles migrate empty databases themselves"),
]

TABLES = ("conversations", "messages", "usage_logs", "alembic_version")
INSUFFICIENT_PRIVILEGE = "42501"


@dataclass
class Roles:
    """A fresh database with an owner and an application role (passwords set)."""

    admin_url: URL
    owner: str
    app: str
    owner_password: str
    app_password: str

    @property
    def database(self) -> str:
        assert self.admin_url.database is not None
        return self.admin_url.database

    def url_for(self, role: str) -> str:
        password = self.owner_password if role == self.owner else self.app_password
        return self.admin_url.set(username=role, password=password).render_as_string(
            hide_password=False
        )

    @property
    def owner_url(self) -> str:
        return self.url_for(self.owner)

    @property
    def app_url(self) -> str:
        return self.url_for(self.app)

    def libpq_admin_url(self) -> str:
        """The admin URL as psql takes it (no SQLAlchemy +driver suffix)."""
        return self.admin_url.set(drivername="postgresql").render_as_string(hide_password=False)

    def admin_execute(self, *statements: str) -> None:
        engine = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                for statement in statements:
                    connection.execute(text(statement))
        finally:
            engine.dispose()

    def set_passwords(self) -> None:
        # The operator's step after the script (which never contains a password):
        # scram/md5 servers (testcontainers) need them; trust servers ignore them.
        self.admin_execute(
            f"ALTER ROLE {quote(self.owner)} PASSWORD '{self.owner_password}'",
            f"ALTER ROLE {quote(self.app)} PASSWORD '{self.app_password}'",
        )


def quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


@contextmanager
def fresh_roles(postgres_server: PostgresServer, owner: str, app: str) -> Iterator[Roles]:
    """A new database, and two role names; the roles are dropped at the end."""
    roles = Roles(
        admin_url=make_url(postgres_server.create_database(prefix="agents_sessions_roles")),
        owner=owner,
        app=app,
        owner_password=secrets.token_hex(16),
        app_password=secrets.token_hex(16),
    )
    try:
        yield roles
    finally:
        dispose_all()  # pooled connections log in as these roles
        engine = create_engine(roles.admin_url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                # One role at a time: DROP OWNED BY both at once trips over the owner's
                # default privileges that name the app role. DROP OWNED also revokes
                # the CONNECT grants on the database (a shared object).
                for role in (app, owner):
                    exists = connection.execute(
                        text("SELECT count(*) FROM pg_roles WHERE rolname = :role"),
                        {"role": role},
                    ).scalar_one()
                    if exists:
                        connection.execute(text(f"DROP OWNED BY {quote(role)}"))
        finally:
            engine.dispose()
        postgres_server.execute(f"DROP DATABASE IF EXISTS {quote(roles.database)} WITH (FORCE)")
        for role in (app, owner):
            postgres_server.execute(f"DROP ROLE IF EXISTS {quote(role)}")


def _suffix() -> str:
    return uuid.uuid4().hex[:10]


def roles_sql_via_cli(*args: str) -> str:
    result = CliRunner().invoke(cli, ["roles", "sql", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def apply_with_psql(roles: Roles, script: str) -> subprocess.CompletedProcess[str]:
    """``... | psql "$ADMIN_URL" -v ON_ERROR_STOP=1``, as the deployment guide says."""
    psql = shutil.which("psql")
    assert psql is not None, "psql (postgresql-client) is needed: the documented step uses it"
    return subprocess.run(
        [psql, roles.libpq_admin_url(), "-v", "ON_ERROR_STOP=1", "-q"],
        input=script,
        capture_output=True,
        text=True,
        timeout=60,
    )


def apply_with_driver(roles: Roles, script: str) -> None:
    connection = psycopg2.connect(roles.libpq_admin_url())
    try:
        connection.autocommit = True  # the script has its own BEGIN/COMMIT
        with connection.cursor() as cursor:
            cursor.execute(script)
    finally:
        connection.close()


def table_owners(roles: Roles) -> dict[str, str]:
    engine = create_engine(roles.admin_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                text("SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'public'")
            ).all()
    finally:
        engine.dispose()
    return {name: owner for name, owner in rows}


def scripted_turn(reply: str) -> ScriptedModel:
    return ScriptedModel(
        [
            ModelStep(
                output=[assistant_message(reply)],
                usage=Usage(requests=1, input_tokens=20, output_tokens=5, total_tokens=25),
            )
        ]
    )


async def exercise_session_api(roles: Roles) -> None:
    """Everything the application does, connected as the application role."""
    settings = load_settings(auto_migrate=False)  # AGENTS_SESSIONS_AUTO_MIGRATE=false
    conversation = f"conv-{uuid.uuid4()}"
    session = PostgreSQLSession(
        conversation,
        database_url=roles.app_url,
        user_id="user-1",
        metadata={"channel": "web"},
        settings=settings,
    )
    await session.add_items(
        [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}]
    )
    assert [item["content"] for item in await session.get_items()] == ["one", "two"]
    assert await session.pop_item() == {"role": "user", "content": "two"}
    await session.clear_session()
    assert await session.get_items() == []

    agent = Agent(name="assistant", model=scripted_turn("Hello from the app role"))
    result = await Runner.run(agent, "Hi", session=session)
    assert result.final_output == "Hello from the app role"
    # Recorded during the run already; the explicit call names the model.
    assert await session.record_usage(result, model="scripted") == 0
    stored = await session.get_items()
    assert stored[0] == {"role": "user", "content": "Hi"}
    assert len(stored) == 2

    with session.store.read() as repos:
        page = repos.conversations.list_by_user("user-1", limit=10)
        totals = repos.usage.totals_for_conversation(conversation)
    assert [record.id for record in page.conversations] == [conversation]
    assert (totals.requests, totals.total_tokens) == (1, 25)
    with session.store.transaction() as repos:
        repos.conversations.delete(conversation)
    with session.store.read() as repos:
        assert repos.conversations.get(conversation) is None


def forbidden_statements() -> list[str]:
    statements = []
    for table in TABLES:
        statements += [
            f"DROP TABLE {table}",
            f"ALTER TABLE {table} ADD COLUMN intruder integer",
            f"TRUNCATE {table}",
        ]
    statements += [
        "CREATE TABLE intruder (id integer)",
        "CREATE VIEW intruder AS SELECT 1 AS one",
        "INSERT INTO alembic_version (version_num) VALUES ('9999')",
        "UPDATE alembic_version SET version_num = '9999'",
        "DELETE FROM alembic_version",
    ]
    return statements


def assert_each_is_denied(url: str, statements: list[str]) -> None:
    connection = psycopg2.connect(
        make_url(url).set(drivername="postgresql").render_as_string(False)
    )
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_user")
            row = cursor.fetchone()
            assert row is not None and row[0] == make_url(url).username
            for statement in statements:
                with pytest.raises(psycopg2.errors.InsufficientPrivilege) as denied:
                    cursor.execute(statement)
                assert denied.value.pgcode == INSUFFICIENT_PRIVILEGE, statement
    finally:
        connection.close()


@pytest.fixture(scope="module")
def migrated_roles(postgres_server: PostgresServer) -> Iterator[Roles]:
    """The documented flow on a fresh database: script via psql, migrate as the owner."""
    suffix = _suffix()
    with fresh_roles(postgres_server, f"agents_owner_{suffix}", f"agents_app_{suffix}") as roles:
        script = roles_sql_via_cli(
            "--owner", roles.owner, "--app", roles.app, "--database", roles.database
        )
        applied = apply_with_psql(roles, script)
        assert applied.returncode == 0, applied.stderr
        roles.set_passwords()
        upgrade(roles.owner_url)
        yield roles


def test_the_owner_runs_the_migrations_and_owns_every_table(migrated_roles: Roles) -> None:
    owners = table_owners(migrated_roles)
    assert set(TABLES) <= set(owners)
    assert {owners[table] for table in TABLES} == {migrated_roles.owner}


def test_the_roles_get_the_schema_path_and_the_app_role_read_committed(
    migrated_roles: Roles,
) -> None:
    engine = create_engine(migrated_roles.admin_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT r.rolname, s.setconfig FROM pg_db_role_setting AS s"
                    " JOIN pg_roles AS r ON r.oid = s.setrole"
                    " JOIN pg_database AS d ON d.oid = s.setdatabase"
                    " WHERE d.datname = current_database()"
                )
            ).all()
    finally:
        engine.dispose()
    settings = {role: sorted(config) for role, config in rows}
    assert settings == {
        migrated_roles.owner: ["search_path=public"],
        migrated_roles.app: [
            "default_transaction_isolation=read committed",
            "search_path=public",
        ],
    }


async def test_the_app_role_runs_the_whole_session_api(migrated_roles: Roles) -> None:
    await exercise_session_api(migrated_roles)


def test_the_app_role_cannot_drop_alter_truncate_or_create(migrated_roles: Roles) -> None:
    assert_each_is_denied(migrated_roles.app_url, forbidden_statements())


async def test_an_app_server_behind_head_refuses_to_start_and_cannot_migrate(
    postgres_server: PostgresServer,
) -> None:
    suffix = _suffix()
    with fresh_roles(postgres_server, f"agents_owner_{suffix}", f"agents_app_{suffix}") as roles:
        apply_with_driver(roles, least_privilege_sql(owner=roles.owner, app=roles.app))
        roles.set_passwords()
        session = PostgreSQLSession(
            "conv-1", database_url=roles.app_url, settings=load_settings(auto_migrate=False)
        )
        with pytest.raises(SchemaNotAtHeadError, match=head_revision()):
            await session.get_items()
        # Migrating is the owner's job: the app role has no right to create tables.
        with pytest.raises(DatabaseError, match="permission denied"):
            upgrade(roles.app_url)
        assert set(table_owners(roles)) == {"alembic_version"}


async def test_the_script_hands_over_a_database_migrated_by_an_administrator(
    postgres_server: PostgresServer,
) -> None:
    # Role names that need quoting: case, a space, both quote characters.
    suffix = _suffix()
    owner, app = f'Agents Owner "{suffix}"', f"agents app's {suffix}"
    with fresh_roles(postgres_server, owner, app) as roles:
        upgrade(roles.admin_url.render_as_string(hide_password=False))  # before the roles
        dispose_all()
        assert set(table_owners(roles).values()) != {owner}

        script = least_privilege_sql(owner=owner, app=app, database=roles.database)
        apply_with_driver(roles, script)
        apply_with_driver(roles, script)  # idempotent: a re-run changes nothing
        roles.set_passwords()

        owners = table_owners(roles)
        assert {owners[table] for table in TABLES} == {owner}
        await exercise_session_api(roles)
        assert_each_is_denied(roles.app_url, forbidden_statements())
        # The owner can evolve the schema it now owns: one step down and back up.
        downgrade(roles.owner_url, revision="-1")
        upgrade(roles.owner_url)
        assert {table_owners(roles)[table] for table in TABLES} == {owner}


def test_the_script_refuses_another_database_and_leaves_nothing_behind(
    postgres_server: PostgresServer,
) -> None:
    suffix = _suffix()
    with fresh_roles(postgres_server, f"agents_owner_{suffix}", f"agents_app_{suffix}") as roles:
        script = roles_sql_via_cli(
            "--owner", roles.owner, "--app", roles.app, "--database", "not_this_database"
        )
        refused = apply_with_psql(roles, script)
        assert refused.returncode != 0
        assert "these grants are for database not_this_database" in refused.stderr
        engine = create_engine(roles.admin_url)
        try:
            with engine.connect() as connection:
                created = connection.execute(
                    text("SELECT count(*) FROM pg_roles WHERE rolname IN (:owner, :app)"),
                    {"owner": roles.owner, "app": roles.app},
                ).scalar_one()
        finally:
            engine.dispose()
        assert created == 0  # one transaction: the roles were not created either


# ---------------------------------------------------------------- the command itself


def test_roles_sql_quotes_names_and_contains_no_password() -> None:
    output = roles_sql_via_cli(
        "--owner", 'Own"er', "--app", "o'app", "--schema", "agents data", "--database", "db\\x"
    )
    statements = "".join(line for line in output.splitlines(True) if not line.startswith("--"))
    assert 'CREATE SCHEMA IF NOT EXISTS "agents data" AUTHORIZATION "Own""er";' in statements
    assert "SET LOCAL agents_sessions.app = 'o''app';" in statements
    assert "SET LOCAL agents_sessions.database =  E'db\\\\x';" in statements
    assert 'GRANT USAGE ON SCHEMA "agents data" TO "o\'app";' in statements
    # Every psql variable was filled in; no password anywhere.
    assert not re.search(r""":["'][a-z_]+["']""", statements)
    assert not re.search(r"\bPASSWORD\b", statements, re.IGNORECASE)


@pytest.mark.parametrize(
    ("arguments", "parameter"),
    [
        (["--owner", "", "--app", "agents_app"], "owner"),
        (["--owner", "agents_owner", "--app", "x" * 64], "app"),
        (["--owner", "pg_owner", "--app", "agents_app"], "owner"),
        (["--owner", "agents_owner", "--app", "public"], "app"),
        (["--owner", "same", "--app", "same"], "owner and app"),
        (["--owner", "agents_owner", "--app", "agents_app", "--schema", " "], "schema"),
    ],
)
def test_roles_sql_rejects_bad_names(arguments: list[str], parameter: str) -> None:
    result = CliRunner().invoke(cli, ["roles", "sql", *arguments])
    assert result.exit_code == 2
    assert parameter in result.output
    assert "BEGIN;" not in result.output


def test_roles_sql_runs_as_the_installed_command() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "agents_sessions", "roles", "sql", "--owner", "o", "--app", "a"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith("-- agents_sessions: least-privilege roles")
    assert 'GRANT SELECT ON TABLE "public".alembic_version TO "a";' in completed.stdout
