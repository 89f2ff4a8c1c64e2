"""One locked conversation cannot starve the process: other calls time out, never hang.

Every worker thread can be busy waiting for one conversation's row lock (there is
one thread per pooled connection). A call for another conversation then waits for
a thread, and must get ``PoolTimeoutError`` after ``pool_timeout``, as the README
promises for an exhausted pool.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from agents_sessions import PoolTimeoutError, PostgreSQLSession, get_store
from tests.conftest import PostgresServer

pytestmark = pytest.mark.postgres_only

# Guards against the old behaviour (waiting as long as the lock is held), not timings.
HANG_GUARD_S = 30


def user(text_: str) -> dict[str, Any]:
    return {"role": "user", "content": text_}


async def test_calls_for_other_conversations_time_out_while_one_conversation_is_locked(
    postgres_server: PostgresServer,
) -> None:
    base = postgres_server.create_database()
    url = base + "?pool_size=1&max_overflow=0&pool_timeout=1&response_timeout=0"
    await PostgreSQLSession("locked", database_url=url).add_items([user("first")])
    await PostgreSQLSession("other", database_url=url).add_items([user("other's")])
    locker = create_engine(make_url(base).set(drivername="postgresql+psycopg2"))
    try:
        with locker.begin() as connection:
            # Another process holds the conversation's row lock (a long transaction).
            connection.execute(text("SELECT 1 FROM conversations WHERE id = 'locked' FOR UPDATE"))
            blocked = asyncio.ensure_future(
                PostgreSQLSession("locked", database_url=url).add_items([user("waits")])
            )
            await asyncio.sleep(0.2)  # let it take the only thread and connection

            unrelated = asyncio.ensure_future(
                PostgreSQLSession("other", database_url=url).get_items()
            )
            await asyncio.wait({unrelated}, timeout=HANG_GUARD_S)
            assert unrelated.done(), "a call for another conversation hangs behind the lock"
            with pytest.raises(PoolTimeoutError, match="pool_timeout=1"):
                await unrelated
            assert not blocked.done()
        # The lock is released: the blocked write finishes, the process recovers.
        await asyncio.wait_for(blocked, HANG_GUARD_S)
        assert await PostgreSQLSession("other", database_url=url).get_items() == [user("other's")]
        with get_store(url).read() as repos:
            assert repos.messages.all("locked") == [user("first"), user("waits")]
    finally:
        locker.dispose()
