"""Messages of one conversation: append (exactly once with a key), read, pop, clear, count."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from random import Random
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from ..db.common_case import (
    POP_UNSHARED,
    POP_UNSHARED_EXTENDING,
    VIEW_ALL_UNFORKED,
    VIEW_LATEST_UNFORKED,
)
from ..db.engine import DISTRIBUTED_OPTION, TENANT_OPTION
from ..db.hot_path import HotStatement, run_hot_statement
from ..db.statements import (
    APPEND_KEY_RETENTION,
    CLAIM_APPEND_KEY,
    CLEAR,
    COUNT_MESSAGES,
    DELETE_EXPIRED_APPEND_KEYS,
    ENSURE_CONVERSATION,
    EXTEND_CONVERSATION,
    INSERT_MESSAGE,
    INSERT_MESSAGE_ON_CURRENT_BRANCH,
    IS_EXPIRED,
    LOCK_IF_EXPIRED,
    POSTGRES_APPEND,
    POSTGRES_APPEND_COMMON_CASE,
    POSTGRES_VIEW_ALL,
    POSTGRES_VIEW_LATEST,
    PURGE_BRANCHES,
    PURGE_MESSAGES,
    PURGE_RUN_STATE,
    SELECT_BRANCH_ALL,
    SELECT_BRANCH_LATEST,
    SELECT_CURRENT_BRANCH,
    SELECT_CURRENT_BRANCH_FORKED,
    SELECT_RECORDS,
    TOUCH_CONVERSATION,
    TRIM_TO_LAST_TURNS,
    execute,
    execute_together,
    keys_expire_before,
)
from ..db.tables import messages_table as messages
from ..db.tables import stored_utc
from ..errors import InvalidArgumentError
from ..items import EncodedItem, encode_items
from ..validation import validate_count, validate_identifier, validate_limit, validate_metadata
from .branches import BranchRepository
from .context import acting_tenant, in_driver_transaction
from .records import StoredMessage
from .search import SearchPage, search_messages
from .usage import RECORD_TURN_USAGE, turn_usage_parameters

__all__ = ["APPEND_KEY_RETENTION", "MessageRepository"]

#: One append in ``2 ** KEY_CLEANUP_BITS`` (per process, at random) also drops the
#: conversation's append keys past their retention; the others leave that to it.
KEY_CLEANUP_BITS = 5
KEY_CLEANUP_ONE_IN = 2**KEY_CLEANUP_BITS
# A generator of its own: an application that seeds the random module (or a test
# plugin that does) must not make every draw, or none, pick the clean-up.
_cleanup_draw = Random()


def history_statement(conversation_id: str, limit: int | None) -> HotStatement:
    """The newest ``limit`` (> 0; ``None``: every) items of the current branch, oldest
    first (PostgreSQL): the lean read of an unforked branch, and the fork-chain walk
    when it finds nothing."""
    if limit is None:
        parameters: dict[str, Any] = {"conversation_id": conversation_id}
        return HotStatement(VIEW_ALL_UNFORKED, parameters, True, fallback=POSTGRES_VIEW_ALL)
    parameters = {"conversation_id": conversation_id, "limit": limit}
    return HotStatement(VIEW_LATEST_UNFORKED, parameters, True, fallback=POSTGRES_VIEW_LATEST)


def pop_statement(conversation_id: str, ttl_seconds: int | None = None) -> HotStatement:
    """The common case of a pop, in one round trip (PostgreSQL; see ``POP_UNSHARED``).

    With ``ttl_seconds``, a popped item extends the conversation's expiry to that
    long from now (``POP_UNSHARED_EXTENDING``). Its item, or no row: then
    :meth:`MessageRepository.pop_latest` answers.
    """
    if ttl_seconds is None:
        return HotStatement(POP_UNSHARED, {"conversation_id": conversation_id}, True)
    parameters = {"conversation_id": conversation_id, "ttl_seconds": ttl_seconds}
    return HotStatement(POP_UNSHARED_EXTENDING, parameters, True)


def append_statement(
    conversation_id: str,
    encoded: Sequence[EncodedItem],
    *,
    user_id: str | None,
    metadata: dict[str, Any] | None,
    idempotency_key: str | None,
    ttl_seconds: int | None,
    usage: Sequence[dict[str, Any]] | None = None,
    keep_last_turns: int | None = None,
) -> HotStatement:
    """The append of ``encoded`` (non-empty) in one round trip (PostgreSQL, no tenant).

    Arguments are trusted to be validated. Writes how many items it stored: 0 when
    an earlier attempt with the same ``idempotency_key`` did.

    Usually the lean statement for an unexpired conversation runs, and the full one
    only when it stored nothing (an expired conversation to restart, or a key seen
    before). The full one also drops the conversation's append keys past their
    retention, so one append in :data:`KEY_CLEANUP_ONE_IN` (drawn at random, so no
    pattern of conversations escapes it) runs it directly.

    ``usage``: a Runner turn's usage rows (validated ``usage_rows``), recorded with
    the append; ``keep_last_turns``: the session's trim, run after it. Either makes the
    append the full statement -- it answers every case itself, nothing falls back --
    followed by ``RECORD_TURN_USAGE`` and/or ``TRIM_TO_LAST_TURNS``, sent together as
    one implicit transaction in one round trip: all or nothing. A retry after an
    unknown outcome stores the items once (the key), the usage once (its run keys),
    and trims again (idempotent).
    """
    parameters = _append_parameters(
        conversation_id, encoded, user_id, metadata, idempotency_key, ttl_seconds
    )
    if usage or keep_last_turns is not None:
        if usage:
            parameters.update(turn_usage_parameters(usage))
        if keep_last_turns is not None:
            parameters["turns_before"] = keep_last_turns - 1
        statements = _APPEND_TOGETHER[bool(usage), keep_last_turns is not None]
        return HotStatement(statements, parameters, False, idempotency_key)
    full = _cleanup_draw.getrandbits(KEY_CLEANUP_BITS) == 0
    return HotStatement(
        POSTGRES_APPEND if full else POSTGRES_APPEND_COMMON_CASE,
        parameters,
        False,
        idempotency_key,
        None if full else POSTGRES_APPEND,
    )


# The append and what goes with it, by (usage, trim). Module level: a tuple's SQL
# is joined, and prepared, once per tuple object.
_APPEND_TOGETHER = {
    (True, False): (POSTGRES_APPEND, RECORD_TURN_USAGE),
    (False, True): (POSTGRES_APPEND, TRIM_TO_LAST_TURNS),
    (True, True): (POSTGRES_APPEND, RECORD_TURN_USAGE, TRIM_TO_LAST_TURNS),
}


def _append_parameters(
    conversation_id: str,
    encoded: Sequence[EncodedItem],
    user_id: str | None,
    metadata: dict[str, Any] | None,
    idempotency_key: str | None,
    ttl_seconds: int | None,
) -> dict[str, Any]:
    return {
        "conversation_id": conversation_id,
        "user_id": user_id,
        # As JSON text: the statement casts it to jsonb.
        "metadata": None if metadata is None else json.dumps(metadata),
        "ttl_seconds": ttl_seconds,
        "restart_expired": True,
        "append_key": idempotency_key,
        "keys_expire_before": keys_expire_before(),
        "roles": [item.role for item in encoded],
        "contents": [item.content for item in encoded],
        "documents": [item.document for item in encoded],
    }


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
        ttl_seconds: int | None = None,
    ) -> int:
        """:meth:`append` for items already passed through :func:`encode_items`.

        Arguments are trusted to be validated (the session facade validates them
        before leaving the event loop). ``ttl_seconds`` sets the conversation to
        expire that long from now (see :mod:`agents_sessions.expiry`). An expired
        conversation starts afresh: its old messages and paused run are deleted
        first, in the same transaction.
        """
        if not encoded:
            return 0
        user_id = user_id or acting_tenant(self.connection)
        options = self.connection.get_execution_options()
        distributed = DISTRIBUTED_OPTION in options
        one_statement = not (TENANT_OPTION in options or distributed)
        if self.connection.dialect.name == "postgresql" and one_statement:
            hot = append_statement(
                conversation_id,
                encoded,
                user_id=user_id,
                metadata=metadata,
                idempotency_key=idempotency_key,
                ttl_seconds=ttl_seconds,
            )
            # Inside a caller's transaction, a savepoint keeps the unique-violation
            # answer from aborting the rest of that transaction. (In the facade's
            # autocommit statements there is no transaction to protect.)
            if idempotency_key is not None and in_driver_transaction(self.connection):
                try:
                    with self.connection.begin_nested():
                        return int(run_hot_statement(self.connection, hot, answer_key=False))
                except IntegrityError as exc:
                    if hot.already_done(exc):
                        return 0  # an earlier attempt of this very call committed
                    raise
            return int(run_hot_statement(self.connection, hot))
        conversation = {
            "conversation_id": conversation_id,
            "user_id": user_id,
            "metadata": metadata,
            "ttl_seconds": ttl_seconds,
            "restart_expired": True,
        }
        # Statement by statement, in the caller's transaction: SQLite, PostgreSQL
        # under row-level security (whose messages policy looks the conversation up
        # and would not see one created by a CTE of the same statement), and Citus
        # (which runs the CTEs of one statement one after another, each with its own
        # snapshot; see agents_sessions.db.distribution_probe).
        # The upsert comes first: it takes the conversation's lock (on SQLite, under
        # BEGIN IMMEDIATE, the single write lock), so ids follow commit order, and
        # the key check below cannot race another writer of this conversation.
        dialect_name = self.connection.dialect.name
        # (An expired conversation's row is locked just before, to purge it.)
        if self.connection.execute(LOCK_IF_EXPIRED, {"conversation_id": conversation_id}).first():
            # Expired: it starts afresh (the row stays locked until commit); the upsert
            # below takes it back to main.
            for purge in (PURGE_MESSAGES, PURGE_BRANCHES, PURGE_RUN_STATE):
                self.connection.execute(purge, {"conversation_id": conversation_id})
        self.connection.execute(ENSURE_CONVERSATION[dialect_name], conversation)
        self.connection.execute(
            DELETE_EXPIRED_APPEND_KEYS,
            {"conversation_id": conversation_id, "keys_expire_before": keys_expire_before()},
        )
        if (
            idempotency_key is not None
            and not self.connection.execute(
                CLAIM_APPEND_KEY[dialect_name],
                {"conversation_id": conversation_id, "append_key": idempotency_key},
            ).rowcount
        ):
            return 0  # an earlier attempt of this call stored it
        rows = [
            {
                "conversation_id": conversation_id,
                "role": item.role,
                "content": item.content,
                "document": item.document,
                "append_key": idempotency_key if position == 0 else None,
            }
            for position, item in enumerate(encoded)
        ]
        # The current branch is read after the upsert above locked the conversation:
        # no switch can slip in between. Citus refuses a subquery in INSERT ... VALUES,
        # so there it is read first; elsewhere inside the INSERT.
        if distributed:
            branch = self.connection.execute(SELECT_CURRENT_BRANCH, conversation).scalar_one()
            self.connection.execute(INSERT_MESSAGE, [{**row, "branch_id": branch} for row in rows])
            return len(encoded)
        self.connection.execute(INSERT_MESSAGE_ON_CURRENT_BRANCH, rows)
        return len(encoded)

    def latest(self, conversation_id: str, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` items of the current branch, oldest first.

        One statement on PostgreSQL: one backward index scan per branch the current
        branch inherits from (one for an unforked conversation).
        """
        validate_identifier(conversation_id)
        count = validate_limit(limit)
        if not count:
            return []
        if self.connection.dialect.name != "postgresql":
            return self._current_branch_items(conversation_id, count)
        return list(run_hot_statement(self.connection, history_statement(conversation_id, count)))

    def all(self, conversation_id: str) -> list[dict[str, Any]]:
        """Every item of the current branch, oldest first."""
        validate_identifier(conversation_id)
        if self.connection.dialect.name != "postgresql":
            return self._current_branch_items(conversation_id, None)
        return list(run_hot_statement(self.connection, history_statement(conversation_id, None)))

    def _current_branch_items(self, conversation_id: str, limit: int | None) -> list[Any]:
        """The current branch's items, statement by statement (SQLite).

        An unforked branch (every conversation until it branches) costs two prebuilt
        statements; a branch with a parent is read branch by branch up its chain.
        """
        parameters = {"conversation_id": conversation_id}
        found = self.connection.execute(SELECT_CURRENT_BRANCH_FORKED, parameters).first()
        if found is None:
            return []
        branch_id, forked = found
        if forked:
            return BranchRepository(self.connection).items(conversation_id, branch_id, limit)
        if limit is None:
            result = self.connection.execute(
                SELECT_BRANCH_ALL, {**parameters, "branch_id": branch_id}
            )
        else:
            result = self.connection.execute(
                SELECT_BRANCH_LATEST, {**parameters, "branch_id": branch_id, "limit": limit}
            )
        return list(result.scalars())

    def records(
        self, conversation_id: str, *, after_id: int | None = None, limit: int | None = None
    ) -> list[StoredMessage]:
        """Message rows with their derived columns, oldest first; page with ``after_id``."""
        validate_identifier(conversation_id)
        query = SELECT_RECORDS
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
                created_at=stored_utc(row.created_at),
            )
            for row in rows
        ]

    def trim_to_last_turns(self, conversation_id: str, turns: int) -> int:
        """Delete what precedes the newest ``turns`` turns (a turn starts at a user message).

        Returns how many messages were deleted; fewer turns than that deletes nothing.
        """
        validate_identifier(conversation_id)
        count = validate_count(turns, name="turns")
        if count < 1:
            raise InvalidArgumentError("turns must be at least 1")
        result = execute(
            self.connection,
            TRIM_TO_LAST_TURNS,
            {"conversation_id": conversation_id, "turns_before": count - 1},
        )
        return int(result.rowcount or 0)

    def pop_latest(
        self, conversation_id: str, *, ttl_seconds: int | None = None
    ) -> dict[str, Any] | None:
        """Remove and return the newest item of the current branch; ``None`` if there is none.

        Run it in a transaction (``store.transaction()``): it locks the conversation
        row first, so concurrent pops are serialised and each item is returned by
        exactly one caller. An item another branch shares stays in that branch.
        """
        validate_identifier(conversation_id)
        parameters: dict[str, Any] = {"conversation_id": conversation_id}
        row = None
        item: dict[str, Any] | None
        if self.connection.dialect.name == "postgresql":
            # The common case in one round trip (see POP_UNSHARED); no row: missing,
            # expired, empty, inherited from a parent or shared with a child.
            row = execute_together(self.connection, POP_UNSHARED, parameters).first()
        if row is not None:
            item = row[0]
        elif self.connection.execute(IS_EXPIRED, parameters).scalar():
            return None  # an expired conversation reads as empty: nothing to pop
        else:
            # The branch-aware pop (on PostgreSQL its lock is held since POP_UNSHARED).
            item = BranchRepository(self.connection).pop(conversation_id)
        if item is not None and ttl_seconds is not None:
            self.connection.execute(EXTEND_CONVERSATION, {**parameters, "ttl_seconds": ttl_seconds})
        return item

    def clear(self, conversation_id: str) -> int:
        """Delete every item of the conversation (it stays, with its metadata and usage).

        Returns how many items were deleted. Idempotent.
        """
        validate_identifier(conversation_id)
        parameters = {"conversation_id": conversation_id}
        # Conversation row first, then its messages: the lock order every writer
        # follows, so clear cannot deadlock with pop or delete.
        if not self.connection.execute(TOUCH_CONVERSATION, parameters).rowcount:
            # No conversation, no messages (foreign key). Going on would lock message
            # rows of a conversation created meanwhile before its row: lock inversion.
            return 0
        deleted = self.connection.execute(CLEAR, parameters).rowcount
        # Every branch is empty now: back to main (used names stay reserved).
        BranchRepository(self.connection).reset(conversation_id)
        return int(deleted or 0)

    def search(
        self,
        query: str,
        *,
        user_id: str | None = None,
        conversation_id: str | None = None,
        limit: int = 20,
        since: datetime | None = None,
        after: str | None = None,
    ) -> SearchPage:
        """Full-text search over the messages' readable text; best first, newest on ties.

        ``query`` is plain words (all must occur, stemmed) and "quoted phrases"; it is
        never SQL and never a syntax error. Narrow by owner (``user_id``), by
        ``conversation_id`` and by age (``since``: stored at or after it). Returns
        ``limit`` hits and a ``next_cursor`` to pass as ``after`` for the next page.
        Expired conversations are not searched. See
        :mod:`agents_sessions.repositories.search`.
        """
        return search_messages(
            self.connection,
            query,
            user_id=user_id,
            conversation_id=conversation_id,
            limit=limit,
            since=since,
            after=after,
        )

    def count(self, conversation_id: str) -> int:
        """How many items the conversation holds."""
        validate_identifier(conversation_id)
        return int(
            self.connection.execute(
                COUNT_MESSAGES, {"conversation_id": conversation_id}
            ).scalar_one()
        )
