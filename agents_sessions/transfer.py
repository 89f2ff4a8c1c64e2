"""Export and import conversations as versioned, self-describing JSON Lines.

The format (version 1), one JSON object per line, UTF-8::

    {"type":"header","format":"agents-sessions-export","version":1,"exported_at":...,"source":...,"scope":...}
    {"type":"conversation","id":"c1","user_id":"u1","created_at":...,"updated_at":...,"metadata":{...}}
    {"type":"message","conversation_id":"c1","position":0,"role":"user","content":"Hi","created_at":...,"append_key":null,"item_json":"{\\"role\\":\\"user\\",\\"content\\":\\"Hi\\"}"}
    {"type":"usage","conversation_id":"c1","run_id":null,"response_id":"resp_1","model":"gpt-4.1","requests":1,"prompt_tokens":12,"completion_tokens":30,"total_tokens":42,"timestamp":...}
    {"type":"end","conversations":1,"messages":1,"usage":1}

* Each conversation line is followed by its messages (``position`` 0, 1, 2, ... in
  history order) and its usage rows. Timestamps are ISO 8601 in UTC.
* ``item_json`` is the stored JSON document of the item **as a string**, verbatim:
  key order, number spelling and ``\\u0000`` escapes survive the round trip
  byte for byte (see :class:`agents_sessions.models.JSONDocument`).
* ``append_key`` is the exactly-once key of the append call that wrote the row
  (on the first row of a keyed call; else null), kept so that a retried append
  still finds it after an import.
* The ``end`` line carries the totals, so a truncated file is recognised and refused.

Export streams with constant memory: conversations in keyset batches by id, each
conversation's messages through a server-side cursor (``stream_results``), all in
one snapshot (``REPEATABLE READ, READ ONLY`` on PostgreSQL; one read transaction on
SQLite), so the file is a consistent picture even while the app writes.

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
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, cast

from sqlalchemy import (
    ARRAY,
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

from .backup import atomic_file
from .errors import AgentsSessionsError, DatabaseError, InvalidArgumentError
from .items import MAX_NESTING_DEPTH
from .models import (
    JSONDocument,
    conversations_table,
    messages_table,
    usage_logs_table,
)
from .store import SessionStore
from .validation import (
    validate_count,
    validate_identifier,
    validate_metadata,
    validate_text,
)

conversations = conversations_table
messages = messages_table
usage_logs = usage_logs_table

#: The ``format`` value of the header line.
FORMAT_NAME = "agents-sessions-export"
#: The format version this module writes (and the only one it reads).
FORMAT_VERSION = 1

#: Rows per batch: conversations per keyset page on export, rows per INSERT on import.
DEFAULT_BATCH_SIZE = 500

Progress = Callable[[int], None]


class ExportFormatError(AgentsSessionsError, ValueError):
    """An import file is not a valid export; nothing was written.

    Attributes:
        line: The 1-based number of the offending line.
    """

    def __init__(self, line: int, message: str) -> None:
        self.line = line
        super().__init__(f"line {line}: {message}; nothing was imported")


class ConversationNotFoundError(AgentsSessionsError, LookupError):
    """A conversation asked for by id does not exist."""


@dataclass(frozen=True)
class TransferCounts:
    """How many rows an export holds."""

    conversations: int
    messages: int
    usage_rows: int


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
    refused: list[RefusedConversation] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The summary as JSON-ready data."""
        return asdict(self)


# --------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------


def _as_utc(value: datetime) -> datetime:
    """A stored timestamp as aware UTC (SQLite gives naive UTC, PostgreSQL aware)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def _validated_batch_size(batch_size: object) -> int:
    size = validate_count(batch_size, name="batch_size")
    if size < 1:
        raise InvalidArgumentError("batch_size must be at least 1")
    return size


def _timestamp_text(value: datetime) -> str:
    return _as_utc(value).isoformat(timespec="microseconds")


def _line(record: dict[str, Any]) -> bytes:
    try:
        text = json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return text.encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        # A lone surrogate somewhere: the \\u escape form is plain ASCII and reads back equal.
        text = json.dumps(record, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
        return text.encode("ascii") + b"\n"


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
    )
    .where(messages.c.conversation_id == bindparam("conversation_id"))
    .order_by(messages.c.id)
)
_USAGE_OF = (
    select(usage_logs)
    .where(usage_logs.c.conversation_id == bindparam("conversation_id"))
    .order_by(usage_logs.c.id)
)


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
    size = _validated_batch_size(batch_size)
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
        yield _line(
            {
                "type": "header",
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "exported_at": _timestamp_text(datetime.now(timezone.utc)),
                "source": connection.dialect.name,
                "scope": {"conversation_ids": ids, "user_id": user},
            }
        )
        for row in _conversation_rows(connection, _scope_query(ids, user), size):
            yield from _conversation_lines(connection, row, size, totals)
            if progress is not None:
                progress(1)
        yield _line(
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
    yield _line(
        {
            "type": "conversation",
            "id": row.id,
            "user_id": row.user_id,
            "created_at": _timestamp_text(row.created_at),
            "updated_at": _timestamp_text(row.updated_at),
            "metadata": dict(row.metadata or {}),
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
            yield _line(
                {
                    "type": "message",
                    "conversation_id": row.id,
                    "position": position,
                    "role": message.role,
                    "content": message.content,
                    "created_at": _timestamp_text(message.created_at),
                    "append_key": message.append_key,
                    "item_json": message.document,
                }
            )
            position += 1
    totals[1] += position
    result = connection.execute(_USAGE_OF, parameters, execution_options=streaming)
    for chunk in result.partitions(batch_size):
        for usage in chunk:
            yield _line(
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
                    "timestamp": _timestamp_text(usage.timestamp),
                }
            )
            totals[2] += 1


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


# --------------------------------------------------------------------------------------
# Reading and validating a file
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Header:
    line: int
    version: int


@dataclass(frozen=True)
class _ConversationEntry:
    line: int
    id: str
    user_id: str | None
    created_at: datetime
    updated_at: datetime
    metadata: dict[str, Any]


@dataclass(frozen=True)
class _MessageEntry:
    line: int
    conversation_id: str
    position: int
    role: str
    content: str
    created_at: datetime
    append_key: str | None
    document: str


@dataclass(frozen=True)
class _UsageEntry:
    line: int
    conversation_id: str
    run_id: str | None
    response_id: str | None
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    timestamp: datetime

    def key(self) -> tuple[Any, ...]:
        """Every column but ``id``: what makes two usage rows the same row."""
        return (
            self.run_id,
            self.response_id,
            self.model,
            self.requests,
            self.prompt_tokens,
            self.completion_tokens,
            self.total_tokens,
            self.timestamp,
        )


@dataclass(frozen=True)
class _End:
    line: int
    counts: TransferCounts


_Entry = _Header | _ConversationEntry | _MessageEntry | _UsageEntry | _End

_FIELDS = {
    "conversation": {"type", "id", "user_id", "created_at", "updated_at", "metadata"},
    "message": {
        "type",
        "conversation_id",
        "position",
        "role",
        "content",
        "created_at",
        "append_key",
        "item_json",
    },
    "usage": {
        "type",
        "conversation_id",
        "run_id",
        "response_id",
        "model",
        "requests",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "timestamp",
    },
    "end": {"type", "conversations", "messages", "usage"},
}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _nesting_exceeds(value: Any, limit: int) -> bool:
    stack = [(value, 0)]
    while stack:
        current, depth = stack.pop()
        if isinstance(current, dict | list):
            if depth >= limit:
                return True
            children = current.values() if isinstance(current, dict) else current
            stack.extend((child, depth + 1) for child in children)
    return False


class _Record:
    """One parsed line, with typed accessors that name the line and field on error."""

    def __init__(self, line: int, data: dict[str, Any]) -> None:
        self.line = line
        self.data = data
        self.kind = data.get("type")

    def fail(self, message: str) -> ExportFormatError:
        return ExportFormatError(self.line, message)

    def check_fields(self) -> None:
        expected = _FIELDS[cast(str, self.kind)]
        missing = sorted(expected - self.data.keys())
        if missing:
            raise self.fail(f"{self.kind} record lacks {', '.join(missing)}")
        unknown = sorted(self.data.keys() - expected)
        if unknown:
            raise self.fail(f"{self.kind} record has unknown field(s) {', '.join(unknown)}")

    def _wrap(self, check: Callable[[], Any]) -> Any:
        try:
            return check()
        except (AgentsSessionsError, ValueError, TypeError) as exc:
            raise self.fail(f"{self.kind}.{exc}") from None

    def identifier(self, name: str, *, optional: bool = False) -> Any:
        value = self.data[name]
        if value is None and optional:
            return None
        return self._wrap(lambda: validate_identifier(value, name=name))

    def text(self, name: str, *, optional: bool = False) -> Any:
        value = self.data[name]
        return self._wrap(lambda: validate_text(value, name=name, optional=optional))

    def count(self, name: str) -> int:
        value = self.data[name]
        return cast(int, self._wrap(lambda: validate_count(value, name=name)))

    def timestamp(self, name: str) -> datetime:
        value = self.data[name]
        if not isinstance(value, str):
            raise self.fail(f"{self.kind}.{name} must be an ISO 8601 timestamp string")
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise self.fail(
                f"{self.kind}.{name} is not an ISO 8601 timestamp: {_short(value)}"
            ) from None
        if parsed.tzinfo is None:
            raise self.fail(f"{self.kind}.{name} has no UTC offset: {_short(value)}")
        return parsed.astimezone(timezone.utc)

    def metadata(self) -> dict[str, Any]:
        value = self.data["metadata"]
        if not isinstance(value, dict):
            raise self.fail("conversation.metadata must be a JSON object")
        checked = self._wrap(lambda: validate_metadata(value))
        return cast(dict[str, Any], checked)

    def document(self) -> str:
        value = self.data["item_json"]
        if not isinstance(value, str):
            raise self.fail("message.item_json must be a string holding the item's JSON text")
        try:
            value.encode("utf-8")
            item = json.loads(value, parse_constant=_reject_constant)
        except UnicodeEncodeError:
            raise self.fail("message.item_json is not valid Unicode text") from None
        except RecursionError:
            raise self.fail("message.item_json is nested too deeply") from None
        except ValueError as exc:
            raise self.fail(f"message.item_json is not valid JSON ({exc})") from None
        if not isinstance(item, dict):
            raise self.fail("message.item_json must hold a JSON object (an item)")
        if _nesting_exceeds(item, MAX_NESTING_DEPTH):
            raise self.fail(f"message.item_json is nested deeper than {MAX_NESTING_DEPTH} levels")
        return value


def _parse_line(number: int, raw: bytes) -> _Record:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ExportFormatError(number, f"not UTF-8 text ({exc.reason})") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ExportFormatError(number, "nested too deeply") from None
    except ValueError as exc:
        raise ExportFormatError(number, f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ExportFormatError(number, "not a JSON object")
    record = _Record(number, data)
    if number > 1 and record.kind not in _FIELDS:
        raise ExportFormatError(number, f"unknown record type {_short(record.kind)}")
    return record


def _entries(lines: Iterable[bytes]) -> Iterator[_Entry]:
    """Parse and validate an export, line by line; the file's structure too.

    Raises :class:`ExportFormatError` at the first problem. Constant memory: only
    the current conversation's id and counters are kept.
    """
    current: _ConversationEntry | None = None
    next_position = 0
    # The current conversation's append keys (one per keyed append call: small).
    append_keys: set[str] = set()
    totals = [0, 0, 0]
    end: _End | None = None
    number = 0
    for number, raw in enumerate(lines, start=1):
        if raw.endswith(b"\n"):
            raw = raw[:-1]
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if end is not None:
            if raw.strip():
                raise ExportFormatError(number, "text after the end record")
            continue
        if not raw.strip():
            raise ExportFormatError(number, "empty line")
        record = _parse_line(number, raw)
        data = record.data
        if number == 1:
            if record.kind != "header" or data.get("format") != FORMAT_NAME:
                raise ExportFormatError(
                    1, f"not an agents-sessions export (no {FORMAT_NAME!r} header)"
                )
            if data.get("version") != FORMAT_VERSION:
                raise ExportFormatError(
                    1,
                    f"format version {_short(data.get('version'))} is not supported "
                    f"(this version of agents_sessions reads version {FORMAT_VERSION})",
                )
            yield _Header(line=1, version=FORMAT_VERSION)
            continue
        record.check_fields()
        if record.kind == "conversation":
            current = _ConversationEntry(
                line=number,
                id=record.identifier("id"),
                user_id=record.identifier("user_id", optional=True),
                created_at=record.timestamp("created_at"),
                updated_at=record.timestamp("updated_at"),
                metadata=record.metadata(),
            )
            next_position = 0
            append_keys.clear()
            totals[0] += 1
            yield current
            continue
        if record.kind == "end":
            counts = TransferCounts(
                record.count("conversations"), record.count("messages"), record.count("usage")
            )
            if counts != TransferCounts(*totals):
                raise ExportFormatError(
                    number,
                    f"the end record announces {counts.conversations} conversations, "
                    f"{counts.messages} messages and {counts.usage_rows} usage rows, but the "
                    f"file holds {totals[0]}, {totals[1]} and {totals[2]}",
                )
            end = _End(line=number, counts=counts)
            yield end
            continue
        conversation_id = record.identifier("conversation_id")
        if current is None or conversation_id != current.id:
            raise ExportFormatError(
                number,
                f"{record.kind} record of conversation {_short(conversation_id)} does not "
                "follow that conversation's record",
            )
        if record.kind == "message":
            position = record.count("position")
            if position != next_position:
                raise ExportFormatError(
                    number,
                    f"message position {position} where {next_position} was expected "
                    "(a message is missing or out of order)",
                )
            next_position += 1
            totals[1] += 1
            append_key = record.text("append_key", optional=True)
            if append_key is not None:
                # Unique per conversation in the database (exactly-once appends).
                if append_key in append_keys:
                    raise ExportFormatError(
                        number,
                        f"message.append_key {_short(append_key)} appears twice in "
                        f"conversation {_short(conversation_id)}",
                    )
                append_keys.add(append_key)
            yield _MessageEntry(
                line=number,
                conversation_id=conversation_id,
                position=position,
                role=cast(str, record.text("role")),
                content=cast(str, record.text("content")),
                created_at=record.timestamp("created_at"),
                append_key=append_key,
                document=record.document(),
            )
        else:
            model = cast(str, record.text("model"))
            if not model:
                raise ExportFormatError(number, "usage.model must not be empty")
            totals[2] += 1
            yield _UsageEntry(
                line=number,
                conversation_id=conversation_id,
                run_id=record.text("run_id", optional=True),
                response_id=record.text("response_id", optional=True),
                model=model,
                requests=record.count("requests"),
                prompt_tokens=record.count("prompt_tokens"),
                completion_tokens=record.count("completion_tokens"),
                total_tokens=record.count("total_tokens"),
                timestamp=record.timestamp("timestamp"),
            )
    if number == 0:
        raise ExportFormatError(1, "the file is empty")
    if end is None:
        raise ExportFormatError(
            number + 1, "the file ends without its end record (truncated export?)"
        )


class ExportFile:
    """An export file opened for import: validated completely on opening.

    ``source`` is a path, ``"-"`` for standard input, or a binary stream. A stream
    that cannot seek (a pipe) is first copied to a temporary file, so that the file
    can be validated before anything is written and then read again to import.
    Use as a context manager (closes what it opened)::

        with ExportFile("backup.jsonl") as export:
            print(export.counts)
            summary = import_export(store, export)

    Raises:
        ExportFormatError: naming the first bad line.
    """

    def __init__(self, source: str | Path | IO[bytes]) -> None:
        self._owned: IO[bytes] | None = None
        if isinstance(source, str | Path):
            if str(source) == "-":
                stream: IO[bytes] = sys.stdin.buffer
            else:
                stream = self._owned = open(source, "rb")  # noqa: SIM115 - closed by close()
        else:
            stream = source
        try:
            if not stream.seekable():
                spool = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
                shutil.copyfileobj(stream, spool)
                if self._owned is not None:
                    self._owned.close()
                stream = self._owned = spool
            self._stream = stream
            self._start = stream.tell()
            counts: TransferCounts | None = None
            for entry in _entries(self._lines()):
                if isinstance(entry, _End):
                    counts = entry.counts
            assert counts is not None  # _entries raises when the end record is missing
            self.counts = counts
        except BaseException:
            self.close()
            raise

    def _lines(self) -> Iterator[bytes]:
        self._stream.seek(self._start)
        yield from self._stream

    def entries(self) -> Iterator[Any]:
        """The validated records of the file, in order (re-read from the file)."""
        return _entries(self._lines())

    def close(self) -> None:
        """Close the file (or temporary copy) this object opened."""
        if self._owned is not None:
            self._owned.close()
            self._owned = None

    def __enter__(self) -> ExportFile:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------


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
    rows = (
        func.unnest(
            bindparam("roles", type_=ARRAY(Text)),
            bindparam("contents", type_=ARRAY(Text)),
            bindparam("documents", type_=ARRAY(Text)),
            bindparam("created", type_=ARRAY(DateTime(timezone=True))),
            bindparam("append_keys", type_=ARRAY(Text)),
        )
        .table_valued(
            "role", "content", "document", "created_at", "append_key", with_ordinality="position"
        )
        .render_derived(name="imported")
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

    def __init__(self, connection: Connection, entry: _ConversationEntry, batch_size: int) -> None:
        self.connection = connection
        self.entry = entry
        self.batch_size = batch_size
        self.changed = False
        self.messages_imported = 0
        self.messages_present = 0
        self.usage_imported = 0
        self.usage_present = 0
        self._pending_messages: list[_MessageEntry] = []
        self._pending_usage: list[_UsageEntry] = []
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
        if (
            existing.user_id is not None
            and entry.user_id is not None
            and existing.user_id != entry.user_id
        ):
            raise _Refused(
                entry.line,
                f"conversation {entry.id!r} belongs to another user in the database "
                f"than in the file ({entry.user_id!r}); not merged",
            )
        values = {
            "user_id": existing.user_id if entry.user_id is None else entry.user_id,
            "metadata": entry.metadata,
            "created_at": min(_as_utc(existing.created_at), entry.created_at),
            "updated_at": max(_as_utc(existing.updated_at), entry.updated_at),
        }
        current = {
            "user_id": existing.user_id,
            "metadata": dict(existing.metadata or {}),
            "created_at": _as_utc(existing.created_at),
            "updated_at": _as_utc(existing.updated_at),
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

    def add_message(self, entry: _MessageEntry) -> None:
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

    def add_usage(self, entry: _UsageEntry) -> None:
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
                    _as_utc(row.timestamp),
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

    def finish(self) -> None:
        self._flush_messages()
        self._flush_usage()


def _blocks(entries: Iterable[Any]) -> Iterator[tuple[int, Any]]:
    """Tag each record with the number of its conversation block (0: header and end)."""
    block = 0
    for entry in entries:
        if isinstance(entry, _ConversationEntry):
            block += 1
        yield (0 if isinstance(entry, _Header | _End) else block), entry


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
    size = _validated_batch_size(batch_size)
    summary = ImportSummary()
    done = 0
    # groupby streams: one conversation's records at a time, never the whole file.
    for block, tagged in itertools.groupby(_blocks(export.entries()), key=lambda pair: pair[0]):
        if block == 0:
            continue
        group = (entry for _, entry in tagged)
        first = next(group)
        assert isinstance(first, _ConversationEntry)  # the validation guarantees it
        try:
            with store.transaction() as repos:
                work = _ConversationImport(repos.connection, first, size)
                created = work.upsert_conversation()
                for entry in group:
                    if isinstance(entry, _MessageEntry):
                        work.add_message(entry)
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
    with ExportFile(source) as export:
        return import_export(store, export, batch_size=batch_size, progress=progress)


__all__ = [
    "DEFAULT_BATCH_SIZE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ConversationNotFoundError",
    "ExportFile",
    "ExportFormatError",
    "ImportSummary",
    "RefusedConversation",
    "TransferCounts",
    "count_export",
    "export_conversations",
    "export_to_file",
    "import_export",
    "import_file",
    "iter_export",
]
