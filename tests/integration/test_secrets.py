"""The database password never shows: not in logs (DEBUG, SQL echo), reprs, errors or the CLI.

The server runs with trust authentication, so a password never decides whether a
connection works; it still travels through every layer (URL parsing, engine, pool,
driver DSN, retries, error messages), which is what these tests watch. The
passwords carry a distinctive token and URL metacharacters, so a leak is found
whether it is printed raw or percent-encoded.
"""

from __future__ import annotations

import logging
import socket
import traceback
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import click
import pytest
from agents import Agent, Runner
from agents.testing import ScriptedModel, assistant_message
from click.testing import CliRunner, Result
from pydantic import SecretStr
from sqlalchemy.engine import make_url

from agents_sessions import (
    AgentsSessionsError,
    ConfigurationError,
    DatabaseError,
    PostgreSQLSession,
    Settings,
    UsageEntry,
    dispose_all,
    get_store,
    load_settings,
    parse_database_url,
    upgrade,
)
from agents_sessions.cli import cli
from agents_sessions.db.engine import mask_url
from tests.conftest import PostgresServer

TOKEN = "Zq7s3cr3tT0ken"  # alphanumeric: the same raw and percent-encoded
PASSWORD = f"{TOKEN}#@:/%?&="
ENCODED = quote(PASSWORD, safe="")


def assert_secret_absent(*texts: str) -> None:
    for text in texts:
        assert TOKEN not in text, f"the password leaked: ...{_around(text)}..."


def _around(text: str) -> str:
    index = text.find(TOKEN)
    return text[max(0, index - 80) : index + 40]


def everything_about(error: BaseException) -> str:
    """str, repr and the formatted traceback of ``error`` with its whole chain."""
    return "\n".join([str(error), repr(error), *traceback.format_exception(error)])


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# Citus mode hands out databases already migrated by the superuser.
_needs_an_empty_database = pytest.mark.not_on_citus(
    "a role with a password migrates an empty database of its own"
)


@pytest.fixture(scope="module")
def password_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A database owned by a role that has a password; the URL carries the password."""
    role = f"agents_sessions_secret_{uuid.uuid4().hex[:8]}"
    postgres_server.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'")
    admin_url = postgres_server.create_database(prefix="agents_sessions_secret")
    database = make_url(admin_url).database
    try:
        postgres_server.execute(f'ALTER DATABASE "{database}" OWNER TO {role}')
        url = (
            make_url(admin_url)
            .set(username=role, password=PASSWORD)
            .render_as_string(hide_password=False)
        )
        assert ENCODED in url  # the URL really carries the (encoded) password
        upgrade(url)
        yield url
    finally:
        dispose_all()
        postgres_server.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        postgres_server.execute(f"DROP ROLE IF EXISTS {role}")


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every logger at DEBUG; SQLAlchemy's echo handlers removed again afterwards."""
    watched = [
        logging.getLogger(name)
        for name in (
            "sqlalchemy",
            "sqlalchemy.engine",
            "sqlalchemy.engine.Engine",
            "sqlalchemy.pool",
        )
    ]
    saved = [(logger, list(logger.handlers), logger.level) for logger in watched]
    caplog.set_level(logging.DEBUG)
    for name in ("agents_sessions", "sqlalchemy", "alembic"):
        caplog.set_level(logging.DEBUG, logger=name)
    try:
        yield caplog
    finally:
        dispose_all()  # no engine keeps echoing into a closed capture stream
        for logger, handlers, level in saved:
            logger.handlers[:] = handlers
            logger.setLevel(level)


def logged_text(caplog: pytest.LogCaptureFixture) -> str:
    """The captured log, with each record's raw arguments too (not only the message)."""
    parts = [caplog.text]
    for record in caplog.records:
        parts.append(record.getMessage())
        parts.append(repr(record.args))
        if record.exc_info and record.exc_info[1] is not None:
            parts.append(everything_about(record.exc_info[1]))
    return "\n".join(parts)


# ------------------------------------------------------------------ a whole lifecycle


@_needs_an_empty_database
@pytest.mark.parametrize("echo", [False, True], ids=["quiet", "echo"])
async def test_a_full_session_lifecycle_never_logs_or_prints_the_password(
    password_url: str,
    debug_logs: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    echo: bool,
) -> None:
    settings = load_settings(echo=echo)
    conversation_id = f"secret-{uuid.uuid4()}"
    session = PostgreSQLSession(
        conversation_id,
        database_url=password_url,
        user_id="user-1",
        metadata={"channel": "web"},
        settings=settings,
    )
    model = ScriptedModel([[assistant_message("Hello!")], [assistant_message("Again!")]])
    agent = Agent(name="assistant", model=model)

    result = await Runner.run(agent, "Hi", session=session)
    await session.record_usage(result, model="scripted")
    await Runner.run(agent, "Once more", session=session)
    await session.add_items([{"role": "user", "content": "extra"}])
    assert len(await session.get_items(limit=2)) == 2
    assert await session.pop_item() == {"role": "user", "content": "extra"}
    store = session.store
    with store.transaction() as repos:
        repos.conversations.upsert(conversation_id, metadata={"plan": "pro"})
        repos.usage.record(conversation_id, [UsageEntry(model="m", prompt_tokens=1)])
    with store.read() as repos:
        assert repos.conversations.list_by_user("user-1").conversations
        repos.usage.totals_by_model()
    await session.clear_session()
    upgrade(password_url, settings=settings)  # Alembic's own logging, at head already
    store.dispose()

    printed = capsys.readouterr()
    logs = logged_text(debug_logs)
    assert debug_logs.records, "nothing was logged: the capture is not working"
    if echo:  # the SQL really was echoed, so its absence of secrets means something
        assert "INSERT INTO" in logs
    assert_secret_absent(logs, printed.out, printed.err)
    assert_secret_absent(
        repr(session), str(session), repr(store), repr(store.target), repr(store.engine)
    )
    assert_secret_absent(repr(store.engine.url), str(store.engine.url), repr(store.pool))
    assert_secret_absent(
        repr(store.settings), str(store.settings), store.settings.model_dump_json()
    )
    assert_secret_absent(repr(settings), store.target.safe_url)


# ------------------------------------------------------------------ reprs

SECRET_URLS = {
    "userinfo": f"postgresql://app:{ENCODED}@db.example:5432/agents",
    "query password": f"postgresql://app@db.example/agents?password={ENCODED}",
    "query sslpassword": f"postgresql://app@db.example/agents?sslpassword={ENCODED}",
    "both": f"postgresql://app:{ENCODED}@db.example/agents?sslpassword={ENCODED}&pool_size=3",
    "psycopg3 driver": f"postgresql+psycopg://app:{ENCODED}@db.example/agents",
    "query PASSWORD upper case": f"postgresql://app@db.example/agents?PASSWORD={ENCODED}",
    "query SslPassword mixed case": f"postgresql://app@db.example/agents?SslPassword={ENCODED}",
}


@pytest.mark.parametrize("url", list(SECRET_URLS.values()), ids=list(SECRET_URLS))
def test_reprs_and_strs_of_every_object_hide_the_password(url: str) -> None:
    settings = Settings(database_url=SecretStr(url))
    session = PostgreSQLSession("c", database_url=url, settings=settings)  # no I/O
    store = session.store
    target = parse_database_url(url)

    assert_secret_absent(
        repr(settings),
        str(settings),
        settings.model_dump_json(),
        settings.safe_database_url(),
        repr(session),
        repr(store),
        repr(target),
        str(target),
        target.safe_url,
        repr(target.url),
        str(target.url),
        repr(store.engine),
        repr(store.engine.url),
        mask_url(url),
    )
    # The secret is still there for the driver (the masking is display-only).
    assert PASSWORD in (target.url.password, dict(target.secret_connect_args).get("sslpassword"))


# ------------------------------------------------------------------ errors

UNREACHABLE = {
    "closed port": "postgresql://app:{pw}@127.0.0.1:{port}/agents?connect_timeout=5",
    "port out of range": "postgresql://app:{pw}@127.0.0.1:99999/agents",
    "missing socket directory": "postgresql://app:{pw}@/agents?host=/nonexistent-agents-dir",
    "bad sslmode": "postgresql://app:{pw}@127.0.0.1:{port}/agents?sslmode=bogus",
    "unknown option": "postgresql://app:{pw}@127.0.0.1:{port}/agents?no_such_option=1",
    "bad connect_timeout": "postgresql://app:{pw}@127.0.0.1:{port}/agents?connect_timeout=abc",
    "query password": "postgresql://app@127.0.0.1:{port}/agents?password={pw}",
    "query sslpassword": "postgresql://app@127.0.0.1:{port}/agents?sslpassword={pw}",
}


@pytest.mark.parametrize("template", list(UNREACHABLE.values()), ids=list(UNREACHABLE))
async def test_connection_errors_never_show_the_password(
    template: str,
    debug_logs: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = template.format(pw=ENCODED, port=closed_port())
    session = PostgreSQLSession("c", database_url=url)

    # An option libpq refuses is bad configuration; the rest cannot connect.
    with pytest.raises((DatabaseError, ConfigurationError)) as info:
        await session.get_items()
    with pytest.raises((DatabaseError, ConfigurationError)) as write_info:
        await session.add_items([{"role": "user", "content": "x"}])

    printed = capsys.readouterr()
    assert_secret_absent(
        everything_about(info.value),
        everything_about(write_info.value),
        logged_text(debug_logs),
        printed.out,
        printed.err,
    )


BAD_CONFIGURATIONS = {
    "pool_size not a number": f"postgresql://app:{ENCODED}@h/db?pool_size=abc",
    "negative max_overflow": f"postgresql://app:{ENCODED}@h/db?max_overflow=-1",
    "pool_timeout not a number": f"postgresql://app:{ENCODED}@h/db?pool_timeout=soon",
    "pool_pre_ping not a bool": f"postgresql://app:{ENCODED}@h/db?pool_pre_ping=maybe",
    "pool_size twice": f"postgresql://app:{ENCODED}@h/db?pool_size=1&pool_size=2",
    "port not a number": f"postgresql://app:{ENCODED}@h:port/db",
    "unsupported database": f"mysql://app:{ENCODED}@h/db",
    "unsupported with query password": f"mysql://app@h/db?password={ENCODED}",
    "query password twice": f"postgresql://app@h/db?password={ENCODED}&password={ENCODED}",
    "bad pool value with query password": f"postgresql://app@h/db?password={ENCODED}&pool_size=0",
}


@pytest.mark.parametrize("url", list(BAD_CONFIGURATIONS.values()), ids=list(BAD_CONFIGURATIONS))
def test_configuration_errors_never_show_the_password(
    url: str, debug_logs: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ConfigurationError) as info:
        PostgreSQLSession("c", database_url=url)
    with pytest.raises(ConfigurationError) as store_info:
        get_store(url)
    with pytest.raises(ConfigurationError) as settings_info:
        load_settings(database_url=url, sqlite_busy_timeout_ms=-1)

    assert_secret_absent(
        everything_about(info.value),
        everything_about(store_info.value),
        everything_about(settings_info.value),
        logged_text(debug_logs),
    )


# ------------------------------------------------------------------ the CLI

CLI_COMMANDS = [
    ["doctor"],
    ["doctor", "--json"],
    ["stats"],
    ["stats", "--json"],
    ["migrate", "current"],
    ["migrate", "current", "--json"],
    ["migrate", "check"],
    ["conversations", "list"],
]


def _command_exists(path: list[str]) -> bool:
    context = click.Context(cli)
    command: Any = cli
    for name in path:
        command = command.get_command(context, name) if hasattr(command, "get_command") else None
        if command is None:
            return False
    return True


def _command_path(args: list[str]) -> list[str]:
    return [arg for arg in args if not arg.startswith("-")]


def assert_cli_kept_the_secret(result: Result, args: list[str]) -> None:
    assert _command_exists(_command_path(args)), f"`agents-sessions {' '.join(args)}` is missing"
    assert "No such command" not in result.output
    # Crashing with a traceback is a leak risk of its own (frames, reprs).
    assert result.exception is None or isinstance(result.exception, SystemExit), "".join(
        traceback.format_exception(result.exception)
    )
    assert_secret_absent(result.output, result.stdout, result.stderr)


@_needs_an_empty_database
@pytest.mark.parametrize("args", CLI_COMMANDS, ids=" ".join)
def test_cli_commands_never_print_the_password(
    password_url: str, args: list[str], debug_logs: pytest.LogCaptureFixture
) -> None:
    result = CliRunner().invoke(cli, ["--database-url", password_url, *args])

    assert_cli_kept_the_secret(result, args)
    assert_secret_absent(logged_text(debug_logs))
    if args[0] in ("stats", "migrate"):
        assert result.exit_code == 0, result.output
        # The (masked) URL is shown, so not finding the password means something.
        assert str(make_url(password_url).username) in result.output


@_needs_an_empty_database
@pytest.mark.parametrize("args", CLI_COMMANDS, ids=" ".join)
def test_cli_commands_read_the_url_from_the_environment_without_printing_it(
    password_url: str, args: list[str]
) -> None:
    result = CliRunner().invoke(cli, args, env={"DATABASE_URL": password_url})

    assert_cli_kept_the_secret(result, args)
    if args[0] in ("stats", "migrate"):
        assert str(make_url(password_url).username) in result.output


@pytest.mark.parametrize("args", CLI_COMMANDS, ids=" ".join)
@pytest.mark.parametrize(
    "template",
    [
        "postgresql://app:{pw}@127.0.0.1:{port}/agents?connect_timeout=2",
        "postgresql://app@127.0.0.1:{port}/agents?password={pw}&connect_timeout=2",
        "postgresql://app:{pw}@127.0.0.1:{port}/agents?pool_size=abc",
    ],
    ids=["unreachable", "unreachable, query password", "bad pool parameter"],
)
def test_cli_errors_never_print_the_password(
    args: list[str], template: str, debug_logs: pytest.LogCaptureFixture
) -> None:
    url = template.format(pw=ENCODED, port=closed_port())
    result = CliRunner().invoke(cli, ["--database-url", url, *args])

    assert_cli_kept_the_secret(result, args)
    assert_secret_absent(logged_text(debug_logs))
    assert result.exit_code != 0, result.output


@_needs_an_empty_database
def test_a_failing_operation_error_is_a_package_error_without_the_password(
    password_url: str,
) -> None:
    # A real statement failure on a working, password-authenticated connection.
    store = get_store(password_url)
    with pytest.raises(AgentsSessionsError) as info, store.transaction() as repos:
        repos.usage.record("no-such-conversation", [UsageEntry(model="m")])
    assert_secret_absent(everything_about(info.value))


# ------------------------------------------------------------------ unencoded passwords


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://app:{TOKEN}@x@db.example:5432/agents",
        f"postgresql://app:{TOKEN}@@db.example/agents?pool_size=3",
        f"postgresql+psycopg2://app:a@{TOKEN}@db.example/agents",
    ],
)
def test_a_password_with_an_unencoded_at_sign_is_refused_without_showing_it(url: str) -> None:
    # libpq and SQLAlchemy would read the password's tail as the host name, and show
    # it in every message about that "host".
    with pytest.raises(ConfigurationError, match="percent-encode the password") as refused:
        parse_database_url(url)
    assert_secret_absent(everything_about(refused.value))
    with pytest.raises(ConfigurationError, match="percent-encode"):
        PostgreSQLSession("c", database_url=url)
    # Encoded, the same password is fine, and an @ in the database name too.
    parse_database_url(f"postgresql://app:{TOKEN}%40x@db.example:5432/agents")
    parse_database_url("postgresql://app@db.example:5432/team@agents")
