"""A bound on how long a call waits for the server's answer: the response watchdog.

libpq waits for a reply with no timeout of its own. TCP keepalives and
``tcp_user_timeout`` (set by default, see :mod:`agents_sessions.db.engine`) end a
connection whose peer has vanished from the network, but not one whose peer still
acknowledges packets and never answers: a proxy or load balancer that froze, a
half-dead NAT. A session call on such a connection would wait forever -- and a
write, whose cancellation waits for the outcome, with it.

So while a session call runs (statements and commit), its connection is *armed*
here with a deadline (``response_timeout``, a URL parameter). One daemon thread
watches every armed connection; if a deadline passes, it shuts the socket down
(``shutdown(2)`` on the descriptor, which the connection still owns: disarming and
firing are serialised by one lock, and a connection is disarmed before it goes back
to the pool). libpq then sees the connection closed, the call fails as a lost
connection, the pool discards it, and the store retries or reports
``ConnectionLostError``. Arming costs a lock and a heap push; no thread per call.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger("agents_sessions")


class ResponseWatchdog:
    """Shuts down the socket of any armed connection whose deadline has passed."""

    def __init__(self) -> None:
        self._condition = threading.Condition(threading.Lock())
        self._deadlines: list[tuple[float, int]] = []
        self._armed: dict[int, Any] = {}
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None

    @contextmanager
    def armed(self, driver_connection: Any, seconds: float) -> Iterator[None]:
        """Within this block, cut ``driver_connection`` if it is still busy after ``seconds``."""
        token = next(self._tokens)
        deadline = time.monotonic() + seconds
        with self._condition:
            self._armed[token] = driver_connection
            heapq.heappush(self._deadlines, (deadline, token))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._watch, name="agents_sessions-watchdog", daemon=True
                )
                self._thread.start()
            elif self._deadlines[0][1] == token:
                self._condition.notify()
        try:
            yield
        finally:
            with self._condition:
                self._armed.pop(token, None)

    def _watch(self) -> None:
        with self._condition:
            while True:
                while self._deadlines and self._deadlines[0][1] not in self._armed:
                    heapq.heappop(self._deadlines)  # finished in time
                if not self._deadlines:
                    self._condition.wait()
                    continue
                deadline, token = self._deadlines[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._condition.wait(wait)
                    continue
                heapq.heappop(self._deadlines)
                # Under the lock: the owner cannot disarm (and then release the
                # connection, freeing its descriptor number) while we cut it.
                _shut_down(self._armed.pop(token))

    def reset_after_fork(self) -> None:
        """In a forked child: no thread, nothing armed (the parent's calls are not ours)."""
        self.__init__()  # type: ignore[misc]


def _shut_down(driver_connection: Any) -> None:
    try:
        if getattr(driver_connection, "closed", False):
            return
        descriptor = os.dup(driver_connection.fileno())
    except Exception:  # already closed: nothing to cut
        return
    logger.warning(
        "agents_sessions: no answer from the database within response_timeout; "
        "closing the connection (the call fails as a lost connection)"
    )
    try:
        duplicate = socket.socket(fileno=descriptor)
    except OSError:
        os.close(descriptor)
        return
    with duplicate, contextlib.suppress(OSError):
        duplicate.shutdown(socket.SHUT_RDWR)


#: The process's watchdog (one thread, started on first use).
watchdog = ResponseWatchdog()
