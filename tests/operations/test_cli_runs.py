"""``agents-sessions runs``: list, show and discard paused runs."""

from __future__ import annotations

import json
import uuid
from typing import Any

from agents import Agent, Runner, function_tool
from agents.testing import ScriptedModel, function_call
from click.testing import CliRunner

from agents_sessions import PostgreSQLSession
from agents_sessions.cli import cli
from agents_sessions.errors import ExitCode


def run(url: str, *arguments: str) -> Any:
    return CliRunner().invoke(cli, ["--database-url", url, "runs", *arguments])


async def pause(session: PostgreSQLSession, amount: int) -> None:
    @function_tool(needs_approval=True)
    def refund(order: str, amount: int) -> str:
        """Refund an order (needs approval)."""
        return "refunded"

    model = ScriptedModel(
        [[function_call("refund", {"order": "A-1", "amount": amount}, call_id=f"r{amount}")]]
    )
    result = await Runner.run(
        Agent(name="support", model=model, tools=[refund]), "Refund me", session=session
    )
    await session.save_run_state(result.to_state())


async def test_operators_list_show_and_discard_paused_runs(database_url: str) -> None:
    user = f"user-{uuid.uuid4()}"
    first = PostgreSQLSession(f"r-{uuid.uuid4()}", database_url=database_url, user_id=user)
    second = PostgreSQLSession(f"r-{uuid.uuid4()}", database_url=database_url, user_id=user)
    await pause(first, 10)
    await pause(second, 20)

    listed = run(database_url, "list", "--user", user, "--json")
    assert listed.exit_code == 0, listed.output
    runs = json.loads(listed.stdout)["runs"]
    assert [entry["conversation_id"] for entry in runs] == [first.session_id, second.session_id]
    assert runs[0]["approvals"] == [
        {"tool_name": "refund", "arguments": '{"order":"A-1","amount":10}', "call_id": "r10"}
    ]
    assert runs[0]["user_id"] == user and runs[0]["agent"] == "support"
    table = run(database_url, "list", "--user", user).stdout
    assert "refund(" in table and first.session_id in table

    shown = json.loads(run(database_url, "show", second.session_id, "--json").stdout)
    assert shown["state"]["$schemaVersion"] == shown["schema_version"]
    assert "refund" in run(database_url, "show", second.session_id).stdout

    assert run(database_url, "discard", first.session_id).exit_code == ExitCode.PROBLEM
    assert run(database_url, "discard", first.session_id, "--yes").exit_code == 0
    assert run(database_url, "discard", first.session_id, "--yes").exit_code == ExitCode.PROBLEM
    assert run(database_url, "show", first.session_id).exit_code == ExitCode.PROBLEM
    remaining = json.loads(run(database_url, "list", "--user", user, "--json").stdout)["runs"]
    assert [entry["conversation_id"] for entry in remaining] == [second.session_id]
    assert await first.get_items()  # the history stays
