"""The embedded SQLite file: exactly where AGENTS_SESSIONS_SQLITE_PATH says, private."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import URL, make_url

from agents_sessions import ConfigurationError, PostgreSQLSession, load_settings


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


@pytest.mark.parametrize("name", ["what?.sqlite3", "100%41.sqlite3", "a#b%3F?x=1.sqlite3"])
async def test_the_embedded_file_is_written_exactly_at_its_configured_path(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "odd?dir%20" / name
    monkeypatch.setenv("AGENTS_SESSIONS_SQLITE_PATH", str(path))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("AGENTS_SESSIONS_DATABASE_URL", raising=False)
    settings = load_settings()
    if make_url(URL.create("sqlite", database=str(path)).render_as_string()).database != str(path):
        # SQLAlchemy before 2.1 cannot carry such a path in a URL: refused, nothing written.
        with pytest.raises(ConfigurationError, match="AGENTS_SESSIONS_SQLITE_PATH"):
            PostgreSQLSession("c", settings=settings)
        assert os.listdir(tmp_path) == []
        return

    session = PostgreSQLSession("c", settings=settings)
    await session.add_items([user("hello")])

    assert path.is_file()
    assert os.listdir(tmp_path) == ["odd?dir%20"]  # nothing written elsewhere
    assert await PostgreSQLSession("c", settings=settings).get_items() == [user("hello")]


async def test_the_embedded_file_and_its_new_directories_are_private(tmp_path: Path) -> None:
    path = tmp_path / "new" / "deeper" / "sessions.sqlite3"
    settings = load_settings(sqlite_path=path)

    await PostgreSQLSession("c", settings=settings).add_items([user("secret")])

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for directory in (path.parent, path.parent.parent):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    for companion in path.parent.glob("sessions.sqlite3-*"):  # -wal, -shm
        assert stat.S_IMODE(companion.stat().st_mode) & 0o077 == 0, companion
