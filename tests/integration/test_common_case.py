"""The lean statements of the common case, and their hand-over to the general ones (PostgreSQL).

Each test records the SQL a real session sends (a cursor listener keeps the session
on its thread path, which runs the same statements as the event-loop path) and
checks both what is stored and which statements did it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event, text

from agents_sessions import PostgreSQLSession

# On Citus an append is a transaction of single-shard statements instead.
appends_are_lean = pytest.mark.not_on_citus(
    "where Citus is installed an append is a transaction of single-shard statements "
    "(tests/citus/test_single_shard.py checks those)"
)


def user(content: str) -> Any:
    return {"role": "user", "content": content}


def reply(content: str) -> Any:
    return {"role": "assistant", "content": content}


@contextmanager
def recorded(session: PostgreSQLSession) -> Iterator[list[str]]:
    statements: list[str] = []

    def record(*args: Any) -> None:
        statements.append(args[2])

    engine = session.store.engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", record)


def expire(session: PostgreSQLSession) -> None:
    with session.store.engine.begin() as connection:
        connection.execute(
            text("UPDATE conversations SET expires_at = now() - interval '1 second' WHERE id = :c"),
            {"c": session.session_id},
        )


@appends_are_lean
async def test_a_live_conversation_is_appended_read_and_popped_by_lean_statements(
    postgres_url: str, conversation_id: str
) -> None:
    session = PostgreSQLSession(conversation_id, database_url=postgres_url)
    await session.add_items([user("q1"), reply("a1")])
    with recorded(session) as statements:
        await session.add_items([user("q2"), reply("a2")])
        latest = await session.get_items(limit=3)
        everything = await session.get_items()
        popped = await session.pop_item()
    assert latest == [reply("a1"), user("q2"), reply("a2")]
    assert everything == [user("q1"), reply("a1"), user("q2"), reply("a2")]
    assert popped == reply("a2")
    assert await session.get_items() == [user("q1"), reply("a1"), user("q2")]
    append, read_latest, read_all, pop = statements
    # No expiry restart and no key clean-up in the append (unless this append drew
    # the clean-up, one in KEY_CLEANUP_ONE_IN: then it is the full statement alone).
    assert append.startswith("WITH conversation AS")
    assert "purged_messages" not in append or "expired_keys" in append
    assert "RECURSIVE" not in read_latest and "RECURSIVE" not in read_all
    # The pop: the conversation's lock, then the delete, in one round trip.
    assert pop.lstrip().startswith("UPDATE conversations") and "DELETE FROM messages" in pop


@appends_are_lean
async def test_an_expired_conversation_hands_the_append_to_the_full_statement(
    postgres_url: str, conversation_id: str
) -> None:
    session = PostgreSQLSession(conversation_id, database_url=postgres_url)
    await session.add_items([user("old"), reply("old answer")])
    expire(session)
    with recorded(session) as statements:
        assert await session.get_items() == []
        assert await session.pop_item() is None
        await session.add_items([user("new")])
    assert await session.get_items() == [user("new")]
    appends = [s for s in statements if "INSERT INTO messages" in s]
    # The lean append stores nothing on an expired conversation; the full one
    # restarts it (purging the old history). One append may have drawn the full
    # statement directly.
    assert len(appends) in (1, 2)
    assert "purged_messages" in appends[-1]
    if len(appends) == 2:
        assert "purged_messages" not in appends[0]


@appends_are_lean
async def test_a_repeated_key_is_answered_by_the_full_statement_and_stored_once(
    postgres_url: str, conversation_id: str
) -> None:
    session = PostgreSQLSession(conversation_id, database_url=postgres_url)
    await session.add_items([user("q1")], idempotency_key="call-1")
    with recorded(session) as statements:
        await session.add_items([user("q1")], idempotency_key="call-1")
    assert await session.get_items() == [user("q1")]
    assert len([s for s in statements if "INSERT INTO messages" in s]) in (1, 2)
    assert "purged_messages" in [s for s in statements if "INSERT INTO messages" in s][-1]


async def test_a_pop_of_an_item_a_child_branch_shares_takes_the_branch_aware_path(
    postgres_url: str, conversation_id: str
) -> None:
    session = PostgreSQLSession(conversation_id, database_url=postgres_url)
    await session.add_items([user("q1"), reply("a1"), user("q2"), reply("a2")])
    await session.create_branch_from_turn(2, "retry")  # shares q1, a1
    await session.add_items([user("q2 again")])
    await session.switch_to_branch("main")
    # The newest item of main (a2) is not shared: the lean pop takes it.
    with recorded(session) as statements:
        assert await session.pop_item() == reply("a2")
    assert not any("conversation_branches.branch_id" in s for s in statements)
    assert await session.pop_item() == user("q2")
    # a1 is shared with "retry": the lean pop declines, the branch-aware pop freezes
    # the shared rows for the child before main loses a1.
    with recorded(session) as statements:
        assert await session.pop_item() == reply("a1")
    assert len(statements) > 1
    assert await session.get_items() == [user("q1")]
    await session.switch_to_branch("retry")
    assert await session.get_items() == [user("q1"), reply("a1"), user("q2 again")]
    # On a forked branch the newest own item pops; then the inherited ones, which the
    # parent keeps.
    assert await session.pop_item() == user("q2 again")
    assert await session.pop_item() == reply("a1")
    assert await session.get_items() == [user("q1")]
    await session.switch_to_branch("main")
    assert await session.get_items() == [user("q1")]
