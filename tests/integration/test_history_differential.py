"""The same scripted conversation on the SDK's AdvancedSQLiteSession and on ours.

Each step runs the real ``Runner`` (tool calls included; two runs streamed) with
``ScriptedModel`` on both sessions, or calls the same history-management method on
both, and then every read method of the API is asked on both and the answers
compared: items (whole and limited), turns, search, turns' contents, tool usage,
session and turn usage per branch, and the branch listing. Timestamps are left out
(the SDK reports when it copied a row); error cases must raise ``ValueError`` on
both, ours from the package's hierarchy, and write nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
from agents import Agent, Runner, function_tool
from agents.extensions.memory import AdvancedSQLiteSession
from agents.testing import ModelStep, ScriptedModel, assistant_message, function_call
from agents.usage import Usage

from agents_sessions import AgentsSessionsError, PostgreSQLSession


@function_tool
def lookup(key: str) -> str:
    """Look something up."""
    return key.upper()


def _usage(tokens: int) -> Usage:
    return Usage(
        requests=1, input_tokens=tokens, output_tokens=tokens // 10, total_tokens=tokens * 11 // 10
    )


def _steps(turn: str, tokens: int) -> list[ModelStep]:
    """A tool call, then an answer: two model requests, four stored items per turn."""
    return [
        ModelStep(
            output=[function_call("lookup", {"key": turn}, call_id=f"call-{turn}")],
            usage=_usage(tokens),
            response_id=f"resp-{turn}-1",
        ),
        ModelStep(
            output=[assistant_message(f"answer to {turn}", item_id=f"msg-{turn}")],
            usage=_usage(tokens + 7),
            response_id=f"resp-{turn}-2",
        ),
    ]


def _without_timestamps(value: Any) -> Any:
    if isinstance(value, list):
        return [_without_timestamps(entry) for entry in value]
    if isinstance(value, dict):
        return {
            k: _without_timestamps(v)
            for k, v in value.items()
            if k not in {"timestamp", "created_at"}
        }
    return value


async def _answers(session: Any, branches: list[str]) -> dict[str, Any]:
    answers: dict[str, Any] = {
        "items": await session.get_items(),
        "items_limit_3": await session.get_items(limit=3),
        "turns": await session.get_conversation_turns(),
        "search_turn": await session.find_turns_by_content("TURN"),
        "search_none": await session.find_turns_by_content("absent"),
        "by_turns": await session.get_conversation_by_turns(),
        "tools": sorted(await session.get_tool_usage(), key=lambda t: (t[2], t[0])),
        "session_usage": await session.get_session_usage(),
        "turn_usage": await session.get_turn_usage(),
        "turn_usage_1": await session.get_turn_usage(1),
        "turn_usage_99": await session.get_turn_usage(99),
        "branches": sorted(await session.list_branches(), key=lambda b: b["branch_id"]),
    }
    for branch in branches:
        answers[f"items@{branch}"] = await session.get_items(branch_id=branch)
        answers[f"items_limit_2@{branch}"] = await session.get_items(limit=2, branch_id=branch)
        answers[f"turns@{branch}"] = await session.get_conversation_turns(branch)
        answers[f"session_usage@{branch}"] = await session.get_session_usage(branch)
        answers[f"turn_usage@{branch}"] = await session.get_turn_usage(branch_id=branch)
        answers[f"tools@{branch}"] = sorted(
            await session.get_tool_usage(branch), key=lambda t: (t[2], t[0])
        )
    return cast(dict[str, Any], _without_timestamps(answers))


class _Pair:
    """The SDK's session and ours, driven by the same script."""

    def __init__(self, sdk: AdvancedSQLiteSession, ours: PostgreSQLSession) -> None:
        self.sdk, self.ours = sdk, ours
        self.branches = ["main"]
        self.step = 0

    async def run(self, text: str, tokens: int, *, streamed: bool = False) -> None:
        for session in (self.sdk, self.ours):
            agent = Agent(
                name="assistant", model=ScriptedModel(_steps(text, tokens)), tools=[lookup]
            )
            if streamed:
                streaming = Runner.run_streamed(agent, text, session=session)
                async for _ in streaming.stream_events():
                    pass
                await session.store_run_usage(cast(Any, streaming))
                continue
            result = await Runner.run(agent, text, session=session)
            await session.store_run_usage(result)
        await self.compare(f"run {text!r}")

    async def both(self, method: str, *args: Any, **kwargs: Any) -> Any:
        theirs = await getattr(self.sdk, method)(*args, **kwargs)
        ours = await getattr(self.ours, method)(*args, **kwargs)
        assert ours == theirs, method
        await self.compare(f"{method}{args}")
        return ours

    async def both_fail(self, method: str, *args: Any, **kwargs: Any) -> None:
        before = await _answers(self.ours, self.branches)
        with pytest.raises(ValueError):
            await getattr(self.sdk, method)(*args, **kwargs)
        with pytest.raises(ValueError) as raised:
            await getattr(self.ours, method)(*args, **kwargs)
        assert isinstance(raised.value, AgentsSessionsError), raised.value
        assert await _answers(self.ours, self.branches) == before, "nothing written"
        await self.compare(f"failed {method}{args}")

    async def compare(self, label: str) -> None:
        self.step += 1
        theirs = await _answers(self.sdk, self.branches)
        ours = await _answers(self.ours, self.branches)
        for key in theirs:
            assert ours[key] == theirs[key], f"step {self.step} ({label}): {key}"


async def test_a_scripted_conversation_gives_the_sdks_answers_after_every_step(
    database_url: str, conversation_id: str, tmp_path: Path
) -> None:
    sdk = AdvancedSQLiteSession(
        session_id=conversation_id, db_path=tmp_path / "sdk.sqlite3", create_tables=True
    )
    pair = _Pair(sdk, PostgreSQLSession(conversation_id, database_url=database_url))
    try:
        await pair.compare("empty")
        await pair.both_fail("switch_to_branch", "main")  # main holds nothing yet
        await pair.run("turn one", 100)
        await pair.run("turn two about cats", 200)
        await pair.run("turn three", 300)

        await pair.both_fail("create_branch_from_turn", 99, "nowhere")
        await pair.both_fail("create_branch_from_turn", 2, "main")
        await pair.both_fail("create_branch_from_turn", 2, "   ")
        await pair.both_fail("create_branch_from_content", "no such words", "x")
        await pair.both_fail("delete_branch", "main")
        await pair.both_fail("delete_branch", "never-made")
        await pair.both_fail("switch_to_branch", "never-made")

        pair.branches += ["retry", "cats", "early"]
        assert await pair.both("create_branch_from_turn", 2, "retry") == "retry"
        await pair.run("turn two, again", 250)
        await pair.both_fail("create_branch_from_turn", 1, "retry")  # names stay reserved
        await pair.both_fail("delete_branch", "retry")  # current, without force
        await pair.both("create_branch_from_content", "AGAIN", "cats")
        await pair.run("turn on cats", 400, streamed=True)
        await pair.both("switch_to_branch", "main")
        await pair.run("turn four", 500)
        # Branching at turn 1 copies nothing: the SDK then lists no such branch.
        await pair.both("create_branch_from_turn", 1, "early")
        await pair.run("a fresh start", 600)
        await pair.both("switch_to_branch", "retry")

        popped = await pair.both("pop_item")
        assert popped is not None
        await pair.both("pop_item")
        await pair.run("turn after pops", 700)
        # Pop main below the point "retry" and "cats" branched from: the items they
        # share stay theirs.
        await pair.both("switch_to_branch", "main")
        for _ in range(14):
            await pair.both("pop_item")
        await pair.run("main again", 650)
        await pair.both("switch_to_branch", "retry")

        await pair.both("delete_branch", "cats")
        await pair.both_fail("create_branch_from_turn", 1, "cats")
        await pair.both("delete_branch", "retry", force=True)  # back to main
        await pair.both("switch_to_branch", "early")
        await pair.both("clear_session")
        await pair.run("after the clear", 800, streamed=True)
    finally:
        sdk.close()
