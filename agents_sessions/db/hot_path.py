"""The session's hot statements on a pooled driver connection, without SQLAlchemy's ``Connection``.

A turn of an agent is ``get_items(limit=N)`` + ``add_items(...)``: two single
statements, prebuilt and compiled once (:mod:`agents_sessions.db.statements`).
Wrapping each in a SQLAlchemy ``Connection`` (object, execution context, cursor
result, reset on close) costs as much client CPU as the statement itself (the
figures are in ``docs/performance.md``). So the facade runs those statements on
the DBAPI connection the pool hands out (``pool.connect()``, the documented
raw-connection API), through :class:`DriverConnection`: just enough of a
``Connection`` for the calls of :class:`HotMessages`.

What SQLAlchemy's ``Connection`` would have done is kept: the pool (size, timeout,
the checkout liveness check, the connect hooks), driver errors wrapped in
SQLAlchemy's exception classes (so ``errors.translate_database_errors`` and the
retry logic see the same thing), and a connection that died invalidated so the
pool replaces it. Used only on PostgreSQL with psycopg2, without SQL echo and
without a tenant (row-level security needs the execution event).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import Connection, Engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Dialect

from ..items import EncodedItem
from .statements import execute, violates_append_key


@dataclass(frozen=True, slots=True)
class HotStatement:
    """One hot call as one prebuilt statement and its parameters, built once per call.

    Either executor runs it: :func:`run_hot_statement` on a (driver or SQLAlchemy)
    connection in a worker thread, or :mod:`agents_sessions.db.async_pool` on an
    asynchronous connection of the event loop. Both read the answer through
    :meth:`outcome`, so they cannot disagree on what a call returns.

    Attributes:
        statement: A prebuilt statement of :mod:`agents_sessions.db.statements`, or
            a tuple of them sent together in one round trip (the answer is the last
            one's; see :func:`~agents_sessions.db.statements.execute_together`).
        parameters: Its parameters, in the driver's form.
        returns_items: A read (the first column of every row) rather than a write
            (how many rows it wrote).
        append_key: The idempotency key of an append: a unique violation on it
            means an earlier attempt of the same call committed -- 0 written.
        fallback: The general statement, when ``statement`` is a lean one for the
            common case: run (with the same parameters, on the same connection)
            when ``statement`` found no row to read or wrote none -- a case it
            does not handle, or a true empty answer the fallback repeats.
    """

    statement: Any
    parameters: dict[str, Any]
    returns_items: bool
    append_key: str | None = None
    fallback: Any = None

    def outcome(self, rows: list[tuple[Any, ...]], rowcount: int) -> Any:
        """What the call returns: its items, or how many rows it wrote."""
        return [row[0] for row in rows] if self.returns_items else int(rowcount)

    def statements(self) -> tuple[Any, ...]:
        """The statements to try in order: the lean one, then its fallback if any."""
        return (self.statement,) if self.fallback is None else (self.statement, self.fallback)

    def already_done(self, error: sa_exc.IntegrityError) -> bool:
        """Whether ``error`` says an earlier attempt of this very append committed."""
        return self.append_key is not None and violates_append_key(error)


def run_hot_statement(
    connection: Connection | DriverConnection, hot: HotStatement, *, answer_key: bool = True
) -> Any:
    """Execute ``hot`` (then its fallback if needed) on a connection (PostgreSQL).

    Returns :meth:`HotStatement.outcome`. ``answer_key=False`` lets the unique
    violation of an earlier attempt's key propagate (a caller inside a transaction
    answers it after rolling back to its savepoint).
    """
    answer: Any = None
    # A lean statement's empty answer (no row read, none written) hands over to its
    # fallback; the fallback's answer is final.
    for statement in hot.statements():
        try:
            result = execute(connection, statement, hot.parameters)  # type: ignore[arg-type]
        except sa_exc.IntegrityError as exc:
            if answer_key and hot.already_done(exc):
                # The statement wrote nothing: the items are stored once.
                return 0
            raise
        answer = list(result.scalars()) if hot.returns_items else int(result.rowcount)
        if answer:
            break
    return answer


class HotMessages(Protocol):
    """What work on the hot path may do: the session facade's one-statement message calls.

    :meth:`agents_sessions.store.SessionStore.run_hot` hands its work an object of
    this type -- a ``MessageRepository`` over a :class:`DriverConnection` where the
    driver-level path applies, over a real ``Connection`` elsewhere. Work that needs
    anything more (conversations, usage, several statements) does not type-check
    here and belongs in ``run_write`` or ``run_transaction``.
    """

    def latest(self, conversation_id: str, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` items, oldest first."""
        ...

    def all(self, conversation_id: str) -> list[dict[str, Any]]:
        """Every item, oldest first."""
        ...

    def append_encoded(
        self,
        conversation_id: str,
        encoded: Sequence[EncodedItem],
        *,
        user_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        ttl_seconds: int | None = None,
    ) -> int:
        """Append encoded items (one statement on PostgreSQL); how many were written."""
        ...


class DriverResult:
    """The rows of one statement, with the few ``CursorResult`` methods the repositories use."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, rows: list[tuple[Any, ...]], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def scalars(self) -> Iterator[Any]:
        """The first column of every row."""
        return (row[0] for row in self._rows)

    def scalar(self) -> Any:
        """The first column of the first row, or ``None``."""
        return self._rows[0][0] if self._rows else None

    def scalar_one_or_none(self) -> Any:
        """The first column of the only row, ``None`` without rows."""
        if len(self._rows) > 1:
            raise sa_exc.MultipleResultsFound(
                "Multiple rows were found when one or none was required"
            )
        return self.scalar()


class DriverConnection:
    """A pooled psycopg2 connection in autocommit mode, shaped like a ``Connection``.

    Only what the hot repository methods call: ``dialect``, ``exec_driver_sql``,
    ``get_execution_options`` and ``in_transaction``. Anything else is an
    ``AttributeError`` -- on purpose: such work belongs on a real ``Connection``.
    """

    def __init__(self, pooled: Any, dialect: Dialect) -> None:
        self._pooled = pooled
        self._driver = pooled.dbapi_connection
        self.dialect = dialect

    @property
    def driver(self) -> Any:
        """The psycopg2 connection underneath (for the response watchdog)."""
        return self._driver

    def get_execution_options(self) -> Mapping[str, Any]:
        """No options: no tenant, no streaming."""
        return {}

    def in_transaction(self) -> bool:
        """Never: every statement commits on its own (driver autocommit)."""
        return False

    def exec_driver_sql(self, sql: str, parameters: Mapping[str, Any]) -> DriverResult:
        """Run one statement; driver errors come out as SQLAlchemy's ``DBAPIError`` kinds."""
        dbapi = self.dialect.loaded_dbapi
        cursor = self._driver.cursor()
        try:
            cursor.execute(sql, parameters)
            rows = cursor.fetchall() if cursor.description is not None else []
            return DriverResult(rows, cursor.rowcount)
        except dbapi.Error as exc:
            lost = self.dialect.is_disconnect(exc, self._driver, cursor)
            if lost:
                # As Connection would: the pool must never hand this one out again.
                self._pooled.invalidate(exc)
            raise sa_exc.DBAPIError.instance(
                sql,
                parameters,
                exc,
                dbapi.Error,
                connection_invalidated=lost,
                dialect=self.dialect,
            ) from exc
        finally:
            cursor.close()


@contextmanager
def driver_connection(engine: Engine) -> Iterator[DriverConnection]:
    """A pooled connection in autocommit mode for one hot statement, returned afterwards.

    Raises SQLAlchemy's exception classes, as ``engine.connect()`` would: the pool's
    ``TimeoutError`` when none is free, a ``DBAPIError`` kind when connecting fails.
    """
    dialect = engine.dialect
    try:
        pooled = engine.pool.connect()
    except dialect.loaded_dbapi.Error as exc:
        raise sa_exc.DBAPIError.instance(
            None, None, exc, dialect.loaded_dbapi.Error, dialect=dialect
        ) from exc
    try:
        with driver_autocommit(pooled):
            yield DriverConnection(pooled, dialect)
    finally:
        pooled.close()


@contextmanager
def driver_autocommit(pooled: Any) -> Iterator[None]:
    """Put a pooled connection's driver in autocommit mode until the block ends.

    Each statement is then its own transaction, with no BEGIN/COMMIT round trips.
    The driver's ``autocommit`` attribute is flipped directly rather than through
    SQLAlchemy's ``isolation_level="AUTOCOMMIT"``: that option makes psycopg2 send
    ``SET default_transaction_isolation`` when the connection goes back to the pool,
    an extra round trip per call. Flipping the attribute outside a transaction
    sends nothing, and it is flipped back before the connection is released, so the
    pool only ever holds connections in their normal transactional mode.

    ``pooled`` is what the pool hands out (``pool.connect()``, or a
    ``Connection``'s ``.connection``).
    """
    driver: Any = pooled.dbapi_connection
    assert driver is not None
    driver.autocommit = True
    try:
        yield
    finally:
        # After a lost connection SQLAlchemy has invalidated the pooled connection
        # (its dbapi_connection is gone) and will discard it; the original error
        # then propagates untouched.
        if pooled.dbapi_connection is driver and not getattr(driver, "closed", False):
            driver.autocommit = False
