"""Import: an export file into a database, validated first, atomic per conversation, idempotent.

Import reads the whole file once to validate it -- a bad line is reported with its
line number and nothing is written -- then imports each conversation in its own
transaction. It is idempotent: per conversation the row is upserted; messages are
positional (when the database already holds the first N messages and they equal
the file's first N, only the rest is appended; when they differ, that conversation
is refused and left untouched); usage rows already present (equal in every column
but ``id``) are not inserted again.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from sqlalchemy import (
    Connection,
    DateTime,
    Integer,
    Text,
    bindparam,
    func,
    insert,
    select,
    update,
)
from sqlalchemy import cast as sql_cast
from sqlalchemy.dialects import postgresql, sqlite

from ...db.models import (
    JSONDocument,
    conversations_table,
    messages_table,
    run_states_table,
    stored_utc,
    usage_logs_table,
)
from ...db.statements import unnested_rows
from ...errors import (
    DatabaseError,
)
from ...store import SessionStore
from ...validation import (
    validate_batch_size,
)
from .format import (
    DEFAULT_BATCH_SIZE,
    ConversationLine,
    EndLine,
    ExportFile,
    HeaderLine,
    MessageLine,
    Progress,
    RunStateLine,
    UsageLine,
)

conversations = conversations_table
messages = messages_table
usage_logs = usage_logs_table


@dataclass(frozen=True)
class RefusedConversation:
    """A conversation of the file that was not imported, and why."""

    conversation_id: str
    line: int
    reason: str


@dataclass
class ImportSummary:
    """What an import did, per conversation and per row."""

    conversations_created: int = 0
    conversations_updated: int = 0
    conversations_unchanged: int = 0
    messages_imported: int = 0
    messages_already_present: int = 0
    usage_imported: int = 0
    usage_already_present: int = 0
    run_states_imported: int = 0
    run_states_already_present: int = 0
    refused: list[RefusedConversation] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The summary as JSON-ready data."""
        return asdict(self)


# --------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------


_INSERT_RUN_STATE: dict[str, Callable[..., Any]] = {
    "postgresql": postgresql.insert,
    "sqlite": sqlite.insert,
}


class _Refused(Exception):
    def __init__(self, line: int, reason: str) -> None:
        super().__init__(reason)
        self.line = line
        self.reason = reason


def _postgres_insert_messages() -> Any:
    """INSERT a batch of one conversation's messages, ids assigned in file order.

    The rows arrive as parallel arrays, unnested WITH ORDINALITY and inserted ORDER
    BY position, like the session's own append: history order is ``messages.id``.
    """
    rows = unnested_rows(
        "imported",
        role=("roles", Text),
        content=("contents", Text),
        document=("documents", Text),
        created_at=("created", DateTime(timezone=True)),
        append_key=("append_keys", Text),
    )
    source = select(
        sql_cast(bindparam("conversation_id"), Text),
        rows.c.role,
        rows.c.content,
        sql_cast(rows.c.document, JSONDocument),
        rows.c.created_at,
        rows.c.append_key,
    ).order_by(rows.c.position)
    return insert(messages).from_select(
        ["conversation_id", "role", "content", "item", "created_at", "append_key"], source
    )


_POSTGRES_INSERT_MESSAGES = _postgres_insert_messages()
_INSERT_MESSAGE = insert(messages).values(
    conversation_id=bindparam("conversation_id"),
    role=bindparam("role"),
    content=bindparam("content"),
    item=bindparam("document", type_=JSONDocument),
    created_at=bindparam("created_at", type_=DateTime(timezone=True)),
    append_key=bindparam("append_key", type_=Text),
)
_TAKEN_APPEND_KEYS = select(messages.c.append_key).where(
    messages.c.conversation_id == bindparam("conversation_id"),
    messages.c.append_key.in_(bindparam("append_keys", expanding=True)),
)
_STORED_DOCUMENTS = (
    select(messages.c.id, sql_cast(messages.c.item, Text).label("document"))
    .where(
        messages.c.conversation_id == bindparam("conversation_id"),
        messages.c.id > bindparam("after_id"),
    )
    .order_by(messages.c.id)
    .limit(bindparam("limit", type_=Integer))
)


def _stored_documents(connection: Connection, conversation_id: str, batch: int) -> Iterator[str]:
    """The conversation's stored item documents in history order, a keyset page at a time."""
    after_id = -1
    while True:
        rows = connection.execute(
            _STORED_DOCUMENTS,
            {"conversation_id": conversation_id, "after_id": after_id, "limit": batch},
        ).all()
        for row in rows:
            yield row.document
        if len(rows) < batch:
            return
        after_id = rows[-1].id


class _ConversationImport:
    """Import one conversation's records on one connection, inside its transaction."""

    def __init__(self, connection: Connection, entry: ConversationLine, batch_size: int) -> None:
        self.connection = connection
        self.entry = entry
        self.batch_size = batch_size
        self.changed = False
        self.messages_imported = 0
        self.messages_present = 0
        self.usage_imported = 0
        self.usage_present = 0
        self._pending_messages: list[MessageLine] = []
        self._pending_usage: list[UsageLine] = []
        self._stored: Iterator[str] | None = None
        self._stored_count = 0
        self._usage_present: Counter[tuple[Any, ...]] | None = None

    def upsert_conversation(self) -> bool:
        """Create or update the conversation row, locking it; True when it was created.

        The row lock (FOR UPDATE, or the INSERT's) comes first, before any message
        row, the order every writer follows: the app's appends to this conversation
        wait until the import commits, so positions cannot shift underneath it.
        """
        entry = self.entry
        existing = self.connection.execute(
            select(conversations).where(conversations.c.id == entry.id).with_for_update()
        ).one_or_none()
        if existing is None:
            self.connection.execute(
                insert(conversations).values(
                    id=entry.id,
                    user_id=entry.user_id,
                    created_at=entry.created_at,
                    updated_at=entry.updated_at,
                    metadata=entry.metadata,
                )
            )
            self.changed = True
            return True
        if existing.user_id != entry.user_id:
            # Owners must agree exactly: a file line with no owner (user_id null) must
            # not append to someone's conversation, nor a named one take over a
            # conversation stored without an owner.
            raise _Refused(
                entry.line,
                f"conversation {entry.id!r} has another owner in the database than in "
                f"the file ({entry.user_id!r}); not merged",
            )
        values = {
            "user_id": existing.user_id if entry.user_id is None else entry.user_id,
            "metadata": entry.metadata,
            "created_at": min(stored_utc(existing.created_at), entry.created_at),
            "updated_at": max(stored_utc(existing.updated_at), entry.updated_at),
        }
        current = {
            "user_id": existing.user_id,
            "metadata": dict(existing.metadata or {}),
            "created_at": stored_utc(existing.created_at),
            "updated_at": stored_utc(existing.updated_at),
        }
        if values != current:
            self.connection.execute(
                update(conversations).where(conversations.c.id == entry.id).values(**values)
            )
            self.changed = True
        self._stored_count = int(
            self.connection.execute(
                select(func.count()).where(messages.c.conversation_id == entry.id)
            ).scalar_one()
        )
        return False

    def add_message(self, entry: MessageLine) -> None:
        if entry.position < self._stored_count:
            if self._stored is None:
                self._stored = _stored_documents(self.connection, self.entry.id, self.batch_size)
            stored = next(self._stored)
            if stored != entry.document:
                raise _Refused(
                    entry.line,
                    f"conversation {self.entry.id!r}: message {entry.position} (line "
                    f"{entry.line}) differs from the one stored at that position; not merged",
                )
            self.messages_present += 1
            return
        self._pending_messages.append(entry)
        if len(self._pending_messages) >= self.batch_size:
            self._flush_messages()

    def _flush_messages(self) -> None:
        batch = self._pending_messages
        if not batch:
            return
        keys = [entry.append_key for entry in batch if entry.append_key is not None]
        if keys:
            taken = self.connection.execute(
                _TAKEN_APPEND_KEYS, {"conversation_id": self.entry.id, "append_keys": keys}
            ).scalar()
            if taken is not None:
                line = next(entry.line for entry in batch if entry.append_key == taken)
                raise _Refused(
                    line,
                    f"conversation {self.entry.id!r}: the append_key {taken!r} (line {line}) "
                    "is already on another stored message; not merged",
                )
        if self.connection.dialect.name == "postgresql":
            self.connection.execute(
                _POSTGRES_INSERT_MESSAGES,
                {
                    "conversation_id": self.entry.id,
                    "roles": [entry.role for entry in batch],
                    "contents": [entry.content for entry in batch],
                    "documents": [entry.document for entry in batch],
                    "created": [entry.created_at for entry in batch],
                    "append_keys": [entry.append_key for entry in batch],
                },
            )
        else:
            # One executemany in file order: SQLite assigns ids in that order, and
            # this transaction (BEGIN IMMEDIATE) is the only writer.
            self.connection.execute(
                _INSERT_MESSAGE,
                [
                    {
                        "conversation_id": self.entry.id,
                        "role": entry.role,
                        "content": entry.content,
                        "document": entry.document,
                        "created_at": entry.created_at,
                        "append_key": entry.append_key,
                    }
                    for entry in batch
                ],
            )
        self.messages_imported += len(batch)
        self.changed = True
        self._pending_messages = []

    def add_usage(self, entry: UsageLine) -> None:
        if self._usage_present is None:
            # A multiset: two identical usage rows in the file are two rows; each
            # matches at most one stored row.
            rows = self.connection.execute(
                select(usage_logs).where(usage_logs.c.conversation_id == self.entry.id)
            )
            self._usage_present = Counter(
                (
                    row.run_id,
                    row.response_id,
                    row.model,
                    row.requests,
                    row.prompt_tokens,
                    row.completion_tokens,
                    row.total_tokens,
                    stored_utc(row.timestamp),
                )
                for row in rows
            )
        key = entry.key()
        if self._usage_present[key] > 0:
            self._usage_present[key] -= 1
            self.usage_present += 1
            return
        self._pending_usage.append(entry)
        if len(self._pending_usage) >= self.batch_size:
            self._flush_usage()

    def _flush_usage(self) -> None:
        if not self._pending_usage:
            return
        self.connection.execute(
            insert(usage_logs),
            [
                {
                    "conversation_id": self.entry.id,
                    "run_id": entry.run_id,
                    "response_id": entry.response_id,
                    "model": entry.model,
                    "requests": entry.requests,
                    "prompt_tokens": entry.prompt_tokens,
                    "completion_tokens": entry.completion_tokens,
                    "total_tokens": entry.total_tokens,
                    "timestamp": entry.timestamp,
                }
                for entry in self._pending_usage
            ],
        )
        self.usage_imported += len(self._pending_usage)
        self.changed = True
        self._pending_usage = []

    def add_run_state(self, entry: RunStateLine) -> bool:
        """Store the paused run unless the conversation has one; True when stored."""
        inserted = self.connection.execute(
            _INSERT_RUN_STATE[self.connection.dialect.name](run_states_table)
            .values(
                conversation_id=self.entry.id,
                agent_name=entry.agent_name,
                schema_version=entry.schema_version,
                sdk_version=entry.sdk_version,
                approvals=json.dumps(entry.approvals),
                state=entry.state_json,
                state_bytes=len(entry.state_json.encode("utf-8", "surrogatepass")),
                created_at=entry.created_at,
            )
            # A paused run already stored is the newer truth (or the same one).
            .on_conflict_do_nothing()
        ).rowcount
        if inserted:
            self.changed = True
        return bool(inserted)

    def finish(self) -> None:
        self._flush_messages()
        self._flush_usage()


def _blocks(entries: Iterable[Any]) -> Iterator[tuple[int, Any]]:
    """Tag each record with the number of its conversation block (0: header and end)."""
    block = 0
    for entry in entries:
        if isinstance(entry, ConversationLine):
            block += 1
        yield (0 if isinstance(entry, HeaderLine | EndLine) else block), entry


def import_export(
    store: SessionStore,
    export: ExportFile,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
) -> ImportSummary:
    """Import a validated :class:`ExportFile` into ``store``; idempotent.

    Each conversation is imported in its own transaction: all of its new rows or
    none. A conversation whose stored messages differ from the file's (or that
    belongs to another user) is refused and listed in the summary; the others are
    imported. ``progress(1)`` is called after each conversation.

    Raises:
        DatabaseError: the database failed; the conversations before the failing
            one are imported (importing the file again completes the rest).
    """
    size = validate_batch_size(batch_size)
    summary = ImportSummary()
    done = 0
    # groupby streams: one conversation's records at a time, never the whole file.
    for block, tagged in itertools.groupby(_blocks(export.entries()), key=lambda pair: pair[0]):
        if block == 0:
            continue
        group = (entry for _, entry in tagged)
        first = next(group)
        assert isinstance(first, ConversationLine)  # the validation guarantees it
        try:
            with store.transaction() as repos:
                work = _ConversationImport(repos.connection, first, size)
                created = work.upsert_conversation()
                for entry in group:
                    if isinstance(entry, MessageLine):
                        work.add_message(entry)
                    elif isinstance(entry, RunStateLine):
                        work.finish()  # its conversation's messages first
                        if work.add_run_state(entry):
                            summary.run_states_imported += 1
                        else:
                            summary.run_states_already_present += 1
                    else:
                        work.add_usage(entry)
                work.finish()
        except _Refused as refusal:
            summary.refused.append(RefusedConversation(first.id, refusal.line, refusal.reason))
        except DatabaseError as exc:
            raise DatabaseError(
                f"{exc} (while importing conversation {first.id!r} from line {first.line}; "
                f"the {done} conversations before it are imported, and importing the file "
                "again is safe)"
            ) from exc
        else:
            if created:
                summary.conversations_created += 1
            elif work.changed:
                summary.conversations_updated += 1
            else:
                summary.conversations_unchanged += 1
            summary.messages_imported += work.messages_imported
            summary.messages_already_present += work.messages_present
            summary.usage_imported += work.usage_imported
            summary.usage_already_present += work.usage_present
        done += 1
        if progress is not None:
            progress(1)
    return summary


def import_file(
    store: SessionStore,
    source: str | Path | IO[bytes],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
) -> ImportSummary:
    """Validate ``source`` (a path, ``"-"`` or a binary stream), then import it.

    Raises:
        ExportFormatError: the file is not a valid export (nothing was written).
    """
    with ExportFile(source, max_item_bytes=store.settings.max_item_bytes) as export:
        return import_export(store, export, batch_size=batch_size, progress=progress)
