"""Recall and retention indexes on PostgreSQL, built without blocking writes.

Revision ID: 0008
Revises: 0007
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
a new transaction records this revision. ``ANALYZE messages`` then gives the planner
the new expression's statistics.

Several migrators at once (app servers auto-migrating on first use): the block's
commit releases the migration lock (``env.py``'s transaction-level advisory lock;
holding a lock across the build would deadlock, since a concurrent build waits for
every older snapshot, a lock waiter's included). So a second migrator may reach this
revision while the first builds. It waits for a build in progress
(``pg_stat_progress_create_index``) instead of starting its own; an INVALID index
that nobody is building -- what a failed or cancelled build leaves behind -- is
dropped (concurrently too) and built anew. After the block each migrator takes the
lock again; one that finds this revision already recorded raises
``RevisionRecordedConcurrently``, and ``env.py`` starts it over from what is recorded.
"""

import time
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

from agents_sessions.db.migrate import RevisionRecordedConcurrently

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
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
    SELECT i.indisvalid,
           -- Any build on the table counts: early in a build the progress row
           -- does not name its index yet.
           EXISTS (SELECT 1 FROM pg_stat_progress_create_index p
                   WHERE p.relid = i.indrelid) AS being_built
    FROM pg_index i WHERE i.indexrelid = to_regclass(:name)
    """
)


# deadlock_detected, unique_violation (the catalog's index name), and "tuple
# concurrently updated" (XX000: two sessions changing the same catalog row).
_LOST_A_RACE = {"40P01", "23505", "XX000"}


def _build_concurrently(name: str, definition: str) -> None:
    if context.is_offline_mode():
        op.execute(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} {definition}")
        return
    bind = op.get_bind()
    while True:
        state = bind.execute(_INDEX_STATE, {"name": name}).one_or_none()
        if state is None:
            try:
                op.execute(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} {definition}")
            except sa.exc.DBAPIError as exc:
                # Another migrator started the same build in the same instant: two
                # concurrent builds on one table deadlock (the server cancels one)
                # or collide on the index name. The loser waits for the winner.
                if getattr(exc.orig, "pgcode", None) not in _LOST_A_RACE:
                    raise
                time.sleep(0.2)
                continue
            return
        valid, being_built = state
        if valid:
            return
        if being_built:
            # Another migrator builds it: wait (each poll is its own autocommit
            # statement, so this holds no snapshot the build would wait for).
            time.sleep(0.2)
            continue
        # A failed or cancelled build's leftover: unusable, yet kept up to date by
        # every write. Replace it.
        try:
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
        except sa.exc.DBAPIError as exc:
            if getattr(exc.orig, "pgcode", None) not in _LOST_A_RACE:
                raise
            time.sleep(0.2)  # another migrator got to it first: look again


def _recorded_meanwhile() -> bool:
    """Take the migration lock again; has another migrator recorded this revision?"""
    bind = op.get_bind()
    bind.execute(
        sa.text("SELECT pg_advisory_xact_lock(:lock_id)"), {"lock_id": _migration_lock_id()}
    )
    recorded = bind.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all()
    return recorded != [down_revision]


def _migration_lock_id() -> int:
    settings = context.config.attributes.get("settings")
    if settings is None:
        from agents_sessions.settings import load_settings

        settings = load_settings()
    return int(settings.migration_lock_id)


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
        # number of rows and does not block writes. A concurrent migrator still
        # building an index CONCURRENTLY can deadlock with it (each waits for the
        # other's lock or transaction); statistics are only a hint the autovacuum
        # daemon renews anyway, so then this migrator goes on without them.
        op.execute(
            "DO $$ BEGIN ANALYZE messages; "
            "EXCEPTION WHEN deadlock_detected OR lock_not_available THEN "
            "RAISE NOTICE 'ANALYZE messages skipped: a concurrent migration holds the table'; "
            "END $$"
        )
    if not context.is_offline_mode() and _recorded_meanwhile():
        raise RevisionRecordedConcurrently(revision)


def downgrade() -> None:
    """Drop the two indexes (concurrently: reads and writes go on)."""
    if op.get_bind().dialect.name != "postgresql":
        return
    with op.get_context().autocommit_block():
        for name in INDEXES:
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
