"""Exactly-once appends: messages.append_key and its partial unique index.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23

Adding a nullable column without a default is a catalog-only change on PostgreSQL
(no table rewrite). The partial index holds only keyed rows, none before this
revision, but building it still scans ``messages`` once under a SHARE lock, which
blocks writes for the length of that scan; on a very large table, create it by hand
first with ``CREATE UNIQUE INDEX CONCURRENTLY uq_messages_conversation_id_append_key
ON messages (conversation_id, append_key) WHERE append_key IS NOT NULL`` -- this
migration then finds it and skips the build.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "uq_messages_conversation_id_append_key"


def upgrade() -> None:
    """Add the key column and the index that makes a key unique per conversation."""
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("append_key", sa.Text(), nullable=True))
    op.create_index(
        INDEX,
        "messages",
        ["conversation_id", "append_key"],
        unique=True,
        postgresql_where=sa.text("append_key IS NOT NULL"),
        sqlite_where=sa.text("append_key IS NOT NULL"),
        if_not_exists=True,
    )


def downgrade() -> None:
    """Drop the index and the column (keys of past appends are lost, nothing else)."""
    op.drop_index(INDEX, table_name="messages")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("append_key")
