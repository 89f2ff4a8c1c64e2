"""From a database URL to a pooled SQLAlchemy engine: one engine per distinct URL per process.

Pool options travel in the URL's query string
(``postgresql://u:p@h/db?pool_size=20&max_overflow=10``). They are validated, removed
from the URL, and handed to SQLAlchemy's ``QueuePool``; every other query parameter
(``sslmode``, ``connect_timeout``, ``application_name``, ...) reaches the driver as it was.

Driver choice: this package's PostgreSQL driver is psycopg2. SQLAlchemy 2.1 maps a
bare ``postgresql://`` URL to psycopg 3, so bare (and ``postgres://``) URLs are
pinned to ``postgresql+psycopg2`` here; an explicit ``+driver`` is left alone.

SQLite engines get WAL, a busy timeout and foreign keys on every new connection,
and SQLAlchemy (not the ``sqlite3`` module) emits ``BEGIN``: ``BEGIN IMMEDIATE``
for writes, so that two processes never deadlock upgrading read locks to write locks.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
import select
import threading
import time
import weakref
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, DisconnectionError, NoSuchModuleError
from sqlalchemy.pool import NullPool, QueuePool

from ..errors import ConfigurationError
from .libpq_parameters import LIBPQ_PARAMETERS

logger = logging.getLogger("agents_sessions")

#: Execution option that makes a SQLite transaction start with ``BEGIN IMMEDIATE``.
SQLITE_WRITE_OPTION = "agents_sessions_sqlite_write"

#: Execution option naming the user a connection acts for under row-level security.
TENANT_OPTION = "agents_sessions_tenant_id"

#: Execution option: the database is a Citus cluster, so writes that are one statement
#: on PostgreSQL run statement by statement in a transaction (db.distribution_probe).
DISTRIBUTED_OPTION = "agents_sessions_distributed"

#: The PostgreSQL setting the row-level security policies read (migration 0003).
TENANT_SETTING = "agents_sessions.tenant_id"


@dataclass(frozen=True)
class PoolOptions:
    """Connection-pool settings, read from the database URL's query string.

    Attributes:
        pool_size: Connections kept open in the pool.
        max_overflow: Extra connections opened under load beyond ``pool_size``;
            the pool never holds more than ``pool_size + max_overflow``.
        pool_timeout: Seconds a caller waits for a free connection before a
            :class:`~agents_sessions.errors.PoolTimeoutError`.
        pool_recycle: Seconds after which a connection is replaced on checkout
            (``-1`` disables); keeps connections younger than server/LB idle limits.
        pool_pre_ping: Test each connection with a round trip on checkout. Off by
            default: it doubles the round trips of every call.
        response_timeout: Seconds a session call (its statements and commit) may
            wait for the server on PostgreSQL before its connection is closed as
            lost (:mod:`agents_sessions.db.deadline`); ``0`` never. Keep it above
            the statement and lock timeouts.
    """

    pool_size: int = 5
    max_overflow: int = 10
    pool_timeout: float = 30.0
    pool_recycle: int = 1800
    pool_pre_ping: bool = False
    response_timeout: float = 30.0

    @property
    def max_connections(self) -> int:
        """The most connections this pool will ever hold open at once."""
        return self.pool_size + self.max_overflow

    def describe(self) -> str:
        """A one-line summary for logs and error messages."""
        return (
            f"pool_size={self.pool_size}, max_overflow={self.max_overflow}, "
            f"pool_timeout={self.pool_timeout:g}"
        )


_POOL_PARAMETERS = (
    "pool_size",
    "max_overflow",
    "pool_timeout",
    "pool_recycle",
    "pool_pre_ping",
    "response_timeout",
)

#: libpq keywords set unless the URL gives them: no blocking network wait is unbounded.
#: A connect gives up after 10 s; an idle or waiting connection whose peer vanished is
#: declared dead by TCP keepalives (first probe after 30 s idle, then every 10 s, 3
#: misses); data the peer never acknowledges ends the connection after 30 s.
NETWORK_DEFAULTS: dict[str, str] = {
    "connect_timeout": "10",
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",
}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _single_value(url: URL, name: str) -> str:
    value = url.query[name]
    if isinstance(value, tuple):
        raise ConfigurationError(f"database URL parameter {name!r} is given more than once")
    return value


def _parse_int(name: str, raw: str, *, minimum: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigurationError(
            f"database URL parameter {name!r} must be an integer, got {raw!r}"
        ) from None
    if value < minimum:
        raise ConfigurationError(
            f"database URL parameter {name!r} must be >= {minimum}, got {value}"
        )
    return value


def _parse_pool_options(url: URL) -> PoolOptions:
    values: dict[str, Any] = {}
    if "pool_size" in url.query:
        values["pool_size"] = _parse_int("pool_size", _single_value(url, "pool_size"), minimum=1)
    if "max_overflow" in url.query:
        values["max_overflow"] = _parse_int(
            "max_overflow", _single_value(url, "max_overflow"), minimum=0
        )
    if "pool_recycle" in url.query:
        values["pool_recycle"] = _parse_int(
            "pool_recycle", _single_value(url, "pool_recycle"), minimum=-1
        )
    if "pool_timeout" in url.query:
        raw = _single_value(url, "pool_timeout")
        try:
            timeout = float(raw)
        except ValueError:
            raise ConfigurationError(
                f"database URL parameter 'pool_timeout' must be a number of seconds, got {raw!r}"
            ) from None
        if not timeout > 0 or timeout == float("inf"):
            raise ConfigurationError(
                f"database URL parameter 'pool_timeout' must be a positive number, got {raw!r}"
            )
        values["pool_timeout"] = timeout
    if "response_timeout" in url.query:
        raw = _single_value(url, "response_timeout")
        try:
            response_timeout = float(raw)
        except ValueError:
            response_timeout = -1.0
        if not 0 <= response_timeout < float("inf"):
            raise ConfigurationError(
                "database URL parameter 'response_timeout' must be a number of seconds "
                f"(0: never), got {raw!r}"
            )
        values["response_timeout"] = response_timeout
    if "pool_pre_ping" in url.query:
        raw = _single_value(url, "pool_pre_ping").strip().lower()
        if raw not in _TRUE | _FALSE:
            raise ConfigurationError(
                f"database URL parameter 'pool_pre_ping' must be true or false, got {raw!r}"
            )
        values["pool_pre_ping"] = raw in _TRUE
    return PoolOptions(**values)


# libpq also takes secrets as query parameters (?password=...).
_SECRET_QUERY_PARAMETERS = ("password", "sslpassword")


def mask_url(url: str | URL) -> str:
    """Render ``url`` with its password replaced by ``***``; safe for logs and errors.

    Masks the ``user:password@`` part and secret query parameters (``password=``,
    ``sslpassword=``), which libpq accepts too.
    """
    try:
        parsed = url if isinstance(url, URL) else make_url(url)
    except (ArgumentError, ValueError):
        return "<unparseable database URL>"
    secrets = [name for name in parsed.query if name.lower() in _SECRET_QUERY_PARAMETERS]
    if secrets:
        parsed = parsed.update_query_dict({name: "***" for name in secrets})
    return parsed.render_as_string(hide_password=True)


@dataclass(frozen=True)
class DatabaseTarget:
    """A parsed database URL: where to connect, and how to pool the connections.

    Attributes:
        url: The URL handed to the driver (pool parameters removed, driver pinned).
        pool: Pool settings taken from the URL's query string.
    """

    url: URL
    pool: PoolOptions
    #: Secret driver parameters taken out of the URL's query string (``sslpassword``),
    #: so that no repr of the URL (SQLAlchemy's own included) can show them.
    secret_connect_args: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    @cached_property
    def dialect(self) -> str:
        """``"postgresql"`` or ``"sqlite"``."""
        # Asked on every session call; a frozen target's URL never changes.
        return self.url.get_backend_name()

    @property
    def safe_url(self) -> str:
        """The URL with its password masked."""
        return mask_url(self.url)


def refuse_misspelt_parameters(url: URL) -> None:
    """Refuse a query parameter that is neither a pool option nor libpq's, but close to one.

    ``pool_sise=5`` would otherwise reach libpq and fail every connect as an
    "invalid dsn", far from the typo. Only names with a close known match are
    refused here (a libpq newer than the list above may know more names; libpq
    itself still rejects the rest at connect time).

    Raises:
        ConfigurationError: naming the parameter and the nearest known name.
    """
    if url.get_backend_name() != "postgresql" or url.get_driver_name() not in (
        "psycopg2",
        "psycopg",
    ):
        return
    known = sorted(LIBPQ_PARAMETERS | set(_POOL_PARAMETERS))
    for name in url.query:
        if name in LIBPQ_PARAMETERS or name in _POOL_PARAMETERS:
            continue
        if name.lower() in _SECRET_QUERY_PARAMETERS:
            continue  # a password parameter in any letter case is taken (and masked) as such
        nearest = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        if nearest:
            raise ConfigurationError(
                f"unknown database URL parameter {name!r}: did you mean {nearest[0]!r}? "
                "(pool options: " + ", ".join(_POOL_PARAMETERS) + "; every other parameter "
                "goes to libpq)"
            )


_AUTHORITY = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://(?P<authority>[^/?#]*)")


def _refuse_unencoded_at_sign(raw_url: str) -> None:
    """Refuse ``user:p@ss@host``: the password's tail would be read as the host name.

    SQLAlchemy ends the password at its first ``@`` and takes the rest as the host
    name, which then appears in every error about that host. A second ``@`` in the
    authority can only be an unencoded one (user names and passwords must
    percent-encode it as ``%40``).
    """
    match = _AUTHORITY.match(raw_url.strip())
    if match is not None and match["authority"].count("@") > 1:
        raise ConfigurationError(
            "the database URL's user name or password contains an unencoded '@'; "
            "percent-encode the password (and user name): '@' as %40, ':' as %3A, "
            "'/' as %2F (urllib.parse.quote(password, safe=''))"
        )


def parse_database_url(raw_url: str | URL) -> DatabaseTarget:
    """Validate ``raw_url`` and split it into a driver URL and :class:`PoolOptions`.

    Raises:
        ConfigurationError: the URL cannot be parsed, names an unsupported database,
            or carries a bad pool parameter (the message names the parameter and
            never contains the password).
    """
    if isinstance(raw_url, str):
        if not raw_url.strip():
            raise ConfigurationError("database URL is empty")
        _refuse_unencoded_at_sign(raw_url)
        parsed: URL | None
        try:
            parsed = make_url(raw_url)
        except (ArgumentError, ValueError):
            parsed = None
        if parsed is None:
            # Raised outside the `except`: SQLAlchemy's message may quote the whole URL,
            # password included (2.0.30's does; a bad port surfaces as a bare ValueError
            # from int()), and `from None` would still keep it as `__context__`.
            raise ConfigurationError(
                "database URL could not be parsed; expected e.g. "
                "postgresql://user:password@host:5432/dbname or sqlite:///path/to/file.db "
                "(special characters in the user name or password must be percent-encoded: "
                "@ -> %40, : -> %3A, / -> %2F)"
            )
        url = parsed
    else:
        url = raw_url

    backend = url.get_backend_name()
    # A bare scheme means psycopg2 (SQLAlchemy 2.1 would pick psycopg 3); `postgres://`
    # is the Heroku-style alias SQLAlchemy no longer accepts.
    if backend == "postgres":
        driver = url.get_driver_name() if "+" in url.drivername else "psycopg2"
        url = url.set(drivername=f"postgresql+{driver}")
    elif backend == "postgresql" and "+" not in url.drivername:
        url = url.set(drivername="postgresql+psycopg2")
    elif backend not in ("postgresql", "sqlite"):
        raise ConfigurationError(
            f"unsupported database {backend!r} in database URL {mask_url(url)}; "
            "use postgresql:// or sqlite:///"
        )
    if backend == "sqlite" and url.database in (None, "", ":memory:"):
        raise ConfigurationError(
            "an in-memory SQLite database is private to one connection and cannot be "
            "shared by a pool; give a file path, e.g. sqlite:///sessions.db"
        )

    refuse_misspelt_parameters(url)
    pool = _parse_pool_options(url)
    url = url.difference_update_query(_POOL_PARAMETERS)
    # libpq's ?password= moved where SQLAlchemy masks it (reprs, logs); the driver
    # receives it the same way. Any spelling (?PASSWORD=): never left in the query.
    for name in [name for name in url.query if name.lower() == "password"]:
        value = _single_value(url, name)
        url = url.difference_update_query([name])
        if url.password is None:
            url = url.set(password=value)
    secrets = tuple(
        ("sslpassword", _single_value(url, name))
        for name in url.query
        if name.lower() == "sslpassword"
    )
    if secrets:
        url = url.difference_update_query(
            [name for name in url.query if name.lower() == "sslpassword"]
        )
    return DatabaseTarget(url=url, pool=pool, secret_connect_args=secrets)


def _switch_to_wal(cursor: Any, busy_timeout_ms: int) -> None:
    """``PRAGMA journal_mode=WAL``, retried while another process holds the file.

    Switching a file to WAL needs an exclusive lock, and SQLite reports a conflict
    there as "database is locked" at once, without consulting busy_timeout (seen
    when several processes open a new file together). So retry, within the same
    time budget busy_timeout would have given.
    """
    import sqlite3  # here, not at import: a PostgreSQL-only program never loads it

    deadline = time.monotonic() + busy_timeout_ms / 1000
    delay = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _create_private_directories(directory: Path) -> None:
    """``mkdir -p`` where every directory created is the owner's only (0700)."""
    target = directory
    missing = []
    while not directory.exists():
        missing.append(directory)
        if directory.parent == directory:
            break
        directory = directory.parent
    for new in reversed(missing):
        with contextlib.suppress(FileExistsError):
            new.mkdir(mode=0o700)
    # Raises (FileExistsError) when the path is there but not a directory.
    target.mkdir(parents=True, exist_ok=True)


def _configure_sqlite(engine: Engine, busy_timeout_ms: int) -> None:
    database = engine.url.database
    assert database is not None

    @event.listens_for(engine, "do_connect")
    def _create_directory(*_args: Any) -> None:
        # At first connect, not when the engine is made: constructing a session
        # object must do no I/O.
        path = Path(database).expanduser()
        try:
            _create_private_directories(path.parent)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot create the directory {str(path.parent)!r} for the SQLite database: "
                f"{exc.strerror or exc}"
            ) from exc
        # A new database file is the owner's only (SQLite gives its -wal and -shm
        # files the same mode): it holds every conversation.
        with contextlib.suppress(FileExistsError, OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take BEGIN away from the sqlite3 module (which skips it for SELECT and DDL,
        # breaking transactional DDL and repeatable reads); `_on_begin` emits it.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            # WAL lets readers proceed while one writer writes, across processes.
            _switch_to_wal(cursor, busy_timeout_ms)
            cursor.execute("PRAGMA foreign_keys=ON")
            # NORMAL is durable against application crashes in WAL mode; only a power
            # loss can drop the last commits. It is SQLite's recommended WAL setting.
            cursor.execute("PRAGMA synchronous=NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # A deferred transaction that reads and then writes must upgrade its lock;
        # if another process upgraded first, SQLite fails at once with SQLITE_BUSY
        # (busy_timeout cannot help a deadlock). Writers therefore take the write
        # lock up front, where busy_timeout makes them queue instead.
        if connection.get_execution_options().get(SQLITE_WRITE_OPTION):
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            connection.exec_driver_sql("BEGIN")


def socket_has_news(dbapi_connection: Any) -> bool:
    """True if an idle connection's socket is readable: the server closed it, or is about to.

    An idle PostgreSQL connection receives nothing unsolicited in normal operation
    (this package never LISTENs). When its backend is terminated
    (``pg_terminate_backend``, a restart, an idle-session timeout, a proxy closing
    it) the server sends a FATAL message and/or closes the socket, and the socket
    turns readable. Polling it with a zero timeout costs one system call, no round
    trip -- the same check Go's database/sql drivers make before reusing a connection.

    ``poll()``, not ``select()``: select cannot watch descriptors above 1023, which a
    busy server process easily has. A connection that cannot be polled (no
    ``fileno()``, a platform without ``poll``) counts as alive: a dead one is then
    caught when its statement fails, as without this check.
    """
    try:
        descriptor = dbapi_connection.fileno()
    except Exception:
        return False
    if _poll is None:
        return False
    poller = _poll()
    poller.register(descriptor, select.POLLIN)
    try:
        return bool(poller.poll(0))
    except OSError:
        return False


_poll = getattr(select, "poll", None)


class ReadCommittedCheck:
    """Makes sure new connections run at READ COMMITTED; one per engine, shared by its pools.

    The ordering and pop guarantees rely on READ COMMITTED: each statement sees what
    committed before it began, and a row lock wait re-checks the row. It is
    PostgreSQL's default. A role or database defaulting to REPEATABLE READ or
    SERIALIZABLE would turn concurrent appends and pops into serialization
    failures, so such a default is overridden per connection. Nothing is SET when
    the default is already right: behind PgBouncer (transaction pooling) session
    state would leak to other clients. Checked until one connection has confirmed
    the default.
    """

    #: The statement whose answer :meth:`statement_after` judges.
    SHOW = "SHOW default_transaction_isolation"

    def __init__(self) -> None:
        self.confirmed = False

    def statement_after(self, level: str) -> str | None:
        """Given the answer to :attr:`SHOW`, the statement to run next (or ``None``)."""
        if level == "read committed":
            self.confirmed = True
            return None
        logger.warning(
            "agents_sessions: the server's default_transaction_isolation is %r; "
            "setting READ COMMITTED on each connection. Behind a transaction-"
            "pooling proxy set it on the role instead: ALTER ROLE ... SET "
            "default_transaction_isolation = 'read committed'",
            level,
        )
        return "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ COMMITTED"


def _configure_postgresql(engine: Engine, read_committed: ReadCommittedCheck) -> None:

    @event.listens_for(engine, "checkout")
    def _replace_dead_connection(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        # A pooled connection whose server side has gone is replaced *before* any
        # statement is sent on it, so a restart or killed backends never make an
        # operation fail (or leave its outcome unknown). DisconnectionError tells
        # the pool to discard this connection and check out a fresh one.
        if socket_has_news(dbapi_connection):
            raise DisconnectionError("the pooled connection was closed by the server")

    @event.listens_for(engine, "before_cursor_execute", retval=True)
    def _act_for_tenant(
        connection: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        _context: Any,
        executemany: bool,
    ) -> tuple[str, Any]:
        # Row-level security reads the acting tenant from a transaction-local
        # setting. Prefixing set_config(..., is_local => true) to the statement sets
        # it in the same round trip and the same transaction: an autocommit
        # statement sent as a two-statement query runs as one implicit transaction,
        # and inside an explicit transaction it is set again before each statement.
        # Nothing outlives the transaction, so a proxy that pools by transaction
        # (PgBouncer) cannot carry one tenant's setting to another client.
        tenant = connection.get_execution_options().get(TENANT_OPTION)
        if tenant is None:
            return statement, parameters
        server_side = getattr(cursor, "name", None) is not None  # DECLARE ... CURSOR FOR
        if executemany or server_side or not isinstance(parameters, dict):
            # No single parameter dict to extend: set it on its own first.
            # (A transaction is open here: the store gives tenant writes a real one.)
            with connection.connection.dbapi_connection.cursor() as setter:  # type: ignore[union-attr]
                setter.execute("SELECT set_config(%s, %s, true)", (TENANT_SETTING, tenant))
            return statement, parameters
        return (
            "SELECT set_config(%(agents_sessions_tenant_setting)s, "
            "%(agents_sessions_tenant_id)s, true); " + statement,
            {
                **parameters,
                "agents_sessions_tenant_setting": TENANT_SETTING,
                "agents_sessions_tenant_id": tenant,
            },
        )

    @event.listens_for(engine, "connect")
    def _ensure_read_committed(dbapi_connection: Any, _record: Any) -> None:
        if read_committed.confirmed:
            return
        dbapi_connection.autocommit = True
        try:
            cursor = dbapi_connection.cursor()
            cursor.execute(ReadCommittedCheck.SHOW)
            (level,) = cursor.fetchone()
            statement = read_committed.statement_after(level)
            if statement is not None:
                cursor.execute(statement)
            cursor.close()
        finally:
            dbapi_connection.autocommit = False


def _postgresql_startup_options(
    url: URL, *, statement_timeout_ms: int | None, lock_timeout_ms: int | None
) -> str | None:
    """libpq ``options`` carrying the timeouts, appended to any ``options`` in the URL.

    Startup options cost no round trip (they travel in the connection handshake),
    and a server restart or a new pooled connection gets them again.
    """
    parts = []
    given = url.query.get("options")
    if given:
        parts.append(given if isinstance(given, str) else " ".join(given))
    if statement_timeout_ms is not None:
        parts.append(f"-c statement_timeout={int(statement_timeout_ms)}")
    if lock_timeout_ms is not None:
        parts.append(f"-c lock_timeout={int(lock_timeout_ms)}")
    return " ".join(parts) if parts else None


def create_pooled_engine(
    target: DatabaseTarget,
    *,
    echo: bool = False,
    sqlite_busy_timeout_ms: int = 10_000,
    statement_timeout_ms: int | None = None,
    lock_timeout_ms: int | None = None,
    pooled: bool = True,
) -> Engine:
    """Create a new engine for ``target``, with a ``QueuePool`` sized from its URL.

    Does not connect. ``pooled=False`` gives a ``NullPool`` engine for one-shot
    work such as a migration run. Most code wants
    :func:`agents_sessions.store.get_store`, which shares one engine per URL per
    process; this is the factory underneath it.
    """
    connect_args: dict[str, Any] = dict(target.secret_connect_args)
    if target.dialect == "sqlite":
        # Connections move between the executor's threads; the pool guarantees that
        # only one thread uses a connection at a time.
        connect_args["check_same_thread"] = False
    else:
        options = _postgresql_startup_options(
            target.url, statement_timeout_ms=statement_timeout_ms, lock_timeout_ms=lock_timeout_ms
        )
        if options is not None:
            connect_args["options"] = options
        for keyword, value in NETWORK_DEFAULTS.items():
            if keyword not in target.url.query:
                connect_args[keyword] = value
    pool_arguments: dict[str, Any] = (
        {
            "poolclass": QueuePool,
            "pool_size": target.pool.pool_size,
            "max_overflow": target.pool.max_overflow,
            "pool_timeout": target.pool.pool_timeout,
            "pool_recycle": target.pool.pool_recycle,
            "pool_pre_ping": target.pool.pool_pre_ping,
        }
        if pooled
        else {"poolclass": NullPool}
    )
    try:
        engine = create_engine(target.url, echo=echo, connect_args=connect_args, **pool_arguments)
    except (ImportError, NoSuchModuleError) as exc:
        raise ConfigurationError(
            f"the database driver {target.url.drivername!r} is not available ({exc}); "
            "use postgresql:// (psycopg2, installed with agents_sessions) or install it"
        ) from exc
    if target.dialect == "sqlite":
        _configure_sqlite(engine, sqlite_busy_timeout_ms)
    else:
        check = ReadCommittedCheck()
        _configure_postgresql(engine, check)
        _, parameters = engine.dialect.create_connect_args(engine.url)
        _postgresql_recipes[engine] = PostgreSQLConnectRecipe({**parameters, **connect_args}, check)
    return engine


@dataclass(frozen=True)
class PostgreSQLConnectRecipe:
    """How the engine's pool connects: for another pool that must connect the same way.

    Attributes:
        parameters: The driver's keyword arguments (URL, timeouts in ``options``,
            network defaults, secrets), exactly as the engine's pool passes them.
        read_committed: The engine's isolation check, to run on each new connection.
    """

    parameters: dict[str, Any] = field(repr=False)
    read_committed: ReadCommittedCheck


_postgresql_recipes: weakref.WeakKeyDictionary[Engine, PostgreSQLConnectRecipe] = (
    weakref.WeakKeyDictionary()
)


def postgresql_connect_recipe(engine: Engine) -> PostgreSQLConnectRecipe:
    """How a PostgreSQL engine made by :func:`create_pooled_engine` connects."""
    return _postgresql_recipes[engine]


_logged_default_locations: set[Path] = set()
_logged_default_locations_lock = threading.Lock()


def _renew_lock_in_forked_child() -> None:
    # A lock held by a parent thread at fork time would stay held in the child.
    global _logged_default_locations_lock
    _logged_default_locations_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_lock_in_forked_child)


def log_embedded_default_once(path: Path) -> None:
    """Warn once per process (and per file) that the zero-configuration SQLite file is in use.

    A WARNING, not INFO: an app meant for PostgreSQL whose ``DATABASE_URL`` is unset or
    misspelt would otherwise write its conversations to a local file unnoticed.
    """
    with _logged_default_locations_lock:
        if path in _logged_default_locations:
            return
        _logged_default_locations.add(path)
    logger.warning(
        "agents_sessions: no database URL configured (DATABASE_URL / "
        "AGENTS_SESSIONS_DATABASE_URL are unset); using the embedded SQLite database at %s. "
        "To use PostgreSQL set DATABASE_URL=postgresql://user:password@host:5432/dbname "
        "(or pass database_url=...); set AGENTS_SESSIONS_REQUIRE_DATABASE_URL=true to "
        "make a missing URL an error instead",
        path,
    )
