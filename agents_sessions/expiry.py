"""Conversations that expire (time-to-live) and histories trimmed to their last turns.

(Deleting data on purpose -- erasure, pruning -- is :mod:`agents_sessions.ops.retention`.)

A session with ``ttl=timedelta(days=30)`` (or the setting ``AGENTS_SESSIONS_TTL=30d``)
stores ``conversations.expires_at = now + ttl`` with every ``add_items`` and
``pop_item``. From that instant on the conversation is expired, whether or not
anything has deleted it yet:

* reads (``get_items``, ``pop_item``, search, paused runs) treat it as empty --
  inside the same single statement on PostgreSQL, one primary-key probe of
  ``conversations``, so the hot path stays one round trip;
* the next ``add_items`` starts it afresh: in the same statement (PostgreSQL) or
  transaction (SQLite), after the conversation row is locked, its old messages and
  paused run are deleted, then the new items are stored with a new expiry;
* ``agents-sessions prune --expired`` deletes expired conversations for good, in
  short batches (:func:`agents_sessions.ops.retention.prune_expired`).

Other writers (usage records, paused-run saves, the repository API) never extend
or restart an expired conversation: only an append restarts one, because only it
clears the expired history first.

``keep_last_turns=N`` trims after each ``add_items``: what precedes the N newest
user messages is deleted (one extra statement, only for sessions that ask).
"""

from __future__ import annotations

from datetime import timedelta

from .errors import InvalidArgumentError


def retention_options(
    ttl: timedelta | None, keep_last_turns: int | None, *, default_ttl: timedelta | None
) -> tuple[timedelta | None, int | None]:
    """A session's validated ``ttl`` (defaulting to the setting) and ``keep_last_turns``."""
    if ttl is None:
        ttl = default_ttl
    elif not isinstance(ttl, timedelta) or ttl < timedelta(seconds=1):
        raise InvalidArgumentError("ttl must be a timedelta of at least one second, or None")
    if keep_last_turns is not None and (
        not isinstance(keep_last_turns, int)
        or isinstance(keep_last_turns, bool)
        or keep_last_turns < 1
    ):
        raise InvalidArgumentError("keep_last_turns must be a positive int, or None")
    return ttl, keep_last_turns
