"""Mixed load: Runner turns on the event loop beside steady transactions on the worker threads.

Usage (``make bench-mixed``)::

    python -m benchmarks.mixed_load --database-url postgresql://postgres@127.0.0.1:5432/postgres
    python -m benchmarks.mixed_load --callers 0,2,5,10 --seconds 5 --rounds 3

One process, one database URL (``pool_size=5&max_overflow=10``, the defaults: 15
connections for the engine's pool and the event loop's together). ``--conversations``
coroutines run turns as the Runner does (``get_items(limit=20)`` + ``add_items(2)``, on
the event loop's connections) for ``--seconds``; beside them, ``K`` callers each run
``add_items`` + ``clear_session`` (a transaction on the worker threads) every 10 ms.
For each ``K`` of ``--callers``: turns/s, thread calls/s, and the server connections
the database saw opened (``pg_stat_database.sessions``; the two pools share one
ceiling, and a slot traded between them is a connection closed and another opened).
Rounds are interleaved (every ``K`` once per round); the best round of each is
reported, with the ratio of its turns/s to ``K = 0``'s, and the fewest and most
connections opened in a round. Runs on a fresh database,
dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import Any

from agents_sessions import PostgreSQLSession, dispose_all
from benchmarks._scratch import scratch_database
from tests.support.server_stats import sessions_opened

#: How often each thread-path caller calls.
CALLER_INTERVAL_SECONDS = 0.01


async def _round(url: str, conversations: int, callers: int, seconds: float) -> dict[str, float]:
    sessions = [
        PostgreSQLSession(f"loop-{uuid.uuid4()}", database_url=url) for _ in range(conversations)
    ]
    await sessions[0].get_items(limit=1)  # connect and check the schema before timing
    stop = time.monotonic() + seconds
    turns = 0
    calls = 0

    async def turn_after_turn(session: PostgreSQLSession) -> None:
        nonlocal turns
        while time.monotonic() < stop:
            await session.get_items(limit=20)
            await session.add_items(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
            )
            turns += 1

    async def transactions(index: int) -> None:
        nonlocal calls
        session = PostgreSQLSession(f"thread-{index}-{uuid.uuid4()}", database_url=url)
        while time.monotonic() < stop:
            await asyncio.sleep(CALLER_INTERVAL_SECONDS)
            await session.add_items([{"role": "user", "content": "x"}])
            await session.clear_session()
            calls += 1

    await asyncio.gather(
        *(turn_after_turn(session) for session in sessions),
        *(transactions(index) for index in range(callers)),
    )
    return {"turns_per_s": turns / seconds, "calls_per_s": calls / seconds}


def run(
    admin_url: str, conversations: int, callers: list[int], seconds: float, rounds: int
) -> dict[int, dict[str, float]]:
    best: dict[int, dict[str, float]] = {}
    with scratch_database(admin_url, "bench_mixed") as scratch:
        url = f"{scratch.url}?pool_size=5&max_overflow=10"
        for _ in range(rounds):
            for count in callers:
                before = sessions_opened(scratch.admin, scratch.name)
                measured: dict[str, Any] = asyncio.run(_round(url, conversations, count, seconds))
                dispose_all()  # every connection closed: counted, and the next round starts cold
                measured["opened"] = sessions_opened(scratch.admin, scratch.name) - before
                previous = best.get(count)
                if previous is None:
                    measured["opened_min"] = measured["opened_max"] = measured["opened"]
                    best[count] = measured
                    continue
                opened_range = {
                    "opened_min": min(previous["opened_min"], measured["opened"]),
                    "opened_max": max(previous["opened_max"], measured["opened"]),
                }
                if measured["turns_per_s"] > previous["turns_per_s"]:
                    best[count] = measured
                best[count].update(opened_range)
    return best


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument(
        "--database-url",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="admin URL of a PostgreSQL server (a database is created and dropped there)",
    )
    parser.add_argument("--conversations", type=int, default=100)
    parser.add_argument("--callers", default="0,2,5,10", help="thread-path callers, per column")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (best reported)")
    args = parser.parse_args(argv)
    callers = [int(part) for part in args.callers.split(",")]
    if 0 not in callers:
        callers.insert(0, 0)
    best = run(args.database_url, args.conversations, callers, args.seconds, args.rounds)
    print(
        f"\nMixed load: {args.conversations} conversations' turns on the event loop, beside "
        f"K callers of a worker-thread transaction every {CALLER_INTERVAL_SECONDS * 1000:.0f} ms "
        f"(best of {args.rounds} rounds of {args.seconds:g} s)\n"
    )
    print("| K | turns/s | ÷ K = 0 | thread calls/s | server connections opened per round |")
    print("|---|---|---|---|---|")
    for count in callers:
        measured = best[count]
        ratio = measured["turns_per_s"] / best[0]["turns_per_s"]
        print(
            f"| {count} | {measured['turns_per_s']:,.0f} | {ratio:.2f}x "
            f"| {measured['calls_per_s']:,.0f} "
            f"| {measured['opened_min']:,.0f}-{measured['opened_max']:,.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
