"""History management: branches that share items, the durable current branch, usage details.

Revision ID: 0005
Revises: 0003
Create Date: 2026-11-30

* ``messages.branch_id`` (``'main'`` by default): the branch that owns a row. A branch
  does not copy the items it starts from: ``conversation_branches`` records its parent
  and ``fork_before_id``, and its history is the parent's rows with smaller ids followed
  by its own rows (see :mod:`agents_sessions.repositories.branches`).
* ``conversations.current_branch``: the branch the conversation continues on, so every
  server and every session object agrees on it (``NULL`` means ``main``).
* ``usage_logs``: the branch and the user message of the turn a request belongs to,
  its position in the run (``request_index``, unique per run: usage is recorded once),
  cached and reasoning tokens, and the SDK's token detail objects.

On PostgreSQL, adding a column with a constant default is a catalog-only change (no
table rewrite). Building ``ix_messages_conversation_id_branch_id_id`` scans
``messages`` once under a SHARE lock; on a very large table build it first by hand,
``CREATE INDEX CONCURRENTLY ix_messages_conversation_id_branch_id_id ON messages
(conversation_id, branch_id, id)``, and this migration skips it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SQLITE_TABLE = {"sqlite_autoincrement": True}

# Row-level security (migration 0003's scheme): a branch is visible and writable only
# through a conversation the acting tenant can see. Enforced once the operator enables
# row-level security (agents_sessions.ops.tenancy lists the table).
POLICIES = {
    "conversation_branches": (
        "EXISTS (SELECT 1 FROM conversations c WHERE c.id = conversation_branches.conversation_id)"
    ),
}
DETAILS = sa.JSON().with_variant(JSONB(), "postgresql")
NOW = {
    "postgresql": sa.text("now()"),
    "sqlite": sa.text("(strftime('%Y-%m-%d %H:%M:%f', 'now') || '000')"),
}


def _add_columns(table: str, columns: list[sa.Column]) -> None:  # type: ignore[type-arg]
    # Nullable or constant-default columns: a plain ALTER TABLE ADD COLUMN on both
    # dialects (no SQLite table rebuild, no PostgreSQL rewrite).
    postgres = op.get_bind().dialect.name == "postgresql"
    for column in columns:
        if postgres:
            op.add_column(table, column, if_not_exists=True)
        else:
            op.add_column(table, column)


def upgrade() -> None:
    """Add the branch columns and table, and the usage detail columns."""
    dialect = op.get_bind().dialect.name
    _add_columns(
        "messages",
        [sa.Column("branch_id", sa.Text(), nullable=False, server_default=sa.text("'main'"))],
    )
    op.create_index(
        "ix_messages_conversation_id_branch_id_id",
        "messages",
        ["conversation_id", "branch_id", "id"],
        if_not_exists=True,
    )
    _add_columns("conversations", [sa.Column("current_branch", sa.Text(), nullable=True)])
    op.create_table(
        "conversation_branches",
        sa.Column(
            "conversation_id",
            sa.Text(),
            sa.ForeignKey(
                "conversations.id",
                ondelete="CASCADE",
                name="fk_conversation_branches_conversation_id_conversations",
            ),
            nullable=False,
        ),
        sa.Column("branch_id", sa.Text(), nullable=False),
        sa.Column("parent_branch_id", sa.Text(), nullable=True),
        sa.Column("fork_before_id", sa.BigInteger(), nullable=True),
        sa.Column("state", sa.Text(), nullable=False, server_default=sa.text("'live'")),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=NOW[dialect]
        ),
        sa.PrimaryKeyConstraint("conversation_id", "branch_id", name="pk_conversation_branches"),
        sa.CheckConstraint(
            "state IN ('live', 'deleted', 'frozen')", name="ck_conversation_branches_state"
        ),
        sa.CheckConstraint(
            "length(branch_id) BETWEEN 1 AND 255", name="ck_conversation_branches_branch_id_length"
        ),
    )
    _add_columns(
        "usage_logs",
        [
            sa.Column("branch_id", sa.Text(), nullable=True),
            sa.Column("turn_message_id", sa.BigInteger(), nullable=True),
            sa.Column("request_index", sa.Integer(), nullable=True),
            sa.Column(
                "cached_tokens", sa.BigInteger(), nullable=False, server_default=sa.text("0")
            ),
            sa.Column(
                "reasoning_tokens", sa.BigInteger(), nullable=False, server_default=sa.text("0")
            ),
            sa.Column("input_tokens_details", DETAILS, nullable=True),
            sa.Column("output_tokens_details", DETAILS, nullable=True),
        ],
    )
    if dialect == "postgresql":
        for table, condition in POLICIES.items():
            op.execute(
                f"CREATE POLICY {table}_tenant_isolation ON {table} "
                f"USING ({condition}) WITH CHECK ({condition})"
            )
            # Enforced at once where the operator enabled tenant isolation already
            # (e.g. upgrading again after a downgrade below this revision).
            op.execute(
                "DO $$ BEGIN IF (SELECT relrowsecurity FROM pg_class "
                "WHERE oid = 'conversations'::regclass) THEN "
                f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY; END IF; END $$"
            )
    op.create_index(
        "uq_usage_logs_conversation_id_run_id_request_index",
        "usage_logs",
        ["conversation_id", "run_id", "request_index"],
        unique=True,
        postgresql_where=sa.text("request_index IS NOT NULL"),
        sqlite_where=sa.text("request_index IS NOT NULL"),
        if_not_exists=True,
    )


def downgrade() -> None:
    """Drop what upgrade added (branches other than ``main`` and usage details are lost)."""
    op.drop_index("uq_usage_logs_conversation_id_run_id_request_index", table_name="usage_logs")
    with op.batch_alter_table("usage_logs", table_kwargs=SQLITE_TABLE) as batch:
        for column in (
            "output_tokens_details",
            "input_tokens_details",
            "reasoning_tokens",
            "cached_tokens",
            "request_index",
            "turn_message_id",
            "branch_id",
        ):
            batch.drop_column(column)
    op.drop_table("conversation_branches")
    with op.batch_alter_table("conversations") as batch:
        batch.drop_column("current_branch")
    # Rows of other branches would otherwise join main's history.
    op.execute("DELETE FROM messages WHERE branch_id <> 'main'")
    op.drop_index("ix_messages_conversation_id_branch_id_id", table_name="messages")
    with op.batch_alter_table("messages", table_kwargs=SQLITE_TABLE) as batch:
        batch.drop_column("branch_id")
