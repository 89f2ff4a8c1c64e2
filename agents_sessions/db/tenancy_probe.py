"""Whether ``tenant_id`` isolates anything here: the once-per-engine check behind its warning.

``tenant_id`` is the application's request; row-level security is the operator's
switch (``agents-sessions rls enable``, see :mod:`agents_sessions.ops.tenancy`). A
deploy may set the first before the second, so a tenant-scoped call on a database
(or role) where the policies do not apply warns once instead of refusing -- but
never stays silent.
"""

from __future__ import annotations

import logging

from sqlalchemy import Connection

logger = logging.getLogger("agents_sessions")

# Is row-level security enforced on every protected table for this role? Not when a
# table has it off, nor for the tables' owner (no FORCE), a superuser or BYPASSRLS.
_TENANCY_ENFORCED_SQL = (
    "SELECT c.relname, c.relrowsecurity, "
    "pg_has_role(current_user, c.relowner, 'USAGE') AND NOT c.relforcerowsecurity, "
    "r.rolsuper OR r.rolbypassrls "
    "FROM pg_class c JOIN pg_roles r ON r.rolname = current_user "
    "WHERE c.relname IN ('conversations', 'messages', 'usage_logs', 'append_keys') "
    "AND c.relnamespace = current_schema()::regnamespace ORDER BY 1"
)


def warn_if_tenancy_not_enforced(connection: Connection, where: str) -> None:
    """Log a warning when ``tenant_id`` would isolate nothing for this connection's role.

    The caller runs it once per engine, before the connection's own transaction.
    """
    rows = connection.exec_driver_sql(_TENANCY_ENFORCED_SQL).all()
    # The probe autobegan a transaction; end it so the caller's own can start.
    connection.rollback()
    off = [name for name, enabled, _, _ in rows if not enabled]
    exempt = [name for name, enabled, owner, bypass in rows if enabled and (owner or bypass)]
    if off or not rows:
        reason = (
            f"row-level security is not enabled on {', '.join(off) or 'the tables'}: "
            "every tenant sees every conversation (enable it: `agents-sessions rls enable`)"
        )
    elif exempt:
        reason = (
            f"this role owns {', '.join(exempt)} or is a superuser/BYPASSRLS, so the "
            "policies do not apply to it: connect as the application role"
        )
    else:
        return
    logger.warning("agents_sessions: tenant_id is set on %s but not enforced: %s", where, reason)
