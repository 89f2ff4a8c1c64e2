"""Writing one conversation of an export file into a database, idempotently.

:class:`ConversationImport` takes a conversation's validated records in file order,
inside the transaction the importer (:mod:`.import_`) opened for it, and writes
what the database lacks. What it cannot merge raises :class:`Refused`, and the
transaction rolls back: all of the conversation's new rows or none.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

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
    branches_table,
    conversations_table,
    messages_table,
    run_states_table,
    stored_utc,
    usage_logs_table,
)
from ...db.statements import MAIN_BRANCH, unnested_rows
from .queries import (
    BRANCHES_WITH_POSITIONS,
    LAST_MESSAGE_ID,
    USAGE_OF,
    ids_at,
    positions_of,
)
from .records import (
    V1_USAGE_KEY_WIDTH,
    BranchLine,
    ConversationLine,
    MessageLine,
    RunStateLine,
    UsageLine,
    usage_key,
)

conversations = conversations_table
messages = messages_table
usage_logs = usage_logs_table

_INSERT_RUN_STATE: dict[str, Callable[..., Any]] = {
    "postgresql": postgresql.insert,
    "sqlite": sqlite.insert,
}


class Refused(Exception):
    """The conversation cannot be merged: nothing of it is written (its transaction rolls back)."""

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
        branch_id=("branch_ids", Text),
    )
    source = select(
        sql_cast(bindparam("conversation_id"), Text),
        rows.c.role,
        rows.c.content,
        sql_cast(rows.c.document, JSONDocument),
        rows.c.created_at,
        rows.c.append_key,
        rows.c.branch_id,
    ).order_by(rows.c.position)
    return insert(messages).from_select(
        ["conversation_id", "role", "content", "item", "created_at", "append_key", "branch_id"],
        source,
    )


_POSTGRES_INSERT_MESSAGES = _postgres_insert_messages()
_INSERT_MESSAGE = insert(messages).values(
    conversation_id=bindparam("conversation_id"),
    role=bindparam("role"),
    content=bindparam("content"),
    item=bindparam("document", type_=JSONDocument),
    created_at=bindparam("created_at", type_=DateTime(timezone=True)),
    append_key=bindparam("append_key", type_=Text),
    branch_id=bindparam("branch_id", type_=Text),
)
_TAKEN_APPEND_KEYS = select(messages.c.append_key).where(
    messages.c.conversation_id == bindparam("conversation_id"),
    messages.c.append_key.in_(bindparam("append_keys", expanding=True)),
)
_STORED_DOCUMENTS = (
    select(messages.c.id, sql_cast(messages.c.item, Text).label("document"), messages.c.branch_id)
    .where(
        messages.c.conversation_id == bindparam("conversation_id"),
        messages.c.id > bindparam("after_id"),
    )
    .order_by(messages.c.id)
    .limit(bindparam("limit", type_=Integer))
)


def _stored_documents(
    connection: Connection, conversation_id: str, batch: int
) -> Iterator[tuple[str, str]]:
    """The conversation's stored (document, branch) pairs in id order, a keyset page at a time."""
    after_id = -1
    while True:
        rows = connection.execute(
            _STORED_DOCUMENTS,
            {"conversation_id": conversation_id, "after_id": after_id, "limit": batch},
        ).all()
        for row in rows:
            yield row.document, row.branch_id
        if len(rows) < batch:
            return
        after_id = rows[-1].id


class ConversationImport:
    """Import one conversation's records on one connection, inside its transaction.

    Records arrive in the file's order; the messages are all written before the
    first branch, usage or paused-run record is (version 2 puts them first), so
    that positions can be turned into the new messages' ids.
    """

    def __init__(self, connection: Connection, entry: ConversationLine, batch_size: int) -> None:
        self.connection = connection
        self.entry = entry
        self.batch_size = batch_size
        self.changed = False
        self.messages_imported = 0
        self.messages_present = 0
        self.branches_imported = 0
        self.branches_present = 0
        self.usage_imported = 0
        self.usage_present = 0
        self._pending_messages: list[MessageLine] = []
        self._pending_usage: list[UsageLine] = []
        self._stored: Iterator[tuple[str, str]] | None = None
        self._stored_count = 0
        self._stored_branches: dict[str, Any] | None = None
        self._usage_present: Counter[tuple[Any, ...]] | None = None
        # (run_id, request_index) of the stored rows: a request recorded once.
        self._usage_requests: set[tuple[str, int]] = set()
        self._parameters = {"conversation_id": entry.id}

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
        # What a version-1 file does not state stays as stored.
        stated = (
            {
                "current_branch": (
                    None if entry.current_branch == MAIN_BRANCH else entry.current_branch
                ),
                "expires_at": entry.expires_at,
            }
            if entry.stated
            else {}
        )
        if existing is None:
            self.connection.execute(
                insert(conversations).values(
                    id=entry.id,
                    user_id=entry.user_id,
                    created_at=entry.created_at,
                    updated_at=entry.updated_at,
                    metadata=entry.metadata,
                    **stated,
                )
            )
            self.changed = True
            return True
        if existing.user_id != entry.user_id:
            # Owners must agree exactly: a file line with no owner (user_id null) must
            # not append to someone's conversation, nor a named one take over a
            # conversation stored without an owner.
            raise Refused(
                entry.line,
                f"conversation {entry.id!r} has another owner in the database than in "
                f"the file ({entry.user_id!r}); not merged",
            )
        values = {
            "user_id": existing.user_id if entry.user_id is None else entry.user_id,
            "metadata": entry.metadata,
            "created_at": min(stored_utc(existing.created_at), entry.created_at),
            "updated_at": max(stored_utc(existing.updated_at), entry.updated_at),
            **stated,
        }
        current = {
            "user_id": existing.user_id,
            "metadata": dict(existing.metadata or {}),
            "created_at": stored_utc(existing.created_at),
            "updated_at": stored_utc(existing.updated_at),
        }
        if entry.stated:
            current["current_branch"] = existing.current_branch
            current["expires_at"] = (
                None if existing.expires_at is None else stored_utc(existing.expires_at)
            )
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

    # ------------------------------------------------------------------ messages

    def add_message(self, entry: MessageLine) -> None:
        if entry.position < self._stored_count:
            if self._stored is None:
                self._stored = _stored_documents(self.connection, self.entry.id, self.batch_size)
            document, branch_id = next(self._stored)
            # A version-1 line names no branch: its document alone decides, as before.
            if document != entry.document or entry.branch_id not in (None, branch_id):
                raise Refused(
                    entry.line,
                    f"conversation {self.entry.id!r}: message {entry.position} (line "
                    f"{entry.line}) differs from the one stored at that position; not merged",
                )
            self.messages_present += 1
            return
        self._pending_messages.append(entry)
        if len(self._pending_messages) >= self.batch_size:
            self.flush_messages()

    def flush_messages(self) -> None:
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
                raise Refused(
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
                    "branch_ids": [entry.branch_id or MAIN_BRANCH for entry in batch],
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
                        "branch_id": entry.branch_id or MAIN_BRANCH,
                    }
                    for entry in batch
                ],
            )
        self.messages_imported += len(batch)
        self.changed = True
        self._pending_messages = []

    def _bound_at(self, position: int | None) -> int | None:
        """A fork bound for ``position``: the id of the message there, or past the last.

        Past the last message, the bound is one above its id: every message now is
        below it, every message appended later (ids only grow) is not -- as before
        the export.
        """
        if position is None:
            return None
        found = ids_at(self.connection, self.entry.id, {position})
        if position in found:
            return found[position]
        last = self.connection.execute(LAST_MESSAGE_ID, self._parameters).scalar()
        return 1 if last is None else int(last) + 1

    # ------------------------------------------------------------------ branches

    def add_branch(self, entry: BranchLine) -> None:
        self.flush_messages()
        if self._stored_branches is None:
            self._stored_branches = {
                row.branch_id: row
                for row in self.connection.execute(BRANCHES_WITH_POSITIONS, self._parameters)
            }
        stored = self._stored_branches.get(entry.branch_id)
        if stored is not None:
            if entry.key() != (
                stored.parent_branch_id,
                stored.fork_before_position,
                stored.state,
                stored_utc(stored.created_at),
            ):
                raise Refused(
                    entry.line,
                    f"conversation {self.entry.id!r}: branch {entry.branch_id!r} (line "
                    f"{entry.line}) differs from the stored branch of that name "
                    f"(parent {stored.parent_branch_id!r}, fork before message "
                    f"{stored.fork_before_position}, {stored.state}); not merged",
                )
            self.branches_present += 1
            return
        self.connection.execute(
            insert(branches_table).values(
                conversation_id=self.entry.id,
                branch_id=entry.branch_id,
                parent_branch_id=entry.parent_branch_id,
                fork_before_id=self._bound_at(entry.fork_before_position),
                state=entry.state,
                created_at=entry.created_at,
            )
        )
        self.branches_imported += 1
        self.changed = True

    # ------------------------------------------------------------------ usage

    def add_usage(self, entry: UsageLine, version: int) -> None:
        self.flush_messages()
        width = V1_USAGE_KEY_WIDTH if version < 2 else None
        if self._usage_present is None:
            # A multiset: two identical usage rows in the file are two rows; each
            # matches at most one stored row.
            self._usage_present = Counter()
            rows = self.connection.execute(USAGE_OF, self._parameters).all()
            turns = [row.turn_message_id for row in rows if row.turn_message_id is not None]
            positions = positions_of(self.connection, self.entry.id, turns)
            for row in rows:
                key = usage_key(row, positions.get(row.turn_message_id))
                self._usage_present[key[:width]] += 1
                if row.run_id is not None and row.request_index is not None:
                    self._usage_requests.add((row.run_id, row.request_index))
        key = entry.key()[:width]
        if self._usage_present[key] > 0:
            self._usage_present[key] -= 1
            self.usage_present += 1
            return
        if (
            entry.run_id is not None
            and entry.request_index is not None
            and (entry.run_id, entry.request_index) in self._usage_requests
        ):
            raise Refused(
                entry.line,
                f"conversation {self.entry.id!r}: request {entry.request_index} of run "
                f"{entry.run_id!r} (line {entry.line}) is stored with other usage; not merged",
            )
        self._pending_usage.append(entry)
        if len(self._pending_usage) >= self.batch_size:
            self._flush_usage()

    def _flush_usage(self) -> None:
        if not self._pending_usage:
            return
        turns = {entry.turn_position for entry in self._pending_usage}
        ids = ids_at(self.connection, self.entry.id, {p for p in turns if p is not None})
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
                    "branch_id": entry.branch_id,
                    "turn_message_id": (
                        None if entry.turn_position is None else ids[entry.turn_position]
                    ),
                    "request_index": entry.request_index,
                    "cached_tokens": entry.cached_tokens,
                    "reasoning_tokens": entry.reasoning_tokens,
                    "input_tokens_details": entry.input_tokens_details,
                    "output_tokens_details": entry.output_tokens_details,
                }
                for entry in self._pending_usage
            ],
        )
        self.usage_imported += len(self._pending_usage)
        self.changed = True
        self._pending_usage = []

    # ------------------------------------------------------------------ paused run

    def add_run_state(self, entry: RunStateLine) -> bool:
        """Store the paused run unless the conversation has one; True when stored."""
        self.finish()  # its conversation's other rows first
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
        self.flush_messages()
        self._flush_usage()
