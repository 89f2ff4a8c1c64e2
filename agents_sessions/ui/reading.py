"""Read-only access to the store: every page reads inside one read-only transaction.

Read-only by construction, not by convention: on PostgreSQL the transaction is
declared ``READ ONLY`` (the server refuses any write in it, whatever the role may
do), on SQLite the connection is switched to ``PRAGMA query_only`` for the duration
of the page. Nothing is ever committed: :meth:`SessionStore.read` rolls back. A role
with nothing but ``SELECT`` on the three tables and ``alembic_version`` (or the URL
of a hot standby) is all the explorer needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection

from ..store import SessionStore


@contextmanager
def read_only(store: SessionStore) -> Iterator[Connection]:
    """A connection inside one read-only transaction on ``store``.

    Lag-tolerant: a configured read replica answers (falling back to the primary
    when it cannot be reached), since a page can miss the last moments of writes.
    """
    with store.read(lag_tolerant=True) as repositories:
        connection = repositories.connection
        if connection.dialect.name == "postgresql":
            # The first statement of the transaction: everything after it is
            # refused by the server if it writes (SQLSTATE 25006).
            connection.exec_driver_sql("SET TRANSACTION READ ONLY")
            yield connection
            return
        # SQLite has no read-only transactions; query_only makes the connection
        # refuse writes. It is per connection, so it is switched back before the
        # pooled connection is returned.
        connection.exec_driver_sql("PRAGMA query_only = ON")
        try:
            yield connection
        finally:
            if not connection.invalidated:
                connection.exec_driver_sql("PRAGMA query_only = OFF")
