"""The agent session facade: the Agents SDK ``Session`` protocol over the repositories.

:class:`PostgreSQLSession` implements the protocol structurally (the SDK asks
third-party sessions not to subclass its ``SessionABC``), so ``Runner.run(agent,
input, session=PostgreSQLSession(...))`` stores every turn. Despite its name it
runs on any URL the package supports, including the embedded SQLite default.

The event loop never waits on the database: ``get_items`` and ``add_items`` are one
statement each on PostgreSQL and run on the loop's asynchronous connections
(:mod:`agents_sessions.loop_statements`), as does a bounded ``get_items`` of the
embedded SQLite file, on a connection that never waits for a lock; everything else
-- transactions, SQLite writes, tenants -- takes one hop to the store's thread pool
(sized to the connection pool).
Mutations are atomic per call, and a cancelled mutation is allowed to finish before
the cancellation is re-raised: its items are then all stored, never some of them.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from contextlib import suppress
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from .cancellation import settle_then_propagate_cancellation
from .db.hot_path import HotMessages
from .db.sqlite_hot_path import NotOnTheHotPath, run_on_sqlite
from .errors import ConnectionLostError, InvalidArgumentError
from .expiry import retention_options
from .history import HistoryManagementMixin, validate_branch_name
from .idempotency import new_append_key
from .items import encode_items
from .loop_statements import read_sqlite_on_loop, run_on_loop, runs_on_loop
from .repositories import Repositories, UsageEntry
from .repositories.messages import append_statement, history_statement, pop_statement
from .repositories.usage import UNKNOWN_MODEL, usage_rows
from .settings import Settings
from .store import SessionStore, get_store
from .usage_capture import (
    RUN_USAGE_ATTRIBUTE,
    RunUsage,
    combined_entry,
    model_name,
    observe_run,
    pending_usage,
    record_turn_usage,
    usage_entry,
)
from .validation import (
    coerce_session_settings,
    validate_identifier,
    validate_limit,
    validate_metadata,
)

if TYPE_CHECKING:
    from agents import Agent, RunContextWrapper, RunState
    from agents.memory import SessionSettings

#: Resolves the acting tenant of a run from the SDK's run context.
TenantResolver = Callable[["RunContextWrapper[Any]"], str]

_T = TypeVar("_T")


class PostgreSQLSession(HistoryManagementMixin):
    """An Agents SDK session stored in PostgreSQL (or the embedded SQLite default).

    Beyond the ``Session`` protocol it offers the history management API of the SDK's
    ``AdvancedSQLiteSession`` (turns, branches, usage per turn; see
    :mod:`agents_sessions.history`), and records token usage automatically.

    Args:
        conversation_id: The conversation (SDK session) id: any string of 1 to 255
            characters (UUIDs, external ids...). Exposed as :attr:`session_id`.
        database_url: SQLAlchemy URL, e.g.
            ``postgresql://user:pass@host:5432/db?pool_size=20&max_overflow=10``.
            Defaults to ``DATABASE_URL`` from the environment or ``.env``, then to
            the embedded SQLite file (announced once as a WARNING; with
            ``AGENTS_SESSIONS_REQUIRE_DATABASE_URL=true`` a missing URL is a
            :class:`ConfigurationError` instead). Sessions with the same URL share one pool.
        user_id: Owner of the conversation, sent with every write, so a conversation
            this session creates -- again, after an erasure -- is always owned (an
            existing owner is never replaced by a session).
        metadata: JSON object stored on the conversation at the first write
            (replacing the stored metadata).
        session_settings: The SDK's ``SessionSettings`` (or a dict of them); its
            ``limit`` caps ``get_items()`` when no explicit limit is passed.
        settings: Package settings; defaults to :class:`~agents_sessions.settings.Settings`
            read from the environment.
        tenant_id: The user this session acts for under PostgreSQL row-level
            security (see :mod:`agents_sessions.ops.tenancy`): a user id, or a callable
            that takes the run's ``RunContextWrapper`` (which the Runner passes to
            every call as ``wrapper``) and returns one. New conversations are owned
            by the tenant; ``user_id``, if also given, must be the same user.
        ttl: Time-to-live of the conversation (default: the ``ttl`` setting,
            ``AGENTS_SESSIONS_TTL``). Each ``add_items`` or ``pop_item`` extends it;
            once it has passed the conversation reads as empty, and the next
            ``add_items`` starts it afresh. See :mod:`agents_sessions.expiry`.
        keep_last_turns: After each ``add_items``, keep only the newest this many
            turns (a turn starts at a user message); older items are deleted.

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
        tenant_id: str | TenantResolver | None = None,
        ttl: timedelta | None = None,
        keep_last_turns: int | None = None,
    ) -> None:
        self.session_id = validate_identifier(conversation_id)
        self.user_id = None if user_id is None else validate_identifier(user_id, name="user_id")
        self._tenant_resolver: TenantResolver | None = None
        self.tenant_id: str | None = None
        if callable(tenant_id):
            if self.user_id is not None:
                raise InvalidArgumentError(
                    "give user_id or a callable tenant_id, not both: with a callable, each "
                    "call's tenant owns the conversations it creates"
                )
            self._tenant_resolver = tenant_id
        elif tenant_id is not None:
            self.tenant_id = validate_identifier(tenant_id, name="tenant_id")
            if self.user_id is None:
                self.user_id = self.tenant_id
            elif self.user_id != self.tenant_id:
                raise InvalidArgumentError(
                    "user_id and tenant_id name different users; a tenant-scoped "
                    "session can only own conversations of its tenant"
                )
        self._metadata = validate_metadata(metadata)
        self.session_settings = coerce_session_settings(session_settings)
        self._store = get_store(database_url, settings=settings)
        self.ttl, self.keep_last_turns = retention_options(
            ttl, keep_last_turns, default_ttl=self._store.settings.ttl
        )
        self._ttl_seconds = None if self.ttl is None else int(self.ttl.total_seconds())
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
        return await self._store.call_in_thread(function, *args)

    async def _mutate(self, function: Callable[..., _T], *args: Any) -> _T:
        return await settle_then_propagate_cancellation(self._in_thread(function, *args))

    def _acting_tenant(self, wrapper: RunContextWrapper[Any] | None) -> str | None:
        """The tenant of this call: fixed, or resolved from the run's context."""
        if self._tenant_resolver is None:
            return self.tenant_id
        if wrapper is None:
            raise InvalidArgumentError(
                "this session resolves its tenant from the run context: pass wrapper= "
                "(the Runner does), or construct it with a fixed tenant_id"
            )
        return validate_identifier(self._tenant_resolver(wrapper), name="tenant_id")

    def _owner(self, tenant: str | None) -> tuple[str | None, dict[str, Any] | None]:
        """The user_id to store with this write, and the metadata until it is stored.

        The owner rides with *every* write, not only the first: any write may create
        the conversation again after an erasure, a delete or a prune removed it, and a
        conversation re-created without its owner would escape the next erasure of
        that user. It costs nothing: an existing owner is never replaced.
        """
        metadata = self._metadata if self._owner_pending else None
        if tenant is not None:
            # A conversation created under row-level security must name its tenant.
            return tenant, metadata
        return self.user_id, metadata

    # ------------------------------------------------------------------ protocol

    async def get_items(
        self,
        limit: int | None = None,
        branch_id: str | None = None,
        *,
        wrapper: RunContextWrapper[Any] | None = None,
    ) -> list[Any]:
        """The latest ``limit`` items of the current branch (or ``branch_id``), oldest first.

        ``limit=None`` falls back to ``session_settings.limit``; if that is ``None``
        too, every item. ``limit=0`` returns ``[]``. A negative limit raises
        :class:`~agents_sessions.errors.InvalidArgumentError` (a ``ValueError``).
        An unknown or deleted ``branch_id`` has no items. ``wrapper`` is the run's
        context, passed by the Runner (used to resolve a callable ``tenant_id``, and
        to record the run's token usage).
        """
        if limit is None and self.session_settings is not None:
            limit = self.session_settings.limit
        count = validate_limit(limit)
        tenant = self._acting_tenant(wrapper)
        if wrapper is not None:
            observe_run(wrapper, from_start=False)
        if count == 0:
            return []
        if branch_id is not None:
            name = validate_branch_name(branch_id, name="branch_id")
            return await self._read(
                lambda repos: repos.branches.items(self.session_id, name, count)
            )
        if tenant is None and self._store.dialect == "sqlite":
            items = await read_sqlite_on_loop(self._store, self.session_id, count)
            if items is not None:
                return items
        if await runs_on_loop(
            self._store, tenant, lag_tolerant=self._store.settings.history_reads_from_replica
        ):
            hot = history_statement(self.session_id, count)
            return list(await run_on_loop(self._store, hot, write=False, repeatable=True))
        return await self._in_thread(self._get_items, count, tenant)

    def _get_items(self, limit: int | None, tenant: str | None) -> list[Any]:
        def read(messages: HotMessages) -> list[Any]:
            if limit is None:
                return messages.all(self.session_id)
            return messages.latest(self.session_id, limit)

        return self._store.run_hot(
            read,
            write=False,
            repeatable=True,
            tenant_id=tenant,
            # Off by default: a turn reads back what the previous turn wrote.
            lag_tolerant=self._store.settings.history_reads_from_replica,
        )

    async def add_items(
        self,
        items: list[Any],
        *,
        wrapper: RunContextWrapper[Any] | None = None,
        idempotency_key: str | None = None,
    ) -> None:
        """Append ``items`` atomically, after everything already stored.

        Every item is validated before anything is written: an item that cannot be
        stored exactly raises :class:`~agents_sessions.errors.ItemTypeError` (a
        ``TypeError``) or :class:`~agents_sessions.errors.InvalidItemError` (a
        ``ValueError``; :class:`~agents_sessions.errors.ItemTooLargeError` above
        ``max_item_bytes``) and nothing of the call is stored. ``add_items([])``
        does nothing.

        Exactly once: each call carries an idempotency key (a fresh one unless
        ``idempotency_key`` is given), so when the connection dies around the commit
        the call is retried on a new connection and its items are stored once --
        never lost, never twice. If the retries run out with the outcome unknown,
        :class:`~agents_sessions.errors.ConnectionLostError` carries the key:
        calling ``add_items(items, idempotency_key=error.idempotency_key)`` again
        stores the items exactly once whether or not the first call had (keys are
        kept for :data:`~agents_sessions.repositories.messages.APPEND_KEY_RETENTION`).
        """
        tenant = self._acting_tenant(wrapper)
        if idempotency_key is not None:
            validate_identifier(idempotency_key, name="idempotency_key")
        if isinstance(items, list) and not items:
            return
        mark = observe_run(wrapper, from_start=False) if wrapper is not None else None
        if mark is not None:
            entries, seen_entries, seen_requests = pending_usage(wrapper, mark, model=UNKNOWN_MODEL)
            if entries:
                # The run's new requests are recorded with this append (both or
                # neither), keyed by their position in the run: exactly once.
                if await runs_on_loop(self._store, tenant):
                    adding = self._add_on_loop(items, idempotency_key or new_append_key(), entries)
                    await settle_then_propagate_cancellation(adding)
                else:
                    await self._mutate(self._add_items, items, tenant, idempotency_key, entries)
                mark.entries, mark.requests = seen_entries, seen_requests
                return
        if await runs_on_loop(self._store, tenant):
            await settle_then_propagate_cancellation(
                self._add_on_loop(items, idempotency_key or new_append_key())
            )
            return
        await self._mutate(self._add_items, items, tenant, idempotency_key)

    async def _add_on_loop(
        self, items: list[Any], key: str, usage: list[UsageEntry] | None = None
    ) -> None:
        # add_items on the event loop (loop_statements): one round trip, no thread hop.
        encoded = encode_items(items, max_item_bytes=self._store.settings.max_item_bytes)
        user_id, metadata = self._owner(None)
        hot = append_statement(
            self.session_id,
            encoded,
            user_id=user_id,
            metadata=metadata,
            idempotency_key=key,
            ttl_seconds=self._ttl_seconds,
            usage=usage_rows(self.session_id, usage) if usage else None,
            keep_last_turns=self.keep_last_turns,
        )
        try:
            await run_on_loop(self._store, hot, write=True, repeatable=True)
        except ConnectionLostError as exc:
            exc.offer_key(key)
            raise
        self._owner_pending = False

    def _trim(self, tenant: str | None) -> None:
        # A second statement, only for sessions that trim: idempotent, so a
        # failure here loses nothing (the next add_items trims again).
        turns = self.keep_last_turns
        assert turns is not None
        self._store.run_write(
            lambda repos: repos.messages.trim_to_last_turns(self.session_id, turns),
            repeatable=True,
            tenant_id=tenant,
        )

    def _add_items(
        self,
        items: list[Any],
        tenant: str | None,
        idempotency_key: str | None = None,
        usage: list[UsageEntry] | None = None,
    ) -> None:
        # In the worker thread: large items stay off the loop.
        encoded = encode_items(items, max_item_bytes=self._store.settings.max_item_bytes)
        user_id, metadata = self._owner(tenant)
        # One key for every attempt of this call: a retry after an unknown commit
        # outcome finds the key if the first attempt committed, and writes nothing.
        # SQLite needs none: its commit is local, its outcome known (never retried).
        key = idempotency_key or (None if self._store.dialect == "sqlite" else new_append_key())
        try:
            if usage:

                def append_with_usage(repos: Repositories) -> None:
                    repos.messages.append_encoded(
                        self.session_id,
                        encoded,
                        user_id=user_id,
                        metadata=metadata,
                        idempotency_key=key,
                        ttl_seconds=self._ttl_seconds,
                    )
                    record_turn_usage(repos, self.session_id, usage)

                # Repeatable: the key makes the append, and the usage keys the usage, once.
                self._store.run_transaction(append_with_usage, repeatable=True, tenant_id=tenant)
            else:
                self._store.run_hot(
                    lambda messages: messages.append_encoded(
                        self.session_id,
                        encoded,
                        user_id=user_id,
                        metadata=metadata,
                        idempotency_key=key,
                        ttl_seconds=self._ttl_seconds,
                    ),
                    write=True,
                    repeatable=True,
                    tenant_id=tenant,
                )
        except ConnectionLostError as exc:
            if key is not None:
                exc.offer_key(key)
            raise
        self._owner_pending = False
        if self.keep_last_turns is not None:
            self._trim(tenant)

    async def pop_item(self, *, wrapper: RunContextWrapper[Any] | None = None) -> Any | None:
        """Remove and return the newest item, or ``None`` when there is none.

        Concurrent pops never return the same item. A pop is never repeated
        automatically: if the connection dies while it runs,
        :class:`~agents_sessions.errors.ConnectionLostError` says so (the item may
        or may not be gone).

        Cancellation, as in the SDK's own backends: a pop that has started is
        finished, then the cancellation is re-raised, so the item is removed and
        the cancelled caller never receives it. To keep it, shield the call
        (``await asyncio.shield(pop)``) and read its result.
        """
        tenant = self._acting_tenant(wrapper)
        if await runs_on_loop(self._store, tenant):
            hot = pop_statement(self.session_id, self._ttl_seconds)
            popped = await settle_then_propagate_cancellation(
                run_on_loop(self._store, hot, write=True, repeatable=False)
            )
            if popped:
                return popped[0]
        return await self._mutate(self._pop_item, tenant)

    def _pop_item(self, tenant: str | None) -> Any | None:
        if tenant is None and self._store.dialect == "sqlite":
            with suppress(NotOnTheHotPath):  # raised for a conversation with branches
                return run_on_sqlite(
                    self._store,
                    lambda hot: hot.pop_latest(self.session_id, ttl_seconds=self._ttl_seconds),
                )
        # A transaction: the pop locks the conversation, finds the newest item of the
        # current branch, and keeps it for any other branch that shares it.
        return self._store.run_transaction(
            lambda repos: repos.messages.pop_latest(self.session_id, ttl_seconds=self._ttl_seconds),
            repeatable=False,
            tenant_id=tenant,
        )

    async def clear_session(self, *, wrapper: RunContextWrapper[Any] | None = None) -> None:
        """Delete every item of this conversation, on every branch. Idempotent.

        The conversation continues on ``main``; names of branches used before stay
        reserved. The conversation row, its metadata and its usage records are kept
        (no turn shows that usage any more); delete the conversation through the
        repository API to remove those too.
        """
        tenant = self._acting_tenant(wrapper)
        await self._mutate(self._clear, tenant)

    def _clear(self, tenant: str | None) -> None:
        # Repeating a clear changes nothing more, so it is retried like a read.
        self._store.run_transaction(
            lambda repos: repos.messages.clear(self.session_id),
            repeatable=True,
            tenant_id=tenant,
        )

    # ------------------------------------------------------------------ usage

    async def record_usage(
        self,
        result: Any,
        *,
        model: str | None = None,
        per_request: bool = True,
        run_id: str | None = None,
        wrapper: RunContextWrapper[Any] | None = None,
    ) -> int:
        """Store the token usage of a finished run in ``usage_logs``, once.

        When the Runner ran with this session, each request was already recorded as
        it happened (``add_items`` receives the run's context): this call then only
        names the model of those rows and records what is missing, so nothing is
        counted twice, however often it is called for the same result.

        Args:
            result: What ``Runner.run`` returned (or a finished streamed result).
            model: Model name to record; defaults to the last agent's model.
            per_request: One row per model request (``True``, the default) or one
                row for the requests not recorded yet.
            run_id: Groups the rows of this run when none were recorded yet; a new
                UUID by default.
            wrapper: The run context, for a callable ``tenant_id`` (defaults to
                ``result.context_wrapper``).

        Returns:
            The number of rows this call wrote.
        """
        name = model or model_name(result)
        context = getattr(result, "context_wrapper", None)
        fresh = context is not None and not isinstance(
            getattr(context, RUN_USAGE_ATTRIBUTE, None), RunUsage
        )
        mark = observe_run(context, from_start=True) if context is not None else None
        if mark is None:
            entries = [
                usage_entry(
                    response.usage,
                    model=name,
                    run_id=run_id or uuid.uuid4().hex,
                    response_id=response.response_id,
                )
                for response in getattr(result, "raw_responses", None) or []
            ]
            seen: tuple[int, int] | None = None
        else:
            if fresh and run_id is not None:
                mark.run_id = run_id
            response_ids = [
                getattr(response, "response_id", None)
                for response in getattr(result, "raw_responses", None) or []
            ]
            entries, seen_entries, seen_requests = pending_usage(
                context, mark, model=name, response_ids=response_ids
            )
            seen = (seen_entries, seen_requests)
            if entries and not per_request:
                entries = [combined_entry(entries)]
        if wrapper is None and self._tenant_resolver is not None:
            wrapper = context
        tenant = self._acting_tenant(wrapper)
        written = await self._mutate(
            self._record_usage, entries, tenant, None if mark is None else mark.run_id, name
        )
        if mark is not None and seen is not None:
            mark.entries, mark.requests = seen
        return written

    def _record_usage(
        self, entries: list[UsageEntry], tenant: str | None, run_id: str | None, model: str
    ) -> int:
        user_id, metadata = self._owner(tenant)

        def record(repos: Repositories) -> int:
            if run_id is not None:
                repos.usage.name_model(self.session_id, run_id, model)
            if not entries:
                return 0
            repos.conversations.ensure(self.session_id, user_id=user_id, metadata=metadata)
            return record_turn_usage(repos, self.session_id, entries)

        # Repeatable: every row is keyed by (run, request), so a retry writes no row twice.
        written = self._store.run_transaction(record, repeatable=True, tenant_id=tenant)
        if entries:
            self._owner_pending = False
        return written

    # ------------------------------------------------------------------ paused runs
    # (human-in-the-loop approvals; see agents_sessions.run_states)

    async def save_run_state(
        self,
        state: RunState[Any, Any],
        *,
        context_serializer: Any = None,
        strict_context: bool = False,
        wrapper: RunContextWrapper[Any] | None = None,
    ) -> None:
        """Store a paused run (``result.to_state()``) with this conversation.

        Replaces any paused run stored before. The state is serialized with the SDK's
        ``to_json()`` and checked first: not JSON, or larger than
        ``max_run_state_bytes``, raises
        :class:`~agents_sessions.errors.InvalidRunStateError` and nothing is saved.
        """
        from .run_states import encode_run_state

        tenant = self._acting_tenant(wrapper)
        encoded = encode_run_state(
            state,
            max_bytes=self._store.settings.max_run_state_bytes,
            context_serializer=context_serializer,
            strict_context=strict_context,
        )
        user_id, _ = self._owner(tenant)
        await self._mutate(
            lambda: self._store.run_transaction(
                lambda repos: repos.run_states.save(
                    self.session_id, user_id=user_id, **encoded.save_arguments()
                ),
                repeatable=True,  # an upsert of the same document
                tenant_id=tenant,
            )
        )

    async def load_run_state(
        self,
        agent: Agent[Any],
        *,
        wrapper: RunContextWrapper[Any] | None = None,
        **options: Any,
    ) -> RunState[Any, Any] | None:
        """The paused run of this conversation as a ``RunState``, or ``None``; it stays stored.

        ``options`` go to ``RunState.from_json`` (``context_override``,
        ``context_deserializer``, ``strict_context``). A state saved in a schema
        version the installed SDK cannot read raises
        :class:`~agents_sessions.errors.RunStateVersionError` naming both versions.
        """
        from .run_states import restore_run_state

        tenant = self._acting_tenant(wrapper)
        record = await self._in_thread(
            lambda: self._store.run_read(
                lambda repos: repos.run_states.get(self.session_id), tenant_id=tenant
            )
        )
        return None if record is None else await restore_run_state(agent, record, **options)

    async def claim_run_state(
        self,
        agent: Agent[Any],
        *,
        wrapper: RunContextWrapper[Any] | None = None,
        **options: Any,
    ) -> RunState[Any, Any] | None:
        """Remove and return the paused run: of concurrent claimers, exactly one gets it.

        Use it where an approval resumes the run, so that a double click or two
        servers receiving the same approval resume it once. If the state cannot be
        restored (:class:`~agents_sessions.errors.RunStateVersionError`, or the SDK
        rejects it for ``agent``), it is put back -- unless a new one was saved
        meanwhile -- and the error raised.
        """
        from .run_states import restore_run_state

        tenant = self._acting_tenant(wrapper)
        # Never retried: a claim that committed before its connection died must not
        # run again (the state would be reported absent); ConnectionLostError says so.
        record = await self._mutate(
            lambda: self._store.run_transaction(
                lambda repos: repos.run_states.claim(self.session_id),
                repeatable=False,
                tenant_id=tenant,
            )
        )
        if record is None:
            return None
        try:
            return await restore_run_state(agent, record, **options)
        except BaseException:
            await self._mutate(
                lambda: self._store.run_transaction(
                    lambda repos: repos.run_states.restore(record),
                    repeatable=True,
                    tenant_id=tenant,
                )
            )
            raise

    async def delete_run_state(self, *, wrapper: RunContextWrapper[Any] | None = None) -> bool:
        """Discard this conversation's paused run. Returns whether there was one."""
        tenant = self._acting_tenant(wrapper)
        return await self._mutate(
            lambda: self._store.run_transaction(
                lambda repos: repos.run_states.delete(self.session_id),
                repeatable=True,
                tenant_id=tenant,
            )
        )
