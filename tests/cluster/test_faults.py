"""Faults of a real server: killed backends, restarts, crashes, a kill mid-statement, a full pool.

Backends are killed on the shared test server (``pg_terminate_backend`` on a database
of this module's own); restarts and crashes happen on a throwaway server
(``throwaway_cluster``), never on the shared one. The caller never does anything
special after a fault: the next call must just work, and the history must be
exactly what was acknowledged -- nothing lost, nothing twice, nothing partial.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
from agents import Agent, Runner
from agents.testing import ScriptedModel, assistant_message
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from agents_sessions import (
    ConnectionLostError,
    DatabaseError,
    PoolTimeoutError,
    PostgreSQLSession,
    SessionStore,
    get_store,
)
from agents_sessions.db.engine import parse_database_url
from tests.conftest import PostgresServer
from tests.support.pgcluster import Cluster

pytestmark = pytest.mark.postgres_only

_T = TypeVar("_T")

#: Generous bound on anything that must not hang (a stuck call fails the test
#: instead of blocking the run); never an assertion on speed.
HANG_LIMIT = 60.0


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def with_query(url: str, query: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{query}"


def database_of(url: str) -> str:
    name = make_url(url).database
    assert name is not None
    return name


async def bounded(call: Awaitable[_T], what: str) -> _T:
    """Await ``call``, failing the test if it does not finish within HANG_LIMIT.

    Does not cancel ``call`` on the way (a session mutation settles before it
    honours a cancellation, so ``wait_for`` could itself hang).
    """
    task = asyncio.ensure_future(call)
    done, _ = await asyncio.wait({task}, timeout=HANG_LIMIT)
    if task not in done:
        task.cancel()
        pytest.fail(f"{what} did not finish within {HANG_LIMIT:g}s: it hung")
    return task.result()


def texts_of(items: list[Any]) -> list[str]:
    """The text of each message item, in order."""
    out: list[str] = []
    for item in items:
        content = item.get("content")
        if isinstance(content, list):
            out.append("".join(part.get("text", "") for part in content))
        else:
            out.append(str(content))
    return out


@pytest.fixture(scope="module")
def admin(postgres_server: PostgresServer) -> Iterator[Engine]:
    """Superuser connections to the shared server, outside every pool under test."""
    engine = create_engine(
        postgres_server.admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool
    )
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def fault_database(postgres_server: PostgresServer) -> str:
    """A database of this module's own: killing its backends touches no other test."""
    return postgres_server.create_database("agents_sessions_faults")


def kill_backends(admin: Engine, database: str, pids: list[int] | None = None) -> int:
    """Terminate the backends connected to ``database`` (all, or just ``pids``).

    Waits (up to 10 s each) until every backend is gone, so the kill has happened
    before the caller's next call -- the connections die *between* calls.
    """
    condition = "AND pid = ANY(:pids)" if pids is not None else ""
    with admin.connect() as connection:
        killed = connection.execute(
            text(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 10000)) "
                "FROM pg_stat_activity "
                f"WHERE datname = :database AND pid <> pg_backend_pid() {condition}"
            ),
            {"database": database, "pids": pids or []},
        ).scalar_one()
    return int(killed)


def fill_pool(store: SessionStore, size: int) -> None:
    """Open ``size`` connections at once and return them: the pool then holds ``size`` idle."""
    connections = [store.engine.connect() for _ in range(size)]
    for connection in connections:
        connection.exec_driver_sql("SELECT 1")
        connection.close()
    assert store.pool.checkedin() == size


def stored_rows(admin_url: str, conversation_id: str) -> list[str]:
    """Every stored message's content, straight from the table (duplicates included)."""
    engine = create_engine(parse_database_url(admin_url).url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return list(
                connection.execute(
                    text("SELECT content FROM messages WHERE conversation_id = :c ORDER BY id"),
                    {"c": conversation_id},
                ).scalars()
            )
    finally:
        engine.dispose()


# --------------------------------------------------------------- killed backends


OPERATIONS = ["get_items", "add_items", "pop_item", "clear_session"]


@pytest.mark.parametrize("operation", OPERATIONS)
async def test_the_first_call_after_every_pooled_connection_is_killed_succeeds(
    admin: Engine, fault_database: str, conversation_id: str, operation: str
) -> None:
    url = with_query(fault_database, "pool_size=3&max_overflow=0")
    session = PostgreSQLSession(conversation_id, database_url=url)
    history = [user("one"), user("two"), user("three")]
    await session.add_items(history[:2])
    await session.add_items(history[2:])
    fill_pool(session.store, 3)

    assert kill_backends(admin, database_of(url)) >= 3

    # No retry, reconnect or reset by the caller: the call just works.
    if operation == "get_items":
        assert await bounded(session.get_items(), operation) == history
    elif operation == "add_items":
        await bounded(session.add_items([user("four"), user("five")]), operation)
        history += [user("four"), user("five")]
    elif operation == "pop_item":
        # pop_item is never retried (it is not idempotent): it can only succeed if
        # the dead connection was replaced before the DELETE was sent.
        assert await bounded(session.pop_item(), operation) == user("three")
        history.pop()
    else:
        await bounded(session.clear_session(), operation)
        history = []

    # Every dead connection of the pool is replaced, not just the first one.
    reads = await asyncio.gather(*(session.get_items() for _ in range(6)))
    assert reads == [history] * 6
    assert stored_rows(fault_database, conversation_id) == [item["content"] for item in history]


async def test_history_stays_exact_through_repeated_kills_between_concurrent_calls(
    admin: Engine, fault_database: str, conversation_id: str
) -> None:
    url = with_query(fault_database, "pool_size=4&max_overflow=0")
    database = database_of(url)
    sessions = [PostgreSQLSession(f"{conversation_id}-{n}", database_url=url) for n in range(4)]
    expected: dict[str, list[dict[str, str]]] = {s.session_id: [] for s in sessions}
    kills = 0

    for round_number in range(4):
        batches = {
            s.session_id: [user(f"{s.session_id} r{round_number} a"), user(f"r{round_number} b")]
            for s in sessions
        }
        await bounded(
            asyncio.gather(*(s.add_items(batches[s.session_id]) for s in sessions)), "add_items"
        )
        for session in sessions:
            expected[session.session_id] += batches[session.session_id]
        kills += kill_backends(admin, database)

        popped = await bounded(asyncio.gather(*(s.pop_item() for s in sessions)), "pop_item")
        for session, item in zip(sessions, popped, strict=True):
            assert item == expected[session.session_id].pop()
        kills += kill_backends(admin, database)

        if round_number == 2:
            await bounded(sessions[0].clear_session(), "clear_session")
            expected[sessions[0].session_id] = []
            kills += kill_backends(admin, database)

        reads = await bounded(asyncio.gather(*(s.get_items() for s in sessions)), "get_items")
        assert reads == [expected[s.session_id] for s in sessions]
        kills += kill_backends(admin, database)

    assert kills >= 8, "the kills never met a pooled connection"
    for session in sessions:
        # Straight from the table: no duplicate hides behind a read that dedupes.
        assert stored_rows(fault_database, session.session_id) == [
            item["content"] for item in expected[session.session_id]
        ]


async def test_an_agent_conversation_continues_after_its_connections_are_killed(
    admin: Engine, fault_database: str, conversation_id: str
) -> None:
    url = with_query(fault_database, "pool_size=2&max_overflow=0")
    model = ScriptedModel([[assistant_message("Hi Ada!")], [assistant_message("You are Ada.")]])
    agent = Agent(name="assistant", model=model)
    session = PostgreSQLSession(conversation_id, database_url=url)

    await Runner.run(agent, "Hello, I am Ada", session=session)
    fill_pool(session.store, 2)
    assert kill_backends(admin, database_of(url)) >= 2

    second = await bounded(Runner.run(agent, "Who am I?", session=session), "Runner.run")

    assert second.final_output == "You are Ada."
    assert model.last_call is not None
    assert texts_of(model.last_call.input) == ["Hello, I am Ada", "Hi Ada!", "Who am I?"]
    stored = await session.get_items()
    assert texts_of(stored) == ["Hello, I am Ada", "Hi Ada!", "Who am I?", "You are Ada."]


# ------------------------------------------------------------ a kill mid-statement


class RowLock:
    """Hold a conversation's row lock from a connection of its own (as a slow writer would)."""

    def __init__(self, url: str, conversation_id: str) -> None:
        self._engine = create_engine(parse_database_url(url).url, poolclass=NullPool)
        self._connection = self._engine.connect()
        # Autobegun transaction: the lock lasts until release().
        self._connection.execute(
            text("SELECT id FROM conversations WHERE id = :c FOR UPDATE"), {"c": conversation_id}
        ).one()
        self.pid = int(self._connection.execute(text("SELECT pg_backend_pid()")).scalar_one())

    def blocked_pids(self, admin: Engine) -> list[int]:
        """Backends waiting for this lock right now."""
        with admin.connect() as connection:
            return list(
                connection.execute(
                    text(
                        "SELECT pid FROM pg_stat_activity "
                        "WHERE :holder = ANY(pg_blocking_pids(pid))"
                    ),
                    {"holder": self.pid},
                ).scalars()
            )

    def release(self) -> None:
        self._connection.rollback()
        self._connection.close()
        self._engine.dispose()


async def kill_each_blocked_attempt(
    lock: RowLock, admin: Engine, database: str, task: asyncio.Future[Any], *, max_kills: int
) -> int:
    """Terminate every backend that blocks on ``lock`` until ``task`` gives up.

    Returns how many backends were killed; fails the test if ``task`` outlives
    ``max_kills`` kills or HANG_LIMIT.
    """
    killed: set[int] = set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HANG_LIMIT
    while not task.done():
        if loop.time() > deadline:
            pytest.fail(f"the call neither finished nor blocked again within {HANG_LIMIT:g}s")
        fresh = [pid for pid in lock.blocked_pids(admin) if pid not in killed]
        if fresh:
            assert len(killed) < max_kills, f"still retrying after {len(killed)} kills"
            kill_backends(admin, database, fresh)
            killed.update(fresh)
        await asyncio.sleep(0.02)
    return len(killed)


async def wait_until_blocked(lock: RowLock, admin: Engine, task: asyncio.Future[Any]) -> list[int]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HANG_LIMIT
    while not (pids := lock.blocked_pids(admin)):
        assert not task.done(), f"the call did not wait for the row lock: {task!r}"
        if loop.time() > deadline:
            pytest.fail("the call never reached the row lock")
        await asyncio.sleep(0.02)
    return pids


async def test_an_append_killed_inside_its_statement_stores_nothing_and_raises(
    admin: Engine, fault_database: str, conversation_id: str
) -> None:
    session = PostgreSQLSession(conversation_id, database_url=fault_database)
    await session.add_items([user("kept")])
    doomed = [user(f"doomed {n}") for n in range(200)]
    lock = RowLock(fault_database, conversation_id)
    try:
        task = asyncio.ensure_future(session.add_items(doomed))
        # Each attempt (the call and any automatic retry) blocks on the row lock
        # inside its INSERT, and is killed there -- until the call gives up.
        kills = await kill_each_blocked_attempt(
            lock, admin, database_of(fault_database), task, max_kills=25
        )
    finally:
        lock.release()

    assert kills >= 1
    error = task.exception()
    assert isinstance(error, DatabaseError), repr(error)
    # Not one of the 200 items of the killed call, and nothing else lost.
    assert await session.get_items() == [user("kept")]
    assert stored_rows(fault_database, conversation_id) == ["kept"]
    # The session goes on.
    await session.add_items([user("after")])
    assert await session.get_items() == [user("kept"), user("after")]


async def test_an_append_killed_once_inside_its_statement_is_stored_exactly_once(
    admin: Engine, fault_database: str, conversation_id: str
) -> None:
    session = PostgreSQLSession(conversation_id, database_url=fault_database)
    await session.add_items([user("kept")])
    batch = [user(f"batch {n}") for n in range(50)]
    lock = RowLock(fault_database, conversation_id)
    try:
        task = asyncio.ensure_future(session.add_items(batch))
        first_attempt = await wait_until_blocked(lock, admin, task)
        assert kill_backends(admin, database_of(fault_database), first_attempt) == 1
    finally:
        lock.release()

    # The connection died before anything committed; the append carries an
    # idempotency key, so the store retries it on a fresh connection.
    await bounded(task, "add_items after its backend was killed")
    assert await session.get_items() == [user("kept"), *batch]
    assert stored_rows(fault_database, conversation_id) == ["kept"] + [
        item["content"] for item in batch
    ]


async def test_a_pop_killed_inside_its_statement_removes_nothing_and_says_so(
    admin: Engine, fault_database: str, conversation_id: str
) -> None:
    session = PostgreSQLSession(conversation_id, database_url=fault_database)
    await session.add_items([user("older"), user("newest")])
    lock = RowLock(fault_database, conversation_id)
    try:
        task = asyncio.ensure_future(session.pop_item())
        blocked = await wait_until_blocked(lock, admin, task)
        kill_backends(admin, database_of(fault_database), blocked)
        done, _ = await asyncio.wait({task}, timeout=HANG_LIMIT)
        assert task in done, "pop_item hung after its backend was killed"
    finally:
        lock.release()

    # A pop is not idempotent, so it is not retried: the caller learns the outcome
    # is unknown. Here it is known -- the DELETE never ran -- and nothing is gone.
    error = task.exception()
    assert isinstance(error, ConnectionLostError), repr(error)
    assert isinstance(error, DatabaseError)
    assert await session.get_items() == [user("older"), user("newest")]
    assert await session.pop_item() == user("newest")


# ----------------------------------------------------------- restarts and crashes


def fast_restart(cluster: Cluster) -> None:
    cluster.restart("fast")


def crash_and_start(cluster: Cluster) -> None:
    # Every server process killed at once; the start runs crash recovery from the WAL.
    cluster.crash()
    cluster.start()


RESTARTS: dict[str, Callable[[Cluster], None]] = {
    "pg_ctl restart -m fast": fast_restart,
    "immediate stop, then start": crash_and_start,
}


@pytest.mark.parametrize("how", list(RESTARTS))
async def test_calls_succeed_after_a_server_restart_and_the_data_is_intact(
    throwaway_cluster: Cluster, conversation_id: str, how: str
) -> None:
    url = with_query(throwaway_cluster.create_database(), "pool_size=3&max_overflow=0")
    session = PostgreSQLSession(
        conversation_id, database_url=url, user_id="u-restart", metadata={"plan": "pro"}
    )
    other = PostgreSQLSession(f"{conversation_id}-other", database_url=url)
    history = [user(f"turn {n}") for n in range(5)]
    for item in history:
        await session.add_items([item])
    await other.add_items([user("x"), user("y")])
    fill_pool(session.store, 3)

    RESTARTS[how](throwaway_cluster)

    # The first calls just work -- a pop first: it is never retried, so it only
    # succeeds if the dead connection is replaced before anything is sent on it.
    assert await bounded(other.pop_item(), "pop_item") == user("y")
    # Every acknowledged write survived.
    assert await bounded(session.get_items(), "get_items") == history
    await bounded(session.add_items([user("after")]), "add_items")
    await bounded(other.clear_session(), "clear_session")
    reads = await asyncio.gather(*(session.get_items() for _ in range(6)))
    assert reads == [[*history, user("after")]] * 6
    assert await other.get_items() == []
    # The repository API, on the same pool, too.
    with get_store(url).read() as repos:
        record = repos.conversations.get(conversation_id)
        assert record is not None
        assert (record.user_id, record.metadata) == ("u-restart", {"plan": "pro"})
        assert repos.messages.count(conversation_id) == 6


async def test_a_call_during_an_outage_fails_clearly_and_the_next_one_after_it_works(
    throwaway_cluster: Cluster, conversation_id: str
) -> None:
    password = "outage-secret-pw"
    database = database_of(throwaway_cluster.create_database())
    url = throwaway_cluster.url(
        database, password=password, pool_size=2, max_overflow=0, connect_timeout=5
    )
    session = PostgreSQLSession(conversation_id, database_url=url)
    await session.add_items([user("before")])

    throwaway_cluster.stop("fast")
    try:
        with pytest.raises(DatabaseError) as info:
            await bounded(session.get_items(), "get_items while the server is down")
        assert not isinstance(info.value, PoolTimeoutError)
        assert password not in str(info.value)
        with pytest.raises(DatabaseError):
            await bounded(session.add_items([user("lost")]), "add_items while the server is down")
    finally:
        throwaway_cluster.start()

    await bounded(session.add_items([user("after")]), "add_items")
    assert await session.get_items() == [user("before"), user("after")]


# --------------------------------------------------------------- pool exhaustion


async def test_an_exhausted_pool_raises_pool_timeout_error_instead_of_hanging(
    postgres_server: PostgresServer, conversation_id: str
) -> None:
    url = with_query(postgres_server.create_database(), "pool_size=1&max_overflow=0&pool_timeout=1")
    session = PostgreSQLSession(conversation_id, database_url=url)
    await session.add_items([user("first")])
    holding, release = threading.Event(), threading.Event()

    def hold_the_only_connection() -> None:
        with session.store.transaction() as repos:
            repos.messages.count(conversation_id)
            holding.set()
            release.wait(HANG_LIMIT)

    holder = threading.Thread(target=hold_the_only_connection, daemon=True)
    holder.start()
    try:
        assert holding.wait(HANG_LIMIT), "the holder never got the connection"
        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "get_items": session.get_items,
            "add_items": lambda: session.add_items([user("never stored")]),
            "pop_item": session.pop_item,
        }
        for name, call in calls.items():
            task = asyncio.ensure_future(call())
            done, _ = await asyncio.wait({task}, timeout=HANG_LIMIT)
            assert task in done, f"{name} hung on an exhausted pool"
            error = task.exception()
            assert isinstance(error, PoolTimeoutError), f"{name}: {error!r}"
            assert isinstance(error, TimeoutError)
            for setting in ("pool_size=1", "max_overflow=0", "pool_timeout=1"):
                assert setting in str(error), f"{name}: {error}"
    finally:
        release.set()
        holder.join(HANG_LIMIT)
    assert not holder.is_alive()

    # Nothing of the refused calls happened, and the pool works again.
    assert await session.get_items() == [user("first")]
