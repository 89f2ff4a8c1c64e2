"""Lean statements for the common case: an unexpired conversation on an unforked branch.

Most calls meet a conversation that has not expired and whose current branch has no
parent. The general statements (:mod:`agents_sessions.db.statements`) handle every
case -- a fork chain walked by a recursive CTE, an expired history restarted -- and
the server pays to plan and run all of it on every call. The statements here do
only the common case's work and say when they did not apply by answering "nothing"
(no row read, no row written); the caller then runs the general statement, whose
answer is final. A true "nothing" (an empty conversation) costs both statements.

PostgreSQL only; each names the conversation id parameter in every table it reads,
so a sharded cluster (Citus) routes it whole to one shard.
"""

from __future__ import annotations

from sqlalchemy import text

from .statements import CONVERSATION_ID, LIMIT, TTL_SECONDS
from .tables import JSONDocument

# The conversation, unexpired, and its current branch -- which has no parent. Read in
# the same statement (one snapshot) as the messages below.
_UNFORKED_CURRENT_BRANCH = """
    c.id = :conversation_id AND (c.expires_at IS NULL OR c.expires_at > now())
    AND NOT EXISTS (
        SELECT FROM conversation_branches b
        WHERE b.conversation_id = :conversation_id
          AND b.branch_id = COALESCE(c.current_branch, 'main')
          AND b.parent_branch_id IS NOT NULL
    )
"""

#: The newest ``:limit`` items of an unforked current branch, oldest first: one
#: backward index scan of the conversation's messages. No row: not the common case,
#: or nothing to read (``POSTGRES_VIEW_LATEST`` answers).
VIEW_LATEST_UNFORKED = (
    text(
        f"""
SELECT latest.item FROM (
    SELECT own.id, own.item FROM conversations c CROSS JOIN LATERAL (
        SELECT m.id, m.item FROM messages m
        WHERE m.conversation_id = :conversation_id
          AND m.branch_id = COALESCE(c.current_branch, 'main')
        ORDER BY m.id DESC LIMIT :limit
    ) own
    WHERE {_UNFORKED_CURRENT_BRANCH}
) latest ORDER BY latest.id
"""
    )
    .bindparams(CONVERSATION_ID, LIMIT)
    .columns(item=JSONDocument)
)

#: Every item of an unforked current branch, oldest first (``POSTGRES_VIEW_ALL``
#: answers when there is none).
VIEW_ALL_UNFORKED = (
    text(
        f"""
SELECT m.item FROM conversations c JOIN messages m
    ON m.conversation_id = :conversation_id
   AND m.branch_id = COALESCE(c.current_branch, 'main')
WHERE {_UNFORKED_CURRENT_BRANCH}
ORDER BY m.id
"""
    )
    .bindparams(CONVERSATION_ID)
    .columns(item=JSONDocument)
)

_LOCK_FOR_POP = """
UPDATE conversations SET updated_at = now()
WHERE id = :conversation_id AND (expires_at IS NULL OR expires_at > now())"""
_CURRENT_BRANCH = """current_branch AS (
    SELECT COALESCE(c.current_branch, 'main') AS id FROM conversations c
    WHERE c.id = :conversation_id AND (c.expires_at IS NULL OR c.expires_at > now())
)"""
_DELETE_NEWEST_UNSHARED = """DELETE FROM messages
WHERE conversation_id = :conversation_id
  AND id = (
    SELECT max(newest.id) FROM current_branch JOIN messages newest
      ON newest.conversation_id = :conversation_id AND newest.branch_id = current_branch.id
  )
  AND NOT EXISTS (
    SELECT FROM current_branch JOIN conversation_branches b
      ON b.conversation_id = :conversation_id
     AND ((b.branch_id = current_branch.id AND b.parent_branch_id IS NOT NULL)
       OR (b.parent_branch_id = current_branch.id
           AND (b.fork_before_id IS NULL OR b.fork_before_id > messages.id)))
  )
RETURNING item"""
_DELETE_UNSHARED = f"WITH {_CURRENT_BRANCH}\n{_DELETE_NEWEST_UNSHARED}"
# With a time-to-live: the expiry moves to now + ttl when (and only when) an item was
# popped, in the same statement (the row is already locked by the pop's UPDATE).
_DELETE_UNSHARED_EXTENDING = f"""WITH {_CURRENT_BRANCH},
popped AS (
{_DELETE_NEWEST_UNSHARED}
),
extended AS (
    UPDATE conversations SET expires_at = now() + make_interval(secs => :ttl_seconds)
    WHERE id = :conversation_id AND EXISTS (SELECT FROM popped)
)
SELECT item FROM popped"""

#: A pop: two statements sent together in one round trip (psycopg2's simple query
#: protocol allows it and answers with the last one's rows; see
#: :func:`agents_sessions.db.statements.execute_together`). The ``UPDATE`` takes (and
#: touches) the conversation's row lock, the one every writer of it takes first. The
#: ``DELETE`` runs after it in the same transaction (an implicit one, on an autocommit
#: connection) with its own snapshot (READ COMMITTED), taken once the lock is held, so
#: it sees every branch operation that committed before -- one statement could not:
#: its snapshot would predate the wait for the lock. It deletes and returns the
#: current branch's newest own row, unless the branch has a parent or a child still
#: shares that row. No row: missing, expired, empty or one of those cases (the
#: branch-aware pop of :mod:`agents_sessions.repositories.branches` answers).
POP_UNSHARED = (
    text(_LOCK_FOR_POP).bindparams(CONVERSATION_ID),
    text(_DELETE_UNSHARED).bindparams(CONVERSATION_ID).columns(item=JSONDocument),
)
#: :data:`POP_UNSHARED` for a session with a time-to-live: the pop also extends the
#: conversation's expiry, as the branch-aware pop does -- only when it pops an item.
POP_UNSHARED_EXTENDING = (
    POP_UNSHARED[0],
    text(_DELETE_UNSHARED_EXTENDING)
    .bindparams(CONVERSATION_ID, TTL_SECONDS)
    .columns(item=JSONDocument),
)
