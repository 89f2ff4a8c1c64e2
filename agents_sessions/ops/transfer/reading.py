"""Reading an export file: each line parsed and validated, and the file's structure.

:func:`parse_lines` turns lines into the records of :mod:`.records`, raising
:class:`~agents_sessions.errors.ExportFormatError` (naming the line and the field) at
the first problem, so that nothing of a bad file is ever written. It reads versions
1 and 2 of the format specified in :mod:`.format`'s docstring.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from typing import Any, cast

from ...db.statements import MAIN_BRANCH
from ...errors import (
    AgentsSessionsError,
    ExportFormatError,
    InvalidItemError,
    ItemTypeError,
)
from ...history import validate_branch_name
from ...items import MAX_NESTING_DEPTH, encode_items
from ...validation import (
    validate_count,
    validate_identifier,
    validate_metadata,
    validate_text,
)
from .records import (
    BRANCH_STATES,
    FIELDS,
    FORMAT_NAME,
    READABLE_VERSIONS,
    BranchLine,
    ConversationLine,
    EndLine,
    HeaderLine,
    Line,
    MessageLine,
    RunStateLine,
    TransferCounts,
    UsageLine,
)
from .structure import ConversationBlock, short

_APPROVAL_FIELDS = {"tool_name", "arguments", "call_id"}
# usage_logs.requests and .request_index are 32-bit integer columns.
_MAX_INT32 = 2**31 - 1


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

    def check_fields(self, version: int) -> None:
        fields = FIELDS[version]
        if self.kind not in fields:
            raise self.fail(f"unknown record type {short(self.kind)} in format version {version}")
        expected = fields[cast(str, self.kind)]
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

    def branch(self, name: str, *, optional: bool = False) -> str | None:
        """A branch name, checked as the branch API checks it (and storable text)."""
        value = self.data[name]
        if value is None and optional:
            return None
        self._wrap(lambda: validate_branch_name(value, name=name))
        return cast(str, self._wrap(lambda: validate_text(value, name=name)))

    def count(self, name: str, *, optional: bool = False, maximum: int | None = None) -> Any:
        value = self.data[name]
        if value is None and optional:
            return None
        checked = cast(int, self._wrap(lambda: validate_count(value, name=name)))
        if maximum is not None and checked > maximum:
            raise self.fail(f"{self.kind}.{name} must be at most {maximum:,}, got {checked}")
        return checked

    def request_index(self) -> int | None:
        """Null, or a 32-bit integer (usage recorded from run totals has negative ones)."""
        value = self.data["request_index"]
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, int)
            or not -_MAX_INT32 - 1 <= value <= _MAX_INT32
        ):
            raise self.fail(
                f"usage.request_index must be null or an integer from -2**31 to 2**31-1, "
                f"got {short(value)}"
            )
        return value

    def position(self, name: str, *, messages: int, bound: bool) -> int | None:
        """An optional message position: of a message, or of a bound (which may equal
        ``messages``, "after every message")."""
        value = self.count(name, optional=True)
        if value is not None and value > (messages if bound else messages - 1):
            raise self.fail(
                f"{self.kind}.{name} {value} is beyond the conversation's {messages} messages"
            )
        return cast(int | None, value)

    def details(self, name: str) -> dict[str, Any] | None:
        """Null, or a JSON object storable as the usage row's token details."""
        value = self.data[name]
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.fail(f"{self.kind}.{name} must be null or a JSON object")
        try:
            return validate_metadata(value)
        except (AgentsSessionsError, ValueError, TypeError) as exc:
            raise self.fail(f"{self.kind}.{name}: {exc}") from None

    def timestamp(self, name: str, *, optional: bool = False) -> Any:
        value = self.data[name]
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise self.fail(f"{self.kind}.{name} must be an ISO 8601 timestamp string")
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise self.fail(
                f"{self.kind}.{name} is not an ISO 8601 timestamp: {short(value)}"
            ) from None
        if parsed.tzinfo is None:
            raise self.fail(f"{self.kind}.{name} has no UTC offset: {short(value)}")
        try:
            return parsed.astimezone(timezone.utc)
        except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00: before year 1 in UTC
            raise self.fail(f"{self.kind}.{name} is out of range in UTC: {short(value)}") from None

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
    return _Record(number, data)


def _header(record: _Record) -> HeaderLine:
    data = record.data
    if record.kind != "header" or data.get("format") != FORMAT_NAME:
        raise ExportFormatError(1, f"not an agents-sessions export (no {FORMAT_NAME!r} header)")
    version = data.get("version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        readable = " and ".join(str(known) for known in READABLE_VERSIONS)
        raise ExportFormatError(
            1,
            f"format version {short(version)} is not supported "
            f"(this version of agents_sessions reads versions {readable})",
        )
    return HeaderLine(line=1, version=cast(int, version))


def _conversation(record: _Record, version: int) -> ConversationLine:
    stated = version >= 2
    return ConversationLine(
        line=record.line,
        id=record.identifier("id"),
        user_id=record.identifier("user_id", optional=True),
        created_at=record.timestamp("created_at"),
        updated_at=record.timestamp("updated_at"),
        metadata=record.metadata(),
        current_branch=record.branch("current_branch", optional=True) if stated else None,
        expires_at=record.timestamp("expires_at", optional=True) if stated else None,
        stated=stated,
    )


def _message(record: _Record, block: ConversationBlock, max_item_bytes: int | None) -> MessageLine:
    position = record.count("position")
    if position != block.messages:
        raise record.fail(
            f"message position {position} where {block.messages} was expected "
            "(a message is missing or out of order)"
        )
    block.messages += 1
    append_key = record.text("append_key", optional=True)
    if append_key is not None:
        # Unique per conversation in the database (exactly-once appends).
        if append_key in block.append_keys:
            raise record.fail(
                f"message.append_key {short(append_key)} appears twice in "
                f"conversation {short(block.entry.id)}"
            )
        block.append_keys.add(append_key)
    branch_id = None
    if block.version >= 2:
        branch_id = cast(str, record.branch("branch_id"))
        block.owners.setdefault(branch_id, record.line)
    record.text("role")  # checked for the format, then derived from the item
    record.text("content")
    document, role, content = record.document(max_item_bytes)
    return MessageLine(
        line=record.line,
        conversation_id=block.entry.id,
        position=position,
        role=role,
        content=content,
        created_at=record.timestamp("created_at"),
        append_key=append_key,
        document=document,
        branch_id=branch_id,
    )


def _branch(record: _Record, block: ConversationBlock) -> BranchLine:
    name = cast(str, record.branch("branch_id"))
    if name in block.branches:
        raise record.fail(
            f"branch {short(name)} appears twice in conversation {short(block.entry.id)}"
        )
    state = record.data["state"]
    if state not in BRANCH_STATES:
        raise record.fail(
            f"branch.state {short(state)} is not one of {', '.join(sorted(BRANCH_STATES))}"
        )
    if name == MAIN_BRANCH and state != "live":
        raise record.fail(f"branch.state of main is {short(state)}: main is always live")
    fork = record.position("fork_before_position", messages=block.messages, bound=True)
    branch = BranchLine(
        line=record.line,
        conversation_id=block.entry.id,
        branch_id=name,
        parent_branch_id=record.branch("parent_branch_id", optional=True),
        fork_before_position=fork,
        state=cast(str, state),
        created_at=record.timestamp("created_at"),
    )
    block.branches[name] = branch
    return branch


def _usage(record: _Record, block: ConversationBlock) -> UsageLine:
    model = cast(str, record.text("model"))
    if not model:
        raise record.fail("usage.model must not be empty")
    run_id = record.text("run_id", optional=True)
    common = {
        "line": record.line,
        "conversation_id": block.entry.id,
        "run_id": run_id,
        "response_id": record.text("response_id", optional=True),
        "model": model,
        "requests": record.count("requests", maximum=_MAX_INT32),
        "prompt_tokens": record.count("prompt_tokens"),
        "completion_tokens": record.count("completion_tokens"),
        "total_tokens": record.count("total_tokens"),
        "timestamp": record.timestamp("timestamp"),
    }
    if block.version < 2:
        return UsageLine(**common)
    request_index = record.request_index()
    if run_id is not None and request_index is not None:
        # Unique per conversation in the database (a request is recorded once).
        if (run_id, request_index) in block.usage_keys:
            raise record.fail(
                f"usage of run {short(run_id)}, request_index {request_index} appears twice "
                f"in conversation {short(block.entry.id)}"
            )
        block.usage_keys.add((run_id, request_index))
    return UsageLine(
        **common,
        branch_id=record.branch("branch_id", optional=True),
        turn_position=record.position("turn_position", messages=block.messages, bound=False),
        request_index=request_index,
        cached_tokens=record.count("cached_tokens"),
        reasoning_tokens=record.count("reasoning_tokens"),
        input_tokens_details=record.details("input_tokens_details"),
        output_tokens_details=record.details("output_tokens_details"),
    )


def _run_state(record: _Record, block: ConversationBlock) -> RunStateLine:
    if block.run_state_seen:
        raise record.fail(f"a second run_state of conversation {short(block.entry.id)}")
    block.run_state_seen = True
    approvals = record.data["approvals"]
    if not isinstance(approvals, list) or not all(
        isinstance(entry, dict)
        and entry.keys() == _APPROVAL_FIELDS
        and all(value is None or isinstance(value, str) for value in entry.values())
        for entry in approvals
    ):
        raise record.fail("run_state.approvals must be a list of {tool_name, arguments, call_id}")
    state_json = cast(str, record.text("state_json"))
    try:
        state = json.loads(state_json, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        state = None
    if not isinstance(state, dict):
        raise record.fail("run_state.state_json is not a JSON object")
    return RunStateLine(
        line=record.line,
        conversation_id=block.entry.id,
        agent_name=cast(str, record.text("agent_name")),
        schema_version=cast(str, record.text("schema_version")),
        sdk_version=cast(str, record.text("sdk_version")),
        approvals=approvals,
        state_json=state_json,
        created_at=record.timestamp("created_at"),
    )


def parse_lines(lines: Iterable[bytes], *, max_item_bytes: int | None = None) -> Iterator[Line]:
    """Parse and validate an export, line by line; the file's structure too.

    Raises :class:`ExportFormatError` at the first problem. Memory holds one
    conversation's keys and branches (:class:`ConversationBlock`), never its messages.
    """
    version = 0
    block: ConversationBlock | None = None
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
        if number == 1:
            header = _header(record)
            version = header.version
            yield header
            continue
        record.check_fields(version)
        if record.kind in ("conversation", "end") and block is not None:
            block.close()
            block = None
        if record.kind == "conversation":
            entry = _conversation(record, version)
            block = ConversationBlock(entry, version)
            totals[0] += 1
            yield entry
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
        if block is None or conversation_id != block.entry.id:
            raise ExportFormatError(
                number,
                f"{record.kind} record of conversation {short(conversation_id)} does not "
                "follow that conversation's record",
            )
        block.enter(cast(str, record.kind), number)
        if record.kind == "message":
            totals[1] += 1
            yield _message(record, block, max_item_bytes)
        elif record.kind == "branch":
            yield _branch(record, block)
        elif record.kind == "usage":
            totals[2] += 1
            yield _usage(record, block)
        else:
            yield _run_state(record, block)
    if number == 0:
        raise ExportFormatError(1, "the file is empty")
    if end is None:
        raise ExportFormatError(
            number + 1, "the file ends without its end record (truncated export?)"
        )
