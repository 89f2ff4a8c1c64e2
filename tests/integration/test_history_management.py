"""Branches across session objects and processes, atomic compaction, usage recorded once."""

from __future__ import annotations

import asyncio
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from types import SimpleNamespace
from typing import Any, cast

import pytest
from agents import Agent, Runner, function_tool
from agents.memory import OpenAIResponsesCompactionSession
from agents.testing import ModelStep, ScriptedModel, assistant_message, function_call
from agents.usage import Usage
from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails
from sqlalchemy import event, func, select

from agents_sessions import (
    BranchNameTakenError,
    InvalidArgumentError,
    PostgreSQLSession,
    ProtectedBranchError,
    TurnNotFoundError,
    UnknownBranchError,
    UsageEntry,
)
from agents_sessions.db.models import messages_table
from agents_sessions.usage_capture import record_turn_usage
from tests.support import workers


def user(text: str) -> Any:
    return {"role": "user", "content": text}


def reply(text: str) -> Any:
    return {"role": "assistant", "content": text}


async def _three_turns(session: PostgreSQLSession) -> None:
    for turn in range(1, 4):
        await session.add_items([user(f"question {turn}"), reply(f"answer {turn}")])


# ---------------------------------------------------------------------- branches


async def test_the_current_branch_is_shared_by_every_session_object(
    database_url: str, conversation_id: str
) -> None:
    first = PostgreSQLSession(conversation_id, database_url=database_url)
    await _three_turns(first)
    assert await first.create_branch_from_turn(2, "retry") == "retry"

    second = PostgreSQLSession(conversation_id, database_url=database_url)
    assert await second.get_items() == [user("question 1"), reply("answer 1")]
    await second.add_items([user("question 2, again")])
    assert await first.get_items(limit=1) == [user("question 2, again")]
    assert [b["branch_id"] for b in await first.list_branches() if b["is_current"]] == ["retry"]

    await second.switch_to_branch("main")
    assert (await first.get_items())[-1] == reply("answer 3")
    assert await first.get_items(branch_id="retry") == [
        user("question 1"),
        reply("answer 1"),
        user("question 2, again"),
    ]


async def test_a_branch_shares_the_items_it_starts_from_instead_of_copying_them(
    database_url: str, conversation_id: str
) -> None:
    session = PostgreSQLSession(conversation_id, database_url=database_url)
    items = []
    for turn in range(1, 501):
        items += [user(f"q{turn}"), reply(f"a{turn}")]
    await session.add_items(items)

    def stored_rows() -> int:
        with session.store.read() as repos:
            return int(
                repos.connection.execute(
                    select(func.count()).where(messages_table.c.conversation_id == conversation_id)
                ).scalar_one()
            )

    assert stored_rows() == 1000
    await session.create_branch_from_turn(500, "last-turn-again")
    assert stored_rows() == 1000  # nothing copied
    assert len(await session.get_items()) == 998
    assert await session.get_items(limit=2) == [user("q499"), reply("a499")]


async def test_bad_branch_arguments_raise_value_errors_and_write_nothing(
    database_url: str, conversation_id: str
) -> None:
    session = PostgreSQLSession(conversation_id, database_url=database_url)
    await _three_turns(session)
    await session.create_branch_from_turn(3, "b")
    before = (await session.list_branches(), await session.get_items())

    cases: list[tuple[type[ValueError], Any]] = [
        (UnknownBranchError, session.switch_to_branch("nope")),
        (UnknownBranchError, session.delete_branch("nope")),
        (InvalidArgumentError, session.create_branch_from_turn(1, "  ")),
        (InvalidArgumentError, session.switch_to_branch("")),
        (BranchNameTakenError, session.create_branch_from_turn(1, "b")),
        (BranchNameTakenError, session.create_branch_from_turn(1, "main")),
        (TurnNotFoundError, session.create_branch_from_turn(7)),
        (TurnNotFoundError, session.create_branch_from_turn(0)),
        (TurnNotFoundError, session.create_branch_from_content("no such text")),
        (ProtectedBranchError, session.delete_branch("main")),
        (ProtectedBranchError, session.delete_branch("b")),
    ]
    for kind, call in cases:
        with pytest.raises(kind) as raised:
            await call
        assert isinstance(raised.value, ValueError)
    assert (await session.list_branches(), await session.get_items()) == before


async def test_processes_appending_on_a_branch_keep_every_call_whole(
    database_url: str, conversation_id: str
) -> None:
    session = PostgreSQLSession(conversation_id, database_url=database_url)
    await _three_turns(session)
    await session.create_branch_from_turn(2, "parallel")
    writers, calls, size = 3, 10, 4
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=writers, mp_context=context) as pool:
        futures = [
            pool.submit(workers.write_batches, database_url, conversation_id, n, calls, size)
            for n in range(writers)
        ]
        assert sum(future.result() for future in futures) == writers * calls * size
    appended = (await session.get_items())[2:]
    assert len(appended) == writers * calls * size
    # Each call's items are contiguous and in order.
    for start in range(0, len(appended), size):
        labels = [item["content"].rsplit("-i", 1) for item in appended[start : start + size]]
        assert len({prefix for prefix, _ in labels}) == 1
        assert [int(index) for _, index in labels] == list(range(size))
    assert len(await session.get_items(branch_id="main")) == 6


# ---------------------------------------------------------------------- compaction


class _FakeResponses:
    def __init__(self) -> None:
        self.calls = 0

    async def compact(self, **kwargs: Any) -> Any:
        self.calls += 1
        await asyncio.sleep(0.01)  # readers run meanwhile
        return SimpleNamespace(
            output=[{"type": "compaction", "encrypted_content": f"summary-{self.calls}"}],
            usage=None,
        )


def _fake_client() -> tuple[Any, _FakeResponses]:
    responses = _FakeResponses()
    return cast(Any, SimpleNamespace(responses=responses)), responses


async def _read_until(stop: asyncio.Event, session: PostgreSQLSession) -> int:
    reads = 0
    while not stop.is_set():
        assert await session.get_items(), "a reader saw an empty history"
        reads += 1
    return reads


async def test_compaction_replaces_history_atomically_under_concurrent_readers(
    database_url: str, conversation_id: str
) -> None:
    session = PostgreSQLSession(
        conversation_id, database_url=database_url, user_id="owner", metadata={"plan": "pro"}
    )
    assert getattr(type(session), "_atomic_replace_items", None) is not None
    client, responses = _fake_client()
    compacting = OpenAIResponsesCompactionSession(
        conversation_id, underlying_session=session, client=client
    )
    await compacting.add_items([user("hello"), reply("hi")])
    await session.record_usage(
        SimpleNamespace(
            context_wrapper=SimpleNamespace(usage=Usage(requests=1, input_tokens=5)),
            raw_responses=[],
        ),
        model="m",
    )
    stop = asyncio.Event()
    readers = [
        asyncio.create_task(
            _read_until(stop, PostgreSQLSession(conversation_id, database_url=database_url))
        )
        for _ in range(3)
    ]
    for round_ in range(15):
        await compacting.add_items([user(f"q{round_}"), reply(f"a{round_}")])
        await compacting.run_compaction({"force": True})
    stop.set()
    assert all(reads > 0 for reads in await asyncio.gather(*readers))
    assert responses.calls == 15
    assert await session.get_items() == [{"type": "compaction", "encrypted_content": "summary-15"}]
    with session.store.read() as repos:
        record = repos.conversations.get(conversation_id)
        usage = repos.usage.totals_for_conversation(conversation_id)
    assert record is not None and (record.user_id, record.metadata) == ("owner", {"plan": "pro"})
    assert (usage.requests, usage.prompt_tokens) == (1, 5)


async def test_automatic_compaction_swaps_the_suffix_it_read_in_one_transaction(
    database_url: str, conversation_id: str
) -> None:
    session = PostgreSQLSession(conversation_id, database_url=database_url)
    snapshot = await session._get_compaction_snapshot(10)
    assert snapshot is not None and snapshot.items == [] and snapshot.complete

    await _three_turns(session)
    snapshot = await session._get_compaction_snapshot(4)
    assert snapshot.items == [
        user("question 2"),
        reply("answer 2"),
        user("question 3"),
        reply("answer 3"),
    ]
    assert not snapshot.complete
    # Anything appended meanwhile makes the swap refuse, writing nothing.
    await session.add_items([user("late")])
    assert not await snapshot.replace_suffix(2, [reply("summary")])
    assert len(await session.get_items()) == 7
    await session.pop_item()
    snapshot = await session._get_compaction_snapshot(4)
    assert await snapshot.replace_suffix(2, [reply("summary")])
    assert await session.get_items() == [
        user("question 1"),
        reply("answer 1"),
        user("question 2"),
        reply("answer 2"),
        reply("summary"),
    ]


async def test_the_runner_compacts_through_the_atomic_hooks(
    database_url: str, conversation_id: str
) -> None:
    @function_tool
    def lookup(key: str) -> str:
        """Look something up."""
        return key

    session = PostgreSQLSession(conversation_id, database_url=database_url)
    client, responses = _fake_client()
    compacting = OpenAIResponsesCompactionSession(
        conversation_id, underlying_session=session, client=client
    )
    stop = asyncio.Event()
    reader = asyncio.create_task(
        _read_until_first_item(stop, PostgreSQLSession(conversation_id, database_url=database_url))
    )
    for turn in range(6):
        steps = [
            ModelStep(output=[function_call("lookup", {"key": str(turn)}, call_id=f"c{turn}")]),
            ModelStep(output=[assistant_message(f"done {turn}", item_id=f"m{turn}")]),
        ]
        agent = Agent(name="a", model=ScriptedModel(steps), tools=[lookup])
        await Runner.run(agent, f"turn {turn}", session=compacting)
    stop.set()
    await reader
    assert responses.calls >= 1
    items = await session.get_items()
    assert any(item.get("type") == "compaction" for item in items)


async def _read_until_first_item(stop: asyncio.Event, session: PostgreSQLSession) -> None:
    seen = False
    while not stop.is_set():
        items = await session.get_items()
        assert items or not seen, "a reader saw an empty history after the first write"
        seen = seen or bool(items)
        await asyncio.sleep(0)


# ---------------------------------------------------------------------- usage


async def test_usage_per_turn_comes_from_the_automatically_recorded_requests(
    database_url: str, conversation_id: str
) -> None:
    session = PostgreSQLSession(conversation_id, database_url=database_url)
    details = InputTokensDetails.model_validate({"cached_tokens": 30, "cache_write_tokens": 0})
    stored_details: dict[str, Any] = {}
    for turn, tokens in ((1, 100), (2, 200)):
        usage = Usage(
            requests=1,
            input_tokens=tokens,
            output_tokens=10,
            total_tokens=tokens + 10,
            input_tokens_details=details,
            output_tokens_details=OutputTokensDetails(reasoning_tokens=4),
        )
        stored_details = dict(usage.input_tokens_details.__dict__)  # what the SDK stores
        model = ScriptedModel([ModelStep(output=[assistant_message("ok")], usage=usage)])
        await Runner.run(Agent(name="a", model=model), f"turn {turn}", session=session)

    assert await session.get_turn_usage(2) == {
        "requests": 1,
        "input_tokens": 200,
        "output_tokens": 10,
        "total_tokens": 210,
        "input_tokens_details": stored_details,
        "output_tokens_details": {"reasoning_tokens": 4},
    }
    assert await session.get_session_usage() == {
        "requests": 2,
        "input_tokens": 300,
        "output_tokens": 20,
        "total_tokens": 320,
        "total_turns": 2,
    }
    with session.store.read() as repos:
        from agents_sessions.db.models import usage_logs_table as logs

        rows = repos.connection.execute(
            select(logs.c.cached_tokens, logs.c.reasoning_tokens).where(
                logs.c.conversation_id == conversation_id
            )
        ).all()
    assert [tuple(row) for row in rows] == [(30, 4), (30, 4)]


async def test_recording_a_request_again_counts_it_once(
    database_url: str, conversation_id: str
) -> None:
    session = PostgreSQLSession(conversation_id, database_url=database_url)
    await session.add_items([user("q")])
    entry = UsageEntry(model="m", prompt_tokens=7, run_id="run-1", request_index=0)
    for _ in range(3):  # a retried append's transaction, replayed
        with session.store.transaction() as repos:
            record_turn_usage(repos, conversation_id, [entry])
    assert await session.get_session_usage() == {
        "requests": 1,
        "input_tokens": 7,
        "output_tokens": 0,
        "total_tokens": 7,
        "total_turns": 1,
    }


async def test_reading_a_forked_branch_is_the_lean_read_then_one_chain_walk_on_postgresql(
    database_url: str, conversation_id: str
) -> None:
    session = PostgreSQLSession(conversation_id, database_url=database_url)
    for turn in range(1, 6):
        await session.add_items([user(f"q{turn}"), reply(f"a{turn}")])
    await session.create_branch_from_turn(5, "first")
    await session.add_items([user("q5 on first")])
    await session.create_branch_from_turn(4, "second")  # from "first": two parents deep
    await session.add_items([user("q4 on second")])
    store = session.store
    statements: list[str] = []

    def record(*args: Any) -> None:
        statements.append(args[2])

    event.listen(store.engine, "before_cursor_execute", record)
    try:
        with store.single_statement(write=False) as repos:
            latest = repos.messages.latest(conversation_id, 3)
    finally:
        event.remove(store.engine, "before_cursor_execute", record)
    assert latest == [user("q3"), reply("a3"), user("q4 on second")]
    if store.dialect == "postgresql":
        # The lean read of an unforked branch finds the branch forked and answers
        # nothing; one statement then walks the whole chain of parents.
        reads = [s for s in statements if "messages" in s]
        assert len(reads) == 2, statements
        assert "RECURSIVE" not in reads[0] and "RECURSIVE" in reads[1], statements
