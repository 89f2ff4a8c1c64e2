"""The seed's monitoring SQL, verbatim, and functions that answer the same questions.

These are the queries operators already have in their dashboards; the schema keeps
them valid (``conversations.updated_at``, ``messages.conversation_id``,
``usage_logs.model/prompt_tokens/completion_tokens``) and indexed. They are
PostgreSQL SQL (``NOW() - INTERVAL``).

The functions below (:func:`collect_statistics` and its parts, used by
``agents-sessions stats``) run the seed SQL on PostgreSQL -- with the activity
window and the number of users as bound parameters where the seed hard-codes
them -- and portable SQLAlchemy Core equivalents on SQLite, so the same numbers
come out of the embedded default. The repository API has more per-model and
per-user token totals (:class:`~agents_sessions.repositories.UsageRepository`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Connection, Integer, Interval, bindparam, func, select, text

from ..db.models import conversations_table, messages_table, usage_logs_table
from ..errors import InvalidArgumentError
from ..validation import validate_count

TOTAL_CONVERSATIONS = "SELECT COUNT(*) FROM conversations;"

ACTIVE_CONVERSATIONS_LAST_24_HOURS = (
    "SELECT COUNT(*) FROM conversations WHERE updated_at > NOW() - INTERVAL '24 hours';"
)

TOP_USERS_BY_MESSAGE_COUNT = """\
SELECT c.user_id, COUNT(m.id) as message_count
FROM conversations c
JOIN messages m ON c.id = m.conversation_id
GROUP BY c.user_id
ORDER BY message_count DESC
LIMIT 10;"""

TOKEN_USAGE_BY_MODEL = """\
SELECT model,
       SUM(prompt_tokens) as total_prompt_tokens,
       SUM(completion_tokens) as total_completion_tokens
FROM usage_logs
GROUP BY model;"""

SEED_QUERIES = {
    "total_conversations": TOTAL_CONVERSATIONS,
    "active_conversations_24h": ACTIVE_CONVERSATIONS_LAST_24_HOURS,
    "top_users_by_message_count": TOP_USERS_BY_MESSAGE_COUNT,
    "token_usage_by_model": TOKEN_USAGE_BY_MODEL,
}


def run_seed_queries(connection: Connection) -> dict[str, list[dict[str, Any]]]:
    """Run every seed query on a PostgreSQL connection; rows as dicts, by query name."""
    return {
        name: [dict(row._mapping) for row in connection.execute(text(sql))]
        for name, sql in SEED_QUERIES.items()
    }


# The seed queries with what they hard-code (24 hours, 10 users) as bound parameters:
# values never reach SQL text.
ACTIVE_CONVERSATIONS_WITHIN = (
    "SELECT COUNT(*) FROM conversations WHERE updated_at > NOW() - :window;"
)

TOP_USERS_BY_MESSAGE_COUNT_LIMIT = """\
SELECT c.user_id, COUNT(m.id) as message_count
FROM conversations c
JOIN messages m ON c.id = m.conversation_id
GROUP BY c.user_id
ORDER BY message_count DESC
LIMIT :limit;"""

_ACTIVE_WITHIN = text(ACTIVE_CONVERSATIONS_WITHIN).bindparams(bindparam("window", type_=Interval()))
_TOP_USERS_LIMIT = text(TOP_USERS_BY_MESSAGE_COUNT_LIMIT).bindparams(
    bindparam("limit", type_=Integer())
)

_conversations = conversations_table
_messages = messages_table
_usage_logs = usage_logs_table


@dataclass(frozen=True)
class UserMessageCount:
    """How many messages a user's conversations hold (``user_id=None``: no owner)."""

    user_id: str | None
    message_count: int


@dataclass(frozen=True)
class ModelTokenUsage:
    """Prompt and completion tokens recorded for one model."""

    model: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class StoreStatistics:
    """The seed's four monitoring numbers, as :func:`collect_statistics` returns them.

    Attributes:
        total_conversations: Every conversation stored.
        active_conversations: Conversations changed within ``active_window``.
        active_window: The window ``active_conversations`` counts over.
        top_users: Users by message count, most first.
        token_usage_by_model: Token sums per model, by model name.
    """

    total_conversations: int
    active_conversations: int
    active_window: timedelta
    top_users: list[UserMessageCount]
    token_usage_by_model: list[ModelTokenUsage]


def _is_postgresql(connection: Connection) -> bool:
    return connection.dialect.name == "postgresql"


def total_conversations(connection: Connection) -> int:
    """How many conversations are stored (the seed's ``total_conversations``)."""
    if _is_postgresql(connection):
        return int(connection.execute(text(TOTAL_CONVERSATIONS)).scalar_one())
    query = select(func.count()).select_from(_conversations)
    return int(connection.execute(query).scalar_one())


def active_conversations(connection: Connection, *, window: timedelta = timedelta(hours=24)) -> int:
    """Conversations whose ``updated_at`` lies within ``window`` of now.

    The seed's ``active_conversations_24h`` with the window as a parameter; served by
    ``ix_conversations_updated_at``.

    Raises:
        InvalidArgumentError: ``window`` is not a positive ``timedelta``.
    """
    if not isinstance(window, timedelta) or window <= timedelta(0):
        raise InvalidArgumentError(f"window must be a positive timedelta, got {window!r}")
    if _is_postgresql(connection):
        return int(connection.execute(_ACTIVE_WITHIN, {"window": window}).scalar_one())
    # SQLite stores UTC wall-clock text and binds a datetime by its fields, so the
    # cutoff is computed here, in UTC.
    cutoff = datetime.now(timezone.utc).replace(tzinfo=None) - window
    query = select(func.count()).where(_conversations.c.updated_at > cutoff)
    return int(connection.execute(query).scalar_one())


def top_users_by_message_count(
    connection: Connection, *, limit: int = 10
) -> list[UserMessageCount]:
    """Conversation owners by how many messages their conversations hold, most first.

    The seed's ``top_users_by_message_count`` with ``limit`` as a parameter. Users
    with equal counts come in no particular order; conversations without an owner
    are counted together under ``user_id=None``.

    Raises:
        InvalidArgumentError: ``limit`` is not a positive int.
    """
    if validate_count(limit, name="limit") == 0:
        raise InvalidArgumentError("limit must be a positive int")
    if _is_postgresql(connection):
        result = connection.execute(_TOP_USERS_LIMIT, {"limit": limit})
    else:
        message_count = func.count(_messages.c.id).label("message_count")
        result = connection.execute(
            select(_conversations.c.user_id, message_count)
            .select_from(
                _conversations.join(_messages, _conversations.c.id == _messages.c.conversation_id)
            )
            .group_by(_conversations.c.user_id)
            .order_by(message_count.desc())
            .limit(limit)
        )
    return [UserMessageCount(row.user_id, int(row.message_count)) for row in result]


def token_usage_by_model(connection: Connection) -> list[ModelTokenUsage]:
    """Prompt and completion tokens summed per model (the seed's ``token_usage_by_model``).

    Ordered by model name (the seed query itself has no order).
    """
    if _is_postgresql(connection):
        rows = list(connection.execute(text(TOKEN_USAGE_BY_MODEL)))
    else:
        rows = list(
            connection.execute(
                select(
                    _usage_logs.c.model,
                    func.sum(_usage_logs.c.prompt_tokens).label("total_prompt_tokens"),
                    func.sum(_usage_logs.c.completion_tokens).label("total_completion_tokens"),
                ).group_by(_usage_logs.c.model)
            )
        )
    usage = [
        ModelTokenUsage(
            model=row.model,
            # PostgreSQL's SUM(bigint) is a numeric: a Decimal in Python.
            prompt_tokens=int(row.total_prompt_tokens),
            completion_tokens=int(row.total_completion_tokens),
        )
        for row in rows
    ]
    return sorted(usage, key=lambda entry: entry.model)


def collect_statistics(
    connection: Connection, *, window: timedelta = timedelta(hours=24), top_users: int = 10
) -> StoreStatistics:
    """The four seed numbers: one query each on ``connection``.

    Raises:
        InvalidArgumentError: ``window`` or ``top_users`` is not positive.
    """
    return StoreStatistics(
        total_conversations=total_conversations(connection),
        active_conversations=active_conversations(connection, window=window),
        active_window=window,
        top_users=top_users_by_message_count(connection, limit=top_users),
        token_usage_by_model=token_usage_by_model(connection),
    )


def message_counts(connection: Connection, conversation_ids: Sequence[str]) -> dict[str, int]:
    """How many messages each of ``conversation_ids`` holds (one grouped query).

    Ids without messages (or that do not exist) map to 0. Served by the
    ``(conversation_id, id)`` history index.
    """
    counts = dict.fromkeys(conversation_ids, 0)
    if not counts:
        return counts
    result = connection.execute(
        select(_messages.c.conversation_id, func.count())
        .where(_messages.c.conversation_id.in_(list(counts)))
        .group_by(_messages.c.conversation_id)
    )
    for conversation_id, count in result:
        counts[conversation_id] = int(count)
    return counts
