"""A human-in-the-loop agent run split across processes (run as a script; not collected).

``python tests/support/paused_runs.py pause DATABASE_URL CONVERSATION_ID LEDGER``
starts a run whose tool needs approval and saves the paused state;
``... resume DATABASE_URL CONVERSATION_ID LEDGER`` claims it in a fresh process,
approves, and finishes the run, printing ``resumed`` (or ``nothing to resume``).
The tool appends one line to the LEDGER file each time it really runs.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from agents import Agent, Runner, function_tool
from agents.testing import ScriptedModel, assistant_message, function_call

from agents_sessions import PostgreSQLSession


def build_agent(ledger: Path, model: ScriptedModel) -> Agent[None]:
    @function_tool(needs_approval=True)
    def transfer(amount: int, to: str) -> str:
        """Move money (needs a human's approval)."""
        with ledger.open("a") as file:
            file.write(f"{amount} to {to}\n")
        return f"sent {amount} to {to}"

    return Agent(name="treasurer", model=model, tools=[transfer])


async def pause(url: str, conversation_id: str, ledger: Path) -> None:
    model = ScriptedModel(
        [[function_call("transfer", {"amount": 40, "to": "bo"}, call_id="call_t1")]]
    )
    session = PostgreSQLSession(conversation_id, database_url=url, user_id="ana")
    result = await Runner.run(build_agent(ledger, model), "Send 40 to Bo", session=session)
    assert [item.tool_name for item in result.interruptions] == ["transfer"]
    await session.save_run_state(result.to_state())
    print("paused")


async def resume(url: str, conversation_id: str, ledger: Path) -> None:
    model = ScriptedModel([[assistant_message("Sent 40 to Bo.")]])
    agent = build_agent(ledger, model)
    session = PostgreSQLSession(conversation_id, database_url=url)
    state = await session.claim_run_state(agent)
    if state is None:
        print("nothing to resume")
        return
    for interruption in state.get_interruptions():
        state.approve(interruption)
    result = await Runner.run(agent, state, session=session)
    print(f"resumed: {result.final_output}")


def main(argv: list[str]) -> int:
    mode, url, conversation_id, ledger = argv[1:5]
    action = pause if mode == "pause" else resume
    asyncio.run(action(url, conversation_id, Path(ledger)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
