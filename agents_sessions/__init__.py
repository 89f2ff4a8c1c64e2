"""agents_sessions: a durable, pooled conversation store for the OpenAI Agents SDK.

Three ways in:

* the session backend -- ``PostgreSQLSession(conversation_id=..., database_url=...)``
  passed to ``Runner.run(agent, input, session=...)``;
* migrations -- ``alembic upgrade head`` from the repository root, or
  :func:`agents_sessions.db.migrate.upgrade` from an installed package;
* the repository API -- ``with get_store(url).transaction() as repos: ...``.
"""

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
