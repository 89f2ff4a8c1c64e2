"""The schema as SQLAlchemy Core tables: conversations, messages, usage_logs, branches...

These tables are the source of truth that Alembic's autogenerate compares the
database against (``alembic check``, through the ORM models of
:mod:`agents_sessions.db.models`, which map them); the schema itself is created and
evolved only by the migrations in ``migrations/versions``. The session's paths use
the tables alone, so running them never loads SQLAlchemy's ORM.

Design choices, PostgreSQL first:

* 64-bit identity keys for the two append-only tables; conversation ids are
  caller-chosen text (not forced to be UUIDs).
* ``timestamptz`` everywhere (``DateTime(timezone=True)``), defaulted by the server.
* History order is ``messages.id``, a monotonic identity, never a timestamp: two
  items written in the same microsecond still come back in write order.
* ``messages.item`` keeps each agent item **losslessly** as JSON text: PostgreSQL's
  ``json`` type (not ``jsonb``) stores the document verbatim (key order, number
  spelling, and ``\\u0000`` escapes, which ``jsonb`` and ``text`` reject), while
  still validating it and allowing ``item->>'type'`` in SQL. ``role`` and
  ``content`` are derived, readable columns for analytics; ``item`` is authoritative.
* Every constraint and index has a deterministic name (the naming convention), so
  migrations can refer to them on every backend.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import JSON, TypeDecorator, TypeEngine, UserDefinedType

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: The text search configuration of recall on PostgreSQL (stemming, stop words).
SEARCH_CONFIG = "english"
#: The indexed expression over ``messages.content`` (revision 0006's GIN index).
CONTENT_SEARCH_VECTOR = f"to_tsvector('{SEARCH_CONFIG}'::regconfig, content)"

#: The longest conversation or user id accepted (characters).
MAX_ID_LENGTH = 255

# 64-bit on PostgreSQL; on SQLite a rowid alias must be spelled exactly INTEGER.
BigIntegerPK = BigInteger().with_variant(Integer(), "sqlite")
# JSONB for metadata: small, queried by key, indexable with GIN.
MetadataJSON = JSON().with_variant(JSONB(), "postgresql")


class _VerbatimPostgresJSON(UserDefinedType[Any]):
    """PostgreSQL ``json`` bound as already-serialized text.

    SQLAlchemy's own JSON type would serialize the bound value again; this one sends
    the text as-is (the server validates it) and lets the driver parse results
    (psycopg2 registers ``json.loads`` for the ``json`` type).
    """

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "JSON"


class JSONDocument(TypeDecorator[Any]):
    """A JSON document serialized by the application, stored verbatim.

    Bind a ``str`` of JSON text; read back the parsed value. ``json`` on PostgreSQL,
    ``TEXT`` elsewhere. Serializing in the application (see
    :mod:`agents_sessions.items`) lets us validate every item *before* a write.
    """

    impl = Text
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return _VerbatimPostgresJSON()
        return Text()

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        if value is not None and dialect.name != "postgresql":
            return json.loads(value)
        return value


class utcnow(FunctionElement[datetime]):
    """The current time as the database stores ``timestamptz`` values.

    PostgreSQL: ``now()``. SQLite: the text format SQLAlchemy itself writes for
    ``DateTime`` (``YYYY-MM-DD HH:MM:SS.ffffff``), so that server-set timestamps and
    bound Python datetimes compare correctly as text (``CURRENT_TIMESTAMP`` has no
    fraction and would sort before an equal bound value).
    """

    type = DateTime(timezone=True)
    inherit_cache = True
    name = "utcnow"


@compiles(utcnow)
def _utcnow_default(element: utcnow, compiler: SQLCompiler, **kw: Any) -> str:
    return "now()"


@compiles(utcnow, "sqlite")
def _utcnow_sqlite(element: utcnow, compiler: SQLCompiler, **kw: Any) -> str:
    return "(strftime('%Y-%m-%d %H:%M:%f', 'now') || '000')"


class expiry_after(FunctionElement[datetime]):
    """``now`` plus a number of seconds (a bound parameter), as :class:`utcnow` spells now.

    NULL when the seconds are NULL: "no time-to-live" needs no separate statement.
    """

    type = DateTime(timezone=True)
    inherit_cache = True
    name = "expiry_after"


@compiles(expiry_after)
def _expiry_after_default(element: expiry_after, compiler: SQLCompiler, **kw: Any) -> str:
    seconds = compiler.process(next(iter(element.clauses)), **kw)
    return f"(now() + make_interval(secs => {seconds}))"


@compiles(expiry_after, "sqlite")
def _expiry_after_sqlite(element: expiry_after, compiler: SQLCompiler, **kw: Any) -> str:
    seconds = compiler.process(next(iter(element.clauses)), **kw)
    return f"(strftime('%Y-%m-%d %H:%M:%f', 'now', '+' || {seconds} || ' seconds') || '000')"


def stored_utc(value: datetime) -> datetime:
    """A timestamp read from the database as an aware UTC datetime.

    SQLite hands back naive datetimes (stored as UTC); PostgreSQL aware ones in the
    session's TimeZone.
    """
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


#: ``Index.info`` key naming the only dialect an index exists on.
ONLY_ON_DIALECT = "agents_sessions_only_on"


def sqlite_only(index: Index) -> Index:
    """An index that exists only on SQLite (created there alone, compared there alone).

    On SQLite ``messages.id`` and ``usage_logs.id`` are rowid keys (AUTOINCREMENT
    needs a single ``INTEGER PRIMARY KEY``); on PostgreSQL the key is
    ``(conversation_id, id)`` and its index does this index's work.
    """
    index.info[ONLY_ON_DIALECT] = "sqlite"
    return index.ddl_if(dialect="sqlite")


def comparison_filter(dialect_name: str) -> Callable[..., bool]:
    """Alembic's ``include_object`` hook: leave out objects of another dialect.

    Used by ``migrations/env.py`` (``alembic check``) and the models-match test, so
    a :func:`sqlite_only` index is neither expected on PostgreSQL nor dropped there.
    """

    def include(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
        only_on = getattr(obj, "info", {}).get(ONLY_ON_DIALECT)
        return only_on is None or only_on == dialect_name

    return include


#: Every table of the package, with the constraint naming convention.
metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _created_at(name: str = "created_at") -> Column[datetime]:
    return Column(name, DateTime(timezone=True), server_default=utcnow(), nullable=False)


#: One agent conversation (an SDK session), optionally owned by a user.
conversations_table = Table(
    "conversations",
    metadata,
    Column("id", Text, primary_key=True),
    Column("user_id", Text),
    _created_at(),
    _created_at("updated_at"),
    Column("metadata", MetadataJSON, nullable=False, server_default=text("'{}'")),
    # The branch the conversation continues on (NULL: main). Stored, not kept per
    # session object, so every server appends to and reads the same branch.
    Column("current_branch", Text),
    # Retention (revision 0006): when set, the conversation reads as empty from this
    # instant on, and the next write starts it afresh (see agents_sessions.expiry).
    Column("expires_at", DateTime(timezone=True)),
    CheckConstraint(f"length(id) BETWEEN 1 AND {MAX_ID_LENGTH}", name="id_length"),
    # Serves "conversations of a user, newest first" with keyset pagination
    # (and plain user_id lookups, as its leading column).
    Index(None, "user_id", "created_at", "id"),
    # B-tree indexes scan both ways: these serve ORDER BY ... DESC too.
    Index(None, "created_at"),
    # "Active in the last N hours" and retention by age.
    Index(None, "updated_at"),
    # `prune --expired`: only conversations with a time-to-live are in it.
    Index(
        None,
        "expires_at",
        postgresql_where=text("expires_at IS NOT NULL"),
        sqlite_where=text("expires_at IS NOT NULL"),
    ),
)

#: One stored agent item, in history order by ``id``.
messages_table = Table(
    "messages",
    metadata,
    Column("id", BigIntegerPK, Identity(), nullable=False),
    Column(
        "conversation_id",
        Text,
        ForeignKey("conversations.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("role", Text, nullable=False),
    Column("content", Text, nullable=False),
    Column("item", JSONDocument, nullable=False),
    _created_at(),
    # The idempotency key of the append call that wrote this row, set on the first
    # row of each keyed call only. A retried call whose first attempt did commit
    # finds its key and writes nothing: appends are exactly-once across lost
    # connections (see MessageRepository.append).
    Column("append_key", Text),
    # The branch that owns this row. Other branches may share it without a copy:
    # see agents_sessions.repositories.branches.
    Column("branch_id", Text, nullable=False, server_default=text("'main'")),
    # The key leads with the distribution column, so the table can be sharded by
    # conversation (Citus requires every key to include it). Its index is also
    # the history index: "latest N of one conversation" is a backward scan of
    # (conversation_id, id) whatever the table size, and it serves every
    # conversation_id lookup. `id` alone stays unique (one identity sequence).
    PrimaryKeyConstraint("conversation_id", "id"),
    # SQLite keeps `id` as its rowid key (AUTOINCREMENT needs a single INTEGER
    # PRIMARY KEY), so there the history index is a separate one.
    sqlite_only(Index("ix_messages_conversation_id_id", "conversation_id", "id")),
    # A branch's own rows, newest first (one backward scan per branch of a view).
    Index(None, "conversation_id", "branch_id", "id"),
    Index(None, "created_at"),
    # The backstop of exactly-once appends: two attempts of one call that race
    # (the first still running when the retry starts) cannot both commit.
    # Partial: unkeyed rows (most of them) cost nothing in it.
    Index(
        "uq_messages_conversation_id_append_key",
        "conversation_id",
        "append_key",
        unique=True,
        postgresql_where=text("append_key IS NOT NULL"),
        sqlite_where=text("append_key IS NOT NULL"),
    ),
    # Recall (revision 0006): full-text search over the readable text. An
    # expression index, so adding it rewrote nothing; queries must spell the
    # same expression (agents_sessions.repositories.search) to use it.
    Index(
        "ix_messages_content_search",
        text(CONTENT_SEARCH_VECTOR),
        postgresql_using="gin",
        info={"dialects": ("postgresql",)},
    ).ddl_if(dialect="postgresql"),
    # AUTOINCREMENT: SQLite never reuses the id of a popped newest row.
    sqlite_autoincrement=True,
)

#: Token usage of one model request (or one whole run) in a conversation.
usage_logs_table = Table(
    "usage_logs",
    metadata,
    Column("id", BigIntegerPK, Identity(), nullable=False),
    Column(
        "conversation_id",
        Text,
        ForeignKey("conversations.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("run_id", Text),
    Column("response_id", Text),
    Column("model", Text, nullable=False),
    Column("requests", Integer, nullable=False, server_default=text("1")),
    Column("prompt_tokens", BigInteger, nullable=False, server_default=text("0")),
    Column("completion_tokens", BigInteger, nullable=False, server_default=text("0")),
    Column("total_tokens", BigInteger, nullable=False, server_default=text("0")),
    _created_at("timestamp"),
    # Where the request belongs: the branch, and the user message that opened its
    # turn (turn numbers are positions in a branch's history, computed when read).
    Column("branch_id", Text),
    Column("turn_message_id", BigInteger),
    # The request's position in its run: with run_id, records a request once.
    Column("request_index", Integer),
    Column("cached_tokens", BigInteger, nullable=False, server_default=text("0")),
    Column("reasoning_tokens", BigInteger, nullable=False, server_default=text("0")),
    Column("input_tokens_details", MetadataJSON),
    Column("output_tokens_details", MetadataJSON),
    CheckConstraint(
        "prompt_tokens >= 0 AND completion_tokens >= 0 AND total_tokens >= 0 AND requests >= 0",
        name="non_negative",
    ),
    # Keyed by (conversation_id, id) like messages; the key's index serves
    # conversation_id lookups (on SQLite a separate index does).
    PrimaryKeyConstraint("conversation_id", "id"),
    sqlite_only(Index("ix_usage_logs_conversation_id", "conversation_id")),
    Index(None, "timestamp"),
    # Exactly-once usage: a request of a run is recorded once, however many
    # times its append is retried or the run's usage is stored explicitly.
    Index(
        "uq_usage_logs_conversation_id_run_id_request_index",
        "conversation_id",
        "run_id",
        "request_index",
        unique=True,
        postgresql_where=text("request_index IS NOT NULL"),
        sqlite_where=text("request_index IS NOT NULL"),
    ),
    sqlite_autoincrement=True,
)

#: A branch of a conversation other than an unforked ``main``.
#:
#: A branch's history is its parent's history before ``fork_before_id`` (message ids
#: below it, recursively through the parent's own parent) followed by the rows it
#: owns (``messages.branch_id``). Items are shared, never copied. ``state``: ``live``;
#: ``deleted`` (the name stays reserved; rows a child still shares are kept);
#: ``frozen`` (internal: rows a live branch gave up but a child shares).
branches_table = Table(
    "conversation_branches",
    metadata,
    Column(
        "conversation_id",
        Text,
        ForeignKey("conversations.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("branch_id", Text, primary_key=True),
    Column("parent_branch_id", Text),
    Column("fork_before_id", BigInteger),
    Column("state", Text, nullable=False, server_default=text("'live'")),
    _created_at(),
    CheckConstraint("state IN ('live', 'deleted', 'frozen')", name="state"),
    CheckConstraint(f"length(branch_id) BETWEEN 1 AND {MAX_ID_LENGTH}", name="branch_id_length"),
)

#: The idempotency key of an ``add_items`` call, kept apart from the messages.
#:
#: A retried call whose first attempt committed finds its key here and writes
#: nothing. Kept in a table of its own -- not only on the call's first message row,
#: which a concurrent ``pop_item`` or ``clear_session`` may delete -- so exactly-once
#: holds whatever happened to the items since. Keys live at least
#: ``APPEND_KEY_RETENTION`` (one day); appends to the conversation delete older ones,
#: and deleting the conversation deletes them all.
append_keys_table = Table(
    "append_keys",
    metadata,
    Column(
        "conversation_id",
        Text,
        ForeignKey("conversations.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("key", Text, primary_key=True),
    _created_at(),
    # Expiry: "this conversation's keys older than the retention" is a range scan.
    Index(None, "conversation_id", "created_at"),
)

#: A paused agent run (the SDK's ``RunState`` as JSON), at most one per conversation.
#:
#: ``state`` is the SDK's own serialization, verbatim; ``schema_version`` and
#: ``approvals`` (tool name, arguments and call id of every approval pending) are
#: copied out of it when it is saved, so operators can list what waits for whom
#: without loading the SDK.
run_states_table = Table(
    "run_states",
    metadata,
    Column(
        "conversation_id",
        Text,
        ForeignKey("conversations.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("agent_name", Text, nullable=False),
    Column("schema_version", Text, nullable=False),
    Column("sdk_version", Text, nullable=False),
    Column("approvals", JSONDocument, nullable=False),
    Column("state", JSONDocument, nullable=False),
    Column("state_bytes", BigInteger, nullable=False),
    _created_at(),
)


def is_modelled(name: str | None, type_: str, parent_names: Any) -> bool:
    """Alembic ``include_name`` hook: skip what the database holds beyond the models.

    That is SQLite's full-text index of ``messages.content`` (revision 0006): the
    FTS5 table ``messages_fts`` and its shadow tables, kept by triggers, not mapped.
    """
    return not (type_ == "table" and name is not None and name.startswith("messages_fts"))
