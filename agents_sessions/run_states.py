"""Paused runs on the session facade: the SDK's ``RunState`` to and from storage.

A run that stops for approval (``function_tool(needs_approval=True)`` ->
``result.interruptions``) is saved with its conversation,
``await session.save_run_state(result.to_state())``, and resumed later on any
server: ``state = await session.claim_run_state(agent)``, ``state.approve(...)``,
``Runner.run(agent, state, session=session)``.

Checked on the way in: the state must serialize to JSON (no NaN, no objects) within
``max_run_state_bytes``. Checked on the way out, before the SDK sees it: its schema
version must be one the installed SDK reads -- otherwise
:class:`~agents_sessions.errors.RunStateVersionError` names both versions, and the
state stays stored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import InvalidRunStateError, RunStateVersionError
from .repositories import PendingApproval, StoredRunState

if TYPE_CHECKING:
    from agents import Agent, RunState


@dataclass(frozen=True)
class EncodedRunState:
    """A ``RunState`` serialized and checked, ready for ``RunStateRepository.save``."""

    state_json: str
    agent_name: str
    schema_version: str
    sdk_version: str
    approvals: list[PendingApproval]

    def save_arguments(self) -> dict[str, Any]:
        """Keyword arguments of ``RunStateRepository.save``."""
        return {
            "state_json": self.state_json,
            "agent_name": self.agent_name,
            "schema_version": self.schema_version,
            "sdk_version": self.sdk_version,
            "approvals": self.approvals,
        }


def _sdk_version() -> str:
    import agents

    return str(getattr(agents, "__version__", "unknown"))


def encode_run_state(
    state: RunState[Any, Any],
    *,
    max_bytes: int,
    context_serializer: Any = None,
    strict_context: bool = False,
) -> EncodedRunState:
    """Serialize ``state`` with the SDK's ``to_json()`` and check it can be stored."""
    to_json = getattr(state, "to_json", None)
    if not callable(to_json):
        raise InvalidRunStateError(
            f"state must be an agents RunState (result.to_state()), got {type(state).__name__}"
        )
    document = to_json(context_serializer=context_serializer, strict_context=strict_context)
    try:
        text = json.dumps(document, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidRunStateError(
            f"the run state is not JSON ({exc}); pass a context_serializer for a context "
            "that is not a mapping"
        ) from None
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise InvalidRunStateError(
            f"the run state is {size} bytes as JSON, more than max_run_state_bytes "
            f"({max_bytes}); nothing was saved"
        )
    approvals = [
        PendingApproval(
            tool_name=getattr(item, "tool_name", None) or getattr(item, "name", None),
            arguments=getattr(item, "arguments", None),
            call_id=getattr(item, "call_id", None),
        )
        for item in state.get_interruptions()
    ]
    agent = document.get("current_agent") or {}
    return EncodedRunState(
        state_json=text,
        agent_name=str(agent.get("name", "")) if isinstance(agent, dict) else "",
        schema_version=str(document.get("$schemaVersion", "")),
        sdk_version=_sdk_version(),
        approvals=approvals,
    )


def check_schema_version(record: StoredRunState) -> None:
    """Raise :class:`RunStateVersionError` unless the installed SDK reads ``record``."""
    from agents.run_state import CURRENT_SCHEMA_VERSION, SUPPORTED_SCHEMA_VERSIONS

    if record.schema_version not in SUPPORTED_SCHEMA_VERSIONS:
        raise RunStateVersionError(
            f"the paused run of conversation {record.conversation_id!r} was saved in "
            f"RunState schema version {record.schema_version} (openai-agents "
            f"{record.sdk_version}); the installed openai-agents {_sdk_version()} reads "
            f"schema versions up to {CURRENT_SCHEMA_VERSION}: resume it with a matching "
            "SDK, or discard it (`agents-sessions runs discard`)"
        )


async def restore_run_state(
    agent: Agent[Any], record: StoredRunState, **options: Any
) -> RunState[Any, Any]:
    """The SDK ``RunState`` of ``record``, after the version check."""
    from agents import RunState

    check_schema_version(record)
    return await RunState.from_json(agent, record.state, **options)
