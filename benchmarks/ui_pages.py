"""Page timings of the explorer (``agents-sessions ui``) on a database of 100,000 conversations.

Usage (``make bench`` runs it after the backend comparison; it needs the ``[ui]`` extra)::

    python -m benchmarks.ui_pages                        # 100,000 conversations
    python -m benchmarks.ui_pages --conversations 10000 --requests 20   # a smoke run

Creates a fresh PostgreSQL database on the ``--database-url`` server, migrates it, fills
it with SQL (``generate_series``: 100,000 conversations of 4 items and 2 usage rows over
30 days, 1,000 users, one conversation of 10,000 items), runs ``ANALYZE``, then requests
each page ``--requests`` times after a warm-up through the real application (Starlette's
ASGI stack, the templates, the read-only transaction; no network) and prints p50 / p95 /
max in milliseconds. The database is dropped at the end. Target: p95 under 100 ms per page.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import create_engine, text
from starlette.testclient import TestClient

from agents_sessions import get_store
from agents_sessions.ui import create_app
from agents_sessions.ui.app import USAGE_MAX_AGE_S
from benchmarks._scratch import scratch_database

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
TARGET_P95_MS = 100.0
LONG_CONVERSATION = "conv-long"
LONG_CONVERSATION_ITEMS = 10_000

_SEED = [
    # Newest first is conv-1; conversations 26 s apart span 30 days at 100,000.
    """
    INSERT INTO conversations (id, user_id, created_at, updated_at, metadata)
    SELECT 'conv-' || g, 'user-' || (g % 1000),
           now() - g * (:span / :conversations) * interval '1 second',
           now() - g * (:span / :conversations) * interval '1 second' + interval '4 minutes',
           '{"channel": "web"}'
    FROM generate_series(1, :conversations) AS g
    """,
    """
    INSERT INTO messages (conversation_id, role, content, item, created_at)
    SELECT 'conv-' || g,
           CASE WHEN k % 2 = 1 THEN 'user' ELSE 'assistant' END,
           'message ' || k || ' of conversation ' || g,
           json_build_object('role', CASE WHEN k % 2 = 1 THEN 'user' ELSE 'assistant' END,
                             'content', 'message ' || k || ' of conversation ' || g),
           now() - g * (:span / :conversations) * interval '1 second' + k * interval '1 minute'
    FROM generate_series(1, :conversations) AS g, generate_series(1, 4) AS k
    ORDER BY g DESC, k
    """,
    """
    INSERT INTO usage_logs (conversation_id, model, requests, prompt_tokens,
                            completion_tokens, total_tokens, timestamp)
    SELECT 'conv-' || g, CASE WHEN k = 1 THEN 'gpt-4.1' ELSE 'gpt-4.1-mini' END, 1,
           100 + g % 500, 20 + g % 50, 120 + g % 500 + g % 50,
           now() - g * (:span / :conversations) * interval '1 second' + k * interval '1 minute'
    FROM generate_series(1, :conversations) AS g, generate_series(1, 2) AS k
    ORDER BY g DESC, k
    """,
    f"""
    INSERT INTO conversations (id, user_id) VALUES ('{LONG_CONVERSATION}', 'user-long')
    """,
    f"""
    INSERT INTO messages (conversation_id, role, content, item)
    SELECT '{LONG_CONVERSATION}', 'user', 'line ' || k,
           json_build_object('role', 'user', 'content', 'line ' || k)
    FROM generate_series(1, {LONG_CONVERSATION_ITEMS}) AS k ORDER BY k
    """,
]


@contextmanager
def bench_database(admin_url: str, conversations: int) -> Iterator[str]:
    """A fresh, migrated, filled database on the admin URL's server; dropped at the end."""
    with scratch_database(admin_url, "agents_sessions_bench_ui") as scratch:
        url = scratch.url
        engine = create_engine(url)
        started = time.perf_counter()
        with engine.begin() as connection:
            for statement in _SEED:
                connection.execute(
                    text(statement),
                    {"conversations": conversations, "span": 30 * 86400.0},
                )
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("ANALYZE"))
        engine.dispose()
        print(f"filled {conversations:,} conversations in {time.perf_counter() - started:.0f} s")
        yield url


def pages(client: TestClient, conversations: int) -> dict[str, tuple[str, dict[str, Any]]]:
    """The page requests to time: ``name -> (path, query)``."""
    first = client.get("/")
    deep_day = (datetime.now(timezone.utc) - timedelta(days=20)).date().isoformat()
    cursor_page = client.get("/", params={"to": deep_day})
    assert first.status_code == cursor_page.status_code == 200
    middle = f"conv-{conversations // 2}"
    return {
        "conversations, first page": ("/", {}),
        "conversations, 20 days back": ("/", {"to": deep_day}),
        "conversations of a user": ("/", {"user": "user-7"}),
        "conversation (4 items)": ("/conversation", {"id": middle}),
        f"conversation ({LONG_CONVERSATION_ITEMS:,} items, first 200)": (
            "/conversation",
            {"id": LONG_CONVERSATION},
        ),
        "download (JSON Lines)": ("/export", {"id": middle}),
        "usage, 24 h": ("/usage", {"window": "24h"}),
        "usage, 7 d": ("/usage", {"window": "7d"}),
        "usage, 30 d": ("/usage", {"window": "30d"}),
    }


def measure(client: TestClient, path: str, query: dict[str, Any], requests: int) -> list[float]:
    """Milliseconds of ``requests`` requests, after 3 warm-up requests."""
    for _ in range(3):
        assert client.get(path, params=query).status_code == 200
    timings = []
    for _ in range(requests):
        started = time.perf_counter()
        response = client.get(path, params=query)
        timings.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200
    return timings


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=DEFAULT_ADMIN_URL, help="admin URL")
    parser.add_argument("--conversations", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=50, help="timed requests per page")
    args = parser.parse_args()
    rows = []
    with bench_database(args.database_url, args.conversations) as url:
        # Every request reads the database (the usage page's numbers reused for 0 s),
        # then as served: the usage numbers reused for USAGE_MAX_AGE_S.
        for max_age, label in ((0.0, "uncached"), (USAGE_MAX_AGE_S, "as served")):
            app = create_app(get_store(url), usage_max_age_s=max_age)
            with TestClient(app, base_url="http://127.0.0.1:8765") as client:
                for name, (path, query) in pages(client, args.conversations).items():
                    if max_age and path != "/usage":
                        continue  # only the usage page reuses anything
                    timings = measure(client, path, query, args.requests)
                    rows.append(
                        (
                            f"{name} ({label})" if path == "/usage" else name,
                            statistics.median(timings),
                            percentile(timings, 0.95),
                            max(timings),
                        )
                    )
    print(
        f"\nexplorer pages, {args.conversations:,} conversations, "
        f"{args.requests} requests each (ms)\n"
    )
    print(f"| page | p50 | p95 | max | p95 < {TARGET_P95_MS:.0f} ms |")
    print("|---|---|---|---|---|")
    for name, p50, p95, worst in rows:
        verdict = "yes" if p95 < TARGET_P95_MS else "**no**"
        print(f"| {name} | {p50:.1f} | {p95:.1f} | {worst:.1f} | {verdict} |")


if __name__ == "__main__":
    main()
