"""The deployment guide's pg_cron batch deletes expired conversations, and only those."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from agents_sessions import PostgreSQLSession, get_store
from agents_sessions.db.engine import parse_database_url
from tests.conftest import PostgresServer

GUIDE = (Path(__file__).resolve().parents[2] / "docs" / "03_deployment_guide.md").read_text()

pytestmark = pytest.mark.postgres_only


def scheduled_sql() -> str:
    """The statement inside the guide's ``cron.schedule(..., $$ ... $$)``."""
    match = re.search(r"cron\.schedule\([^$]*\$\$(.*?)\$\$", GUIDE, re.DOTALL)
    assert match is not None, "the guide no longer shows a pg_cron schedule"
    return match.group(1)


async def test_the_pg_cron_batch_deletes_expired_conversations_only(
    postgres_server: PostgresServer,
) -> None:
    url = postgres_server.create_database()
    expiring = [
        PostgreSQLSession(f"e{n}", database_url=url, ttl=timedelta(hours=1)) for n in range(3)
    ]
    kept = PostgreSQLSession("kept", database_url=url, ttl=timedelta(hours=1))
    forever = PostgreSQLSession("forever", database_url=url)
    for session in (*expiring, kept, forever):
        await session.add_items([{"role": "user", "content": "hi"}])
    engine = create_engine(parse_database_url(url).url, poolclass=NullPool)
    with engine.begin() as connection:
        connection.execute(
            text(
                "UPDATE conversations SET expires_at = now() - interval '1 minute' "
                "WHERE id LIKE 'e%'"
            )
        )
        connection.execute(text(scheduled_sql()))
    with get_store(url).read() as repos:
        assert [repos.conversations.get(s.session_id) for s in expiring] == [None] * 3
        assert repos.messages.all("kept") and repos.messages.all("forever")
    engine.dispose()
