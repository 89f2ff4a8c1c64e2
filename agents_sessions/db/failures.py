"""What a database failure means for the caller: try again, fall back, or give up.

The store's retry loop and replica routing decide from these answers; the errors
themselves are :mod:`agents_sessions.errors`' classes wrapping the driver's.
"""

from __future__ import annotations

from sqlalchemy import exc as sa_exc

from ..errors import DatabaseError, PoolTimeoutError, sqlstate_of

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


def connection_lost(error: DatabaseError) -> bool:
    """Did ``error`` come from a connection that broke (rather than from SQL)?"""
    cause = error.__cause__
    if isinstance(cause, sa_exc.DBAPIError):
        return bool(cause.connection_invalidated)
    # A pool checkout that kept meeting dead connections.
    return isinstance(cause, sa_exc.DisconnectionError)
