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
slot -- except the ``QueuePool``'s *reserve*: as many connections as threads had
checked out at once within the last :data:`ENGINE_DEMAND_MEMORY_SECONDS` (at least
one, at most ``limit - 1``), so that threads calling steadily keep the connections
they keep using instead of trading slots with the event loops -- each trade is a
connection closed on one side and opened on the other.

* A thread that needs a new ordinary connection and finds no slot has one idle
  event-loop connection closed, then waits (at most ``pool_timeout``, then
  :class:`~agents_sessions.errors.PoolTimeoutError`). While threads wait for more
  slots than are free, an asynchronous connection handed back is closed instead of
  kept, and the event loops take no new slot: a freed slot goes to a waiting thread
  first. Every :data:`THREAD_SHEDS_AGAIN_SECONDS` without a slot it sheds again,
  then also the ``QueuePool``'s own idle connections (it took a record without a
  connection from the pool's queue, and no longer looks there while it waits).
* A coroutine that needs a new asynchronous connection and finds no slot asks the
  ``QueuePool`` to give up its idle connections when it holds more than its reserve
  (:func:`shed_idle`), then waits the same way; an ordinary connection checked in
  while it waits is closed unless the reserve keeps it (:func:`attach_budget`).
  The reserve leaves the event loops at least one slot, and their connections are
  handed from one coroutine to the next: a waiting coroutine always gets its turn.

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

#: How long the ``QueuePool`` remembers how many connections threads used at once (its
#: reserve, see the module docstring). Long enough to span the gaps between the calls
#: of threads calling steadily; short enough that slots threads stopped using go back
#: to the event loops soon after.
ENGINE_DEMAND_MEMORY_SECONDS = 5.0

#: How long a thread waits for a slot before it sheds again (see :meth:`ConnectionBudget.take`).
THREAD_SHEDS_AGAIN_SECONDS = 0.05


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
        # Called (outside the lock) when a thread starts waiting, until one of them
        # closed an idle connection. And whenever a slot is freed: wake coroutines.
        self._shed_for_threads: list[Callable[[], bool]] = []
        self._shed_for_threads_later: list[Callable[[], bool]] = []
        self._freed_listeners: list[Callable[[], None]] = []
        # The most engine connections checked out at once lately, and when that was
        # last seen (written without the lock: a stale peak only shifts the reserve
        # by one connection for a moment).
        self._engine_peak = 0
        self._engine_peak_at = 0.0
        self._pid = os.getpid()

    @property
    def open(self) -> int:
        """How many slots are taken (connections open, or being opened)."""
        return self._open

    def on_thread_waiting(self, shed: Callable[[], bool], *, after_a_while: bool = False) -> None:
        """Call ``shed`` (from any thread) when a thread waits for a slot.

        ``shed`` closes idle connections and says whether it found any; the callbacks
        are called in turn until one did. ``after_a_while``: only once the thread has
        waited :data:`THREAD_SHEDS_AGAIN_SECONDS` without a slot.
        """
        (self._shed_for_threads_later if after_a_while else self._shed_for_threads).append(shed)

    def on_freed(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (from any thread) whenever a slot is released."""
        self._freed_listeners.append(listener)

    def forget(self, callback: Callable[[], Any]) -> None:
        """Stop calling ``callback`` (registered with either method above)."""
        for callbacks in (
            self._shed_for_threads,
            self._shed_for_threads_later,
            self._freed_listeners,
        ):
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
            if self._open - self.engine_open >= self.limit - 1:
                return False
            # A waiting thread gets a freed slot first: the loop can hand its own
            # connections from coroutine to coroutine, a thread cannot.
            if self.limit - self._open <= self.threads_waiting:
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
            # One idle connection of an event loop closed for this thread, not all:
            # each one closed is reopened by the loop it left. Connections the loops
            # hand back while threads are short of slots are closed (they take no new
            # slot meanwhile), so one is usually freed within a statement's time.
            self._shed_one(self._shed_for_threads)
            while True:
                with self._condition:
                    if self._open < self.limit:
                        self._open += 1
                        self.engine_open += 1
                        return
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise sa_exc.TimeoutError(
                            f"no connection slot became free within {timeout:g}s: all "
                            f"{self.limit} connections of this database URL are in use"
                        )
                    if self._condition.wait(min(remaining, THREAD_SHEDS_AGAIN_SECONDS)):
                        continue
                # Nothing freed for a while (the loops' connections are all busy, or
                # blocked): shed again, this time also the engine's own idle ones -- a
                # thread waiting here no longer looks in its pool's queue, where another
                # thread may have handed a connection back meanwhile.
                self._shed_one(self._shed_for_threads + self._shed_for_threads_later)
        finally:
            with self._condition:
                self.threads_waiting -= 1

    @staticmethod
    def _shed_one(sheds: list[Callable[[], bool]]) -> None:
        for shed in list(sheds):
            if shed():
                return

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
    def threads_short_of_slots(self) -> bool:
        """Whether threads wait for more slots than are free."""
        return self.threads_waiting > self.limit - self._open

    def note_engine_checkout(self, checked_out: int) -> None:
        """Record that the engine's pool has ``checked_out`` connections in use now."""
        now = time.monotonic()
        if (
            checked_out >= self._engine_peak
            or now - self._engine_peak_at > ENGINE_DEMAND_MEMORY_SECONDS
        ):
            self._engine_peak = checked_out
            self._engine_peak_at = now

    @property
    def engine_reserve(self) -> int:
        """Connections the engine's pool keeps even while coroutines wait for a slot.

        As many as threads had checked out at once within the last
        :data:`ENGINE_DEMAND_MEMORY_SECONDS`, at least one and at most ``limit - 1``
        (none with a ceiling of one): threads calling steadily -- a transaction, the
        repository API -- keep their connections rather than take a slot back from
        the event loops for every call, which costs a connect on each side; the
        event loops always keep a slot of their own.
        """
        if self.limit < 2:
            return 0
        recent = time.monotonic() - self._engine_peak_at <= ENGINE_DEMAND_MEMORY_SECONDS
        return max(1, min(self._engine_peak if recent else 0, self.limit - 1))

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

    def _note_demand() -> None:
        checked_out = getattr(engine.pool, "checkedout", None)
        if checked_out is not None:
            budget.note_engine_checkout(checked_out())

    @event.listens_for(engine, "do_connect")
    def _connect_within_budget(dialect: Any, record: Any, cargs: Any, cparams: Any) -> Any:
        # The record being connected counts as checked out already: a thread that has
        # to open a connection is demand the reserve remembers even if, by the time it
        # has one, another thread has handed its own back.
        _note_demand()
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

    def _close_idle_for_a_thread() -> bool:
        # A thread waiting in take() no longer looks in the pool's queue: idle
        # connections there would only keep it from a slot. (Pool.dispose() closes
        # the idle ones, checked-out ones stay; the pool offers no way to close one.)
        pool: Any = engine.pool
        if pool.checkedin():
            pool.dispose()
            return True
        return False

    budget.on_thread_waiting(_close_idle_for_a_thread, after_a_while=True)

    @event.listens_for(engine, "checkout")
    def _note_checkout(_dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        _note_demand()

    @event.listens_for(engine, "checkin")
    def _give_way(dbapi_connection: Any, record: Any) -> None:
        # A coroutine waits for a slot and the engine holds more than its reserve:
        # this idle connection would keep it from one. (A thread waiting for a slot
        # gets one from the loops first, and this one if that takes a while.)
        if dbapi_connection is not None and budget.engine_gives_way:
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
