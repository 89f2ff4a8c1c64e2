"""One psycopg2 asynchronous connection, driven by the event loop that polls it.

``psycopg2.connect(..., async_=1)`` never blocks: :meth:`AsyncConnection.wait`
calls ``poll()``, which says whether the socket must become readable or writable
next, and the loop's ``add_reader``/``add_writer`` resume the waiting coroutine
then. A deadline (``connect_timeout``, ``response_timeout``) ends the wait with
:class:`Expired`. The pool around it is :mod:`agents_sessions.db.async_pool`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

import psycopg2
import psycopg2.extensions as psycopg2_extensions

_POLL_OK = psycopg2_extensions.POLL_OK
_POLL_READ = psycopg2_extensions.POLL_READ
_POLL_WRITE = psycopg2_extensions.POLL_WRITE
_IDLE = psycopg2_extensions.TRANSACTION_STATUS_IDLE

# Connections inherited from a parent process: kept referenced, never closed (closing,
# or the garbage collector's close, would end the parent's sessions on the server).
_inherited: list[Any] = []


def keep_unclosed(driver: Any) -> None:
    """Keep a connection inherited from a parent process open and unused, forever."""
    _inherited.append(driver)


class Expired(Exception):
    """The server did not answer within the bound (connect or response timeout)."""


class AsyncConnection:
    """One asynchronous psycopg2 connection, with what the pool needs to know about it."""

    __slots__ = (
        "_expired",
        "_waiting",
        "born",
        "descriptor",
        "driver",
        "generation",
        "pid",
        "prepared",
        "release_slot",
    )

    def __init__(self, driver: Any, release_slot: Callable[[], Any], generation: int) -> None:
        self.driver = driver
        #: The pools' generation when it was opened: :meth:`AsyncPools.close_idle`
        #: starts a new one, and older connections are closed when handed back.
        self.generation = generation
        self.descriptor: int = driver.fileno()
        self.born = time.monotonic()
        self.pid = os.getpid()
        self.release_slot = release_slot
        #: Names of the statements prepared on this connection (see db/prepared.py).
        self.prepared: set[str] = set()
        self._waiting: asyncio.Future[None] | None = None
        self._expired = False

    async def wait(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        """Poll until the driver is done; ``_Expired`` if that takes over ``timeout`` s (0: never).

        Raises whatever the driver raises (the statement's error, a lost connection).
        """
        driver = self.driver
        timer = None
        try:
            while True:
                state = driver.poll()
                if state == _POLL_OK:
                    return
                waiting = self._waiting = loop.create_future()
                descriptor = self.descriptor
                if state == _POLL_READ:
                    loop.add_reader(descriptor, wake, waiting)
                    remove = loop.remove_reader
                elif state == _POLL_WRITE:
                    loop.add_writer(descriptor, wake, waiting)
                    remove = loop.remove_writer
                else:  # pragma: no cover - psycopg2 documents no other state
                    raise psycopg2.OperationalError(f"unexpected poll state {state}")
                if timer is None and timeout > 0:
                    timer = loop.call_later(timeout, self._expire)
                try:
                    await waiting
                finally:
                    remove(descriptor)
                    self._waiting = None
                if self._expired:
                    raise Expired()
        finally:
            if timer is not None:
                timer.cancel()

    def _expire(self) -> None:
        self._expired = True
        if self._waiting is not None and not self._waiting.done():
            self._waiting.set_result(None)

    async def fetch(
        self, loop: asyncio.AbstractEventLoop, sql: str, parameters: Any, timeout: float
    ) -> tuple[list[tuple[Any, ...]], int]:
        """Run one statement: its rows (none for a plain write) and its row count."""
        cursor = self.driver.cursor()
        try:
            cursor.execute(sql, parameters)
            await self.wait(loop, timeout)
            rows = cursor.fetchall() if cursor.description is not None else []
            return rows, cursor.rowcount
        finally:
            cursor.close()

    @property
    def reusable(self) -> bool:
        """Open, not expired, idle at the protocol level: safe to hand out again."""
        driver = self.driver
        return (
            self.pid == os.getpid()
            and not self._expired
            and not driver.closed
            and not driver.isexecuting()
            and driver.get_transaction_status() == _IDLE
        )

    def close(self) -> None:
        """Close the connection and give its slot back."""
        if self.pid != os.getpid():
            # The parent's: never closed from here, never collected (which would close it).
            keep_unclosed(self.driver)
            return
        try:
            self.driver.close()
        finally:
            self.release_slot()


def wake(waiting: asyncio.Future[Any]) -> None:
    """Resolve ``waiting`` with ``None`` unless it is done (a reader, writer or timer fired)."""
    if not waiting.done():
        waiting.set_result(None)
