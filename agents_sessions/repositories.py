"""The repository API: conversations, messages and usage, over one SQLAlchemy ``Connection``.

Repositories never own the transaction: the caller decides where it begins and
ends (usually ``with store.transaction() as repos:``; see
:class:`agents_sessions.store.SessionStore`). Every method validates its arguments
before executing any SQL.

Statements are built once, at import time, as SQLAlchemy Core constructs, so each
call only binds parameters (SQLAlchemy's compiled cache does the rest). The hot
paths used by the agent session -- append, latest N, pop -- are one statement each
on PostgreSQL, so in autocommit mode a call is one round trip.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    ARRAY,
    JSON,
    Connection,
    Integer,
    Text,
    bindparam,
    case,
    cast,
    delete,
    exists,
    func,
    insert,
    literal_column,
    null,
    select,
    true,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import IntegrityError

from .engine import TENANT_OPTION
from .errors import InvalidArgumentError
from .items import EncodedItem, encode_items
from .models import (
    JSONDocument,
    conversations_table,
    messages_table,
    usage_logs_table,
    utcnow,
)
from .validation import (
    validate_count,
    validate_identifier,
    validate_limit,
    validate_metadata,
    validate_text,
)

conversations = conversations_table
messages = messages_table
usage_logs = usage_logs_table

# --------------------------------------------------------------------------------------
# Records returned by the API
# --------------------------------------------------------------------------------------


def _aware(value: datetime) -> datetime:
    """A stored timestamp as an aware UTC datetime.

    SQLite hands back naive datetimes (stored as UTC); PostgreSQL aware ones in the
    session's TimeZone.
    """
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def _utc(value: datetime, *, name: str) -> datetime:
    """A caller's datetime as UTC (naive means UTC), for comparison with stored ones.

    SQLite stores timestamps as UTC text and binds a datetime by its wall-clock
    fields, ignoring any offset, so the conversion must happen here.
    """
    if not isinstance(value, datetime):
        raise InvalidArgumentError(f"{name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


@dataclass(frozen=True)
class ConversationRecord:
    """A conversation row.

    Attributes:
        id: The conversation id (the SDK session id).
        user_id: Owner, if any.
        created_at: When the conversation was first written (UTC).
        updated_at: When it last changed (UTC): items added, popped or cleared.
        metadata: Free-form JSON object.
    """

    id: str
    user_id: str | None
    created_at: datetime
    updated_at: datetime
    metadata: dict[str, Any]


@dataclass(frozen=True)
class ConversationPage:
    """One page of :meth:`ConversationRepository.list_by_user`.

    Attributes:
        conversations: Newest first.
        next_cursor: Pass as ``after=`` to get the next page; ``None`` on the last page.
    """

    conversations: list[ConversationRecord]
    next_cursor: str | None


@dataclass(frozen=True)
class StoredMessage:
    """A message row: the item plus its derived columns."""

    id: int
    conversation_id: str
    role: str
    content: str
    item: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class UsageTotals:
    """Token usage summed over a group (a model, a user or a conversation).

    Attributes:
        key: The group's value (model name, user id, conversation id); ``None`` for
            conversations without a user in per-user totals.
    """

    key: str | None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class UsageEntry:
    """One row to record in ``usage_logs``; see :meth:`UsageRepository.record`."""

    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int | None = None
    requests: int = 1
    run_id: str | None = None
    response_id: str | None = None


# --------------------------------------------------------------------------------------
# Statements, built once
# --------------------------------------------------------------------------------------

# None must bind as SQL NULL (not JSON 'null') so COALESCE can keep existing metadata.
_metadata_param = bindparam(
    "metadata", type_=JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
)


# An empty JSON object as each dialect wants it in COALESCE: PostgreSQL needs the
# jsonb type spelled out; SQLite must NOT get CAST(... AS JSON), which its type
# affinity rules turn into the number 0.
_EMPTY_METADATA = {
    "postgresql": cast(literal_column("'{}'"), JSONB),
    "sqlite": literal_column("'{}'"),
}


# Both dialects' INSERTs offer on_conflict_do_update() with the same signature.
_DIALECT_INSERT: dict[str, Callable[..., Any]] = {
    "postgresql": postgresql.insert,
    "sqlite": sqlite.insert,
}


def _conversation_upsert(dialect_name: str, *, replace_user: bool) -> Any:
    """INSERT a conversation, or touch it (and update what was given) if it exists.

    ON CONFLICT DO UPDATE also locks the conversation row until the transaction
    ends; appends rely on that lock to serialise writers of one conversation.
    """
    statement = _DIALECT_INSERT[dialect_name](conversations).values(
        id=bindparam("conversation_id"),
        user_id=bindparam("user_id", type_=Text),
        metadata=func.coalesce(_metadata_param, _EMPTY_METADATA[dialect_name]),
        created_at=utcnow(),
        updated_at=utcnow(),
    )
    excluded = statement.excluded
    user_id = (
        func.coalesce(excluded.user_id, conversations.c.user_id)
        if replace_user
        # The session facade never re-assigns an owned conversation to another user.
        else func.coalesce(conversations.c.user_id, excluded.user_id)
    )
    return statement.on_conflict_do_update(
        index_elements=[conversations.c.id],
        set_={
            "updated_at": utcnow(),
            "user_id": user_id,
            "metadata": func.coalesce(_metadata_param, conversations.c.metadata),
        },
    )


_ENSURE_CONVERSATION = {
    name: _conversation_upsert(name, replace_user=False) for name in _DIALECT_INSERT
}
_UPSERT_CONVERSATION = {
    name: _conversation_upsert(name, replace_user=True).returning(*conversations.c)
    for name in _DIALECT_INSERT
}


def _postgres_append() -> Any:
    """One statement: upsert (and lock) the conversation, then insert the items after it.

    The CTE's ``ON CONFLICT DO UPDATE`` takes the conversation's row lock before
    any message row is produced (the join needs its row), so ``nextval`` for this
    call's ids runs only once earlier writers of the conversation have committed:
    ids -- history order -- follow commit order, and each call's items are
    contiguous. Items arrive as parallel arrays, unnested WITH ORDINALITY and
    inserted in that order.
    """
    conversation = (
        _ENSURE_CONVERSATION["postgresql"].returning(conversations.c.id).cte("conversation")
    )
    rows = (
        func.unnest(
            bindparam("roles", type_=ARRAY(Text)),
            bindparam("contents", type_=ARRAY(Text)),
            bindparam("documents", type_=ARRAY(Text)),
        )
        .table_valued("role", "content", "document", with_ordinality="position")
        .render_derived(name="new_items")
    )
    append_key = bindparam("append_key", type_=Text)
    source = (
        select(
            conversation.c.id,
            rows.c.role,
            rows.c.content,
            cast(rows.c.document, JSONDocument),
            # The call's key goes on its first row only (see _APPEND_KEY_SEEN).
            case((rows.c.position == 1, append_key), else_=null()),
        )
        .select_from(conversation.join(rows, true()))
        .where(~_append_key_seen(append_key))
        .order_by(rows.c.position)
    )
    return insert(messages).from_select(
        ["conversation_id", "role", "content", "item", "append_key"], source
    )


def _append_key_seen(append_key: Any) -> Any:
    """EXISTS: a message of this conversation carries ``append_key`` (false for NULL).

    This check answers the common retry -- the first attempt committed, then its
    connection died before the reply. Its snapshot may predate a first attempt
    still committing concurrently; the partial unique index on
    ``(conversation_id, append_key)`` turns that rare race into a unique violation,
    which the caller reads as "already appended".
    """
    return exists().where(
        messages.c.conversation_id == bindparam("conversation_id"),
        messages.c.append_key == append_key,
    )


_POSTGRES_APPEND = _postgres_append()
_INSERT_MESSAGE = insert(messages).values(
    conversation_id=bindparam("conversation_id"),
    role=bindparam("role"),
    content=bindparam("content"),
    item=bindparam("document", type_=JSONDocument),
    append_key=bindparam("append_key", type_=Text),
)
_SELECT_APPEND_KEY_SEEN = select(_append_key_seen(bindparam("append_key", type_=Text)))

_LATEST = (
    select(messages.c.id, messages.c.item)
    .where(messages.c.conversation_id == bindparam("conversation_id"))
    .order_by(messages.c.id.desc())
    .limit(bindparam("limit", type_=Integer))
    .subquery("latest")
)
_SELECT_LATEST = select(_LATEST.c.item).order_by(_LATEST.c.id)
_SELECT_ALL = (
    select(messages.c.item)
    .where(messages.c.conversation_id == bindparam("conversation_id"))
    .order_by(messages.c.id)
)
_SELECT_RECORDS = select(
    messages.c.id,
    messages.c.conversation_id,
    messages.c.role,
    messages.c.content,
    messages.c.item,
    messages.c.created_at,
).where(messages.c.conversation_id == bindparam("conversation_id"))


def _delete_newest(conversation_id: Any) -> Any:
    """DELETE the newest message of ``conversation_id`` RETURNING it.

    DELETE ... RETURNING is the claim: of two concurrent pops that picked the same
    newest row, only the one whose DELETE removes it gets the payload back.
    """
    newest = (
        select(messages.c.id)
        .where(messages.c.conversation_id == conversation_id)
        .order_by(messages.c.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    return (
        delete(messages)
        # conversation_id as well as id: the row is found through the history index,
        # and a sharded or partitioned messages table (docs/scaling.md) can route
        # the statement to one shard.
        .where(messages.c.conversation_id == conversation_id, messages.c.id == newest)
        .returning(messages.c.conversation_id, messages.c.item)
    )


# SQLite form: under BEGIN IMMEDIATE nothing can race it.
_DELETE_NEWEST = _delete_newest(bindparam("conversation_id"))


def _postgres_pop() -> Any:
    """One statement: lock the conversation, delete its newest item, touch ``updated_at``.

    Lock order matters: every writer (append, pop, clear, delete) locks the
    conversation row *before* any message row, so none can deadlock another. The
    ``locked`` CTE takes that lock; the newest-id subquery depends on it.
    """
    locked = (
        select(conversations.c.id)
        .where(conversations.c.id == bindparam("conversation_id"))
        .with_for_update()
        .cte("locked")
    )
    popped = _delete_newest(select(locked.c.id).scalar_subquery()).cte("popped")
    # A data-modifying CTE runs even though the outer query does not read it.
    touched = (
        update(conversations)
        .where(conversations.c.id.in_(select(popped.c.conversation_id)))
        .values(updated_at=utcnow())
        .cte("touched")
    )
    return select(popped.c.item).add_cte(touched)


_POSTGRES_POP = _postgres_pop()
_HAS_MESSAGES = select(exists().where(messages.c.conversation_id == bindparam("conversation_id")))
_TOUCH_CONVERSATION = (
    update(conversations)
    .where(conversations.c.id == bindparam("conversation_id"))
    .values(updated_at=utcnow())
)
_CLEAR = delete(messages).where(messages.c.conversation_id == bindparam("conversation_id"))
_COUNT_MESSAGES = select(func.count()).where(
    messages.c.conversation_id == bindparam("conversation_id")
)


# Prebuilt statement (by id) and driver -> (the statement, its SQL text, default
# parameters). The statement is kept so that its id cannot be reused by another.
_DRIVER_SQL: dict[tuple[int, str], tuple[Any, str, dict[str, Any]]] = {}


def _execute(connection: Connection, statement: Any, parameters: dict[str, Any]) -> Any:
    """Execute one of this module's prebuilt statements; on PostgreSQL as SQL compiled once.

    ``Connection.execute()`` of a Core statement looks its compiled form up in
    SQLAlchemy's cache and rebuilds the parameter dict on every call: measured here,
    a third of a ``get_items()``. The hot statements never change, so on PostgreSQL
    they are compiled once per driver and sent with ``exec_driver_sql()``: the same
    SQL on the same connection, with the same events and error handling. Values
    must then be in the driver's form -- JSON goes as text, cast in the SQL.
    """
    dialect = connection.dialect
    if dialect.name != "postgresql" or dialect.paramstyle != "pyformat":
        return connection.execute(statement, parameters)
    key = (id(statement), dialect.driver)
    entry = _DRIVER_SQL.get(key)
    if entry is None or entry[0] is not statement:
        compiled = statement.compile(dialect=dialect)
        # Defaults: every bind name, with the values of literal binds (e.g. the 1 in
        # "position = 1"); the call's parameters fill in the rest.
        defaults = {
            compiled.bind_names[bind]: bind.effective_value for bind in compiled.binds.values()
        }
        # Concurrent first calls may both compile; they store equal entries.
        entry = _DRIVER_SQL[key] = (statement, str(compiled), defaults)
    _, sql, defaults = entry
    return connection.exec_driver_sql(sql, {**defaults, **parameters})


def _violates_append_key(error: IntegrityError) -> bool:
    diag = getattr(error.orig, "diag", None)
    return getattr(diag, "constraint_name", None) == "uq_messages_conversation_id_append_key"


def _dialect(connection: Connection) -> str:
    return connection.dialect.name


# --------------------------------------------------------------------------------------
# Repositories
# --------------------------------------------------------------------------------------


def _conversation_record(row: Any) -> ConversationRecord:
    return ConversationRecord(
        id=row.id,
        user_id=row.user_id,
        created_at=_aware(row.created_at),
        updated_at=_aware(row.updated_at),
        metadata=dict(row.metadata or {}),
    )


def _encode_cursor(record: ConversationRecord) -> str:
    payload = json.dumps([record.created_at.isoformat(), record.id], separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str, *, lister: str) -> tuple[datetime, str]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created_at, conversation_id = json.loads(base64.urlsafe_b64decode(padded))
        return _utc(datetime.fromisoformat(created_at), name="after"), str(conversation_id)
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        raise InvalidArgumentError(
            f"after is not a cursor returned by {lister} (next_cursor)"
        ) from None


def _acting_tenant(connection: Connection) -> str | None:
    """The user this connection acts for under row-level security, if any.

    A conversation written while acting for a tenant must name that tenant as its
    owner (the policy checks the row as written), so it is the default ``user_id``.
    """
    tenant = connection.get_execution_options().get(TENANT_OPTION)
    return tenant if isinstance(tenant, str) else None


def _in_driver_transaction(connection: Connection) -> bool:
    """Whether the connection is inside a real database transaction.

    SQLAlchemy considers a connection "in a transaction" after any statement, even
    when the store runs it in the driver's autocommit mode (single statements).
    """
    if not connection.in_transaction():
        return False
    driver_connection = connection.connection.dbapi_connection
    return not getattr(driver_connection, "autocommit", False)


def _conversation_parameters(
    conversation_id: str, user_id: str | None, metadata: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Validated parameters of the conversation upsert statements."""
    validate_identifier(conversation_id)
    if user_id is not None:
        validate_identifier(user_id, name="user_id")
    return {
        "conversation_id": conversation_id,
        "user_id": user_id,
        "metadata": validate_metadata(metadata),
    }


class ConversationRepository:
    """Conversations: get, create-or-update, list per user, delete (cascading)."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def get(self, conversation_id: str) -> ConversationRecord | None:
        """The conversation, or ``None`` if it does not exist."""
        validate_identifier(conversation_id)
        row = self.connection.execute(
            select(conversations).where(conversations.c.id == conversation_id)
        ).one_or_none()
        return None if row is None else _conversation_record(row)

    def upsert(
        self,
        conversation_id: str,
        *,
        user_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> ConversationRecord:
        """Create the conversation, or update it if it exists.

        ``user_id`` and ``metadata`` replace the stored values when given and leave
        them as they are when ``None``; ``updated_at`` is set to now either way.
        """
        row = self.connection.execute(
            _UPSERT_CONVERSATION[_dialect(self.connection)],
            _conversation_parameters(
                conversation_id, user_id or _acting_tenant(self.connection), metadata
            ),
        ).one()
        return _conversation_record(row)

    def ensure(
        self,
        conversation_id: str,
        *,
        user_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Create the conversation if missing and touch ``updated_at``; lock its row.

        Unlike :meth:`upsert`, an existing owner is kept (``user_id`` only fills a
        missing one). Used by writers that must serialise on the conversation.
        """
        self.connection.execute(
            _ENSURE_CONVERSATION[_dialect(self.connection)],
            _conversation_parameters(
                conversation_id, user_id or _acting_tenant(self.connection), metadata
            ),
        )

    def list_by_user(
        self, user_id: str, *, limit: int = 50, after: str | None = None
    ) -> ConversationPage:
        """A user's conversations, newest first, ``limit`` at a time.

        Keyset pagination on ``(created_at, id)``: pages stay stable while new
        conversations are added, and each page is one index range scan of
        ``ix_conversations_user_id_created_at_id`` however deep it is.
        """
        validate_identifier(user_id, name="user_id")
        query = select(conversations).where(conversations.c.user_id == user_id)
        return self._page(query, limit=limit, after=after, lister="list_by_user")

    def delete(self, conversation_id: str) -> bool:
        """Delete the conversation with its messages and usage (ON DELETE CASCADE).

        Returns whether it existed.
        """
        validate_identifier(conversation_id)
        # DELETE locks the conversation row, then ON DELETE CASCADE the message and
        # usage rows: the same conversation-first order as every other writer.
        result = self.connection.execute(
            delete(conversations).where(conversations.c.id == conversation_id)
        )
        return bool(result.rowcount)

    def list_all(self, *, limit: int = 50, after: str | None = None) -> ConversationPage:
        """Every conversation, whatever its owner, newest first, ``limit`` at a time.

        The same keyset pagination on ``(created_at, id)`` and the same cursors as
        :meth:`list_by_user`; each page is one range scan of
        ``ix_conversations_created_at`` (ties on ``created_at`` are few and are
        ordered by ``id`` after the scan).
        """
        return self._page(select(conversations), limit=limit, after=after, lister="list_all")

    def _page(self, query: Any, *, limit: int, after: str | None, lister: str) -> ConversationPage:
        """One keyset page of ``query``'s conversations, newest first by ``(created_at, id)``.

        ``after`` is the ``next_cursor`` of the previous page (of ``lister``); one row
        more than ``limit`` is read to know whether another page follows.
        """
        page_size = validate_limit(limit)
        if page_size is None or page_size == 0:
            raise InvalidArgumentError("limit must be a positive int")
        if after is not None:
            created_at, last_id = _decode_cursor(after, lister=lister)
            query = query.where(
                tuple_(conversations.c.created_at, conversations.c.id)
                < tuple_(
                    bindparam(
                        "cursor_created_at", created_at, type_=conversations.c.created_at.type
                    ),
                    bindparam("cursor_id", last_id, type_=Text),
                )
            )
        query = query.order_by(conversations.c.created_at.desc(), conversations.c.id.desc())
        rows = self.connection.execute(query.limit(page_size + 1)).all()
        records = [_conversation_record(row) for row in rows[:page_size]]
        next_cursor = _encode_cursor(records[-1]) if len(rows) > page_size else None
        return ConversationPage(conversations=records, next_cursor=next_cursor)


class MessageRepository:
    """Messages of one conversation, in history order (by monotonic ``id``)."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def append(
        self,
        conversation_id: str,
        items: Sequence[Mapping[str, Any]],
        *,
        user_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        max_item_bytes: int | None = None,
    ) -> int:
        """Append ``items`` after every item already committed; create the conversation.

        All items are validated and encoded before any SQL runs. On PostgreSQL this
        is one statement; on SQLite several, and the caller's transaction must have
        begun with ``BEGIN IMMEDIATE`` (``store.transaction()`` does) for writers in
        several processes.

        Args:
            conversation_id: The conversation; created if missing.
            items: The items, stored in this order.
            user_id: Owner recorded on a new (or unowned) conversation.
            metadata: Replaces the conversation's metadata when given.
            idempotency_key: Makes the call exactly-once: if a message of this
                conversation already carries the key (an earlier attempt of the same
                call committed), nothing is written. Use a fresh key (e.g. a UUID)
                per logical append and reuse it only to retry that append.
            max_item_bytes: Largest accepted JSON document per item.

        Returns:
            The number of items written (0 when ``idempotency_key`` was already used).

        """
        validate_identifier(conversation_id)
        if user_id is not None:
            validate_identifier(user_id, name="user_id")
        if idempotency_key is not None:
            validate_identifier(idempotency_key, name="idempotency_key")
        encoded = encode_items(items, max_item_bytes=max_item_bytes)
        return self.append_encoded(
            conversation_id,
            encoded,
            user_id=user_id,
            metadata=validate_metadata(metadata),
            idempotency_key=idempotency_key,
        )

    def append_encoded(
        self,
        conversation_id: str,
        encoded: Sequence[EncodedItem],
        *,
        user_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> int:
        """:meth:`append` for items already passed through :func:`encode_items`.

        Arguments are trusted to be validated (the session facade validates them
        before leaving the event loop).
        """
        if not encoded:
            return 0
        conversation = {
            "conversation_id": conversation_id,
            "user_id": user_id or _acting_tenant(self.connection),
            "metadata": metadata,
        }
        acting_for_tenant = TENANT_OPTION in self.connection.get_execution_options()
        if _dialect(self.connection) == "postgresql" and not acting_for_tenant:
            # Inside a caller's transaction, a savepoint keeps the unique-violation
            # answer below from aborting the rest of that transaction. (In the
            # facade's autocommit statements there is no transaction to protect.)
            guard = (
                self.connection.begin_nested()
                if idempotency_key is not None and _in_driver_transaction(self.connection)
                else nullcontext()
            )
            try:
                with guard:
                    result = _execute(
                        self.connection,
                        _POSTGRES_APPEND,
                        {
                            **conversation,
                            # As JSON text: the statement casts it to jsonb.
                            "metadata": None if metadata is None else json.dumps(metadata),
                            "append_key": idempotency_key,
                            "roles": [item.role for item in encoded],
                            "contents": [item.content for item in encoded],
                            "documents": [item.document for item in encoded],
                        },
                    )
            except IntegrityError as exc:
                if idempotency_key is not None and _violates_append_key(exc):
                    # An earlier attempt of this very call committed while this one
                    # ran: the statement wrote nothing, and the items are stored once.
                    return 0
                raise
            return int(result.rowcount)
        # Statement by statement, in the caller's transaction: SQLite, and PostgreSQL
        # under row-level security (whose messages policy looks the conversation up
        # and would not see one created by a CTE of the same statement).
        # The upsert comes first: it takes the conversation's lock (on SQLite, under
        # BEGIN IMMEDIATE, the single write lock), so ids follow commit order, and
        # the key check below cannot race another writer of this conversation.
        self.connection.execute(_ENSURE_CONVERSATION[_dialect(self.connection)], conversation)
        if (
            idempotency_key is not None
            and self.connection.execute(
                _SELECT_APPEND_KEY_SEEN,
                {"conversation_id": conversation_id, "append_key": idempotency_key},
            ).scalar_one()
        ):
            return 0
        self.connection.execute(
            _INSERT_MESSAGE,
            [
                {
                    "conversation_id": conversation_id,
                    "role": item.role,
                    "content": item.content,
                    "document": item.document,
                    "append_key": idempotency_key if position == 0 else None,
                }
                for position, item in enumerate(encoded)
            ],
        )
        return len(encoded)

    def latest(self, conversation_id: str, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` items, oldest first (one backward index scan)."""
        validate_identifier(conversation_id)
        count = validate_limit(limit)
        if not count:
            return []
        result = _execute(
            self.connection, _SELECT_LATEST, {"conversation_id": conversation_id, "limit": count}
        )
        return list(result.scalars())

    def all(self, conversation_id: str) -> list[dict[str, Any]]:
        """Every item of the conversation, oldest first."""
        validate_identifier(conversation_id)
        result = _execute(self.connection, _SELECT_ALL, {"conversation_id": conversation_id})
        return list(result.scalars())

    def records(
        self, conversation_id: str, *, after_id: int | None = None, limit: int | None = None
    ) -> list[StoredMessage]:
        """Message rows with their derived columns, oldest first; page with ``after_id``."""
        validate_identifier(conversation_id)
        query = _SELECT_RECORDS
        if after_id is not None:
            query = query.where(messages.c.id > validate_count(after_id, name="after_id"))
        query = query.order_by(messages.c.id)
        count = validate_limit(limit)
        if count is not None:
            query = query.limit(count)
        rows = self.connection.execute(query, {"conversation_id": conversation_id}).all()
        return [
            StoredMessage(
                id=row.id,
                conversation_id=row.conversation_id,
                role=row.role,
                content=row.content,
                item=row.item,
                created_at=_aware(row.created_at),
            )
            for row in rows
        ]

    def pop_latest(self, conversation_id: str) -> dict[str, Any] | None:
        """Remove and return the newest item; ``None`` if there is none.

        Safe under concurrency: each item is returned by exactly one caller. On
        PostgreSQL the claim is one statement; if a concurrent pop took the row this
        one aimed at, it looks again rather than report an empty conversation.
        """
        validate_identifier(conversation_id)
        parameters = {"conversation_id": conversation_id}
        if _dialect(self.connection) == "postgresql":
            while True:
                item = _execute(self.connection, _POSTGRES_POP, parameters).scalar_one_or_none()
                if item is not None:
                    return item  # type: ignore[no-any-return]
                # Nothing deleted: either the conversation is empty, or another
                # transaction deleted our target first (READ COMMITTED re-checks the
                # row, not the subquery). Only the first case ends the loop.
                if not _execute(self.connection, _HAS_MESSAGES, parameters).scalar():
                    return None
        row = self.connection.execute(_DELETE_NEWEST, parameters).one_or_none()
        if row is None:
            return None
        self.connection.execute(_TOUCH_CONVERSATION, parameters)
        return row.item  # type: ignore[no-any-return]

    def clear(self, conversation_id: str) -> int:
        """Delete every item of the conversation (it stays, with its metadata and usage).

        Returns how many items were deleted. Idempotent.
        """
        validate_identifier(conversation_id)
        parameters = {"conversation_id": conversation_id}
        # Conversation row first, then its messages: the lock order every writer
        # follows, so clear cannot deadlock with pop or delete.
        self.connection.execute(_TOUCH_CONVERSATION, parameters)
        deleted = self.connection.execute(_CLEAR, parameters).rowcount
        return int(deleted or 0)

    def count(self, conversation_id: str) -> int:
        """How many items the conversation holds."""
        validate_identifier(conversation_id)
        return int(
            self.connection.execute(
                _COUNT_MESSAGES, {"conversation_id": conversation_id}
            ).scalar_one()
        )


class UsageRepository:
    """Token usage: record per request or per run; totals by model, user, conversation."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def record(self, conversation_id: str, entries: Sequence[UsageEntry]) -> int:
        """Insert one ``usage_logs`` row per entry. The conversation must exist.

        Returns the number of rows written.
        """
        validate_identifier(conversation_id)
        rows = []
        for index, entry in enumerate(entries):
            where = f"entries[{index}]"
            model = validate_text(entry.model, name=f"{where}.model")
            if not model:
                raise InvalidArgumentError(f"{where}.model must not be empty")
            prompt = validate_count(entry.prompt_tokens, name=f"{where}.prompt_tokens")
            completion = validate_count(entry.completion_tokens, name=f"{where}.completion_tokens")
            total = validate_count(
                prompt + completion if entry.total_tokens is None else entry.total_tokens,
                name=f"{where}.total_tokens",
            )
            rows.append(
                {
                    "conversation_id": conversation_id,
                    "model": model,
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": total,
                    "requests": validate_count(entry.requests, name=f"{where}.requests"),
                    "run_id": validate_text(entry.run_id, name=f"{where}.run_id", optional=True),
                    "response_id": validate_text(
                        entry.response_id, name=f"{where}.response_id", optional=True
                    ),
                }
            )
        if rows:
            self.connection.execute(insert(usage_logs), rows)
        return len(rows)

    def _totals(self, key: Any, *, since: datetime | None, join_conversations: bool) -> Any:
        query = select(
            key.label("key"),
            func.coalesce(func.sum(usage_logs.c.requests), 0).label("requests"),
            func.coalesce(func.sum(usage_logs.c.prompt_tokens), 0).label("prompt_tokens"),
            func.coalesce(func.sum(usage_logs.c.completion_tokens), 0).label("completion_tokens"),
            func.coalesce(func.sum(usage_logs.c.total_tokens), 0).label("total_tokens"),
        )
        if join_conversations:
            query = query.select_from(
                usage_logs.join(conversations, conversations.c.id == usage_logs.c.conversation_id)
            )
        if since is not None:
            query = query.where(usage_logs.c.timestamp >= _utc(since, name="since"))
        return query.group_by(key).order_by(func.sum(usage_logs.c.total_tokens).desc(), key)

    @staticmethod
    def _rows(result: Any) -> list[UsageTotals]:
        return [
            UsageTotals(
                key=row.key,
                requests=int(row.requests),
                prompt_tokens=int(row.prompt_tokens),
                completion_tokens=int(row.completion_tokens),
                total_tokens=int(row.total_tokens),
            )
            for row in result
        ]

    def totals_by_model(self, *, since: datetime | None = None) -> list[UsageTotals]:
        """Usage per model, most tokens first; only rows at or after ``since`` if given."""
        return self._rows(
            self.connection.execute(
                self._totals(usage_logs.c.model, since=since, join_conversations=False)
            )
        )

    def totals_by_user(self, *, since: datetime | None = None) -> list[UsageTotals]:
        """Usage per conversation owner (``key=None`` for conversations without a user)."""
        return self._rows(
            self.connection.execute(
                self._totals(conversations.c.user_id, since=since, join_conversations=True)
            )
        )

    def totals_for_conversation(self, conversation_id: str) -> UsageTotals:
        """Usage of one conversation (zeros if it has none)."""
        validate_identifier(conversation_id)
        query = self._totals(
            usage_logs.c.conversation_id, since=None, join_conversations=False
        ).where(usage_logs.c.conversation_id == conversation_id)
        rows = self._rows(self.connection.execute(query))
        return rows[0] if rows else UsageTotals(conversation_id, 0, 0, 0, 0)


class Repositories:
    """The three repositories over one connection (and so one transaction)."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.conversations = ConversationRepository(connection)
        self.messages = MessageRepository(connection)
        self.usage = UsageRepository(connection)


__all__ = [
    "ConversationPage",
    "ConversationRecord",
    "ConversationRepository",
    "MessageRepository",
    "Repositories",
    "StoredMessage",
    "UsageEntry",
    "UsageRepository",
    "UsageTotals",
]
