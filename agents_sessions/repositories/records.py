"""The records the repository API returns and takes: plain frozen dataclasses."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class ConversationRecord:
    """A conversation row.

    Attributes:
        id: The conversation id (the SDK session id).
        user_id: Owner, if any.
        created_at: When the conversation was first written (UTC).
        updated_at: When it last changed (UTC): items added, popped or cleared.
        metadata: Free-form JSON object.
    """

    id: str
    user_id: str | None
    created_at: datetime
    updated_at: datetime
    metadata: dict[str, Any]


@dataclass(frozen=True)
class ConversationPage:
    """One page of :meth:`ConversationRepository.list_by_user`.

    Attributes:
        conversations: Newest first.
        next_cursor: Pass as ``after=`` to get the next page; ``None`` on the last page
            (then stop: ``after=None`` means the first page again).
    """

    conversations: list[ConversationRecord]
    next_cursor: str | None

    @property
    def is_last(self) -> bool:
        """True when no page follows this one (``next_cursor`` is ``None``)."""
        return self.next_cursor is None


@dataclass(frozen=True)
class StoredMessage:
    """A message row: the item plus its derived columns."""

    id: int
    conversation_id: str
    role: str
    content: str
    item: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class UsageTotals:
    """Token usage summed over a group (a model, a user or a conversation).

    Attributes:
        key: The group's value (model name, user id, conversation id); ``None`` for
            conversations without a user in per-user totals.
    """

    key: str | None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class UsageEntry:
    """One row to record in ``usage_logs``; see :meth:`UsageRepository.record`."""

    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int | None = None
    requests: int = 1
    run_id: str | None = None
    response_id: str | None = None
    #: The request's position in its run: with ``run_id``, a request is recorded once.
    request_index: int | None = None
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    #: The SDK's ``input_tokens_details`` / ``output_tokens_details`` objects, as dicts.
    input_tokens_details: dict[str, Any] | None = None
    output_tokens_details: dict[str, Any] | None = None
