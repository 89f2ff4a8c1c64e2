"""Faults on a Citus cluster: backends killed on the coordinator, a worker restarted mid-load.

Writers append labelled batches while the fault happens. Afterwards each
conversation's stored rows (straight from the table) must be exactly the
acknowledged batches, in order, each contiguous and stored once -- plus, at most,
batches whose call failed, whole (a failed call left all of its items or none).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text

from agents_sessions import DatabaseError, PostgreSQLSession
from tests.support.pgcluster import CitusCluster, Cluster

#: Bound on anything that must not hang; never an assertion on speed.
HANG_LIMIT = 60.0
BATCH = 3


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def stored(admin_engine: Engine, conversation_id: str) -> list[str]:
    with admin_engine.connect() as connection:
        return list(
            connection.execute(
                text("SELECT content FROM messages WHERE conversation_id = :c ORDER BY id"),
                {"c": conversation_id},
            ).scalars()
        )


def worker_of(admin_engine: Engine, citus: CitusCluster, conversation_id: str) -> Cluster:
    """The worker node that holds ``conversation_id``'s shard."""
    with admin_engine.connect() as connection:
        port = connection.execute(
            text(
                "SELECT nodeport FROM citus_shards WHERE shardid = "
                "get_shard_id_for_distribution_column('conversations', CAST(:c AS text))"
            ),
            {"c": conversation_id},
        ).scalar_one()
    return next(worker for worker in citus.workers if worker.port == port)


class Writers:
    """Writers appending batches ``<conversation>-b<n>-i<k>`` until stopped."""

    def __init__(self, url: str, conversations: list[str]) -> None:
        self.url = url
        self.conversations = conversations
        self.acknowledged: dict[str, list[int]] = {c: [] for c in conversations}
        self.failed: dict[str, list[int]] = {c: [] for c in conversations}
        self.errors: list[BaseException] = []
        self.stop = asyncio.Event()

    async def _write(self, conversation_id: str) -> None:
        session = PostgreSQLSession(conversation_id, database_url=self.url)
        number = 0
        while not self.stop.is_set():
            batch = [user(f"{conversation_id}-b{number}-i{k}") for k in range(BATCH)]
            try:
                await asyncio.wait_for(session.add_items(batch), HANG_LIMIT)
            except DatabaseError as exc:
                self.failed[conversation_id].append(number)
                self.errors.append(exc)
                await asyncio.sleep(0.05)
            else:
                self.acknowledged[conversation_id].append(number)
            number += 1

    async def run_while(self, fault: threading.Thread) -> None:
        tasks = [asyncio.create_task(self._write(c)) for c in self.conversations]
        fault.start()
        # The fault runs in a thread; wait for it without blocking the writers.
        await asyncio.to_thread(fault.join)
        # Some calls after the fault too: the store must work again by itself.
        await asyncio.sleep(1.0)
        self.stop.set()
        await asyncio.gather(*tasks)

    def check(self, admin_engine: Engine) -> None:
        for conversation_id in self.conversations:
            rows = stored(admin_engine, conversation_id)
            assert len(rows) == len(set(rows)), "an item was stored twice"
            assert len(rows) % BATCH == 0, "a batch was stored partly"
            batches = []
            for start in range(0, len(rows), BATCH):
                prefix = rows[start].rsplit("-i", 1)[0]
                assert rows[start : start + BATCH] == [f"{prefix}-i{k}" for k in range(BATCH)]
                batches.append(int(prefix.rsplit("-b", 1)[1]))
            # In call order (one writer per conversation), nothing acknowledged lost.
            assert batches == sorted(batches), "batches were reordered"
            acknowledged = self.acknowledged[conversation_id]
            assert set(acknowledged) <= set(batches), "an acknowledged batch was lost"
            assert set(batches) <= set(acknowledged) | set(self.failed[conversation_id])
            assert acknowledged, "no write succeeded"


@pytest.fixture
def conversations() -> list[str]:
    return [f"conv-{uuid.uuid4()}" for _ in range(6)]


@pytest.fixture
def coordinator_killer(citus: CitusCluster, citus_url: str) -> Iterator[threading.Thread]:
    database = citus_url.rsplit("/", 1)[1]

    def kill_repeatedly() -> None:
        for _ in range(6):
            time.sleep(0.3)
            # Client backends only: the package's connections, not Citus's own.
            citus.coordinator.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND backend_type = 'client backend' "
                "AND application_name NOT LIKE 'citus%%' AND pid <> pg_backend_pid()",
                [database],
            )

    yield threading.Thread(target=kill_repeatedly)


async def test_killed_coordinator_backends_lose_duplicate_or_reorder_nothing(
    citus_url: str,
    admin_engine: Engine,
    conversations: list[str],
    coordinator_killer: threading.Thread,
) -> None:
    writers = Writers(citus_url, conversations)
    await writers.run_while(coordinator_killer)
    writers.check(admin_engine)


async def test_a_worker_restarted_mid_load_loses_nothing_and_calls_recover(
    citus: CitusCluster, citus_url: str, admin_engine: Engine, conversations: list[str]
) -> None:
    # Writers on both workers; one of them is restarted (fast shutdown) mid-load.
    victim = citus.workers[0]

    def restart_soon() -> None:
        time.sleep(0.5)
        victim.restart("fast")

    restart = threading.Thread(target=restart_soon)
    writers = Writers(citus_url, conversations)
    await writers.run_while(restart)
    writers.check(admin_engine)
    on_victim = [c for c in conversations if worker_of(admin_engine, citus, c) is victim]
    on_other = [c for c in conversations if c not in on_victim]
    # The other worker's conversations never noticed.
    assert on_other and all(not writers.failed[c] for c in on_other)


async def test_calls_fail_clearly_while_a_worker_is_down_and_work_after(
    citus: CitusCluster, citus_url: str, admin_engine: Engine
) -> None:
    conversation_id = next(
        c
        for c in (f"conv-{uuid.uuid4()}" for _ in range(100))
        if worker_of(admin_engine, citus, c) is citus.workers[1]
    )
    session = PostgreSQLSession(conversation_id, database_url=citus_url)
    await session.add_items([user("before")])
    citus.workers[1].stop("fast")
    try:
        with pytest.raises(DatabaseError, match=r"remote node|connection"):
            await asyncio.wait_for(session.add_items([user("while down")]), HANG_LIMIT)
        with pytest.raises(DatabaseError, match=r"remote node|connection"):
            await asyncio.wait_for(session.get_items(), HANG_LIMIT)
    finally:
        citus.workers[1].start()
    await session.add_items([user("after")])
    assert await session.get_items() == [user("before"), user("after")]
