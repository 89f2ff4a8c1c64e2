"""Recall, retention and paused runs: full-text search, conversations.expires_at, run_states.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30

* ``conversations.expires_at`` (nullable, no default: a catalog-only change on
  PostgreSQL, no table rewrite) and a partial index on it for ``prune --expired``.
* ``run_states``: one paused agent run per conversation (new, empty table).
* Full-text search over ``messages.content`` on SQLite: an FTS5 table (external
  content: the text is not stored twice), filled from the existing rows and kept in
  step by triggers on every insert, update and delete of ``messages`` -- appends,
  pops, clears, cascading deletes, prunes and imports alike. (SQLite's index on
  ``expires_at`` is made here too.)

On PostgreSQL the two indexes are revision 0008's: built with ``CREATE INDEX
CONCURRENTLY``, which cannot share a transaction with this revision's changes.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

EXPIRY_INDEX = "ix_conversations_expires_at"

# SQLite: the FTS5 index and the triggers that keep it equal to messages.content.
# Porter stemming over unicode61 (diacritics folded), close to PostgreSQL's
# 'english' configuration.
SQLITE_FTS = [
    "CREATE VIRTUAL TABLE messages_fts USING fts5(content, content='messages', "
    "content_rowid='id', tokenize='porter unicode61 remove_diacritics 2')",
    "CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN "
    "INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content); END",
    "CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN "
    "INSERT INTO messages_fts(messages_fts, rowid, content) "
    "VALUES ('delete', old.id, old.content); END",
    "CREATE TRIGGER messages_fts_update AFTER UPDATE OF content ON messages BEGIN "
    "INSERT INTO messages_fts(messages_fts, rowid, content) "
    "VALUES ('delete', old.id, old.content); "
    "INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content); END",
    "INSERT INTO messages_fts(messages_fts) VALUES ('rebuild')",
]


def upgrade() -> None:
    """Add expiry, the run_states table and the full-text index."""
    dialect = op.get_bind().dialect.name
    # A plain ALTER TABLE ... ADD COLUMN on both (no batch-mode table copy on SQLite:
    # dropping the old `conversations` would cascade to every message).
    op.add_column("conversations", sa.Column("expires_at", sa.DateTime(timezone=True)))
    op.create_table(
        "run_states",
        sa.Column("conversation_id", sa.Text(), nullable=False),
        sa.Column("agent_name", sa.Text(), nullable=False),
        sa.Column("schema_version", sa.Text(), nullable=False),
        sa.Column("sdk_version", sa.Text(), nullable=False),
        sa.Column("approvals", sa.JSON() if dialect == "postgresql" else sa.Text(), nullable=False),
        sa.Column("state", sa.JSON() if dialect == "postgresql" else sa.Text(), nullable=False),
        sa.Column("state_bytes", sa.BigInteger(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()")
            if dialect == "postgresql"
            else sa.text("(strftime('%Y-%m-%d %H:%M:%f', 'now') || '000')"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name="fk_run_states_conversation_id_conversations",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("conversation_id", name="pk_run_states"),
    )
    if dialect == "postgresql":
        # Row-level security: a paused run is visible through its conversation only,
        # like messages (0003); enforced now if the operator enabled it already.
        condition = "EXISTS (SELECT 1 FROM conversations c WHERE c.id = run_states.conversation_id)"
        op.execute(
            f"CREATE POLICY run_states_tenant_isolation ON run_states "
            f"USING ({condition}) WITH CHECK ({condition})"
        )
        op.execute(
            "DO $$ BEGIN IF (SELECT relrowsecurity FROM pg_class "
            "WHERE oid = 'conversations'::regclass) THEN "
            "ALTER TABLE run_states ENABLE ROW LEVEL SECURITY; END IF; END $$"
        )
    else:
        op.create_index(
            EXPIRY_INDEX,
            "conversations",
            ["expires_at"],
            sqlite_where=sa.text("expires_at IS NOT NULL"),
        )
        for statement in SQLITE_FTS:
            op.execute(statement)
    # PostgreSQL: both indexes are built by revision 0008, without blocking writes.


def downgrade() -> None:
    """Drop the search index, run_states and expires_at (paused runs and expiries are lost)."""
    dialect = op.get_bind().dialect.name
    if dialect != "postgresql":
        for name in ("messages_fts_insert", "messages_fts_delete", "messages_fts_update"):
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
        op.execute("DROP TABLE IF EXISTS messages_fts")
        op.drop_index(EXPIRY_INDEX, table_name="conversations")
    op.drop_table("run_states")
    # SQLite 3.35+ drops a column in place (again no table copy, see upgrade()).
    op.execute("ALTER TABLE conversations DROP COLUMN expires_at")
