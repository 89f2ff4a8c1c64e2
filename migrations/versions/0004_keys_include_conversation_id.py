"""Keys that distribute: messages and usage_logs keyed by (conversation_id, id).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30

A sharded PostgreSQL (Citus) requires every primary key and unique constraint of a
distributed table to include its distribution column, here the conversation id.
``conversations`` is keyed by it already, and the append-key unique index of 0002
leads with it; this revision re-keys the two append-only tables, on every
PostgreSQL, so one schema serves a single server and a cluster alike.

* ``messages``: primary key ``(conversation_id, id)``. Its index is exactly the
  history index ``ix_messages_conversation_id_id``, which is dropped: one index
  fewer to maintain on every append. ``id`` keeps its identity sequence, so it stays
  unique and monotonic (history order) by itself.
* ``usage_logs``: primary key ``(conversation_id, id)``; ``ix_usage_logs_conversation_id``
  (its leading column) is dropped.

SQLite shards nothing and needs ``id`` as its rowid key (AUTOINCREMENT): there this
revision changes nothing.

On a large table: the new key's unique index is built by a scan of the table under a
SHARE lock, which blocks writes (not reads) for its length; swapping the key itself is
then a catalog change (the columns are NOT NULL already). To avoid blocking writers,
build the index by hand first, concurrently, and this revision adopts it:

    CREATE UNIQUE INDEX CONCURRENTLY pk_messages_next ON messages (conversation_id, id);
    CREATE UNIQUE INDEX CONCURRENTLY pk_usage_logs_next ON usage_logs (conversation_id, id);

(If a concurrent build fails it leaves an INVALID index: drop it and build again; this
revision never adopts an invalid one.) The swap and the drops take an ACCESS EXCLUSIVE
lock for an instant each.

Downgrade restores single-column keys and the two indexes (same notes apply). On a
Citus cluster, undistribute the tables first: a key without the distribution column
is refused there.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: table -> (its single-column index on the distribution column, that index's columns)
REPLACED_INDEXES = {
    "messages": ("ix_messages_conversation_id_id", ["conversation_id", "id"]),
    "usage_logs": ("ix_usage_logs_conversation_id", ["conversation_id"]),
}


def _valid_index_exists(name: str) -> bool:
    """Whether a valid (fully built) index named ``name`` exists in the current schema."""
    return bool(
        op.get_bind()
        .execute(
            sa.text(
                "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "WHERE c.relname = :name AND c.relnamespace = current_schema()::regnamespace "
                "AND i.indisvalid)"
            ),
            {"name": name},
        )
        .scalar()
    )


def _swap_primary_key(table: str, columns: list[str]) -> None:
    """Make ``columns`` the key of ``table``, adopting a prepared ``pk_<table>_next`` index."""
    prepared = f"pk_{table}_next"
    build = f"CREATE UNIQUE INDEX IF NOT EXISTS {prepared} ON {table} ({', '.join(columns)})"
    if context.is_offline_mode():
        op.execute(build)  # SQL for review: adopts a prepared index by name
    elif not _valid_index_exists(prepared):
        op.execute(f"DROP INDEX IF EXISTS {prepared}")  # an INVALID leftover, if any
        op.execute(build)
    # One ALTER: the table is never without a key. USING INDEX renames the index
    # to the constraint's name and needs no scan (the columns are NOT NULL).
    op.execute(
        f"ALTER TABLE {table} DROP CONSTRAINT pk_{table}, "
        f"ADD CONSTRAINT pk_{table} PRIMARY KEY USING INDEX {prepared}"
    )


def upgrade() -> None:
    """Key messages and usage_logs by (conversation_id, id); drop the indexes that duplicates."""
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, (index, _columns) in REPLACED_INDEXES.items():
        _swap_primary_key(table, ["conversation_id", "id"])
        op.drop_index(index, table_name=table)


def downgrade() -> None:
    """Key both tables by id alone again and restore their conversation_id indexes."""
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, (index, columns) in REPLACED_INDEXES.items():
        op.create_index(index, table, columns)
        _swap_primary_key(table, ["id"])
