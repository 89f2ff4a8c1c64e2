"""History management on :class:`~agents_sessions.PostgreSQLSession`: the SDK's advanced API.

:class:`HistoryManagementMixin` gives the session the methods of the SDK's
``agents.extensions.memory.AdvancedSQLiteSession`` (openai-agents 0.24), with the
same arguments, return shapes and ``ValueError`` cases: turns, branches, per-turn and
per-tool usage. It differs on purpose where many servers share one conversation:

* the current branch is stored with the conversation, so another session object
  (another server, the next request) continues on it;
* branches share the items they start from instead of copying them;
* token usage is recorded for every model request automatically when the Runner
  passes ``wrapper`` (``store_run_usage`` then adds nothing twice).

It also implements the two replacement hooks that the SDK's
``OpenAIResponsesCompactionSession`` looks for (``_get_compaction_snapshot`` and
``_atomic_replace_items``, private to the SDK: tested with openai-agents 0.24.x), so a
compaction replaces history in one transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from . import turns as turn_views
from .errors import InvalidArgumentError, TurnNotFoundError
from .items import encode_items
from .repositories import Repositories

if TYPE_CHECKING:
    from agents import RunContextWrapper

    from .store import SessionStore

logger = logging.getLogger("agents_sessions")

_T = TypeVar("_T")
_MAX_NAME = 255


def validate_branch_name(value: object, *, name: str) -> str:
    """A usable branch name: a non-blank str of at most 255 characters, no control characters."""
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{name} must be a str, got {type(value).__name__}")
    if not value.strip():
        raise InvalidArgumentError(
            f"{name} cannot be empty; give a name, or None for a generated one"
        )
    if len(value) > _MAX_NAME or any(ord(char) < 32 for char in value):
        raise InvalidArgumentError(
            f"{name} must be at most {_MAX_NAME} characters, without control characters"
        )
    return value


# ---------------------------------------------------------------------- the mixin


class HistoryManagementMixin:
    """Turns, branches, usage per turn and atomic compaction hooks (see the module docs)."""

    if TYPE_CHECKING:
        session_id: str
        _store: SessionStore
        _tenant_resolver: Any

        async def _in_thread(self, function: Callable[..., _T], *args: Any) -> _T: ...

        async def _mutate(self, function: Callable[..., _T], *args: Any) -> _T: ...

        def _acting_tenant(self, wrapper: RunContextWrapper[Any] | None) -> str | None: ...

        def _owner(self, tenant: str | None) -> tuple[str | None, dict[str, Any] | None]: ...

        async def record_usage(
            self,
            result: Any,
            *,
            model: str | None = None,
            per_request: bool = True,
            run_id: str | None = None,
            wrapper: RunContextWrapper[Any] | None = None,
        ) -> int: ...

    # -- plumbing

    async def _read(self, work: Callable[[Repositories], _T]) -> _T:
        """Run ``work`` on one consistent snapshot (REPEATABLE READ on PostgreSQL)."""
        tenant = self._acting_tenant(None)

        def read() -> _T:
            with self._store.read(tenant_id=tenant) as repos:
                if repos.connection.dialect.name == "postgresql":
                    # A view reads several statements; they must see one moment.
                    repos.connection.execution_options(isolation_level="REPEATABLE READ")
                return work(repos)

        return await self._in_thread(read)

    async def _write(self, work: Callable[[Repositories], _T]) -> _T:
        """Run ``work`` in one transaction; never repeated (it may have committed)."""
        tenant = self._acting_tenant(None)
        return await self._mutate(
            lambda: self._store.run_transaction(work, repeatable=False, tenant_id=tenant)
        )

    async def _view(self, branch_id: str | None) -> list[Any]:
        def read(repos: Repositories) -> list[Any]:
            branch = branch_id or repos.branches.current(self.session_id)
            return repos.branches.view(self.session_id, branch)

        return await self._read(read)

    # -- turns

    async def get_conversation_turns(self, branch_id: str | None = None) -> list[dict[str, Any]]:
        """User turns of a branch (the current one by default), for browsing and branching.

        Each dict has ``turn`` (its number), ``content`` (at most 100 characters),
        ``full_content``, ``timestamp`` (``YYYY-MM-DD HH:MM:SS``, UTC) and ``can_branch``.
        """
        return turn_views.conversation_turns(await self._view(branch_id))

    async def find_turns_by_content(
        self, search_term: str, branch_id: str | None = None
    ) -> list[dict[str, Any]]:
        """User turns whose text contains ``search_term`` (ASCII case-insensitive)."""
        if not isinstance(search_term, str):
            raise InvalidArgumentError(
                f"search_term must be a str, got {type(search_term).__name__}"
            )
        return turn_views.turns_matching(await self._view(branch_id), search_term)

    async def get_conversation_by_turns(
        self, branch_id: str | None = None
    ) -> dict[int, list[dict[str, str | None]]]:
        """The branch's items grouped by turn: ``{turn: [{"type", "tool_name"}, ...]}``."""
        return turn_views.conversation_by_turns(await self._view(branch_id))

    async def get_tool_usage(self, branch_id: str | None = None) -> list[tuple[str, int, int]]:
        """Tool calls per turn of a branch: ``(tool_name, calls, turn)``, by turn."""
        return turn_views.tool_usage(await self._view(branch_id))

    # -- branches

    async def create_branch_from_turn(
        self, turn_number: int, branch_name: str | None = None
    ) -> str:
        """Start a branch holding the current branch's history before user turn ``turn_number``.

        The new branch becomes the conversation's current branch (for every session
        object). Its items are shared with the source branch, not copied: creating a
        branch is one small transaction whatever the history's length.

        Raises:
            TurnNotFoundError: no user message at that turn (a ``ValueError``).
            BranchNameTakenError: ``branch_name`` was already used in this conversation.
            InvalidArgumentError: ``branch_name`` is blank.
        """
        if branch_name is not None:
            validate_branch_name(branch_name, name="branch_name")
        if isinstance(turn_number, bool) or not isinstance(turn_number, int):
            raise InvalidArgumentError(
                f"turn_number must be an int, got {type(turn_number).__name__}"
            )
        branch_id, _content, source = await self._write(
            lambda repos: repos.branches.create_from_turn(self.session_id, turn_number, branch_name)
        )
        logger.debug("Created branch '%s' from turn %s in '%s'", branch_id, turn_number, source)
        return branch_id

    async def create_branch_from_content(
        self, search_term: str, branch_name: str | None = None
    ) -> str:
        """:meth:`create_branch_from_turn` at the first user turn containing ``search_term``."""
        if branch_name is not None:
            validate_branch_name(branch_name, name="branch_name")
        matches = await self.find_turns_by_content(search_term)
        if not matches:
            raise TurnNotFoundError(
                f"No user turns found containing '{search_term}'; "
                "get_conversation_turns() lists the turns"
            )
        return await self.create_branch_from_turn(matches[0]["turn"], branch_name)

    async def switch_to_branch(self, branch_id: str) -> None:
        """Continue the conversation on ``branch_id``, for every session object.

        Raises:
            UnknownBranchError: the branch does not exist or holds no items.
        """
        validate_branch_name(branch_id, name="branch_id")
        await self._write(lambda repos: repos.branches.switch(self.session_id, branch_id))

    async def delete_branch(self, branch_id: str, force: bool = False) -> None:
        """Delete a branch; its name stays reserved. Items other branches share stay.

        Raises:
            ProtectedBranchError: ``main``, or the current branch without ``force=True``
                (with it, the conversation first switches to ``main``).
            UnknownBranchError: the branch does not exist.
        """
        validate_branch_name(branch_id, name="branch_id")
        size = await self._write(
            lambda repos: repos.branches.delete(self.session_id, branch_id, force=force)
        )
        logger.info("Deleted branch '%s' (%s items in its history)", branch_id, size)

    async def list_branches(self) -> list[dict[str, Any]]:
        """Branches holding items, oldest first.

        Each dict: ``branch_id``, ``message_count``, ``user_turns``, ``is_current``,
        ``created_at`` (``YYYY-MM-DD HH:MM:SS``, UTC).
        """
        return await self._read(lambda repos: repos.branches.listing(self.session_id))

    # -- usage

    async def store_run_usage(self, result: Any) -> None:
        """Record a finished run's usage (the SDK's name for :meth:`record_usage`).

        Requests already recorded automatically are not counted again. As in the SDK,
        a failure is logged, not raised.
        """
        try:
            if getattr(getattr(result, "context_wrapper", None), "usage", None) is not None:
                await self.record_usage(result)
        except Exception:
            logger.exception("agents_sessions: failed to store the run's usage")

    async def _turn_usage(self, branch_id: str | None) -> tuple[str, dict[int, dict[str, Any]]]:
        def read(repos: Repositories) -> tuple[str, dict[int, dict[str, Any]]]:
            branch = branch_id or repos.branches.current(self.session_id)
            anchors = turn_views.turn_anchors(repos.branches.view(self.session_id, branch))
            rows = repos.usage.turn_rows(self.session_id)
            return branch, turn_views.usage_by_turn(rows, branch, anchors)

        return await self._read(read)

    async def get_turn_usage(
        self, user_turn_number: int | None = None, branch_id: str | None = None
    ) -> list[dict[str, Any]] | dict[str, Any]:
        """Token usage per user turn of a branch, with the SDK's token details.

        With ``user_turn_number``: that turn's dict (``{}`` when it has none); else a
        list of dicts that also carry ``user_turn_number``, by turn. Each request is
        attributed to the turn that was current on its branch when it was recorded.
        """
        _, turns = await self._turn_usage(branch_id)
        if user_turn_number is not None:
            return dict(turns.get(user_turn_number, {}))
        return [{"user_turn_number": turn, **usage} for turn, usage in turns.items()]

    async def get_session_usage(self, branch_id: str | None = None) -> dict[str, int] | None:
        """Usage summed over turns of one branch, or of every branch (``None``).

        Returns ``requests``, ``input_tokens``, ``output_tokens``, ``total_tokens`` and
        ``total_turns`` (turns with usage), or ``None`` when there is none.
        """

        def read(repos: Repositories) -> list[dict[str, Any]]:
            names = [branch_id] if branch_id else repos.branches.live_branches(self.session_id)
            rows = repos.usage.turn_rows(self.session_id)
            found: list[dict[str, Any]] = []
            for name in names:
                anchors = turn_views.turn_anchors(repos.branches.view(self.session_id, name))
                found.extend(turn_views.usage_by_turn(rows, name, anchors).values())
            return found

        turns = await self._read(read)
        if not turns:
            return None
        keys = ("requests", "input_tokens", "output_tokens", "total_tokens")
        totals = {key: sum(int(turn[key]) for turn in turns) for key in keys}
        return {**totals, "total_turns": len(turns)}

    # -- compaction hooks (private to the SDK; see the module docs)

    async def _get_compaction_snapshot(
        self, limit: int, *, prune_prefix: Callable[[Any], bool] | None = None
    ) -> Any:
        """The current branch's newest ``limit`` items, with an atomic suffix swap.

        ``replace_suffix(start, output)`` replaces the snapshot's items from ``start``
        with ``output`` in one transaction, and only if the branch still ends with
        exactly those items (else it returns ``False`` and writes nothing).
        """
        from agents.memory.session import _CompactionSnapshot

        if prune_prefix is not None or self._tenant_resolver is not None:
            return None  # the SDK then takes its complete-history path

        def read(repos: Repositories) -> tuple[str, list[Any]]:
            branch = repos.branches.current(self.session_id)
            return branch, repos.branches.view(self.session_id, branch, limit=limit + 1)

        branch, rows = await self._read(read)
        complete = len(rows) <= limit
        rows = rows[-limit:] if limit > 0 else []

        async def replace_suffix(start: int, output: list[Any]) -> bool:
            expected = [(row.id, row.item) for row in rows[start:]]
            if not expected:
                return False
            encoded = encode_items(output, max_item_bytes=self._store.settings.max_item_bytes)
            return await self._write(
                lambda repos: repos.branches.replace_suffix(
                    self.session_id, branch, expected, encoded
                )
            )

        return _CompactionSnapshot([row.item for row in rows], complete, replace_suffix)

    async def _atomic_replace_items(self, items: list[Any]) -> bool:
        """Replace the current branch's history with ``items`` in one transaction.

        Readers see the old history or the new one; the conversation's owner,
        metadata and usage records stay.
        """
        encoded = encode_items(items, max_item_bytes=self._store.settings.max_item_bytes)
        user_id, metadata = self._owner(self._acting_tenant(None))

        def replace(repos: Repositories) -> bool:
            repos.conversations.ensure(self.session_id, user_id=user_id, metadata=metadata)
            repos.branches.replace_all(self.session_id, encoded)
            return True

        return await self._write(replace)


__all__ = ["HistoryManagementMixin", "validate_branch_name"]
