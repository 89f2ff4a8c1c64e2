"""Initial schema: conversations, messages, usage_logs.

Revision ID: 0001
Revises:
Create Date: 2026-11-23

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# `utcnow` is the package's dialect-aware "now" for server defaults: now() on
# PostgreSQL, a microsecond text timestamp on SQLite. It is a stable compile-time
# construct, safe for migrations to share with the models.
from agents_sessions.db.models import utcnow

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIGINT_PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Create the three tables and their indexes."""
    op.create_table(
        "conversations",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=utcnow(), nullable=False
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=utcnow(), nullable=False
        ),
        sa.Column(
            "metadata",
            sa.JSON().with_variant(postgresql.JSONB(), "postgresql"),
            server_default=sa.text("'{}'"),
            nullable=False,
        ),
        sa.CheckConstraint("length(id) BETWEEN 1 AND 255", name=op.f("ck_conversations_id_length")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_conversations")),
    )
    op.create_index(op.f("ix_conversations_created_at"), "conversations", ["created_at"])
    op.create_index(op.f("ix_conversations_updated_at"), "conversations", ["updated_at"])
    op.create_index(
        op.f("ix_conversations_user_id_created_at_id"),
        "conversations",
        ["user_id", "created_at", "id"],
    )

    op.create_table(
        "messages",
        sa.Column("id", BIGINT_PK, sa.Identity(), nullable=False),
        sa.Column("conversation_id", sa.Text(), nullable=False),
        sa.Column("role", sa.Text(), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        # json, not jsonb: kept verbatim (NUL escapes, key order, number spelling).
        sa.Column("item", sa.Text().with_variant(postgresql.JSON(), "postgresql"), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=utcnow(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name=op.f("fk_messages_conversation_id_conversations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_messages")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_messages_conversation_id_id"), "messages", ["conversation_id", "id"])
    op.create_index(op.f("ix_messages_created_at"), "messages", ["created_at"])

    op.create_table(
        "usage_logs",
        sa.Column("id", BIGINT_PK, sa.Identity(), nullable=False),
        sa.Column("conversation_id", sa.Text(), nullable=False),
        sa.Column("run_id", sa.Text(), nullable=True),
        sa.Column("response_id", sa.Text(), nullable=True),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("requests", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "completion_tokens", sa.BigInteger(), server_default=sa.text("0"), nullable=False
        ),
        sa.Column("total_tokens", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("timestamp", sa.DateTime(timezone=True), server_default=utcnow(), nullable=False),
        sa.CheckConstraint(
            "prompt_tokens >= 0 AND completion_tokens >= 0 AND total_tokens >= 0 AND requests >= 0",
            name=op.f("ck_usage_logs_non_negative"),
        ),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name=op.f("fk_usage_logs_conversation_id_conversations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_logs")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_usage_logs_conversation_id"), "usage_logs", ["conversation_id"])
    op.create_index(op.f("ix_usage_logs_timestamp"), "usage_logs", ["timestamp"])


def downgrade() -> None:
    """Drop everything this revision created."""
    op.drop_table("usage_logs")
    op.drop_table("messages")
    op.drop_table("conversations")
