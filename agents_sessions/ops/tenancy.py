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

from ..errors import CitusError, ConfigurationError, RowLevelSecurityFilteredError
from .citus import is_distributed

#: The tables the tenant policies protect (migrations 0003, 0005, 0006 and 0007).
PROTECTED_TABLES = (
    "conversations",
    "messages",
    "usage_logs",
    "conversation_branches",
    "run_states",
    "append_keys",
)


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


def _policy_names(connection: Connection) -> set[str]:
    rows = connection.execute(
        text(
            "SELECT tablename FROM pg_policies WHERE schemaname = current_schema() "
            "AND tablename = ANY(:tables) AND policyname = tablename || '_tenant_isolation'"
        ),
        {"tables": list(PROTECTED_TABLES)},
    )
    return {name for (name,) in rows}


def isolation_problem(connection: Connection) -> tuple[str, str | None]:
    """The state of tenant isolation, and what is wrong with it (``None``: nothing).

    Returns a description and, when isolation is half on or cannot work, the problem:
    some tables enforce it and others do not, or it is enabled on a table whose
    policy is missing (a downgrade below ``0003``: the app role then sees no rows).
    """
    states = row_level_security_status(connection)
    enabled = sorted(table for table, on in states.items() if on)
    if not enabled:
        return "tenant isolation is off (opt-in: `agents-sessions rls enable`)", None
    missing_policies = sorted(set(enabled) - _policy_names(connection))
    if missing_policies:
        return (
            f"row-level security is enabled on {', '.join(enabled)}",
            f"the tenant policies of {', '.join(missing_policies)} are missing, so a role "
            "subject to them sees no rows: run `agents-sessions migrate upgrade`",
        )
    disabled = sorted(table for table, on in states.items() if not on)
    if disabled:
        return (
            f"row-level security is enabled on {', '.join(enabled)} only",
            f"{', '.join(disabled)} are not isolated: run `agents-sessions rls enable`",
        )
    return f"tenant isolation is enforced on {', '.join(enabled)}", None


def enable_row_level_security(connection: Connection) -> None:
    """Enforce the tenant policies on every protected table (run as the tables' owner).

    Runs in the caller's transaction: all the tables switch together or none does.
    """
    _require_postgresql(connection)
    if is_distributed(connection):
        # The messages and usage_logs policies look the conversation up in a
        # subquery, which Citus does not allow on distributed tables (they were
        # dropped when the tables were distributed): half a policy set would give
        # a false sense of isolation, so none is enforced.
        raise CitusError(
            "row-level security cannot be enforced on a Citus-distributed store (Citus "
            "allows no subqueries in policies of distributed tables): scope tenants in the "
            "application, e.g. one user id per conversation checked before each call"
        )
    for table in PROTECTED_TABLES:
        connection.execute(text(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY"))


def disable_row_level_security(connection: Connection) -> None:
    """Stop enforcing the tenant policies (they stay defined)."""
    _require_postgresql(connection)
    for table in PROTECTED_TABLES:
        connection.execute(text(f"ALTER TABLE {table} DISABLE ROW LEVEL SECURITY"))


# --------------------------------------------------------------------------------------
# Operator work under row-level security
# --------------------------------------------------------------------------------------


def tables_filtered_for_current_role(connection: Connection) -> list[str]:
    """The protected tables whose rows row-level security filters for this connection's role.

    Empty on SQLite, when row-level security is disabled, and for a role the policies
    do not apply to (the tables' owner, a superuser, a ``BYPASSRLS`` role): PostgreSQL's
    own ``row_security_active()`` decides, so ``FORCE ROW LEVEL SECURITY`` and role
    membership count exactly as they do for queries.
    """
    if connection.dialect.name != "postgresql":
        return []
    rows = connection.execute(
        text(
            "SELECT name FROM unnest(CAST(:tables AS text[])) WITH ORDINALITY AS t(name, n) "
            "WHERE to_regclass(name) IS NOT NULL AND row_security_active(name) ORDER BY n"
        ),
        {"tables": list(PROTECTED_TABLES)},
    )
    return [str(name) for (name,) in rows]


def require_unfiltered_access(connection: Connection, action: str) -> None:
    """Refuse ``action`` when row-level security would hide other tenants' rows from it.

    Work that must see every tenant (erasure, pruning, statistics, exports) would
    otherwise find nothing and report an empty success.

    Raises:
        RowLevelSecurityFilteredError: naming the role and the tables, and saying
            which URL to use instead.
    """
    filtered = tables_filtered_for_current_role(connection)
    if not filtered:
        return
    role = connection.execute(text("SELECT current_user")).scalar_one()
    raise RowLevelSecurityFilteredError(
        f"{action} refused: row-level security is enabled and hides other tenants' rows "
        f"from role {role!s} ({', '.join(filtered)}), so it would find nothing and report "
        "an empty success. Run it as the tables' owner: put the owner's URL in "
        "DATABASE_MIGRATION_URL (operator commands use it for this) or pass it with "
        "--database-url"
    )
