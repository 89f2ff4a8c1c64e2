"""Every session call is routed to one shard, and keeps its guarantees, on a Citus cluster.

The proof of "single-shard": the calls run as a role with
``citus.multi_task_query_log_level = 'error'``, so any statement Citus would fan out
to several shards fails the test instead of running.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import timedelta
from typing import Any

import pytest
from agents import Agent, Runner, function_tool
from agents.testing import ScriptedModel, assistant_message, function_call
from sqlalchemy import Engine, event, text

from agents_sessions import DatabaseError, PostgreSQLSession, UsageEntry, get_store
from agents_sessions.loop_statements import runs_on_loop


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


async def test_a_role_that_refuses_fan_out_cannot_list_every_conversation(
    strict_url: str,
) -> None:
    # The guard works: a listing touches every shard, so it is refused for this role.
    store = get_store(strict_url)
    with pytest.raises(DatabaseError, match="multi-task"), store.read() as repos:
        repos.conversations.list_all()


async def test_every_session_call_runs_on_one_shard(strict_url: str) -> None:
    conversation_id = f"conv-{uuid.uuid4()}"
    session = PostgreSQLSession(
        conversation_id, database_url=strict_url, user_id="ada", metadata={"plan": "pro"}
    )
    await session.add_items([user("one"), user("two")])
    await session.add_items([user("three")])
    assert await session.get_items() == [user("one"), user("two"), user("three")]
    assert await session.get_items(limit=2) == [user("two"), user("three")]
    assert await session.pop_item() == user("three")
    await session.clear_session()
    assert await session.get_items() == []
    assert await session.pop_item() is None
    await session.add_items([user("again")])

    store = get_store(strict_url)
    # Where Citus is installed an append is a transaction on the engine, so the event
    # loop's one-statement path is off (reads included: one path per store).
    assert store.async_pools is None and not await runs_on_loop(store, None)
    with store.transaction() as repos:
        record = repos.conversations.get(conversation_id)
        assert record is not None and record.user_id == "ada"
        assert record.metadata == {"plan": "pro"}
        repos.conversations.upsert(conversation_id, metadata={"plan": "team"})
        assert repos.messages.count(conversation_id) == 1
        assert [row.content for row in repos.messages.records(conversation_id)] == ["again"]
        assert repos.messages.append(conversation_id, [user("keyed")], idempotency_key="k1") == 1
        assert repos.messages.append(conversation_id, [user("keyed")], idempotency_key="k1") == 0
        repos.usage.record(conversation_id, [UsageEntry(model="m", prompt_tokens=3)])
        assert repos.usage.totals_for_conversation(conversation_id).prompt_tokens == 3
    with store.transaction() as repos:
        assert repos.conversations.delete(conversation_id)
    assert await session.get_items() == []


async def test_an_agent_turn_with_a_tool_runs_on_one_shard(strict_url: str) -> None:
    @function_tool
    def get_weather(city: str) -> str:
        """Weather for a city."""
        return f"sunny in {city}"

    model = ScriptedModel(
        [
            [function_call("get_weather", {"city": "Paris"}, call_id="call_1")],
            [assistant_message("It is sunny in Paris.")],
        ]
    )
    agent = Agent(name="assistant", model=model, tools=[get_weather])
    session = PostgreSQLSession(f"conv-{uuid.uuid4()}", database_url=strict_url)

    result = await Runner.run(agent, "Weather in Paris?", session=session)
    # Both requests were recorded as the run went; naming their model adds no row.
    assert await session.record_usage(result, model="scripted") == 0
    usage = await session.get_session_usage()
    assert usage is not None and usage["requests"] == 2

    types = [item.get("type", "message") for item in await session.get_items()]
    assert types == ["message", "function_call", "function_call_output", "message"]


# The tables Citus distributes (agents_sessions.ops.citus.DISTRIBUTION_COLUMNS); a
# statement that names none of them (alembic_version, SET) is not planned by Citus.
_DISTRIBUTED = re.compile(
    r"\b(conversations|messages|usage_logs|conversation_branches|append_keys|run_states)\b"
)


def test_every_statement_a_session_sends_plans_as_a_single_task(
    citus_url: str, admin_engine: Engine
) -> None:
    """EXPLAIN every statement the session calls really send: one task each, routed whole.

    The statements are captured as sent (appends with and without a key or a
    time-to-live, reads of a plain and of a forked branch, pop, usage, clear), so a
    statement added later is covered without being listed here.
    """
    store = get_store(citus_url)
    sent: list[tuple[str, Any]] = []

    def remember(
        connection: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> None:
        # (An executemany's parameters are a sequence: one set plans like the others.)
        sent.append((statement, parameters[0] if isinstance(parameters, list) else parameters))

    async def calls() -> None:
        session = PostgreSQLSession(
            f"conv-{uuid.uuid4()}", database_url=citus_url, user_id="ada", ttl=timedelta(hours=1)
        )
        await session.add_items([user("one"), assistant("two")])
        await session.add_items([user("three"), assistant("four")], idempotency_key="k-1")
        await session.get_items(limit=2)
        await session.get_items()
        branch = await session.create_branch_from_turn(2)
        await session.add_items([user("on the branch")])
        await session.get_items(limit=3)
        await session.get_items()
        assert await session.pop_item() == user("on the branch")
        await session.switch_to_branch("main")
        # A Runner turn: its requests' usage is recorded with its items.
        agent = Agent(name="assistant", model=ScriptedModel([[assistant_message("five")]]))
        await Runner.run(agent, "six", session=session)
        await session.delete_branch(branch)
        await session.clear_session()

    event.listen(store.engine, "before_cursor_execute", remember)
    try:
        asyncio.run(calls())
    finally:
        event.remove(store.engine, "before_cursor_execute", remember)

    # SQL of several statements (a pop's lock and delete, one round trip) is planned
    # statement by statement.
    planned = [
        (part, parameters)
        for sql, parameters in sent
        for part in re.split(r";\s*\n", sql)
        if _DISTRIBUTED.search(part)
    ]
    assert len(planned) > 10, sent
    with admin_engine.connect() as connection:
        for sql, parameters in planned:
            connection.exec_driver_sql("BEGIN")
            plan = "\n".join(
                connection.exec_driver_sql("EXPLAIN (COSTS OFF) " + sql, parameters).scalars()
            )
            connection.exec_driver_sql("ROLLBACK")
            counts = [
                line.split(":")[1].strip() for line in plan.splitlines() if "Task Count" in line
            ]
            assert counts and all(count == "1" for count in counts), f"{sql}\n{plan}"
            # Routed whole: not split into sub-plans run one after another (each
            # with a snapshot of its own), nor pulled through the coordinator.
            assert "Subplan" not in plan and "pull to coordinator" not in plan, f"{sql}\n{plan}"


async def test_concurrent_appends_keep_commit_order_and_stay_contiguous(citus_url: str) -> None:
    """Ids follow commit order within a conversation although the coordinator draws them.

    A reader polls the history while writers append batches: every snapshot it
    sees must be a prefix of the final history (an item never appears before items
    already seen), and each batch ends up contiguous and stored once.
    """
    conversation_id = f"conv-{uuid.uuid4()}"
    writers, calls, size = 6, 8, 3
    done = asyncio.Event()
    snapshots: list[list[str]] = []

    async def write(writer: int) -> None:
        session = PostgreSQLSession(conversation_id, database_url=citus_url)
        for call in range(calls):
            await session.add_items([user(f"w{writer}-c{call}-i{i}") for i in range(size)])

    async def read() -> None:
        session = PostgreSQLSession(conversation_id, database_url=citus_url)
        while not done.is_set():
            snapshots.append([item["content"] for item in await session.get_items()])

    reader = asyncio.create_task(read())
    await asyncio.gather(*(write(writer) for writer in range(writers)))
    done.set()
    await reader

    final = [
        item["content"]
        for item in await PostgreSQLSession(conversation_id, database_url=citus_url).get_items()
    ]
    assert len(final) == len(set(final)) == writers * calls * size
    for start in range(0, len(final), size):
        batch = final[start : start + size]
        prefix = batch[0].rsplit("-", 1)[0]
        assert batch == [f"{prefix}-i{i}" for i in range(size)], batch
    assert snapshots
    for seen in snapshots:
        assert final[: len(seen)] == seen


def test_the_ids_of_one_conversation_are_unique_across_shards(
    citus_url: str, admin_engine: Engine
) -> None:
    async def fill() -> None:
        await asyncio.gather(
            *(
                PostgreSQLSession(f"conv-{n}", database_url=citus_url).add_items(
                    [user("a"), user("b")]
                )
                for n in range(20)
            )
        )

    asyncio.run(fill())
    with admin_engine.connect() as connection:
        total, distinct, shards = connection.execute(
            text(
                "SELECT count(*), count(DISTINCT id), "
                "count(DISTINCT get_shard_id_for_distribution_column('messages', conversation_id)) "
                "FROM messages"
            )
        ).one()
    assert total == distinct == 40
    assert shards > 1  # the conversations really are spread over several shards
