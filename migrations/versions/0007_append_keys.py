"""Exactly-once appends that survive pops and clears: the append_keys table.

Revision ID: 0007
Revises: 0003
Create Date: 2026-11-30

Until now an append's idempotency key lived only on the call's first message row,
so a concurrent ``pop_item`` or ``clear_session`` could delete it, and a retry of
that call after a lost commit stored its items again. Keys now live in a table of
their own (``messages.append_key`` is still written, for exports), for at least a
day. A new, empty table: no lock on existing data.

PostgreSQL: the table gets the same tenant policy as ``messages`` (visible only
through a conversation the tenant can see), and row-level security is switched on
for it if the operator enabled it on ``conversations``.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from agents_sessions.db.models import utcnow

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

POLICY = "EXISTS (SELECT 1 FROM conversations c WHERE c.id = append_keys.conversation_id)"


def upgrade() -> None:
    """Create append_keys (and, on PostgreSQL, its tenant policy)."""
    op.create_table(
        "append_keys",
        sa.Column("conversation_id", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=utcnow(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name=op.f("fk_append_keys_conversation_id_conversations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("conversation_id", "key", name=op.f("pk_append_keys")),
    )
    op.create_index(
        op.f("ix_append_keys_conversation_id_created_at"),
        "append_keys",
        ["conversation_id", "created_at"],
    )
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        f"CREATE POLICY append_keys_tenant_isolation ON append_keys "
        f"USING ({POLICY}) WITH CHECK ({POLICY})"
    )
    # As one statement, so that offline SQL (`alembic upgrade --sql`) carries it too.
    op.execute(
        "DO $$ BEGIN IF (SELECT relrowsecurity FROM pg_class WHERE relname = 'conversations' "
        "AND relnamespace = current_schema()::regnamespace) THEN "
        "ALTER TABLE append_keys ENABLE ROW LEVEL SECURITY; END IF; END $$"
    )


def downgrade() -> None:
    """Drop append_keys (retries of calls in flight fall back to messages.append_key)."""
    op.drop_index(op.f("ix_append_keys_conversation_id_created_at"), table_name="append_keys")
    op.drop_table("append_keys")
