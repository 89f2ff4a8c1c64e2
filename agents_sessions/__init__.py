"""agents_sessions: a durable, pooled conversation store for the OpenAI Agents SDK.

Three ways in:

* the session backend -- ``PostgreSQLSession(conversation_id=..., database_url=...)``
  passed to ``Runner.run(agent, input, session=...)``;
* migrations -- ``alembic upgrade head`` from the repository root, or
  :func:`agents_sessions.migrate.upgrade` from an installed package;
* the repository API -- ``with get_store(url).transaction() as repos: ...``.
"""

from .engine import DatabaseTarget, PoolOptions, parse_database_url
from .errors import (
    AccessDeniedError,
    AgentsSessionsError,
    ConfigurationError,
    ConnectionLostError,
    DatabaseError,
    InvalidArgumentError,
    InvalidConversationIdError,
    InvalidItemError,
    ItemTooLargeError,
    ItemTypeError,
    PoolTimeoutError,
    ReadOnlyDatabaseError,
    SchemaError,
    SchemaNotAtHeadError,
    StatementTimeoutError,
)
from .migrate import upgrade
from .repositories import (
    ConversationPage,
    ConversationRecord,
    ConversationRepository,
    MessageRepository,
    Repositories,
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
    "ConfigurationError",
    "ConnectionLostError",
    "ConversationPage",
    "ConversationRecord",
    "ConversationRepository",
    "DatabaseError",
    "DatabaseTarget",
    "InvalidArgumentError",
    "InvalidConversationIdError",
    "InvalidItemError",
    "ItemTooLargeError",
    "ItemTypeError",
    "MessageRepository",
    "PoolOptions",
    "PoolTimeoutError",
    "PostgreSQLSession",
    "ReadOnlyDatabaseError",
    "Repositories",
    "SchemaError",
    "SchemaNotAtHeadError",
    "SessionStore",
    "Settings",
    "StatementTimeoutError",
    "StoredMessage",
    "UsageEntry",
    "UsageRepository",
    "UsageTotals",
    "dispose_all",
    "get_store",
    "load_settings",
    "parse_database_url",
    "upgrade",
]
