"""Recall benchmark: full-text search latency on a large corpus, and what the index costs writes.

``python -m benchmarks.search`` (``make bench`` runs it after the session benchmark):

1. creates a throwaway PostgreSQL database (on the server of ``--database-url``, as
   ``benchmarks.bench`` does) and migrates it to head;
2. generates ``--messages`` messages over ``--conversations`` conversations of
   ``--users`` users on the server (synthetic sentences from a Zipf-like vocabulary,
   so common and rare words both exist; one message in a thousand mentions Lisbon);
3. times ``repos.messages.search`` (p50/p95 over ``--rounds`` calls, after warm-up)
   for a rare word across everything, a common word within one user's
   conversations, a phrase, and a second page;
4. times ``add_items`` of two items (p50) with the GIN index, then without it;
5. the same search on SQLite (FTS5) with ``--sqlite-messages`` messages.

Results go to stdout and ``benchmarks/results/search-latest.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from agents_sessions import PostgreSQLSession, dispose_all, get_store
from benchmarks._scratch import scratch_database

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
RESULTS = Path(__file__).resolve().parent / "results" / "search-latest.md"

# Server-side generation: a vocabulary of synthetic words ("lex1", "lex2", ...) drawn
# with a skewed distribution (low numbers common), 12 words per message.
GENERATE_CONVERSATIONS = """
INSERT INTO conversations (id, user_id)
SELECT 'c' || g, 'u' || (g % :users) FROM generate_series(1, :conversations) AS g
"""
GENERATE_MESSAGES = """
INSERT INTO messages (conversation_id, role, content, item)
SELECT 'c' || (1 + g % :conversations),
       CASE WHEN g % 2 = 0 THEN 'user' ELSE 'assistant' END,
       body,
       json_build_object('role', CASE WHEN g % 2 = 0 THEN 'user' ELSE 'assistant' END,
                         'content', body)
FROM (
  SELECT g,
         (SELECT string_agg('lex' || (1 + floor(power(random(), 3) * 5000)::int), ' ')
          FROM generate_series(1, 12) WHERE g > 0)
         || CASE WHEN g % 1000 = 7 THEN ' we decided to meet in Lisbon' ELSE '' END AS body
  FROM generate_series(:first, :last) AS g
) AS generated
"""


def percentile(samples: Sequence[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def timed(call: Callable[[], Any], rounds: int, warmup: int = 5) -> tuple[float, float]:
    """(p50, p95) of ``call`` in milliseconds."""
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples), percentile(samples, 0.95)


def search_rows(url: str, rounds: int) -> list[tuple[str, float, float, int]]:
    store = get_store(url)

    def search(query: str, **options: Any) -> Callable[[], Any]:
        def call() -> Any:
            with store.read() as repos:
                return repos.messages.search(query, **options)

        return call

    with store.read() as repos:
        first = repos.messages.search("lisbon", limit=20)
    cases = [
        ("rare word, all users (lisbon)", search("lisbon", limit=20)),
        ('phrase, all users ("meet in Lisbon")', search('"meet in lisbon"', limit=20)),
        ("common word, one user (lex1, user u7)", search("lex1", user_id="u7", limit=20)),
        ("rare word, page 2 (keyset)", search("lisbon", limit=20, after=first.next_cursor)),
        ("common word, one conversation", search("lex1", conversation_id="c42", limit=20)),
    ]
    rows = []
    for name, call in cases:
        hits = len(call().hits)
        p50, p95 = timed(call, rounds)
        rows.append((name, p50, p95, hits))
    return rows


def add_items_p50(url: str, rounds: int) -> float:
    session = PostgreSQLSession(f"bench-{uuid.uuid4()}", database_url=url)
    items = [
        {"role": "user", "content": "what did we decide about the Lisbon offsite budget?"},
        {"role": "assistant", "content": "We decided to keep it under forty thousand euros."},
    ]

    async def run() -> float:
        for _ in range(5):
            await session.add_items(items)
        samples = []
        for _ in range(rounds):
            start = time.perf_counter()
            await session.add_items(items)
            samples.append((time.perf_counter() - start) * 1000)
        return statistics.median(samples)

    return asyncio.run(run())


def load_postgres(url: str, messages: int, conversations: int, users: int) -> float:
    engine = create_engine(make_url(url).set(drivername="postgresql+psycopg2"))
    start = time.perf_counter()
    with engine.begin() as connection:
        connection.execute(
            text(GENERATE_CONVERSATIONS), {"users": users, "conversations": conversations}
        )
    step = 200_000
    for first in range(1, messages + 1, step):
        with engine.begin() as connection:
            connection.execute(
                text(GENERATE_MESSAGES),
                {
                    "conversations": conversations,
                    "first": first,
                    "last": min(messages, first + step - 1),
                },
            )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM ANALYZE messages"))
        connection.execute(text("VACUUM ANALYZE conversations"))
    engine.dispose()
    return time.perf_counter() - start


def load_sqlite(url: str, messages: int, conversations: int, users: int) -> float:
    import random

    random.seed(7)
    store = get_store(url)
    start = time.perf_counter()
    with store.transaction() as repos:
        for n in range(1, conversations + 1):
            repos.conversations.ensure(f"c{n}", user_id=f"u{n % users}")
    pending: dict[str, list[dict[str, Any]]] = {}
    for g in range(1, messages + 1):
        body = " ".join(f"lex{1 + int(random.random() ** 3 * 5000)}" for _ in range(12))
        if g % 1000 == 7:
            body += " we decided to meet in Lisbon"
        pending.setdefault(f"c{1 + g % conversations}", []).append(
            {"role": "user", "content": body}
        )
        if g % 10_000 == 0 or g == messages:
            with store.transaction() as repos:
                for conversation_id, items in pending.items():
                    repos.messages.append(conversation_id, items)
            pending = {}
    return time.perf_counter() - start


def index_seconds(url: str) -> float:
    """Rebuild the GIN index (as revision 0007 does) and time it."""
    engine = create_engine(make_url(url).set(drivername="postgresql+psycopg2"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("DROP INDEX IF EXISTS ix_messages_content_search"))
        start = time.perf_counter()
        connection.execute(
            text(
                "CREATE INDEX CONCURRENTLY ix_messages_content_search ON messages "
                "USING gin (to_tsvector('english'::regconfig, content))"
            )
        )
        elapsed = time.perf_counter() - start
        connection.execute(text("ANALYZE messages"))  # as revision 0007 does
    engine.dispose()
    return elapsed


def drop_search_index(url: str) -> None:
    engine = create_engine(make_url(url).set(drivername="postgresql+psycopg2"))
    with engine.begin() as connection:
        connection.execute(text("DROP INDEX ix_messages_content_search"))
    engine.dispose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--database-url", default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_ADMIN_URL)
    )
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--conversations", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=1_000)
    parser.add_argument("--sqlite-messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="100,000 messages, 20 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.messages, args.sqlite_messages, args.rounds = 100_000, 20_000, 20

    lines = [
        "# Recall benchmark",
        "",
        f"PostgreSQL: {args.messages:,} messages, {args.conversations:,} conversations, "
        f"{args.users:,} users; search p50/p95 over {args.rounds} calls (repository API).",
        "",
    ]
    with scratch_database(args.database_url, "bench_search") as scratch:
        url = scratch.url
        loaded = load_postgres(url, args.messages, args.conversations, args.users)
        lines.append(f"- load (server-side generation): {loaded:.1f} s")
        lines.append(f"- GIN index build (CREATE INDEX CONCURRENTLY): {index_seconds(url):.1f} s")
        lines += ["", "| search (PostgreSQL) | p50 ms | p95 ms | hits |", "|---|---|---|---|"]
        for name, p50, p95, hits in search_rows(url, args.rounds):
            lines.append(f"| {name} | {p50:.2f} | {p95:.2f} | {hits} |")
        with_index = add_items_p50(url, args.rounds * 6)
        drop_search_index(url)
        dispose_all()
        without_index = add_items_p50(url, args.rounds * 6)
        lines += [
            "",
            f"add_items (2 items) p50: {with_index:.3f} ms with the GIN index, "
            f"{without_index:.3f} ms without it.",
        ]

    sqlite_path = Path(f"/tmp/bench-search-{uuid.uuid4().hex[:8]}.sqlite3")
    sqlite_url = f"sqlite:///{sqlite_path}"
    try:
        loaded = load_sqlite(sqlite_url, args.sqlite_messages, 1000, 100)
        lines += [
            "",
            f"SQLite (FTS5): {args.sqlite_messages:,} messages, 1,000 conversations, 100 users "
            f"(loaded through the repository API in {loaded:.1f} s).",
            "",
            "| search (SQLite) | p50 ms | p95 ms | hits |",
            "|---|---|---|---|",
        ]
        for name, p50, p95, hits in search_rows(sqlite_url, args.rounds):
            lines.append(f"| {name} | {p50:.2f} | {p95:.2f} | {hits} |")
    finally:
        dispose_all()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{sqlite_path}{suffix}").unlink(missing_ok=True)
    report = "\n".join(lines) + "\n"
    print(report)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(report, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
