"""Recall: full-text search over the readable text of stored messages (``messages.content``).

PostgreSQL: ``websearch_to_tsquery`` against the GIN index on
``to_tsvector('english', content)`` (revision 0008), ranked by ``ts_rank`` with a
``ts_headline`` snippet. SQLite: the FTS5 table ``messages_fts`` (revision 0006,
kept in step with ``messages`` by triggers), ranked by BM25 with FTS5's
``snippet()``.

A user's query is never SQL and never raises a syntax error: it is bound as a
parameter, and parsed by ``websearch_to_tsquery`` (which accepts any text) on
PostgreSQL; on SQLite every word and every quoted phrase is re-quoted as an FTS5
string, so FTS5's operators (``NEAR``, ``*``, ``:``, ``^``, parentheses) are plain
text. Plain words must all occur (stemmed: "decided" finds "decide"); a quoted
phrase must occur as a phrase. Expired conversations are never searched.

Hits come best first, ties newest first (by message id). Pages are keyset pages on
(rank, id), like the conversation listings: pass a page's ``next_cursor`` as
``after``. Ranks depend on the corpus on SQLite (BM25), so pages of a changing
corpus may overlap slightly there.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    REAL,
    BigInteger,
    Connection,
    Float,
    and_,
    bindparam,
    cast,
    exists,
    func,
    literal_column,
    select,
    text,
    tuple_,
)

from ..db.tables import SEARCH_CONFIG, conversations_table, messages_table, stored_utc, utcnow
from ..errors import InvalidArgumentError
from ..validation import validate_datetime, validate_identifier, validate_limit

conversations = conversations_table
messages = messages_table

#: The longest query accepted (characters).
MAX_QUERY_LENGTH = 1000
#: Marks around each matched term in a snippet (Markdown bold).
HIGHLIGHT_START = "**"
HIGHLIGHT_STOP = "**"
#: Between two fragments of one snippet.
SNIPPET_ELLIPSIS = " … "

_HEADLINE_OPTIONS = (
    f"StartSel={HIGHLIGHT_START}, StopSel={HIGHLIGHT_STOP}, MaxWords=24, MinWords=8, "
    f'MaxFragments=2, FragmentDelimiter="{SNIPPET_ELLIPSIS}"'
)
# A phrase in double quotes, or a run of anything else but white space.
_QUERY_TERMS = re.compile(r'"([^"]*)"?|(\S+)')


@dataclass(frozen=True)
class SearchHit:
    """One message that matched a search.

    Attributes:
        conversation_id: Its conversation.
        message_id: Its id (history order within the conversation).
        role: ``user``, ``assistant``, ``tool``...
        snippet: The matching passage, terms between ``**`` marks.
        rank: Relevance; higher is better (comparable within one search only).
        created_at: When it was stored (UTC).
    """

    conversation_id: str
    message_id: int
    role: str
    snippet: str
    rank: float
    created_at: datetime


@dataclass(frozen=True)
class SearchPage:
    """One page of search hits, best first.

    Attributes:
        hits: At most ``limit`` hits.
        next_cursor: Pass as ``after=`` for the next page; ``None`` on the last one.
    """

    hits: list[SearchHit]
    next_cursor: str | None


def validate_query(query: object) -> str:
    """The query as searched: a string of at most MAX_QUERY_LENGTH characters.

    NUL becomes a space (PostgreSQL text cannot hold it) and lone surrogates a
    replacement character (UTF-8 cannot carry them); a surrogate pair becomes the
    character it encodes.
    """
    if not isinstance(query, str):
        raise InvalidArgumentError(f"query must be a str, got {type(query).__name__}")
    if len(query) > MAX_QUERY_LENGTH:
        raise InvalidArgumentError(f"query is longer than {MAX_QUERY_LENGTH} characters")
    repaired = query.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return repaired.replace("\x00", " ")


def fts5_match_expression(query: str) -> str | None:
    """An FTS5 MATCH expression for a user query: its words and quoted phrases, all quoted.

    Every term becomes an FTS5 string (``"..."``, inner quotes doubled), so nothing
    the user types is an FTS5 operator; terms are ANDed. Terms without a letter or
    digit are dropped (the tokenizer would drop them too). ``None`` when nothing is
    left to search for.
    """
    terms = []
    for match in _QUERY_TERMS.finditer(query):
        term = match.group(1) if match.group(1) is not None else match.group(2)
        if any(character.isalnum() for character in term):
            terms.append('"' + term.replace('"', '""') + '"')
    return " ".join(terms) if terms else None


def _encode_cursor(hit: SearchHit) -> str:
    payload = json.dumps([hit.rank, hit.message_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[float, int]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        rank, message_id = json.loads(base64.urlsafe_b64decode(padded))
        if not isinstance(message_id, int) or isinstance(message_id, bool):
            raise TypeError
        return float(rank), message_id
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        raise InvalidArgumentError(
            "after is not a cursor returned by search (next_cursor)"
        ) from None


def _not_expired() -> Any:
    """The message's conversation has not expired (expired ones read as empty)."""
    return ~exists().where(
        conversations.c.id == messages.c.conversation_id,
        conversations.c.expires_at <= utcnow(),
    )


def _postgres_search(
    connection: Connection,
    query: str,
    *,
    user_id: str | None,
    conversation_id: str | None,
    since: datetime | None,
    after: tuple[float, int] | None,
    fetch: int,
) -> list[SearchHit]:
    config: Any = literal_column(f"'{SEARCH_CONFIG}'::regconfig")
    # The same expression as the GIN index, or the index is not used.
    vector = func.to_tsvector(config, messages.c.content)
    tsquery = func.websearch_to_tsquery(config, bindparam("query", query))
    rank = func.ts_rank(vector, tsquery)
    conditions = [vector.op("@@")(tsquery), _not_expired()]
    if user_id is not None:
        conditions.append(
            messages.c.conversation_id.in_(
                select(conversations.c.id).where(conversations.c.user_id == user_id)
            )
        )
    if conversation_id is not None:
        conditions.append(messages.c.conversation_id == conversation_id)
    if since is not None:
        conditions.append(messages.c.created_at >= since)
    if after is not None:
        # ts_rank is a real: compare as one (a double would differ in its last bits).
        conditions.append(
            tuple_(rank, messages.c.id)
            < tuple_(cast(bindparam("after_rank", after[0]), REAL), bindparam("after_id", after[1]))
        )
    best = (
        select(
            messages.c.id,
            messages.c.conversation_id,
            messages.c.role,
            messages.c.content,
            messages.c.created_at,
            rank.label("rank"),
        )
        .where(and_(*conditions))
        .order_by(rank.desc(), messages.c.id.desc())
        .limit(fetch)
        .subquery("best")
    )
    # The headline is costly: computed for the page's rows only.
    snippet = func.ts_headline(config, best.c.content, tsquery, _HEADLINE_OPTIONS)
    rows = connection.execute(
        select(best, snippet.label("snippet")).order_by(best.c.rank.desc(), best.c.id.desc())
    ).all()
    return [_hit(row) for row in rows]


def _hit(row: Any) -> SearchHit:
    """A result row (either dialect's statement) as a :class:`SearchHit`."""
    return SearchHit(
        conversation_id=row.conversation_id,
        message_id=row.id,
        role=row.role,
        snippet=row.snippet,
        rank=float(row.rank),
        created_at=stored_utc(row.created_at),
    )


def _sqlite_search(
    connection: Connection,
    match: str,
    *,
    user_id: str | None,
    conversation_id: str | None,
    since: datetime | None,
    after: tuple[float, int] | None,
    fetch: int,
) -> list[SearchHit]:
    # bm25() is lower-is-better; negated so that higher is better on both backends.
    conditions = [
        "messages_fts MATCH :match",
        "NOT EXISTS (SELECT 1 FROM conversations c WHERE c.id = m.conversation_id "
        "AND c.expires_at <= strftime('%Y-%m-%d %H:%M:%f', 'now') || '000')",
    ]
    parameters: dict[str, Any] = {"match": match, "fetch": fetch}
    if user_id is not None:
        conditions.append(
            "m.conversation_id IN (SELECT c.id FROM conversations c WHERE c.user_id = :user_id)"
        )
        parameters["user_id"] = user_id
    if conversation_id is not None:
        conditions.append("m.conversation_id = :conversation_id")
        parameters["conversation_id"] = conversation_id
    if since is not None:
        conditions.append("m.created_at >= :since")
    if after is not None:
        conditions.append("(-bm25(messages_fts), m.id) < (:after_rank, :after_id)")
        parameters["after_rank"], parameters["after_id"] = after
    clause = text(
        "SELECT m.id, m.conversation_id, m.role, m.created_at, -bm25(messages_fts) AS rank, "
        f"snippet(messages_fts, 0, '{HIGHLIGHT_START}', '{HIGHLIGHT_STOP}', "
        f"'{SNIPPET_ELLIPSIS.strip()}', 24) AS snippet "
        "FROM messages_fts JOIN messages m ON m.id = messages_fts.rowid "
        f"WHERE {' AND '.join(conditions)} "
        "ORDER BY rank DESC, m.id DESC LIMIT :fetch"
    )
    if since is not None:
        # Bound through the column's type: the same text form SQLite stores.
        clause = clause.bindparams(bindparam("since", since, type_=messages.c.created_at.type))
    statement = clause.columns(id=BigInteger(), created_at=messages.c.created_at.type, rank=Float())
    rows = connection.execute(statement, parameters).all()
    return [_hit(row) for row in rows]


def search_messages(
    connection: Connection,
    query: str,
    *,
    user_id: str | None = None,
    conversation_id: str | None = None,
    limit: int = 20,
    since: datetime | None = None,
    after: str | None = None,
) -> SearchPage:
    """Messages whose text matches ``query``, best first; see the module docstring."""
    text_query = validate_query(query)
    if user_id is not None:
        validate_identifier(user_id, name="user_id")
    if conversation_id is not None:
        validate_identifier(conversation_id)
    page_size = validate_limit(limit)
    if not page_size:
        raise InvalidArgumentError("limit must be a positive int")
    if since is not None:
        since = validate_datetime(since, name="since")
    position = None if after is None else _decode_cursor(after)
    fetch = page_size + 1  # one more: is there another page?
    if connection.dialect.name == "postgresql":
        if not text_query.strip():
            return SearchPage(hits=[], next_cursor=None)
        hits = _postgres_search(
            connection,
            text_query,
            user_id=user_id,
            conversation_id=conversation_id,
            since=since,
            after=position,
            fetch=fetch,
        )
    else:
        match = fts5_match_expression(text_query)
        if match is None:
            return SearchPage(hits=[], next_cursor=None)
        hits = _sqlite_search(
            connection,
            match,
            user_id=user_id,
            conversation_id=conversation_id,
            since=since,
            after=position,
            fetch=fetch,
        )
    more = len(hits) > page_size
    hits = hits[:page_size]
    return SearchPage(hits=hits, next_cursor=_encode_cursor(hits[-1]) if more else None)
