"""Paused runs: a run stopped for approval is stored, claimed once and resumed anywhere."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from agents import Agent, RunConfig, Runner, RunState, function_tool
from agents.run_state import CURRENT_SCHEMA_VERSION
from agents.testing import ScriptedModel, function_call
from sqlalchemy import update

from agents_sessions import (
    InvalidRunStateError,
    PostgreSQLSession,
    RunStateVersionError,
    get_store,
    load_settings,
)
from agents_sessions.db.models import run_states_table
from agents_sessions.ops.retention import erase_user
from agents_sessions.ops.transfer.export import export_conversations
from agents_sessions.ops.transfer.format import ExportFile
from agents_sessions.ops.transfer.import_ import import_export
from tests.integration.test_row_level_security import (  # noqa: F401 - the fixture
    TenantDatabase,
    tenant_database,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER = REPO_ROOT / "tests" / "support" / "paused_runs.py"


def worker(mode: str, url: str, conversation_id: str, ledger: Path) -> str:
    environment = {**os.environ, "OPENAI_AGENTS_DISABLE_TRACING": "1", "PYTHONPATH": str(REPO_ROOT)}
    completed = subprocess.run(
        [sys.executable, str(WORKER), mode, url, conversation_id, str(ledger)],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
        cwd=REPO_ROOT,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout.strip()


async def test_a_run_paused_in_one_process_resumes_once_in_another(
    database_url: str, tmp_path: Path
) -> None:
    conversation_id, ledger = f"hitl-{uuid.uuid4()}", tmp_path / "ledger.txt"
    assert worker("pause", database_url, conversation_id, ledger) == "paused"
    assert not ledger.exists()  # nothing ran before the approval

    session = PostgreSQLSession(conversation_id, database_url=database_url)
    with session.store.read() as repos:
        [pending] = repos.run_states.list(user_id="ana", limit=100).run_states
    assert pending.conversation_id == conversation_id and pending.agent_name == "treasurer"
    assert [(a.tool_name, a.arguments, a.call_id) for a in pending.approvals] == [
        ("transfer", '{"amount":40,"to":"bo"}', "call_t1")
    ]

    assert worker("resume", database_url, conversation_id, ledger) == "resumed: Sent 40 to Bo."
    # A second approval click finds nothing left to resume.
    assert worker("resume", database_url, conversation_id, ledger) == "nothing to resume"
    assert ledger.read_text() == "40 to bo\n"  # the tool ran exactly once

    items = await session.get_items()
    assert [item.get("type", "message") for item in items] == [
        "message",
        "function_call",
        "function_call_output",
        "message",
    ]
    assert items[0] == {"content": "Send 40 to Bo", "role": "user"}
    assert items[1]["call_id"] == items[2]["call_id"] == "call_t1"
    assert items[2]["output"] == "sent 40 to bo"
    assert items[3]["content"][0]["text"] == "Sent 40 to Bo."


def approval_agent() -> tuple[Agent[Any], ScriptedModel]:
    @function_tool(needs_approval=True)
    def launch(target: str) -> str:
        """Launch (needs approval)."""
        return f"launched {target}"

    model = ScriptedModel([[function_call("launch", {"target": "moon"}, call_id="l1")]])
    return Agent(name="launcher", model=model, tools=[launch]), model


async def paused_state(
    session: PostgreSQLSession, **run: Any
) -> tuple[Agent[Any], RunState[Any, Any]]:
    agent, _ = approval_agent()
    result = await Runner.run(agent, "Launch", session=session, **run)
    assert result.interruptions
    return agent, result.to_state()


async def test_concurrent_claimers_get_a_paused_run_exactly_once(database_url: str) -> None:
    conversation_id = f"claim-{uuid.uuid4()}"
    session = PostgreSQLSession(conversation_id, database_url=database_url)
    agent, state = await paused_state(session)
    await session.save_run_state(state)

    claimers = [PostgreSQLSession(conversation_id, database_url=database_url) for _ in range(8)]
    claimed = await asyncio.gather(*(claimer.claim_run_state(agent) for claimer in claimers))
    winners = [result for result in claimed if result is not None]
    assert len(winners) == 1
    assert [item.tool_name for item in winners[0].get_interruptions()] == ["launch"]
    assert await session.load_run_state(agent) is None


async def test_load_keeps_the_paused_run_and_delete_discards_it(database_url: str) -> None:
    session = PostgreSQLSession(f"keep-{uuid.uuid4()}", database_url=database_url)
    agent, _ = approval_agent()
    assert await session.load_run_state(agent) is None
    assert await session.delete_run_state() is False
    agent, state = await paused_state(session)
    await session.save_run_state(state)
    await session.save_run_state(state)  # replaces: still one per conversation
    loaded = await session.load_run_state(agent)
    assert loaded is not None and loaded.to_json() == state.to_json()
    assert await session.load_run_state(agent) is not None
    assert await session.delete_run_state() is True
    assert await session.load_run_state(agent) is None


async def test_states_that_are_not_json_or_too_large_are_refused_before_writing(
    database_url: str,
) -> None:
    session = PostgreSQLSession(f"bad-{uuid.uuid4()}", database_url=database_url)
    agent, state = await paused_state(session, context={"budget": float("nan")})
    with pytest.raises(InvalidRunStateError, match="not JSON"):
        await session.save_run_state(state)
    small = PostgreSQLSession(
        session.session_id,
        database_url=database_url,
        settings=load_settings(max_run_state_bytes=100),
    )
    _, fine = await paused_state(small)
    with pytest.raises(InvalidRunStateError, match="max_run_state_bytes"):
        await small.save_run_state(fine)
    with pytest.raises(InvalidRunStateError, match="RunState"):
        await session.save_run_state({"not": "a state"})  # type: ignore[arg-type]
    assert await session.load_run_state(agent) is None


async def test_a_state_from_an_unreadable_schema_version_names_both_and_stays_stored(
    database_url: str,
) -> None:
    session = PostgreSQLSession(f"old-{uuid.uuid4()}", database_url=database_url)
    agent, state = await paused_state(session)
    await session.save_run_state(state)
    with session.store.transaction() as repos:
        repos.connection.execute(
            update(run_states_table)
            .where(run_states_table.c.conversation_id == session.session_id)
            .values(schema_version="9.99")
        )
    for attempt in (session.load_run_state, session.claim_run_state):
        with pytest.raises(RunStateVersionError) as error:
            await attempt(agent)
        assert "9.99" in str(error.value) and CURRENT_SCHEMA_VERSION in str(error.value)
    with session.store.read() as repos:
        assert repos.run_states.get(session.session_id) is not None  # not lost by the claim


async def test_paused_runs_go_with_their_conversation(database_url: str) -> None:
    owner = f"owner-{uuid.uuid4()}"
    session = PostgreSQLSession(f"gone-{uuid.uuid4()}", database_url=database_url, user_id=owner)
    _, state = await paused_state(session, run_config=RunConfig())
    await session.save_run_state(state)
    store = get_store(database_url)
    with store.read() as repos:
        assert repos.run_states.get(session.session_id) is not None
    erase_user(store, owner)
    with store.read() as repos:
        assert repos.run_states.get(session.session_id) is None
        assert repos.run_states.list(user_id=owner).run_states == []


async def test_paused_runs_travel_in_exports_and_import_idempotently(
    database_url: str, fresh_database_url: Any
) -> None:
    session = PostgreSQLSession(f"moved-{uuid.uuid4()}", database_url=database_url)
    agent, state = await paused_state(session)
    await session.save_run_state(state)
    exported = io.BytesIO()
    export_conversations(get_store(database_url), exported, conversation_ids=[session.session_id])

    target_url = fresh_database_url()
    for expected_new in (1, 0):  # a second import changes nothing
        exported.seek(0)
        with ExportFile(io.BytesIO(exported.getvalue())) as export:
            summary = import_export(get_store(target_url), export)
        assert summary.run_states_imported == expected_new
    moved = PostgreSQLSession(session.session_id, database_url=target_url)
    assert await moved.get_items() == await session.get_items()
    claimed = await moved.claim_run_state(agent)
    assert claimed is not None and claimed.to_json() == state.to_json()


@pytest.mark.postgres_only
@pytest.mark.not_on_citus(
    "row-level security is refused on a distributed store (tests/citus checks the refusal)"
)
async def test_under_row_level_security_a_tenant_cannot_see_or_claim_anothers_paused_run(
    tenant_database: TenantDatabase,  # noqa: F811 - the imported fixture
) -> None:
    url, settings = tenant_database.app_url, load_settings(auto_migrate=False)
    alice = PostgreSQLSession("paused-a", database_url=url, tenant_id="alice", settings=settings)
    bob = PostgreSQLSession("paused-a", database_url=url, tenant_id="bob", settings=settings)
    agent, state = await paused_state(alice)
    await alice.save_run_state(state)
    assert await bob.load_run_state(agent) is None
    assert await bob.claim_run_state(agent) is None
    assert await bob.delete_run_state() is False
    with get_store(url, settings=settings).read(tenant_id="bob") as repos:
        assert repos.run_states.list().run_states == []
    assert await alice.claim_run_state(agent) is not None
