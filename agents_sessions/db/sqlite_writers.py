"""The writers of one SQLite file in one process: a queue, and commits shared by a batch.

See :class:`WriteQueue`. The queues are per engine (one engine per file and settings
in a process, :mod:`agents_sessions.store`), and replaced in a forked child: a lock
held by a parent's thread at fork time would stay held there forever.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Any, TypeVar, cast

from sqlalchemy import Engine

if TYPE_CHECKING:
    import sqlite3  # loaded by the engine's driver when a SQLite file is used

_T = TypeVar("_T")


class _Write:
    """One call's write, queued for the process's writer; its outcome once done."""

    __slots__ = ("done", "error", "result", "wake", "work")

    def __init__(self, work: Callable[[sqlite3.Connection], Any]) -> None:
        self.work = work
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None
        # Held until the call is done or its thread is asked to lead the next batch.
        self.wake = threading.Lock()
        self.wake.acquire()


class WriteQueue:
    """The writers of one SQLite file in this process: one transaction at a time, shared.

    SQLite has one writer per file. Threads of this process queue here rather than on
    the file lock: SQLite's busy handler waits by sleeping (1, 2, 5, 10... ms) past
    the moment the lock is free, where this queue hands over at once; only writers of
    other processes meet the busy handler.

    Group commit: one thread at a time leads. It runs every write queued by then in
    one ``BEGIN IMMEDIATE`` transaction and commits once, wakes each of their callers,
    and hands the lead to the first write queued meanwhile. A call's statements run
    together (its items stay contiguous) and all or nothing: should one call's work
    fail, the whole transaction is rolled back and each call runs again in a
    transaction of its own, so only the failing call fails. A failed BEGIN or COMMIT
    fails every call of the batch, none of which is then stored. Every caller
    returns only after the COMMIT that stored its call. The commit -- the WAL pages,
    the full-text index's new segment -- is paid once per batch, not once per call.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the two fields below
        self._queued: list[_Write] = []
        self._leading = False

    @property
    def queued(self) -> int:
        """How many calls wait for the next batch (for monitoring and tests)."""
        return len(self._queued)

    def run(self, driver: sqlite3.Connection, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``work(connection)`` in a write transaction; its result, or its error.

        ``work`` may run on another caller's connection (whoever leads the batch), and
        more than once (again alone, when another call of its batch failed): it must
        use only the connection it is given, and be repeatable until committed.
        """
        write = _Write(work)
        with self._lock:
            self._queued.append(write)
            lead = not self._leading
            self._leading = True
        if not lead:
            write.wake.acquire()  # done by a leader, or handed the lead
        if not write.done:
            self._lead(driver)
        if write.error is not None:
            raise write.error
        return cast(_T, write.result)

    def _lead(self, driver: sqlite3.Connection) -> None:
        with self._lock:
            batch, self._queued = self._queued, []
        try:
            _commit_batch(driver, batch)
        finally:
            for write in batch:
                write.wake.release()
            with self._lock:
                if self._queued:
                    self._queued[0].wake.release()  # the next batch's leader
                else:
                    self._leading = False


def _commit_batch(driver: sqlite3.Connection, batch: list[_Write]) -> None:
    """Run ``batch`` in one transaction; should a call fail, each call in one of its own."""
    try:
        if len(batch) == 1 or not _all_in_one(driver, batch):
            for write in batch:
                _all_in_one(driver, [write])
    finally:
        for write in batch:
            write.done = True


def _all_in_one(driver: sqlite3.Connection, batch: list[_Write]) -> bool:
    """One ``BEGIN IMMEDIATE`` ... ``COMMIT`` for every call of ``batch``.

    ``False`` when a call's own work failed (all rolled back: the caller runs each call
    alone, so that only the failing one fails). A failed BEGIN or COMMIT fails every
    call (trying them one by one would only wait for the same lock again).
    """
    current: _Write | None = None
    try:
        driver.execute("BEGIN IMMEDIATE")
        for current in batch:
            current.result = current.work(driver)
        current = None
        driver.execute("COMMIT")
        return True
    except BaseException as exc:
        if driver.in_transaction:
            # If even this fails, the pool's reset on return rolls back (or discards).
            with suppress(Exception):  # sqlite3.Error, without importing sqlite3 here
                driver.rollback()
        if current is not None and len(batch) > 1 and isinstance(exc, Exception):
            return False
        for write in batch:  # nothing of the batch is stored
            write.error = exc
            write.result = None
        if not isinstance(exc, Exception):
            raise  # KeyboardInterrupt, SystemExit: the leader's own
        return True


_queues: weakref.WeakKeyDictionary[Engine, WriteQueue] = weakref.WeakKeyDictionary()
_queues_guard = threading.Lock()


def write_queue(engine: Engine) -> WriteQueue:
    """The queue of ``engine``'s file in this process (made on first use)."""
    queue = _queues.get(engine)
    if queue is None:
        with _queues_guard:
            queue = _queues.setdefault(engine, WriteQueue())
    return queue


def _reset_after_fork() -> None:
    # A lock held by a parent's thread at fork time would stay held in the child.
    global _queues_guard
    _queues_guard = threading.Lock()
    _queues.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
