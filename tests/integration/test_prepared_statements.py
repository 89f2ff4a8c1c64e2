"""Hot statements prepared on the event loop's connections, and the way back to plain text.

A statement is prepared on a connection by its first call there (``PREPARE``, then
``EXECUTE``) and executed by name afterwards. Where a statement
reaches a server connection that does not hold its name (as behind a
transaction-pooling proxy), or one that holds the name already, nothing runs; the
call is sent as text and the pools prepare no more. Checked on the connection itself
(``pg_prepared_statements`` is per server session).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from sqlalchemy.exc import DBAPIError

from agents_sessions import PostgreSQLSession
from agents_sessions.db.async_connection import AsyncConnection
from agents_sessions.db.async_pool import AsyncPools
from agents_sessions.db.common_case import (
    POP_UNSHARED,
    VIEW_ALL_UNFORKED,
    VIEW_LATEST_UNFORKED,
)
from agents_sessions.db.hot_path import HotStatement
from agents_sessions.db.prepared import prepared_form
from agents_sessions.db.statements import POSTGRES_APPEND, POSTGRES_APPEND_COMMON_CASE
from tests.conftest import PostgresServer

pytestmark = [
    pytest.mark.postgres_only,
    pytest.mark.direct_connection_only(
        "holds one server connection to look at its prepared statements, which a "
        "transaction-pooling proxy does not give"
    ),
    pytest.mark.not_on_citus(
        "the loop path is off on a Citus store (tests/citus/test_single_shard.py checks that)"
    ),
]


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def one_connection_session(postgres_server: PostgresServer) -> PostgreSQLSession:
    # A ceiling of two: the loop keeps one connection (one slot stays the engine's).
    url = f"{postgres_server.create_database()}?pool_size=1&max_overflow=1"
    return PostgreSQLSession(f"c-{uuid.uuid4().hex[:8]}", database_url=url)


def pools_of(session: PostgreSQLSession) -> AsyncPools:
    pools = session.store.async_pools
    assert pools is not None, "the event-loop path does not apply"
    return pools


async def on_the_loops_connection(session: PostgreSQLSession, sql: str) -> list[tuple[Any, ...]]:
    """Run ``sql`` on the connection the loop's calls use, and hand it back."""
    pools = pools_of(session)
    pool, connection = await pools.checkout()
    try:
        rows, _ = await connection.fetch(pool.loop, sql, None, 0)
    finally:
        pool.release(connection, reusable=True)
    return rows


def idle_connection(session: PostgreSQLSession) -> AsyncConnection:
    """The loop's one idle connection (white box: what it believes it has prepared)."""
    idle = list(pools_of(session).pool(asyncio.get_running_loop())._idle)
    assert len(idle) == 1
    return idle[0]


async def prepared_names(session: PostgreSQLSession) -> set[str]:
    rows = await on_the_loops_connection(session, "SELECT name FROM pg_prepared_statements")
    return {row[0] for row in rows}


async def test_each_hot_statement_is_prepared_once_on_the_connection(
    postgres_server: PostgresServer,
) -> None:
    session = one_connection_session(postgres_server)
    dialect = session.store.engine.dialect
    for turn in range(5):
        await session.add_items([user(f"q{turn}")])
        assert await session.get_items(limit=1) == [user(f"q{turn}")]
        assert await session.get_items() == [user(f"q{n}") for n in range(turn + 1)]
    assert await session.pop_item() == user("q4")
    assert await session.pop_item() == user("q3")
    names = await prepared_names(session)
    # The reads, the append (its lean form; the full one too if drawn) and the pop: each
    # prepared once -- a second PREPARE of a name would have failed (42P05) and
    # switched preparing off.
    hot = {
        prepared_form(statement, dialect).name
        for statement in (
            VIEW_LATEST_UNFORKED,
            VIEW_ALL_UNFORKED,
            POSTGRES_APPEND_COMMON_CASE,
            POSTGRES_APPEND,
            *POP_UNSHARED,
        )
    }
    assert pools_of(session).preparing.on
    assert names <= hot and len(names) >= 5
    assert prepared_form(VIEW_LATEST_UNFORKED, dialect).name in names
    # The pop's two statements, prepared each, sent together.
    assert {prepared_form(statement, dialect).name for statement in POP_UNSHARED} <= names
    assert idle_connection(session).prepared == names


async def test_hot_statements_are_planned_once_whatever_the_conversations_lengths(
    postgres_server: PostgresServer,
) -> None:
    # One conversation far longer than the other: left to its plan cache ('auto'), the
    # server plans each call of the read anew, as its first five custom plans cost less
    # than the generic plan's guess. Every call forces the generic plan for itself
    # (SET LOCAL), so no call pays for planning -- and the setting ends with the call.
    url = f"{postgres_server.create_database()}?pool_size=1&max_overflow=1"
    session = PostgreSQLSession("long", database_url=url)
    short = PostgreSQLSession("short", database_url=url)
    await session.add_items([user(f"q{n}") for n in range(500)])
    await short.add_items([user("s")])
    for _ in range(6):
        assert await session.get_items(limit=20) == [user(f"q{n}") for n in range(480, 500)]
        assert await short.get_items(limit=20) == [user("s")]
        await short.add_items([user("t")])
        assert await short.pop_item() == user("t")
    plans = await on_the_loops_connection(
        session,
        "SELECT name, generic_plans, custom_plans FROM pg_prepared_statements",
    )
    assert len(plans) >= 4
    assert all(custom == 0 and generic >= 1 for _, generic, custom in plans), plans
    assert await on_the_loops_connection(session, "SHOW plan_cache_mode") == [("auto",)]


async def test_a_statement_its_connection_no_longer_holds_is_sent_as_text_from_then_on(
    postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    session = one_connection_session(postgres_server)
    await session.add_items([user("a")])
    assert await session.get_items() == [user("a")]
    assert await prepared_names(session)
    # What a transaction-pooling proxy does: the next statement reaches a server
    # connection without the prepared statement (SQLSTATE 26000). (A read this
    # connection prepared above: an append might draw the full statement, new here.)
    await on_the_loops_connection(session, "DEALLOCATE ALL")
    assert await session.get_items() == [user("a")]
    assert not pools_of(session).preparing.on
    await session.add_items([user("b")])  # not stored twice, nor lost
    assert await session.get_items() == [user("a"), user("b")]
    assert await session.get_items(limit=1) == [user("b")]
    assert await prepared_names(session) == set()  # nothing prepared any more
    assert "transaction-pooling proxy" in caplog.text


async def test_a_name_taken_on_the_server_connection_never_runs_another_statement(
    postgres_server: PostgresServer,
) -> None:
    session = one_connection_session(postgres_server)
    await session.add_items([user("a"), user("b")])
    read = prepared_form(VIEW_LATEST_UNFORKED, session.store.engine.dialect).name
    # Taken by something else on this server connection (SQLSTATE 42P05 on PREPARE).
    await on_the_loops_connection(session, "DEALLOCATE ALL")
    await on_the_loops_connection(session, f"PREPARE {read} (text, integer) AS SELECT 1")
    idle_connection(session).prepared.clear()
    assert await session.get_items(limit=2) == [user("a"), user("b")]
    assert not pools_of(session).preparing.on


async def test_a_failing_first_execution_leaves_the_statement_prepared_and_known(
    postgres_server: PostgresServer,
) -> None:
    # PREPARE outlives a failed statement; the pool must know the name is taken,
    # or its next PREPARE would fail (42P05) and switch preparing off for nothing.
    session = one_connection_session(postgres_server)
    await session.add_items([user("a")])
    pools = pools_of(session)
    await on_the_loops_connection(session, "DEALLOCATE ALL")
    idle_connection(session).prepared.clear()
    bad = HotStatement(
        VIEW_LATEST_UNFORKED, {"conversation_id": session.session_id, "limit": -1}, True
    )
    pool, connection = await pools.checkout()
    with pytest.raises(DBAPIError, match="LIMIT must not be negative"):
        await pools.execute(pool, connection, bad)
    assert await session.get_items(limit=1) == [user("a")]
    assert pools.preparing.on
    read = prepared_form(VIEW_LATEST_UNFORKED, session.store.engine.dialect).name
    assert read in await prepared_names(session)
