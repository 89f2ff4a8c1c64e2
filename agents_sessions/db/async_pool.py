"""psycopg2 asynchronous connections driven by the event loop: the hot statements' pool.

A session facade call that is one statement (``get_items``, an ``add_items``
without usage; see :class:`~agents_sessions.db.hot_path.HotStatement`) runs here,
on the caller's event loop, with no worker thread: ``psycopg2.connect(...,
async_=1)`` never blocks; ``poll()`` says whether the socket must become readable or
writable next, and the loop's ``add_reader``/``add_writer`` resume the call then.
An asynchronous connection is always in autocommit mode: each statement is its own
transaction, which is what these calls are anyway. Transactions stay on the
synchronous engine.

What the synchronous ``QueuePool`` guarantees, kept here:

* Size: idle connections kept per loop up to ``pool_size``; connections opened
  only with a slot of the URL's :class:`~agents_sessions.db.budget.ConnectionBudget`
  (``pool_size + max_overflow`` for both pools together, all but one slot at most
  for these); first come, first served; a caller that gets none
  within ``pool_timeout`` fails with SQLAlchemy's ``TimeoutError`` (the store's
  ``PoolTimeoutError``).
* Liveness on checkout, as the engine's: a connection the server closed (its
  socket readable while idle), older than ``pool_recycle``, or failing the
  ``pool_pre_ping`` round trip is replaced before any statement is sent on it.
* The engine's connect hooks: the same driver parameters (timeouts in
  ``options``, keepalives, ``application_name``, secrets) and its READ COMMITTED
  check. ``connect_timeout`` is enforced here (libpq does not in asynchronous mode).
* ``response_timeout``: a call that waits longer for the server closes its
  connection and fails as a lost connection, as the synchronous watchdog makes it.
* Errors: driver errors come out as SQLAlchemy's ``DBAPIError`` classes, with
  ``connection_invalidated`` set when the connection died, and such a connection
  -- or one whose call was cancelled or timed out mid-statement, its protocol state
  unknown -- is closed, never reused.
* One pool per event loop: a connection registered with one loop is never used
  from another (``asyncio.run`` twice, a loop per thread); pools of loops that
  have closed are closed when noticed.
* Fork safety: a child process never uses (nor closes) its parent's connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import psycopg2
from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc

from .async_connection import AsyncConnection, Expired, keep_unclosed, wake
from .budget import ConnectionBudget, attach_budget, shed_idle
from .engine import DatabaseTarget, PoolOptions, postgresql_connect_recipe, socket_has_news
from .hot_path import HotStatement
from .prepared import PreparingSwitch, executes_text, prepared_form
from .statements import together_sql

logger = logging.getLogger("agents_sessions")


class LoopPool:
    """The asynchronous connections of one event loop for one database URL.

    Used only from its loop's thread, except :meth:`close_idle` and
    :meth:`close_one_idle`, which any thread may call.
    """

    def __init__(self, owner: AsyncPools, loop: asyncio.AbstractEventLoop) -> None:
        self._owner = owner
        self.loop = loop
        self._thread = threading.get_ident()
        self._idle: deque[AsyncConnection] = deque()
        self._waiters: deque[asyncio.Future[AsyncConnection | None]] = deque()
        owner.budget.on_freed(self._slot_freed)
        owner.budget.on_thread_waiting(self.close_one_idle)

    # ------------------------------------------------------------ checkout / checkin

    async def acquire(self) -> AsyncConnection:
        """A live connection of this loop: idle, new, or freed within ``pool_timeout``."""
        connection = await self._idle_or_new()
        if connection is not None:
            return connection
        owner = self._owner
        options = owner.options
        deadline = self.loop.time() + options.pool_timeout
        # Counted as waiting first: the engine's pool gives way only to a waiter.
        owner.budget.coroutine_waits(+1)
        try:
            # Nothing idle here and no slot: ask whoever keeps idle connections.
            owner.shed_elsewhere(self)
            while True:
                connection = await self._idle_or_new()
                if connection is not None:
                    return connection
                now = self.loop.time()
                if now >= deadline:
                    raise sa_exc.TimeoutError(
                        f"no connection became free within pool_timeout="
                        f"{options.pool_timeout:g}s ({options.describe()})"
                    )
                # First come, first served: release() hands a connection to the
                # oldest waiter directly (or wakes it with None to retry for a slot).
                waiting: asyncio.Future[AsyncConnection | None] = self.loop.create_future()
                self._waiters.append(waiting)
                # Woken with None at the deadline (checked at the top).
                timer = self.loop.call_later(deadline - now, wake, waiting)
                try:
                    handed = await waiting
                except BaseException:
                    self._abandon(waiting)
                    raise
                finally:
                    timer.cancel()
                if handed is not None:
                    return handed
        finally:
            owner.budget.coroutine_waits(-1)

    def _abandon(self, waiting: asyncio.Future[AsyncConnection | None]) -> None:
        if waiting in self._waiters:
            self._waiters.remove(waiting)
        if waiting.done() and not waiting.cancelled():
            handed = waiting.result()
            if handed is not None:  # handed over just as this waiter gave up
                self.release(handed, reusable=True)
        waiting.cancel()

    async def _idle_or_new(self) -> AsyncConnection | None:
        while self._idle:
            # Newest first: the least likely to have been closed by an idle timeout.
            try:
                connection = self._idle.pop()
            except IndexError:  # a thread needing a slot closed the last one meanwhile
                break
            if await self._alive(connection):
                return connection
            connection.close()
        if self._owner.budget.try_take():
            return await self._owner.connect(self.loop)
        return None

    async def _alive(self, connection: AsyncConnection) -> bool:
        options = self._owner.options
        # (reusable is False for a connection of a parent process.)
        if not connection.reusable or socket_has_news(connection.driver):
            return False
        if options.pool_recycle >= 0 and time.monotonic() - connection.born > options.pool_recycle:
            return False
        if options.pool_pre_ping:
            try:
                await connection.fetch(self.loop, "SELECT 1", None, self._owner.connect_timeout)
            except (psycopg2.Error, Expired):
                return False
        return True

    def release(self, connection: AsyncConnection, *, reusable: bool) -> None:
        """Take ``connection`` back: kept idle, or closed when it cannot or need not stay.

        ``reusable``: the caller's call on it finished cleanly (see
        :attr:`AsyncConnection.reusable`).
        """
        owner = self._owner
        if (
            reusable
            and not owner.disposed
            and connection.generation == owner.generation
            # Threads wait for more slots than are free: an idle connection here would
            # keep one of them waiting.
            and not owner.budget.threads_short_of_slots
        ):
            if self._wake_one(connection):
                return
            # Kept idle unless a coroutine of another loop waits for a slot.
            if len(self._idle) < owner.options.pool_size and not owner.budget.coroutines_waiting:
                self._idle.append(connection)
                return
        connection.close()  # frees a slot: _slot_freed wakes a waiter

    def _wake_one(self, connection: AsyncConnection | None = None) -> bool:
        """Hand ``connection`` (or ``None``: retry for a slot) to the oldest waiter."""
        while self._waiters:
            waiting = self._waiters.popleft()
            if not waiting.done():
                waiting.set_result(connection)
                return True
        return False

    def _slot_freed(self) -> None:
        if not self._waiters or self.loop.is_closed():
            return
        if threading.get_ident() == self._thread:
            self._wake_one()
        else:
            self.loop.call_soon_threadsafe(self._wake_one)

    # ------------------------------------------------------------ giving connections up

    def close_idle(self) -> None:
        """Close every idle connection; any thread may call it (another pool needs a slot).

        Directly, not through the loop: the loop may be busy -- even blocked waiting
        for the very thread that needs the slot. An idle connection has no reader
        registered and nobody using it, and ``deque.pop`` hands each to one taker.
        """
        while self._idle:
            try:
                connection = self._idle.pop()
            except IndexError:  # taken meanwhile by the loop's own thread
                return
            connection.close()

    def close_one_idle(self) -> bool:
        """Close one idle connection, if there is one (a thread needs its slot).

        Any thread may call it, as :meth:`close_idle`.
        """
        try:
            connection = self._idle.popleft()  # the oldest: the least likely to be used next
        except IndexError:
            return False
        connection.close()
        return True

    def forget(self) -> None:
        """Stop listening to the budget (the pool is dropped)."""
        self._owner.budget.forget(self._slot_freed)
        self._owner.budget.forget(self.close_one_idle)

    def inherited(self) -> list[AsyncConnection]:
        """The idle connections, taken out (after a fork, to keep them unclosed)."""
        taken = list(self._idle)
        self._idle.clear()
        return taken


class AsyncPools:
    """Every event loop's :class:`LoopPool` for one database URL, and how they connect.

    Args:
        engine: The URL's engine: its dialect (errors, SQL), its connect recipe.
        budget: The URL's connection budget, shared with the engine's pool.
        options: Pool options from the URL.
        shed_synchronous: Closes the engine pool's idle connections (called when a
            coroutine waits for a slot).
    """

    def __init__(
        self,
        engine: Engine,
        budget: ConnectionBudget,
        options: PoolOptions,
        shed_synchronous: Callable[[], object],
    ) -> None:
        self.dialect = engine.dialect
        self._recipe = postgresql_connect_recipe(engine)
        #: libpq's connect_timeout, enforced by this pool (0: none).
        self.connect_timeout = 0.0
        with contextlib.suppress(TypeError, ValueError):  # libpq itself refuses a bad one
            self.connect_timeout = max(float(self._recipe.parameters["connect_timeout"]), 0.0)
        self.budget = budget
        self.options = options
        #: The pool options in one line, for error messages.
        self.description = options.describe()
        self._shed_synchronous = shed_synchronous
        self._pools: dict[asyncio.AbstractEventLoop, LoopPool] = {}
        self._last: tuple[asyncio.AbstractEventLoop | None, LoopPool | None] = (None, None)
        self._lock = threading.Lock()
        self.disposed = False
        self.generation = 0
        #: Whether hot statements are prepared on the connections (off behind a proxy).
        self.preparing = PreparingSwitch()

    @classmethod
    def for_engine(cls, engine: Engine, target: DatabaseTarget) -> AsyncPools | None:
        """The pools for ``engine`` (PostgreSQL with psycopg2; ``None`` for other drivers).

        Puts the engine's own pool under the same :class:`ConnectionBudget`.
        """
        if target.dialect != "postgresql" or target.url.get_driver_name() != "psycopg2":
            return None
        if target.pool.max_connections < 2:
            return None  # the one connection stays the engine's (see db/budget.py)
        budget = ConnectionBudget(target.pool.max_connections)
        attach_budget(engine, budget, target.pool.pool_timeout)
        return cls(engine, budget, target.pool, lambda: shed_idle(engine, budget))

    def pool(self, loop: asyncio.AbstractEventLoop) -> LoopPool:
        """The pool of ``loop`` (the running loop), created on first use."""
        last_loop, last_pool = self._last
        if last_loop is loop and last_pool is not None:
            return last_pool
        with self._lock:
            pool = self._pools.get(loop)
            if pool is None:
                self._close_pools_of_closed_loops()
                pool = self._pools[loop] = LoopPool(self, loop)
        self._last = (loop, pool)
        return pool

    def _close_pools_of_closed_loops(self) -> None:
        for loop in [loop for loop in self._pools if loop.is_closed()]:
            pool = self._pools.pop(loop)
            pool.forget()
            pool.close_idle()

    def shed_elsewhere(self, waiting: LoopPool) -> None:
        """A coroutine of ``waiting`` needs a slot: other loops and the engine give idle ones up."""
        with self._lock:
            self._close_pools_of_closed_loops()
            others = [pool for pool in self._pools.values() if pool is not waiting]
        for pool in others:
            pool.close_idle()
        self._shed_synchronous()

    async def connect(self, loop: asyncio.AbstractEventLoop) -> AsyncConnection:
        """Open a connection with the slot the caller has taken (given back on failure)."""
        # Started in a thread: libpq resolves a host name synchronously when a connect
        # starts, which must not stall the loop (a slow resolver, a DNS timeout).
        starting = loop.run_in_executor(
            None, functools.partial(psycopg2.connect, **self._recipe.parameters, async_=1)
        )
        try:
            driver = await asyncio.shield(starting)
        except asyncio.CancelledError:
            # The thread still connects: close what it opens, then free the slot.
            starting.add_done_callback(self._discard_started)
            raise
        except BaseException:
            self.budget.release()
            raise
        connection = AsyncConnection(driver, self.budget.released_with(driver), self.generation)
        try:
            try:
                await connection.wait(loop, self.connect_timeout)
            except Expired:
                raise psycopg2.OperationalError("timeout expired") from None
            check = self._recipe.read_committed
            if not check.confirmed:
                rows, _ = await connection.fetch(loop, check.SHOW, None, self.connect_timeout)
                statement = check.statement_after(rows[0][0])
                if statement is not None:
                    await connection.fetch(loop, statement, None, self.connect_timeout)
        except BaseException:
            connection.close()
            raise
        return connection

    def _discard_started(self, starting: asyncio.Future[Any]) -> None:
        if not starting.cancelled() and starting.exception() is None:
            starting.result().close()
        self.budget.release()

    async def checkout(self) -> tuple[LoopPool, AsyncConnection]:
        """A live connection of the running loop's pool, and that pool (to hand it back to).

        Raises SQLAlchemy's exception classes, as ``engine.connect()`` would: its
        ``TimeoutError`` when no connection became free in time, a ``DBAPIError``
        kind when connecting failed (nothing was sent).
        """
        pool = self.pool(asyncio.get_running_loop())
        try:
            return pool, await pool.acquire()
        except psycopg2.Error as exc:
            raise sa_exc.DBAPIError.instance(
                None, None, exc, psycopg2.Error, dialect=self.dialect
            ) from exc

    async def execute(self, pool: LoopPool, connection: AsyncConnection, hot: HotStatement) -> Any:
        """Run ``hot`` on a checked-out connection, then hand it back; its outcome.

        Raises SQLAlchemy's exception classes, as a statement on a ``Connection``
        would, with ``connection_invalidated`` set when the connection died.
        """
        dialect = self.dialect
        reusable = False
        answer: Any = None
        sql, parameters = "", hot.parameters
        try:
            # A lean statement's empty answer hands over to its fallback (see
            # HotStatement.fallback), on the same connection.
            for statement in hot.statements():
                sql, defaults = together_sql(statement, dialect)
                parameters = {**defaults, **hot.parameters}
                reusable = False
                rows, rowcount = await self._send(pool, connection, statement, sql, parameters)
                reusable = True
                answer = hot.outcome(rows, rowcount)
                if answer:
                    break
        except Expired:
            logger.warning(
                "agents_sessions: no answer from the database within response_timeout; "
                "closing the connection (the call fails as a lost connection)"
            )
            lost = psycopg2.OperationalError(
                "no answer from the database within response_timeout; connection closed"
            )
            raise sa_exc.DBAPIError.instance(
                sql, parameters, lost, psycopg2.Error, connection_invalidated=True, dialect=dialect
            ) from None
        except psycopg2.Error as exc:
            invalidated = not connection.reusable or dialect.is_disconnect(
                exc, connection.driver, None
            )
            # A statement's own error leaves an autocommit connection ready for the next.
            reusable = not invalidated
            error = sa_exc.DBAPIError.instance(
                sql,
                parameters,
                exc,
                psycopg2.Error,
                connection_invalidated=invalidated,
                dialect=dialect,
            )
            if isinstance(error, sa_exc.IntegrityError) and hot.already_done(error):
                return 0  # an earlier attempt of this very append committed: stored once
            raise error from exc
        finally:
            # Anything else (a cancellation mid-statement) leaves the protocol state
            # unknown: the connection is closed, never reused.
            pool.release(connection, reusable=reusable)
        return answer

    async def _send(
        self,
        pool: LoopPool,
        connection: AsyncConnection,
        statement: Any,
        sql: str,
        parameters: dict[str, Any],
    ) -> tuple[list[tuple[Any, ...]], int]:
        """Run one statement (or a tuple sent together): prepared on the connection (see
        db/prepared.py), else as the text ``sql``."""
        timeout = self.options.response_timeout
        if self.preparing.on:
            parts = statement if isinstance(statement, tuple) else (statement,)
            forms = [prepared_form(part, self.dialect) for part in parts]
            try:
                for form in forms:
                    if form.name not in connection.prepared:
                        await connection.fetch(pool.loop, form.prepare, {}, timeout)
                        connection.prepared.add(form.name)
                return await connection.fetch(pool.loop, executes_text(forms), parameters, timeout)
            except psycopg2.Error as exc:
                if not self.preparing.pooler_answered(exc):
                    raise
                # A proxy sent it to another server connection; nothing ran there.
        return await connection.fetch(pool.loop, sql, parameters, timeout)

    def close_idle(self) -> None:
        """Close every idle connection; those in use are closed when handed back.

        The pools stay usable, opening new connections when needed (as
        ``Engine.dispose()`` leaves its engine).
        """
        self.generation += 1
        with self._lock:
            pools = list(self._pools.values())
        for pool in pools:
            pool.close_idle()

    def dispose(self) -> None:
        """Close every idle connection; connections in use are closed when handed back."""
        self.disposed = True
        self.generation += 1
        with self._lock:
            pools = list(self._pools.values())
            self._pools.clear()
            self._last = (None, None)
        for pool in pools:
            pool.forget()
            pool.close_idle()

    def drop_after_fork(self) -> None:
        """In a forked child: forget the parent's connections without closing them."""
        self._lock = threading.Lock()  # a parent thread may have held it at fork time
        for pool in self._pools.values():
            for connection in pool.inherited():
                keep_unclosed(connection.driver)
        self._pools.clear()
        self._last = (None, None)
