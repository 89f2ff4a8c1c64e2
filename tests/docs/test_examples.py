"""The README's main job, examples/01_basic_postgres.py, runs and stores what it prints."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from sqlalchemy import create_engine, text

from agents_sessions.db.engine import parse_database_url
from tests.conftest import PostgresServer

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "01_basic_postgres.py"


def run_example(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in env.items() if key != "OPENAI_API_KEY"}  # offline
    return subprocess.run(
        [sys.executable, str(EXAMPLE)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_basic_example_runs_and_stores_the_conversation(
    fresh_database_url: object, tmp_path: Path
) -> None:
    url = fresh_database_url()  # type: ignore[operator]
    completed = run_example({**os.environ, "DATABASE_URL": url}, tmp_path)
    assert completed.returncode == 0, completed.stderr
    out = completed.stdout
    assert "You're Ada, and you're going to Lisbon." in out
    assert "[tool call]   get_weather" in out
    assert "Token usage: 4 requests, 382 prompt + 46 completion = 428 tokens" in out

    engine = create_engine(parse_database_url(url).url)
    try:
        with engine.connect() as connection:
            messages = connection.execute(text("SELECT count(*) FROM messages")).scalar_one()
            owner = connection.execute(text("SELECT user_id FROM conversations")).scalar_one()
            usage = connection.execute(text("SELECT sum(total_tokens) FROM usage_logs")).scalar()
    finally:
        engine.dispose()
    assert (messages, owner, usage) == (8, "ada", 428)


def test_basic_example_needs_no_configuration(tmp_path: Path) -> None:
    env = {
        key: value
        for key, value in os.environ.items()
        if key != "DATABASE_URL" and not key.startswith("AGENTS_SESSIONS_")
    }
    env["XDG_DATA_HOME"] = str(tmp_path / "data")
    completed = run_example(env, tmp_path)
    assert completed.returncode == 0, completed.stderr
    database = tmp_path / "data" / "agents_sessions" / "sessions.sqlite3"
    assert database.is_file()
    assert f"using the embedded SQLite database at {database}" in completed.stderr


# ---------------------------------------------------------------- examples/02

PRODUCTION_EXAMPLE = EXAMPLE.parent / "02_production_postgres.py"
TOKENS_PER_TURN = 40 + 12  # the example's scripted usage


def run_production_example(
    env: dict[str, str], cwd: Path, *arguments: str
) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in env.items() if key != "OPENAI_API_KEY"}
    return subprocess.run(
        [sys.executable, str(PRODUCTION_EXAMPLE), *arguments],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def stored_per_conversation(url: str) -> dict[str, tuple[int, int, int]]:
    """conversation id -> (messages, usage rows, total tokens)."""
    engine = create_engine(parse_database_url(url).url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT c.id,"
                    " (SELECT count(*) FROM messages m WHERE m.conversation_id = c.id),"
                    " (SELECT count(*) FROM usage_logs u WHERE u.conversation_id = c.id),"
                    " (SELECT coalesce(sum(total_tokens), 0) FROM usage_logs u"
                    "  WHERE u.conversation_id = c.id)"
                    " FROM conversations c"
                )
            ).all()
    finally:
        engine.dispose()
    return {row[0]: (int(row[1]), int(row[2]), int(row[3])) for row in rows}


def worker_pids(out: str) -> set[str]:
    return set(re.findall(r"worker \d+: running \(pid (\d+)\)", out))


def test_production_example_runs_worker_processes_on_one_postgres_database(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    url = postgres_server.create_database()
    # Pool sizes from the URL; sslmode reaches libpq (this server has no TLS).
    configured = f"{url}?pool_size=2&max_overflow=1&sslmode=disable"
    completed = run_production_example(
        {**os.environ, "DATABASE_URL": configured},
        tmp_path,
        *("--processes", "2", "--conversations", "3", "--turns", "2"),
    )
    assert completed.returncode == 0, completed.stderr
    out = completed.stdout
    assert "pool_size=2, max_overflow=1" in out
    assert "at most 2 x 3 = 6 connections in total" in out
    assert "TLS:        sslmode=disable" in out
    assert "Completed:  12 turns" in out
    assert "Stored:     6 conversations, 24 messages" in out
    assert len(worker_pids(out)) == 2  # two processes, one database

    stored = stored_per_conversation(url)
    assert sorted(stored.values()) == [(4, 2, 2 * TOKENS_PER_TURN)] * 6


def test_production_example_runs_on_the_embedded_sqlite_default(tmp_path: Path) -> None:
    env = {
        key: value
        for key, value in os.environ.items()
        if key != "DATABASE_URL" and not key.startswith("AGENTS_SESSIONS_")
    }
    env["XDG_DATA_HOME"] = str(tmp_path / "data")
    completed = run_production_example(
        env, tmp_path, *("--processes", "2", "--conversations", "2", "--turns", "2")
    )
    assert completed.returncode == 0, completed.stderr
    database = tmp_path / "data" / "agents_sessions" / "sessions.sqlite3"
    assert f"Database:   sqlite:///{database}" in completed.stdout
    assert "pool_size=2, max_overflow=0" in completed.stdout  # sized for the workload
    assert len(worker_pids(completed.stdout)) == 2
    stored = stored_per_conversation(f"sqlite:///{database}")
    assert sorted(stored.values()) == [(4, 2, 2 * TOKENS_PER_TURN)] * 4


def test_production_example_stops_gracefully_on_sigterm(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    url = postgres_server.create_database()
    env = {key: value for key, value in os.environ.items() if key != "OPENAI_API_KEY"}
    arguments = ["--processes", "2", "--conversations", "2", "--turns", "0"]  # until stopped
    process = subprocess.Popen(
        [sys.executable, str(PRODUCTION_EXAMPLE), *arguments],
        env={**env, "DATABASE_URL": url},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(240, process.kill)  # a hung example fails, never hangs CI
    watchdog.start()
    try:
        assert process.stdout is not None
        seen = ""
        # Wait until both workers have stored a turn, then ask for a shutdown.
        while len(worker_pids(seen)) < 2:
            line = process.stdout.readline()
            assert line, f"the example ended early: {seen}"
            seen += line
        process.send_signal(signal.SIGTERM)
        rest, errors = process.communicate()
    finally:
        watchdog.cancel()
    out = seen + rest
    assert process.returncode == 0, errors
    assert "received SIGTERM: stopping after the turns in flight" in out
    completed = re.search(r"Completed:  (\d+) turns", out)
    assert completed is not None, out

    # Every conversation stopped between turns: whole turns only, each with its usage.
    stored = stored_per_conversation(url)
    assert len(stored) == 4
    for messages, usage_rows, tokens in stored.values():
        assert messages == 2 * usage_rows
        assert usage_rows >= 1
        assert tokens == usage_rows * TOKENS_PER_TURN
    assert sum(usage_rows for _, usage_rows, _ in stored.values()) == int(completed.group(1))
