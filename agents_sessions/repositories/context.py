"""What a repository reads off the connection it was given: tenant and transaction state."""

from __future__ import annotations

from sqlalchemy import Connection

from ..db.engine import TENANT_OPTION


def acting_tenant(connection: Connection) -> str | None:
    """The user this connection acts for under row-level security, if any.

    A conversation written while acting for a tenant must name that tenant as its
    owner (the policy checks the row as written), so it is the default ``user_id``.
    """
    tenant = connection.get_execution_options().get(TENANT_OPTION)
    return tenant if isinstance(tenant, str) else None


def in_driver_transaction(connection: Connection) -> bool:
    """Whether the connection is inside a real database transaction.

    SQLAlchemy considers a connection "in a transaction" after any statement, even
    when the store runs it in the driver's autocommit mode (single statements).
    """
    if not connection.in_transaction():
        return False
    driver_connection = connection.connection.dbapi_connection
    return not getattr(driver_connection, "autocommit", False)
