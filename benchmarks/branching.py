"""Branching a long conversation: agents_sessions against the SDK's AdvancedSQLiteSession.

Usage (``make bench-branching``)::

    python -m benchmarks.branching --database-url postgresql://postgres@127.0.0.1:5432/postgres
    python -m benchmarks.branching --items 10000 --rounds 5

For each backend: a conversation of ``--items`` items (2,500 turns of user message,
tool call, tool result, answer) is written once; then ``create_branch_from_turn`` runs
``--rounds`` times (each from a later turn than the last, so every round branches the
same history), and ``get_items(limit=20)`` is timed on the newest branch (a branch
inheriting from ``main``). Also reported: message rows stored before and after the
branches (ours share items; the SDK copies its per-branch structure rows). Prints a
Markdown table; PostgreSQL runs on a fresh database that is dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from agents_sessions import PostgreSQLSession, dispose_all
from benchmarks._scratch import scratch_database


def _items(count: int) -> list[Any]:
    items: list[Any] = []
    for turn in range(count // 4):
        items += [
            {"role": "user", "content": f"question {turn}"},
            {"type": "function_call", "call_id": f"c{turn}", "name": "lookup", "arguments": "{}"},
            {"type": "function_call_output", "call_id": f"c{turn}", "output": "result"},
            {"role": "assistant", "content": f"answer {turn}"},
        ]
    return items


async def _measure(session: Any, items: list[Any], rounds: int) -> dict[str, float]:
    for start in range(0, len(items), 1000):
        await session.add_items(items[start : start + 1000])
    turns = len(items) // 4
    create_ms = []
    for round_ in range(rounds):
        started = time.perf_counter()
        await session.create_branch_from_turn(turns - round_, f"b{round_}")
        create_ms.append((time.perf_counter() - started) * 1000)
    read_ms = []
    for _ in range(200):
        started = time.perf_counter()
        await session.get_items(limit=20)
        read_ms.append((time.perf_counter() - started) * 1000)
    return {
        "create_p50": statistics.median(create_ms),
        "create_best": min(create_ms),
        "read_p50": statistics.median(read_ms),
    }


def _rows(url: str, table: str) -> int:
    engine = create_engine(make_url(url))
    try:
        with engine.connect() as connection:
            return int(connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())
    finally:
        engine.dispose()


async def run(
    database_url: str | None, count: int, rounds: int
) -> list[tuple[str, dict[str, Any]]]:
    items = _items(count)
    results: list[tuple[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory() as directory:
        from agents.extensions.memory import AdvancedSQLiteSession

        sdk = AdvancedSQLiteSession(
            session_id="bench", db_path=Path(directory) / "sdk.sqlite3", create_tables=True
        )
        measured: dict[str, Any] = dict(await _measure(sdk, items, rounds))
        sdk_url = f"sqlite:///{Path(directory) / 'sdk.sqlite3'}"
        measured["rows"] = _rows(sdk_url, "agent_messages") + _rows(sdk_url, "message_structure")
        sdk.close()
        results.append(("SDK AdvancedSQLiteSession", measured))

        sqlite_url = f"sqlite:///{Path(directory) / 'ours.sqlite3'}"
        targets = [("agents_sessions (SQLite)", sqlite_url)]
        with contextlib.ExitStack() as stack:
            if database_url:
                scratch = stack.enter_context(scratch_database(database_url, "bench_branching"))
                targets.append(("agents_sessions (PostgreSQL)", scratch.url))
            for label, url in targets:
                session = PostgreSQLSession("bench", database_url=url)
                measured = dict(await _measure(session, items, rounds))
                measured["rows"] = _rows(url, "messages")
                results.append((label, measured))
                dispose_all()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--database-url", help="admin URL of a PostgreSQL server (optional)")
    parser.add_argument("--items", type=int, default=10_000, help="items in the conversation")
    parser.add_argument("--rounds", type=int, default=5, help="branches created")
    args = parser.parse_args(argv)
    results = asyncio.run(run(args.database_url, args.items, args.rounds))
    print(f"\nBranching a {args.items:,}-item conversation ({args.rounds} branches)\n")
    print(
        "| backend | create_branch_from_turn p50 / best ms "
        "| get_items(limit=20) on the branch p50 ms | rows stored after |"
    )
    print("|---|---|---|---|")
    for label, measured in results:
        print(
            f"| {label} | {measured['create_p50']:.1f} / {measured['create_best']:.1f} "
            f"| {measured['read_p50']:.2f} | {measured['rows']:,} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
