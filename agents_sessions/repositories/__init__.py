"""The repository API: conversations, messages and usage, over one SQLAlchemy ``Connection``.

Repositories never own the transaction: the caller decides where it begins and
ends (usually ``with store.transaction() as repos:``; see
:class:`agents_sessions.store.SessionStore`). Every method validates its arguments
before executing any SQL. The statements they run are built once
(:mod:`agents_sessions.db.statements`).
"""

from __future__ import annotations

from sqlalchemy import Connection

from .branches import BranchRepository
from .conversations import ConversationRepository
from .messages import MessageRepository
from .records import (
    ConversationPage,
    ConversationRecord,
    StoredMessage,
    UsageEntry,
    UsageTotals,
)
from .run_states import PendingApproval, RunStatePage, RunStateRepository, StoredRunState
from .search import SearchHit, SearchPage
from .usage import UsageRepository


class Repositories:
    """The repositories over one connection (and so one transaction)."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.conversations = ConversationRepository(connection)
        self.messages = MessageRepository(connection)
        self.usage = UsageRepository(connection)
        self.branches = BranchRepository(connection)
        self.run_states = RunStateRepository(connection)


__all__ = [
    "BranchRepository",
    "ConversationPage",
    "ConversationRecord",
    "ConversationRepository",
    "MessageRepository",
    "PendingApproval",
    "Repositories",
    "RunStatePage",
    "RunStateRepository",
    "SearchHit",
    "SearchPage",
    "StoredMessage",
    "StoredRunState",
    "UsageEntry",
    "UsageRepository",
    "UsageTotals",
]
