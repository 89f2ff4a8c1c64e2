"""The Agents SDK ``Session`` protocol, exactly, on both backends."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from agents.memory import Session, SessionSettings

from agents_sessions import (
    InvalidArgumentError,
    InvalidConversationIdError,
    InvalidItemError,
    ItemTypeError,
    PostgreSQLSession,
)


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


@pytest.fixture
def session(database_url: str, conversation_id: str) -> PostgreSQLSession:
    return PostgreSQLSession(conversation_id, database_url=database_url)


def test_session_satisfies_the_sdk_protocol(session: PostgreSQLSession) -> None:
    assert isinstance(session, Session)
    assert session.session_id == session.conversation_id
    assert session.session_settings is None


async def test_new_session_is_empty(session: PostgreSQLSession) -> None:
    assert await session.get_items() == []
    assert await session.get_items(limit=3) == []
    assert await session.pop_item() is None


async def test_items_come_back_in_order_and_equal(session: PostgreSQLSession) -> None:
    first = [user("one"), user("two")]
    second = [user("three")]
    await session.add_items(first)
    await session.add_items(second)
    assert await session.get_items() == first + second


async def test_limit_returns_the_latest_items_oldest_first(session: PostgreSQLSession) -> None:
    await session.add_items([user(str(n)) for n in range(10)])
    assert await session.get_items(limit=3) == [user("7"), user("8"), user("9")]
    assert await session.get_items(limit=1) == [user("9")]
    assert await session.get_items(limit=50) == [user(str(n)) for n in range(10)]


async def test_limit_zero_returns_nothing(session: PostgreSQLSession) -> None:
    await session.add_items([user("x")])
    assert await session.get_items(limit=0) == []


async def test_negative_limit_is_rejected_by_name(session: PostgreSQLSession) -> None:
    with pytest.raises(InvalidArgumentError, match="limit"):
        await session.get_items(limit=-1)
    with pytest.raises(ValueError):
        await session.get_items(limit=-5)


async def test_session_settings_limit_applies_when_no_explicit_limit(
    database_url: str, conversation_id: str
) -> None:
    session = PostgreSQLSession(
        conversation_id, database_url=database_url, session_settings=SessionSettings(limit=2)
    )
    await session.add_items([user("a"), user("b"), user("c")])
    assert await session.get_items() == [user("b"), user("c")]
    assert await session.get_items(limit=3) == [user("a"), user("b"), user("c")]
    assert await session.get_items(limit=0) == []


async def test_session_settings_may_be_a_dict(database_url: str, conversation_id: str) -> None:
    session = PostgreSQLSession(
        conversation_id, database_url=database_url, session_settings={"limit": 1}
    )
    assert isinstance(session.session_settings, SessionSettings)
    await session.add_items([user("a"), user("b")])
    assert await session.get_items() == [user("b")]


async def test_add_items_with_empty_list_writes_nothing(session: PostgreSQLSession) -> None:
    await session.add_items([])
    assert await session.get_items() == []
    with session.store.read() as repos:
        assert repos.conversations.get(session.session_id) is None


async def test_pop_item_removes_and_returns_the_newest(session: PostgreSQLSession) -> None:
    await session.add_items([user("a"), user("b"), user("c")])
    assert await session.pop_item() == user("c")
    assert await session.pop_item() == user("b")
    assert await session.get_items() == [user("a")]
    assert await session.pop_item() == user("a")
    assert await session.pop_item() is None


async def test_items_added_after_a_pop_go_to_the_end(session: PostgreSQLSession) -> None:
    await session.add_items([user("a"), user("b")])
    await session.pop_item()
    await session.add_items([user("c")])
    assert await session.get_items() == [user("a"), user("c")]


async def test_clear_session_is_idempotent_and_leaves_session_usable(
    session: PostgreSQLSession,
) -> None:
    await session.add_items([user("a"), user("b")])
    await session.clear_session()
    assert await session.get_items() == []
    await session.clear_session()  # again, on an empty conversation
    await session.add_items([user("c")])
    assert await session.get_items() == [user("c")]


async def test_clear_session_on_a_never_written_conversation(session: PostgreSQLSession) -> None:
    await session.clear_session()
    assert await session.get_items() == []


async def test_sessions_do_not_see_each_others_items(database_url: str) -> None:
    one = PostgreSQLSession("isolation-one-" + database_url[-8:], database_url=database_url)
    two = PostgreSQLSession("isolation-two-" + database_url[-8:], database_url=database_url)
    await one.clear_session()
    await two.clear_session()
    await one.add_items([user("for one")])
    await two.add_items([user("for two")])
    await two.pop_item()
    assert await one.get_items() == [user("for one")]
    assert await two.get_items() == []


async def test_two_session_objects_on_one_conversation_share_history(
    database_url: str, conversation_id: str
) -> None:
    writer = PostgreSQLSession(conversation_id, database_url=database_url)
    reader = PostgreSQLSession(conversation_id, database_url=database_url)
    await writer.add_items([user("shared")])
    assert await reader.get_items() == [user("shared")]


@pytest.mark.parametrize(
    "bad_id",
    ["", "   ", "\t\n", "a" * 256, "nul\x00inside", "bell\x07"],
    ids=["empty", "spaces", "whitespace", "too-long", "nul", "control"],
)
def test_unusable_conversation_ids_are_rejected(database_url: str, bad_id: str) -> None:
    with pytest.raises(InvalidConversationIdError, match="conversation_id"):
        PostgreSQLSession(bad_id, database_url=database_url)


@pytest.mark.parametrize("bad_id", [None, 42, b"bytes"], ids=["none", "int", "bytes"])
def test_non_string_conversation_ids_are_rejected(database_url: str, bad_id: Any) -> None:
    with pytest.raises(InvalidConversationIdError, match="must be a str"):
        PostgreSQLSession(bad_id, database_url=database_url)


async def test_sql_metacharacters_in_ids_are_inert(database_url: str) -> None:
    nasty = "x'); DROP TABLE messages; --"
    session = PostgreSQLSession(nasty, database_url=database_url)
    await session.clear_session()
    await session.add_items([user("still here")])
    assert await session.get_items() == [user("still here")]
    with session.store.read() as repos:
        assert repos.conversations.get(nasty) is not None


async def test_external_ids_of_any_shape_work(database_url: str) -> None:
    for external in ("user-123-conv", "Ünïcødé ☃ 会话", "a" * 255, "1", "slack:T01/C02/1699"):
        session = PostgreSQLSession(external, database_url=database_url)
        await session.clear_session()
        await session.add_items([user(external)])
        assert await session.get_items() == [user(external)]


async def test_unserializable_item_raises_type_error_and_writes_nothing(
    session: PostgreSQLSession,
) -> None:
    await session.add_items([user("before")])
    with pytest.raises(TypeError):
        await session.add_items([user("fine"), {"role": "user", "content": object()}])
    with pytest.raises(ItemTypeError, match=r"items\[1\]"):
        await session.add_items([user("fine"), {"role": "user", "content": b"bytes"}])
    with pytest.raises(ValueError):
        await session.add_items([user("fine"), {"role": "user", "content": float("nan")}])
    with pytest.raises(InvalidItemError):
        await session.add_items([{"role": "user", "content": float("inf")}])
    with pytest.raises(ItemTypeError, match="must be a dict"):
        await session.add_items(["just a string"])
    with pytest.raises(ItemTypeError, match="list"):
        await session.add_items(user("not a list"))  # type: ignore[arg-type]
    # Nothing of the failed calls is stored, and the session still works.
    assert await session.get_items() == [user("before")]
    await session.add_items([user("after")])
    assert await session.get_items() == [user("before"), user("after")]


async def test_items_json_would_silently_change_are_rejected(session: PostgreSQLSession) -> None:
    with pytest.raises(ItemTypeError, match="non-string key"):
        await session.add_items([{"role": "user", "content": "x", "meta": {1: "int key"}}])
    with pytest.raises(ItemTypeError, match="tuple"):
        await session.add_items([{"role": "user", "content": ("a", "b")}])
    assert await session.get_items() == []


async def test_circular_item_is_rejected(session: PostgreSQLSession) -> None:
    item: dict[str, Any] = {"role": "user", "content": "x"}
    item["self"] = item
    with pytest.raises(InvalidItemError):
        await session.add_items([item])
    assert await session.get_items() == []


async def test_cancelled_add_items_leaves_all_items_or_none(session: PostgreSQLSession) -> None:
    batch = [user(f"item {n}") for n in range(50)]
    cancelled_in_flight = 0
    for delay in (0, 0, 0.0005, 0.001, 0.002, 0.005):
        await session.clear_session()
        task = asyncio.create_task(session.add_items(batch))
        await asyncio.sleep(delay)
        in_flight = not task.done()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            assert in_flight
            cancelled_in_flight += 1
        stored = await session.get_items()
        assert stored in ([], batch)
    # The caller saw its cancellation at least for the immediate cancels.
    assert cancelled_in_flight >= 2


async def test_cancelled_pop_item_does_not_lose_the_item(session: PostgreSQLSession) -> None:
    await session.add_items([user("a"), user("b")])
    task = asyncio.create_task(session.pop_item())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    remaining = await session.get_items()
    # The pop either completed (b removed) or never started; a is never touched.
    assert remaining in ([user("a")], [user("a"), user("b")])


async def test_calls_do_not_block_the_event_loop(session: PostgreSQLSession) -> None:
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    ticking = asyncio.create_task(ticker())
    big = [user("x" * 200_000) for _ in range(10)]
    await session.add_items(big)
    assert len(await session.get_items()) == 10
    stop.set()
    await ticking
    # The loop kept running while the database work happened in a thread.
    assert ticks > 10


def test_constructing_a_session_does_no_io(tmp_path: Any) -> None:
    path = tmp_path / "never" / "created.sqlite3"
    session = PostgreSQLSession("c", database_url=f"sqlite:///{path}")
    assert session.store.pool.checkedout() == 0
    assert not path.parent.exists()


async def test_an_explicit_psycopg3_url_still_works(
    postgres_url: str, conversation_id: str
) -> None:
    pytest.importorskip("psycopg", reason="psycopg 3 is part of the test extra")
    url = postgres_url.replace("postgresql+psycopg2://", "postgresql+psycopg://", 1)
    assert url.startswith("postgresql+psycopg://")
    session = PostgreSQLSession(conversation_id, database_url=url, metadata={"driver": 3})
    assert session.store.engine.dialect.driver == "psycopg"
    items = [user("a\x00b"), {"type": "function_call", "name": "f", "arguments": "{}"}]
    await session.add_items(items)
    assert await session.get_items() == items
    assert await session.get_items(limit=1) == items[1:]
    assert await session.pop_item() == items[1]
    await session.clear_session()
    assert await session.get_items() == []
    with session.store.read() as repos:
        record = repos.conversations.get(conversation_id)
    assert record is not None and record.metadata == {"driver": 3}
