"""The facade's single statements on event-loop-driven asynchronous connections.

``get_items`` and ``add_items`` run on psycopg2 asynchronous connections of the
caller's event loop (``agents_sessions.loop_statements``); transactions stay on the
synchronous engine. These tests hold that path to what the synchronous pool
guaranteed: one ceiling on connections for both pools, pool timeouts, liveness,
dead connections replaced and calls retried, the connect hooks, cancellation
leaving all or nothing, fork safety, several event loops, disposal. Everything
is checked against the real server (``pg_stat_activity`` for what it sees).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from agents_sessions import (
    ConnectionLostError,
    PoolTimeoutError,
    PostgreSQLSession,
    StatementTimeoutError,
    dispose_all,
    get_store,
    load_settings,
)
from agents_sessions.db.async_pool import AsyncPools
from agents_sessions.loop_statements import runs_on_loop
from tests.conftest import PostgresServer
from tests.support.server_stats import sessions_opened

pytestmark = [
    pytest.mark.postgres_only,
    pytest.mark.direct_connection_only(
        "counts and kills the pools' server backends, which a transaction-pooling proxy hides"
    ),
    pytest.mark.not_on_citus(
        "the loop path is off on a Citus store (tests/citus/test_single_shard.py checks that)"
    ),
]


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def with_query(url: str, query: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{query}"


@pytest.fixture
def admin(postgres_server: PostgresServer) -> Iterator[Engine]:
    """An engine on the maintenance database (pg_stat_activity, pg_terminate_backend)."""
    engine = create_engine(postgres_server.admin_url, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


def app_url(postgres_server: PostgresServer, query: str = "") -> tuple[str, str]:
    """A fresh database's URL whose connections carry an application_name of their own."""
    name = f"loop-{uuid.uuid4().hex[:12]}"
    url = with_query(postgres_server.create_database(), f"application_name={name}")
    return (with_query(url, query) if query else url), name


def backends(admin: Engine, application_name: str) -> list[int]:
    """The server process ids of the client backends with ``application_name``."""
    with admin.connect() as connection:
        return list(
            connection.execute(
                text(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = :name "
                    "AND backend_type = 'client backend'"
                ),
                {"name": application_name},
            ).scalars()
        )


def pools_of(session: PostgreSQLSession) -> AsyncPools:
    session.store.ensure_schema()  # the loop's pools apply once the schema check has run
    pools = session.store.async_pools
    assert pools is not None, "the event-loop path does not apply"
    return pools


class Blocker:
    """A transaction of our own holding ``LOCK TABLE messages``: hot statements wait on it."""

    def __init__(self, url: str) -> None:
        self._engine = create_engine(make_url(url).set(query={}))
        self._connection = self._engine.connect()
        self._transaction = self._connection.begin()
        self._connection.execute(text("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE"))

    def release(self) -> None:
        self._transaction.rollback()
        self._connection.close()
        self._engine.dispose()


async def wait_until_waiting_on_lock(admin: Engine, application_name: str) -> None:
    """Until one of our backends waits for a lock (the call is in flight on the server)."""
    query = text(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = :name "
        "AND wait_event_type = 'Lock'"
    )
    for _ in range(2000):
        with admin.connect() as connection:
            if connection.execute(query, {"name": application_name}).scalar_one():
                return
        await asyncio.sleep(0.005)
    raise AssertionError("the call never reached the server")


# ----------------------------------------------------------------- the path itself


async def test_hot_calls_run_on_the_loop_and_transactions_on_the_engine(
    postgres_server: PostgresServer,
) -> None:
    url, _ = app_url(postgres_server)
    session = PostgreSQLSession("c", database_url=url)
    store = session.store
    assert await runs_on_loop(store, None)
    assert not await runs_on_loop(store, "tenant-a")  # row-level security: the engine's path

    await session.add_items([user("a"), user("b")])
    assert await session.get_items() == [user("a"), user("b")]
    assert await session.get_items(limit=1) == [user("b")]
    # Hot calls checked nothing out of the engine's pool (nor does a pop's common
    # case: one round trip on the loop)...
    assert await session.pop_item() == user("b")
    assert store.pool.checkedout() == 0
    assert await session.get_items() == [user("a")]
    # ...and transactions run there: the pop of the last item, then the branch-aware
    # pop that finds the conversation empty.
    assert await session.pop_item() == user("a")
    assert await session.pop_item() is None
    assert await session.get_items() == []


async def test_the_loop_path_is_off_with_echo(postgres_server: PostgresServer) -> None:
    url, _ = app_url(postgres_server)
    session = PostgreSQLSession("c", database_url=url, settings=load_settings(echo=True))
    await session.add_items([user("a")])
    assert await session.get_items() == [user("a")]
    assert session.store.schema_ready and session.store.async_pools is None


# ----------------------------------------------------------------- one ceiling


def test_thousand_concurrent_conversations_stay_within_one_ceiling_for_both_pools(
    postgres_server: PostgresServer, admin: Engine
) -> None:
    # pool_size + max_overflow = 8 for the engine's pool and the loop's together.
    url, name = app_url(postgres_server, "pool_size=4&max_overflow=4&pool_timeout=60")
    get_store(url).ensure_schema()
    seen: list[int] = []
    stop = threading.Event()

    def watch_server() -> None:
        while not stop.is_set():
            seen.append(len(backends(admin, name)))
            time.sleep(0.005)

    async def conversation(index: int) -> int:
        session = PostgreSQLSession(f"conv-{index}", database_url=url)
        errors = 0
        for turn in range(3):
            try:
                await session.get_items(limit=20)
                await session.add_items([user(f"{index}.{turn}"), user(f"{index}.{turn}+")])
            except Exception:
                errors += 1
        return errors

    async def popper() -> int:
        # Transactions on the engine's pool meanwhile (its one kept connection).
        session = PostgreSQLSession("popped", database_url=url)
        await session.add_items([user(f"{i}") for i in range(30)])
        return sum([await session.pop_item() is not None for _ in range(30)])

    async def main() -> list[int]:
        popped = asyncio.ensure_future(popper())
        errors = list(await asyncio.gather(*(conversation(i) for i in range(1000))))
        assert await popped == 30
        return errors

    watcher = threading.Thread(target=watch_server, daemon=True)
    watcher.start()
    try:
        errors = asyncio.run(main())
    finally:
        stop.set()
        watcher.join(timeout=30)

    assert sum(errors) == 0
    assert seen and max(seen) <= 8, f"the server saw {max(seen)} connections"
    assert max(seen) >= 2, "the pools were never under concurrent load"
    budget = get_store(url).async_pools.budget  # type: ignore[union-attr]
    assert budget.open <= 8

    async def check() -> None:
        for index in (0, 1, 999):
            items = await PostgreSQLSession(f"conv-{index}", database_url=url).get_items()
            assert items == [user(f"{index}.{t}{plus}") for t in range(3) for plus in ("", "+")]

    asyncio.run(check())


async def test_a_hot_call_waits_for_a_slot_and_times_out_as_pool_timeout(
    postgres_server: PostgresServer,
) -> None:
    url, _ = app_url(postgres_server, "pool_size=2&max_overflow=0&pool_timeout=0.5")
    store = get_store(url)
    store.ensure_schema()
    session = PostgreSQLSession("c", database_url=url)

    # Both slots, held by the engine's pool.
    with (
        store.engine.connect(),
        store.engine.connect(),
        pytest.raises(PoolTimeoutError, match="pool_timeout"),
    ):
        await session.get_items()
    # Handed back: the loop's call gets a slot (the idle connections give way).
    await session.add_items([user("a")])
    assert await session.get_items() == [user("a")]


async def test_a_transaction_waits_for_a_slot_the_loop_holds_and_times_out(
    postgres_server: PostgresServer, admin: Engine
) -> None:
    url, name = app_url(postgres_server, "pool_size=2&max_overflow=0&pool_timeout=0.5")
    store = get_store(url)
    session = PostgreSQLSession("c", database_url=url)
    await session.add_items([user("a")])

    blocker = Blocker(url)
    try:
        # The loop's connection waits for the lock, holding one slot; the test holds
        # the engine's other one: a pop finds none.
        adding = asyncio.ensure_future(session.add_items([user("b")]))
        await wait_until_waiting_on_lock(admin, name)
        with store.engine.connect(), pytest.raises(PoolTimeoutError):
            await session.pop_item()
    finally:
        blocker.release()
    await adding
    assert await session.get_items() == [user("a"), user("b")]


async def test_a_blocking_call_on_the_loops_thread_never_waits_for_that_loop(
    postgres_server: PostgresServer, admin: Engine
) -> None:
    # The loop's connections are all in statements the blocked loop cannot finish;
    # the engine's last slot is never theirs, so the blocking call still runs.
    url, name = app_url(postgres_server, "pool_size=3&max_overflow=0&pool_timeout=5")
    store = get_store(url)
    session = PostgreSQLSession("c", database_url=url)
    await session.add_items([user("a")])
    blocker = Blocker(url)
    try:
        adding = [
            asyncio.ensure_future(PostgreSQLSession(f"c{i}", database_url=url).get_items())
            for i in range(5)
        ]
        await wait_until_waiting_on_lock(admin, name)
        with store.read() as repos:  # blocks the loop, on purpose
            assert repos.conversations.get("c") is not None
    finally:
        blocker.release()
    assert await asyncio.gather(*adding) == [[]] * 5


async def test_with_two_slots_the_two_pools_take_turns_without_starving(
    postgres_server: PostgresServer,
) -> None:
    url, _ = app_url(postgres_server, "pool_size=2&max_overflow=0&pool_timeout=5")
    session = PostgreSQLSession("c", database_url=url)
    budget = pools_of(session).budget
    for turn in range(5):
        await session.add_items([user(f"{turn}"), user(f"{turn}+")])  # the loop's pool
        assert await session.pop_item() == user(f"{turn}+")  # the engine's pool
        assert budget.open <= 2
    assert await session.get_items() == [user(f"{turn}") for turn in range(5)]


async def test_threads_calling_steadily_beside_a_busy_loop_keep_their_connections(
    postgres_server: PostgresServer, admin: Engine
) -> None:
    # The loop wants every slot (50 conversations, a ceiling of 8) while two callers
    # run transactions on the worker threads (clear_session) one after another. The
    # engine's pool keeps the connections the threads keep using rather than trade a
    # slot with the loop for each call: each trade closes a connection on one side
    # and opens one on the other (before: hundreds opened in this test).
    url, _ = app_url(postgres_server, "pool_size=4&max_overflow=4&pool_timeout=30")
    database = make_url(url).database
    assert database is not None
    get_store(url).ensure_schema()
    opened_before = sessions_opened(admin, database)

    async def turns(index: int) -> None:
        session = PostgreSQLSession(f"loop-{index}", database_url=url)
        for turn in range(20):
            await session.get_items(limit=20)
            await session.add_items([user(f"{turn}"), user(f"{turn}+")])

    async def transactions(index: int) -> None:
        session = PostgreSQLSession(f"thread-{index}", database_url=url)
        for _ in range(50):
            await session.add_items([user("x")])
            await session.clear_session()

    await asyncio.gather(*(turns(i) for i in range(50)), *(transactions(i) for i in range(2)))
    dispose_all()  # closed sessions are counted for sure
    opened = sessions_opened(admin, database) - opened_before
    assert opened <= 2 * 8, f"{opened} server connections opened for a ceiling of 8"
    for index in (0, 49):
        session = PostgreSQLSession(f"loop-{index}", database_url=url)
        assert len(await session.get_items()) == 40


async def test_with_a_ceiling_of_one_the_session_stays_on_the_worker_threads(
    postgres_server: PostgresServer,
) -> None:
    url, _ = app_url(postgres_server, "pool_size=1&max_overflow=0")
    session = PostgreSQLSession("c", database_url=url)
    session.store.ensure_schema()
    assert session.store.async_pools is None
    await session.add_items([user("a")])
    assert await session.get_items() == [user("a")]


# ----------------------------------------------------------------- liveness, dead connections


def terminate(admin: Engine, application_name: str) -> int:
    with admin.connect() as connection:
        return int(
            connection.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = :name AND backend_type = 'client backend'"
                ),
                {"name": application_name},
            ).scalar_one()
        )


async def wait_for_no_backends(admin: Engine, application_name: str) -> None:
    for _ in range(1000):
        if not backends(admin, application_name):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("terminated backends did not go away")


async def test_an_idle_connection_killed_by_the_server_is_replaced_before_use(
    postgres_server: PostgresServer, admin: Engine
) -> None:
    url, name = app_url(postgres_server)
    # No retries: the call must succeed on its first attempt, on a fresh connection.
    session = PostgreSQLSession("c", database_url=url, settings=load_settings(retry_attempts=0))
    await session.add_items([user("a")])
    before = set(backends(admin, name))
    assert terminate(admin, name) >= 1
    await wait_for_no_backends(admin, name)

    assert await session.get_items() == [user("a")]
    await session.add_items([user("b")])
    assert not before & set(backends(admin, name))


async def test_a_connection_killed_mid_append_is_retried_and_stores_the_items_once(
    postgres_server: PostgresServer, admin: Engine
) -> None:
    url, name = app_url(postgres_server)
    session = PostgreSQLSession("c", database_url=url)
    await session.add_items([user("a")])
    blocker = Blocker(url)
    try:
        adding = asyncio.ensure_future(session.add_items([user("b"), user("c")]))
        await wait_until_waiting_on_lock(admin, name)
        assert terminate(admin, name) >= 1
    finally:
        blocker.release()
    await adding  # retried on a fresh connection with the same key
    assert await session.get_items() == [user("a"), user("b"), user("c")]


async def test_a_lost_append_without_retries_is_connection_lost_with_its_key(
    postgres_server: PostgresServer, admin: Engine
) -> None:
    url, name = app_url(postgres_server)
    session = PostgreSQLSession("c", database_url=url, settings=load_settings(retry_attempts=0))
    await session.add_items([user("a")])
    blocker = Blocker(url)
    try:
        adding = asyncio.ensure_future(session.add_items([user("b")]))
        await wait_until_waiting_on_lock(admin, name)
        terminate(admin, name)
        with pytest.raises(ConnectionLostError) as lost:
            await adding
    finally:
        blocker.release()
    key = lost.value.idempotency_key
    assert key is not None
    await session.add_items([user("b")], idempotency_key=key)
    await session.add_items([user("b")], idempotency_key=key)
    assert await session.get_items() == [user("a"), user("b")]


async def test_server_errors_on_the_loop_are_the_same_exception_classes(
    postgres_server: PostgresServer, admin: Engine
) -> None:
    url, name = app_url(postgres_server)
    settings = load_settings(statement_timeout_ms=200, retry_attempts=0)
    session = PostgreSQLSession("c", database_url=url, settings=settings)
    await session.add_items([user("a")])
    blocker = Blocker(url)
    try:
        with pytest.raises(StatementTimeoutError):
            await session.get_items()
    finally:
        blocker.release()
    # The connection survived its statement's error and serves the next call.
    before = set(backends(admin, name))
    assert await session.get_items() == [user("a")]
    assert set(backends(admin, name)) == before


# ----------------------------------------------------------------- connect hooks


async def test_async_connections_connect_as_the_engine_does(
    postgres_server: PostgresServer,
) -> None:
    url, name = app_url(postgres_server, "keepalives_idle=7")
    settings = load_settings(statement_timeout_ms=4321, lock_timeout_ms=1234)
    session = PostgreSQLSession("c", database_url=url, settings=settings)
    await session.get_items()
    pools = pools_of(session)
    pool, connection = await pools.checkout()
    try:
        on_loop = connection.driver.get_dsn_parameters()
    finally:
        pool.release(connection, reusable=True)
    with session.store.engine.connect() as sync:
        on_engine = sync.connection.dbapi_connection.get_dsn_parameters()  # type: ignore[union-attr]
    assert on_loop == on_engine
    assert on_loop["application_name"] == name
    assert on_loop["keepalives_idle"] == "7"
    assert "statement_timeout=4321" in on_loop["options"]
    assert "lock_timeout=1234" in on_loop["options"]


# ----------------------------------------------------------------- cancellation


async def test_a_cancelled_add_items_stores_all_of_its_items(
    postgres_server: PostgresServer, admin: Engine
) -> None:
    url, name = app_url(postgres_server)
    session = PostgreSQLSession("c", database_url=url)
    await session.add_items([user("a")])
    blocker = Blocker(url)
    try:
        adding = asyncio.ensure_future(session.add_items([user(f"{i}") for i in range(50)]))
        await wait_until_waiting_on_lock(admin, name)
        adding.cancel()
        await asyncio.sleep(0.05)
        assert not adding.done()  # a started write is finished first
    finally:
        blocker.release()
    with pytest.raises(asyncio.CancelledError):
        await adding
    assert await session.get_items() == [user("a")] + [user(f"{i}") for i in range(50)]


async def test_a_cancelled_read_closes_its_connection_and_the_next_call_works(
    postgres_server: PostgresServer, admin: Engine
) -> None:
    url, name = app_url(postgres_server)
    session = PostgreSQLSession("c", database_url=url)
    await session.add_items([user("a")])
    budget = pools_of(session).budget
    blocker = Blocker(url)
    try:
        reading = asyncio.ensure_future(session.get_items())
        await wait_until_waiting_on_lock(admin, name)
        open_before = budget.open
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
        # Its protocol state unknown, the connection was closed, not pooled.
        assert budget.open == open_before - 1
    finally:
        blocker.release()
    assert await session.get_items() == [user("a")]


# ----------------------------------------------------------------- processes, loops, disposal


def _child_turn(url: str, queue: Any) -> None:
    async def turn() -> list[Any]:
        session = PostgreSQLSession("child", database_url=url)
        await session.add_items([user("from the child")])
        return await session.get_items()

    queue.put(asyncio.run(turn()))


async def test_a_forked_child_never_uses_or_closes_the_parents_connections(
    postgres_server: PostgresServer, admin: Engine
) -> None:
    url, name = app_url(postgres_server)
    session = PostgreSQLSession("parent", database_url=url)
    await session.add_items([user("a")])
    parents = set(backends(admin, name))
    assert parents

    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_turn, args=(url, queue))
    child.start()
    result = await asyncio.get_running_loop().run_in_executor(None, queue.get, True, 60)
    await asyncio.get_running_loop().run_in_executor(None, child.join, 60)

    assert result == [user("from the child")]
    assert child.exitcode == 0
    # The parent's backends survived the child (it closed none of them)...
    assert parents <= set(backends(admin, name))
    # ...and serve the parent without a reconnect.
    assert await session.get_items() == [user("a")]
    assert parents <= set(backends(admin, name))


def test_asyncio_run_twice_and_a_loop_per_thread_each_get_their_own_connections(
    postgres_server: PostgresServer, admin: Engine
) -> None:
    url, name = app_url(postgres_server, "pool_size=2&max_overflow=2")

    async def turns(conversation: str) -> list[Any]:
        session = PostgreSQLSession(conversation, database_url=url)
        for turn in range(20):
            await session.add_items([user(f"{turn}")])
            await session.get_items(limit=5)
        return await session.get_items()

    assert len(asyncio.run(turns("first"))) == 20
    assert len(asyncio.run(turns("second"))) == 20  # a new loop: the first's pool is unusable

    results: dict[int, Any] = {}

    def in_thread(index: int) -> None:
        try:
            results[index] = asyncio.run(turns(f"thread-{index}"))
        except BaseException as exc:  # reported below
            results[index] = exc

    threads = [threading.Thread(target=in_thread, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(isinstance(result, list) and len(result) == 20 for result in results.values())
    assert len(results) == 4
    assert len(backends(admin, name)) <= 4


def test_dispose_all_closes_the_loops_connections_too(
    postgres_server: PostgresServer, admin: Engine
) -> None:
    url, name = app_url(postgres_server)

    async def turn() -> None:
        session = PostgreSQLSession("c", database_url=url)
        await asyncio.gather(*(session.get_items() for _ in range(5)))

    asyncio.run(turn())
    assert backends(admin, name)
    dispose_all()
    for _ in range(500):
        if not backends(admin, name):
            break
        time.sleep(0.01)
    assert backends(admin, name) == []


async def test_store_dispose_closes_idle_loop_connections_and_the_store_stays_usable(
    postgres_server: PostgresServer, admin: Engine
) -> None:
    url, name = app_url(postgres_server)
    session = PostgreSQLSession("c", database_url=url)
    await session.add_items([user("a")])
    before = set(backends(admin, name))
    session.store.dispose()
    await asyncio.sleep(0)
    assert await session.get_items() == [user("a")]
    # A closed connection's server process exits a moment after the client closed
    # its socket: wait (bounded) for the old ones to leave pg_stat_activity.
    for _ in range(500):
        if not before & set(backends(admin, name)):
            break
        await asyncio.sleep(0.01)
    assert not before & set(backends(admin, name))


async def test_a_call_cancelled_while_its_connection_opens_leaks_no_slot(
    postgres_server: PostgresServer,
) -> None:
    url, _ = app_url(postgres_server)
    session = PostgreSQLSession("c", database_url=url)
    session.store.ensure_schema()
    budget = pools_of(session).budget
    held_by_engine = budget.open
    for _ in range(5):
        reading = asyncio.ensure_future(session.get_items())
        await asyncio.sleep(0)  # started: the connect is under way in a thread
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
    # Each connection the threads opened is closed once it arrives, its slot freed.
    for _ in range(1000):
        if budget.open == held_by_engine:
            break
        await asyncio.sleep(0.01)
    assert budget.open == held_by_engine
    assert await session.get_items() == []
