"""Token usage: rows per request or run, totals by model, user and conversation."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Connection,
    Integer,
    Text,
    bindparam,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import ARRAY

from ..db.statements import CONVERSATION_ID, NO_BOUND, VIEW_CHAIN
from ..db.tables import conversations_table as conversations
from ..db.tables import usage_logs_table as usage_logs
from ..errors import InvalidArgumentError
from ..validation import (
    MAX_INT32,
    validate_count,
    validate_datetime,
    validate_identifier,
    validate_int32,
    validate_text,
)
from .records import UsageEntry, UsageTotals

#: The model of usage rows recorded before the run's result named it.
UNKNOWN_MODEL = "unknown"

_DIALECT_INSERT: dict[str, Any] = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}


def usage_rows(
    conversation_id: str,
    entries: Sequence[UsageEntry],
    *,
    branch_id: str | None = None,
    turn_message_id: int | None = None,
) -> list[dict[str, Any]]:
    """The ``usage_logs`` rows of ``entries``, validated (each bad field named)."""
    validate_identifier(conversation_id)
    rows = []
    for index, entry in enumerate(entries):
        where = f"entries[{index}]"
        model = validate_text(entry.model, name=f"{where}.model")
        if not model:
            raise InvalidArgumentError(f"{where}.model must not be empty")
        prompt = validate_count(entry.prompt_tokens, name=f"{where}.prompt_tokens")
        completion = validate_count(entry.completion_tokens, name=f"{where}.completion_tokens")
        total = validate_count(
            prompt + completion if entry.total_tokens is None else entry.total_tokens,
            name=f"{where}.total_tokens",
        )
        rows.append(
            {
                "conversation_id": conversation_id,
                "model": model,
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": total,
                "requests": validate_count(
                    entry.requests, name=f"{where}.requests", maximum=MAX_INT32
                ),
                "run_id": validate_text(entry.run_id, name=f"{where}.run_id", optional=True),
                "response_id": validate_text(
                    entry.response_id, name=f"{where}.response_id", optional=True
                ),
                # (Negative for a run's totals row: see usage_capture.)
                "request_index": None
                if entry.request_index is None
                else validate_int32(entry.request_index, name=f"{where}.request_index"),
                "cached_tokens": validate_count(entry.cached_tokens, name=f"{where}.cached_tokens"),
                "reasoning_tokens": validate_count(
                    entry.reasoning_tokens, name=f"{where}.reasoning_tokens"
                ),
                "input_tokens_details": entry.input_tokens_details,
                "output_tokens_details": entry.output_tokens_details,
                "branch_id": branch_id,
                "turn_message_id": turn_message_id,
            }
        )
    return rows


# The usage columns a turn's rows carry, in the order of their array parameters.
_TURN_USAGE_COLUMNS: tuple[tuple[str, Any], ...] = (
    ("model", Text),
    ("run_id", Text),
    ("response_id", Text),
    ("request_index", Integer),
    ("requests", Integer),
    ("prompt_tokens", BigInteger),
    ("completion_tokens", BigInteger),
    ("total_tokens", BigInteger),
    ("cached_tokens", BigInteger),
    ("reasoning_tokens", BigInteger),
    ("input_tokens_details", Text),
    ("output_tokens_details", Text),
)
_USAGE_NAMES = ", ".join(name for name, _ in _TURN_USAGE_COLUMNS)
_DETAILS = ("input_tokens_details", "output_tokens_details")

#: A turn's usage rows, attributed as ``record_turn_usage`` attributes them -- to the
#: current branch and the newest user message in its view (up its fork chain) -- in
#: one statement (PostgreSQL). Sent after the append in the same query string, it
#: runs in the append's implicit transaction with a snapshot of its own, so it sees
#: the rows the append just wrote. Rows of a run already recorded are skipped.
RECORD_TURN_USAGE = text(
    VIEW_CHAIN
    + f"""
INSERT INTO usage_logs (conversation_id, {_USAGE_NAMES}, branch_id, turn_message_id)
SELECT :conversation_id, {
        ", ".join(
            f"CAST(u.{name} AS jsonb)" if name in _DETAILS else f"u.{name}"
            for name, _ in _TURN_USAGE_COLUMNS
        )
    },
    (SELECT COALESCE(c.current_branch, 'main') FROM conversations c
     WHERE c.id = :conversation_id),
    (SELECT max(m.id) FROM chain JOIN messages m
       ON m.conversation_id = :conversation_id AND m.branch_id = chain.branch_id
      AND m.id < COALESCE(chain.bound, {NO_BOUND}) AND m.role = 'user')
FROM unnest({", ".join(f":usage_{name}" for name, _ in _TURN_USAGE_COLUMNS)})
    WITH ORDINALITY AS u({_USAGE_NAMES}, position)
ORDER BY u.position
ON CONFLICT (conversation_id, run_id, request_index) WHERE request_index IS NOT NULL
DO NOTHING
"""
).bindparams(
    CONVERSATION_ID,
    *(bindparam(f"usage_{name}", type_=ARRAY(kind)) for name, kind in _TURN_USAGE_COLUMNS),
)


def turn_usage_parameters(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """:data:`RECORD_TURN_USAGE`'s array parameters for validated :func:`usage_rows`."""
    parameters: dict[str, Any] = {}
    for name, _ in _TURN_USAGE_COLUMNS:
        values = [row[name] for row in rows]
        if name in _DETAILS:  # as JSON text: the statement casts it to jsonb
            values = [None if value is None else json.dumps(value) for value in values]
        parameters[f"usage_{name}"] = values
    return parameters


class UsageRepository:
    """Token usage: record per request or per run; totals by model, user, conversation."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def record(
        self,
        conversation_id: str,
        entries: Sequence[UsageEntry],
        *,
        branch_id: str | None = None,
        turn_message_id: int | None = None,
    ) -> int:
        """Insert one ``usage_logs`` row per entry. The conversation must exist.

        ``branch_id`` and ``turn_message_id`` attribute the rows to a turn (see
        :meth:`agents_sessions.PostgreSQLSession.get_turn_usage`). An entry whose
        ``(run_id, request_index)`` is already recorded for the conversation is
        skipped: recording a run's requests again counts nothing twice.

        Returns the number of rows written.
        """
        rows = usage_rows(
            conversation_id, entries, branch_id=branch_id, turn_message_id=turn_message_id
        )
        if not rows:
            return 0
        dialect = self.connection.dialect.name
        if dialect not in _DIALECT_INSERT:
            self.connection.execute(insert(usage_logs), rows)
            return len(rows)
        # Keyed rows already recorded (an automatic capture, a retried call) are skipped.
        statement = _DIALECT_INSERT[dialect](usage_logs).on_conflict_do_nothing(
            index_elements=["conversation_id", "run_id", "request_index"],
            index_where=usage_logs.c.request_index.isnot(None),
        )
        written = 0
        for row in rows:
            written += int(self.connection.execute(statement, row).rowcount or 0)
        return written

    def name_model(self, conversation_id: str, run_id: str, model: str) -> None:
        """Name the model of a run's rows recorded before the model was known."""
        self.connection.execute(
            update(usage_logs)
            .where(
                usage_logs.c.conversation_id == conversation_id,
                usage_logs.c.run_id == run_id,
                usage_logs.c.model == UNKNOWN_MODEL,
            )
            .values(model=model)
        )

    def turn_rows(self, conversation_id: str) -> list[Any]:
        """The rows attributed to a turn: branch, turn message, tokens and details."""
        return list(
            self.connection.execute(
                select(
                    usage_logs.c.branch_id,
                    usage_logs.c.turn_message_id,
                    usage_logs.c.requests,
                    usage_logs.c.prompt_tokens,
                    usage_logs.c.completion_tokens,
                    usage_logs.c.total_tokens,
                    usage_logs.c.input_tokens_details,
                    usage_logs.c.output_tokens_details,
                )
                .where(
                    usage_logs.c.conversation_id == conversation_id,
                    usage_logs.c.turn_message_id.isnot(None),
                )
                .order_by(usage_logs.c.id)
            )
        )

    def _totals(self, key: Any, *, since: datetime | None, join_conversations: bool) -> Any:
        query = select(
            key.label("key"),
            func.coalesce(func.sum(usage_logs.c.requests), 0).label("requests"),
            func.coalesce(func.sum(usage_logs.c.prompt_tokens), 0).label("prompt_tokens"),
            func.coalesce(func.sum(usage_logs.c.completion_tokens), 0).label("completion_tokens"),
            func.coalesce(func.sum(usage_logs.c.total_tokens), 0).label("total_tokens"),
        )
        if join_conversations:
            query = query.select_from(
                usage_logs.join(conversations, conversations.c.id == usage_logs.c.conversation_id)
            )
        if since is not None:
            query = query.where(usage_logs.c.timestamp >= validate_datetime(since, name="since"))
        return query.group_by(key).order_by(func.sum(usage_logs.c.total_tokens).desc(), key)

    @staticmethod
    def _rows(result: Any) -> list[UsageTotals]:
        return [
            UsageTotals(
                key=row.key,
                requests=int(row.requests),
                prompt_tokens=int(row.prompt_tokens),
                completion_tokens=int(row.completion_tokens),
                total_tokens=int(row.total_tokens),
            )
            for row in result
        ]

    def totals_by_model(self, *, since: datetime | None = None) -> list[UsageTotals]:
        """Usage per model, most tokens first; only rows at or after ``since`` if given."""
        return self._rows(
            self.connection.execute(
                self._totals(usage_logs.c.model, since=since, join_conversations=False)
            )
        )

    def totals_by_user(self, *, since: datetime | None = None) -> list[UsageTotals]:
        """Usage per conversation owner (``key=None`` for conversations without a user)."""
        return self._rows(
            self.connection.execute(
                self._totals(conversations.c.user_id, since=since, join_conversations=True)
            )
        )

    def totals_for_conversation(self, conversation_id: str) -> UsageTotals:
        """Usage of one conversation (zeros if it has none)."""
        validate_identifier(conversation_id)
        query = self._totals(
            usage_logs.c.conversation_id, since=None, join_conversations=False
        ).where(usage_logs.c.conversation_id == conversation_id)
        rows = self._rows(self.connection.execute(query))
        return rows[0] if rows else UsageTotals(conversation_id, 0, 0, 0, 0)
