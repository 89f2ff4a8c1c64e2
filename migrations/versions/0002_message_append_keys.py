"""Exactly-once appends: messages.append_key and its partial unique index.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23

Adding a nullable column without a default is a catalog-only change on PostgreSQL
(no table rewrite). The partial index holds only keyed rows, none before this
revision, but building it still scans ``messages`` once under a SHARE lock, which
blocks writes for the length of that scan. On a very large table, prepare both by
hand first, without blocking writers, and this migration then skips them:

    ALTER TABLE messages ADD COLUMN IF NOT EXISTS append_key text;
    CREATE UNIQUE INDEX CONCURRENTLY uq_messages_conversation_id_append_key
        ON messages (conversation_id, append_key) WHERE append_key IS NOT NULL;
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "uq_messages_conversation_id_append_key"

# When SQLite's batch mode rebuilds `messages`, the copy must keep AUTOINCREMENT:
# without it SQLite may reuse the id of a popped newest row.
SQLITE_TABLE = {"sqlite_autoincrement": True}


def upgrade() -> None:
    """Add the key column and the index that makes a key unique per conversation."""
    if op.get_bind().dialect.name == "postgresql":
        op.add_column(
            "messages", sa.Column("append_key", sa.Text(), nullable=True), if_not_exists=True
        )
    else:
        with op.batch_alter_table("messages", table_kwargs=SQLITE_TABLE) as batch:
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
    with op.batch_alter_table("messages", table_kwargs=SQLITE_TABLE) as batch:
        batch.drop_column("append_key")
