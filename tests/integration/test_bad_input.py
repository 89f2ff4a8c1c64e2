"""Bad input gets a clear error naming the bad parameter, before anything is written.

Conversation ids, limits and the per-item size limit (``Settings.max_item_bytes``).
SQL metacharacters in ids are data, never SQL: every id is bound as a parameter.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from agents.memory import SessionSettings
from sqlalchemy import func, inspect, select

from agents_sessions import (
    ConfigurationError,
    InvalidArgumentError,
    InvalidConversationIdError,
    InvalidItemError,
    PostgreSQLSession,
    get_store,
    load_settings,
)
from agents_sessions.db.models import MAX_ID_LENGTH
from agents_sessions.db.models import conversations_table as conversations
from agents_sessions.errors import ItemTooLargeError


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def conversation_count(database_url: str) -> int:
    with get_store(database_url).read() as repos:
        return int(
            repos.connection.execute(select(func.count()).select_from(conversations)).scalar_one()
        )


# ------------------------------------------------------------------ conversation ids

BAD_IDS: list[tuple[str, Any]] = [
    ("empty", ""),
    ("space", " "),
    ("whitespace", " \t\n "),
    ("ideographic space", "\u3000"),
    ("too long", "a" * (MAX_ID_LENGTH + 1)),
    ("far too long", "x" * 100_000),
    ("NUL", "conv\x00id"),
    ("only NUL", "\x00"),
    ("newline", "conv\nid"),
    ("DEL", "conv\x7f"),
    ("lone surrogate", "conv-\ud800"),
    # Nothing visible: an id nobody can see, read back or type again.
    ("zero-width space", "\u200b"),
    ("zero-width mix", "\u200b\u200c\u200d\u2060\ufeff"),
    ("combining mark alone", "\u0301"),
    ("hangul filler", "\u3164"),
    ("int", 123),
    ("None", None),
    ("bytes", b"conv-1"),
    ("float", 1.5),
    ("list", ["conv-1"]),
    ("uuid object", uuid.UUID(int=1)),  # str(uuid) works; the object is refused, not coerced
]


@pytest.mark.parametrize(("label", "bad_id"), BAD_IDS, ids=[label for label, _ in BAD_IDS])
def test_a_bad_conversation_id_is_refused_at_construction(
    database_url: str, label: str, bad_id: Any
) -> None:
    before = conversation_count(database_url)

    with pytest.raises(InvalidConversationIdError, match="conversation_id") as info:
        PostgreSQLSession(bad_id, database_url=database_url)

    assert isinstance(info.value, ValueError)
    # The repository API refuses the same ids, before any SQL.
    store = get_store(database_url)
    refused = pytest.raises(InvalidConversationIdError, match="conversation_id")
    with refused, store.transaction() as repos:
        repos.messages.append(bad_id, [user("never stored")])
    with pytest.raises(InvalidConversationIdError, match="conversation_id"), store.read() as repos:
        repos.messages.all(bad_id)
    assert conversation_count(database_url) == before


# user_id=None means "no owner" and is valid.
BAD_USER_IDS = [(label, bad) for label, bad in BAD_IDS if bad is not None]


@pytest.mark.parametrize(
    ("label", "bad_id"), BAD_USER_IDS, ids=[label for label, _ in BAD_USER_IDS]
)
def test_a_bad_user_id_is_refused_naming_user_id(
    database_url: str, conversation_id: str, label: str, bad_id: Any
) -> None:
    with pytest.raises(InvalidConversationIdError, match="user_id"):
        PostgreSQLSession(conversation_id, database_url=database_url, user_id=bad_id)


EDGE_IDS: list[tuple[str, Callable[[str], str]]] = [
    ("255 ascii", lambda unique: unique + "a" * (MAX_ID_LENGTH - len(unique))),
    # Characters, not bytes, are counted: 255 of them however wide in UTF-8.
    ("255 two-byte", lambda unique: unique + "é" * (MAX_ID_LENGTH - len(unique))),
    ("255 non-BMP", lambda unique: unique + "\U0001f680" * (MAX_ID_LENGTH - len(unique))),
    ("padded with spaces", lambda unique: f" {unique} "),
    ("inner whitespace", lambda unique: f"a b\u3000{unique}"),
    # Invisible characters beside visible ones are allowed (external ids may carry them).
    ("with a zero-width joiner", lambda unique: f"{unique}\u200d\U0001f469"),
]


@pytest.mark.parametrize(("label", "make_id"), EDGE_IDS, ids=[label for label, _ in EDGE_IDS])
async def test_ids_at_the_edges_of_the_rules_are_accepted(
    database_url: str, label: str, make_id: Callable[[str], str]
) -> None:
    good_id = make_id(uuid.uuid4().hex[:8])  # unique in the run's shared database
    session = PostgreSQLSession(good_id, database_url=database_url)
    await session.add_items([user(good_id)])
    assert await session.get_items() == [user(good_id)]
    with session.store.read() as repos:
        record = repos.conversations.get(good_id)
    assert record is not None and record.id == good_id


async def test_a_one_character_id_is_accepted(database_url: str) -> None:
    session = PostgreSQLSession("\u2603", database_url=database_url)
    await session.clear_session()  # the run's database is shared: start from empty
    await session.add_items([user("snowman")])
    assert await session.get_items() == [user("snowman")]


# SQL and LIKE metacharacters, quoting, and look-alike Unicode: each its own conversation.
METACHARACTER_IDS = [
    "'; DROP TABLE messages; --",
    "' OR '1'='1",
    '"; DROP TABLE conversations; --',
    "Robert'); DROP TABLE messages;--",
    "%",
    "%%",
    "_",
    "a%",
    "a_",
    "\\",
    "\\\\",
    "\\%",
    "'",
    "''",
    '"',
    "`",
    "$1",
    ":conversation_id",
    "?",
    "%s",
    "{}",
    "*",
    "[a-z]",
    "/* comment */",
    "会話-🚀",
    "é",  # precomposed
    "e\u0301",  # decomposed: looks the same, is a different id
    "conv",
    "Conv",
    "conv ",
    " conv",
    "ß",
    "ss",
]


async def test_sql_metacharacters_in_ids_are_inert_and_ids_stay_distinct(
    fresh_database_url: Callable[[], str],
) -> None:
    url = fresh_database_url()  # an empty database: "%" must match nothing but itself
    for conversation_id in METACHARACTER_IDS:
        session = PostgreSQLSession(conversation_id, database_url=url, user_id=conversation_id)
        await session.add_items([user(conversation_id), user("second")])

    for conversation_id in METACHARACTER_IDS:
        session = PostgreSQLSession(conversation_id, database_url=url)
        assert await session.get_items() == [user(conversation_id), user("second")]
        assert await session.get_items(limit=1) == [user("second")]

    store = get_store(url)
    with store.read() as repos:
        assert conversation_count(url) == len(METACHARACTER_IDS)
        for conversation_id in METACHARACTER_IDS:
            record = repos.conversations.get(conversation_id)
            assert record is not None and record.id == conversation_id
            page = repos.conversations.list_by_user(conversation_id)
            assert [found.id for found in page.conversations] == [conversation_id]
        tables = set(inspect(repos.connection).get_table_names())
    assert {"conversations", "messages", "usage_logs", "alembic_version"} <= tables

    # Writes aimed at one of them touch only that one.
    await PostgreSQLSession("%", database_url=url).clear_session()
    assert await PostgreSQLSession("%", database_url=url).pop_item() is None
    assert await PostgreSQLSession("_", database_url=url).pop_item() == user("second")
    with store.transaction() as repos:
        assert repos.conversations.delete("'; DROP TABLE messages; --")
    with store.read() as repos:
        counts = {
            conversation_id: repos.messages.count(conversation_id)
            for conversation_id in METACHARACTER_IDS
        }
    expected = dict.fromkeys(METACHARACTER_IDS, 2)
    expected.update({"%": 0, "_": 1, "'; DROP TABLE messages; --": 0})
    assert counts == expected


# ------------------------------------------------------------------ limits

BAD_LIMITS: list[Any] = [-1, -(2**70), True, False, 1.5, 2.0, "3", b"3", [3]]


@pytest.mark.parametrize("limit", BAD_LIMITS, ids=repr)
async def test_a_bad_limit_is_an_invalid_argument_error_naming_limit(
    database_url: str, conversation_id: str, limit: Any
) -> None:
    session = PostgreSQLSession(conversation_id, database_url=database_url)
    await session.add_items([user("kept")])

    with pytest.raises(InvalidArgumentError, match="limit") as info:
        await session.get_items(limit=limit)
    assert isinstance(info.value, ValueError)
    with pytest.raises(InvalidArgumentError, match="limit"), session.store.read() as repos:
        repos.messages.latest(conversation_id, limit)
    assert await session.get_items() == [user("kept")]


async def test_a_negative_limit_from_session_settings_is_refused(
    database_url: str, conversation_id: str
) -> None:
    session = PostgreSQLSession(
        conversation_id, database_url=database_url, session_settings=SessionSettings(limit=-1)
    )
    with pytest.raises(InvalidArgumentError, match="limit"):
        await session.get_items()
    assert await session.get_items(limit=5) == []  # an explicit limit still works


@pytest.mark.parametrize("limit", [0, -1, True, "10"], ids=repr)
def test_a_bad_page_size_for_list_by_user_is_refused(database_url: str, limit: Any) -> None:
    with (
        pytest.raises(InvalidArgumentError, match="limit"),
        get_store(database_url).read() as repos,
    ):
        repos.conversations.list_by_user("someone", limit=limit)


# ------------------------------------------------------------------ item size limit
#
# The API under test: `Settings.max_item_bytes` (env AGENTS_SESSIONS_MAX_ITEM_BYTES,
# default 16 MiB, >= 1) and `agents_sessions.errors.ItemTooLargeError` (an
# InvalidItemError, so a ValueError), raised before anything is written when one
# item's JSON encoding exceeds the limit in UTF-8 bytes.

DEFAULT_MAX_ITEM_BYTES = 16 * 1024 * 1024
EMPTY_USER_ITEM_BYTES = len(b'{"role":"user","content":""}')


def encoded_size(item: Any) -> int:
    """The size the limit is about: the item's compact JSON, in UTF-8 bytes."""
    return len(json.dumps(item, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


def item_of_size(size: int, *, character: str = "x") -> dict[str, str]:
    width = len(character.encode("utf-8"))
    assert (size - EMPTY_USER_ITEM_BYTES) % width == 0
    item = user(character * ((size - EMPTY_USER_ITEM_BYTES) // width))
    assert encoded_size(item) == size
    return item


def numbers_in(message: str) -> set[int]:
    """Integers in ``message``, read with or without thousands separators."""
    return {
        int(re.sub(r"[,_\u202f ]", "", found)) for found in re.findall(r"\d[\d,_\u202f]*", message)
    }


def test_max_item_bytes_defaults_to_16_mib() -> None:
    assert load_settings().max_item_bytes == DEFAULT_MAX_ITEM_BYTES


async def test_an_item_over_the_limit_refuses_the_whole_batch(
    database_url: str, conversation_id: str
) -> None:
    session = PostgreSQLSession(
        conversation_id, database_url=database_url, settings=load_settings(max_item_bytes=1000)
    )
    big = item_of_size(2000)

    with pytest.raises(ItemTooLargeError) as info:
        await session.add_items([user("first"), big, user("third")])

    assert isinstance(info.value, InvalidItemError)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "items[1]" in message
    assert "max_item_bytes" in message
    assert {2000, 1000} <= numbers_in(message), message
    assert await session.get_items() == []
    with session.store.read() as repos:
        assert repos.conversations.get(conversation_id) is None


async def test_items_up_to_the_limit_are_stored_and_one_byte_more_is_not(
    database_url: str, conversation_id: str
) -> None:
    session = PostgreSQLSession(
        conversation_id, database_url=database_url, settings=load_settings(max_item_bytes=1000)
    )
    just_under, at_limit, over = item_of_size(999), item_of_size(1000), item_of_size(1001)

    await session.add_items([just_under, at_limit])
    with pytest.raises(ItemTooLargeError, match=r"items\[0\]"):
        await session.add_items([over])

    assert await session.get_items() == [just_under, at_limit]


def test_the_repository_api_takes_the_limit_as_an_argument(
    database_url: str, conversation_id: str
) -> None:
    store = get_store(database_url)
    with pytest.raises(ItemTooLargeError, match=r"items\[1\]"), store.transaction() as repos:
        repos.messages.append(
            conversation_id, [user("small"), item_of_size(2000)], max_item_bytes=1000
        )
    with store.read() as repos:
        assert repos.messages.count(conversation_id) == 0
        assert repos.conversations.get(conversation_id) is None


async def test_the_limit_is_per_item_not_per_call(database_url: str, conversation_id: str) -> None:
    session = PostgreSQLSession(
        conversation_id, database_url=database_url, settings=load_settings(max_item_bytes=1000)
    )
    items = [item_of_size(900) for _ in range(10)]  # 9,000 bytes in one call

    await session.add_items(items)

    assert await session.get_items() == items


@pytest.mark.parametrize(("character", "width"), [("é", 2), ("€", 3), ("\U0001f680", 4)])
async def test_the_limit_counts_utf8_bytes_not_characters(
    database_url: str, conversation_id: str, character: str, width: int
) -> None:
    session = PostgreSQLSession(
        conversation_id, database_url=database_url, settings=load_settings(max_item_bytes=1000)
    )
    item = user(character * 400)  # 428 characters, but 828 to 1,628 bytes
    assert len(json.dumps(item, ensure_ascii=False, separators=(",", ":"))) < 1000

    if encoded_size(item) > 1000:
        with pytest.raises(ItemTooLargeError):
            await session.add_items([item])
        assert await session.get_items() == []
    else:
        await session.add_items([item])
        assert await session.get_items() == [item]
    assert (encoded_size(item) > 1000) == (width > 2)


async def test_max_item_bytes_is_read_from_the_environment(
    database_url: str, conversation_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTS_SESSIONS_MAX_ITEM_BYTES", "1000")
    assert load_settings().max_item_bytes == 1000

    session = PostgreSQLSession(conversation_id, database_url=database_url)  # settings from env
    with pytest.raises(ItemTooLargeError, match="max_item_bytes"):
        await session.add_items([item_of_size(2000)])
    await session.add_items([item_of_size(1000)])
    assert await session.get_items() == [item_of_size(1000)]


@pytest.mark.parametrize("value", [0, -1, -(2**40)])
def test_a_max_item_bytes_below_one_is_a_configuration_error(value: int) -> None:
    with pytest.raises(ConfigurationError, match="max_item_bytes"):
        load_settings(max_item_bytes=value)


@pytest.mark.parametrize("value", ["0", "-5", "abc", "1.5", "16MiB"])
def test_a_bad_max_item_bytes_in_the_environment_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("AGENTS_SESSIONS_MAX_ITEM_BYTES", value)
    with pytest.raises(ConfigurationError, match="max_item_bytes"):
        load_settings()
    with pytest.raises(ConfigurationError, match="max_item_bytes"):
        PostgreSQLSession("c")
