"""The export file format: versioned, self-describing JSON Lines -- its specification.

This docstring is the format's specification. Version 2, one JSON object per line,
UTF-8 (shown wrapped here; each record is one line)::

    {"type":"header","format":"agents-sessions-export","version":2,"exported_at":...,"source":...,"scope":...}
    {"type":"conversation","id":"c1","user_id":"u1","created_at":...,"updated_at":...,"metadata":{...},
     "current_branch":"retry","expires_at":"2026-12-30T08:00:00.000000+00:00"}
    {"type":"message","conversation_id":"c1","position":0,"role":"user","content":"Hi","created_at":...,
     "append_key":null,"item_json":"{\\"role\\":\\"user\\",\\"content\\":\\"Hi\\"}","branch_id":"main"}
    {"type":"branch","conversation_id":"c1","branch_id":"retry","parent_branch_id":"main",
     "fork_before_position":2,"state":"live","created_at":...}
    {"type":"usage","conversation_id":"c1","run_id":"run_1","response_id":"resp_1","model":"gpt-4.1","requests":1,
     "prompt_tokens":12,"completion_tokens":30,"total_tokens":42,"timestamp":...,"branch_id":"retry",
     "turn_position":3,"request_index":0,"cached_tokens":0,"reasoning_tokens":4,
     "input_tokens_details":{"cached_tokens":0},"output_tokens_details":{"reasoning_tokens":4}}
    {"type":"run_state","conversation_id":"c1","agent_name":"support","schema_version":"1.21","sdk_version":"0.24.0",
     "approvals":[...],"state_json":"{...}","created_at":...}
    {"type":"end","conversations":1,"messages":1,"usage":1}

Structure:

* Each conversation line is followed by its records in this order: its messages
  (``position`` 0, 1, 2, ... in history order: ``messages.id`` order across all of
  its branches), its branches, its usage rows, at most one paused run. Timestamps
  are ISO 8601 with a UTC offset (written in UTC).
* Database ids do not survive an import, so a reference to a message is written as
  the message's ``position`` in its conversation.
* The ``end`` line carries the totals of conversations, messages and usage rows, so
  a truncated file is recognised and refused (branches and paused runs are not
  counted).

Records and fields:

* ``conversation``: ``id``, ``user_id`` (null: no owner), ``created_at``,
  ``updated_at``, ``metadata`` (an object); ``current_branch`` -- the branch the
  conversation continues on: null for ``main``, else the ``branch_id`` of one of its
  ``branch`` records in state ``live``; ``expires_at`` -- when its time-to-live
  ends (null: never); an import writes it as is, so a conversation past it
  reads as empty. Into a conversation already stored, an import writes both as it
  writes ``metadata``: the file's values replace the stored ones.
* ``message``: ``position``; ``role`` and ``content`` (informative: an import derives
  both from the item); ``created_at``; ``item_json``, the stored JSON document of the
  item **as a string**, verbatim: key order, number spelling and ``\\u0000`` escapes
  survive the round trip byte for byte (see
  :class:`agents_sessions.db.models.JSONDocument`); ``append_key``, the exactly-once
  key of the append call that wrote the row (on the first row of a keyed call; else
  null; unique in a conversation), kept so that a retried append still finds it after
  an import; ``branch_id``, the branch that owns the row: ``main`` or the
  ``branch_id`` of one of the conversation's ``branch`` records.
* ``branch`` (one per ``conversation_branches`` row): ``branch_id`` (unique in the
  conversation; ``main`` itself may have a record, always ``live``, once it inherits
  from a frozen branch); ``parent_branch_id``, the branch it inherits from: null,
  ``main`` or the ``branch_id`` of another ``branch`` record of the conversation,
  never its own ancestor; ``fork_before_position``, the bound of what it inherits: the part of its
  parent's history at positions below it (null: no bound; from 0 to the number of
  messages; the message there may be gone, the bound stays);
  ``state``: ``live``, ``deleted`` (the name stays reserved; rows a child shares
  stay) or ``frozen`` (internal: rows a live branch gave up that a child still
  shares); ``created_at``. Names are checked as the branch API checks them.
* ``usage`` (one per ``usage_logs`` row): ``run_id`` and ``response_id`` (or null),
  ``model``, ``requests``, ``prompt_tokens``, ``completion_tokens``,
  ``total_tokens``, ``timestamp``; ``branch_id``, the branch the request was made on
  (or null); ``turn_position``, the position of the user message that opened the
  request's turn (null: none, or that message no longer exists; a row whose turn
  message is gone counts in no turn, before or after an import); ``request_index``,
  the request's index in its run (null, or a 32-bit integer -- negative for a row of
  a run's totals -- unique with ``run_id`` in the conversation); ``cached_tokens``,
  ``reasoning_tokens``; ``input_tokens_details`` and ``output_tokens_details``, the
  SDK's token details (an object or null). Counts are integers from 0 to 2**63-1
  (``requests`` to 2**31-1).
* ``run_state`` (at most one per conversation, last) is a paused agent run awaiting
  approval: the SDK's ``RunState`` JSON as a string (``state_json``), verbatim, with
  ``agent_name``, ``schema_version``, ``sdk_version``, ``approvals`` (a list of
  ``{tool_name, arguments, call_id}``) and ``created_at``.

Version 1, which this package still reads, is version 2 without the ``branch``
records and without ``current_branch``, ``expires_at``, ``message.branch_id`` and the
usage fields after ``timestamp``; its records of a conversation may come in any
order after it, and it reads as everything on ``main``, no expiry, no usage
details. An import of a version-1 file changes neither the current branch nor the
expiry of a conversation already stored, and matches stored messages on their
document alone.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from ...db.models import stored_utc
from ...errors import ExportFormatError
from ...items import utf8_safe_json
from .reading import parse_lines
from .records import (
    DEFAULT_BATCH_SIZE,
    FORMAT_NAME,
    FORMAT_VERSION,
    READABLE_VERSIONS,
    BranchLine,
    ConversationLine,
    EndLine,
    HeaderLine,
    Line,
    MessageLine,
    Progress,
    RunStateLine,
    TransferCounts,
    UsageLine,
)

#: The longest line read when no ``max_item_bytes`` is given (64 MiB); with one,
#: 12 bytes per item byte plus 64 KiB for the record's other fields.
MAX_LINE_BYTES = 64 << 20


def timestamp_text(value: datetime) -> str:
    return stored_utc(value).isoformat(timespec="microseconds")


def encode_line(record: dict[str, Any]) -> bytes:
    options: dict[str, Any] = {"separators": (",", ":"), "allow_nan": False}
    text = json.dumps(record, ensure_ascii=False, **options)
    return utf8_safe_json(text, record, **options).encode("utf-8") + b"\n"


class ExportFile:
    """An export file opened for import: validated completely on opening.

    ``source`` is a path, ``"-"`` for standard input, or a binary stream. A stream
    that cannot seek (a pipe) is first copied to a temporary file, so that the file
    can be validated before anything is written and then read again to import.
    Use as a context manager (closes what it opened)::

        with ExportFile("backup.jsonl") as export:
            print(export.version, export.counts)
            summary = import_export(store, export)

    ``version`` is the file's format version (1 or 2), ``counts`` its totals.

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
                if isinstance(entry, HeaderLine):
                    self.version = entry.version
                elif isinstance(entry, EndLine):
                    counts = entry.counts
            assert counts is not None  # parse_lines raises when the end record is missing
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


__all__ = [
    "DEFAULT_BATCH_SIZE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAX_LINE_BYTES",
    "READABLE_VERSIONS",
    "BranchLine",
    "ConversationLine",
    "EndLine",
    "ExportFile",
    "HeaderLine",
    "Line",
    "MessageLine",
    "Progress",
    "RunStateLine",
    "TransferCounts",
    "UsageLine",
    "encode_line",
    "timestamp_text",
]
