"""Bounded history reads of the embedded SQLite file on the caller's event loop.

A ``get_items(limit=N)`` on SQLite is one SELECT of a local file in WAL mode, where
a reader never waits for the writer: it costs tens of microseconds, less than
handing it to a worker thread and back (the executor, two wake-ups, the GIL
changing hands). Such a read therefore runs on the loop itself, on a connection
the loop keeps checked out of the engine's pool -- one per event loop, opened by a
worker thread (opening may wait for a pool slot) on the loop's first read.

What keeps the loop from ever waiting on the database:

* The connection's ``busy_timeout`` is 0: whatever would make the read wait for a
  lock (another process recovering the file after a crash, a journal mode
  changing) fails at once instead, and the worker threads read as before (they
  wait up to the configured ``busy_timeout``).
* Only reads of at most :data:`MAX_ITEMS_READ_ON_LOOP` items: a ``get_items()`` of
  every item runs on the loop while the branch is that short (the loop reads one
  more to know), on the threads once it is longer. Every write stays on the threads.
* Documents longer in total than :data:`MAX_BYTES_PARSED_ON_LOOP` are parsed by a
  worker thread (see :func:`agents_sessions.loop_statements.read_sqlite_on_loop`).

A connection of a loop that has closed goes back to the pool when the next loop
opens one, or when the store is disposed; a forked child never uses (nor closes)
its parent's. Each engine's :class:`LoopReaders` lives with the store's other
per-engine state (``SessionStore.loop_readers``), which disposes and forks it.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc

from .sqlite_hot_path import NotOnTheHotPath, SQLiteHotMessages
from .sqlite_writers import write_queue

#: The most items a read may ask for to run on the event loop. What the loop spends on a
#: read is bounded by :data:`MAX_BYTES_PARSED_ON_LOOP` (parsing is most of it); this bounds
#: the rows fetched, and what a ``get_items()`` of a longer branch reads on the loop
#: (raw rows, unparsed) before it hands the read to the threads.
MAX_ITEMS_READ_ON_LOOP = 1000

#: Stored JSON longer than this (in characters, all documents of a read together) is
#: parsed by a worker thread rather than on the loop.
MAX_BYTES_PARSED_ON_LOOP = 256 * 1024

if TYPE_CHECKING:
    import sqlite3  # loaded by the engine's driver when a SQLite file is used

_T = TypeVar("_T")

# Connections inherited from a parent process: kept referenced, never closed (SQLite
# must not see a connection used, or closed, on both sides of a fork).
_inherited: list[Any] = []


class _Reader:
    """The pooled connection one event loop reads on."""

    __slots__ = ("driver_error", "hot", "in_use", "loop", "pooled")

    def __init__(self, loop: asyncio.AbstractEventLoop, pooled: Any, engine: Engine) -> None:
        self.loop = weakref.ref(loop)
        self.pooled = pooled
        self.hot = SQLiteHotMessages(pooled.dbapi_connection, write_queue(engine))
        self.driver_error: type[Exception] = engine.dialect.loaded_dbapi.Error
        # Held while a read runs (on the loop's thread) and while the connection is
        # closed (any thread: dispose), so neither happens in the middle of the other.
        self.in_use = threading.Lock()

    @property
    def orphaned(self) -> bool:
        loop = self.loop()
        return loop is None or loop.is_closed()

    def close(self) -> None:
        with self.in_use:
            # Invalidated, not handed back: its busy_timeout is 0, which no other
            # user of the pool expects. The pool opens a fresh one when needed.
            self.pooled.invalidate()
            self.pooled.close()


class LoopReaders:
    """The SQLite connections event loops read on, for one engine (see the module doc)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._readers: dict[int, _Reader] = {}  # by id() of the loop
        self._opening = 0  # opens under way: they count against ``most`` too
        self._guard = threading.Lock()

    def has_reader(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Whether ``loop`` has its connection (else :meth:`open` it, in a worker thread)."""
        reader = self._readers.get(id(loop))
        return reader is not None and reader.loop() is loop

    def room_for_another(self, most: int) -> bool:
        """Whether fewer than ``most`` live loops hold a connection."""
        return sum(not reader.orphaned for reader in list(self._readers.values())) < most

    def open(self, loop: asyncio.AbstractEventLoop, *, most: int) -> None:
        """Check a connection out of the pool for ``loop``; blocking: call it in a thread.

        At most ``most`` loops hold one at a time (the pool must keep a connection
        for the threads, which every write needs). Also hands back the connections
        of loops that have closed.

        Raises:
            sqlalchemy.exc.TimeoutError: no pool slot freed up within ``pool_timeout``.
            NotOnTheHotPath: ``most`` loops hold one already, or opening one failed.
        """
        engine = self._engine
        if self.has_reader(loop):
            return
        with self._guard:
            orphans = [key for key, reader in self._readers.items() if reader.orphaned]
            closing = [self._readers.pop(key) for key in orphans]
            # Decided and counted under the guard: concurrent opens of several loops
            # cannot together take more than ``most`` connections.
            full = len(self._readers) + self._opening >= most
            if not full:
                self._opening += 1
        for reader in closing:
            reader.close()
        if full:
            raise NotOnTheHotPath
        replaced = None
        try:
            try:
                pooled = engine.pool.connect()
            except sa_exc.TimeoutError:
                raise  # no slot within pool_timeout: the threads would wait as long again
            except Exception as exc:  # e.g. the file cannot be opened: the threads retry
                raise NotOnTheHotPath from exc
            try:
                driver = cast("sqlite3.Connection", pooled.dbapi_connection)
                driver.execute("PRAGMA busy_timeout=0")
                reader = _Reader(loop, pooled, engine)
            except BaseException:
                pooled.invalidate()
                pooled.close()
                raise
            with self._guard:
                replaced = self._readers.get(id(loop))
                self._readers[id(loop)] = reader
        finally:
            with self._guard:
                self._opening -= 1
        if replaced is not None:  # a loop whose id() was reused, or a concurrent open
            replaced.close()

    def read(self, loop: asyncio.AbstractEventLoop, work: Callable[[SQLiteHotMessages], _T]) -> _T:
        """Run ``work`` on ``loop``'s connection (which :meth:`has_reader` said it has).

        Raises :class:`NotOnTheHotPath` where the threads must read instead: ``work``
        says so, the connection was closed meanwhile (a dispose in another thread),
        or the driver failed (say, the file is busy and the read would have waited)
        -- the connection is then closed, its state unknown.
        """
        reader = self._readers.get(id(loop))
        if reader is None or reader.loop() is not loop:
            raise NotOnTheHotPath  # closed meanwhile by another thread (dispose)
        try:
            with reader.in_use:
                return work(reader.hot)
        except reader.driver_error as exc:
            self.discard(loop)
            raise NotOnTheHotPath from exc

    def discard(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close ``loop``'s connection; its next read opens another."""
        with self._guard:
            reader = self._readers.pop(id(loop), None)
        if reader is not None:
            reader.close()

    def close(self) -> None:
        """Close every loop's connection (the store is disposed)."""
        with self._guard:
            closing = list(self._readers.values())
            self._readers.clear()
        for reader in closing:
            reader.close()

    def drop_after_fork(self) -> None:
        """In a forked child: forget the parent's connections without closing them."""
        self._guard = threading.Lock()
        self._opening = 0  # (a parent's thread opening one does not exist here)
        _inherited.extend(reader.pooled for reader in self._readers.values())
        self._readers.clear()
