"""What a database failure means for the caller: try again, fall back, or give up.

The store's retry loop and replica routing decide from these answers; the errors
themselves are :mod:`agents_sessions.errors`' classes wrapping the driver's.
"""

from __future__ import annotations

import logging
import random

from sqlalchemy import exc as sa_exc

from ..errors import ConnectionLostError, DatabaseError, PoolTimeoutError, sqlstate_of
from .engine import parse_database_url

logger = logging.getLogger("agents_sessions")

# What a connect failure says when waiting may help: the server is down, starting,
# stopping or restarting, or the network dropped. A bad password, a pg_hba refusal,
# a certificate that does not verify or a missing database will not heal by retrying.
_TRANSIENT_CONNECT_MARKERS = (
    "connection refused",
    "starting up",
    "shutting down",
    "in recovery mode",
    "not yet accepting connections",
    "server closed the connection",
    "terminating connection",
    "could not receive data",
    "could not send data",
    "connection reset",
    "timeout expired",
    "timed out",
    "no route to host",
    "network is unreachable",
    "too many connections",
    "remaining connection slots",
)


def transient_connect_failure(cause: BaseException | None) -> bool:
    """Whether a failed connect may succeed if tried again (nothing was sent)."""
    if not isinstance(cause, sa_exc.OperationalError):
        return False
    message = str(cause.orig if cause.orig is not None else cause).lower()
    return any(marker in message for marker in _TRANSIENT_CONNECT_MARKERS)


def replica_unreachable(error: DatabaseError) -> bool:
    """Whether a replica failure means "read from the primary instead".

    A failed connect, a connection lost, or no pooled connection in time: yes. An
    error the server raised while running the statement (a statement timeout, a
    recovery conflict: both carry a SQLSTATE) is the query's, not the replica's
    availability: it propagates, and the replica stays in use.
    """
    if isinstance(error, PoolTimeoutError) or connection_lost(error):
        return True
    cause = error.__cause__
    return isinstance(cause, sa_exc.OperationalError) and sqlstate_of(cause) is None


def replica_url_with_connect_timeout(url: str, seconds: int = 5) -> str:
    """A replica URL with a short ``connect_timeout`` unless it has one: a replica that
    accepts TCP but never answers must not hold lag-tolerant reads back from the primary."""
    target = parse_database_url(url)
    if target.dialect != "postgresql" or "connect_timeout" in target.url.query:
        return url
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}connect_timeout={seconds}"


def connection_lost(error: DatabaseError) -> bool:
    """Did ``error`` come from a connection that broke (rather than from SQL)?"""
    cause = error.__cause__
    if isinstance(cause, sa_exc.DBAPIError):
        return bool(cause.connection_invalidated)
    # A pool checkout that kept meeting dead connections.
    return isinstance(cause, sa_exc.DisconnectionError)


class RetryPlan:
    """The retry rules of one store call, for both executors (worker thread, event loop).

    A repeatable operation is retried when its connection dies under it; any
    operation when a connection could not be opened at all (nothing was sent).
    Retries (``attempts`` of them) wait with exponential backoff from 50 ms.

    Args:
        attempts: How many retries at most.
        write: Whether the operation writes (its outcome is then unknown when an
            attempt that was sent lost its connection).
        repeatable: Whether running it twice has the effect of running it once.
        where: The database, for the log line (password masked).
    """

    def __init__(self, attempts: int, *, write: bool, repeatable: bool, where: str) -> None:
        self.attempts = attempts
        self.attempt = 0
        self._write = write
        self._repeatable = repeatable
        self._where = where
        # Whether some attempt was sent and then lost its connection: the outcome of
        # a write is then unknown unless a later attempt finishes.
        self._outcome_unknown = False

    def after_failure(self, error: DatabaseError, *, sent: bool) -> float:
        """Seconds to wait before the next attempt; or raises what the caller must see.

        Raises:
            DatabaseError: ``error`` itself, when retrying would not help or the
                retries ran out with nothing at stake.
            ConnectionLostError: the connection died while non-repeatable work ran,
                or the retries ran out after a write was sent; whether it took
                effect is unknown.
        """
        # Could not open a connection (refused, server starting up): nothing was
        # sent, so any operation may be tried again.
        connect_failed = not sent and transient_connect_failure(error.__cause__)
        if not (connect_failed or connection_lost(error)):
            raise error  # an SQL error, a pool timeout: retrying would not help
        if sent and not self._repeatable:
            raise ConnectionLostError(
                "the database connection was lost during an operation that cannot "
                "be retried safely; it may or may not have taken effect (the next "
                "call uses a fresh connection)"
            ) from error
        self._outcome_unknown = self._outcome_unknown or (sent and self._write)
        if self.attempt >= self.attempts:
            if self._outcome_unknown:
                raise ConnectionLostError(
                    f"the database connection was lost and {self.attempts} retries "
                    "found no working connection; the write may or may not have "
                    "taken effect"
                ) from error
            raise error
        self.attempt += 1
        delay = min(0.05 * float(2 ** (self.attempt - 1)), 2.0) * (0.5 + random.random() / 2)
        logger.warning(
            "agents_sessions: %s on %s; retry %d of %d in %.0f ms",
            "connection lost" if sent else "could not connect",
            self._where,
            self.attempt,
            self.attempts,
            delay * 1000,
        )
        return delay
