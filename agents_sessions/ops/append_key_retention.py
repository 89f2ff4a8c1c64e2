"""Append keys past their retention, in every conversation (``prune --append-keys``).

Each ``add_items`` call's idempotency key is kept in ``append_keys`` at least
``APPEND_KEY_RETENTION``, so that a call repeated with its key is stored once. A
session deletes a conversation's older keys only as it writes to that conversation
again, so a conversation no longer written keeps its last keys until it is deleted;
:func:`prune_append_keys` reclaims them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, tuple_

from ..db.models import append_keys_table
from ..db.statements import APPEND_KEY_RETENTION
from ..store import SessionStore
from ..validation import validate_batch_size
from .retention import DEFAULT_PRUNE_BATCH_SIZE, Progress, prune_cutoff
from .tenancy import require_unfiltered_access

append_keys = append_keys_table


@dataclass
class AppendKeyPruneSummary:
    """What :func:`prune_append_keys` deleted (or, with ``dry_run``, would delete).

    Attributes:
        cutoff: Keys created before this instant (UTC) were past their retention.
        keys: Keys deleted (or that would be).
        batches: Transactions that deleted something (0 on a dry run).
    """

    cutoff: datetime
    dry_run: bool
    batch_size: int
    keys: int = 0
    batches: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The summary as JSON-ready data (the cutoff in ISO 8601)."""
        data = asdict(self)
        data["cutoff"] = self.cutoff.isoformat()
        return data


def prune_append_keys(
    store: SessionStore,
    *,
    batch_size: int = DEFAULT_PRUNE_BATCH_SIZE,
    dry_run: bool = False,
    progress: Progress | None = None,
    now: datetime | None = None,
) -> AppendKeyPruneSummary:
    """Delete every conversation's append keys older than ``APPEND_KEY_RETENTION``.

    Keys go in batches of at most ``batch_size``, each its own short transaction, in key
    order. Safe next to the live app: an append only ever claims a new key, and a key
    is deleted here only past the same retention the session's own clean-up applies
    (re-checked in the delete). ``progress(n)`` is called after each transaction with
    the keys it deleted.

    Raises:
        RowLevelSecurityFilteredError: the store's role is filtered by row-level
            security (it would see no one else's keys); nothing is deleted.
    """
    size = validate_batch_size(batch_size)
    cutoff = prune_cutoff(APPEND_KEY_RETENTION, now=now)
    summary = AppendKeyPruneSummary(cutoff=cutoff, dry_run=dry_run, batch_size=size)
    old = append_keys.c.created_at < cutoff
    with store.read() as repos:
        require_unfiltered_access(repos.connection, "prune")
        if dry_run:
            counted = select(func.count()).select_from(append_keys).where(old)
            summary.keys = int(repos.connection.execute(counted).scalar_one())
            return summary
    key = tuple_(append_keys.c.conversation_id, append_keys.c.key)
    after: tuple[str, str] | None = None  # keyset: the last key of the previous batch
    while True:
        batch = (
            select(append_keys.c.conversation_id, append_keys.c.key)
            .where(old)
            .order_by(append_keys.c.conversation_id, append_keys.c.key)
            .limit(size)
        )
        if after is not None:
            batch = batch.where(key > tuple_(*after))
        with store.transaction() as repos:
            found = [tuple(row) for row in repos.connection.execute(batch)]
            if not found:
                return summary
            # A plain list of keys (no subquery): a sharded cluster runs it on each
            # shard as it is. The age is checked again on the rows as deleted.
            deleted = repos.connection.execute(
                delete(append_keys).where(key.in_(found), old)
            ).rowcount
        after = (str(found[-1][0]), str(found[-1][1]))
        summary.batches += 1
        summary.keys += deleted
        if progress is not None:
            progress(deleted)
