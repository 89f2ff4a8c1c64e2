"""How the store runs statements: autocommit single statements on PostgreSQL, transactions."""

from __future__ import annotations

from typing import Any

import psycopg2.extensions
import pytest
from sqlalchemy import event

from agents_sessions import PostgreSQLSession, get_store
from tests.conftest import PostgresServer


@pytest.mark.not_on_citus(
    "where Citus is installed an append is a transaction of single-shard statements "
    "(tests/citus/test_single_shard.py checks those)"
)
def test_single_statement_calls_run_without_a_transaction_on_postgres(
    postgres_url: str, conversation_id: str
) -> None:
    store = get_store(postgres_url)
    with store.single_statement(write=True) as repos:
        driver = repos.connection.connection.dbapi_connection
        assert driver is not None
        repos.messages.append(conversation_id, [{"role": "user", "content": "x"}])
        # No BEGIN was sent: the statement was its own transaction, already committed.
        status = driver.get_transaction_status()
        assert status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
        assert driver.autocommit is True
    # Back in the pool in the normal transactional mode...
    assert driver.autocommit is False
    # ...and the write is visible to everyone.
    with store.read() as repos:
        assert repos.messages.count(conversation_id) == 1


def test_transactions_are_real_transactions_on_postgres(
    postgres_url: str, conversation_id: str
) -> None:
    store = get_store(postgres_url)
    with store.transaction() as repos:
        repos.messages.append(conversation_id, [{"role": "user", "content": "x"}])
        driver = repos.connection.connection.dbapi_connection
        assert driver is not None
        status = driver.get_transaction_status()
        assert status == psycopg2.extensions.TRANSACTION_STATUS_INTRANS
        with get_store(postgres_url).read() as other:
            assert other.messages.count(conversation_id) == 0  # not committed yet
    with store.read() as repos:
        assert repos.messages.count(conversation_id) == 1


def test_schema_is_checked_once_per_engine(database_url: str, conversation_id: str) -> None:
    from sqlalchemy import event

    store = get_store(database_url)
    store.ensure_schema()
    statements: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        statements.append(statement)

    event.listen(store.engine, "before_cursor_execute", record)
    try:
        with store.single_statement(write=False) as repos:
            repos.messages.latest(conversation_id, 5)
    finally:
        event.remove(store.engine, "before_cursor_execute", record)
    # Only the query itself (plus SQLite's BEGIN): no alembic_version lookup. On
    # SQLite the read starts with the current branch (and stops there: no such
    # conversation); on PostgreSQL the lean read of an unforked branch finds
    # nothing, which the general read then confirms.
    assert not any("alembic_version" in statement for statement in statements)
    reads = [s for s in statements if "FROM messages" in s or "FROM conversations" in s]
    assert len(reads) == (2 if store.dialect == "postgresql" else 1), statements


@pytest.mark.not_on_citus(
    "where Citus is installed an append is a transaction of single-shard statements "
    "(tests/citus/test_single_shard.py checks those)"
)
async def test_session_calls_skip_the_connection_wrapper_unless_someone_listens(
    postgres_server: PostgresServer, conversation_id: str
) -> None:
    """The hot path runs on the pooled driver connection, and steps aside for tracing."""
    url = postgres_server.create_database()
    session = PostgreSQLSession(conversation_id, database_url=url)
    await session.add_items([{"role": "user", "content": "warm"}])  # schema check done
    engine = session.store.engine
    connections: list[object] = []
    traced: list[str] = []

    def count_connection(connection: object) -> None:
        connections.append(connection)

    event.listen(engine, "engine_connect", count_connection)
    await session.add_items([{"role": "user", "content": "hot"}])
    assert await session.get_items(limit=1) == [{"role": "user", "content": "hot"}]
    assert connections == []  # no SQLAlchemy Connection was made for these calls
    # pop_item is a transaction (it keeps items other branches share), not a hot call.
    assert await session.pop_item() == {"role": "user", "content": "hot"}
    assert session.store.pool.checkedout() == 0

    def trace(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        traced.append(statement)

    # An instrumentation (tracing) listening to statements sees every one of them.
    event.listen(engine, "after_cursor_execute", trace)
    try:
        await session.add_items([{"role": "user", "content": "seen"}])
        assert await session.get_items(limit=1) == [{"role": "user", "content": "seen"}]
    finally:
        event.remove(engine, "after_cursor_execute", trace)
        event.remove(engine, "engine_connect", count_connection)
    assert len(traced) == 2
    assert "INSERT INTO messages" in traced[0]
