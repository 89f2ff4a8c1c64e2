"""The recall tool: an agent searches its own user's past conversations, and only those."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from agents import Agent, Runner
from agents.testing import ScriptedModel, assistant_message, function_call

from agents_sessions import InvalidArgumentError, PostgreSQLSession, get_store, recall_tool
from tests.integration.test_row_level_security import (  # noqa: F401 - the fixture
    TenantDatabase,
    tenant_database,
)


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


@dataclass
class Caller:
    """The run context of the examples: who the agent is talking to."""

    user_id: str


def tool_output(model: ScriptedModel) -> str:
    """What the tool returned, as the model saw it on its last call."""
    assert model.last_call is not None
    outputs = [
        item["output"]
        for item in model.last_call.input
        if isinstance(item, dict) and item.get("type") == "function_call_output"
    ]
    assert len(outputs) == 1
    return str(outputs[0])


async def ask(tool: Any, query: str, context: Any = None) -> str:
    model = ScriptedModel(
        [
            [function_call("search_past_conversations", {"query": query}, call_id="r1")],
            [assistant_message("done")],
        ]
    )
    agent = Agent(name="assistant", model=model, tools=[tool])
    await Runner.run(agent, "What did we decide?", context=context)
    return tool_output(model)


async def test_the_agent_recalls_its_users_conversations_and_no_one_elses(
    database_url: str,
) -> None:
    topic = "zq" + uuid.uuid4().hex[:10]
    ana, bo = f"ana-{uuid.uuid4()}", f"bo-{uuid.uuid4()}"
    await PostgreSQLSession(f"c-{uuid.uuid4()}", database_url=database_url, user_id=ana).add_items(
        [user(f"We decided the {topic} trip goes to Lisbon")]
    )
    await PostgreSQLSession(f"c-{uuid.uuid4()}", database_url=database_url, user_id=bo).add_items(
        [user(f"Secret: the {topic} budget is 40k")]
    )

    fixed = recall_tool(database_url, user_id=ana, tenant_scoped=False)
    answer = await ask(fixed, topic)
    assert f"**{topic}** trip goes to Lisbon" in answer
    assert "budget" not in answer

    # The user from the run's context, resolved per call.
    per_run = recall_tool(
        database_url, user_id=lambda wrapper: wrapper.context.user_id, tenant_scoped=False
    )
    assert "budget" in await ask(per_run, topic, context=Caller(bo))
    assert "Lisbon" not in await ask(per_run, topic, context=Caller(bo))
    assert await ask(per_run, "nothing-like-this-was-said", Caller(ana)) == (
        "No past messages match."
    )


def test_a_recall_tool_is_checked_when_made(database_url: str) -> None:
    with pytest.raises(InvalidArgumentError, match="limit"):
        recall_tool(database_url, user_id="ana", limit=0)
    with pytest.raises(ValueError, match="user_id"):
        recall_tool(database_url, user_id="")


@pytest.mark.postgres_only
@pytest.mark.not_on_citus(
    "row-level security is refused on a distributed store (tests/citus checks the refusal)"
)
async def test_under_row_level_security_recall_never_returns_another_tenants_text(
    tenant_database: TenantDatabase,  # noqa: F811 - the imported fixture
) -> None:
    from agents_sessions import load_settings

    url, settings = tenant_database.app_url, load_settings(auto_migrate=False)
    topic = "zq" + uuid.uuid4().hex[:10]
    await PostgreSQLSession(
        "a-1", database_url=url, tenant_id="alice", settings=settings
    ).add_items([user(f"alice's {topic} plan")])
    await PostgreSQLSession("b-1", database_url=url, tenant_id="bob", settings=settings).add_items(
        [user(f"bob's {topic} plan")]
    )
    store = get_store(url, settings=settings)
    # Even a resolver that names nobody's conversations by owner gets only its tenant's
    # rows: the database filters, whatever the owner filter says.
    tool = recall_tool(store=store, user_id="alice")
    answer = await ask(tool, topic)
    assert "alice's" in answer and "bob's" not in answer
    with store.read(tenant_id="alice") as repos:
        hits = repos.messages.search(topic).hits  # no owner filter at all
    assert [hit.conversation_id for hit in hits] == ["a-1"]
