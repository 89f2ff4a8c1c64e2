"""The records of an export file: one dataclass per line type, and each version's fields.

The format itself is specified in :mod:`.format`'s docstring. Reading a file
(:mod:`.reading`) turns each line into one of these records once it is validated;
the importer (:mod:`.import_`) writes them. Fields a version-1 file does not carry
take the value that version meant: the ``main`` branch, no expiry, no usage details.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ...db.models import stored_utc

FORMAT_NAME = "agents-sessions-export"
#: The format version this package writes.
FORMAT_VERSION = 2
#: The format versions this package reads.
READABLE_VERSIONS = (1, 2)

#: Rows per batch: conversations per keyset page on export, rows per INSERT on import.
DEFAULT_BATCH_SIZE = 500

#: The states a ``conversation_branches`` row can be in (see the branch repository).
BRANCH_STATES = frozenset({"live", "deleted", "frozen"})

Progress = Callable[[int], None]


@dataclass(frozen=True)
class TransferCounts:
    """How many rows an export holds."""

    conversations: int
    messages: int
    usage_rows: int


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
    #: The current branch (``None``: main) and the time-to-live's end (``None``: none).
    #: A version-1 line states neither: ``stated`` is then False.
    current_branch: str | None = None
    expires_at: datetime | None = None
    stated: bool = False


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
    #: The owning branch; ``None`` in a version-1 file (written to ``main``, and a
    #: stored message matches on its document alone, as version 1 did).
    branch_id: str | None = None


@dataclass(frozen=True)
class BranchLine:
    line: int
    conversation_id: str
    branch_id: str
    parent_branch_id: str | None
    #: ``fork_before_id`` as a position: the branch inherits its parent's messages at
    #: positions below it (``None``: no bound).
    fork_before_position: int | None
    state: str
    created_at: datetime

    def key(self) -> tuple[Any, ...]:
        """What makes a stored branch row the same as this one (ids as positions)."""
        return (
            self.parent_branch_id,
            self.fork_before_position,
            self.state,
            self.created_at,
        )


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
    branch_id: str | None = None
    #: The position of the message that opened the request's turn (``None``: none).
    turn_position: int | None = None
    request_index: int | None = None
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    input_tokens_details: dict[str, Any] | None = None
    output_tokens_details: dict[str, Any] | None = None

    def key(self) -> tuple[Any, ...]:
        """Every column but ``id`` (the turn as a position): what makes two rows the same."""
        return (
            self.run_id,
            self.response_id,
            self.model,
            self.requests,
            self.prompt_tokens,
            self.completion_tokens,
            self.total_tokens,
            self.timestamp,
            self.branch_id,
            self.turn_position,
            self.request_index,
            self.cached_tokens,
            self.reasoning_tokens,
            _canonical(self.input_tokens_details),
            _canonical(self.output_tokens_details),
        )


#: How much of :meth:`UsageLine.key` a version-1 file states (the columns before ``branch_id``).
V1_USAGE_KEY_WIDTH = 8


def _canonical(details: dict[str, Any] | None) -> str | None:
    # Stored JSON may come back with its keys reordered (jsonb): compare canonically.
    return None if details is None else json.dumps(details, sort_keys=True)


def usage_key(row: Any, turn_position: int | None) -> tuple[Any, ...]:
    """:meth:`UsageLine.key` of a stored ``usage_logs`` row (timestamp in UTC)."""
    return (
        row.run_id,
        row.response_id,
        row.model,
        row.requests,
        row.prompt_tokens,
        row.completion_tokens,
        row.total_tokens,
        stored_utc(row.timestamp),
        row.branch_id,
        turn_position,
        row.request_index,
        row.cached_tokens,
        row.reasoning_tokens,
        _canonical(row.input_tokens_details),
        _canonical(row.output_tokens_details),
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


Line = HeaderLine | ConversationLine | MessageLine | BranchLine | UsageLine | RunStateLine | EndLine

_FIELDS_V1: dict[str, frozenset[str]] = {
    "conversation": frozenset({"type", "id", "user_id", "created_at", "updated_at", "metadata"}),
    "message": frozenset(
        {
            "type",
            "conversation_id",
            "position",
            "role",
            "content",
            "created_at",
            "append_key",
            "item_json",
        }
    ),
    "usage": frozenset(
        {
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
        }
    ),
    "run_state": frozenset(
        {
            "type",
            "conversation_id",
            "agent_name",
            "schema_version",
            "sdk_version",
            "approvals",
            "state_json",
            "created_at",
        }
    ),
    "end": frozenset({"type", "conversations", "messages", "usage"}),
}

_FIELDS_V2: dict[str, frozenset[str]] = {
    **_FIELDS_V1,
    "conversation": _FIELDS_V1["conversation"] | {"current_branch", "expires_at"},
    "message": _FIELDS_V1["message"] | {"branch_id"},
    "branch": frozenset(
        {
            "type",
            "conversation_id",
            "branch_id",
            "parent_branch_id",
            "fork_before_position",
            "state",
            "created_at",
        }
    ),
    "usage": _FIELDS_V1["usage"]
    | {
        "branch_id",
        "turn_position",
        "request_index",
        "cached_tokens",
        "reasoning_tokens",
        "input_tokens_details",
        "output_tokens_details",
    },
}

#: The fields of each record type (``header`` apart), per format version.
FIELDS: dict[int, dict[str, frozenset[str]]] = {1: _FIELDS_V1, 2: _FIELDS_V2}

#: The order of a conversation's records in a version-2 file (the conversation first).
SECTIONS = {"message": 1, "branch": 2, "usage": 3, "run_state": 4}
