"""A Runner turn's append and its captured usage: one round trip on PostgreSQL, both or neither.

On PostgreSQL (psycopg2, no tenant) the append that carries a run's new requests is
the append statement and the usage insert sent together on the event loop's
connection; elsewhere it is a transaction in a worker thread. Both attribute the
usage to the same turn, which the behaviour tests check on both backends.
"""

from __future__ import annotations

from typing import Any

import pytest
from agents import Agent, Runner
from agents.run_context import RunContextWrapper
from agents.testing import ModelStep, ScriptedModel, assistant_message
from agents.usage import Usage
from sqlalchemy import event, text

from agents_sessions import PostgreSQLSession
from agents_sessions.errors import DatabaseError
from agents_sessions.items import encode_items
from agents_sessions.loop_statements import run_on_loop
from agents_sessions.repositories.messages import append_statement
from agents_sessions.repositories.records import UsageEntry
from agents_sessions.repositories.usage import usage_rows

loop_path_only = pytest.mark.not_on_citus(
    "on Citus an append is a transaction of single-shard statements in a worker thread"
)


def user(content: str) -> Any:
    return {"role": "user", "content": content}


def reply(content: str) -> Any:
    return {"role": "assistant", "content": content}


def _request(tokens: int) -> Usage:
    return Usage(requests=1, input_tokens=tokens, output_tokens=1, total_tokens=tokens + 1)


async def _turn_usage(
    session: PostgreSQLSession, turn: int, branch_id: str | None = None
) -> dict[str, Any]:
    usage = await session.get_turn_usage(turn, branch_id=branch_id)
    assert isinstance(usage, dict)
    return usage


async def _append_with_usage(session: PostgreSQLSession, items: list[Any], tokens: int) -> None:
    """Append ``items`` as the Runner appends a model's output: with the run's request."""
    run = RunContextWrapper(context=None, usage=Usage())
    await session.get_items(wrapper=run)  # the Runner reads first: the run starts here
    run.usage.add(_request(tokens))
    await session.add_items(items, wrapper=run)


@loop_path_only
async def test_runner_turns_record_usage_without_a_worker_thread_transaction(
    postgres_url: str, conversation_id: str
) -> None:
    session = PostgreSQLSession(conversation_id, database_url=postgres_url)
    await session.get_items()  # the schema check (a worker thread) is behind us
    checkouts: list[Any] = []
    event.listen(session.store.engine, "checkout", lambda *_: checkouts.append(1))

    for turn, tokens in ((1, 100), (2, 200)):
        model = ScriptedModel([ModelStep(output=[assistant_message("ok")], usage=_request(tokens))])
        await Runner.run(Agent(name="a", model=model), f"turn {turn}", session=session)

    assert checkouts == []  # every call ran on the event loop's connections
    assert (await _turn_usage(session, 2))["input_tokens"] == 200
    assert await session.get_session_usage() == {
        "requests": 2,
        "input_tokens": 300,
        "output_tokens": 2,
        "total_tokens": 302,
        "total_turns": 2,
    }


async def test_usage_on_a_branch_with_no_user_message_of_its_own_goes_to_the_inherited_turn(
    database_url: str, conversation_id: str
) -> None:
    session = PostgreSQLSession(conversation_id, database_url=database_url)
    await session.add_items([user("q1"), reply("a1"), user("q2"), reply("a2")])
    await session.create_branch_from_turn(2, "retry")  # inherits turn 1 only
    await _append_with_usage(session, [reply("a1, again")], tokens=70)

    # Attributed up the fork chain, to turn 1 of the branch (main's q1).
    assert (await _turn_usage(session, 1, branch_id="retry"))["input_tokens"] == 70
    assert await _turn_usage(session, 2, branch_id="retry") == {}
    # A turn of the branch's own then takes the next requests.
    await session.add_items([user("q2, again")])
    await _append_with_usage(session, [reply("a2, again")], tokens=90)
    assert (await _turn_usage(session, 2, branch_id="retry"))["input_tokens"] == 90
    assert await session.get_session_usage(branch_id="main") is None


@loop_path_only
async def test_a_turn_whose_usage_cannot_be_stored_stores_none_of_its_items(
    postgres_server: Any, conversation_id: str
) -> None:
    url = postgres_server.create_database()
    session = PostgreSQLSession(conversation_id, database_url=url)
    await session.add_items([user("q1")])
    with session.store.engine.begin() as connection:  # a rule the usage row will break
        connection.execute(
            text("ALTER TABLE usage_logs ADD CONSTRAINT small CHECK (prompt_tokens < 1000)")
        )

    with pytest.raises(DatabaseError, match="small"):
        await _append_with_usage(session, [reply("a1")], tokens=5000)

    assert await session.get_items() == [user("q1")]
    await _append_with_usage(session, [reply("a1")], tokens=500)
    assert await session.get_items() == [user("q1"), reply("a1")]
    assert (await _turn_usage(session, 1))["input_tokens"] == 500


@loop_path_only
async def test_a_repeated_turn_append_stores_its_items_and_usage_once(
    postgres_url: str, conversation_id: str
) -> None:
    # A retry after an unknown outcome sends the same statement again.
    session = PostgreSQLSession(conversation_id, database_url=postgres_url)
    await session.add_items([user("q1")])
    entry = UsageEntry(
        model="m", prompt_tokens=40, completion_tokens=2, requests=1, run_id="r", request_index=0
    )
    hot = append_statement(
        conversation_id,
        encode_items([reply("a1")]),
        user_id=None,
        metadata=None,
        idempotency_key="turn-1-output",
        ttl_seconds=None,
        usage=usage_rows(conversation_id, [entry]),
    )
    for _ in range(2):
        await run_on_loop(session.store, hot, write=True, repeatable=True)

    assert await session.get_items() == [user("q1"), reply("a1")]
    assert await session.get_session_usage() == {
        "requests": 1,
        "input_tokens": 40,
        "output_tokens": 2,
        "total_tokens": 42,
        "total_turns": 1,
    }


async def test_a_trimming_session_records_each_turns_usage_and_keeps_its_last_turns(
    database_url: str, conversation_id: str
) -> None:
    session = PostgreSQLSession(conversation_id, database_url=database_url, keep_last_turns=1)
    for turn, tokens in ((1, 100), (2, 200), (3, 300)):
        model = ScriptedModel([ModelStep(output=[assistant_message("ok")], usage=_request(tokens))])
        await Runner.run(Agent(name="a", model=model), f"turn {turn}", session=session)

    items = await session.get_items()
    assert len(items) == 2 and items[0]["content"] == "turn 3"
    # The ledger keeps every request, though the turns they belong to were trimmed.
    with session.store.read() as repos:
        totals = repos.usage.totals_for_conversation(conversation_id)
    assert (totals.requests, totals.prompt_tokens) == (3, 600)
