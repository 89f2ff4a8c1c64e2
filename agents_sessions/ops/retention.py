"""Deleting data on purpose: a user's erasure request, and retention by age.

* :func:`erase_user` -- everything one user has (conversations, their messages and
  usage rows), in one transaction: all of it goes, or nothing does. Other users'
  rows and conversations without an owner are never touched.
* :func:`prune` -- conversations not updated for a given time, deleted in bounded
  batches, each its own short transaction, while the application keeps writing.

The idempotency keys of appends past their retention go with
:mod:`agents_sessions.ops.append_key_retention`.

Why prune works in batches: a conversation's messages and usage rows cascade from
its row (``ON DELETE CASCADE``), but deleting a 100,000-message conversation in
one statement is one long transaction (on SQLite it holds the database's only
write lock throughout). So each batch deletes at most ``batch_size`` message rows,
then the rows of the conversations it emptied.

Why prune is safe next to a live application: every batch locks the conversation
rows it works on first (``FOR UPDATE SKIP LOCKED`` on PostgreSQL; SQLite's write
lock), re-checking their age under that lock, before touching any message. The
session's writers lock the conversation row before its messages too, so a
conversation being written is skipped rather than waited for, and a conversation
that received an item since the prune began has a fresh ``updated_at`` and is
left alone. Within a batch, messages go oldest first, conversation by
conversation; only a conversation longer than one batch can be caught half-way,
and it then keeps its newest messages (reported as ``interrupted``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Connection, and_, delete, exists, func, select, update

from ..db.models import conversations_table, messages_table, usage_logs_table
from ..errors import InvalidArgumentError
from ..store import SessionStore
from ..validation import validate_batch_size, validate_identifier
from .citus import is_distributed
from .tenancy import require_unfiltered_access

conversations = conversations_table
messages = messages_table
usage_logs = usage_logs_table

#: Default number of message rows deleted per prune transaction.
DEFAULT_PRUNE_BATCH_SIZE = 1000
#: At most this many conversation rows are locked by one prune transaction.
MAX_CONVERSATIONS_PER_BATCH = 1000
#: How many interrupted conversation ids a prune summary lists (the count is exact).
MAX_LISTED_IDS = 100

Progress = Callable[[int], None]


@dataclass(frozen=True)
class DeletionCounts:
    """Rows deleted (or that would be deleted), per table."""

    conversations: int
    messages: int
    usage_rows: int

    def as_dict(self) -> dict[str, Any]:
        """The counts as JSON-ready data."""
        return asdict(self)


@dataclass
class PruneSummary:
    """What a prune deleted (or, with ``dry_run``, would delete).

    Attributes:
        cutoff: Conversations last updated before this instant (UTC) were old.
        batches: Transactions that deleted something (0 on a dry run).
        largest_batch: The most message rows one transaction deleted
            (never more than the batch size).
        interrupted: Conversations whose messages were partly deleted and that then
            received new items (or were locked by a writer), so were kept.
        interrupted_ids: Up to :data:`MAX_LISTED_IDS` of their ids.
    """

    cutoff: datetime
    dry_run: bool
    batch_size: int
    conversations: int = 0
    messages: int = 0
    usage_rows: int = 0
    batches: int = 0
    largest_batch: int = 0
    interrupted: int = 0
    interrupted_ids: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The summary as JSON-ready data (the cutoff in ISO 8601)."""
        data = asdict(self)
        data["cutoff"] = self.cutoff.isoformat()
        return data


# --------------------------------------------------------------------------------------
# Erasure
# --------------------------------------------------------------------------------------


def _owned_by(user_id: str) -> Any:
    return select(conversations.c.id).where(conversations.c.user_id == user_id)


def _counts_for(connection: Connection, conversation_ids: Any) -> DeletionCounts:
    count = func.count()
    return DeletionCounts(
        conversations=int(
            connection.execute(select(count).select_from(conversation_ids.subquery())).scalar_one()
        ),
        messages=int(
            connection.execute(
                select(count).where(messages.c.conversation_id.in_(conversation_ids))
            ).scalar_one()
        ),
        usage_rows=int(
            connection.execute(
                select(count).where(usage_logs.c.conversation_id.in_(conversation_ids))
            ).scalar_one()
        ),
    )


def user_data_counts(store: SessionStore, user_id: str) -> DeletionCounts:
    """How many rows :func:`erase_user` would delete for ``user_id`` right now."""
    validate_identifier(user_id, name="user_id")
    with store.read() as repos:
        require_unfiltered_access(repos.connection, f"erasing user {user_id!r}")
        return _counts_for(repos.connection, _owned_by(user_id))


def erase_user(store: SessionStore, user_id: str) -> DeletionCounts:
    """Delete every conversation of ``user_id`` with its messages and usage rows.

    One transaction: on any failure nothing is deleted. Returns what was deleted.
    Conversations of other users, and those without an owner, are not touched.

    Raises:
        RowLevelSecurityFilteredError: the store's role is filtered by row-level
            security, so the user's rows are invisible to it; nothing is deleted.
    """
    validate_identifier(user_id, name="user_id")
    owned = _owned_by(user_id)
    with store.transaction() as repos:
        connection = repos.connection
        # Under row-level security a filtered role would delete nothing and count it
        # as success: refuse before touching anything.
        require_unfiltered_access(connection, f"erasing user {user_id!r}")
        # Lock the user's conversation rows before any message row: the order every
        # writer follows, so an append racing the erasure waits for it instead of
        # deadlocking with it. (SQLite: BEGIN IMMEDIATE already holds the write lock.)
        # The lock is taken by an UPDATE that changes nothing, not SELECT ... FOR
        # UPDATE: a sharded cluster (Citus) refuses FOR UPDATE across shards but
        # runs a multi-shard UPDATE; the row versions it leaves are deleted below.
        connection.execute(
            update(conversations)
            .where(conversations.c.user_id == user_id)
            .values(user_id=conversations.c.user_id)
        )
        deleted_messages = connection.execute(
            delete(messages).where(messages.c.conversation_id.in_(owned))
        ).rowcount
        deleted_usage = connection.execute(
            delete(usage_logs).where(usage_logs.c.conversation_id.in_(owned))
        ).rowcount
        # By owner, not by the ids locked above: a conversation the user started a
        # moment ago goes too (its rows, if any, by cascade).
        deleted_conversations = connection.execute(
            delete(conversations).where(conversations.c.user_id == user_id)
        ).rowcount
    return DeletionCounts(
        conversations=int(deleted_conversations or 0),
        messages=int(deleted_messages or 0),
        usage_rows=int(deleted_usage or 0),
    )


# --------------------------------------------------------------------------------------
# Retention by age
# --------------------------------------------------------------------------------------


def prune_cutoff(older_than: timedelta, *, now: datetime | None = None) -> datetime:
    """The instant before which a conversation's last update makes it old (UTC)."""
    if not isinstance(older_than, timedelta) or older_than <= timedelta(0):
        raise InvalidArgumentError("older_than must be a positive timedelta")
    current = now or datetime.now(timezone.utc)
    if current.tzinfo is None:
        current = current.replace(tzinfo=timezone.utc)
    return current.astimezone(timezone.utc) - older_than


def _old(cutoff: datetime) -> Any:
    return conversations.c.updated_at < cutoff


def prune_plan(
    store: SessionStore,
    older_than: timedelta,
    *,
    batch_size: int = DEFAULT_PRUNE_BATCH_SIZE,
    now: datetime | None = None,
) -> PruneSummary:
    """What :func:`prune` would delete now: a dry run (reads only, deletes nothing)."""
    size = validate_batch_size(batch_size)
    cutoff = prune_cutoff(older_than, now=now)
    old_ids = select(conversations.c.id).where(_old(cutoff))
    with store.read() as repos:
        require_unfiltered_access(repos.connection, "prune")
        counts = _counts_for(repos.connection, old_ids)
    return PruneSummary(
        cutoff=cutoff,
        dry_run=True,
        batch_size=size,
        conversations=counts.conversations,
        messages=counts.messages,
        usage_rows=counts.usage_rows,
    )


@dataclass(frozen=True)
class _BatchResult:
    locked: list[str]
    touched: set[str]
    messages: int
    usage_rows: int
    deleted: list[str]


def _prune_batch(
    connection: Connection, deletable: Any, after: tuple[str, bool] | None, batch_size: int
) -> _BatchResult:
    """One prune transaction's work (the caller commits).

    ``deletable`` is the condition that makes a conversation deletable (too old, or
    expired): a SQL expression over ``conversations``, re-checked under the lock.
    """
    # 1. The next old conversations in id order, locked, their age re-checked under
    #    the lock (READ COMMITTED re-evaluates the WHERE on the newest row version).
    #    SKIP LOCKED: a conversation a writer holds right now is skipped, not waited
    #    for -- it is being written, so it is not old anyway.
    candidates = select(conversations.c.id).where(deletable)
    if after is not None:
        start, inclusive = after
        candidates = candidates.where(
            conversations.c.id >= start if inclusive else conversations.c.id > start
        )
    candidates = candidates.order_by(conversations.c.id).limit(
        min(batch_size, MAX_CONVERSATIONS_PER_BATCH)
    )
    if is_distributed(connection):
        locked = _lock_one_by_one(
            connection, list(connection.execute(candidates).scalars()), deletable
        )
    else:
        locked = list(connection.execute(candidates.with_for_update(skip_locked=True)).scalars())
    if not locked:
        return _BatchResult(locked, set(), 0, 0, [])
    # Every statement below repeats the age condition: it is what makes a row
    # deletable, so it is checked where the row is deleted.
    still_old = select(conversations.c.id).where(conversations.c.id.in_(locked), deletable)
    # 2. At most batch_size messages of those conversations, conversation by
    #    conversation and oldest first, so only the last one can be left half-done.
    doomed = (
        select(messages.c.id)
        .where(messages.c.conversation_id.in_(still_old))
        .order_by(messages.c.conversation_id, messages.c.id)
        .limit(batch_size)
    )
    touched = list(
        connection.execute(
            delete(messages)
            # conversation_id too: a sharded cluster then visits only their shards.
            .where(messages.c.conversation_id.in_(locked), messages.c.id.in_(doomed))
            .returning(messages.c.conversation_id)
        ).scalars()
    )
    # 3. The conversations this left empty: their usage rows, then their rows.
    emptied = and_(
        conversations.c.id.in_(locked),
        deletable,
        ~exists().where(messages.c.conversation_id == conversations.c.id),
    )
    usage_rows = connection.execute(
        delete(usage_logs).where(
            usage_logs.c.conversation_id.in_(select(conversations.c.id).where(emptied))
        )
    ).rowcount
    deleted = list(
        connection.execute(
            delete(conversations).where(emptied).returning(conversations.c.id)
        ).scalars()
    )
    return _BatchResult(locked, set(touched), len(touched), int(usage_rows or 0), deleted)


def _lock_one_by_one(connection: Connection, candidates: list[str], deletable: Any) -> list[str]:
    """Lock ``candidates`` (still deletable, not held by a writer) one conversation at a time.

    On a sharded cluster (Citus) ``FOR UPDATE`` must stay on one shard, so the
    batch's rows are locked by one single-shard statement each, in id order, with
    the same SKIP LOCKED and age re-check as the one-statement form.
    """
    locked = []
    for conversation_id in candidates:
        row = connection.execute(
            select(conversations.c.id)
            .where(conversations.c.id == conversation_id, deletable)
            .with_for_update(skip_locked=True)
        ).scalar_one_or_none()
        if row is not None:
            locked.append(row)
    return locked


def prune(
    store: SessionStore,
    older_than: timedelta,
    *,
    batch_size: int = DEFAULT_PRUNE_BATCH_SIZE,
    dry_run: bool = False,
    progress: Progress | None = None,
    now: datetime | None = None,
) -> PruneSummary:
    """Delete the conversations not updated for ``older_than``, in bounded batches.

    Each transaction deletes at most ``batch_size`` message rows (and the usage and
    conversation rows of the conversations it emptied), so no lock is held long;
    see the module docstring for why this is safe while the application writes.
    ``dry_run`` returns :func:`prune_plan` instead and deletes nothing.
    ``progress(n)`` is called after each transaction with the messages it deleted.

    Raises:
        RowLevelSecurityFilteredError: the store's role is filtered by row-level
            security (it would see no old conversations); nothing is deleted.
    """
    if dry_run:
        return prune_plan(store, older_than, batch_size=batch_size, now=now)
    size = validate_batch_size(batch_size)
    with store.read() as repos:
        require_unfiltered_access(repos.connection, "prune")
    summary = PruneSummary(cutoff=prune_cutoff(older_than, now=now), dry_run=False, batch_size=size)
    return _prune_in_batches(store, _old(summary.cutoff), summary, progress)


def _prune_in_batches(
    store: SessionStore, deletable: Any, summary: PruneSummary, progress: Progress | None
) -> PruneSummary:
    """Delete the conversations matching ``deletable`` in batches of ``summary.batch_size``."""
    size = summary.batch_size
    # Conversations partly deleted and not yet finished. Normally at most one (the
    # last of a batch); more only when the app wrote to one of them in between.
    unfinished: set[str] = set()
    after: tuple[str, bool] | None = None  # (id, inclusive): where the next batch starts
    while True:
        with store.transaction() as repos:
            batch = _prune_batch(repos.connection, deletable, after, size)
        if not batch.locked:
            break
        unfinished |= batch.touched
        unfinished -= set(batch.deleted)
        # Keyset: every locked id before the first one still standing is deleted,
        # so the next batch starts there and never rescans what is gone or skipped.
        deleted = set(batch.deleted)
        remaining = [cid for cid in batch.locked if cid not in deleted]
        after = (remaining[0], True) if remaining else (batch.locked[-1], False)
        summary.batches += 1
        summary.messages += batch.messages
        summary.usage_rows += batch.usage_rows
        summary.conversations += len(batch.deleted)
        summary.largest_batch = max(summary.largest_batch, batch.messages)
        if progress is not None:
            progress(batch.messages)
    summary.interrupted = len(unfinished)
    summary.interrupted_ids = sorted(unfinished)[:MAX_LISTED_IDS]
    return summary


# --------------------------------------------------------------------------------------
# Retention by time-to-live (conversations.expires_at; see agents_sessions.expiry)
# --------------------------------------------------------------------------------------


def _expired(now: datetime) -> Any:
    return conversations.c.expires_at <= now


def prune_expired(
    store: SessionStore,
    *,
    batch_size: int = DEFAULT_PRUNE_BATCH_SIZE,
    dry_run: bool = False,
    progress: Progress | None = None,
    now: datetime | None = None,
) -> PruneSummary:
    """Delete the conversations whose time-to-live has passed, in bounded batches.

    The same batches, locks and guarantees as :func:`prune`: a conversation that is
    written meanwhile gets a new expiry and is kept. Expired conversations already
    read as empty; this reclaims their space (paused runs go by cascade).
    ``summary.cutoff`` is the instant expiry was judged against.
    """
    size = validate_batch_size(batch_size)
    instant = now or datetime.now(timezone.utc)
    if instant.tzinfo is None:
        instant = instant.replace(tzinfo=timezone.utc)
    summary = PruneSummary(cutoff=instant, dry_run=dry_run, batch_size=size)
    if dry_run:
        with store.read() as repos:
            counts = _counts_for(
                repos.connection, select(conversations.c.id).where(_expired(instant))
            )
        summary.conversations = counts.conversations
        summary.messages = counts.messages
        summary.usage_rows = counts.usage_rows
        return summary
    return _prune_in_batches(store, _expired(instant), summary, progress)


@dataclass
class TrimSummary:
    """What :func:`trim_turns` deleted: messages before each conversation's last turns."""

    keep_last_turns: int
    conversations_trimmed: int = 0
    messages: int = 0
    batches: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The summary as JSON-ready data."""
        return asdict(self)


def trim_turns(
    store: SessionStore,
    keep_last_turns: int,
    *,
    batch_size: int = MAX_CONVERSATIONS_PER_BATCH,
    progress: Progress | None = None,
) -> TrimSummary:
    """Keep only the newest ``keep_last_turns`` turns of every conversation.

    Conversations are visited in id order, ``batch_size`` per short transaction; a
    turn starts at a user message (as for a session's ``keep_last_turns``).
    """
    if not isinstance(keep_last_turns, int) or keep_last_turns < 1:
        raise InvalidArgumentError("keep_last_turns must be a positive int")
    size = validate_batch_size(batch_size)
    summary = TrimSummary(keep_last_turns=keep_last_turns)
    last: str | None = None
    while True:
        query = select(conversations.c.id).order_by(conversations.c.id).limit(size)
        if last is not None:
            query = query.where(conversations.c.id > last)
        with store.transaction() as repos:
            ids = list(repos.connection.execute(query).scalars())
            deleted = 0
            for conversation_id in ids:
                trimmed = repos.messages.trim_to_last_turns(conversation_id, keep_last_turns)
                deleted += trimmed
                summary.conversations_trimmed += 1 if trimmed else 0
        if not ids:
            return summary
        summary.batches += 1
        summary.messages += deleted
        if progress is not None:
            progress(deleted)
        last = ids[-1]
