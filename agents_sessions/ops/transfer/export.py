"""Export: conversations to JSON Lines, streamed from one snapshot.

Export streams: conversations in keyset batches by id, each conversation's messages
and usage rows through a server-side cursor (``stream_results``), all in one snapshot
(``REPEATABLE READ, READ ONLY`` on PostgreSQL; one read transaction on SQLite), so
the file is a consistent picture even while the app writes. Memory never grows with
the messages: per conversation it holds its branch rows and the position of each
message that opened a turn with usage.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from sqlalchemy import (
    Connection,
    Text,
    bindparam,
    func,
    select,
)
from sqlalchemy import cast as sql_cast

from ...db.models import (
    conversations_table,
    messages_table,
    run_states_table,
)
from ...errors import (
    ConversationNotFoundError,
)
from ...store import SessionStore
from ...validation import (
    validate_batch_size,
    validate_identifier,
)
from ..files import atomic_file
from .format import (
    DEFAULT_BATCH_SIZE,
    FORMAT_NAME,
    FORMAT_VERSION,
    Progress,
    TransferCounts,
    encode_line,
    timestamp_text,
)
from .queries import BRANCHES_WITH_POSITIONS, TURN_MESSAGE_IDS, USAGE_OF, positions_of

conversations = conversations_table
messages = messages_table


# --------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------

# The stored text of the item, not the value the driver would parse it into: the
# export must carry the document verbatim (PostgreSQL `json::text` returns it as stored).
_MESSAGES_OF = (
    select(
        messages.c.role,
        messages.c.content,
        messages.c.created_at,
        messages.c.append_key,
        sql_cast(messages.c.item, Text).label("document"),
        messages.c.branch_id,
    )
    .where(messages.c.conversation_id == bindparam("conversation_id"))
    .order_by(messages.c.id)
)

# A paused run: its state document verbatim, like the items.
_RUN_STATE_OF = select(
    run_states_table.c.agent_name,
    run_states_table.c.schema_version,
    run_states_table.c.sdk_version,
    run_states_table.c.approvals,
    sql_cast(run_states_table.c.state, Text).label("state_json"),
    run_states_table.c.created_at,
).where(run_states_table.c.conversation_id == bindparam("conversation_id"))


def _scope_query(conversation_ids: Sequence[str] | None, user_id: str | None) -> Any:
    query = select(conversations)
    if conversation_ids is not None:
        query = query.where(conversations.c.id.in_(conversation_ids))
    if user_id is not None:
        query = query.where(conversations.c.user_id == user_id)
    return query


def _validated_scope(
    conversation_ids: Iterable[str] | None, user_id: str | None
) -> tuple[list[str] | None, str | None]:
    ids = None
    if conversation_ids is not None:
        ids = list(dict.fromkeys(conversation_ids))  # unique, order kept
        for conversation_id in ids:
            validate_identifier(conversation_id)
    if user_id is not None:
        validate_identifier(user_id, name="user_id")
    return ids, user_id


def count_export(
    store: SessionStore,
    *,
    conversation_ids: Iterable[str] | None = None,
    user_id: str | None = None,
) -> int:
    """How many conversations an export with these arguments would hold."""
    ids, user = _validated_scope(conversation_ids, user_id)
    query = select(func.count()).select_from(_scope_query(ids, user).subquery())
    with store.read(lag_tolerant=True) as repos:  # a replica may answer
        return int(repos.connection.execute(query).scalar_one())


def iter_export(
    store: SessionStore,
    *,
    conversation_ids: Iterable[str] | None = None,
    user_id: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
) -> Iterator[bytes]:
    """The export as an iterator of lines (bytes, each ending in ``\\n``).

    Everything when neither ``conversation_ids`` nor ``user_id`` is given; both
    together select the given conversations of that user. Lazy: rows are read from
    the database as lines are consumed, ``batch_size`` at a time, so memory stays
    constant whatever the size of the export. ``progress(1)`` is called after each
    conversation.

    Raises:
        ConversationNotFoundError: one of ``conversation_ids`` does not exist
            (before any line is produced).
    """
    return _export_lines(store, conversation_ids, user_id, batch_size, progress, [0, 0, 0])


def _export_lines(
    store: SessionStore,
    conversation_ids: Iterable[str] | None,
    user_id: str | None,
    batch_size: int,
    progress: Progress | None,
    totals: list[int],
) -> Iterator[bytes]:
    ids, user = _validated_scope(conversation_ids, user_id)
    size = validate_batch_size(batch_size)
    with store.read(lag_tolerant=True) as repos:  # a replica may answer
        connection = repos.connection
        if connection.dialect.name == "postgresql":
            # One snapshot for the whole export: the file is a consistent picture of
            # the database at one instant, however long streaming takes. (SQLite's
            # read transaction gives the same.) READ ONLY: it never blocks writers.
            connection.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        if ids is not None:
            found = set(
                connection.execute(
                    select(conversations.c.id).where(conversations.c.id.in_(ids))
                ).scalars()
            )
            missing = [conversation_id for conversation_id in ids if conversation_id not in found]
            if missing:
                raise ConversationNotFoundError(
                    f"no conversation with id {missing[0]!r}"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                )
        yield encode_line(
            {
                "type": "header",
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "exported_at": timestamp_text(datetime.now(timezone.utc)),
                "source": connection.dialect.name,
                "scope": {"conversation_ids": ids, "user_id": user},
            }
        )
        for row in _conversation_rows(connection, _scope_query(ids, user), size):
            yield from _conversation_lines(connection, row, size, totals)
            if progress is not None:
                progress(1)
        yield encode_line(
            {"type": "end", "conversations": totals[0], "messages": totals[1], "usage": totals[2]}
        )


def _conversation_rows(connection: Connection, query: Any, batch_size: int) -> Iterator[Any]:
    """The scope's conversation rows in id order, ``batch_size`` per keyset page.

    Each page is fetched completely before the rows are used, so no cursor is open
    while the conversation's messages are streamed on the same connection.
    """
    query = query.order_by(conversations.c.id).limit(batch_size)
    last_id: str | None = None
    while True:
        page = query if last_id is None else query.where(conversations.c.id > last_id)
        rows = connection.execute(page).all()
        yield from rows
        if len(rows) < batch_size:
            return
        last_id = rows[-1].id


def _conversation_lines(
    connection: Connection, row: Any, batch_size: int, totals: list[int]
) -> Iterator[bytes]:
    yield encode_line(
        {
            "type": "conversation",
            "id": row.id,
            "user_id": row.user_id,
            "created_at": timestamp_text(row.created_at),
            "updated_at": timestamp_text(row.updated_at),
            "metadata": dict(row.metadata or {}),
            "current_branch": row.current_branch,
            "expires_at": None if row.expires_at is None else timestamp_text(row.expires_at),
        }
    )
    totals[0] += 1
    parameters = {"conversation_id": row.id}
    # stream_results: a server-side cursor on PostgreSQL (psycopg2 named cursor), so
    # a 100k-message conversation arrives batch_size rows at a time, never whole.
    streaming = {"stream_results": True, "max_row_buffer": batch_size}
    position = 0
    result = connection.execute(_MESSAGES_OF, parameters, execution_options=streaming)
    for chunk in result.partitions(batch_size):
        for message in chunk:
            yield encode_line(
                {
                    "type": "message",
                    "conversation_id": row.id,
                    "position": position,
                    "role": message.role,
                    "content": message.content,
                    "created_at": timestamp_text(message.created_at),
                    "append_key": message.append_key,
                    "item_json": message.document,
                    "branch_id": message.branch_id,
                }
            )
            position += 1
    totals[1] += position
    # Branch rows are few per conversation (one per branch ever made).
    for branch in connection.execute(BRANCHES_WITH_POSITIONS, parameters):
        yield encode_line(
            {
                "type": "branch",
                "conversation_id": row.id,
                "branch_id": branch.branch_id,
                "parent_branch_id": branch.parent_branch_id,
                "fork_before_position": branch.fork_before_position,
                "state": branch.state,
                "created_at": timestamp_text(branch.created_at),
            }
        )
    # The usage rows name their turn's message by id: written as its position.
    turns = connection.execute(TURN_MESSAGE_IDS, parameters).scalars().all()
    positions = positions_of(connection, row.id, turns)
    result = connection.execute(USAGE_OF, parameters, execution_options=streaming)
    for chunk in result.partitions(batch_size):
        for usage in chunk:
            yield encode_line(
                {
                    "type": "usage",
                    "conversation_id": row.id,
                    "run_id": usage.run_id,
                    "response_id": usage.response_id,
                    "model": usage.model,
                    "requests": usage.requests,
                    "prompt_tokens": usage.prompt_tokens,
                    "completion_tokens": usage.completion_tokens,
                    "total_tokens": usage.total_tokens,
                    "timestamp": timestamp_text(usage.timestamp),
                    "branch_id": usage.branch_id,
                    "turn_position": positions.get(usage.turn_message_id),
                    "request_index": usage.request_index,
                    "cached_tokens": usage.cached_tokens,
                    "reasoning_tokens": usage.reasoning_tokens,
                    "input_tokens_details": usage.input_tokens_details,
                    "output_tokens_details": usage.output_tokens_details,
                }
            )
            totals[2] += 1
    paused = connection.execute(_RUN_STATE_OF, parameters).one_or_none()
    if paused is not None:
        yield encode_line(
            {
                "type": "run_state",
                "conversation_id": row.id,
                "agent_name": paused.agent_name,
                "schema_version": paused.schema_version,
                "sdk_version": paused.sdk_version,
                "approvals": paused.approvals,
                "state_json": paused.state_json,
                "created_at": timestamp_text(paused.created_at),
            }
        )


def export_conversations(
    store: SessionStore,
    output: IO[bytes],
    *,
    conversation_ids: Iterable[str] | None = None,
    user_id: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
) -> TransferCounts:
    """Write an export (see the module docstring) to the binary stream ``output``.

    Returns the counts written. See :func:`iter_export` for the arguments.
    """
    totals = [0, 0, 0]
    for line in _export_lines(store, conversation_ids, user_id, batch_size, progress, totals):
        output.write(line)
    output.flush()
    return TransferCounts(*totals)


def export_to_file(
    store: SessionStore,
    path: str | Path,
    *,
    conversation_ids: Iterable[str] | None = None,
    user_id: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
) -> TransferCounts:
    """:func:`export_conversations` into the file ``path``, which appears only once complete.

    The file is written under a temporary name, flushed to disk and renamed, so an
    export that failed half-way never looks like one that succeeded. It is readable
    by its owner only: it holds conversations.
    """
    with atomic_file(Path(path).expanduser()) as (output, _):
        return export_conversations(
            store,
            output,
            conversation_ids=conversation_ids,
            user_id=user_id,
            batch_size=batch_size,
            progress=progress,
        )
