"""Items are stored losslessly, and their role/content columns mean something in SQL."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text

from agents_sessions import InvalidItemError, PostgreSQLSession, get_store
from agents_sessions.items import MAX_NESTING_DEPTH, encode_items, readable_text


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": True}
    for level in range(depth):
        value = {"level": level, "child": [value]}
    return value


ASSISTANT = {
    "id": "msg_123",
    "type": "message",
    "role": "assistant",
    "status": "completed",
    "content": [{"type": "output_text", "text": "Hello there", "annotations": [], "logprobs": []}],
}
FUNCTION_CALL = {
    "type": "function_call",
    "call_id": "call_1",
    "name": "get_weather",
    "arguments": '{"city": "Paris"}',
    "id": "fc_1",
}
FUNCTION_OUTPUT = {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21C"}
REASONING = {
    "type": "reasoning",
    "id": "rs_1",
    "summary": [{"type": "summary_text", "text": "Thinking about weather"}],
}

LOSSLESS_CASES: dict[str, dict[str, Any]] = {
    "nul": {"role": "user", "content": "before\x00after", "nested": {"k\x00ey": "\x00"}},
    "unicode": {"role": "user", "content": "héllo 世界 🚀 مرحبا a\u0301 \u200b \U0010ffff"},
    "lone-surrogates": {"role": "user", "content": "half \ud800 pair \udfff end"},
    "control-chars": {"role": "user", "content": "".join(chr(c) for c in range(32)) + "\x7f"},
    "escapes": {"role": "user", "content": 'quote " backslash \\ slash / \\u0000 literal'},
    "megabyte": {"role": "user", "content": "x" * 1_048_576},
    "deep-nesting": {"role": "user", "content": "deep", "data": nested(200)},  # 400 levels
    "big-ints": {"role": "user", "content": "n", "values": [2**64, -(2**70), 10**40, 0, -1]},
    "floats": {"role": "user", "content": "f", "values": [0.1, 1e308, 5e-324, -0.0, 1.5]},
    "key-order": {"z": 1, "a": 2, "m": {"y": 1, "b": 2}, "role": "user", "content": "k"},
    "empties": {"role": "user", "content": "", "list": [], "dict": {}, "none": None},
    "bools": {"role": "user", "content": "b", "t": True, "f": False},
    "assistant": ASSISTANT,
    "function-call": FUNCTION_CALL,
    "function-output": FUNCTION_OUTPUT,
    "reasoning": REASONING,
}


@pytest.mark.parametrize("name", list(LOSSLESS_CASES))
async def test_item_round_trips_exactly(database_url: str, conversation_id: str, name: str) -> None:
    item = LOSSLESS_CASES[name]
    session = PostgreSQLSession(conversation_id, database_url=database_url)
    await session.add_items([item])
    [stored] = await session.get_items()
    assert stored == item
    assert list(stored) == list(item)  # key order too
    assert await session.pop_item() == item


async def test_absurdly_deep_item_gets_a_clear_error_and_writes_nothing(
    database_url: str, conversation_id: str
) -> None:
    session = PostgreSQLSession(conversation_id, database_url=database_url)
    with pytest.raises(InvalidItemError, match="nested too deeply"):
        await session.add_items([{"role": "user", "content": "ok"}, nested(5_000)])
    assert await session.get_items() == []


def nested_lists(levels: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(levels - 1):
        value = [value]
    return value


async def test_items_at_the_nesting_limit_round_trip_and_deeper_ones_are_refused(
    database_url: str, conversation_id: str
) -> None:
    # The item dict is level 1, so MAX_NESTING_DEPTH - 1 nested lists fill the limit.
    deepest = {"role": "user", "content": "deep", "data": nested_lists(MAX_NESTING_DEPTH - 1)}
    too_deep = {"role": "user", "content": "deep", "data": nested_lists(MAX_NESTING_DEPTH)}
    session = PostgreSQLSession(conversation_id, database_url=database_url)
    with pytest.raises(InvalidItemError, match="nested too deeply"):
        await session.add_items([too_deep])
    await session.add_items([deepest])
    # Readable back by every path, including pop's DELETE ... RETURNING.
    assert await session.get_items() == [deepest]
    assert await session.get_items(limit=1) == [deepest]
    assert await session.pop_item() == deepest


async def test_floats_keep_their_type(database_url: str, conversation_id: str) -> None:
    session = PostgreSQLSession(conversation_id, database_url=database_url)
    await session.add_items([{"role": "user", "content": "x", "v": 1.0, "i": 1}])
    [stored] = await session.get_items()
    assert type(stored["v"]) is float
    assert type(stored["i"]) is int


async def test_many_items_in_one_call_keep_their_order(
    database_url: str, conversation_id: str
) -> None:
    session = PostgreSQLSession(conversation_id, database_url=database_url)
    items = list(LOSSLESS_CASES.values())
    await session.add_items(items)
    assert await session.get_items() == items


def test_role_is_the_role_or_else_the_type() -> None:
    roles = [encoded.role for encoded in encode_items([ASSISTANT, FUNCTION_CALL, REASONING, {}])]
    assert roles == ["assistant", "function_call", "reasoning", "unknown"]


def test_readable_text_of_each_item_shape() -> None:
    assert readable_text({"role": "user", "content": "Hi"}) == "Hi"
    assert readable_text(ASSISTANT) == "Hello there"
    assert readable_text(FUNCTION_CALL) == 'get_weather({"city": "Paris"})'
    assert readable_text(FUNCTION_OUTPUT) == "sunny, 21C"
    assert readable_text(REASONING) == "Thinking about weather"
    parts = {"role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "x"}]}
    assert readable_text(parts) == "a"


async def test_role_and_content_columns_answer_sql(database_url: str, conversation_id: str) -> None:
    session = PostgreSQLSession(conversation_id, database_url=database_url)
    await session.add_items(
        [
            {"role": "user", "content": "What is the weather in Paris?\x00"},
            FUNCTION_CALL,
            FUNCTION_OUTPUT,
            ASSISTANT,
        ]
    )
    with session.store.engine.connect() as connection:
        rows = connection.execute(
            text("SELECT role, content FROM messages WHERE conversation_id = :c ORDER BY id"),
            {"c": conversation_id},
        ).all()
    assert [tuple(row) for row in rows] == [
        ("user", "What is the weather in Paris?"),  # NUL scrubbed from the text column
        ("function_call", 'get_weather({"city": "Paris"})'),
        ("function_call_output", "sunny, 21C"),
        ("assistant", "Hello there"),
    ]


async def test_item_column_is_queryable_json_on_postgres(
    postgres_url: str, conversation_id: str
) -> None:
    session = PostgreSQLSession(conversation_id, database_url=postgres_url)
    await session.add_items([FUNCTION_CALL, ASSISTANT])
    with session.store.engine.connect() as connection:
        column_type = connection.execute(
            text(
                "SELECT data_type FROM information_schema.columns "
                "WHERE table_name = 'messages' AND column_name = 'item'"
            )
        ).scalar_one()
        names = connection.execute(
            text(
                "SELECT item->>'name' FROM messages WHERE conversation_id = :c "
                "AND item->>'type' = 'function_call'"
            ),
            {"c": conversation_id},
        ).scalars()
        assert list(names) == ["get_weather"]
    assert column_type == "json"


async def test_a_surrogate_pair_written_as_two_code_points_is_refused_not_merged(
    database_url: str, conversation_id: str
) -> None:
    session = PostgreSQLSession(conversation_id, database_url=database_url)
    two_code_points = {"role": "user", "content": "smile \ud83d\ude00"}
    with pytest.raises(InvalidItemError, match=r"surrogate pair .*U\+D83D U\+DE00"):
        await session.add_items([{"role": "user", "content": "first"}, two_code_points])
    assert await session.get_items() == []  # nothing of the call was written
    # The character itself, and lone surrogates, round trip exactly.
    kept = [
        {"role": "user", "content": "smile \U0001f600"},
        {"role": "user", "content": "lone \ud83d then \ude00 apart"},
        {"role": "user", "content": "low first \ude00\ud83d"},
    ]
    await session.add_items(kept)
    assert await session.get_items() == kept


def test_conversation_metadata_is_equal_as_a_dict_but_jsonb_normalises_its_text(
    database_url: str, conversation_id: str, backend: str
) -> None:
    # Documented (README, schema): metadata is jsonb on PostgreSQL, so it comes back
    # equal as a dict, with key order (and number spelling) normalised. Exact text
    # belongs in items (json, verbatim).
    metadata = {"zeta": 1, "alpha": {"b": 2.5, "a": [1, 2]}, "big": 2**70, "m": 1e20}
    store = get_store(database_url)
    with store.transaction() as repos:
        repos.conversations.upsert(conversation_id, metadata=metadata)
    with store.read() as repos:
        record = repos.conversations.get(conversation_id)
    assert record is not None and record.metadata == metadata
    if backend == "postgresql":
        assert list(record.metadata) == ["m", "big", "zeta", "alpha"]  # jsonb's order
