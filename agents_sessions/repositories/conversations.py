"""Conversations: get, create-or-update, list (keyset pages), delete."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Text, bindparam, delete, select, tuple_

from ..db.statements import ENSURE_CONVERSATION, UPSERT_CONVERSATION
from ..db.tables import conversations_table as conversations
from ..db.tables import stored_utc
from ..errors import InvalidArgumentError
from ..validation import validate_datetime, validate_identifier, validate_limit, validate_metadata
from .context import acting_tenant
from .records import ConversationPage, ConversationRecord


def _conversation_record(row: Any) -> ConversationRecord:
    return ConversationRecord(
        id=row.id,
        user_id=row.user_id,
        created_at=stored_utc(row.created_at),
        updated_at=stored_utc(row.updated_at),
        metadata=dict(row.metadata or {}),
    )


def _encode_cursor(record: ConversationRecord) -> str:
    payload = json.dumps([record.created_at.isoformat(), record.id], separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str, *, lister: str) -> tuple[datetime, str]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created_at, conversation_id = json.loads(base64.urlsafe_b64decode(padded))
        return validate_datetime(datetime.fromisoformat(created_at), name="after"), str(
            conversation_id
        )
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        raise InvalidArgumentError(
            f"after is not a cursor returned by {lister} (next_cursor)"
        ) from None


def _validate_page_size(page_size: object) -> None:
    # Checked when the iterator is made, not at its first next(): the caller's line.
    if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size < 1:
        raise InvalidArgumentError(f"page_size must be a positive int, got {page_size!r}")


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
            UPSERT_CONVERSATION[self.connection.dialect.name],
            _conversation_parameters(
                conversation_id, user_id or acting_tenant(self.connection), metadata
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
            ENSURE_CONVERSATION[self.connection.dialect.name],
            _conversation_parameters(
                conversation_id, user_id or acting_tenant(self.connection), metadata
            ),
        )

    def list_by_user(
        self, user_id: str, *, limit: int = 50, after: str | None = None
    ) -> ConversationPage:
        """A user's conversations, newest first, ``limit`` at a time.

        Keyset pagination on ``(created_at, id)``: pages stay stable while new
        conversations are added, and each page is one index range scan of
        ``ix_conversations_user_id_created_at_id`` however deep it is.

        ``after`` is the previous page's ``next_cursor``; ``None`` means the first
        page. The last page's ``next_cursor`` is ``None``: stop there (passing it back
        would start over), or let :meth:`iter_by_user` walk the pages.
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

    # ---------------------------------------------------------------- walking every page

    def iter_by_user(self, user_id: str, *, page_size: int = 100) -> Iterator[ConversationRecord]:
        """Every conversation of ``user_id``, newest first, read ``page_size`` at a time.

        Walks the keyset pages of :meth:`list_by_user` and stops after the last one.
        Prefer it to a hand-written loop over ``next_cursor``: passing ``after=None``
        (the last page's ``next_cursor``) starts again at the first page, so a loop
        that does not stop on ``None`` never ends. Each page is one query on this
        repository's connection; use it inside ``store.read()``.
        """
        validate_identifier(user_id, name="user_id")
        _validate_page_size(page_size)
        return self._walk(lambda after: self.list_by_user(user_id, limit=page_size, after=after))

    def iter_all(self, *, page_size: int = 100) -> Iterator[ConversationRecord]:
        """Every conversation, whatever its owner, newest first (see :meth:`iter_by_user`)."""
        _validate_page_size(page_size)
        return self._walk(lambda after: self.list_all(limit=page_size, after=after))

    @staticmethod
    def _walk(
        fetch: Callable[[str | None], ConversationPage],
    ) -> Iterator[ConversationRecord]:
        cursor: str | None = None
        while True:
            page = fetch(cursor)
            yield from page.conversations
            if page.next_cursor is None:  # the last page: never fetch(None) again
                return
            cursor = page.next_cursor

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
