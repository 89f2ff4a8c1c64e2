"""Rewind a conversation to an earlier turn, try again on a branch, then compact it.

Runs offline with zero configuration (the embedded SQLite file, the SDK's
ScriptedModel, and a stand-in for ``responses.compact``); set DATABASE_URL to use
PostgreSQL:

    .venv/bin/python examples/03_branches_and_compaction.py
    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres \
        .venv/bin/python examples/03_branches_and_compaction.py

It prints the turns, the branch it creates, the usage recorded per turn (no call
needed: the Runner hands each run's usage to the session), and the history after an
atomic compaction.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from types import SimpleNamespace
from typing import Any

from agents import Agent, Runner, set_tracing_disabled
from agents.memory import OpenAIResponsesCompactionSession
from agents.testing import ModelStep, ScriptedModel, assistant_message
from agents.usage import Usage

from agents_sessions import PostgreSQLSession, dispose_all


def answer(text: str, tokens: int) -> ModelStep:
    return ModelStep(
        output=[assistant_message(text)],
        usage=Usage(requests=1, input_tokens=tokens, output_tokens=10, total_tokens=tokens + 10),
    )


class OfflineCompactor:
    """Stands in for ``AsyncOpenAI().responses`` so the demo needs no API key."""

    async def compact(self, **_: Any) -> Any:
        summary = {"role": "assistant", "content": "Summary: Ada plans a week in Porto."}
        return SimpleNamespace(output=[summary], usage=None)


async def ask(session: Any, text: str, step: ModelStep) -> None:
    agent = Agent(name="Travel assistant", model=ScriptedModel([step]))
    result = await Runner.run(agent, text, session=session)
    print(f"  user > {text}\n  bot  > {result.final_output}")


async def main() -> None:
    set_tracing_disabled(True)
    conversation = f"branches-{uuid.uuid4().hex[:8]}"
    session = PostgreSQLSession(conversation, user_id="ada")

    print("On main:")
    await ask(session, "I'm Ada. Plan a trip to Lisbon.", answer("Lisbon it is!", 40))
    await ask(session, "Make it a week in Lisbon.", answer("Seven days in Lisbon.", 60))
    for turn in await session.get_conversation_turns():
        print(f"  turn {turn['turn']}: {turn['content']}")

    branch = await session.create_branch_from_turn(2, "porto")
    print(f"\nBranched before turn 2 onto '{branch}' and tried again:")
    await ask(session, "Make it a week in Porto instead.", answer("Seven days in Porto.", 70))

    # Another session object (another server, the next request) continues on the branch.
    elsewhere = PostgreSQLSession(conversation)
    branches = {b["branch_id"]: b["message_count"] for b in await elsewhere.list_branches()}
    current = [b["branch_id"] for b in await elsewhere.list_branches() if b["is_current"]]
    print(f"\nBranches (items): {branches}; current for every server: {current[0]}")
    print(f"Usage per turn on '{branch}': {await elsewhere.get_turn_usage()}")
    print(f"Usage of all branches: {await elsewhere.get_session_usage()}")

    compacting = OpenAIResponsesCompactionSession(
        conversation,
        underlying_session=elsewhere,
        client=SimpleNamespace(responses=OfflineCompactor()),  # type: ignore[arg-type]
    )
    await compacting.run_compaction({"force": True})
    print(f"\nAfter compaction (one transaction), '{branch}' holds:")
    for item in await session.get_items():
        print(f"  {item}")
    print(f"main still holds {len(await session.get_items(branch_id='main'))} items")
    dispose_all()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
