"""Memory an agent app pays for a session backend: RSS over the Agents SDK alone.

Usage (``make bench-memory``)::

    python -m benchmarks.memory_footprint --database-url postgresql://postgres@127.0.0.1:5432/postgres

Each figure is the median of ``--runs`` fresh interpreters. Each interpreter imports
the Agents SDK (every agent app does), reads its resident set size, then runs one
snippet and reads it again: importing a backend's session class, or importing it,
constructing a session and running a first turn (``add_items`` of two items and
``get_items(limit=20)``). The turn runs on a database prepared beforehand -- migrated,
as after a deploy's ``alembic upgrade head``, or a SQLite file an earlier run created
-- so it measures an app at work, not a first migration. The libraries every
SQLAlchemy + psycopg2 backend loads are measured the same way, as the floor under
ours. A fresh database is created on the server and dropped afterwards.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._scratch import scratch_database

_PROBE = """
import asyncio, sys

def rss_kb():
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

import agents  # noqa: F401
before = rss_kb()
exec(sys.argv[1])
print(rss_kb() - before)
"""

_TURN = """
async def _first_turn(session):
    await session.add_items([{"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "hello"}])
    assert len(await session.get_items(limit=20)) >= 2
"""


def _snippets(postgres_url: str, sqlite_path: Path, sdk_sqlite_path: Path) -> dict[str, str]:
    asyncpg_url = postgres_url.replace("postgresql://", "postgresql+asyncpg://", 1)
    ours_sqlite = (
        "from agents_sessions import PostgreSQLSession\n"
        f"{_TURN}\n"
        f"s = PostgreSQLSession('memory', database_url={f'sqlite:///{sqlite_path}'!r})\n"
        "asyncio.run(_first_turn(s))"
    )
    ours_postgres = (
        "from agents_sessions import PostgreSQLSession\n"
        f"{_TURN}\n"
        f"s = PostgreSQLSession('memory', database_url={postgres_url!r})\n"
        "asyncio.run(_first_turn(s))"
    )
    sdk_sqlite = (
        "from agents import SQLiteSession\n"
        f"{_TURN}\n"
        f"asyncio.run(_first_turn(SQLiteSession('memory', {str(sdk_sqlite_path)!r})))"
    )
    sdk_sqlalchemy = (
        "from agents.extensions.memory.sqlalchemy_session import SQLAlchemySession\n"
        f"{_TURN}\n"
        f"s = SQLAlchemySession.from_url('memory', url={asyncpg_url!r}, create_tables=True)\n"
        "asyncio.run(_first_turn(s))"
    )
    return {
        "import agents_sessions": "import agents_sessions",
        "from agents_sessions import PostgreSQLSession": (
            "from agents_sessions import PostgreSQLSession"
        ),
        "ours, embedded SQLite file: import + first turn": ours_sqlite,
        "ours, PostgreSQL: import + first turn": ours_postgres,
        "floor: import sqlalchemy": "import sqlalchemy",
        "floor: sqlalchemy + its sqlite dialect": "import sqlalchemy.dialects.sqlite, sqlite3",
        "floor: sqlalchemy + its postgresql dialect + psycopg2": (
            "import sqlalchemy.dialects.postgresql, psycopg2"
        ),
        "pydantic-settings (our settings)": "import pydantic_settings",
        "SDK SQLiteSession: import + first turn": sdk_sqlite,
        "SDK SQLAlchemySession (asyncpg): import + first turn": sdk_sqlalchemy,
    }


def _median_mb(label: str, snippet: str, runs: int, cwd: Path) -> float:
    samples = []
    for _ in range(runs):
        done = subprocess.run(
            [sys.executable, "-c", _PROBE, snippet],
            capture_output=True,
            text=True,
            cwd=cwd,
            check=False,
        )
        if done.returncode != 0:
            # The label, not the snippet: a snippet may hold a password in its URL.
            raise SystemExit(f"probe failed: {label}\n{done.stderr}")
        samples.append(int(done.stdout.split()[-1]) / 1024)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--database-url",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="admin URL of the PostgreSQL server where the probe database is made",
    )
    parser.add_argument("--runs", type=int, default=5, help="fresh interpreters per figure")
    options = parser.parse_args(argv)
    with (
        scratch_database(options.database_url, "bench_memory") as scratch,
        tempfile.TemporaryDirectory() as directory,
    ):
        workdir = Path(directory)
        snippets = _snippets(scratch.url, workdir / "ours.sqlite3", workdir / "sdk.sqlite3")
        # One run of each first turn before measuring: migrated databases, created files.
        for label, snippet in snippets.items():
            if "first turn" in label:
                _median_mb(label, snippet, 1, workdir)
        print("| RSS over `import agents` (MB, median of fresh interpreters) | MB |")
        print("|---|---|")
        for label, snippet in snippets.items():
            print(f"| {label} | {_median_mb(label, snippet, options.runs, workdir):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
