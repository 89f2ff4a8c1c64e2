"""Concurrent writers, readers and poppers, from tasks, threads and processes."""

from __future__ import annotations

import asyncio
import multiprocessing
import re
import threading
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from agents_sessions import PostgreSQLSession
from tests.support import workers

LABEL = re.compile(r"w(\d+)-c(\d+)-i(\d+)")


def batch(writer: int, call: int, size: int) -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"w{writer}-c{call}-i{index}"} for index in range(size)]


def assert_complete_and_contiguous(
    items: list[dict[str, Any]], *, writers: int, calls: int, size: int
) -> None:
    """Every written item is there once, each call's items are adjacent and in order,
    and each writer's calls appear in the order that writer made them."""
    labels = [tuple(map(int, LABEL.fullmatch(item["content"]).groups())) for item in items]  # type: ignore[union-attr]
    assert len(labels) == writers * calls * size
    assert len(set(labels)) == len(labels), "an item was stored twice"
    for start in range(0, len(labels), size):
        chunk = labels[start : start + size]
        writer, call = chunk[0][0], chunk[0][1]
        assert chunk == [(writer, call, index) for index in range(size)], (
            f"the items of call {call} of writer {writer} are not contiguous: {chunk}"
        )
    for writer in range(writers):
        calls_seen = [label[1] for label in labels if label[0] == writer and label[2] == 0]
        assert calls_seen == list(range(calls))


async def test_concurrent_add_items_from_tasks_lose_nothing_and_stay_contiguous(
    database_url: str, conversation_id: str
) -> None:
    writers, calls, size = 20, 5, 4

    async def writer(number: int) -> None:
        # A session object per writer, as separate requests of an app would have.
        session = PostgreSQLSession(conversation_id, database_url=database_url)
        for call in range(calls):
            await session.add_items(batch(number, call, size))

    await asyncio.gather(*(writer(number) for number in range(writers)))
    session = PostgreSQLSession(conversation_id, database_url=database_url)
    assert_complete_and_contiguous(
        await session.get_items(), writers=writers, calls=calls, size=size
    )


def test_concurrent_add_items_from_threads_lose_nothing_and_stay_contiguous(
    database_url: str, conversation_id: str
) -> None:
    writers, calls, size = 8, 10, 3
    errors: list[BaseException] = []

    def writer(number: int) -> None:
        try:

            async def run() -> None:
                session = PostgreSQLSession(conversation_id, database_url=database_url)
                for call in range(calls):
                    await session.add_items(batch(number, call, size))

            asyncio.run(run())  # each thread its own event loop
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(number,)) for number in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    session = PostgreSQLSession(conversation_id, database_url=database_url)
    items = asyncio.run(session.get_items())
    assert_complete_and_contiguous(items, writers=writers, calls=calls, size=size)


def test_concurrent_add_items_from_processes_lose_nothing_and_stay_contiguous(
    database_url: str, conversation_id: str
) -> None:
    writers, calls, size = 4, 15, 3
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=writers, mp_context=context) as pool:
        futures = [
            pool.submit(workers.write_batches, database_url, conversation_id, n, calls, size)
            for n in range(writers)
        ]
        assert sum(future.result(timeout=120) for future in futures) == writers * calls * size
    session = PostgreSQLSession(conversation_id, database_url=database_url)
    items = asyncio.run(session.get_items())
    assert_complete_and_contiguous(items, writers=writers, calls=calls, size=size)


async def test_readers_never_see_an_item_appear_before_items_they_already_saw(
    database_url: str, conversation_id: str
) -> None:
    writers, calls, size = 6, 15, 2
    snapshots: list[list[Any]] = []
    done = asyncio.Event()

    async def writer(number: int) -> None:
        session = PostgreSQLSession(conversation_id, database_url=database_url)
        for call in range(calls):
            await session.add_items(batch(number, call, size))

    async def reader() -> None:
        session = PostgreSQLSession(conversation_id, database_url=database_url)
        while not done.is_set():
            snapshots.append(await session.get_items())
            await asyncio.sleep(0)

    reading = asyncio.create_task(reader())
    await asyncio.gather(*(writer(number) for number in range(writers)))
    done.set()
    await reading
    final = await PostgreSQLSession(conversation_id, database_url=database_url).get_items()
    assert len(snapshots) > 3
    for snapshot in snapshots:
        # Every history a reader saw is a prefix of the final history: nothing was
        # later inserted before items already seen.
        assert final[: len(snapshot)] == snapshot
        assert len(snapshot) % size == 0, "a reader saw half of a call's items"


async def test_concurrent_pop_item_returns_each_item_once(
    database_url: str, conversation_id: str
) -> None:
    total = 120
    items = [{"role": "user", "content": f"item {n}"} for n in range(total)]
    await PostgreSQLSession(conversation_id, database_url=database_url).add_items(items)

    async def popper() -> list[Any]:
        session = PostgreSQLSession(conversation_id, database_url=database_url)
        popped = []
        while (item := await session.pop_item()) is not None:
            popped.append(item)
        return popped

    results = await asyncio.gather(*(popper() for _ in range(12)))
    popped = [item for result in results for item in result]
    assert sorted(item["content"] for item in popped) == sorted(i["content"] for i in items)
    assert len(popped) == total  # nothing returned twice
    for result in results:
        # Each popper takes newest first, so its own sequence runs backwards.
        numbers = [int(item["content"].split()[1]) for item in result]
        assert numbers == sorted(numbers, reverse=True)


def test_concurrent_pop_item_from_processes_returns_each_item_once(
    database_url: str, conversation_id: str
) -> None:
    total = 90
    items = [{"role": "user", "content": f"item {n}"} for n in range(total)]
    asyncio.run(PostgreSQLSession(conversation_id, database_url=database_url).add_items(items))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=3, mp_context=context) as pool:
        futures = [
            pool.submit(workers.pop_until_empty, database_url, conversation_id) for _ in range(3)
        ]
        popped = [item for future in futures for item in future.result(timeout=120)]
    assert len(popped) == total
    assert sorted(item["content"] for item in popped) == sorted(i["content"] for i in items)


async def test_pops_and_appends_interleave_without_loss(
    database_url: str, conversation_id: str
) -> None:
    session = PostgreSQLSession(conversation_id, database_url=database_url)
    popped: list[Any] = []

    async def appender() -> None:
        for n in range(40):
            await session.add_items([{"role": "user", "content": f"a{n}"}])

    async def popper() -> None:
        for _ in range(40):
            item = await session.pop_item()
            if item is not None:
                popped.append(item)

    await asyncio.gather(appender(), popper(), popper())
    remaining = await session.get_items()
    contents = [item["content"] for item in popped + remaining]
    assert sorted(contents) == sorted(f"a{n}" for n in range(40))


def test_a_forked_child_uses_its_own_connections(database_url: str, conversation_id: str) -> None:
    # gunicorn --preload and multiprocessing fork a process whose pool already holds
    # connections; child and parent must not share them.
    session = PostgreSQLSession(conversation_id, database_url=database_url)
    asyncio.run(session.add_items([{"role": "user", "content": "parent before"}]))
    assert session.store.pool.checkedin() >= 1  # an inherited connection exists

    context = multiprocessing.get_context("fork")
    results: Any = context.Queue()

    def child() -> None:
        try:
            asyncio.run(session.add_items([{"role": "user", "content": "child"}]))
            results.put([item["content"] for item in asyncio.run(session.get_items())])
        except BaseException as exc:
            results.put(repr(exc))

    process = context.Process(target=child)
    process.start()
    seen_by_child = results.get(timeout=60)
    process.join(timeout=60)
    assert seen_by_child == ["parent before", "child"]
    assert process.exitcode == 0
    # The parent's pooled connection survived the child's life and exit.
    asyncio.run(session.add_items([{"role": "user", "content": "parent after"}]))
    contents = [item["content"] for item in asyncio.run(session.get_items())]
    assert contents == ["parent before", "child", "parent after"]
