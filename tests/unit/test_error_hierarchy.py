"""One error hierarchy: every exception derives from ``AgentsSessionsError`` and from the
standard type a caller would catch, and driver errors are chained, never swallowed."""

from __future__ import annotations

import socket
import sqlite3
from collections.abc import Callable
from pathlib import Path

import psycopg2
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

import agents_sessions
from agents_sessions import PostgreSQLSession, UsageEntry, get_store, load_settings
from agents_sessions import errors as errors_module
from agents_sessions.errors import (
    AgentsSessionsError,
    DatabaseError,
    InvalidItemError,
    PoolTimeoutError,
    SchemaError,
    SchemaNotAtHeadError,
    StatementTimeoutError,
)

PUBLIC_ERRORS: dict[str, type[BaseException]] = {
    name: value
    for name, value in vars(errors_module).items()
    if isinstance(value, type)
    and issubclass(value, BaseException)
    and value.__module__ == errors_module.__name__
    and not name.startswith("_")
}

# The standard type(s) each error is documented to be (errors.py docstrings, README).
STANDARD_TYPES: dict[str, tuple[type[BaseException], ...]] = {
    "BackupError": (RuntimeError,),
    "BackupFileError": (ValueError,),
    "CitusError": (RuntimeError,),
    "ConversationNotFoundError": (LookupError,),
    "ExportFormatError": (ValueError,),
    "InvalidRunStateError": (ValueError,),
    "RunStateVersionError": (ValueError,),
    "ExternalToolError": (RuntimeError,),
    "RestoreTargetNotEmptyError": (RuntimeError,),
    "AgentsSessionsError": (Exception,),
    "ConfigurationError": (ValueError,),
    "InvalidConversationIdError": (ValueError,),
    "InvalidArgumentError": (ValueError,),
    "InvalidItemError": (ValueError,),
    "ItemTypeError": (ValueError, TypeError),
    "ItemTooLargeError": (ValueError,),
    "SchemaError": (RuntimeError,),
    "SchemaNotAtHeadError": (RuntimeError,),
    "DatabaseError": (Exception,),
    "PoolTimeoutError": (TimeoutError,),
    "StatementTimeoutError": (TimeoutError,),
    "AccessDeniedError": (PermissionError,),
    "ConnectionLostError": (Exception,),
    "ReadOnlyDatabaseError": (Exception,),
    "RowLevelSecurityFilteredError": (PermissionError,),
    "BranchError": (ValueError,),
    "UnknownBranchError": (ValueError,),
    "BranchNameTakenError": (ValueError,),
    "ProtectedBranchError": (ValueError,),
    "TurnNotFoundError": (ValueError,),
}

# Narrower families the documentation promises.
PARENTS: dict[str, str] = {
    "ItemTypeError": "InvalidItemError",
    "ItemTooLargeError": "InvalidItemError",
    "SchemaNotAtHeadError": "SchemaError",
    "UnknownBranchError": "BranchError",
    "BranchNameTakenError": "BranchError",
    "ProtectedBranchError": "BranchError",
    "TurnNotFoundError": "BranchError",
    "PoolTimeoutError": "DatabaseError",
    "StatementTimeoutError": "DatabaseError",
    "AccessDeniedError": "DatabaseError",
    "ConnectionLostError": "DatabaseError",
    "RowLevelSecurityFilteredError": "AccessDeniedError",
}


@pytest.mark.parametrize("name", sorted(PUBLIC_ERRORS))
def test_every_public_error_derives_from_the_base(name: str) -> None:
    assert issubclass(PUBLIC_ERRORS[name], AgentsSessionsError)


@pytest.mark.parametrize("name", sorted(PUBLIC_ERRORS))
def test_every_public_error_has_a_documented_standard_type(name: str) -> None:
    assert name in STANDARD_TYPES, (
        f"{name} is new: add it to STANDARD_TYPES with the standard exception type "
        "its docstring promises (ValueError, TypeError, TimeoutError, ...)"
    )


@pytest.mark.parametrize("name", sorted(STANDARD_TYPES))
def test_each_error_is_also_the_standard_type_it_documents(name: str) -> None:
    error = PUBLIC_ERRORS.get(name)
    assert error is not None, f"agents_sessions.errors.{name} does not exist"
    for standard in STANDARD_TYPES[name]:
        assert issubclass(error, standard), f"{name} is not a {standard.__name__}"
    if name in PARENTS:
        assert issubclass(error, PUBLIC_ERRORS[PARENTS[name]])


@pytest.mark.parametrize("name", sorted(PUBLIC_ERRORS))
def test_every_public_error_is_exported_documented_and_raisable(name: str) -> None:
    error = PUBLIC_ERRORS[name]
    assert getattr(agents_sessions, name, None) is error, f"agents_sessions.{name} missing"
    assert name in agents_sessions.__all__
    assert (error.__doc__ or "").strip(), f"{name} has no docstring"
    # Catchable by the base and by its standard types, with its message intact.
    # ExportFormatError names the offending line of the file as well.
    arguments: tuple[object, ...] = (1, "boom") if name == "ExportFormatError" else ("boom",)
    with pytest.raises(AgentsSessionsError, match="boom"):
        raise error(*arguments)


def test_value_errors_are_not_database_errors_and_vice_versa() -> None:
    # A caller retrying DatabaseError must not retry bad input, and the other way round.
    for name, error in PUBLIC_ERRORS.items():
        if issubclass(error, DatabaseError):
            assert not issubclass(error, ValueError | TypeError), name
        if issubclass(error, ValueError):
            assert not issubclass(error, DatabaseError | SchemaError), name


# ------------------------------------------------------------ real failures, chained


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def assert_chained_driver_error(
    error: BaseException, driver_error: type[BaseException] | tuple[type[BaseException], ...]
) -> None:
    """``error`` is ours, caused by a SQLAlchemy error that wraps the driver's."""
    assert isinstance(error, DatabaseError)
    cause = error.__cause__
    assert isinstance(cause, sa_exc.DBAPIError), repr(cause)
    assert isinstance(cause.orig, driver_error), repr(cause.orig)
    assert str(error), "the message must say what happened"


async def test_connecting_to_a_port_nothing_listens_on_chains_the_driver_error(
    conversation_id: str,
) -> None:
    url = f"postgresql://postgres@127.0.0.1:{closed_port()}/nowhere?connect_timeout=5"
    session = PostgreSQLSession(conversation_id, database_url=url)

    with pytest.raises(DatabaseError) as info:
        await session.get_items()
    assert_chained_driver_error(info.value, psycopg2.OperationalError)
    assert "refused" in str(info.value).lower()
    assert not isinstance(info.value, PoolTimeoutError)

    with pytest.raises(DatabaseError) as write_info:
        await session.add_items([{"role": "user", "content": "lost"}])
    assert_chained_driver_error(write_info.value, psycopg2.OperationalError)

    with pytest.raises(DatabaseError) as repository_info, get_store(url).read() as repos:
        repos.messages.count(conversation_id)
    assert_chained_driver_error(repository_info.value, psycopg2.OperationalError)


def test_a_sqlite_file_that_is_not_a_database_chains_the_driver_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.sqlite3"
    path.write_bytes(b"this is not an SQLite database file, not even close" * 100)

    with pytest.raises(DatabaseError) as info, get_store(f"sqlite:///{path}").read() as repos:
        repos.messages.count("c")
    assert_chained_driver_error(info.value, sqlite3.DatabaseError)


def test_a_sqlite_path_that_cannot_be_created_is_a_package_error(tmp_path: Path) -> None:
    # The parent "directory" is a regular file: the database can never be opened there.
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file")

    store = get_store(f"sqlite:///{blocker / 'sessions.sqlite3'}")
    with pytest.raises(AgentsSessionsError) as info, store.read() as repos:
        repos.messages.count("c")
    assert isinstance(info.value.__cause__, OSError), "the OS error must be chained"
    assert "not-a-directory" in str(info.value)


async def test_statements_on_a_dropped_table_raise_chained_errors_and_nothing_is_swallowed(
    backend: str, fresh_database_url: Callable[[], str], conversation_id: str
) -> None:
    url = fresh_database_url()
    session = PostgreSQLSession(conversation_id, database_url=url)
    await session.add_items([{"role": "user", "content": "before the drop"}])
    with session.store.engine.begin() as connection:
        connection.execute(text("DROP TABLE messages"))

    driver_error = psycopg2.Error if backend == "postgresql" else sqlite3.Error
    with pytest.raises(DatabaseError, match="messages") as read_info:
        await session.get_items()
    assert_chained_driver_error(read_info.value, driver_error)
    with pytest.raises(DatabaseError) as write_info:
        await session.add_items([{"role": "user", "content": "after the drop"}])
    assert_chained_driver_error(write_info.value, driver_error)
    # pop_item must not turn "the table is gone" into "the conversation is empty".
    with pytest.raises(DatabaseError) as pop_info:
        await session.pop_item()
    assert_chained_driver_error(pop_info.value, driver_error)
    with pytest.raises(DatabaseError) as clear_info:
        await session.clear_session()
    assert_chained_driver_error(clear_info.value, driver_error)


def test_a_foreign_key_violation_is_a_chained_database_error(database_url: str) -> None:
    store = get_store(database_url)
    with pytest.raises(DatabaseError) as info, store.transaction() as repos:
        repos.usage.record("no-such-conversation-ever", [UsageEntry(model="m")])
    assert isinstance(info.value.__cause__, sa_exc.IntegrityError)
    with store.read() as repos:
        assert repos.usage.totals_for_conversation("no-such-conversation-ever").requests == 0


async def test_a_pool_timeout_is_a_timeout_error_naming_the_pool_settings(
    backend: str, fresh_database_url: Callable[[], str], conversation_id: str
) -> None:
    url = fresh_database_url() + "?pool_size=1&max_overflow=0&pool_timeout=0.2"
    session = PostgreSQLSession(conversation_id, database_url=url)
    await session.add_items([{"role": "user", "content": "schema ready"}])

    # The pool's only connection, held while the session asks for one.
    with session.store.engine.connect(), pytest.raises(PoolTimeoutError) as info:
        await session.get_items()
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value.__cause__, sa_exc.TimeoutError)
    assert "pool_size=1" in str(info.value)
    assert await session.get_items() == [{"role": "user", "content": "schema ready"}]


async def test_a_server_side_statement_timeout_is_a_chained_timeout_error(
    postgres_url: str,
) -> None:
    store = get_store(postgres_url, settings=load_settings(statement_timeout_ms=50))
    with pytest.raises(StatementTimeoutError) as info, store.read() as repos:
        repos.connection.execute(text("SELECT pg_sleep(5)"))
    assert isinstance(info.value, TimeoutError)
    assert_chained_driver_error(info.value, psycopg2.errors.QueryCanceled)


def test_an_empty_database_without_auto_migrate_is_a_schema_error(
    backend: str, fresh_database_url: Callable[[], str]
) -> None:
    store = get_store(fresh_database_url(), settings=load_settings(auto_migrate=False))
    refused = pytest.raises(SchemaNotAtHeadError, match="alembic upgrade head")
    with refused as info, store.read() as repos:
        repos.messages.count("c")
    assert isinstance(info.value, RuntimeError)
    assert isinstance(info.value, SchemaError)


async def test_an_item_json_refuses_keeps_the_serializer_error_chained(
    database_url: str, conversation_id: str
) -> None:
    loop: list[object] = []
    loop.append(loop)
    session = PostgreSQLSession(conversation_id, database_url=database_url)
    with pytest.raises(InvalidItemError, match="ircular") as info:
        await session.add_items([{"role": "user", "content": "x", "loop": loop}])
    assert isinstance(info.value.__cause__, ValueError)  # json.dumps's own error


@pytest.mark.parametrize("name", sorted(PUBLIC_ERRORS))
def test_every_public_error_carries_the_exit_status_the_cli_ends_with(name: str) -> None:
    error = PUBLIC_ERRORS[name]
    assert issubclass(error, AgentsSessionsError)
    assert isinstance(error.exit_code, agents_sessions.ExitCode)
    assert error.exit_code != agents_sessions.ExitCode.OK
    expected = {
        "ConfigurationError": agents_sessions.ExitCode.CONFIGURATION,
        "SchemaNotAtHeadError": agents_sessions.ExitCode.SCHEMA,
        "PoolTimeoutError": agents_sessions.ExitCode.DATABASE,
        "ExternalToolError": agents_sessions.ExitCode.TOOL,
        "ExportFormatError": agents_sessions.ExitCode.CONFIGURATION,
        "InvalidArgumentError": agents_sessions.ExitCode.USAGE,
    }
    if name in expected:
        assert error.exit_code == expected[name]
