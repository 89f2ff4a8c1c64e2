"""The package's exceptions: one base, narrow subclasses, standard types mixed in.

Every exception this package raises derives from :class:`AgentsSessionsError`, and
also from the standard type a caller would naturally catch (``ValueError`` for bad
values, ``TypeError`` for values of the wrong type, ``TimeoutError`` for waits that
ran out). Errors coming from SQLAlchemy or the driver are wrapped in
:class:`DatabaseError` with the original chained as ``__cause__``, never swallowed.

Every class carries the ``agents-sessions`` exit status it maps to
(:class:`ExitCode`), so the command line turns any of them into one line on stderr
and a meaningful status in one place.

No message built here ever contains a database password: URLs are rendered with
the password masked before they reach any error text.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

from sqlalchemy import exc as sa_exc


class ExitCode(enum.IntEnum):
    """What an ``agents-sessions`` exit status means."""

    OK = 0
    #: The command ran and found a problem (``doctor``, ``migrate check``), or was declined.
    PROBLEM = 1
    #: Bad command line or argument (click's own usage errors use 2 as well).
    USAGE = 2
    #: Bad configuration: the URL, a setting, or a file argument.
    CONFIGURATION = 3
    #: The database could not be reached or refused the operation.
    DATABASE = 4
    #: The schema is not at the revision this package needs.
    SCHEMA = 5
    #: An external program the command needs (pg_dump, psql) is missing or failed.
    TOOL = 6


class AgentsSessionsError(Exception):
    """Base class of every error raised by ``agents_sessions``.

    Attributes:
        exit_code: The ``agents-sessions`` exit status this error ends a command with.
    """

    exit_code: ClassVar[ExitCode] = ExitCode.USAGE


class ConfigurationError(AgentsSessionsError, ValueError):
    """A setting, a database URL or one of its query parameters is invalid.

    The message names the offending setting or parameter; it never echoes a password.
    """

    exit_code = ExitCode.CONFIGURATION


class InvalidConversationIdError(AgentsSessionsError, ValueError):
    """A conversation id (or user id) is empty, too long, or otherwise unusable."""


class InvalidArgumentError(AgentsSessionsError, ValueError):
    """An argument to a public method has a meaningless value (e.g. a negative limit)."""


class InvalidItemError(AgentsSessionsError, ValueError):
    """An item cannot be stored losslessly (NaN, a circular reference, ...).

    Raised before anything of the call is written.
    """


class ItemTypeError(InvalidItemError, TypeError):
    """An item, or a value inside it, is of a type JSON cannot represent.

    Raised before anything of the call is written. It is both a ``TypeError`` (what
    ``json.dumps`` raises for such values) and an :class:`InvalidItemError`.
    """


class ItemTooLargeError(InvalidItemError):
    """An item's JSON document is larger than ``max_item_bytes`` allows.

    Raised before anything of the call is written; the message names the item, its
    size, the limit and the setting (``AGENTS_SESSIONS_MAX_ITEM_BYTES``).
    """


class SchemaError(AgentsSessionsError, RuntimeError):
    """The database schema is not what this version of the package needs."""

    exit_code = ExitCode.SCHEMA


class SchemaNotAtHeadError(SchemaError):
    """The database is behind (or ahead of) the migrations this package ships.

    Raised when auto-migration is off; the message says which command brings the
    database to head.
    """


class DatabaseError(AgentsSessionsError):
    """A database operation failed; the driver's exception is chained as ``__cause__``."""

    exit_code = ExitCode.DATABASE


class PoolTimeoutError(DatabaseError, TimeoutError):
    """No pooled connection became free within ``pool_timeout`` seconds."""


class StatementTimeoutError(DatabaseError, TimeoutError):
    """The server cancelled a statement: ``statement_timeout`` or ``lock_timeout`` ran out.

    Nothing of the cancelled statement was written.
    """


class AccessDeniedError(DatabaseError, PermissionError):
    """The database refused the operation: missing privilege, or a row-level security policy.

    Nothing of the refused statement was written.
    """


class RowLevelSecurityFilteredError(AccessDeniedError):
    """Row-level security hides other tenants' rows from the role an operator command runs as.

    Raised before anything is read or written by operations that must see every
    tenant's rows (erasure, pruning, and the CLI's statistics, listings and exports):
    under that role they would find nothing and report an empty success. Run them as
    the tables' owner (its URL in ``DATABASE_MIGRATION_URL``, or ``--database-url``).
    """


class ReadOnlyDatabaseError(DatabaseError):
    """A write reached a read-only database: a hot-standby replica, or a read-only session.

    Writes must go to the primary (``DATABASE_URL``); nothing was written.
    """


class ConnectionLostError(DatabaseError):
    """The connection died during a write, and whether the write took effect is unknown.

    Raised for an operation that cannot be safely retried (e.g. a ``pop_item`` may
    have removed the newest item), and for a retried one when the retries ran out
    (e.g. the server stayed unreachable). The next call gets a fresh connection.

    Attributes:
        idempotency_key: For ``add_items``: the key of the call. Repeating the call
            with ``add_items(items, idempotency_key=error.idempotency_key)`` stores
            the items exactly once, whether or not the first call took effect.
            ``None`` for other operations.
    """

    idempotency_key: str | None = None

    def offer_key(self, key: str) -> None:
        """Name the append's key, with which the caller may repeat it safely."""
        self.idempotency_key = key
        self.args = (
            f"{self.args[0]}; repeat it with add_items(items, idempotency_key={key!r}) "
            "to store the items exactly once",
        )


class CitusError(AgentsSessionsError, RuntimeError):
    """A sharded-cluster (Citus) operation cannot run here, and the message says why.

    For example: the server has no Citus extension, the connection is not to the
    coordinator, the schema's keys do not include the distribution column, a table
    is distributed by another column, or row-level security is enabled (its
    policies cannot be distributed).
    """

    exit_code = ExitCode.PROBLEM


class ConversationNotFoundError(AgentsSessionsError, LookupError):
    """A conversation asked for by id does not exist."""

    exit_code = ExitCode.PROBLEM


class BranchError(AgentsSessionsError, ValueError):
    """A history-management call named a branch or turn it cannot use; nothing was written.

    A ``ValueError``, as the SDK's ``AdvancedSQLiteSession`` raises for the same cases.
    """


class UnknownBranchError(BranchError):
    """The branch does not exist (never created, deleted, or holding no items)."""


class BranchNameTakenError(BranchError):
    """The branch name is blank, or was already used in this conversation (names stay reserved)."""


class ProtectedBranchError(BranchError):
    """``main`` cannot be deleted; the current branch only with ``force=True``."""


class TurnNotFoundError(BranchError):
    """No user turn with that number (or matching that text) on the current branch."""


class InvalidRunStateError(AgentsSessionsError, ValueError):
    """A paused run's state cannot be stored or restored: not JSON, too large, or corrupt.

    Raised before anything is written (on save) or before anything is removed (on
    load and claim).
    """


class RunStateVersionError(InvalidRunStateError):
    """A stored paused run was saved in a ``RunState`` schema this SDK cannot read.

    The message names both versions (the stored one and what the installed SDK
    reads). The state is kept: resume it with a matching SDK, or discard it.
    """


class ExportFormatError(AgentsSessionsError, ValueError):
    """An import file is not a valid export; nothing was written.

    Attributes:
        line: The 1-based number of the offending line.
    """

    exit_code = ExitCode.CONFIGURATION

    def __init__(self, line: int, message: str) -> None:
        self.line = line
        super().__init__(f"line {line}: {message}; nothing was imported")


class BackupError(AgentsSessionsError, RuntimeError):
    """A backup or restore could not be made."""

    exit_code = ExitCode.PROBLEM


class ExternalToolError(BackupError):
    """``pg_dump`` or ``psql`` is missing, or failed (its error output is in the message)."""

    exit_code = ExitCode.TOOL


class RestoreTargetNotEmptyError(BackupError):
    """The database to restore into already holds tables; nothing was changed."""


class BackupFileError(AgentsSessionsError, ValueError):
    """The file given to restore is missing, unreadable or not a backup of this kind."""

    exit_code = ExitCode.CONFIGURATION


# SQLSTATEs of statements the server cancelled on a timeout: query_canceled
# (statement_timeout) and lock_not_available (lock_timeout).
_TIMEOUT_SQLSTATES = {"57014", "55P03"}
# insufficient_privilege: a missing GRANT, or a row-level security policy violation.
_INSUFFICIENT_PRIVILEGE = "42501"
# read_only_sql_transaction: a write on a hot standby (or a read-only transaction).
_READ_ONLY_TRANSACTION = "25006"


# libpq's complaints about the URL's own parameters, at connect time: bad
# configuration (exit 3), not an unreachable server.
_BAD_CONNECTION_OPTION = re.compile(
    r"invalid dsn|invalid connection option|invalid \w+ value|"
    r"invalid integer value .* for connection option"
)


def sqlstate_of(error: BaseException) -> str | None:
    """The SQLSTATE of a driver error (wrapped by SQLAlchemy or not), if it has one.

    psycopg2 calls it ``pgcode``, psycopg 3 ``sqlstate``; connection failures have none.
    """
    original = getattr(error, "orig", None) or error
    code = getattr(original, "pgcode", None) or getattr(original, "sqlstate", None)
    return code if isinstance(code, str) else None


@contextmanager
def translate_database_errors(pool_description: str = "") -> Iterator[None]:
    """Re-raise SQLAlchemy/driver errors as :class:`DatabaseError` subclasses.

    ``pool_description`` (e.g. ``"pool_size=5, max_overflow=10, pool_timeout=30"``)
    is added to pool-timeout messages so the reader knows which knob to turn.
    Errors that already belong to this package pass through untouched.
    """
    try:
        yield
    except AgentsSessionsError:
        raise
    except sa_exc.TimeoutError as exc:
        detail = f" ({pool_description})" if pool_description else ""
        raise PoolTimeoutError(
            "timed out waiting for a pooled database connection"
            f"{detail}; raise pool_size/max_overflow in the database URL, or pool_timeout"
        ) from exc
    except sa_exc.SQLAlchemyError as exc:
        # SQLAlchemy's messages carry the statement and bound parameters, never the URL,
        # so they cannot leak the password; keep the first line for readability.
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "unsupported startup parameter" in first_line:
            raise ConfigurationError(
                f"the connection was refused: {first_line}. statement_timeout_ms and "
                "lock_timeout_ms travel as the libpq startup parameter 'options', which "
                "PgBouncer refuses; behind a pooler set them on the role instead "
                "(ALTER ROLE app IN DATABASE db SET statement_timeout = '5s')"
            ) from exc
        if _BAD_CONNECTION_OPTION.search(first_line):
            raise ConfigurationError(
                f"the database URL carries an option libpq refuses: {first_line}; fix or "
                "remove that parameter of the URL"
            ) from exc
        sqlstate = sqlstate_of(exc)
        if sqlstate == _INSUFFICIENT_PRIVILEGE:
            raise AccessDeniedError(f"database refused the operation: {first_line}") from exc
        if sqlstate == _READ_ONLY_TRANSACTION:
            raise ReadOnlyDatabaseError(
                f"the database is read-only (a hot-standby replica?): {first_line}; "
                "writes must go to the primary (DATABASE_URL)"
            ) from exc
        if sqlstate in _TIMEOUT_SQLSTATES:
            raise StatementTimeoutError(
                f"database statement cancelled: {first_line} (statement_timeout_ms / "
                "lock_timeout_ms settings, or the server's own timeouts)"
            ) from exc
        if first_line.startswith("(sqlite3.OperationalError) integer overflow"):
            # SQLite's SUM() stops at 2**63-1 (PostgreSQL's sums are exact numerics).
            raise DatabaseError(
                "a total exceeds SQLite's 64-bit integer range (over 2**63-1, e.g. token "
                "usage summed across rows), which SQLite cannot add exactly: look for "
                "usage rows with absurd token counts, or use PostgreSQL, whose sums are "
                "exact"
            ) from exc
        raise DatabaseError(f"database operation failed: {first_line}") from exc
