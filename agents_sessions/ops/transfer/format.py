"""The export file format: versioned, self-describing JSON Lines, written and validated.

The format (version 1), one JSON object per line, UTF-8::

    {"type":"header","format":"agents-sessions-export","version":1,"exported_at":...,"source":...,"scope":...}
    {"type":"conversation","id":"c1","user_id":"u1","created_at":...,"updated_at":...,"metadata":{...}}
    {"type":"message","conversation_id":"c1","position":0,"role":"user","content":"Hi","created_at":...,"append_key":null,"item_json":"{\\"role\\":\\"user\\",\\"content\\":\\"Hi\\"}"}
    {"type":"usage","conversation_id":"c1","run_id":null,"response_id":"resp_1","model":"gpt-4.1","requests":1,"prompt_tokens":12,"completion_tokens":30,"total_tokens":42,"timestamp":...}
    {"type":"run_state","conversation_id":"c1","agent_name":"support","schema_version":"1.21","sdk_version":"0.24.0","approvals":[...],"state_json":"{...}","created_at":...}
    {"type":"end","conversations":1,"messages":1,"usage":1}

* Each conversation line is followed by its messages (``position`` 0, 1, 2, ... in
  history order) and its usage rows. Timestamps are ISO 8601 in UTC.
* ``item_json`` is the stored JSON document of the item **as a string**, verbatim:
  key order, number spelling and ``\\u0000`` escapes survive the round trip
  byte for byte (see :class:`agents_sessions.db.models.JSONDocument`).
* ``append_key`` is the exactly-once key of the append call that wrote the row
  (on the first row of a keyed call; else null), kept so that a retried append
  still finds it after an import.
* ``run_state`` (at most one per conversation, after its usage rows) is a paused
  agent run awaiting approval: the SDK's ``RunState`` JSON as a string, verbatim.
  Not counted in the ``end`` line, so files without paused runs are unchanged.
* The ``end`` line carries the totals, so a truncated file is recognised and refused.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, cast

from ...db.models import (
    stored_utc,
)
from ...errors import (
    AgentsSessionsError,
    ExportFormatError,
    InvalidItemError,
    ItemTypeError,
)
from ...items import MAX_NESTING_DEPTH, encode_items, utf8_safe_json
from ...validation import (
    validate_count,
    validate_identifier,
    validate_metadata,
    validate_text,
)

FORMAT_NAME = "agents-sessions-export"
#: The longest line read when no ``max_item_bytes`` is given (64 MiB); with one,
#: 12 bytes per item byte plus 64 KiB for the record's other fields.
MAX_LINE_BYTES = 64 << 20
#: The format version this module writes (and the only one it reads).
FORMAT_VERSION = 1

#: Rows per batch: conversations per keyset page on export, rows per INSERT on import.
DEFAULT_BATCH_SIZE = 500

Progress = Callable[[int], None]


@dataclass(frozen=True)
class TransferCounts:
    """How many rows an export holds."""

    conversations: int
    messages: int
    usage_rows: int


def timestamp_text(value: datetime) -> str:
    return stored_utc(value).isoformat(timespec="microseconds")


def encode_line(record: dict[str, Any]) -> bytes:
    options: dict[str, Any] = {"separators": (",", ":"), "allow_nan": False}
    text = json.dumps(record, ensure_ascii=False, **options)
    return utf8_safe_json(text, record, **options).encode("utf-8") + b"\n"


# --------------------------------------------------------------------------------------
# Reading and validating a file
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeaderLine:
    line: int
    version: int


@dataclass(frozen=True)
class ConversationLine:
    line: int
    id: str
    user_id: str | None
    created_at: datetime
    updated_at: datetime
    metadata: dict[str, Any]


@dataclass(frozen=True)
class MessageLine:
    line: int
    conversation_id: str
    position: int
    role: str
    content: str
    created_at: datetime
    append_key: str | None
    document: str


@dataclass(frozen=True)
class UsageLine:
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
class RunStateLine:
    line: int
    conversation_id: str
    agent_name: str
    schema_version: str
    sdk_version: str
    approvals: list[dict[str, Any]]
    state_json: str
    created_at: datetime


@dataclass(frozen=True)
class EndLine:
    line: int
    counts: TransferCounts


Line = HeaderLine | ConversationLine | MessageLine | UsageLine | RunStateLine | EndLine

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
    "run_state": {
        "type",
        "conversation_id",
        "agent_name",
        "schema_version",
        "sdk_version",
        "approvals",
        "state_json",
        "created_at",
    },
    "end": {"type", "conversations", "messages", "usage"},
}

_APPROVAL_FIELDS = {"tool_name", "arguments", "call_id"}


def _run_state_line(number: int, record: Any, conversation_id: str) -> RunStateLine:
    """A validated ``run_state`` record (see the module docstring)."""
    approvals = record.data["approvals"]
    if not isinstance(approvals, list) or not all(
        isinstance(entry, dict)
        and entry.keys() == _APPROVAL_FIELDS
        and all(value is None or isinstance(value, str) for value in entry.values())
        for entry in approvals
    ):
        raise ExportFormatError(
            number, "run_state.approvals must be a list of {tool_name, arguments, call_id}"
        )
    state_json = cast(str, record.text("state_json"))
    try:
        state = json.loads(state_json, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        state = None
    if not isinstance(state, dict):
        raise ExportFormatError(number, "run_state.state_json is not a JSON object")
    return RunStateLine(
        line=number,
        conversation_id=conversation_id,
        agent_name=cast(str, record.text("agent_name")),
        schema_version=cast(str, record.text("schema_version")),
        sdk_version=cast(str, record.text("sdk_version")),
        approvals=approvals,
        state_json=state_json,
        created_at=record.timestamp("created_at"),
    )


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
        try:
            return parsed.astimezone(timezone.utc)
        except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00: before year 1 in UTC
            raise self.fail(f"{self.kind}.{name} is out of range in UTC: {_short(value)}") from None

    def metadata(self) -> dict[str, Any]:
        value = self.data["metadata"]
        if not isinstance(value, dict):
            raise self.fail("conversation.metadata must be a JSON object")
        checked = self._wrap(lambda: validate_metadata(value))
        return cast(dict[str, Any], checked)

    def document(self, max_item_bytes: int | None) -> tuple[str, str, str]:
        """The item's stored JSON text (verbatim), and its role and content derived
        from the item as the session derives them (the file's are not trusted)."""
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
        # What add_items would refuse, import refuses too (1e999 reads as infinity,
        # an item above max_item_bytes, a surrogate pair as two code points...).
        try:
            (encoded,) = encode_items([item], max_item_bytes=None)
        except (ItemTypeError, InvalidItemError) as exc:
            raise self.fail(f"message.item_json: {exc}".replace("items[0]", "the item")) from None
        if max_item_bytes is not None and len(value.encode("utf-8")) > max_item_bytes:
            raise self.fail(
                f"message.item_json is larger than max_item_bytes ({max_item_bytes:,} bytes), "
                "which the session refuses too"
            )
        return value, encoded.role, encoded.content


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


def parse_lines(lines: Iterable[bytes], *, max_item_bytes: int | None = None) -> Iterator[Line]:
    """Parse and validate an export, line by line; the file's structure too.

    Raises :class:`ExportFormatError` at the first problem. Constant memory: only
    the current conversation's id and counters are kept.
    """
    current: ConversationLine | None = None
    next_position = 0
    run_state_seen = False
    # The current conversation's append keys (one per keyed append call: small).
    append_keys: set[str] = set()
    totals = [0, 0, 0]
    end: EndLine | None = None
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
            yield HeaderLine(line=1, version=FORMAT_VERSION)
            continue
        record.check_fields()
        if record.kind == "conversation":
            current = ConversationLine(
                line=number,
                id=record.identifier("id"),
                user_id=record.identifier("user_id", optional=True),
                created_at=record.timestamp("created_at"),
                updated_at=record.timestamp("updated_at"),
                metadata=record.metadata(),
            )
            next_position = 0
            run_state_seen = False
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
            end = EndLine(line=number, counts=counts)
            yield end
            continue
        conversation_id = record.identifier("conversation_id")
        if current is None or conversation_id != current.id:
            raise ExportFormatError(
                number,
                f"{record.kind} record of conversation {_short(conversation_id)} does not "
                "follow that conversation's record",
            )
        if record.kind == "run_state":
            if run_state_seen:
                raise ExportFormatError(
                    number, f"a second run_state of conversation {_short(conversation_id)}"
                )
            run_state_seen = True
            yield _run_state_line(number, record, conversation_id)
            continue
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
            record.text("role")  # checked for the format, then derived from the item
            record.text("content")
            document, role, content = record.document(max_item_bytes)
            yield MessageLine(
                line=number,
                conversation_id=conversation_id,
                position=position,
                role=role,
                content=content,
                created_at=record.timestamp("created_at"),
                append_key=append_key,
                document=document,
            )
        else:
            model = cast(str, record.text("model"))
            if not model:
                raise ExportFormatError(number, "usage.model must not be empty")
            totals[2] += 1
            yield UsageLine(
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

    def __init__(
        self, source: str | Path | IO[bytes], *, max_item_bytes: int | None = None
    ) -> None:
        self._owned: IO[bytes] | None = None
        self._max_item_bytes = max_item_bytes
        # A line holds at most one item, each character escaped at worst to 12
        # bytes (a \\uXXXX escape, itself escaped), plus its other fields: a bound on
        # the memory one line may take.
        self._max_line_bytes = (
            MAX_LINE_BYTES if max_item_bytes is None else 12 * max_item_bytes + (1 << 16)
        )
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
            for entry in parse_lines(self._lines(), max_item_bytes=self._max_item_bytes):
                if isinstance(entry, EndLine):
                    counts = entry.counts
            assert counts is not None  # _entries raises when the end record is missing
            self.counts = counts
        except BaseException:
            self.close()
            raise

    def _lines(self) -> Iterator[bytes]:
        self._stream.seek(self._start)
        number = 0
        while line := self._stream.readline(self._max_line_bytes + 1):
            number += 1
            if len(line) > self._max_line_bytes:
                raise ExportFormatError(
                    number,
                    f"longer than {self._max_line_bytes:,} bytes, more than any record "
                    "this package writes (raise max_item_bytes if its items are larger)",
                )
            yield line

    def entries(self) -> Iterator[Any]:
        """The validated records of the file, in order (re-read from the file)."""
        return parse_lines(self._lines(), max_item_bytes=self._max_item_bytes)

    def close(self) -> None:
        """Close the file (or temporary copy) this object opened."""
        if self._owned is not None:
            self._owned.close()
            self._owned = None

    def __enter__(self) -> ExportFile:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
