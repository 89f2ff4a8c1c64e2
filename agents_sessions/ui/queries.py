"""What the explorer's pages read: each page is a fixed, small number of indexed queries.

* the conversation list: one keyset page of ``conversations`` (``ix_conversations_user_id_
  created_at_id`` with a user, ``ix_conversations_created_at`` without), then the item
  counts and token totals of those (at most :data:`PAGE_SIZE`) conversations, one
  grouped query each (``ix_messages_conversation_id_id``, ``ix_usage_logs_conversation_id``);
* a conversation: its row, one keyset page of its items, its item count, its usage per
  model;
* usage: range scans of ``ix_usage_logs_timestamp`` and ``ix_messages_created_at`` over
  the window, plus the seed's monitoring queries (:mod:`agents_sessions.ops.analytics`).

Never ``OFFSET``: a deep page costs what the first one does.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Text,
    bindparam,
    func,
    literal_column,
    select,
    tuple_,
)
from sqlalchemy import cast as sql_cast

from ..db.models import conversations_table as conversations
from ..db.models import messages_table as messages
from ..db.models import stored_utc
from ..db.models import usage_logs_table as usage_logs
from ..errors import InvalidArgumentError
from ..ops import analytics
from ..repositories import ConversationRecord, ConversationRepository, MessageRepository

#: Conversations per page of the list.
PAGE_SIZE = 50
#: Items per page of a transcript.
TRANSCRIPT_PAGE_SIZE = 200
#: Users in the "top users" table of the usage page.
TOP_USERS = 10


# ------------------------------------------------------------------ time on both backends


def _bound_time(connection: Connection, moment: datetime) -> datetime:
    """``moment`` (aware) as the backend compares it with stored timestamps.

    SQLite stores UTC wall-clock text and binds a datetime by its fields, so it gets
    naive UTC; PostgreSQL compares ``timestamptz`` values and gets the aware one.
    """
    moment = moment.astimezone(timezone.utc)
    return moment.replace(tzinfo=None) if connection.dialect.name == "sqlite" else moment


def _start_of_day(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=timezone.utc)


# ------------------------------------------------------------------ the conversation list


@dataclass(frozen=True)
class ConversationFilter:
    """What the conversation list is narrowed to; every field optional.

    Attributes:
        user_id: Only this owner's conversations.
        created_from: Only conversations created on or after this day (UTC).
        created_to: Only conversations created on or before this day (UTC).
    """

    user_id: str | None = None
    created_from: date | None = None
    created_to: date | None = None

    def query_parameters(self) -> dict[str, str]:
        """The filter as the list page's query string (empty fields left out)."""
        parameters = {
            "user": self.user_id,
            "from": self.created_from.isoformat() if self.created_from else None,
            "to": self.created_to.isoformat() if self.created_to else None,
        }
        return {name: value for name, value in parameters.items() if value}


@dataclass(frozen=True)
class ConversationRow:
    """One row of the conversation list."""

    id: str
    user_id: str | None
    created_at: datetime
    last_activity: datetime
    item_count: int
    total_tokens: int


@dataclass(frozen=True)
class ConversationListing:
    """One page of the list; ``next_cursor`` is ``None`` on the last page."""

    rows: list[ConversationRow]
    next_cursor: str | None


def _encode_cursor(created_at: datetime, conversation_id: str) -> str:
    payload = json.dumps([created_at.isoformat(), conversation_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created_at, conversation_id = json.loads(base64.urlsafe_b64decode(padded))
        moment = datetime.fromisoformat(created_at)
        if moment.tzinfo is None or not isinstance(conversation_id, str):
            raise ValueError(cursor)
        return moment, conversation_id
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        raise InvalidArgumentError("after is not a cursor of this list") from None


def list_conversations(
    connection: Connection,
    conversation_filter: ConversationFilter,
    *,
    after: str | None = None,
    limit: int = PAGE_SIZE,
) -> ConversationListing:
    """A page of conversations, newest first by ``(created_at, id)``: three queries.

    Keyset pagination: ``after`` is the previous page's ``next_cursor``. The date
    filter bounds the same range scan (``created_at`` from/before), so it costs nothing.
    """
    query = select(
        conversations.c.id,
        conversations.c.user_id,
        conversations.c.created_at,
        conversations.c.updated_at,
    )
    if conversation_filter.user_id is not None:
        query = query.where(conversations.c.user_id == conversation_filter.user_id)
    if conversation_filter.created_from is not None:
        start = _start_of_day(conversation_filter.created_from)
        query = query.where(conversations.c.created_at >= _bound_time(connection, start))
    if conversation_filter.created_to is not None:
        end = _start_of_day(conversation_filter.created_to + timedelta(days=1))
        query = query.where(conversations.c.created_at < _bound_time(connection, end))
    if after is not None:
        created_at, last_id = _decode_cursor(after)
        query = query.where(
            tuple_(conversations.c.created_at, conversations.c.id)
            < tuple_(
                bindparam(
                    "cursor_created_at",
                    _bound_time(connection, created_at),
                    type_=conversations.c.created_at.type,
                ),
                bindparam("cursor_id", last_id, type_=Text),
            )
        )
    query = query.order_by(conversations.c.created_at.desc(), conversations.c.id.desc())
    found = connection.execute(query.limit(limit + 1)).all()
    page = found[:limit]
    ids = [row.id for row in page]
    counts = analytics.message_counts(connection, ids)
    tokens = token_totals(connection, ids)
    rows = [
        ConversationRow(
            id=row.id,
            user_id=row.user_id,
            created_at=stored_utc(row.created_at),
            last_activity=stored_utc(row.updated_at),
            item_count=counts[row.id],
            total_tokens=tokens[row.id],
        )
        for row in page
    ]
    next_cursor = None
    if len(found) > limit:
        next_cursor = _encode_cursor(rows[-1].created_at, rows[-1].id)
    return ConversationListing(rows=rows, next_cursor=next_cursor)


def token_totals(connection: Connection, conversation_ids: Sequence[str]) -> dict[str, int]:
    """Total tokens recorded for each of ``conversation_ids`` (0 when none): one query."""
    totals = dict.fromkeys(conversation_ids, 0)
    if not totals:
        return totals
    result = connection.execute(
        select(usage_logs.c.conversation_id, func.sum(usage_logs.c.total_tokens))
        .where(usage_logs.c.conversation_id.in_(list(totals)))
        .group_by(usage_logs.c.conversation_id)
    )
    for conversation_id, total in result:
        totals[conversation_id] = int(total or 0)
    return totals


# ------------------------------------------------------------------ one conversation


@dataclass(frozen=True)
class StoredDocument:
    """One stored item: its row id, when it was written, and its JSON text as stored."""

    id: int
    created_at: datetime
    document: str


@dataclass(frozen=True)
class ModelUsage:
    """A conversation's usage of one model."""

    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class ConversationView:
    """What the conversation page shows (before panels add theirs).

    Attributes:
        documents: One page of items, oldest first.
        next_after: The last item id of this page when more items follow, else ``None``.
    """

    conversation: ConversationRecord
    item_count: int
    documents: list[StoredDocument]
    next_after: int | None


# The stored text, not the driver's parse of it: PostgreSQL's `json::text` is the
# document verbatim, which is what "the exact stored JSON" must show.
_DOCUMENTS_OF = select(
    messages.c.id,
    messages.c.created_at,
    sql_cast(messages.c.item, Text).label("document"),
).where(messages.c.conversation_id == bindparam("conversation_id"))


def read_conversation(
    connection: Connection,
    conversation_id: str,
    *,
    after_id: int | None = None,
    limit: int = TRANSCRIPT_PAGE_SIZE,
) -> ConversationView | None:
    """The conversation and one page of its items; ``None`` if it does not exist.

    Three queries: the row, ``limit + 1`` items after ``after_id`` in history order,
    the item count. (The page's panels read the rest: usage per model, ...)
    """
    conversation = ConversationRepository(connection).get(conversation_id)
    if conversation is None:
        return None
    query = _DOCUMENTS_OF
    if after_id is not None:
        query = query.where(messages.c.id > after_id)
    rows = connection.execute(
        query.order_by(messages.c.id).limit(limit + 1), {"conversation_id": conversation_id}
    ).all()
    documents = [
        StoredDocument(id=row.id, created_at=stored_utc(row.created_at), document=row.document)
        for row in rows[:limit]
    ]
    return ConversationView(
        conversation=conversation,
        item_count=MessageRepository(connection).count(conversation_id),
        documents=documents,
        next_after=documents[-1].id if len(rows) > limit else None,
    )


def usage_by_model(connection: Connection, conversation_id: str) -> list[ModelUsage]:
    """One conversation's usage per model, most tokens first."""
    total = func.sum(usage_logs.c.total_tokens)
    result = connection.execute(
        select(
            usage_logs.c.model,
            func.sum(usage_logs.c.requests),
            func.sum(usage_logs.c.prompt_tokens),
            func.sum(usage_logs.c.completion_tokens),
            total,
        )
        .where(usage_logs.c.conversation_id == conversation_id)
        .group_by(usage_logs.c.model)
        .order_by(total.desc(), usage_logs.c.model)
    )
    return [
        ModelUsage(model, int(requests), int(prompt), int(completion), int(tokens))
        for model, requests, prompt, completion, tokens in result
    ]


# ------------------------------------------------------------------ usage over a window


@dataclass(frozen=True)
class Window:
    """A selectable window of the usage page, and the bucket its charts count by."""

    key: str
    label: str
    length: timedelta
    bucket: str  # "hour" or "day"

    @property
    def bucket_length(self) -> timedelta:
        return timedelta(hours=1) if self.bucket == "hour" else timedelta(days=1)


WINDOWS = {
    window.key: window
    for window in (
        Window("24h", "24 hours", timedelta(hours=24), "hour"),
        Window("7d", "7 days", timedelta(days=7), "day"),
        Window("30d", "30 days", timedelta(days=30), "day"),
    )
}
DEFAULT_WINDOW = "7d"


@dataclass(frozen=True)
class UserUsage:
    """A user's usage within the window (``user_id=None``: conversations without one)."""

    user_id: str | None
    conversations: int
    requests: int
    total_tokens: int


@dataclass(frozen=True)
class UsageOverview:
    """Everything the usage page shows for one window.

    Attributes:
        as_of: The moment the window ends (when it was read).
        buckets: The start of every bucket of the window, oldest first (UTC).
        tokens: ``(bucket start, model) -> total tokens``.
        active: ``bucket start -> conversations with an item written in it``.
    """

    window: Window
    as_of: datetime
    buckets: list[datetime]
    tokens: dict[tuple[datetime, str], int]
    active: dict[datetime, int]
    top_users: list[UserUsage]
    statistics: analytics.StoreStatistics


_BUCKET_FORMATS = {"hour": "%Y-%m-%d %H:00:00", "day": "%Y-%m-%d 00:00:00"}


def _bucket(connection: Connection, column: Any, bucket: str) -> ColumnElement[Any]:
    """The start of ``column``'s bucket (UTC), as a naive timestamp or its text."""
    if connection.dialect.name == "postgresql":
        # The unit is one of two constants, spelled into the SQL so that the
        # GROUP BY expression is the very same as the selected one.
        unit: ColumnElement[str] = literal_column(f"'{bucket}'")
        return func.date_trunc(unit, func.timezone("UTC", column))
    return func.strftime(literal_column(f"'{_BUCKET_FORMATS[bucket]}'"), column)


def _bucket_start(value: Any) -> datetime:
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return moment.replace(tzinfo=timezone.utc)


def window_buckets(window: Window, now: datetime) -> list[datetime]:
    """The start of every bucket from the one holding ``now - window`` to ``now``'s."""
    step = window.bucket_length
    start = now - window.length
    first = (
        start.replace(minute=0, second=0, microsecond=0)
        if window.bucket == "hour"
        else start.replace(hour=0, minute=0, second=0, microsecond=0)
    )
    buckets = []
    moment = first
    while moment <= now:
        buckets.append(moment)
        moment += step
    return buckets


def usage_overview(connection: Connection, window: Window, *, now: datetime) -> UsageOverview:
    """Tokens per model and active conversations per bucket, top users, seed numbers.

    Seven queries: three over the window's range of the timestamp indexes, the
    seed's four (:func:`analytics.collect_statistics`).
    """
    since = _bound_time(connection, now - window.length)
    token_bucket = _bucket(connection, usage_logs.c.timestamp, window.bucket).label("bucket")
    tokens: dict[tuple[datetime, str], int] = {}
    for bucket, model, total in connection.execute(
        select(token_bucket, usage_logs.c.model, func.sum(usage_logs.c.total_tokens))
        .where(usage_logs.c.timestamp >= since)
        .group_by(token_bucket, usage_logs.c.model)
    ):
        tokens[(_bucket_start(bucket), model)] = int(total or 0)

    # "Active" = an item was written in the bucket: from the messages themselves, so
    # a conversation active on several days counts on each of them. DISTINCT pairs
    # first, then a count per bucket: a hash aggregate, where count(DISTINCT ...)
    # would sort every message of the window.
    message_bucket = _bucket(connection, messages.c.created_at, window.bucket).label("bucket")
    pairs = (
        select(message_bucket, messages.c.conversation_id)
        .where(messages.c.created_at >= since)
        .distinct()
        .subquery()
    )
    active = {
        _bucket_start(bucket): int(count)
        for bucket, count in connection.execute(
            select(pairs.c.bucket, func.count()).group_by(pairs.c.bucket)
        )
    }

    # Usage per conversation first (the window's rows, one pass), then per owner: the
    # join then meets one row per conversation instead of one per request.
    per_conversation = (
        select(
            usage_logs.c.conversation_id,
            func.sum(usage_logs.c.requests).label("requests"),
            func.sum(usage_logs.c.total_tokens).label("tokens"),
        )
        .where(usage_logs.c.timestamp >= since)
        .group_by(usage_logs.c.conversation_id)
        .subquery()
    )
    total = func.sum(per_conversation.c.tokens)
    top_users = [
        UserUsage(user_id, int(conversation_count), int(requests or 0), int(tokens_used or 0))
        for user_id, conversation_count, requests, tokens_used in connection.execute(
            select(
                conversations.c.user_id,
                func.count(),
                func.sum(per_conversation.c.requests),
                total,
            )
            .select_from(
                per_conversation.join(
                    conversations, conversations.c.id == per_conversation.c.conversation_id
                )
            )
            .group_by(conversations.c.user_id)
            .order_by(total.desc(), conversations.c.user_id)
            .limit(TOP_USERS)
        )
    ]
    return UsageOverview(
        window=window,
        as_of=now,
        buckets=window_buckets(window, now),
        tokens=tokens,
        active=active,
        top_users=top_users,
        statistics=analytics.collect_statistics(
            connection, window=window.length, top_users=TOP_USERS
        ),
    )
