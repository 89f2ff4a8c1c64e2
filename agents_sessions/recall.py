"""An agent tool that searches its own user's past conversations (recall memory).

``recall_tool(user_id=...)`` returns an Agents SDK ``FunctionTool``: the model calls
it with a query ("what did we decide about Lisbon?") and gets back the best
matching passages of the user's stored conversations, with when and where they were
said. The user is fixed, or resolved from the run's context on every call (like a
session's ``tenant_id``); the model can never choose it.

Isolation: every search is filtered by owner (``user_id``) and, on PostgreSQL, also
runs *as* that user (the store's ``tenant_id``), so where row-level security is
enabled (``agents-sessions rls enable``) the database itself refuses to return
another tenant's text, whatever the query.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from .errors import InvalidArgumentError
from .repositories import Repositories, SearchPage
from .settings import Settings
from .store import SessionStore, get_store
from .validation import validate_identifier

if TYPE_CHECKING:
    from agents import FunctionTool, RunContextWrapper

#: Resolves the user whose conversations a run may search, from the run's context.
UserResolver = Callable[["RunContextWrapper[Any]"], str]

DEFAULT_DESCRIPTION = (
    "Search the user's past conversations with you by what was said. Give plain words "
    '(all must occur) or a "quoted phrase". Returns the best matching passages, newest '
    "first among equals, each with its date and conversation id."
)


def _render(page: SearchPage) -> str:
    if not page.hits:
        return "No past messages match."
    return "\n".join(
        f"[{hit.created_at:%Y-%m-%d %H:%M} UTC, conversation {hit.conversation_id}, "
        f"{hit.role}] {hit.snippet}"
        for hit in page.hits
    )


def recall_tool(
    database_url: str | None = None,
    *,
    user_id: str | UserResolver,
    store: SessionStore | None = None,
    settings: Settings | None = None,
    limit: int = 5,
    tenant_scoped: bool | None = None,
    name: str = "search_past_conversations",
    description: str = DEFAULT_DESCRIPTION,
) -> FunctionTool:
    """An SDK ``FunctionTool`` searching one user's stored conversations.

    Args:
        database_url: The store's URL (default: the settings', as for sessions).
        user_id: The user whose conversations are searched: an id, or a callable
            taking the run's ``RunContextWrapper`` and returning one.
        store: A store to use instead of ``database_url``/``settings``.
        limit: Most passages returned per call (1-50).
        tenant_scoped: Run each search as the user under PostgreSQL row-level
            security. Default: on PostgreSQL with psycopg2 (the driver tenant
            scoping needs), off elsewhere; the owner filter applies either way.
        name: The tool's name, as the model sees it.
        description: The tool's description, as the model sees it.

    The model passes ``query`` and optionally ``days`` (only messages from the last
    so many days).
    """
    from agents import RunContextWrapper, function_tool

    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 50:
        raise InvalidArgumentError("limit must be an int from 1 to 50")
    fixed_user = None if callable(user_id) else validate_identifier(user_id, name="user_id")
    resolver = user_id if callable(user_id) else None
    target = store or get_store(database_url, settings=settings)
    if tenant_scoped is None:
        tenant_scoped = (
            target.dialect == "postgresql" and target.target.url.get_driver_name() == "psycopg2"
        )
    scoped = tenant_scoped

    def search(user: str, query: str, since: datetime | None) -> SearchPage:
        return target.run_read(
            lambda repos: _search(repos, user, query, since), tenant_id=user if scoped else None
        )

    def _search(repos: Repositories, user: str, query: str, since: datetime | None) -> SearchPage:
        return repos.messages.search(query, user_id=user, limit=limit, since=since)

    async def search_past_conversations(
        context: RunContextWrapper[Any], query: str, days: int | None = None
    ) -> str:
        """Search the user's past conversations.

        Args:
            query: Words or a "quoted phrase" to look for.
            days: Only messages from the last this many days (all when omitted).
        """
        user = fixed_user
        if resolver is not None:
            user = validate_identifier(resolver(context), name="user_id")
        assert user is not None
        since = None
        if days is not None and days > 0:
            since = datetime.now(timezone.utc) - timedelta(days=min(days, 36_500))
        loop = asyncio.get_running_loop()
        page = await loop.run_in_executor(target.executor, search, user, query, since)
        return _render(page)

    # This module postpones annotations (a string each) and imports the SDK lazily:
    # hand the schema builder the real types.
    search_past_conversations.__annotations__ = {
        "context": RunContextWrapper[Any],
        "query": str,
        "days": int | None,
        "return": str,
    }
    return function_tool(
        search_past_conversations, name_override=name, description_override=description
    )
