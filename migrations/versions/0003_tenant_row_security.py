"""Row-level security policies: a connection acting for one user sees only that user's rows.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23

PostgreSQL only (SQLite has no row security; there this revision does nothing).

The policies are defined here, so they evolve with the schema, but they take effect
only on tables where row-level security is *enabled*, which is the operator's opt-in
(``agents-sessions rls enable``, or :func:`agents_sessions.ops.tenancy.enable_row_level_security`).
Once enabled, a role that is neither the tables' owner nor BYPASSRLS (the application
role) sees and writes only rows of the user named by the transaction-local setting
``agents_sessions.tenant_id``; with no tenant set it sees nothing (fail closed). The
owner (the migration role) is not subject to them, for administration and analytics.

* ``conversations``: ``user_id`` must equal the acting tenant, for reads and for the
  rows a write leaves behind (so a tenant can neither read, take over, nor create a
  conversation under another user's name).
* ``messages`` and ``usage_logs``: visible and writable only through a conversation
  the tenant can see. The ``EXISTS`` subquery is itself filtered by the conversations
  policy, so the rule has one source of truth.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TENANT = "current_setting('agents_sessions.tenant_id', true)"
OWNED_CONVERSATION = "EXISTS (SELECT 1 FROM conversations c WHERE c.id = {table}.conversation_id)"

POLICIES = {
    "conversations": f"user_id = {TENANT}",
    "messages": OWNED_CONVERSATION.format(table="messages"),
    "usage_logs": OWNED_CONVERSATION.format(table="usage_logs"),
}


def upgrade() -> None:
    """Create one tenant policy per table (enforced only where RLS is enabled)."""
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, condition in POLICIES.items():
        op.execute(
            f"CREATE POLICY {table}_tenant_isolation ON {table} "
            f"USING ({condition}) WITH CHECK ({condition})"
        )


def downgrade() -> None:
    """Drop the policies; leave row-level security switched on where the operator enabled it.

    Whether isolation is enabled is the operator's decision, stored on each table
    (``relrowsecurity``), and it must survive a downgrade and the upgrade after it:
    switching it off here made ``downgrade 0002`` + ``upgrade`` silently end tenant
    isolation. Between the two, an enabled table without policies fails closed (a
    role subject to it sees no rows); the upgrade brings the policies back.
    """
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in POLICIES:
        op.execute(f"DROP POLICY IF EXISTS {table}_tenant_isolation ON {table}")
