"""One ceiling on the connections a process opens to one database URL, shared by both pools.

On PostgreSQL with psycopg2 a store has two pools: SQLAlchemy's ``QueuePool`` of
ordinary connections (transactions, the repository API, migrations) and the
event loop's pool of asynchronous ones (:mod:`agents_sessions.db.async_pool`, the
session facade's single statements). The URL's ``pool_size + max_overflow`` is the
most connections the two together ever hold open: every connection either pool
opens takes a slot of one :class:`ConnectionBudget` first, and gives it back when
it is closed.

The asynchronous pools never take the last slot: they hold at most
``pool_size + max_overflow - 1`` (and a ceiling of one leaves the session facade on
the worker threads), so a blocking call made on an event loop's thread always finds
a connection of the ``QueuePool`` sooner or later, even while that loop -- blocked --
cannot finish the statements its own connections are in.

Who waits for whom: no pool keeps an idle connection while someone else waits for a
slot -- except one connection of the ``QueuePool``, so that transactions mostly find
one without a hand-over.

* A thread that needs a new ordinary connection and finds no slot has the idle
  connections closed -- the event loops' and the ``QueuePool``'s own (it took a
  record without a connection from the pool's queue) -- then waits (at most
  ``pool_timeout``, then :class:`~agents_sessions.errors.PoolTimeoutError`); an
  asynchronous connection handed back while it waits is closed instead of kept.
* A coroutine that needs a new asynchronous connection and finds no slot asks the
  ``QueuePool`` to give up its idle connections when it holds more than that one
  (:func:`shed_idle`),
  then waits the same way; an ordinary connection checked in while it (or a thread)
  waits is closed (:func:`attach_budget`).

Slots are released when a connection is closed -- by either pool, for any reason
(invalidated, recycled, disposed) -- or, as a last resort, when a connection object
that was never closed is garbage-collected: the count can only over-estimate what
the client holds open, never under-estimate it. (The server may list a closed
connection's backend for the moment it takes to exit, as with any pool that closes
one connection and opens another: a hand-over between the pools is such a moment.)
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy import exc as sa_exc

#: The key under which a ``QueuePool`` record keeps its slot's release.
_RELEASE = "agents_sessions_budget_release"


class ConnectionBudget:
    """At most ``limit`` connections open at once, across every pool that takes slots here.

    Thread-safe; the asynchronous pools call :meth:`try_take` (never blocking the
    loop), threads call :meth:`take` (blocking up to a timeout).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open = 0
        self._condition = threading.Condition(threading.Lock())
        #: Threads waiting in :meth:`take`.
        self.threads_waiting = 0
        #: Coroutines waiting for a slot (counted by the asynchronous pools).
        self.coroutines_waiting = 0
        #: Slots held by the engine's pool (taken with :meth:`take`).
        self.engine_open = 0
        # Called (outside the lock) when a thread starts waiting: close idle
        # asynchronous connections. And whenever a slot is freed: wake coroutines.
        self._shed_for_threads: list[Callable[[], None]] = []
        self._freed_listeners: list[Callable[[], None]] = []
        self._pid = os.getpid()

    @property
    def open(self) -> int:
        """How many slots are taken (connections open, or being opened)."""
        return self._open

    def on_thread_waiting(self, shed: Callable[[], None]) -> None:
        """Call ``shed`` (from any thread) whenever a thread waits for a slot."""
        self._shed_for_threads.append(shed)

    def on_freed(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (from any thread) whenever a slot is released."""
        self._freed_listeners.append(listener)

    def forget(self, callback: Callable[[], None]) -> None:
        """Stop calling ``callback`` (registered with either method above)."""
        for callbacks in (self._shed_for_threads, self._freed_listeners):
            while callback in callbacks:
                callbacks.remove(callback)

    def try_take(self) -> bool:
        """Take a slot for an asynchronous connection if one is free, without waiting.

        Never the last slot the engine's pool could use: the asynchronous pools hold
        at most ``limit - 1``. A blocking call made on an event loop's own thread
        (the repository API, a transaction) can then always get a connection, even
        while that loop's connections sit in statements the blocked loop cannot finish.
        """
        with self._condition:
            if self._open >= self.limit or self._open - self.engine_open >= self.limit - 1:
                return False
            self._open += 1
            return True

    def take(self, timeout: float) -> None:
        """Take a slot for the engine's pool, waiting up to ``timeout`` seconds for one.

        Raises:
            sqlalchemy.exc.TimeoutError: none became free in time (the pool's own
                timeout class, so the store reports it as ``PoolTimeoutError``).
        """
        with self._condition:
            if self._open < self.limit:
                self._open += 1
                self.engine_open += 1
                return
        deadline = time.monotonic() + timeout
        with self._condition:
            self.threads_waiting += 1
        try:
            for shed in list(self._shed_for_threads):
                shed()
            with self._condition:
                while self._open >= self.limit:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise sa_exc.TimeoutError(
                            f"no connection slot became free within {timeout:g}s: all "
                            f"{self.limit} connections of this database URL are in use"
                        )
                    self._condition.wait(remaining)
                self._open += 1
                self.engine_open += 1
        finally:
            with self._condition:
                self.threads_waiting -= 1

    def coroutine_waits(self, delta: int) -> None:
        """Count a coroutine starting (+1) or ending (-1) a wait for a slot."""
        with self._condition:
            self.coroutines_waiting += delta

    def release(self, *, engine: bool = False) -> None:
        """Give a slot back (its connection is closed, or was never opened)."""
        with self._condition:
            self._open -= 1
            if engine:
                self.engine_open -= 1
            self._condition.notify()
        for listener in list(self._freed_listeners):
            listener()

    def _release_in(self, pid: int, engine: bool) -> None:
        if pid == self._pid:  # a slot of the parent process is not this process's
            self.release(engine=engine)

    def released_with(self, connection: Any, *, engine: bool = False) -> Callable[[], Any]:
        """A release to call once ``connection`` is closed; also called if it is collected.

        The returned callable releases at most once, however often it is called.
        """
        return weakref.finalize(connection, self._release_in, self._pid, engine)

    @property
    def engine_reserve(self) -> int:
        """Connections the engine's pool keeps even while coroutines wait for a slot.

        One, when the ceiling allows two or more: a transaction (a pop, an append
        with usage) then rarely needs a slot handed over from the event loop --
        which costs a connect on each side.
        """
        return 1 if self.limit >= 2 else 0

    @property
    def engine_gives_way(self) -> bool:
        """Whether the engine's pool should close an idle connection now."""
        return bool(self.coroutines_waiting) and self.engine_open > self.engine_reserve

    def reset_after_fork(self) -> None:
        """In a forked child: no slot taken, nobody waiting (the parent's are not ours)."""
        self.__init__(self.limit)  # type: ignore[misc]


def attach_budget(engine: Engine, budget: ConnectionBudget, pool_timeout: float) -> None:
    """Make every connection ``engine``'s pool opens take a slot of ``budget``.

    The slot is taken before connecting (waiting up to ``pool_timeout``) and released
    when SQLAlchemy closes the connection (``close``/``close_detached`` events). A
    connection checked in while coroutines wait for a slot is closed there and then;
    its record stays in the pool and reconnects (taking a slot) when next needed.
    """

    @event.listens_for(engine, "do_connect")
    def _connect_within_budget(dialect: Any, record: Any, cargs: Any, cparams: Any) -> Any:
        budget.take(pool_timeout)
        try:
            connection = dialect.loaded_dbapi.connect(*cargs, **cparams)
        except BaseException:
            budget.release(engine=True)  # never opened
            raise
        record.info[_RELEASE] = budget.released_with(connection, engine=True)
        return connection

    @event.listens_for(engine, "close")
    def _release_slot(_dbapi_connection: Any, record: Any) -> None:
        release = record.info.pop(_RELEASE, None)
        if release is not None:
            release()

    @event.listens_for(engine, "close_detached")
    def _release_detached(dbapi_connection: Any) -> None:
        release = _detached.pop(id(dbapi_connection), None)
        if release is not None:
            release()

    _detached: dict[int, Callable[[], Any]] = {}

    @event.listens_for(engine, "detach")
    def _keep_detached_slot(dbapi_connection: Any, record: Any) -> None:
        release = record.info.pop(_RELEASE, None)
        if release is not None:
            _detached[id(dbapi_connection)] = release

    def _close_idle_for_a_thread() -> None:
        # A thread waiting in take() no longer looks in the pool's queue: idle
        # connections there would only keep it from a slot. (Pool.dispose() closes
        # the idle ones, checked-out ones stay.)
        pool: Any = engine.pool
        if pool.checkedin():
            pool.dispose()

    budget.on_thread_waiting(_close_idle_for_a_thread)

    @event.listens_for(engine, "checkin")
    def _give_way(dbapi_connection: Any, record: Any) -> None:
        # Someone waits for a slot: this idle connection would keep it from one. (A
        # thread waiting in take() does not look in the pool's queue any more.)
        if dbapi_connection is not None and (budget.threads_waiting or budget.engine_gives_way):
            record.invalidate()


def shed_idle(engine: Engine, budget: ConnectionBudget) -> None:
    """Close ``engine``'s idle pooled connections while coroutines wait for a slot.

    ``Pool.dispose()``: it closes the connections idle in the pool (checked-out ones
    stay), without a checkout. The one kept connection goes too: this runs only
    when the engine holds more than that and a coroutine could not get a slot.
    The ``QueuePool``'s own counters then allow it new connections; the budget
    still bounds them.
    """
    pool: Any = engine.pool
    if budget.engine_gives_way and pool.checkedin():
        pool.dispose()
