"""The explorer's web application: routes, page handlers, error pages.

Every handler is a plain function (Starlette runs it in its thread pool): it opens one
read-only transaction (:func:`.reading.read_only`), runs the page's queries
(:mod:`.queries`) and renders a Jinja2 template with autoescaping on, so anything
stored -- a message, a user id, a tool's output -- reaches the page as text.

Extension points, for pages and sections still to come:

* a new page: a handler here, a :class:`~starlette.routing.Route` in
  :func:`create_app`, and a :class:`NavLink` in :data:`NAVIGATION`;
* a new section of the conversation page (branches and turns, a paused run, ...): a
  :class:`ConversationPanel` in :data:`CONVERSATION_PANELS` -- what it reads and the
  template that draws it; a panel that has nothing to show returns ``None``;
* a new narrowing of the conversation list: a field of
  :class:`~.queries.ConversationFilter` and its condition in
  :func:`~.queries.list_conversations`.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import IO, Any

from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy import Connection
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from ..errors import AgentsSessionsError, ConversationNotFoundError, InvalidArgumentError
from ..ops.transfer import export_conversations
from ..store import SessionStore
from ..validation import validate_identifier
from . import charts, queries
from .reading import read_only
from .security import ExplorerAccess, ExplorerGuard
from .transcript import transcript

logger = logging.getLogger("agents_sessions.ui")

#: How long the usage page's numbers are reused (seconds). They aggregate every row of
#: the window -- a month of usage on a big store takes a second of database time --
#: so a dashboard left open, or several people looking, costs one computation per
#: window per interval. The page says "as of" when they were read.
USAGE_MAX_AGE_S = 30.0

# Exports up to this size stay in memory; larger ones spill to a temporary file.
_EXPORT_SPOOL_BYTES = 8 * 1024 * 1024
_EXPORT_CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True)
class NavLink:
    """An entry of the navigation bar: the route's name and its label."""

    route: str
    label: str


NAVIGATION: tuple[NavLink, ...] = (
    NavLink("conversations", "Conversations"),
    NavLink("usage", "Usage"),
)


@dataclass(frozen=True)
class ConversationPanel:
    """A section of the conversation page, below the transcript.

    Attributes:
        title: The section's heading.
        template: The template drawing it; it gets the mapping ``read`` returned as
            ``panel`` (and the page's own context).
        read: What the section shows, read on the page's connection (inside its
            read-only transaction); ``None`` leaves the section out.
    """

    title: str
    template: str
    read: Callable[[Connection, queries.ConversationView], Mapping[str, Any] | None]


def _usage_panel(
    connection: Connection, view: queries.ConversationView
) -> Mapping[str, Any] | None:
    return {"usage": queries.usage_by_model(connection, view.conversation.id)}


CONVERSATION_PANELS: tuple[ConversationPanel, ...] = (
    ConversationPanel("Usage by model", "panels/usage.html", _usage_panel),
)


# ------------------------------------------------------------------ templates


def _when(moment: datetime | None) -> str:
    if moment is None:
        return ""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _number(value: int) -> str:
    return f"{value:,}"


def _pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True)


def _templates() -> Jinja2Templates:
    environment = Environment(
        loader=PackageLoader("agents_sessions.ui", "templates"),
        # Every template is HTML (the charts are inline SVG): escape everything.
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["when"] = _when
    environment.filters["number"] = _number
    environment.filters["compact"] = charts.compact_number
    environment.filters["pretty_json"] = _pretty_json
    environment.globals["navigation"] = NAVIGATION
    return Jinja2Templates(env=environment)


# A conversation id may hold anything ("/", "?", "%", ...): it travels as a query
# parameter, which every server and client decodes exactly once (a path segment with
# "%2F" or "%25" in it is decoded differently by different servers).


def conversation_path(request: Request, conversation_id: str, **query: Any) -> str:
    """The conversation page's address."""
    url = request.url_for("conversation").include_query_params(id=conversation_id, **query)
    return str(url)


def export_path(request: Request, conversation_id: str) -> str:
    """The address of the conversation's JSON Lines download."""
    return str(request.url_for("export").include_query_params(id=conversation_id))


def list_path(request: Request, **query: Any) -> str:
    """The conversation list's address with these query parameters (``None`` left out)."""
    url = request.url_for("conversations")
    parameters = {name: value for name, value in query.items() if value is not None}
    return str(url.include_query_params(**parameters)) if parameters else str(url)


class Explorer:
    """The page handlers over one store."""

    def __init__(self, store: SessionStore, *, usage_max_age_s: float = USAGE_MAX_AGE_S) -> None:
        self.store = store
        self.templates = _templates()
        self.usage_max_age_s = usage_max_age_s
        self._usage: dict[str, tuple[float, queries.UsageOverview]] = {}
        self._usage_locks = {key: threading.Lock() for key in queries.WINDOWS}

    def usage_overview(self, window: queries.Window) -> queries.UsageOverview:
        """The window's overview, read again once it is older than ``usage_max_age_s``.

        One reader per window at a time: requests arriving while it is being read wait
        for that reading instead of starting their own.
        """
        with self._usage_locks[window.key]:
            cached = self._usage.get(window.key)
            if cached is not None and time.monotonic() - cached[0] < self.usage_max_age_s:
                return cached[1]
            with read_only(self.store) as connection:
                overview = queries.usage_overview(
                    connection, window, now=datetime.now(timezone.utc)
                )
            self._usage[window.key] = (time.monotonic(), overview)
            return overview

    def render(
        self, request: Request, template: str, context: dict[str, Any], status: int = 200
    ) -> Response:
        context.update(
            backend="PostgreSQL" if self.store.dialect == "postgresql" else "SQLite",
            conversation_path=lambda conversation_id, **query: conversation_path(
                request, conversation_id, **query
            ),
            export_path=lambda conversation_id: export_path(request, conversation_id),
            list_path=lambda **query: list_path(request, **query),
        )
        return self.templates.TemplateResponse(request, template, context, status_code=status)

    # ---------------------------------------------------------------- pages

    def conversations(self, request: Request) -> Response:
        """The conversation list: newest first, filtered, one keyset page."""
        conversation_filter = queries.ConversationFilter(
            user_id=_identifier_parameter(request, "user"),
            created_from=_date_parameter(request, "from"),
            created_to=_date_parameter(request, "to"),
        )
        after = request.query_params.get("after") or None
        with read_only(self.store) as connection:
            listing = queries.list_conversations(connection, conversation_filter, after=after)
        return self.render(
            request,
            "conversations.html",
            {
                "page": "conversations",
                "filter": conversation_filter,
                "listing": listing,
                "next_page": (
                    list_path(
                        request, **conversation_filter.query_parameters(), after=listing.next_cursor
                    )
                    if listing.next_cursor
                    else None
                ),
                "first_page": list_path(request, **conversation_filter.query_parameters())
                if after
                else None,
            },
        )

    def conversation(self, request: Request) -> Response:
        """One conversation: its transcript (a page of items), its panels, its download."""
        conversation_id = _conversation_id(request)
        after_id = _count_parameter(request, "after")
        with read_only(self.store) as connection:
            view = queries.read_conversation(connection, conversation_id, after_id=after_id)
            if view is None:
                raise HTTPException(404, "There is no conversation with this id.")
            panels = [
                (panel, content)
                for panel in CONVERSATION_PANELS
                if (content := panel.read(connection, view)) is not None
            ]
        return self.render(
            request,
            "conversation.html",
            {
                "page": "conversation",
                "view": view,
                "entries": transcript(view.documents),
                "panels": panels,
                "later_items": (
                    conversation_path(request, conversation_id, after=view.next_after)
                    if view.next_after is not None
                    else None
                ),
                "from_start": conversation_path(request, conversation_id)
                if after_id is not None
                else None,
            },
        )

    async def export(self, request: Request) -> Response:
        """The conversation as JSON Lines, in the format ``agents-sessions export`` writes.

        The export is read in full (one snapshot, through :mod:`agents_sessions.ops.transfer`)
        before the first byte is sent, so no database connection waits on a slow client.
        """
        conversation_id = _conversation_id(request)
        spool = await run_in_threadpool(self._export_to_spool, conversation_id)
        filename = re.sub(r"[^A-Za-z0-9._-]+", "_", conversation_id)[:80] or "conversation"
        return StreamingResponse(
            _chunks(spool),
            media_type="application/x-ndjson",
            headers={"content-disposition": f'attachment; filename="{filename}.jsonl"'},
        )

    def _export_to_spool(self, conversation_id: str) -> IO[bytes]:
        spool = tempfile.SpooledTemporaryFile(max_size=_EXPORT_SPOOL_BYTES)  # noqa: SIM115
        try:
            export_conversations(self.store, spool, conversation_ids=[conversation_id])
        except ConversationNotFoundError:
            spool.close()
            raise HTTPException(404, "There is no conversation with this id.") from None
        except BaseException:
            spool.close()
            raise
        spool.seek(0)
        return spool

    def usage(self, request: Request) -> Response:
        """Tokens per model and active conversations over time, top users, seed numbers."""
        key = request.query_params.get("window", queries.DEFAULT_WINDOW)
        window = queries.WINDOWS.get(key)
        if window is None:
            raise InvalidArgumentError(
                f"window must be one of {', '.join(queries.WINDOWS)}, got {key!r}"
            )
        overview = self.usage_overview(window)
        label = _bucket_label(window)
        series, values = charts.top_series(overview.tokens)
        token_chart = charts.stacked_bars(
            f"Tokens per model per {window.bucket}",
            overview.buckets,
            series,
            values,
            bucket_label=label,
            unit="tokens",
        )
        active_chart = charts.stacked_bars(
            f"Active conversations per {window.bucket}",
            overview.buckets,
            ["active conversations"],
            {(bucket, "active conversations"): count for bucket, count in overview.active.items()},
            bucket_label=label,
            unit="conversations",
        )
        return self.render(
            request,
            "usage.html",
            {
                "page": "usage",
                "overview": overview,
                "windows": list(queries.WINDOWS.values()),
                "token_chart": token_chart,
                "active_chart": active_chart,
                "generated_at": overview.as_of,
            },
        )

    # ---------------------------------------------------------------- error pages

    async def http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return self.render(
            request, "error.html", {"page": "error", "message": exc.detail}, exc.status_code
        )

    async def package_error(self, request: Request, exc: Exception) -> Response:
        if isinstance(exc, ValueError):  # a bad parameter: its message names it
            return self.render(request, "error.html", {"page": "error", "message": str(exc)}, 400)
        # Database trouble: the details (which may name the server) go to the log only.
        logger.error("agents_sessions.ui: %s on %s", type(exc).__name__, request.url.path)
        logger.debug("agents_sessions.ui: %s", exc)
        return self.render(
            request,
            "error.html",
            {
                "page": "error",
                "message": f"The database could not answer ({type(exc).__name__}); "
                "see the explorer's log.",
            },
            503,
        )


def _chunks(spool: IO[bytes]) -> Iterator[bytes]:
    with spool:
        while chunk := spool.read(_EXPORT_CHUNK_BYTES):
            yield chunk


def _bucket_label(window: queries.Window) -> Callable[[datetime], str]:
    if window.bucket == "hour":
        return lambda moment: moment.strftime("%H:00")
    return lambda moment: moment.strftime("%b %d")


def _conversation_id(request: Request) -> str:
    value = request.query_params.get("id")
    if value is None:
        raise InvalidArgumentError("id (the conversation id) is missing")
    return validate_identifier(value, name="id")


def _identifier_parameter(request: Request, name: str) -> str | None:
    value = request.query_params.get(name, "").strip()
    return validate_identifier(value, name=name) if value else None


def _date_parameter(request: Request, name: str) -> date | None:
    value = request.query_params.get(name, "").strip()
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidArgumentError(f"{name} must be a date (YYYY-MM-DD), got {value!r}") from None


def _count_parameter(request: Request, name: str) -> int | None:
    value = request.query_params.get(name, "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise InvalidArgumentError(f"{name} must be an item id, got {value!r}")
    return int(value)


def create_app(
    store: SessionStore,
    access: ExplorerAccess | None = None,
    *,
    usage_max_age_s: float = USAGE_MAX_AGE_S,
) -> Starlette:
    """The explorer over ``store``, guarded by ``access`` (default: loopback, no token).

    The store is only ever read (:func:`.reading.read_only`); give it a read-only role
    or a replica's URL if you like. ``usage_max_age_s``: how long the usage page's
    numbers are reused (0: read on every request).
    """
    explorer = Explorer(store, usage_max_age_s=usage_max_age_s)
    access = access or ExplorerAccess.for_bind("127.0.0.1", None)
    return Starlette(
        routes=[
            Route("/", explorer.conversations, name="conversations"),
            Route("/conversation", explorer.conversation, name="conversation"),
            Route("/export", explorer.export, name="export"),
            Route("/usage", explorer.usage, name="usage"),
            Mount(
                "/static",
                app=StaticFiles(packages=[("agents_sessions.ui", "static")]),
                name="static",
            ),
        ],
        middleware=[Middleware(ExplorerGuard, access=access)],
        exception_handlers={
            HTTPException: explorer.http_error,
            AgentsSessionsError: explorer.package_error,
        },
    )
