"""The repository API: conversations, messages, usage; the seed's analytics SQL; indexes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import text

from agents_sessions import (
    InvalidArgumentError,
    InvalidConversationIdError,
    PostgreSQLSession,
    UsageEntry,
    get_store,
)
from agents_sessions.ops.analytics import SEED_QUERIES, run_seed_queries
from tests.conftest import PostgresServer


def user(text_: str) -> dict[str, str]:
    return {"role": "user", "content": text_}


def test_upsert_creates_then_updates_a_conversation(
    database_url: str, conversation_id: str
) -> None:
    store = get_store(database_url)
    with store.transaction() as repos:
        created = repos.conversations.upsert(
            conversation_id, user_id="alice", metadata={"channel": "web"}
        )
    assert created.id == conversation_id
    assert (created.user_id, created.metadata) == ("alice", {"channel": "web"})
    assert created.created_at.tzinfo is not None

    with store.transaction() as repos:
        kept = repos.conversations.upsert(conversation_id)  # nothing given: nothing replaced
        updated = repos.conversations.upsert(conversation_id, metadata={"channel": "sms"})
    assert (kept.user_id, kept.metadata) == ("alice", {"channel": "web"})
    assert (updated.user_id, updated.metadata) == ("alice", {"channel": "sms"})
    assert updated.created_at == created.created_at
    assert updated.updated_at >= created.updated_at

    with store.read() as repos:
        assert repos.conversations.get(conversation_id) == updated
        assert repos.conversations.get(conversation_id + "-missing") is None


async def test_conversations_without_metadata_store_an_empty_json_object(
    database_url: str, conversation_id: str
) -> None:
    session = PostgreSQLSession(conversation_id, database_url=database_url)
    await session.add_items([user("x")])
    with session.store.engine.connect() as connection:
        stored = connection.execute(
            text("SELECT metadata FROM conversations WHERE id = :c"), {"c": conversation_id}
        ).scalar_one()
    # jsonb comes back parsed on PostgreSQL; SQLite hands back the JSON text.
    assert stored in ({}, "{}"), stored


def test_a_failed_transaction_leaves_nothing(database_url: str, conversation_id: str) -> None:
    store = get_store(database_url)
    with pytest.raises(RuntimeError, match="boom"), store.transaction() as repos:
        repos.messages.append(conversation_id, [user("a"), user("b")])
        raise RuntimeError("boom")
    with store.read() as repos:
        assert repos.conversations.get(conversation_id) is None
        assert repos.messages.count(conversation_id) == 0


def test_message_repository_api(database_url: str, conversation_id: str) -> None:
    store = get_store(database_url)
    with store.transaction() as repos:
        assert repos.messages.append(conversation_id, [user(str(n)) for n in range(5)]) == 5
        assert repos.messages.append(conversation_id, []) == 0
    with store.read() as repos:
        assert repos.messages.count(conversation_id) == 5
        assert repos.messages.latest(conversation_id, 2) == [user("3"), user("4")]
        assert repos.messages.latest(conversation_id, 0) == []
        assert repos.messages.all(conversation_id) == [user(str(n)) for n in range(5)]
        records = repos.messages.records(conversation_id)
        assert [record.content for record in records] == ["0", "1", "2", "3", "4"]
        assert {record.role for record in records} == {"user"}
        assert [r.id for r in records] == sorted(r.id for r in records)
        page = repos.messages.records(conversation_id, after_id=records[1].id, limit=2)
        assert [record.content for record in page] == ["2", "3"]
    with store.transaction() as repos:
        assert repos.messages.pop_latest(conversation_id) == user("4")
        assert repos.messages.clear(conversation_id) == 4
        assert repos.messages.clear(conversation_id) == 0
        assert repos.messages.pop_latest(conversation_id) is None
    with store.read() as repos:
        assert repos.conversations.get(conversation_id) is not None  # kept by clear


def test_repository_arguments_are_validated(database_url: str) -> None:
    store = get_store(database_url)
    with store.read() as repos:
        with pytest.raises(InvalidConversationIdError):
            repos.messages.all("")
        with pytest.raises(InvalidArgumentError, match="limit"):
            repos.messages.latest("c", -1)
        with pytest.raises(InvalidArgumentError, match="limit"):
            repos.conversations.list_by_user("u", limit=0)
        with pytest.raises(InvalidArgumentError, match="cursor"):
            repos.conversations.list_by_user("u", after="not-a-cursor")
        with pytest.raises(InvalidConversationIdError, match="user_id"):
            repos.conversations.upsert("c", user_id="\x00")
    with pytest.raises(InvalidArgumentError, match="prompt_tokens"), store.transaction() as repos:
        repos.conversations.upsert("usage-validation")
        repos.usage.record("usage-validation", [UsageEntry(model="m", prompt_tokens=-1)])


def test_list_by_user_is_newest_first_with_keyset_pagination(
    database_url: str, conversation_id: str
) -> None:
    store = get_store(database_url)
    owner = f"owner-{conversation_id}"
    ids = [f"{conversation_id}-{n}" for n in range(7)]
    for conversation in ids:
        with store.transaction() as repos:
            repos.conversations.upsert(conversation, user_id=owner)
    with store.transaction() as repos:
        repos.conversations.upsert(f"{conversation_id}-other", user_id=f"other-{owner}")

    pages = []
    cursor = None
    with store.read() as repos:
        while True:
            page = repos.conversations.list_by_user(owner, limit=3, after=cursor)
            pages.append([record.id for record in page.conversations])
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
            if len(pages) == 1:
                # A conversation created mid-pagination must not shift later pages.
                with store.transaction() as writer:
                    writer.conversations.upsert(f"{conversation_id}-late", user_id=owner)
    assert [len(page) for page in pages] == [3, 3, 1]
    assert [cid for page in pages for cid in page] == list(reversed(ids))


def test_list_by_user_pages_correctly_through_equal_timestamps(
    database_url: str, conversation_id: str
) -> None:
    store = get_store(database_url)
    owner = f"tie-{conversation_id}"
    with store.transaction() as repos:  # one transaction: PostgreSQL's now() is equal for all
        for n in range(5):
            repos.conversations.upsert(f"{conversation_id}-{n}", user_id=owner)
    seen: list[str] = []
    cursor = None
    with store.read() as repos:
        while True:
            page = repos.conversations.list_by_user(owner, limit=2, after=cursor)
            seen += [record.id for record in page.conversations]
            if (cursor := page.next_cursor) is None:
                break
    assert sorted(seen) == sorted(f"{conversation_id}-{n}" for n in range(5))
    assert len(seen) == 5


async def test_delete_cascades_to_messages_and_usage(
    database_url: str, conversation_id: str
) -> None:
    session = PostgreSQLSession(conversation_id, database_url=database_url, user_id="del")
    await session.add_items([user("a"), user("b")])
    store = session.store
    with store.transaction() as repos:
        repos.usage.record(conversation_id, [UsageEntry(model="m", prompt_tokens=5)])
    with store.transaction() as repos:
        assert repos.conversations.delete(conversation_id) is True
        assert repos.conversations.delete(conversation_id) is False
    with store.engine.connect() as connection:
        for table in ("messages", "usage_logs"):
            count = connection.execute(
                text(f"SELECT count(*) FROM {table} WHERE conversation_id = :c"),
                {"c": conversation_id},
            ).scalar_one()
            assert count == 0, table
    assert await session.get_items() == []


async def test_session_never_reassigns_an_owned_conversation(
    database_url: str, conversation_id: str
) -> None:
    owner = PostgreSQLSession(conversation_id, database_url=database_url, user_id="first")
    await owner.add_items([user("mine")])
    intruder = PostgreSQLSession(conversation_id, database_url=database_url, user_id="second")
    await intruder.add_items([user("also")])
    with owner.store.read() as repos:
        record = repos.conversations.get(conversation_id)
    assert record is not None and record.user_id == "first"


async def test_session_metadata_is_stored_on_the_conversation(
    database_url: str, conversation_id: str
) -> None:
    session = PostgreSQLSession(
        conversation_id,
        database_url=database_url,
        user_id="meta-user",
        metadata={"channel": "web", "tags": ["a", "b"], "n": 1},
    )
    await session.add_items([user("hello")])
    with session.store.read() as repos:
        record = repos.conversations.get(conversation_id)
    assert record is not None
    assert record.metadata == {"channel": "web", "tags": ["a", "b"], "n": 1}


def test_usage_totals_by_model_user_and_conversation(
    backend: str, fresh_database_url: Callable[[], str]
) -> None:
    store = get_store(fresh_database_url())
    with store.transaction() as repos:
        repos.conversations.upsert("c1", user_id="alice")
        repos.conversations.upsert("c2", user_id="bob")
        repos.conversations.upsert("c3")
        repos.usage.record(
            "c1",
            [
                UsageEntry(model="gpt-a", prompt_tokens=10, completion_tokens=5),
                UsageEntry(model="gpt-b", prompt_tokens=100, completion_tokens=50),
            ],
        )
        repos.usage.record("c2", [UsageEntry(model="gpt-a", prompt_tokens=1, completion_tokens=1)])
        repos.usage.record("c3", [UsageEntry(model="gpt-a", prompt_tokens=2, requests=3)])
    with store.read() as repos:
        by_model = {row.key: row for row in repos.usage.totals_by_model()}
        by_user = {row.key: row for row in repos.usage.totals_by_user()}
        c1 = repos.usage.totals_for_conversation("c1")
        empty = repos.usage.totals_for_conversation("c-none")
        future = repos.usage.totals_by_model(since=datetime.now(timezone.utc) + timedelta(hours=1))
    assert (by_model["gpt-b"].total_tokens, by_model["gpt-a"].total_tokens) == (150, 19)
    assert by_model["gpt-a"].requests == 5
    assert by_model["gpt-a"].prompt_tokens == 13
    assert {key: row.total_tokens for key, row in by_user.items()} == {
        "alice": 165,
        "bob": 2,
        None: 2,
    }
    assert (c1.requests, c1.prompt_tokens, c1.completion_tokens, c1.total_tokens) == (
        2,
        110,
        55,
        165,
    )
    assert (empty.requests, empty.total_tokens) == (0, 0)
    assert future == []


def test_usage_since_respects_time_zones(
    backend: str, fresh_database_url: Callable[[], str]
) -> None:
    store = get_store(fresh_database_url())
    with store.transaction() as repos:
        repos.conversations.upsert("tz")
        repos.usage.record("tz", [UsageEntry(model="m", prompt_tokens=1)])
    india = timezone(timedelta(hours=5, minutes=30))
    a_minute_ago = datetime.now(india) - timedelta(minutes=1)
    in_a_minute = datetime.now(india) + timedelta(minutes=1)
    with store.read() as repos:
        assert [row.key for row in repos.usage.totals_by_model(since=a_minute_ago)] == ["m"]
        assert repos.usage.totals_by_model(since=in_a_minute) == []
        record = repos.conversations.get("tz")
    assert record is not None and record.created_at.utcoffset() == timedelta(0)


async def test_seed_analytics_sql_runs_verbatim(postgres_server: PostgresServer) -> None:
    # PostgreSQL only: the seed's SQL uses NOW() - INTERVAL.
    url = postgres_server.create_database()
    for owner, count in (("alice", 3), ("bob", 1)):
        session = PostgreSQLSession(f"{owner}-conv", database_url=url, user_id=owner)
        await session.add_items([user(str(n)) for n in range(count)])
    stale = PostgreSQLSession("stale-conv", database_url=url, user_id="carol")
    await stale.add_items([user("old")])
    store = stale.store
    with store.transaction() as repos:
        repos.usage.record(
            "alice-conv", [UsageEntry(model="gpt-x", prompt_tokens=7, completion_tokens=3)]
        )
        repos.connection.execute(
            text("UPDATE conversations SET updated_at = now() - interval '3 days' WHERE id = :c"),
            {"c": "stale-conv"},
        )
    with store.engine.connect() as connection:
        results = run_seed_queries(connection)
    assert set(results) == set(SEED_QUERIES)
    assert results["total_conversations"] == [{"count": 3}]
    assert results["active_conversations_24h"] == [{"count": 2}]
    top = [(row["user_id"], row["message_count"]) for row in results["top_users_by_message_count"]]
    assert top[0] == ("alice", 3)
    assert sorted(top) == [("alice", 3), ("bob", 1), ("carol", 1)]
    assert results["token_usage_by_model"] == [
        {"model": "gpt-x", "total_prompt_tokens": 7, "total_completion_tokens": 3}
    ]


def test_latest_items_is_an_index_scan_on_a_large_table(
    postgres_url: str, conversation_id: str
) -> None:
    store = get_store(postgres_url)
    session = PostgreSQLSession(conversation_id, database_url=postgres_url)
    asyncio.run(session.add_items([user("x")]))
    with store.engine.begin() as connection:
        # 200,000 rows in 2,000 other conversations, then fresh statistics.
        connection.execute(
            text(
                "INSERT INTO conversations (id) "
                "SELECT 'bulk-' || g FROM generate_series(1, 2000) g ON CONFLICT DO NOTHING"
            )
        )
        connection.execute(
            text(
                "INSERT INTO messages (conversation_id, role, content, item) "
                "SELECT 'bulk-' || (g % 2000 + 1), 'user', 'x', '{\"role\":\"user\"}' "
                "FROM generate_series(1, 200000) g"
            )
        )
        connection.execute(text("ANALYZE messages"))
    from agents_sessions.db.statements import POSTGRES_VIEW_LATEST

    compiled = POSTGRES_VIEW_LATEST.compile(dialect=store.engine.dialect)
    with store.engine.connect() as connection:
        plan = connection.exec_driver_sql(
            "EXPLAIN " + str(compiled), {"conversation_id": conversation_id, "limit": 20}
        ).scalars()
        plan_text = "\n".join(plan)
    # The history index, (conversation_id, branch_id, id), scanned backwards.
    assert "ix_messages_conversation_id_branch_id_id" in plan_text, plan_text
    assert "Seq Scan on messages" not in plan_text, plan_text


def test_iterating_a_users_conversations_walks_every_page_once_and_stops(
    database_url: str, conversation_id: str
) -> None:
    store = get_store(database_url)
    owner = f"walker-{conversation_id}"
    ids = [f"{conversation_id}-w{n}" for n in range(7)]
    for conversation in ids:
        with store.transaction() as repos:
            repos.conversations.upsert(conversation, user_id=owner)
    with store.read() as repos:
        walked = [record.id for record in repos.conversations.iter_by_user(owner, page_size=3)]
        everyone = {record.id for record in repos.conversations.iter_all(page_size=2)}
        last = repos.conversations.list_by_user(owner, limit=10)
        with pytest.raises(InvalidArgumentError, match="page_size"):
            repos.conversations.iter_by_user(owner, page_size=0)
    # Once, newest first, and finished: a loop feeding the last page's cursor
    # (None) back would have started over at the first page.
    assert walked == list(reversed(ids))
    assert set(ids) <= everyone
    assert last.is_last and last.next_cursor is None
