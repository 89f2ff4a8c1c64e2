"""Reading branches: their rows, the chain a view reads, views, listings.

See :mod:`agents_sessions.repositories.branches` for the model: a branch's history
(its *view*) is its parent's view below ``fork_before_id`` followed by its own rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, select

from ..db.statements import IS_EXPIRED, MAIN_BRANCH
from ..db.tables import branches_table as branches
from ..db.tables import conversations_table as conversations
from ..db.tables import messages_table as messages
from ..db.tables import stored_utc

LIVE, DELETED, FROZEN = "live", "deleted", "frozen"
# A chain longer than this is a cycle, which the operations here never create.
_MAX_DEPTH = 10_000


@dataclass(frozen=True)
class BranchRow:
    """One ``conversation_branches`` row."""

    branch_id: str
    parent_branch_id: str | None
    fork_before_id: int | None
    state: str
    created_at: datetime


@dataclass(frozen=True)
class ViewRow:
    """One item of a branch's view, with what the turn and branch queries need."""

    id: int
    branch_id: str
    role: str
    item: Any
    created_at: datetime

    @property
    def is_user(self) -> bool:
        """A user message (the SDK's test: a dict whose ``role`` is ``user``)."""
        return isinstance(self.item, dict) and self.item.get("role") == "user"


def min_bound(first: int | None, second: int | None) -> int | None:
    """The tighter of two id bounds (``None``: no bound)."""
    if first is None:
        return second
    if second is None:
        return first
    return min(first, second)


def sdk_timestamp(value: datetime) -> str:
    """A timestamp as the SDK's SQLite sessions report it: ``YYYY-MM-DD HH:MM:SS`` (UTC)."""
    return stored_utc(value).strftime("%Y-%m-%d %H:%M:%S")


class BranchReader:
    """Reads of branches and their views (the read half of ``BranchRepository``)."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def current(self, conversation_id: str) -> str:
        """The conversation's current branch (``main`` for a new conversation)."""
        value = self.connection.execute(
            select(conversations.c.current_branch).where(conversations.c.id == conversation_id)
        ).scalar()
        return value or MAIN_BRANCH

    def rows(self, conversation_id: str) -> dict[str, BranchRow]:
        """Every branch row of the conversation, by branch id."""
        result = self.connection.execute(
            select(
                branches.c.branch_id,
                branches.c.parent_branch_id,
                branches.c.fork_before_id,
                branches.c.state,
                branches.c.created_at,
            ).where(branches.c.conversation_id == conversation_id)
        )
        return {row.branch_id: BranchRow(*row) for row in result}

    @staticmethod
    def state_of(rows: dict[str, BranchRow], branch_id: str) -> str | None:
        """``live``/``deleted``/``frozen``, or ``None`` for a name never used (``main`` is live)."""
        row = rows.get(branch_id)
        if row is not None:
            return row.state
        return LIVE if branch_id == MAIN_BRANCH else None

    @staticmethod
    def chain(rows: dict[str, BranchRow], branch_id: str) -> list[tuple[str, int | None]]:
        """The branches a view reads, nearest first, each with its id bound (``None``: all)."""
        chain: list[tuple[str, int | None]] = [(branch_id, None)]
        bound: int | None = None
        row = rows.get(branch_id)
        while row is not None and row.parent_branch_id is not None:
            if len(chain) > _MAX_DEPTH:  # pragma: no cover - never built
                raise RuntimeError(f"branch chain of {branch_id!r} does not end")
            bound = min_bound(bound, row.fork_before_id)
            chain.append((row.parent_branch_id, bound))
            row = rows.get(row.parent_branch_id)
        return chain

    def view(
        self,
        conversation_id: str,
        branch_id: str,
        *,
        limit: int | None = None,
        rows: dict[str, BranchRow] | None = None,
        users_only: bool = False,
    ) -> list[ViewRow]:
        """The branch's history, oldest first (the newest ``limit`` rows when given).

        One indexed range scan per branch of the chain, nearest first, stopping as
        soon as ``limit`` rows are found. ``users_only``: only the user messages.
        """
        rows = self.rows(conversation_id) if rows is None else rows
        if self.state_of(rows, branch_id) != LIVE:
            return []
        # An expired conversation reads as empty on every branch, as its current one
        # does (its rows stay until the next write or `prune` removes them).
        if self.connection.execute(IS_EXPIRED, {"conversation_id": conversation_id}).scalar():
            return []
        found: list[ViewRow] = []
        for owner, bound in self.chain(rows, branch_id):
            query = select(
                messages.c.id,
                messages.c.branch_id,
                messages.c.role,
                messages.c.item,
                messages.c.created_at,
            ).where(messages.c.conversation_id == conversation_id, messages.c.branch_id == owner)
            if bound is not None:
                query = query.where(messages.c.id < bound)
            if users_only:
                query = query.where(messages.c.role == "user")
            if limit is not None:
                remaining = limit - len(found)
                if remaining <= 0:
                    break
                query = query.order_by(messages.c.id.desc()).limit(remaining)
            found.extend(ViewRow(*row) for row in self.connection.execute(query))
        found.sort(key=lambda row: row.id)
        return found

    def latest_user_message(self, conversation_id: str, branch_id: str) -> int | None:
        """The id of the newest user message in the branch's view: its current turn."""
        rows = self.rows(conversation_id)
        if self.state_of(rows, branch_id) != LIVE:
            return None
        for owner, bound in self.chain(rows, branch_id):
            query = select(func.max(messages.c.id)).where(
                messages.c.conversation_id == conversation_id,
                messages.c.branch_id == owner,
                messages.c.role == "user",
            )
            if bound is not None:
                query = query.where(messages.c.id < bound)
            found = self.connection.execute(query).scalar()
            if found is not None:
                return int(found)
        return None

    def items(self, conversation_id: str, branch_id: str, limit: int | None = None) -> list[Any]:
        """The items of a branch's view, oldest first."""
        return [row.item for row in self.view(conversation_id, branch_id, limit=limit)]

    def exists(self, conversation_id: str, branch_id: str, rows: dict[str, BranchRow]) -> bool:
        """Whether the branch is live and its view holds an item (the SDK's "exists")."""
        return bool(self.view(conversation_id, branch_id, limit=1, rows=rows))

    def listing(self, conversation_id: str) -> list[dict[str, Any]]:
        """The live branches holding items, oldest first, as ``list_branches()`` reports them."""
        rows = self.rows(conversation_id)
        current = self.current(conversation_id)
        names = [MAIN_BRANCH] + [
            name for name, row in rows.items() if row.state == LIVE and name != MAIN_BRANCH
        ]
        listed: list[tuple[datetime, int, dict[str, Any]]] = []
        for order, name in enumerate(names):
            view = self.view(conversation_id, name, rows=rows)
            if not view:
                continue
            row = rows.get(name)
            inherits = any(item.branch_id != name for item in view)
            created = (
                row.created_at
                if (row is not None and inherits and name != MAIN_BRANCH)
                else min(item.created_at for item in view)
            )
            listed.append(
                (
                    stored_utc(created),
                    order,
                    {
                        "branch_id": name,
                        "message_count": len(view),
                        "user_turns": sum(1 for item in view if item.is_user),
                        "is_current": name == current,
                        "created_at": sdk_timestamp(created),
                    },
                )
            )
        listed.sort(key=lambda entry: (entry[0], entry[1]))
        return [entry[2] for entry in listed]

    def live_branches(self, conversation_id: str) -> list[str]:
        """Names of the live branches (``main`` included)."""
        rows = self.rows(conversation_id)
        return [MAIN_BRANCH] + [
            name for name, row in rows.items() if row.state == LIVE and name != MAIN_BRANCH
        ]
