"""Tenant isolation with PostgreSQL row-level security (opt-in).

Migration ``0003`` defines one policy per table: a connection acting for a user
(the transaction-local setting ``agents_sessions.tenant_id``) sees and writes only
that user's conversations and their messages and usage. The policies are enforced
on a table only once row-level security is *enabled* on it, which is what
:func:`enable_row_level_security` (``agents-sessions rls enable``) does, as the
tables' owner. From then on:

* the application role (not the owner, not ``BYPASSRLS``) must act for a tenant:
  ``PostgreSQLSession(..., tenant_id="alice")`` or ``store.transaction(tenant_id=...)``;
  with no tenant it sees no rows at all (fail closed);
* the owner role (migrations, administration, analytics, the CLI) is not subject
  to the policies.

Acting for a tenant costs nothing extra on reads (the setting rides in the same
round trip as the statement); a write becomes an explicit transaction of a few
statements.
"""

from __future__ import annotations

from sqlalchemy import Connection, text

from ..errors import ConfigurationError

#: The tables the policies of migrations 0003 (and 0006, run_states) protect.
PROTECTED_TABLES = ("conversations", "messages", "usage_logs", "run_states")


def _require_postgresql(connection: Connection) -> None:
    if connection.dialect.name != "postgresql":
        raise ConfigurationError("row-level security needs PostgreSQL; SQLite has none")


def row_level_security_status(connection: Connection) -> dict[str, bool]:
    """Whether row-level security is enabled, per protected table."""
    _require_postgresql(connection)
    rows = connection.execute(
        text(
            "SELECT c.relname, c.relrowsecurity FROM pg_class c "
            "WHERE c.relname = ANY(:tables) AND c.relnamespace = current_schema()::regnamespace"
        ),
        {"tables": list(PROTECTED_TABLES)},
    )
    return {name: bool(enabled) for name, enabled in rows}


def enable_row_level_security(connection: Connection) -> None:
    """Enforce the tenant policies on every protected table (run as the tables' owner).

    Runs in the caller's transaction: all three tables switch together or none does.
    """
    _require_postgresql(connection)
    for table in PROTECTED_TABLES:
        connection.execute(text(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY"))


def disable_row_level_security(connection: Connection) -> None:
    """Stop enforcing the tenant policies (they stay defined)."""
    _require_postgresql(connection)
    for table in PROTECTED_TABLES:
        connection.execute(text(f"ALTER TABLE {table} DISABLE ROW LEVEL SECURITY"))
