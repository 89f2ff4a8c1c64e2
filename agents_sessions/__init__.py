"""agents_sessions: a durable, pooled conversation store for the OpenAI Agents SDK.

Three ways in:

* the session backend -- ``PostgreSQLSession(conversation_id=..., database_url=...)``
  passed to ``Runner.run(agent, input, session=...)``;
* migrations -- ``alembic upgrade head`` from the repository root, or
  :func:`agents_sessions.db.migrate.upgrade` from an installed package;
* the repository API -- ``with get_store(url).transaction() as repos: ...``.

Every name below is importable from the package (``from agents_sessions import
PostgreSQLSession``); each loads its module on first use (PEP 562), so
``import agents_sessions`` alone loads no database library and a program loads only
what it uses.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .db.engine import DatabaseTarget, PoolOptions, parse_database_url
    from .db.migrate import upgrade
    from .errors import (
        AccessDeniedError,
        AgentsSessionsError,
        BackupError,
        BackupFileError,
        BranchError,
        BranchNameTakenError,
        CitusError,
        ConfigurationError,
        ConnectionLostError,
        ConversationNotFoundError,
        DatabaseError,
        ExitCode,
        ExportFormatError,
        ExternalToolError,
        InvalidArgumentError,
        InvalidConversationIdError,
        InvalidItemError,
        InvalidRunStateError,
        ItemTooLargeError,
        ItemTypeError,
        PoolTimeoutError,
        ProtectedBranchError,
        ReadOnlyDatabaseError,
        RestoreTargetNotEmptyError,
        RowLevelSecurityFilteredError,
        RunStateVersionError,
        SchemaError,
        SchemaNotAtHeadError,
        StatementTimeoutError,
        TurnNotFoundError,
        UnknownBranchError,
    )
    from .recall import recall_tool
    from .repositories import (
        ConversationPage,
        ConversationRecord,
        ConversationRepository,
        MessageRepository,
        Repositories,
        SearchHit,
        SearchPage,
        StoredMessage,
        UsageEntry,
        UsageRepository,
        UsageTotals,
    )
    from .session import PostgreSQLSession
    from .settings import Settings, load_settings
    from .store import SessionStore, dispose_all, get_store

__version__ = "0.1.0"

# Public name -> the module (relative to this package) that defines it.
_EXPORTS = {
    "AccessDeniedError": ".errors",
    "AgentsSessionsError": ".errors",
    "BackupError": ".errors",
    "BackupFileError": ".errors",
    "BranchError": ".errors",
    "BranchNameTakenError": ".errors",
    "CitusError": ".errors",
    "ConfigurationError": ".errors",
    "ConnectionLostError": ".errors",
    "ConversationNotFoundError": ".errors",
    "ConversationPage": ".repositories",
    "ConversationRecord": ".repositories",
    "ConversationRepository": ".repositories",
    "DatabaseError": ".errors",
    "DatabaseTarget": ".db.engine",
    "ExitCode": ".errors",
    "ExportFormatError": ".errors",
    "ExternalToolError": ".errors",
    "InvalidArgumentError": ".errors",
    "InvalidConversationIdError": ".errors",
    "InvalidItemError": ".errors",
    "InvalidRunStateError": ".errors",
    "ItemTooLargeError": ".errors",
    "ItemTypeError": ".errors",
    "MessageRepository": ".repositories",
    "PoolOptions": ".db.engine",
    "PoolTimeoutError": ".errors",
    "PostgreSQLSession": ".session",
    "ProtectedBranchError": ".errors",
    "ReadOnlyDatabaseError": ".errors",
    "Repositories": ".repositories",
    "RestoreTargetNotEmptyError": ".errors",
    "RowLevelSecurityFilteredError": ".errors",
    "RunStateVersionError": ".errors",
    "SchemaError": ".errors",
    "SchemaNotAtHeadError": ".errors",
    "SearchHit": ".repositories",
    "SearchPage": ".repositories",
    "SessionStore": ".store",
    "Settings": ".settings",
    "StatementTimeoutError": ".errors",
    "StoredMessage": ".repositories",
    "TurnNotFoundError": ".errors",
    "UnknownBranchError": ".errors",
    "UsageEntry": ".repositories",
    "UsageRepository": ".repositories",
    "UsageTotals": ".repositories",
    "dispose_all": ".store",
    "get_store": ".store",
    "load_settings": ".settings",
    "parse_database_url": ".db.engine",
    "recall_tool": ".recall",
    "upgrade": ".db.migrate",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups find it directly
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "AccessDeniedError",
    "AgentsSessionsError",
    "BackupError",
    "BackupFileError",
    "BranchError",
    "BranchNameTakenError",
    "CitusError",
    "ConfigurationError",
    "ConnectionLostError",
    "ConversationNotFoundError",
    "ConversationPage",
    "ConversationRecord",
    "ConversationRepository",
    "DatabaseError",
    "DatabaseTarget",
    "ExitCode",
    "ExportFormatError",
    "ExternalToolError",
    "InvalidArgumentError",
    "InvalidConversationIdError",
    "InvalidItemError",
    "InvalidRunStateError",
    "ItemTooLargeError",
    "ItemTypeError",
    "MessageRepository",
    "PoolOptions",
    "PoolTimeoutError",
    "PostgreSQLSession",
    "ProtectedBranchError",
    "ReadOnlyDatabaseError",
    "Repositories",
    "RestoreTargetNotEmptyError",
    "RowLevelSecurityFilteredError",
    "RunStateVersionError",
    "SchemaError",
    "SchemaNotAtHeadError",
    "SearchHit",
    "SearchPage",
    "SessionStore",
    "Settings",
    "StatementTimeoutError",
    "StoredMessage",
    "TurnNotFoundError",
    "UnknownBranchError",
    "UsageEntry",
    "UsageRepository",
    "UsageTotals",
    "dispose_all",
    "get_store",
    "load_settings",
    "parse_database_url",
    "recall_tool",
    "upgrade",
]
