"""Declarative ORM models over the schema's tables (:mod:`agents_sessions.db.tables`).

The tables are defined once, in Core (:mod:`agents_sessions.db.tables`), which is all
the session and the repositories use; these classes map them for the ORM, for
Alembic's autogenerate (``migrations/env.py`` compares ``Base.metadata``) and for code
that prefers mapped classes. Importing this module loads SQLAlchemy's ORM; nothing on
the session's paths does. Every name of the tables module is importable from here too.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import DeclarativeBase, Mapped, relationship

from .tables import (
    CONTENT_SEARCH_VECTOR,
    MAX_ID_LENGTH,
    NAMING_CONVENTION,
    ONLY_ON_DIALECT,
    SEARCH_CONFIG,
    BigIntegerPK,
    JSONDocument,
    MetadataJSON,
    append_keys_table,
    branches_table,
    comparison_filter,
    conversations_table,
    expiry_after,
    is_modelled,
    messages_table,
    metadata,
    run_states_table,
    sqlite_only,
    stored_utc,
    usage_logs_table,
    utcnow,
)

__all__ = [
    "CONTENT_SEARCH_VECTOR",
    "MAX_ID_LENGTH",
    "NAMING_CONVENTION",
    "ONLY_ON_DIALECT",
    "SEARCH_CONFIG",
    "AppendKey",
    "Base",
    "BigIntegerPK",
    "Conversation",
    "ConversationBranch",
    "JSONDocument",
    "Message",
    "MetadataJSON",
    "StoredRunState",
    "UsageLog",
    "append_keys_table",
    "branches_table",
    "comparison_filter",
    "conversations_table",
    "expiry_after",
    "is_modelled",
    "messages_table",
    "run_states_table",
    "sqlite_only",
    "stored_utc",
    "usage_logs_table",
    "utcnow",
]


class Base(DeclarativeBase):
    """Declarative base over the tables' ``MetaData`` (with its naming convention)."""

    metadata = metadata


class Conversation(Base):
    """One agent conversation (an SDK session), optionally owned by a user."""

    __table__ = conversations_table

    id: Mapped[str]
    user_id: Mapped[str | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    # `metadata` is reserved on declarative classes; the column keeps the seed's name.
    metadata_: Mapped[dict[str, Any]] = conversations_table.c.metadata  # type: ignore[assignment]
    current_branch: Mapped[str | None]
    expires_at: Mapped[datetime | None]

    messages: Mapped[list[Message]] = relationship(
        back_populates="conversation", passive_deletes=True, order_by="Message.id"
    )
    usage_logs: Mapped[list[UsageLog]] = relationship(
        back_populates="conversation", passive_deletes=True
    )


class Message(Base):
    """One stored agent item, in history order by ``id``."""

    __table__ = messages_table

    id: Mapped[int]
    conversation_id: Mapped[str]
    role: Mapped[str]
    content: Mapped[str]
    item: Mapped[Any]
    created_at: Mapped[datetime]
    append_key: Mapped[str | None]
    branch_id: Mapped[str]

    conversation: Mapped[Conversation] = relationship(back_populates="messages")


class UsageLog(Base):
    """Token usage of one model request (or one whole run) in a conversation."""

    __table__ = usage_logs_table

    conversation: Mapped[Conversation] = relationship(back_populates="usage_logs")


class ConversationBranch(Base):
    """A branch of a conversation other than an unforked ``main`` (see the table)."""

    __table__ = branches_table


class AppendKey(Base):
    """The idempotency key of an ``add_items`` call (see the table)."""

    __table__ = append_keys_table


class StoredRunState(Base):
    """A paused agent run, at most one per conversation (see the table)."""

    __table__ = run_states_table
