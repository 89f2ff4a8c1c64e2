"""The store: one pooled engine per database URL per process, its schema check, its threads.

:func:`get_store` is the entry point for the repository API and what every session
object uses underneath. Thousands of session objects on one URL share one
:class:`SessionStore`, so one ``QueuePool`` (at most ``pool_size + max_overflow``
connections) and one thread pool of the same size.

Transactions are owned here, never by the repositories:

* :meth:`SessionStore.transaction` -- one transaction for several repository calls
  (``BEGIN IMMEDIATE`` on SQLite: writers in several processes queue, never deadlock).
* :meth:`SessionStore.read` -- reads; nothing is committed.
* :meth:`SessionStore.single_statement` -- an operation that is one statement on
  PostgreSQL: autocommit there (one round trip), a transaction elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

from sqlalchemy import Connection, Engine
from sqlalchemy.pool import QueuePool

from .db.deadline import watchdog
from .db.distribution_probe import citus_installed
from .db.engine import (
    DISTRIBUTED_OPTION,
    SQLITE_WRITE_OPTION,
    TENANT_OPTION,
    DatabaseTarget,
    PoolOptions,
    create_pooled_engine,
    log_embedded_default_once,
    parse_database_url,
)
from .db.failures import RetryPlan, replica_unreachable, replica_url_with_connect_timeout
from .db.hot_path import HotMessages, driver_autocommit, driver_connection
from .db.migrate import ensure_schema_at_head
from .db.sqlite_hot_path import NotOnTheHotPath, run_on_sqlite
from .db.sqlite_loop_reader import LoopReaders
from .db.tenancy_probe import warn_if_tenancy_not_enforced
from .errors import (
    ConfigurationError,
    DatabaseError,
    PoolTimeoutError,
    translate_database_errors,
)
from .repositories import Repositories
from .settings import Settings, default_settings
from .validation import validate_identifier

if TYPE_CHECKING:
    from .db.async_pool import AsyncPools  # psycopg2 loads with the first PostgreSQL URL

logger = logging.getLogger("agents_sessions")

_T = TypeVar("_T")


@dataclass
class _EngineState:
    """What is shared by everything using one database URL in this process."""

    target: DatabaseTarget
    engine: Engine
    executor: ThreadPoolExecutor
    # SQLite: the event loops' own connections for short reads (db/sqlite_loop_reader.py).
    loop_readers: LoopReaders
    schema_lock: threading.Lock = field(default_factory=threading.Lock)
    schema_ready: bool = False
    # Set by dispose_all(): stores holding this state look up a fresh one.
    disposed: bool = False
    # For a read replica: until when (time.monotonic()) reads skip it after it
    # failed to connect, rather than pay a failed connect on every call.
    unavailable_until: float = 0.0
    # Whether a tenant-scoped call has checked that isolation is really enforced.
    tenancy_checked: bool = False
    # A Citus cluster: one-statement writes run statement by statement in a transaction.
    distributed: bool = False
    # PostgreSQL with psycopg2: the event loops' pools of asynchronous connections,
    # sharing the URL's connection ceiling with the engine's pool (db/budget.py).
    async_pools: AsyncPools | None = None


@dataclass(frozen=True)
class _EngineOptions:
    """The settings that shape an engine; different values mean a different engine."""

    echo: bool
    sqlite_busy_timeout_ms: int
    statement_timeout_ms: int | None
    lock_timeout_ms: int | None

    @classmethod
    def of(cls, settings: Settings) -> _EngineOptions:
        return cls(
            echo=settings.echo,
            sqlite_busy_timeout_ms=settings.sqlite_busy_timeout_ms,
            statement_timeout_ms=settings.statement_timeout_ms,
            lock_timeout_ms=settings.lock_timeout_ms,
        )


_states: dict[
    tuple[str, tuple[tuple[str, str], ...], PoolOptions, _EngineOptions], _EngineState
] = {}
_states_lock = threading.Lock()


# The same URL string as given by callers -> its state: a dict hit, so creating a
# session object does not re-parse its URL. Entries are never removed except by
# dispose_all(): an app uses a handful of URLs.
_states_by_given_url: dict[tuple[str, _EngineOptions], _EngineState] = {}


def _new_executor(target: DatabaseTarget) -> ThreadPoolExecutor:
    # One worker thread per connection the pool can hold: a blocking call never
    # waits for a thread when a connection is free, and never holds a thread
    # waiting for a connection that cannot exist.
    return ThreadPoolExecutor(
        max_workers=target.pool.max_connections, thread_name_prefix="agents_sessions"
    )


def _engine_state(url: str, settings: Settings) -> _EngineState:
    options = _EngineOptions.of(settings)
    given = (url, options)
    state = _states_by_given_url.get(given)
    if state is not None:
        return state
    target = parse_database_url(url)
    # The full URL (password included) is the identity: two passwords are two
    # roles, and must not share connections; two pool configurations are two pools.
    # The key never leaves this dict.
    key = (
        target.url.render_as_string(hide_password=False),
        target.secret_connect_args,
        target.pool,
        options,
    )
    with _states_lock:
        state = _states.get(key)
        if state is None:
            engine = create_pooled_engine(
                target,
                echo=options.echo,
                sqlite_busy_timeout_ms=options.sqlite_busy_timeout_ms,
                statement_timeout_ms=options.statement_timeout_ms,
                lock_timeout_ms=options.lock_timeout_ms,
            )
            state = _EngineState(target, engine, _new_executor(target), LoopReaders(engine))
            if target.dialect == "postgresql":
                from .db.async_pool import AsyncPools

                state.async_pools = AsyncPools.for_engine(engine, target)
            _states[key] = state
        _states_by_given_url[given] = state
    return state


class SessionStore:
    """A database of conversations: engine, pool, schema check and repositories.

    Get one with :func:`get_store` (shared per URL), then::

        with store.transaction() as repos:
            repos.conversations.upsert("conv-1", user_id="u1", metadata={"channel": "web"})
            repos.messages.append("conv-1", [{"role": "user", "content": "Hi"}])
    """

    def __init__(
        self,
        url: str,
        settings: Settings,
        *,
        replica_url: str | None = None,
        is_replica: bool = False,
    ) -> None:
        self._url = url
        self.settings = settings
        self._current = _engine_state(url, settings)
        self._replica_url = replica_url
        self._replica: SessionStore | None = None
        self.is_replica = is_replica

    @property
    def replica(self) -> SessionStore | None:
        """The store of the read replica, or ``None`` when none is configured.

        Reads that tolerate replication lag reach it through
        ``read(lag_tolerant=True)`` / ``run(..., lag_tolerant=True)``, which fall
        back to this (primary) store when the replica cannot be reached.
        """
        if self._replica_url is None:
            return None
        if self._replica is None:
            self._replica = SessionStore(
                replica_url_with_connect_timeout(self._replica_url), self.settings, is_replica=True
            )
        return self._replica

    def _available_replica(self) -> SessionStore | None:
        replica = self.replica
        if replica is None or time.monotonic() < replica._state.unavailable_until:
            return None
        return replica

    def _replica_failed(self, replica: SessionStore, error: DatabaseError) -> None:
        retry_after = self.settings.replica_retry_after_s
        replica._state.unavailable_until = time.monotonic() + retry_after
        logger.warning(
            "agents_sessions: the read replica %s is unavailable (%s); reading from the "
            "primary for the next %.0f s",
            replica.target.safe_url,
            error,
            retry_after,
        )

    @property
    def _state(self) -> _EngineState:
        state = self._current
        if state.disposed:
            # dispose_all() ran (a test, a graceful restart): carry on with a fresh
            # engine for the same URL rather than fail on a shut-down executor.
            state = self._current = _engine_state(self._url, self.settings)
        return state

    @property
    def engine(self) -> Engine:
        """The shared SQLAlchemy engine (``QueuePool``)."""
        return self._state.engine

    @property
    def pool(self) -> QueuePool:
        """The engine's connection pool (``checkedout()``, ``status()``, ...)."""
        return cast(QueuePool, self._state.engine.pool)

    @property
    def target(self) -> DatabaseTarget:
        """The parsed URL and pool options."""
        return self._state.target

    @property
    def dialect(self) -> str:
        """``"postgresql"`` or ``"sqlite"``."""
        return self._state.target.dialect

    @property
    def executor(self) -> ThreadPoolExecutor:
        """Threads that run this store's blocking calls for the async session facade."""
        return self._state.executor

    async def call_in_thread(self, function: Callable[..., _T], *args: Any) -> _T:
        """Run blocking ``function(*args)`` on this store's worker threads, for async callers.

        There is one thread per connection the pool can hold, so when every
        connection is busy (say, all waiting for one locked conversation) a call
        waits for a *thread*, where the pool's own ``pool_timeout`` cannot see it.
        The same bound applies here instead: a call that no thread has picked up
        within ``pool_timeout`` is withdrawn (it never ran) and raises
        :class:`~agents_sessions.errors.PoolTimeoutError` -- it never hangs behind
        an unrelated conversation's lock.
        """
        loop = asyncio.get_running_loop()
        pending = self.executor.submit(function, *args)
        result = asyncio.wrap_future(pending, loop=loop)
        withdrawn = False

        def withdraw_if_not_started() -> None:
            nonlocal withdrawn
            # cancel() succeeds only for a call no thread has started.
            withdrawn = pending.cancel()

        pool = self.target.pool
        timer = loop.call_later(pool.pool_timeout, withdraw_if_not_started)
        try:
            return await result
        except asyncio.CancelledError:
            if withdrawn:
                raise PoolTimeoutError(
                    f"no worker thread became free within pool_timeout={pool.pool_timeout:g}s "
                    f"({pool.describe()}): every connection is busy, e.g. waiting for a "
                    "locked conversation; the call did not run. Raise pool_size/"
                    "max_overflow in the database URL, or pool_timeout"
                ) from None
            raise
        finally:
            timer.cancel()

    def ensure_schema(self) -> None:
        """Check (once per engine) that the schema is at head, migrating if allowed.

        Thread-safe; after the first success it is a flag check, no I/O. A replica's
        schema is the primary's (replicated), so a replica store checks nothing.
        """
        if self.is_replica:
            return
        state = self._state
        if state.schema_ready:
            return
        with state.schema_lock:
            if state.schema_ready:
                return
            ensure_schema_at_head(
                state.engine, auto_migrate=self.settings.auto_migrate, settings=self.settings
            )
            state.distributed = self.dialect == "postgresql" and citus_installed(state.engine)
            state.schema_ready = True

    def _act_for(self, connection: Connection, tenant_id: str | None) -> None:
        if tenant_id is None:
            return
        if self.dialect != "postgresql":
            raise ConfigurationError(
                "tenant_id needs PostgreSQL row-level security; SQLite has none"
            )
        if self.target.url.get_driver_name() != "psycopg2":
            # The tenant rides in the statement's own round trip as a second statement
            # of a simple query, which psycopg 3's extended protocol cannot carry.
            raise ConfigurationError(
                "tenant_id needs the psycopg2 driver (postgresql:// or postgresql+psycopg2://)"
            )
        tenant = validate_identifier(tenant_id, name="tenant_id")
        if not self._state.tenancy_checked:
            self._state.tenancy_checked = True
            warn_if_tenancy_not_enforced(connection, self.target.safe_url)
        connection.execution_options(**{TENANT_OPTION: tenant})

    def _response_deadline(self, driver_connection: Any, bounded: bool) -> Any:
        """Arm the response watchdog for a session call on PostgreSQL (else nothing)."""
        seconds = self._state.target.pool.response_timeout
        if not bounded or seconds <= 0 or self.dialect != "postgresql":
            return nullcontext()
        return watchdog.armed(driver_connection, seconds)

    @contextmanager
    def _connection(
        self,
        *,
        write: bool,
        autocommit: bool,
        tenant_id: str | None = None,
        bounded: bool = False,
    ) -> Iterator[Connection]:
        self.ensure_schema()
        with (
            translate_database_errors(self._state.target.pool.describe()),
            self.engine.connect() as connection,
        ):
            self._act_for(connection, tenant_id)
            if self._state.distributed:
                connection.execution_options(**{DISTRIBUTED_OPTION: True})
            # Armed around the statements *and* the commit; disarmed before the
            # connection goes back to the pool.
            with self._response_deadline(connection.connection.dbapi_connection, bounded):
                if autocommit:
                    with driver_autocommit(connection.connection):
                        yield connection
                    return
                if write:
                    connection.execution_options(**{SQLITE_WRITE_OPTION: True})
                with connection.begin():
                    yield connection

    @contextmanager
    def transaction(self, *, tenant_id: str | None = None) -> Iterator[Repositories]:
        """Repositories inside one read-write transaction, committed on success.

        Any exception rolls everything back. On SQLite the transaction starts with
        ``BEGIN IMMEDIATE``. ``tenant_id`` makes every statement act for that user
        under PostgreSQL row-level security (see :mod:`agents_sessions.ops.tenancy`).
        """
        with self._connection(write=True, autocommit=False, tenant_id=tenant_id) as connection:
            yield Repositories(connection)

    @contextmanager
    def _bounded_transaction(self, tenant_id: str | None) -> Iterator[Repositories]:
        """:meth:`transaction` for a session call: its wait for the server is bounded."""
        with self._connection(
            write=True, autocommit=False, tenant_id=tenant_id, bounded=True
        ) as connection:
            yield Repositories(connection)

    @contextmanager
    def read(
        self, *, tenant_id: str | None = None, lag_tolerant: bool = False
    ) -> Iterator[Repositories]:
        """Repositories for reading; the transaction is rolled back at the end.

        ``lag_tolerant=True`` reads from the replica when one is configured
        (analytics, listings, exports: work that can miss the last moments of
        writes); if the replica cannot be reached, from the primary (logged).
        """
        replica = self._available_replica() if lag_tolerant else None
        if replica is not None:
            with ExitStack() as stack:
                try:
                    repos = stack.enter_context(replica.read(tenant_id=tenant_id))
                except DatabaseError as exc:
                    if not replica_unreachable(exc):
                        raise
                    self._replica_failed(replica, exc)
                else:
                    yield repos
                    return
        self.ensure_schema()
        with (
            translate_database_errors(self._state.target.pool.describe()),
            self.engine.connect() as connection,
        ):
            self._act_for(connection, tenant_id)
            yield Repositories(connection)
            connection.rollback()

    @contextmanager
    def single_statement(
        self, *, write: bool, tenant_id: str | None = None
    ) -> Iterator[Repositories]:
        """Repositories for one operation that PostgreSQL runs as a single statement.

        On PostgreSQL the connection is in autocommit mode: the statement is its own
        transaction (atomic), and the call costs one round trip instead of three. On
        SQLite, where the same operation takes several statements, it is a
        transaction (``BEGIN IMMEDIATE`` when ``write``).
        """
        # Acting for a tenant or on Citus, a write is several statements (see
        # MessageRepository.append_encoded), so it gets a real transaction; a read
        # stays one autocommit round trip (a tenant rides along with it).
        with self._single_statement(write=write, tenant_id=tenant_id) as repos:
            yield repos

    @contextmanager
    def _single_statement(
        self, *, write: bool, tenant_id: str | None = None, bounded: bool = False
    ) -> Iterator[Repositories]:
        several = tenant_id is not None or self._state.distributed
        autocommit = self.dialect == "postgresql" and not (write and several)
        with self._connection(
            write=write, autocommit=autocommit, tenant_id=tenant_id, bounded=bounded
        ) as connection:
            yield Repositories(connection)

    def run_read(
        self,
        work: Callable[[Repositories], _T],
        *,
        tenant_id: str | None = None,
        lag_tolerant: bool = False,
    ) -> _T:
        """Run read-only ``work``, retried on a fresh connection when one dies under it.

        ``lag_tolerant=True`` reads from the replica when one is configured and
        reachable (falling back to this store).
        """
        return self._run(
            work, write=False, repeatable=True, tenant_id=tenant_id, lag_tolerant=lag_tolerant
        )

    def run_write(
        self,
        work: Callable[[Repositories], _T],
        *,
        repeatable: bool,
        tenant_id: str | None = None,
    ) -> _T:
        """Run ``work`` that writes with one statement on PostgreSQL (:meth:`single_statement`).

        ``repeatable``: running ``work`` twice has the effect of running it once (a
        keyed append, a clear), so it is retried when its connection dies under it.
        Work that is not repeatable is retried only when nothing was sent.

        Raises:
            ConnectionLostError: the connection died while non-repeatable ``work``
                ran; whether it took effect is unknown.
        """
        return self._run(work, write=True, repeatable=repeatable, tenant_id=tenant_id)

    def run_transaction(
        self,
        work: Callable[[Repositories], _T],
        *,
        repeatable: bool,
        tenant_id: str | None = None,
    ) -> _T:
        """Run ``work`` in one read-write transaction (:meth:`transaction`), retried as
        :meth:`run_write` says."""
        return self._run(
            work, write=True, repeatable=repeatable, transaction=True, tenant_id=tenant_id
        )

    def run_hot(
        self,
        work: Callable[[HotMessages], _T],
        *,
        write: bool,
        repeatable: bool,
        tenant_id: str | None = None,
        lag_tolerant: bool = False,
    ) -> _T:
        """Run one of the session facade's message calls on the cheapest path that is safe.

        ``work`` gets only :class:`~agents_sessions.db.hot_path.HotMessages` -- the
        calls that are one statement on PostgreSQL -- so on PostgreSQL with
        psycopg2 (no tenant, no statement listeners) it runs on the pooled driver
        connection directly; on SQLite on its driver connection too
        (:mod:`agents_sessions.db.sqlite_hot_path`); elsewhere as :meth:`single_statement`.
        Retries as :meth:`run_write` (``write=True``) or :meth:`run_read` say.
        """
        if tenant_id is None and self.dialect == "sqlite":
            with suppress(NotOnTheHotPath):  # e.g. a branch that inherits: the path below
                return run_on_sqlite(self, work)
        return self._run(
            lambda repos: work(repos.messages),
            write=write,
            repeatable=repeatable,
            tenant_id=tenant_id,
            lag_tolerant=lag_tolerant,
            hot_path=True,
        )

    def _run(
        self,
        work: Callable[[Repositories], _T],
        *,
        write: bool,
        repeatable: bool,
        transaction: bool = False,
        tenant_id: str | None = None,
        lag_tolerant: bool = False,
        retry_attempts: int | None = None,
        hot_path: bool = False,
    ) -> _T:
        """Run ``work`` on a pooled connection, retrying where that is safe (the one engine
        behind :meth:`run_read`, :meth:`run_write`, :meth:`run_transaction` and :meth:`run_hot`).

        Args:
            work: Repository calls to make.
            write: Whether ``work`` writes (on SQLite: ``BEGIN IMMEDIATE``).
            repeatable: Whether running ``work`` twice has the effect of running it
                once (reads, keyed appends, clears). A repeatable operation is
                retried when its connection dies under it; any operation is retried
                when a connection could not be opened at all (nothing was sent).
            transaction: Run ``work`` in one read-write transaction
                (:meth:`transaction`); otherwise as :meth:`single_statement`.
            tenant_id: Act for this user under row-level security.
            lag_tolerant: For reads: use the replica when one is configured and
                reachable (falling back to this store).
            retry_attempts: Overrides ``settings.retry_attempts``.
            hot_path: ``work`` only makes :class:`HotMessages` calls (see
                :meth:`run_hot`), so it may run on the pooled driver connection.

        Retries (``settings.retry_attempts``, exponential backoff from 50 ms) get a
        fresh connection: the pool discards the broken one.

        Raises:
            ConnectionLostError: the connection died while a non-repeatable
                ``work`` ran; whether it took effect is unknown.
        """
        if lag_tolerant and not (write or transaction):
            replica = self._available_replica()
            if replica is not None:
                try:
                    # No retries there: when the replica is down the primary answers.
                    return replica._run(
                        work,
                        write=False,
                        repeatable=repeatable,
                        tenant_id=tenant_id,
                        retry_attempts=0,
                        hot_path=hot_path,
                    )
                except DatabaseError as exc:
                    if not replica_unreachable(exc):
                        raise
                    self._replica_failed(replica, exc)
        plan: RetryPlan | None = None  # made on the first failure
        while True:
            sent = False
            try:
                # Every attempt's wait for the server is bounded (response_timeout):
                # a frozen connection fails as lost instead of hanging the call.
                self.ensure_schema()  # first: it learns whether Citus is there
                if transaction:
                    with self._bounded_transaction(tenant_id) as repos:
                        sent = True
                        return work(repos)
                hot = hot_path and tenant_id is None and self._driver_level_ok
                if hot and not (write and self._state.distributed):
                    with self._hot_statement() as repos:
                        sent = True
                        return work(repos)
                with self._single_statement(
                    write=write, tenant_id=tenant_id, bounded=True
                ) as repos:
                    sent = True
                    return work(repos)
            except DatabaseError as exc:
                plan = plan or RetryPlan(
                    self.settings.retry_attempts if retry_attempts is None else retry_attempts,
                    write=write or transaction,
                    repeatable=repeatable,
                    where=self.target.safe_url,
                )
                time.sleep(plan.after_failure(exc, sent=sent))

    @property
    def async_pools(self) -> AsyncPools | None:
        """The event loops' asynchronous connections, where the hot statements may use them.

        PostgreSQL with psycopg2, no echo, no statement listeners (as :meth:`run_hot`'s
        driver-level path), once the schema check has run and found no Citus (whose
        appends are transactions); ``None`` elsewhere.
        """
        state, pools = self._state, self._state.async_pools
        usable = state.schema_ready and not state.distributed and self._driver_level_ok
        return pools if pools is not None and usable else None

    @property
    def loop_readers(self) -> LoopReaders:
        """The event loops' connections for short reads of a SQLite file (unused on PostgreSQL)."""
        return self._state.loop_readers

    @property
    def schema_ready(self) -> bool:
        """Whether :meth:`ensure_schema` has succeeded (or has nothing to check)."""
        return self.is_replica or self._state.schema_ready

    @property
    def _driver_level_ok(self) -> bool:
        # The driver-level path skips Connection's logging and cursor events: not with
        # echo, and not once anything else listens to the engine's statements
        # (tracing, e.g. OpenTelemetry's SQLAlchemy instrumentation; our own tenant
        # hook is the one before_cursor_execute listener).
        state = self._state
        dispatch = state.engine.dispatch
        return (
            state.target.dialect == "postgresql"
            and state.target.url.get_driver_name() == "psycopg2"
            and not self.settings.echo
            and len(dispatch.before_cursor_execute) <= 1
            and not dispatch.after_cursor_execute
        )

    @contextmanager
    def _hot_statement(self) -> Iterator[Repositories]:
        """Repositories on a pooled driver connection in autocommit mode (one statement).

        Same pool, same liveness check and the same error translation as
        :meth:`single_statement`, without SQLAlchemy's ``Connection`` around it.
        """
        self.ensure_schema()
        with (
            translate_database_errors(self._state.target.pool.describe()),
            driver_connection(self.engine) as connection,
            self._response_deadline(connection.driver, bounded=True),
        ):
            yield Repositories(cast(Connection, connection))

    def dispose(self) -> None:
        """Close the pooled connections of this store's engine (e.g. at shutdown).

        The asynchronous connections too: idle ones now, those in use when handed
        back. The store stays usable: it opens new connections when next needed.
        """
        self.engine.dispose()
        self._state.loop_readers.close()
        if self._state.async_pools is not None:
            self._state.async_pools.close_idle()

    def __repr__(self) -> str:
        return f"SessionStore({self._state.target.safe_url!r})"


def get_store(
    database_url: str | None = None,
    *,
    settings: Settings | None = None,
    replica_url: str | None = None,
) -> SessionStore:
    """The shared :class:`SessionStore` for ``database_url``.

    ``database_url`` defaults to the settings (``DATABASE_URL`` /
    ``AGENTS_SESSIONS_DATABASE_URL`` / ``.env``), then to the embedded SQLite file.
    ``replica_url`` (default: the settings' ``replica_url``) names a read replica of
    that database for lag-tolerant reads. Creating a store does not connect; the
    first operation does, and checks the schema.

    Raises:
        ConfigurationError: the URL or a pool parameter in it is invalid.
    """
    settings = settings or default_settings()
    url = database_url if database_url is not None else settings.resolved_database_url()
    if database_url is None and settings.uses_embedded_default:
        log_embedded_default_once(settings.sqlite_path)
    replica = replica_url if replica_url is not None else settings.resolved_replica_url()
    return SessionStore(url, settings, replica_url=replica)


def _reset_after_fork() -> None:
    """In a forked child (gunicorn --preload, multiprocessing): fresh pools and threads.

    Pooled connections inherited from the parent share its sockets; using them from
    two processes corrupts both sessions, so the child drops them without closing
    (closing would end the parent's connections too) and opens its own on demand.
    Worker threads do not survive a fork, so the executors are replaced as well.
    """
    global _states_lock
    # A lock held by a parent thread at fork time would stay held in the child.
    _states_lock = threading.Lock()
    watchdog.reset_after_fork()
    for state in _states.values():
        state.engine.dispose(close=False)
        state.loop_readers.drop_after_fork()
        if state.async_pools is not None:
            state.async_pools.budget.reset_after_fork()
            state.async_pools.drop_after_fork()
        state.executor = _new_executor(state.target)
        state.schema_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def dispose_all() -> None:
    """Dispose every engine and stop every worker thread created by this package.

    For graceful shutdown (and tests); stores obtained later start afresh.
    """
    with _states_lock:
        states = list(_states.values())
        _states.clear()
        _states_by_given_url.clear()
    for state in states:
        state.disposed = True
        state.executor.shutdown(wait=True)
        state.engine.dispose()
        state.loop_readers.close()
        if state.async_pools is not None:
            state.async_pools.dispose()
