"""Engines and pools: URL parsing, pool options, one engine per URL, limits, secrets.

Every test here names a behaviour a user relies on; each one would fail if the
behaviour broke (the PostgreSQL ones check what the server itself sees).
"""

from __future__ import annotations

import asyncio
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.pool import QueuePool

from agents_sessions import (
    ConfigurationError,
    DatabaseError,
    PoolOptions,
    PoolTimeoutError,
    PostgreSQLSession,
    dispose_all,
    get_store,
    load_settings,
    parse_database_url,
)

PASSWORD = "hunter2"
POOL_QUERY = "pool_size=20&max_overflow=10&pool_timeout=5&pool_recycle=600&pool_pre_ping=true"
DRIVER_QUERY = "sslmode=disable&application_name=x&connect_timeout=7"
# A PostgreSQL URL nothing listens on: fine for tests that must not connect.
UNREACHABLE_PG = f"postgresql://u:{PASSWORD}@127.0.0.1:1/db"


def with_query(url: str, query: str) -> str:
    """``url`` with ``query`` appended to its query string."""
    return f"{url}{'&' if '?' in url else '?'}{query}"


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception chained to it (cause or context)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def assert_no_password(exc: BaseException) -> None:
    for link in exception_chain(exc):
        assert PASSWORD not in str(link), f"{type(link).__name__} leaks the password"
        assert PASSWORD not in repr(link), f"{type(link).__name__} leaks the password"
    assert PASSWORD not in "".join(traceback.format_exception(exc))


@pytest.fixture(autouse=True)
def _fresh_engine_cache() -> Iterator[None]:
    # Pools opened by one test must not be counted (or reused) by the next one.
    dispose_all()
    yield
    dispose_all()


@pytest.fixture
def pg_admin(postgres_server: Any) -> Iterator[Engine]:
    """An engine on the server's maintenance database, for looking at pg_stat_activity."""
    engine = create_engine(postgres_server.admin_url)
    yield engine
    engine.dispose()


def backend_count(admin: Engine, database: str) -> int:
    """How many client backends are connected to ``database`` right now."""
    with admin.connect() as connection:
        return backend_count_on(connection, database)


def backend_count_on(connection: Connection, database: str) -> int:
    """:func:`backend_count` on an open connection.

    Client backends only, and not Citus's own (its maintenance daemon, and the
    connections a coordinator keeps to the nodes, itself included): the package's.
    """
    return int(
        connection.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = :name "
                "AND backend_type = 'client backend' "
                "AND application_name NOT LIKE 'citus%'"
            ),
            {"name": database},
        ).scalar_one()
    )


# --------------------------------------------------------------------------- parsing


def test_pool_options_are_parsed_and_removed_from_the_url_while_driver_params_stay() -> None:
    target = parse_database_url(with_query(UNREACHABLE_PG, f"{POOL_QUERY}&{DRIVER_QUERY}"))

    assert target.pool == PoolOptions(
        pool_size=20, max_overflow=10, pool_timeout=5.0, pool_recycle=600, pool_pre_ping=True
    )
    assert target.pool.max_connections == 30
    assert dict(target.url.query) == {
        "sslmode": "disable",
        "application_name": "x",
        "connect_timeout": "7",
    }


def test_url_without_pool_parameters_gets_the_default_pool_options() -> None:
    target = parse_database_url(with_query(UNREACHABLE_PG, "sslmode=require"))

    assert target.pool == PoolOptions()
    assert dict(target.url.query) == {"sslmode": "require"}


PRE_PING_SPELLINGS = [("true", True), ("1", True), ("YES", True), ("on", True)]
PRE_PING_SPELLINGS += [("false", False), ("0", False), ("No", False), ("off", False)]


@pytest.mark.parametrize(("raw", "expected"), PRE_PING_SPELLINGS)
def test_pool_pre_ping_accepts_the_usual_boolean_spellings(raw: str, expected: bool) -> None:
    target = parse_database_url(with_query(UNREACHABLE_PG, f"pool_pre_ping={raw}"))

    assert target.pool.pool_pre_ping is expected


def test_pool_recycle_minus_one_disables_recycling() -> None:
    assert parse_database_url(with_query(UNREACHABLE_PG, "pool_recycle=-1")).pool.pool_recycle == -1


@pytest.mark.postgres_only
def test_driver_parameters_reach_postgresql_and_pool_parameters_do_not(
    postgres_server: Any,
) -> None:
    url = with_query(postgres_server.create_database(), f"{POOL_QUERY}&{DRIVER_QUERY}")
    store = get_store(url)

    # psycopg2 rejects unknown connection options, so connecting at all proves the
    # pool parameters were removed before reaching the driver.
    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("SHOW application_name").scalar_one() == "x"
        dsn = connection.connection.dbapi_connection.get_dsn_parameters()  # type: ignore[union-attr]
    assert dsn["connect_timeout"] == "7"
    assert dsn["sslmode"] == "disable"
    assert not {"pool_size", "max_overflow", "pool_timeout"} & set(dsn)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_store_engine_really_uses_the_pool_options_from_the_url(kind: str, tmp_path: Path) -> None:
    base = f"sqlite:///{tmp_path / 'pool.sqlite3'}" if kind == "sqlite" else UNREACHABLE_PG
    store = get_store(with_query(base, POOL_QUERY))
    pool = store.engine.pool

    assert type(pool) is QueuePool
    assert pool.size() == 20
    assert pool._max_overflow == 10
    assert pool._timeout == 5.0
    assert pool._recycle == 600
    assert pool._pre_ping is True
    # One worker thread per connection the pool may hold.
    assert store.executor._max_workers == 30
    assert not {"pool_size", "max_overflow", "pool_pre_ping"} & set(store.engine.url.query)


BAD_POOL_PARAMETERS = [
    ("pool_size=abc", "pool_size"),
    ("pool_size=0", "pool_size"),
    ("pool_size=-1", "pool_size"),
    ("pool_size=1.5", "pool_size"),
    ("max_overflow=-2", "max_overflow"),
    ("max_overflow=x", "max_overflow"),
    ("pool_timeout=0", "pool_timeout"),
    ("pool_timeout=-3", "pool_timeout"),
    ("pool_timeout=abc", "pool_timeout"),
    ("pool_timeout=nan", "pool_timeout"),
    ("pool_timeout=inf", "pool_timeout"),
    ("pool_recycle=x", "pool_recycle"),
    ("pool_recycle=-2", "pool_recycle"),
    ("pool_pre_ping=maybe", "pool_pre_ping"),
    ("pool_size=5&pool_size=6", "pool_size"),
]


@pytest.mark.parametrize(
    ("query", "parameter"), BAD_POOL_PARAMETERS, ids=[q for q, _ in BAD_POOL_PARAMETERS]
)
def test_bad_pool_parameter_raises_configuration_error_naming_it_without_password(
    query: str, parameter: str
) -> None:
    url = f"postgresql://user:{PASSWORD}@host/db?{query}"

    for attempt in (parse_database_url, get_store):
        with pytest.raises(ConfigurationError) as info:
            attempt(url)
        assert isinstance(info.value, ValueError)
        assert parameter in str(info.value)
        assert_no_password(info.value)


INVALID_URLS = [
    pytest.param("", "empty", id="empty"),
    pytest.param("   ", "empty", id="blank"),
    pytest.param(f"user:{PASSWORD}@host/db", "could not be parsed", id="no-scheme"),
    pytest.param(f"mysql://user:{PASSWORD}@host/db", "mysql", id="mysql"),
    pytest.param(f"mysql+pymysql://user:{PASSWORD}@host/db", "mysql", id="mysql-driver"),
    pytest.param(f"oracle://user:{PASSWORD}@host/db", "oracle", id="oracle"),
    pytest.param("sqlite://", "in-memory", id="sqlite-memory-implicit"),
    pytest.param("sqlite:///:memory:", "in-memory", id="sqlite-memory-explicit"),
]


@pytest.mark.parametrize(("url", "reason"), INVALID_URLS)
def test_invalid_or_unsupported_url_raises_configuration_error_without_password(
    url: str, reason: str
) -> None:
    for attempt in (parse_database_url, get_store):
        with pytest.raises(ConfigurationError) as info:
            attempt(url)
        assert reason in str(info.value)
        assert_no_password(info.value)


@pytest.mark.parametrize(
    "url",
    [f"postgresql://user:{PASSWORD}@host:notaport/db", f"postgresql://user:{PASSWORD}@[::1/db"],
    ids=["non-numeric-port", "broken-ipv6-host"],
)
def test_url_with_malformed_port_raises_configuration_error(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_database_url(url)
    assert_no_password(info.value)


@pytest.mark.parametrize(
    ("url", "driver"),
    [
        ("postgresql://u:p@h/db", "postgresql+psycopg2"),
        ("postgres://u:p@h/db", "postgresql+psycopg2"),
        ("postgresql+psycopg2://u:p@h/db", "postgresql+psycopg2"),
        ("postgresql+psycopg://u:p@h/db", "postgresql+psycopg"),
        ("postgres+psycopg://u:p@h/db", "postgresql+psycopg"),
        ("sqlite:///some/file.db", "sqlite"),
    ],
)
def test_bare_postgres_schemes_are_pinned_to_psycopg2_and_explicit_drivers_kept(
    url: str, driver: str
) -> None:
    target = parse_database_url(url)

    assert target.url.drivername == driver
    assert target.dialect == driver.split("+")[0]
    # Everything but the driver survives the rewrite.
    assert target.url.set(drivername="x") == make_url(url).set(drivername="x")


@pytest.mark.parametrize(
    "url", ["postgresql+nosuchdriver://u:hunter2@h/db", "postgres+nosuchdriver://u:hunter2@h/db"]
)
def test_unavailable_driver_is_a_configuration_error_naming_it(url: str) -> None:
    with pytest.raises(ConfigurationError, match="nosuchdriver") as info:
        get_store(url)
    assert_no_password(info.value)


# ------------------------------------------------------------- one engine per URL


def test_thousand_sessions_on_one_url_share_one_engine_and_open_no_connection(
    backend: str,
    fresh_database_url: Callable[[], str],
    request: pytest.FixtureRequest,
) -> None:
    url = fresh_database_url()

    sessions = [PostgreSQLSession(f"conv-{i}", database_url=url) for i in range(1000)]

    engine = sessions[0].store.engine
    assert all(session.store.engine is engine for session in sessions)
    assert all(session.store.executor is sessions[0].store.executor for session in sessions)
    assert sessions[0].store.pool.checkedout() == 0
    database = make_url(url).database
    assert database is not None
    if backend == "postgresql":
        admin = request.getfixturevalue("pg_admin")
        assert backend_count(admin, database) == 0
    else:
        assert not Path(database).exists()

    assert asyncio.run(sessions[0].get_items()) == []

    # The first call did connect (so the checks above could have seen it)...
    assert sessions[0].store.pool.checkedin() >= 1
    assert sessions[0].store.pool.checkedout() == 0
    if backend == "postgresql":
        assert backend_count(admin, database) >= 1
    # ...and a different URL gets an engine of its own.
    other = with_query(url, "application_name=other") if backend == "postgresql" else url + "2"
    assert get_store(other).engine is not engine
    assert get_store(url).engine is engine


def test_urls_differing_only_in_pool_options_do_not_share_a_pool(tmp_path: Path) -> None:
    base = f"sqlite:///{tmp_path / 'pools.sqlite3'}"
    small = get_store(with_query(base, "pool_size=2"))
    large = get_store(with_query(base, "pool_size=7"))

    assert large.target.pool.pool_size == 7
    assert large.engine.pool.size() == 7  # type: ignore[attr-defined]
    assert small.engine.pool.size() == 2  # type: ignore[attr-defined]


# ------------------------------------------------------------------------ limits


@pytest.mark.postgres_only
@pytest.mark.direct_connection_only(
    "counts the client pool's connections as server backends in pg_stat_activity"
)
def test_pool_never_exceeds_pool_size_plus_max_overflow_under_50_concurrent_sessions(
    postgres_server: Any, pg_admin: Engine
) -> None:
    url = with_query(postgres_server.create_database(), "pool_size=2&max_overflow=1")
    database = make_url(url).database
    assert database is not None
    store = get_store(url)

    checked_out = 0
    peak_checked_out = 0
    counter_lock = threading.Lock()

    @event.listens_for(store.engine, "checkout")
    def _checkout(*_args: Any) -> None:
        nonlocal checked_out, peak_checked_out
        with counter_lock:
            checked_out += 1
            peak_checked_out = max(peak_checked_out, checked_out)

    @event.listens_for(store.engine, "checkin")
    def _checkin(*_args: Any) -> None:
        nonlocal checked_out
        with counter_lock:
            checked_out -= 1

    server_counts: list[int] = []
    stop = threading.Event()

    def poll_server() -> None:
        with pg_admin.connect() as connection:
            while not stop.is_set():
                server_counts.append(backend_count_on(connection, database))
                connection.rollback()
                time.sleep(0.002)

    async def round_trip(index: int) -> list[Any]:
        session = PostgreSQLSession(f"pool-{index}-{uuid.uuid4().hex}", database_url=url)
        items = [{"role": "user", "content": f"message {index}"}]
        await session.add_items(items)
        stored = await session.get_items()
        assert stored == items
        return stored

    async def main() -> list[Any]:
        return list(await asyncio.gather(*(round_trip(index) for index in range(50))))

    poller = threading.Thread(target=poll_server, daemon=True)
    poller.start()
    try:
        results = asyncio.run(main())
    finally:
        stop.set()
        poller.join(timeout=10)

    assert len(results) == 50
    assert server_counts, "the poller never saw the database"
    assert max(server_counts) <= 3, f"server saw {max(server_counts)} connections"
    assert peak_checked_out <= 3
    # The sessions' calls run on the event loop's connections, which share the ceiling.
    assert max(server_counts) >= 2, "the pools were never under concurrent load"
    assert checked_out == 0
    assert backend_count(pg_admin, database) <= 3


def test_pool_exhaustion_raises_pool_timeout_error_naming_the_pool_settings(
    backend: str, fresh_database_url: Callable[[], str]
) -> None:
    url = with_query(fresh_database_url(), "pool_size=1&max_overflow=0&pool_timeout=0.5")
    store = get_store(url)
    store.ensure_schema()  # so that the waiting thread only waits for the pool
    outcome: dict[str, Any] = {}

    def read_in_other_thread() -> None:
        started = time.monotonic()
        try:
            with store.read():
                outcome["result"] = "got a connection"
        except BaseException as exc:
            outcome["error"] = exc
        outcome["elapsed"] = time.monotonic() - started

    with store.read():
        other = threading.Thread(target=read_in_other_thread, daemon=True)
        other.start()
        other.join(timeout=10)
        assert not other.is_alive(), "waiting for the pool hung"

    error = outcome.get("error")
    assert isinstance(error, PoolTimeoutError), outcome
    assert isinstance(error, TimeoutError)
    assert isinstance(error, DatabaseError)
    assert isinstance(error.__cause__, sa_exc.TimeoutError)
    message = str(error)
    assert "pool_size=1" in message
    assert "max_overflow=0" in message
    assert "pool_timeout=0.5" in message
    # It waited for pool_timeout before giving up (that it gave up at all is the
    # join above; no upper bound on a shared, noisy machine).
    assert outcome["elapsed"] >= 0.4
    # The pool recovers once the connection is back.
    with store.read() as repos:
        assert repos.connection.exec_driver_sql("SELECT 1").scalar_one() == 1


# ------------------------------------------------------------------------ SQLite


def test_sqlite_connections_get_wal_foreign_keys_and_the_configured_busy_timeout(
    tmp_path: Path,
) -> None:
    path = tmp_path / "nested" / "dir" / "pragmas.sqlite3"
    settings = load_settings(sqlite_busy_timeout_ms=1234)
    store = get_store(f"sqlite:///{path}", settings=settings)
    assert not path.parent.exists(), "making a store must not touch the filesystem"

    with store.engine.connect() as connection:
        pragma = connection.exec_driver_sql
        assert pragma("PRAGMA journal_mode").scalar_one() == "wal"
        assert pragma("PRAGMA foreign_keys").scalar_one() == 1
        assert pragma("PRAGMA busy_timeout").scalar_one() == 1234
        assert pragma("PRAGMA synchronous").scalar_one() == 1  # NORMAL
    assert path.is_file()

    # Every pooled connection, including the ones the repositories get.
    with store.read() as repos:
        assert repos.connection.exec_driver_sql("PRAGMA busy_timeout").scalar_one() == 1234
        assert repos.connection.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1


def test_sqlite_busy_timeout_defaults_to_ten_seconds(tmp_path: Path) -> None:
    store = get_store(f"sqlite:///{tmp_path / 'default.sqlite3'}")

    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar_one() == 10_000


# ----------------------------------------------------------------------- secrets


def test_password_never_appears_in_reprs_of_store_session_settings_or_target() -> None:
    url = f"postgresql://u:{PASSWORD}@h/db?pool_size=3"
    store = get_store(url)
    session = PostgreSQLSession("c", database_url=url)
    settings = load_settings(database_url=url)

    for shown in (
        repr(store),
        str(store),
        repr(session),
        str(settings),
        repr(settings),
        repr(store.target),
        store.target.safe_url,
        repr(store.engine),
    ):
        assert PASSWORD not in shown
    assert "***" in repr(store)
    assert "***" in repr(session)
    assert settings.safe_database_url() == "postgresql://u:***@h/db?pool_size=3"
    # The secret is still there for whoever asks for it explicitly.
    assert settings.resolved_database_url() == url


def test_connection_error_is_database_error_with_cause_and_without_password() -> None:
    session = PostgreSQLSession("c", database_url=with_query(UNREACHABLE_PG, "connect_timeout=2"))

    with pytest.raises(DatabaseError) as info:
        asyncio.run(session.get_items())

    assert not isinstance(info.value, PoolTimeoutError)
    assert isinstance(info.value.__cause__, sa_exc.OperationalError)
    assert_no_password(info.value)
