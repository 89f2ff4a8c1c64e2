"""The README's main job, examples/01_basic_postgres.py, runs and stores what it prints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import create_engine, text

from agents_sessions.engine import parse_database_url

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "01_basic_postgres.py"


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
