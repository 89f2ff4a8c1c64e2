"""The agent session facade: the Agents SDK ``Session`` protocol over the repositories.

:class:`PostgreSQLSession` implements the protocol structurally (the SDK asks
third-party sessions not to subclass its ``SessionABC``), so ``Runner.run(agent,
input, session=PostgreSQLSession(...))`` stores every turn. Despite its name it
runs on any URL the package supports, including the embedded SQLite default.

Each call does its blocking database work in one hop to the store's thread pool
(sized to the connection pool), so the event loop never waits on the database.
Mutations are atomic per call, and a cancelled mutation is allowed to finish before
the cancellation is re-raised: its items are then all stored, never some of them.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from .items import encode_items
from .repositories import Repositories, UsageEntry
from .settings import Settings
from .store import SessionStore, get_store
from .validation import validate_identifier, validate_limit, validate_metadata

if TYPE_CHECKING:
    from agents.memory import SessionSettings

_T = TypeVar("_T")


async def _settle_then_propagate_cancellation(future: Awaitable[_T]) -> _T:
    """Wait for a started mutation to finish even if the caller is cancelled meanwhile.

    The database work runs in a thread and cannot be interrupted half-way anyway;
    waiting for it means the caller's cancellation never hides whether the write
    happened, and no later call on this session overtakes it. The cancellation is
    re-raised once the outcome is known (as the SDK's own backends do).
    """
    task = asyncio.ensure_future(future)
    cancellation: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError as exc:
            cancellation = cancellation or exc
    if cancellation is not None:
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log it as unhandled
        raise cancellation
    return task.result()


def _coerce_session_settings(value: Any) -> SessionSettings | None:
    if value is None:
        return None
    from agents.memory import SessionSettings  # the facade needs the SDK; the core does not

    if isinstance(value, SessionSettings):
        return value
    if isinstance(value, Mapping):
        return SessionSettings(**value)
    raise TypeError(
        f"session_settings must be a SessionSettings, a dict or None, got {type(value).__name__}"
    )


def _model_name(result: Any) -> str:
    """The model a run used, as best the result tells: the last agent's model."""
    model = getattr(getattr(result, "last_agent", None), "model", None)
    if isinstance(model, str) and model:
        return model
    if model is not None:
        name = getattr(model, "model", None)  # e.g. OpenAIResponsesModel.model
        return name if isinstance(name, str) and name else type(model).__name__
    try:
        from agents.models import get_default_model

        return str(get_default_model())
    except ImportError:  # pragma: no cover - the SDK provides it
        return "unknown"


def _usage_entry(
    usage: Any, *, model: str, run_id: str, response_id: str | None = None
) -> UsageEntry:
    """A ``usage_logs`` row from an SDK ``Usage`` (of one request, or a whole run)."""
    return UsageEntry(
        model=model,
        prompt_tokens=int(usage.input_tokens or 0),
        completion_tokens=int(usage.output_tokens or 0),
        total_tokens=int(usage.total_tokens or 0),
        # A request's Usage may leave `requests` at 0; it still was one request.
        requests=max(int(usage.requests or 0), 1 if response_id is not None else 0),
        run_id=run_id,
        response_id=response_id,
    )


class PostgreSQLSession:
    """An Agents SDK session stored in PostgreSQL (or the embedded SQLite default).

    Args:
        conversation_id: The conversation (SDK session) id: any string of 1 to 255
            characters (UUIDs, external ids...). Exposed as :attr:`session_id`.
        database_url: SQLAlchemy URL, e.g.
            ``postgresql://user:pass@host:5432/db?pool_size=20&max_overflow=10``.
            Defaults to ``DATABASE_URL`` from the environment or ``.env``, then to
            the embedded SQLite file. Sessions with the same URL share one pool.
        user_id: Owner of the conversation, stored on it at the first write (an
            existing owner is never replaced by a session).
        metadata: JSON object stored on the conversation at the first write
            (replacing the stored metadata).
        session_settings: The SDK's ``SessionSettings`` (or a dict of them); its
            ``limit`` caps ``get_items()`` when no explicit limit is passed.
        settings: Package settings; defaults to :class:`~agents_sessions.settings.Settings`
            read from the environment.

    Construction validates its arguments and does no I/O; the first database call
    checks (and by default migrates) the schema, once per engine.
    """

    session_id: str
    session_settings: SessionSettings | None

    def __init__(
        self,
        conversation_id: str,
        *,
        database_url: str | None = None,
        user_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        session_settings: SessionSettings | Mapping[str, Any] | None = None,
        settings: Settings | None = None,
    ) -> None:
        self.session_id = validate_identifier(conversation_id)
        self.user_id = None if user_id is None else validate_identifier(user_id, name="user_id")
        self._metadata = validate_metadata(metadata)
        self.session_settings = _coerce_session_settings(session_settings)
        self._store = get_store(database_url, settings=settings)
        # user_id/metadata ride along with writes until one has stored them.
        self._owner_pending = self.user_id is not None or self._metadata is not None

    @property
    def store(self) -> SessionStore:
        """The shared store behind this session (for the repository API)."""
        return self._store

    @property
    def conversation_id(self) -> str:
        """Same as :attr:`session_id`."""
        return self.session_id

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(conversation_id={self.session_id!r}, "
            f"database={self._store.target.safe_url!r})"
        )

    async def _in_thread(self, function: Callable[..., _T], *args: Any) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._store.executor, function, *args)

    async def _mutate(self, function: Callable[..., _T], *args: Any) -> _T:
        return await _settle_then_propagate_cancellation(self._in_thread(function, *args))

    # ------------------------------------------------------------------ protocol

    async def get_items(self, limit: int | None = None) -> list[Any]:
        """The latest ``limit`` items, oldest first.

        ``limit=None`` falls back to ``session_settings.limit``; if that is ``None``
        too, every item. ``limit=0`` returns ``[]``. A negative limit raises
        :class:`~agents_sessions.errors.InvalidArgumentError` (a ``ValueError``).
        """
        if limit is None and self.session_settings is not None:
            limit = self.session_settings.limit
        count = validate_limit(limit)
        if count == 0:
            return []
        return await self._in_thread(self._get_items, count)

    def _get_items(self, limit: int | None) -> list[Any]:
        def read(repos: Repositories) -> list[Any]:
            if limit is None:
                return repos.messages.all(self.session_id)
            return repos.messages.latest(self.session_id, limit)

        return self._store.run(read, write=False, repeatable=True)

    async def add_items(self, items: list[Any]) -> None:
        """Append ``items`` atomically, after everything already stored.

        Every item is validated before anything is written: an item that cannot be
        stored exactly raises :class:`~agents_sessions.errors.ItemTypeError` (a
        ``TypeError``) or :class:`~agents_sessions.errors.InvalidItemError` (a
        ``ValueError``; :class:`~agents_sessions.errors.ItemTooLargeError` above
        ``max_item_bytes``) and nothing of the call is stored. ``add_items([])``
        does nothing.

        Exactly once: each call carries a fresh idempotency key, so when the
        connection dies around the commit the call is retried on a new connection
        and its items are stored once -- never lost, never twice.
        """
        if isinstance(items, list) and not items:
            return
        await self._mutate(self._add_items, items)

    def _add_items(self, items: list[Any]) -> None:
        # In the worker thread: large items stay off the loop.
        encoded = encode_items(items, max_item_bytes=self._store.settings.max_item_bytes)
        owner = self._owner_pending
        # One key for every attempt of this call: a retry after an unknown commit
        # outcome finds the key if the first attempt committed, and writes nothing.
        key = uuid.uuid4().hex
        self._store.run(
            lambda repos: repos.messages.append_encoded(
                self.session_id,
                encoded,
                user_id=self.user_id if owner else None,
                metadata=self._metadata if owner else None,
                idempotency_key=key,
            ),
            write=True,
            repeatable=True,
        )
        if owner:
            self._owner_pending = False

    async def pop_item(self) -> Any | None:
        """Remove and return the newest item, or ``None`` when there is none.

        Concurrent pops never return the same item. A pop is never repeated
        automatically: if the connection dies while it runs,
        :class:`~agents_sessions.errors.ConnectionLostError` says so (the item may
        or may not be gone).
        """
        return await self._mutate(self._pop_item)

    def _pop_item(self) -> Any | None:
        return self._store.run(
            lambda repos: repos.messages.pop_latest(self.session_id), write=True, repeatable=False
        )

    async def clear_session(self) -> None:
        """Delete every item of this conversation. Idempotent; the session stays usable.

        The conversation row, its metadata and its usage records are kept; delete
        the conversation through the repository API to remove those too.
        """
        await self._mutate(self._clear)

    def _clear(self) -> None:
        # Repeating a clear changes nothing more, so it is retried like a read.
        self._store.run(
            lambda repos: repos.messages.clear(self.session_id),
            write=True,
            repeatable=True,
            transaction=True,
        )

    # ------------------------------------------------------------------ usage

    async def record_usage(
        self,
        result: Any,
        *,
        model: str | None = None,
        per_request: bool = True,
        run_id: str | None = None,
    ) -> int:
        """Store the token usage of a finished run in ``usage_logs``.

        Args:
            result: What ``Runner.run`` returned (or a finished streamed result).
            model: Model name to record; defaults to the last agent's model.
            per_request: One row per model request (``True``, the default) or one
                row for the whole run.
            run_id: Groups the rows of this run; a new UUID by default.

        Returns:
            The number of rows written.
        """
        name = model or _model_name(result)
        run = run_id or uuid.uuid4().hex
        if per_request:
            responses = getattr(result, "raw_responses", None) or []
            entries = [
                _usage_entry(
                    response.usage, model=name, run_id=run, response_id=response.response_id
                )
                for response in responses
            ]
        else:
            entries = [_usage_entry(result.context_wrapper.usage, model=name, run_id=run)]
        if not entries:
            return 0
        return await self._mutate(self._record_usage, entries)

    def _record_usage(self, entries: list[UsageEntry]) -> int:
        owner = self._owner_pending

        def record(repos: Repositories) -> int:
            repos.conversations.ensure(
                self.session_id,
                user_id=self.user_id if owner else None,
                metadata=self._metadata if owner else None,
            )
            return repos.usage.record(self.session_id, entries)

        written = self._store.run(record, write=True, repeatable=False, transaction=True)
        if owner:
            self._owner_pending = False
        return written
