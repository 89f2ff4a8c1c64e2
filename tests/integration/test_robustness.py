"""Regressions found in review: lock order, lost connections, parallel first use, secrets,
isolation level, disposal, and validation at the edges."""

from __future__ import annotations

import asyncio
import os
import random
import threading
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import create_engine

from agents_sessions import (
    InvalidArgumentError,
    ItemTypeError,
    PostgreSQLSession,
    UsageEntry,
    dispose_all,
    get_store,
)
from agents_sessions.db.engine import parse_database_url
from tests.conftest import PostgresServer


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


async def test_deleting_conversations_while_they_are_used_never_deadlocks(
    postgres_url: str, conversation_id: str
) -> None:
    # Every writer locks the conversation row before message rows; pop and clear
    # used to take them the other way round and deadlocked against delete.
    ids = [f"{conversation_id}-{n}" for n in range(3)]
    store = get_store(postgres_url)
    errors: list[BaseException] = []
    rng = random.Random(7)

    async def worker(seed: int) -> None:
        local = random.Random(seed)
        for _ in range(40):
            target = local.choice(ids)
            session = PostgreSQLSession(target, database_url=postgres_url)
            action = local.choice(["add", "add", "pop", "clear", "delete"])
            try:
                if action == "add":
                    await session.add_items([user("x"), user("y")])
                elif action == "pop":
                    await session.pop_item()
                elif action == "clear":
                    await session.clear_session()
                else:
                    await asyncio.to_thread(_delete, store, target)
            except BaseException as exc:  # collected, asserted below
                errors.append(exc)

    await asyncio.gather(*(worker(rng.randrange(10**6)) for _ in range(10)))
    assert errors == []


def _delete(store: Any, conversation_id: str) -> None:
    with store.transaction() as repos:
        repos.conversations.delete(conversation_id)


async def test_killed_pooled_connections_are_replaced_before_the_next_call_uses_them(
    postgres_server: PostgresServer, conversation_id: str
) -> None:
    url = postgres_server.create_database() + "?pool_size=1&max_overflow=0"
    session = PostgreSQLSession(conversation_id, database_url=url)
    await session.add_items([user("before")])
    database = parse_database_url(url).url.database
    postgres_server.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE datname = '{database}' AND pid <> pg_backend_pid()"
    )
    # The only pooled connection is dead; the checkout notices (its socket turned
    # readable) and opens a new one before any statement is sent: no error at all.
    assert await session.get_items() == [user("before")]
    await session.add_items([user("after")])
    assert await session.get_items() == [user("before"), user("after")]
    assert session.store.pool.checkedout() == 0


def test_first_use_of_several_databases_at_once_in_one_process(
    backend: str, fresh_database_url: Callable[[], str]
) -> None:
    # Alembic's context is process-global: parallel auto-migrations must take turns.
    urls = [fresh_database_url() for _ in range(3)]
    errors: list[BaseException] = []

    def first_use(url: str) -> None:
        try:
            session = PostgreSQLSession("parallel", database_url=url)
            asyncio.run(session.add_items([user(url[-12:])]))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=first_use, args=(url,)) for url in urls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    for url in urls:
        items = asyncio.run(PostgreSQLSession("parallel", database_url=url).get_items())
        assert items == [user(url[-12:])]


async def test_a_password_given_as_a_query_parameter_is_never_shown(
    postgres_url: str, conversation_id: str
) -> None:
    url = postgres_url + "?password=Qu3ry-S3cret"  # trust auth: any password connects
    session = PostgreSQLSession(conversation_id, database_url=url)
    await session.add_items([user("connected")])
    assert "Qu3ry-S3cret" not in repr(session)
    assert "Qu3ry-S3cret" not in repr(session.store)
    assert "Qu3ry-S3cret" not in repr(session.store.engine)
    assert "Qu3ry-S3cret" not in session.store.target.safe_url
    assert session.store.target.url.password == "Qu3ry-S3cret"  # still reaches the driver


@pytest.mark.direct_connection_only(
    "a REPEATABLE READ database default is overridden by a session-level SET, which a "
    "transaction pooler does not keep; behind PgBouncer set default_transaction_isolation "
    "on the role or database instead"
)
def test_connections_use_read_committed_whatever_the_database_default(
    postgres_server: PostgresServer,
) -> None:
    url = postgres_server.create_database()
    database = parse_database_url(url).url.database
    postgres_server.execute(
        f"ALTER DATABASE \"{database}\" SET default_transaction_isolation = 'repeatable read'"
    )
    store = get_store(url)
    with store.read() as repos:
        level = repos.connection.exec_driver_sql("SHOW transaction_isolation").scalar_one()
    assert level == "read committed"

    async def contend() -> None:
        session = PostgreSQLSession("contended", database_url=url)
        await session.add_items([user(str(n)) for n in range(40)])

        async def adder() -> None:
            for n in range(20):
                await session.add_items([user(f"a{n}")])

        async def popper() -> None:
            for _ in range(20):
                await session.pop_item()

        await asyncio.gather(adder(), adder(), popper(), popper())

    asyncio.run(contend())  # REPEATABLE READ would raise serialization failures here


async def test_sessions_keep_working_after_dispose_all(
    database_url: str, conversation_id: str
) -> None:
    session = PostgreSQLSession(conversation_id, database_url=database_url)
    await session.add_items([user("before")])
    dispose_all()
    await session.add_items([user("after")])
    assert await session.get_items() == [user("before"), user("after")]


def test_usage_entries_are_validated_before_writing(
    database_url: str, conversation_id: str
) -> None:
    store = get_store(database_url)
    with store.transaction() as repos:
        repos.conversations.upsert(conversation_id)
    bad = [
        (UsageEntry(model="m\x00"), "model"),
        (UsageEntry(model=""), "model"),
        (UsageEntry(model="m", prompt_tokens=2**63), "prompt_tokens"),
        (UsageEntry(model="m", completion_tokens=-1), "completion_tokens"),
        (UsageEntry(model="m", run_id="r\x00"), "run_id"),
        (UsageEntry(model="m", response_id="\ud800"), "response_id"),
        (UsageEntry(model="m", requests=True), "requests"),
        # INTEGER columns: beyond 2**31-1 a clear error, not the database's.
        (UsageEntry(model="m", requests=2**31), r"requests must be between 0 and 2\*\*31-1"),
        (UsageEntry(model="m", run_id="r", request_index=2**31), "request_index"),
        (UsageEntry(model="m", run_id="r", request_index=-(2**31) - 1), "request_index"),
    ]
    for entry, field in bad:
        with pytest.raises(InvalidArgumentError, match=field), store.transaction() as repos:
            repos.usage.record(conversation_id, [UsageEntry(model="fine"), entry])
    with store.read() as repos:
        assert repos.usage.totals_for_conversation(conversation_id).requests == 0


def test_metadata_that_would_change_or_be_rejected_is_refused(database_url: str) -> None:
    store = get_store(database_url)
    cases: list[tuple[Any, type[Exception], str]] = [
        ({1: "int key"}, ItemTypeError, "non-string key"),
        ({"t": (1, 2)}, ItemTypeError, "tuple"),
        ({"s": "lone \ud800"}, InvalidArgumentError, "surrogate"),
        ({"n": "nul \x00"}, InvalidArgumentError, "NUL"),
        ({"f": float("nan")}, InvalidArgumentError, "nan"),
    ]
    for metadata, error, match in cases:
        with pytest.raises(error, match=match), store.transaction() as repos:
            repos.conversations.upsert("metadata-check", metadata=metadata)
    with store.read() as repos:
        assert repos.conversations.get("metadata-check") is None


def test_out_of_range_numbers_are_clear_errors_or_mean_everything(
    database_url: str, conversation_id: str
) -> None:
    store = get_store(database_url)
    with store.transaction() as repos:
        repos.messages.append(conversation_id, [user("a"), user("b")])
    with store.read() as repos:
        assert repos.messages.latest(conversation_id, 2**64) == [user("a"), user("b")]
        with pytest.raises(InvalidArgumentError, match="after_id"):
            repos.messages.records(conversation_id, after_id="abc")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError, match="after_id"):
            repos.messages.records(conversation_id, after_id=2**64)


def test_engine_repr_of_a_plain_url_hides_the_password() -> None:
    engine = create_engine(parse_database_url("postgresql://u:hunter2@h/db").url)
    assert "hunter2" not in repr(engine)
    engine.dispose()


async def test_sessions_work_when_the_process_holds_more_than_1024_descriptors(
    postgres_url: str, conversation_id: str
) -> None:
    # A busy server process holds many sockets; the dead-connection check must not
    # depend on select(), which cannot watch a descriptor above 1023.
    dispose_all()
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        session = PostgreSQLSession(conversation_id, database_url=postgres_url)
        await session.add_items([user("high fd")])
        assert await session.get_items() == [user("high fd")]
        assert session.store.pool.checkedin() >= 1
        with session.store.engine.connect() as connection:
            assert connection.connection.dbapi_connection.fileno() > 1023  # type: ignore[union-attr]
    finally:
        for descriptor in held:
            os.close(descriptor)
        dispose_all()
