"""Recall and retention indexes on PostgreSQL, built without blocking writes.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30

PostgreSQL only (on SQLite, revision 0006 made the full-text table and the index).

* ``ix_messages_content_search``: GIN over ``to_tsvector('english', content)``, the
  full-text index of recall (an expression index: nothing is added to the rows).
* ``ix_conversations_expires_at``: partial, only conversations with a time-to-live.

How writes go on meanwhile: ``CREATE INDEX CONCURRENTLY`` takes a SHARE UPDATE
EXCLUSIVE lock, which does not conflict with INSERT, UPDATE or DELETE, instead of
the SHARE lock of a plain ``CREATE INDEX``, which waits for and then blocks every
writer for the whole build. CONCURRENTLY cannot run inside a transaction block, so
the build runs in Alembic's ``autocommit_block()``: the migration transaction so far
(revision 0006 recorded) is committed, each index is built in autocommit mode, and
a new transaction records this revision.

The migration lock (``env.py``) is session-level, so it outlives that commit: a
second migrator waits until this one has recorded the revision. ``ANALYZE messages``
then gives the planner the new expression's statistics. An INVALID index left by a
failed or cancelled build is dropped (concurrently too) and built anew
when the upgrade is run again.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES = {
    "ix_messages_content_search": (
        "ON messages USING gin (to_tsvector('english'::regconfig, content))"
    ),
    "ix_conversations_expires_at": "ON conversations (expires_at) WHERE expires_at IS NOT NULL",
}

_INDEX_STATE = sa.text(
    """
    SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass(:name)
    """
)


def _build_concurrently(name: str, definition: str) -> None:
    if not context.is_offline_mode():
        valid = op.get_bind().execute(_INDEX_STATE, {"name": name}).scalar()
        if valid is True:
            return
        if valid is False:
            # A failed or cancelled build's leftover: unusable, yet kept up to date
            # by every write. Replace it.
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
    op.execute(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} {definition}")


def upgrade() -> None:
    """Build the two indexes with CREATE INDEX CONCURRENTLY (PostgreSQL)."""
    if op.get_bind().dialect.name != "postgresql":
        return
    with op.get_context().autocommit_block():
        for name, definition in INDEXES.items():
            _build_concurrently(name, definition)
        # Statistics of the new index expression (which words are common): without
        # them the planner guesses, and may scan the GIN index for a common word
        # where one user's few conversations would do. ANALYZE samples a fixed
        # number of rows and does not block writes.
        op.execute("ANALYZE messages")


def downgrade() -> None:
    """Drop the two indexes (concurrently: reads and writes go on)."""
    if op.get_bind().dialect.name != "postgresql":
        return
    with op.get_context().autocommit_block():
        for name in INDEXES:
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
