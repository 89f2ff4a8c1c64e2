"""Bounded history reads of the embedded SQLite file run on the event loop, and only those.

Every statement the file's connections run is recorded with the thread that ran it
(``sqlite3``'s trace callback, installed by an engine ``connect`` listener), so the
tests see where a read ran, not only what it answered.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from agents_sessions import PoolTimeoutError, PostgreSQLSession
from agents_sessions.db.sqlite_loop_reader import MAX_ITEMS_READ_ON_LOOP


class _Traced:
    """A session on its own SQLite file, and every statement run on it, by thread."""

    def __init__(self, path: Path) -> None:
        self.session = PostgreSQLSession("traced", database_url=f"sqlite:///{path}")
        self.statements: list[tuple[int, str]] = []
        self.connections: list[sqlite3.Connection] = []
        event.listen(self.session.store.engine, "connect", self._on_connect)

    def _on_connect(self, driver: sqlite3.Connection, _record: Any) -> None:
        self.connections.append(driver)
        driver.set_trace_callback(lambda sql: self.statements.append((threading.get_ident(), sql)))

    def threads_of(self) -> set[int]:
        return {thread for thread, _ in self.statements}

    def busy_timeouts(self) -> dict[sqlite3.Connection, int]:
        """Each open connection's ``busy_timeout`` (ms); the schema check's are closed."""
        timeouts = {}
        for connection in self.connections:
            try:
                timeouts[connection] = connection.execute("PRAGMA busy_timeout").fetchone()[0]
            except sqlite3.ProgrammingError:  # closed
                continue
        return timeouts


def _items(count: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"m{n}"} for n in range(count)]


def _contents(items: list[Any]) -> list[str]:
    return [item["content"] for item in items]


async def test_a_bounded_read_runs_on_the_event_loop_thread(tmp_path: Path) -> None:
    traced = _Traced(tmp_path / "loop.sqlite3")
    await traced.session.add_items(_items(30))
    await traced.session.get_items(limit=5)  # the loop's connection is opened (a thread)
    traced.statements.clear()

    assert _contents(await traced.session.get_items(limit=5)) == [f"m{n}" for n in range(25, 30)]
    assert traced.statements, "the read ran no statement"
    assert traced.threads_of() == {threading.get_ident()}
    # Empty and missing conversations too (the read's second look is on the loop).
    empty = PostgreSQLSession("never-written", database_url=str(traced.session.store.engine.url))
    traced.statements.clear()
    assert await empty.get_items(limit=5) == []
    assert traced.threads_of() == {threading.get_ident()}


async def test_the_loops_connection_never_waits_for_a_lock(tmp_path: Path) -> None:
    traced = _Traced(tmp_path / "busy.sqlite3")
    await traced.session.add_items(_items(3))
    await traced.session.get_items(limit=2)  # on the loop's connection
    await traced.session.get_items(limit=MAX_ITEMS_READ_ON_LOOP + 1)  # on a thread's
    timeouts = sorted(traced.busy_timeouts().values())
    # The loop's connection gives up at once; the threads' wait as configured.
    assert len(timeouts) == 2 and timeouts[0] == 0 and timeouts[1] > 0


async def test_every_item_of_a_short_branch_is_read_on_the_loop(tmp_path: Path) -> None:
    traced = _Traced(tmp_path / "short.sqlite3")
    await traced.session.add_items(_items(MAX_ITEMS_READ_ON_LOOP))
    await traced.session.get_items(limit=1)
    traced.statements.clear()

    assert _contents(await traced.session.get_items()) == _contents(_items(MAX_ITEMS_READ_ON_LOOP))
    assert traced.threads_of() == {threading.get_ident()}


async def test_long_branches_and_large_limits_are_read_by_worker_threads(tmp_path: Path) -> None:
    traced = _Traced(tmp_path / "threads.sqlite3")
    await traced.session.add_items(_items(MAX_ITEMS_READ_ON_LOOP + 5))
    await traced.session.get_items(limit=1)
    loop_thread = threading.get_ident()

    traced.statements.clear()
    items = await traced.session.get_items(limit=MAX_ITEMS_READ_ON_LOOP + 1)
    assert _contents(items) == _contents(_items(MAX_ITEMS_READ_ON_LOOP + 5))[4:]
    assert traced.statements and loop_thread not in traced.threads_of()
    # Every item: the loop finds more than it may read, and a thread reads them all.
    traced.statements.clear()
    items = await traced.session.get_items()
    assert _contents(items) == _contents(_items(MAX_ITEMS_READ_ON_LOOP + 5))
    assert len(traced.threads_of() - {loop_thread}) == 1


async def test_a_branch_that_inherits_is_read_by_the_threads_with_the_same_answer(
    tmp_path: Path,
) -> None:
    traced = _Traced(tmp_path / "branches.sqlite3")
    session = traced.session
    for turn in range(4):
        await session.add_items(
            [
                {"role": "user", "content": f"q{turn}"},
                {"role": "assistant", "content": f"a{turn}"},
            ]
        )
    await session.create_branch_from_turn(3, "retry")
    await session.add_items([{"role": "user", "content": "q3 again"}])

    expected = ["q0", "a0", "q1", "a1", "q3 again"]
    assert _contents(await session.get_items()) == expected
    traced.statements.clear()
    assert _contents(await session.get_items(limit=3)) == expected[-3:]
    # The loop looked first and found a branch that inherits; a thread read its chain.
    assert len(traced.threads_of()) == 2


async def test_a_failed_read_on_the_loop_is_answered_by_the_threads(tmp_path: Path) -> None:
    traced = _Traced(tmp_path / "failing.sqlite3")
    await traced.session.add_items(_items(6))
    await traced.session.get_items(limit=2)
    (loops_connection,) = (
        connection for connection, timeout in traced.busy_timeouts().items() if timeout == 0
    )
    loops_connection.close()  # behind the pool's back: the next read on it fails

    assert _contents(await traced.session.get_items(limit=2)) == ["m4", "m5"]
    # The broken connection was dropped; the loop opens another and reads on it.
    assert _contents(await traced.session.get_items(limit=2)) == ["m4", "m5"]
    traced.statements.clear()
    assert _contents(await traced.session.get_items(limit=2)) == ["m4", "m5"]
    assert traced.threads_of() == {threading.get_ident()}


async def test_dispose_closes_the_loops_connection_and_reads_go_on(tmp_path: Path) -> None:
    traced = _Traced(tmp_path / "dispose.sqlite3")
    await traced.session.add_items(_items(4))
    await traced.session.get_items(limit=2)
    readers = traced.session.store.loop_readers
    loop = asyncio.get_running_loop()
    assert readers.has_reader(loop)

    traced.session.store.dispose()
    assert not readers.has_reader(loop)
    assert traced.session.store.pool.checkedout() == 0
    assert _contents(await traced.session.get_items(limit=2)) == ["m2", "m3"]
    assert readers.has_reader(loop)


def test_the_connections_of_closed_loops_go_back_to_the_pool(tmp_path: Path) -> None:
    traced = _Traced(tmp_path / "loops.sqlite3")
    asyncio.run(traced.session.add_items(_items(3)))
    for _ in range(4):  # a fresh event loop each time, closed at its end
        assert _contents(asyncio.run(traced.session.get_items(limit=1))) == ["m2"]
    # Only the newest loop's connection is still out (its loop closed since).
    assert traced.session.store.pool.checkedout() == 1


def test_a_forked_child_reads_on_its_own_connection(tmp_path: Path) -> None:
    traced = _Traced(tmp_path / "fork.sqlite3")
    session = traced.session
    asyncio.run(session.add_items(_items(3)))

    async def read_and_keep_the_loop() -> None:
        # Fork while this loop (and its connection) is alive in the parent.
        assert _contents(await session.get_items(limit=2)) == ["m1", "m2"]
        context = multiprocessing.get_context("fork")
        results: Any = context.Queue()

        def child() -> None:
            try:
                asyncio.run(session.add_items([{"role": "user", "content": "child"}]))
                results.put(_contents(asyncio.run(session.get_items(limit=2))))
            except BaseException as exc:
                results.put(repr(exc))

        process = context.Process(target=child)
        process.start()
        seen_by_child = results.get(timeout=60)
        process.join(timeout=60)
        assert seen_by_child == ["m2", "child"]
        assert process.exitcode == 0
        # The parent's loop connection survived the child's life and exit.
        traced.statements.clear()
        assert _contents(await session.get_items(limit=2)) == ["m2", "child"]
        assert traced.threads_of() == {threading.get_ident()}

    asyncio.run(read_and_keep_the_loop())


async def test_a_bounded_read_of_large_items_comes_back_whole(tmp_path: Path) -> None:
    # Past MAX_BYTES_PARSED_ON_LOOP of stored JSON the loop hands the parsing to a thread.
    traced = _Traced(tmp_path / "large.sqlite3")
    large = [{"role": "user", "content": f"{n}" + "x" * 100_000} for n in range(4)]
    await traced.session.add_items(large)
    assert await traced.session.get_items(limit=3) == large[1:]


async def test_a_pool_of_one_connection_keeps_it_for_the_threads(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'one.sqlite3'}?pool_size=1&max_overflow=0&pool_timeout=1"
    session = PostgreSQLSession("one", database_url=url)
    for n in range(3):  # writes keep finding the connection: no loop holds it
        await session.add_items([{"role": "user", "content": f"m{n}"}])
        assert _contents(await session.get_items(limit=1)) == [f"m{n}"]
    assert not session.store.loop_readers.has_reader(asyncio.get_running_loop())


async def test_an_exhausted_pool_fails_a_first_bounded_read_with_pool_timeout_error(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'full.sqlite3'}?pool_size=2&max_overflow=0&pool_timeout=1"
    session = PostgreSQLSession("full", database_url=url)
    await session.add_items(_items(2))
    held = [session.store.engine.raw_connection() for _ in range(2)]
    try:
        with pytest.raises(PoolTimeoutError, match="pool_size=2"):
            await asyncio.wait_for(session.get_items(limit=1), timeout=30)
    finally:
        for connection in held:
            connection.close()
    assert _contents(await session.get_items(limit=1)) == ["m1"]


async def test_a_task_reading_in_a_loop_lets_the_other_tasks_run(tmp_path: Path) -> None:
    traced = _Traced(tmp_path / "fair.sqlite3")
    await traced.session.add_items(_items(3))
    await traced.session.get_items(limit=2)
    # A thread's flag, so a starved loop still ends: the watchdog stops the reader.
    stop = threading.Event()
    watchdog = threading.Timer(10, stop.set)

    async def read_until_stopped() -> int:
        reads = 0
        while not stop.is_set():  # nothing else awaited: only the reads can yield
            assert await traced.session.get_items(limit=2)
            reads += 1
        return reads

    watchdog.start()
    reader = asyncio.create_task(read_until_stopped())
    await asyncio.sleep(0.05)  # returns in time only if the reader lets the loop run
    in_time = not stop.is_set()
    stop.set()
    watchdog.cancel()
    assert await reader > 0
    assert in_time, "the reading task kept the loop to itself"


def test_loops_opening_at_once_leave_the_pools_last_connection_to_the_threads(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'many.sqlite3'}?pool_size=3&max_overflow=0&pool_timeout=5"
    session = PostgreSQLSession("many", database_url=url)
    asyncio.run(session.add_items(_items(2)))
    start, release = threading.Barrier(5), threading.Event()
    answers: list[Any] = []

    def loop_that_reads_and_stays_open() -> None:
        async def read() -> None:
            start.wait(30)  # the four loops open their connections together
            answers.append(_contents(await session.get_items(limit=1)))
            await asyncio.to_thread(release.wait, 60)  # the loop stays open meanwhile

        asyncio.run(read())

    threads = [threading.Thread(target=loop_that_reads_and_stays_open) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        start.wait(30)
        while len(answers) < 4:
            threading.Event().wait(0.01)
        # At most all but one of the three connections are held by loops ...
        assert session.store.pool.checkedout() <= 2
        # ... so a write (a worker thread's) still finds one.
        asyncio.run(session.add_items([{"role": "user", "content": "written"}]))
    finally:
        release.set()
        for thread in threads:
            thread.join(60)
    assert answers == [["m1"]] * 4


async def test_reads_stay_right_while_another_thread_disposes_the_store(tmp_path: Path) -> None:
    session = PostgreSQLSession("disposed", database_url=f"sqlite:///{tmp_path / 'd.sqlite3'}")
    await session.add_items(_items(3))
    stop = threading.Event()

    def dispose_again_and_again() -> None:
        while not stop.is_set():
            session.store.dispose()  # closes the loop's connection under its reads
            stop.wait(0.0005)

    disposer = threading.Thread(target=dispose_again_and_again)
    disposer.start()
    try:
        for _ in range(300):
            assert _contents(await session.get_items(limit=2)) == ["m1", "m2"]
    finally:
        stop.set()
        disposer.join(60)
