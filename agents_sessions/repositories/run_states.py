"""Paused runs: one stored agent ``RunState`` (as JSON) per conversation.

This repository stores and returns the SDK's serialization as an opaque JSON
document plus the few fields copied out of it for operators (agent, pending
approvals, schema version); turning it back into a ``RunState`` is the session
facade's job (:mod:`agents_sessions.run_states`), so the core never imports the SDK.

Claiming is one ``DELETE ... RETURNING``: of two servers receiving the same
"approve" click, the one whose DELETE removes the row gets the state, the other
gets ``None`` -- a paused run is resumed once. A paused run of an expired
conversation reads as absent.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, delete, exists, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite

from ..db.statements import ENSURE_CONVERSATION
from ..db.tables import conversations_table as conversations
from ..db.tables import run_states_table as run_states
from ..db.tables import stored_utc, utcnow
from ..errors import InvalidArgumentError
from ..validation import validate_datetime, validate_identifier, validate_limit
from .context import acting_tenant

# Both dialects' INSERTs offer ON CONFLICT with the same signature.
_INSERT: dict[str, Callable[..., Any]] = {
    "postgresql": postgresql.insert,
    "sqlite": sqlite.insert,
}


@dataclass(frozen=True)
class PendingApproval:
    """A tool call a paused run waits to have approved (or rejected)."""

    tool_name: str | None
    arguments: str | None
    call_id: str | None


@dataclass(frozen=True)
class StoredRunState:
    """A paused run as stored.

    Attributes:
        conversation_id: The conversation it belongs to.
        user_id: The conversation's owner.
        agent_name: The agent the run stopped in.
        schema_version: The SDK ``RunState`` schema it was saved in.
        sdk_version: The ``openai-agents`` version that saved it.
        approvals: The tool calls awaiting approval.
        state: The SDK's ``RunState.to_json()`` document.
        state_bytes: Its size as stored (UTF-8 JSON).
        created_at: When it was saved (UTC).
    """

    conversation_id: str
    user_id: str | None
    agent_name: str
    schema_version: str
    sdk_version: str
    approvals: list[PendingApproval]
    state: dict[str, Any]
    state_bytes: int
    created_at: datetime


@dataclass(frozen=True)
class RunStatePage:
    """One page of :meth:`RunStateRepository.list`: oldest first, then ``next_cursor``."""

    run_states: list[StoredRunState]
    next_cursor: str | None


def _live() -> Any:
    """The paused run's conversation exists and has not expired."""
    return exists().where(
        conversations.c.id == run_states.c.conversation_id,
        (conversations.c.expires_at.is_(None)) | (conversations.c.expires_at > utcnow()),
    )


def _columns(*, with_state: bool = True) -> list[Any]:
    owner = (
        select(conversations.c.user_id)
        .where(conversations.c.id == run_states.c.conversation_id)
        .scalar_subquery()
        .label("user_id")
    )
    columns = [
        run_states.c.conversation_id,
        owner,
        run_states.c.agent_name,
        run_states.c.schema_version,
        run_states.c.sdk_version,
        run_states.c.approvals,
        run_states.c.state_bytes,
        run_states.c.created_at,
    ]
    return [*columns, run_states.c.state] if with_state else columns


def _record(row: Any) -> StoredRunState:
    mapping = row._mapping
    state = mapping.get("state")
    return StoredRunState(
        conversation_id=row.conversation_id,
        user_id=mapping.get("user_id"),
        agent_name=row.agent_name,
        schema_version=row.schema_version,
        sdk_version=row.sdk_version,
        approvals=[PendingApproval(**entry) for entry in row.approvals],
        state=state if isinstance(state, dict) else {},
        state_bytes=int(row.state_bytes),
        created_at=stored_utc(row.created_at),
    )


def _cursor(record: StoredRunState) -> str:
    payload = json.dumps([record.created_at.isoformat(), record.conversation_id])
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created_at, conversation_id = json.loads(
            base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        )
        return validate_datetime(datetime.fromisoformat(created_at), name="after"), str(
            conversation_id
        )
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        raise InvalidArgumentError("after is not a cursor returned by list (next_cursor)") from None


class RunStateRepository:
    """Paused runs, at most one per conversation."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def save(
        self,
        conversation_id: str,
        *,
        state_json: str,
        agent_name: str,
        schema_version: str,
        sdk_version: str,
        approvals: list[PendingApproval],
        user_id: str | None = None,
    ) -> None:
        """Store (or replace) the conversation's paused run; create the conversation if missing.

        ``state_json`` is the serialized state, already validated by the caller.
        """
        validate_identifier(conversation_id)
        dialect = self.connection.dialect.name
        # The conversation row first: the lock order of every writer.
        self.connection.execute(
            ENSURE_CONVERSATION[dialect],
            {
                "conversation_id": conversation_id,
                "user_id": user_id or acting_tenant(self.connection),
                "metadata": None,
            },
        )
        values = {
            "conversation_id": conversation_id,
            "agent_name": agent_name,
            "schema_version": schema_version,
            "sdk_version": sdk_version,
            "approvals": json.dumps([approval.__dict__ for approval in approvals]),
            "state": state_json,
            "state_bytes": len(state_json.encode("utf-8")),
            "created_at": utcnow(),
        }
        statement = _INSERT[dialect](run_states).values(values)
        self.connection.execute(
            statement.on_conflict_do_update(
                index_elements=[run_states.c.conversation_id],
                set_={key: statement.excluded[key] for key in values if key != "conversation_id"},
            )
        )

    def get(self, conversation_id: str) -> StoredRunState | None:
        """The conversation's paused run, or ``None``."""
        validate_identifier(conversation_id)
        row = self.connection.execute(
            select(*_columns()).where(run_states.c.conversation_id == conversation_id, _live())
        ).one_or_none()
        return None if row is None else _record(row)

    def claim(self, conversation_id: str) -> StoredRunState | None:
        """Remove and return the conversation's paused run; ``None`` if there is none.

        One ``DELETE ... RETURNING``: concurrent claimers get it at most once.
        """
        validate_identifier(conversation_id)
        row = self.connection.execute(
            delete(run_states)
            .where(run_states.c.conversation_id == conversation_id, _live())
            .returning(*[column for column in _columns() if column.key != "user_id"])
        ).one_or_none()
        return None if row is None else _record(row)

    def restore(self, record: StoredRunState) -> None:
        """Put a claimed state back unless a newer one was saved meanwhile."""
        statement = _INSERT[self.connection.dialect.name](run_states).values(
            conversation_id=record.conversation_id,
            agent_name=record.agent_name,
            schema_version=record.schema_version,
            sdk_version=record.sdk_version,
            approvals=json.dumps([approval.__dict__ for approval in record.approvals]),
            state=json.dumps(record.state, ensure_ascii=False),
            state_bytes=record.state_bytes,
            created_at=record.created_at,
        )
        self.connection.execute(statement.on_conflict_do_nothing())

    def delete(self, conversation_id: str) -> bool:
        """Discard the conversation's paused run. Returns whether there was one."""
        validate_identifier(conversation_id)
        result = self.connection.execute(
            delete(run_states).where(run_states.c.conversation_id == conversation_id)
        )
        return bool(result.rowcount)

    def list(
        self, *, user_id: str | None = None, limit: int = 50, after: str | None = None
    ) -> RunStatePage:
        """Paused runs awaiting approval, oldest first (longest waiting), ``limit`` at a time.

        Without their state documents (see :meth:`get`). Keyset pages on
        ``(created_at, conversation_id)``.
        """
        page_size = validate_limit(limit)
        if not page_size:
            raise InvalidArgumentError("limit must be a positive int")
        query = select(*_columns(with_state=False)).where(_live())
        if user_id is not None:
            validate_identifier(user_id, name="user_id")
            query = query.where(
                run_states.c.conversation_id.in_(
                    select(conversations.c.id).where(conversations.c.user_id == user_id)
                )
            )
        if after is not None:
            created_at, last_id = _decode_cursor(after)
            query = query.where(
                tuple_(run_states.c.created_at, run_states.c.conversation_id)
                > tuple_(
                    bindparam("after_created_at", created_at, type_=run_states.c.created_at.type),
                    bindparam("after_id", last_id),
                )
            )
        rows = self.connection.execute(
            query.order_by(run_states.c.created_at, run_states.c.conversation_id).limit(
                page_size + 1
            )
        ).all()
        records = [_record(row) for row in rows[:page_size]]
        more = len(rows) > page_size
        return RunStatePage(run_states=records, next_cursor=_cursor(records[-1]) if more else None)
