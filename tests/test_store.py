"""How the store runs statements: autocommit single statements on PostgreSQL, transactions."""

from __future__ import annotations

import psycopg2.extensions

from agents_sessions import get_store


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
    # Only the query itself (plus SQLite's BEGIN): no alembic_version lookup.
    assert not any("alembic_version" in statement for statement in statements)
    assert sum("FROM messages" in statement for statement in statements) == 1
