"""The backends under comparison, behind one tiny interface.

Every backend is opened from a :class:`BackendConfig` inside a benchmark child
process and hands out session objects (the Agents SDK ``Session`` protocol:
``get_items``, ``add_items``, ``pop_item``) that share one connection pool of the
same size:

* ``agents_sessions`` -- :class:`agents_sessions.PostgreSQLSession` (psycopg2), the
  pool from the URL's ``?pool_size=&max_overflow=``.
* ``sqlalchemy`` -- the SDK's ``SQLAlchemySession`` on ``postgresql+asyncpg``,
  ``create_tables=True``, one shared ``AsyncEngine`` with the same pool settings.
* ``agents_sessions_sqlite`` -- :class:`agents_sessions.PostgreSQLSession` on a
  SQLite file, as the embedded default runs it (``sqlite:///<file>``, the default
  pool): compared with ``sqlite``, the SDK's backend on a file of its own.
* ``sqlite`` -- the SDK's ``SQLiteSession`` on one file (no pool: a connection per
  thread per session object, as the SDK does it).
* ``redis`` -- the SDK's ``RedisSession``, one shared client whose blocking pool
  holds at most ``pool_size + max_overflow`` connections.
* ``floor`` -- raw asyncpg with a pool and the least SQL that gives the same
  guarantees, one statement per call (:class:`FloorSession`).
* ``floor_psycopg2`` -- the same SQL on psycopg2's asynchronous connections
  (``async_=1``) driven by the event loop (``add_reader``/``add_writer``, no
  threads), a bare pool of them (:class:`Psycopg2AsyncPool`): the limit for our
  own driver.
* ``citus`` (opt-in) -- ``agents_sessions`` on a throwaway Citus cluster.

Imports happen inside the openers: a child process loads only its backend.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

BACKENDS = (
    "agents_sessions",
    "sqlalchemy",
    "agents_sessions_sqlite",
    "sqlite",
    "redis",
    "floor",
    "floor_psycopg2",
)
#: Run only when named in ``--only``: ``citus`` is agents_sessions on a throwaway Citus
#: cluster (a coordinator and two workers on this machine, tables distributed), which
#: needs the Citus extension installed. On one machine its nodes share the client's
#: cores: a correctness-under-distribution figure, not a speed-up.
#: ``agents_sessions_ttl`` and ``agents_sessions_no_search`` are agents_sessions with
#: one feature switched on or off, to report its cost: every session with a
#: time-to-live (expiry on: each append extends it), or a database without the
#: full-text search index (search indexing off; ``search`` then scans).
#: ``agents_sessions_usage`` is agents_sessions used as the Runner uses it, with
#: automatic usage capture on: each turn is a run, its read observes the run, and its
#: append carries the run's model request (as the Runner's append of a model's
#: output does), recorded in the append's transaction.
OPTIONAL_BACKENDS = (
    "citus",
    "agents_sessions_ttl",
    "agents_sessions_no_search",
    "agents_sessions_usage",
)

LABELS = {
    "agents_sessions": "agents_sessions",
    "sqlalchemy": "SDK SQLAlchemy",
    "agents_sessions_sqlite": "agents_sessions on SQLite",
    "sqlite": "SDK SQLite",
    "redis": "SDK Redis",
    "floor": "asyncpg floor",
    "floor_psycopg2": "psycopg2-async floor",
    "citus": "agents_sessions on Citus 1+2",
    "agents_sessions_ttl": "agents_sessions, expiry on",
    "agents_sessions_no_search": "agents_sessions, search index off",
    "agents_sessions_usage": "agents_sessions, usage capture on",
}

#: Backends whose data lives in the benchmark's PostgreSQL database.
POSTGRES_BACKENDS = frozenset(
    {
        "agents_sessions",
        "agents_sessions_ttl",
        "agents_sessions_no_search",
        "agents_sessions_usage",
        "sqlalchemy",
        "floor",
        "floor_psycopg2",
    }
)


class BenchSession(Protocol):
    """What the workloads call: the SDK ``Session`` protocol's data methods."""

    async def get_items(self, limit: int | None = None) -> list[Any]: ...

    async def add_items(self, items: list[Any]) -> None: ...

    async def pop_item(self) -> Any | None: ...


@dataclass(frozen=True)
class BackendConfig:
    """Where a backend's data lives and how big its pool is.

    Attributes:
        backend: One of :data:`BACKENDS`.
        postgres_url: ``postgresql://user@host:port/db`` of the benchmark database
            (PostgreSQL backends), without a driver or pool parameters.
        sqlite_path: The SQLite file (``sqlite``, ``agents_sessions_sqlite``); the
            processes of a multi-process run share it.
        redis_url: ``redis://host:port/db`` (``redis``).
        pool_size: Connections kept open.
        max_overflow: Extra connections allowed under load.
    """

    backend: str
    postgres_url: str = ""
    sqlite_path: str = ""
    redis_url: str = ""
    pool_size: int = 20
    max_overflow: int = 10

    @property
    def max_connections(self) -> int:
        """The most connections the backend may open."""
        return self.pool_size + self.max_overflow


class Backend:
    """An open backend: a session factory and a way to close what it opened."""

    def __init__(
        self,
        name: str,
        make_session: Callable[[str], BenchSession],
        close: Callable[[], Awaitable[None]],
    ) -> None:
        self.name = name
        self._make_session = make_session
        self._close = close

    def session(self, conversation_id: str) -> BenchSession:
        """A session object for ``conversation_id`` (no I/O for most backends)."""
        return self._make_session(conversation_id)

    async def close(self) -> None:
        """Release pools, clients and connections."""
        await self._close()


# ----------------------------------------------------------------------------- floor

FLOOR_SCHEMA = """
CREATE TABLE IF NOT EXISTS floor_conversations (
    id text PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS floor_messages (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    conversation_id text NOT NULL REFERENCES floor_conversations (id) ON DELETE CASCADE,
    item json NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS floor_messages_conversation_id_id
    ON floor_messages (conversation_id, id);
"""

# The conversation upsert is part of the floor because it is part of the job: it
# creates the conversation on first write and its row lock orders concurrent
# writers of one conversation (ids follow commit order), as agents_sessions does.
FLOOR_ADD = """
WITH conversation AS (
    INSERT INTO floor_conversations (id) VALUES ($1)
    ON CONFLICT (id) DO UPDATE SET updated_at = now()
    RETURNING id
)
INSERT INTO floor_messages (conversation_id, item)
SELECT conversation.id, new.item::json
FROM conversation, unnest($2::text[]) WITH ORDINALITY AS new (item, position)
ORDER BY new.position
"""

FLOOR_GET_LATEST = """
SELECT item FROM (
    SELECT id, item FROM floor_messages
    WHERE conversation_id = $1 ORDER BY id DESC LIMIT $2
) AS latest ORDER BY id
"""

FLOOR_GET_ALL = "SELECT item FROM floor_messages WHERE conversation_id = $1 ORDER BY id"

FLOOR_POP = """
DELETE FROM floor_messages
WHERE id = (SELECT max(id) FROM floor_messages WHERE conversation_id = $1)
RETURNING item
"""


class FloorSession:
    """The floor: raw asyncpg, one statement per call, JSON in and out in Python."""

    def __init__(self, pool: Any, session_id: str) -> None:
        self._pool = pool
        self.session_id = session_id

    async def add_items(self, items: list[Any]) -> None:
        """One INSERT ... SELECT FROM unnest of the serialized items."""
        if items:
            await self._pool.execute(
                FLOOR_ADD, self.session_id, [json.dumps(item) for item in items]
            )

    async def get_items(self, limit: int | None = None) -> list[Any]:
        """One SELECT: the latest ``limit`` (a backward index scan), re-ordered."""
        if limit is None:
            rows = await self._pool.fetch(FLOOR_GET_ALL, self.session_id)
        else:
            rows = await self._pool.fetch(FLOOR_GET_LATEST, self.session_id, limit)
        return [json.loads(row[0]) for row in rows]

    async def pop_item(self) -> Any | None:
        """One DELETE ... RETURNING of the newest item."""
        value = await self._pool.fetchval(FLOOR_POP, self.session_id)
        return None if value is None else json.loads(value)


# The floor's SQL in psycopg2's paramstyle (psycopg2 parses json columns itself).
_PG2_ADD = FLOOR_ADD.replace("$1", "%(id)s").replace("$2::text[]", "%(items)s::text[]")
_PG2_GET_LATEST = FLOOR_GET_LATEST.replace("$1", "%(id)s").replace("$2", "%(limit)s")
_PG2_GET_ALL = FLOOR_GET_ALL.replace("$1", "%(id)s")
_PG2_POP = FLOOR_POP.replace("$1", "%(id)s")


class Psycopg2AsyncPool:
    """A bare pool of psycopg2 asynchronous connections driven by the event loop.

    ``psycopg2.connect(..., async_=1)`` never blocks: ``conn.poll()`` says whether
    the socket must become readable or writable next, and the loop's
    ``add_reader``/``add_writer`` wake the coroutine then. No threads, no GIL
    hand-offs. A connection whose statement failed or was cancelled is closed and
    replaced (its protocol state is unknown); the pool never holds more than
    ``size`` connections.
    """

    def __init__(self, dsn: str, size: int) -> None:
        self._dsn = dsn
        self._size = size
        self._idle: Any = None  # asyncio.Queue, made on the running loop
        self._all: list[Any] = []

    async def open(self) -> None:
        """Connect ``size`` connections."""
        import asyncio

        self._idle = asyncio.Queue()
        for _ in range(self._size):
            self._idle.put_nowait(await self._connect())

    async def _connect(self) -> Any:
        import psycopg2

        connection = psycopg2.connect(self._dsn, async_=1)
        await self._wait(connection)
        self._all.append(connection)
        return connection

    @staticmethod
    async def _wait(connection: Any) -> None:
        import asyncio

        import psycopg2.extensions as ext

        loop = asyncio.get_running_loop()
        descriptor = connection.fileno()
        while True:
            state = connection.poll()
            if state == ext.POLL_OK:
                return
            ready = loop.create_future()
            if state == ext.POLL_READ:
                loop.add_reader(descriptor, ready.set_result, None)
                try:
                    await ready
                finally:
                    loop.remove_reader(descriptor)
            elif state == ext.POLL_WRITE:
                loop.add_writer(descriptor, ready.set_result, None)
                try:
                    await ready
                finally:
                    loop.remove_writer(descriptor)
            else:  # pragma: no cover - psycopg2 documents no other state
                raise RuntimeError(f"unexpected poll state {state}")

    async def fetch(self, sql: str, parameters: dict[str, Any]) -> list[tuple[Any, ...]]:
        """Run one statement on an idle connection; its rows (none for a plain write)."""
        connection = await self._idle.get()
        try:
            cursor = connection.cursor()
            cursor.execute(sql, parameters)
            await self._wait(connection)
            rows: list[tuple[Any, ...]] = cursor.fetchall() if cursor.description else []
            cursor.close()
        except BaseException:
            self._all.remove(connection)
            connection.close()
            self._idle.put_nowait(await self._connect())
            raise
        self._idle.put_nowait(connection)
        return rows

    async def close(self) -> None:
        """Close every connection."""
        for connection in self._all:
            connection.close()
        self._all.clear()


class Psycopg2FloorSession:
    """The floor's statements on :class:`Psycopg2AsyncPool`; JSON out parsed by psycopg2."""

    def __init__(self, pool: Psycopg2AsyncPool, session_id: str) -> None:
        self._pool = pool
        self.session_id = session_id

    async def add_items(self, items: list[Any]) -> None:
        """One INSERT ... SELECT FROM unnest of the serialized items."""
        if items:
            await self._pool.fetch(
                _PG2_ADD, {"id": self.session_id, "items": [json.dumps(item) for item in items]}
            )

    async def get_items(self, limit: int | None = None) -> list[Any]:
        """One SELECT: the latest ``limit`` (a backward index scan), re-ordered."""
        if limit is None:
            rows = await self._pool.fetch(_PG2_GET_ALL, {"id": self.session_id})
        else:
            rows = await self._pool.fetch(_PG2_GET_LATEST, {"id": self.session_id, "limit": limit})
        return [row[0] for row in rows]

    async def pop_item(self) -> Any | None:
        """One DELETE ... RETURNING of the newest item."""
        rows = await self._pool.fetch(_PG2_POP, {"id": self.session_id})
        return rows[0][0] if rows else None


# ----------------------------------------------------------------------------- openers


async def _open_agents_sessions(config: BackendConfig) -> Backend:
    from agents_sessions import PostgreSQLSession
    from agents_sessions.store import dispose_all

    url = f"{config.postgres_url}?pool_size={config.pool_size}&max_overflow={config.max_overflow}"

    def make(conversation_id: str) -> BenchSession:
        return PostgreSQLSession(conversation_id, database_url=url)

    async def close() -> None:
        dispose_all()

    return Backend("agents_sessions", make, close)


async def _open_agents_sessions_ttl(config: BackendConfig) -> Backend:
    from datetime import timedelta

    from agents_sessions import PostgreSQLSession
    from agents_sessions.store import dispose_all

    url = f"{config.postgres_url}?pool_size={config.pool_size}&max_overflow={config.max_overflow}"

    def make(conversation_id: str) -> BenchSession:
        return PostgreSQLSession(conversation_id, database_url=url, ttl=timedelta(days=30))

    async def close() -> None:
        dispose_all()

    return Backend("agents_sessions_ttl", make, close)


async def _open_agents_sessions_no_search(config: BackendConfig) -> Backend:
    from agents_sessions import get_store

    # The schema as migrations leave it, less the full-text index (idempotent: every
    # child of a run opens the backend).
    store = get_store(f"{config.postgres_url}?pool_size=1&max_overflow=0")
    await asyncio.to_thread(store.ensure_schema)
    with store.engine.begin() as connection:
        connection.exec_driver_sql("DROP INDEX IF EXISTS ix_messages_content_search")
    opened = await _open_agents_sessions(config)
    return Backend("agents_sessions_no_search", opened.session, opened.close)


class _RunnerTurns:
    """A session called as the Runner calls it, one run per turn, usage captured.

    ``get_items`` starts the turn's run (a fresh ``RunContextWrapper``, passed as the
    Runner passes it); the turn's model request then adds to the run's usage, and
    ``add_items`` -- the Runner's append of the model's output -- records it.
    """

    def __init__(self, session: Any) -> None:
        self._session = session
        self._run: Any = None

    async def get_items(self, limit: int | None = None) -> list[Any]:
        from agents.run_context import RunContextWrapper
        from agents.usage import Usage

        self._run = RunContextWrapper(context=None, usage=Usage())
        return list(await self._session.get_items(limit, wrapper=self._run))

    async def add_items(self, items: list[Any]) -> None:
        from agents.usage import Usage

        run, self._run = self._run, None
        if run is None:  # not after a read (the latency workload): a plain append
            await self._session.add_items(items)
            return
        run.usage.add(Usage(requests=1, input_tokens=120, output_tokens=30, total_tokens=150))
        await self._session.add_items(items, wrapper=run)

    async def pop_item(self) -> Any | None:
        return await self._session.pop_item()


async def _open_agents_sessions_usage(config: BackendConfig) -> Backend:
    opened = await _open_agents_sessions(config)

    def make(conversation_id: str) -> BenchSession:
        return _RunnerTurns(opened.session(conversation_id))

    return Backend("agents_sessions_usage", make, opened.close)


async def _open_agents_sessions_sqlite(config: BackendConfig) -> Backend:
    from agents_sessions import PostgreSQLSession
    from agents_sessions.store import dispose_all

    # No pool parameters: the embedded default's own pool, as an app without a URL gets it.
    url = f"sqlite:///{config.sqlite_path}"

    def make(conversation_id: str) -> BenchSession:
        return PostgreSQLSession(conversation_id, database_url=url)

    async def close() -> None:
        dispose_all()

    return Backend("agents_sessions_sqlite", make, close)


async def _open_sqlalchemy(config: BackendConfig) -> Backend:
    from agents.extensions.memory import SQLAlchemySession
    from sqlalchemy.ext.asyncio import create_async_engine

    url = config.postgres_url.replace("postgresql://", "postgresql+asyncpg://", 1)
    engine = create_async_engine(url, pool_size=config.pool_size, max_overflow=config.max_overflow)

    def make(conversation_id: str) -> BenchSession:
        return SQLAlchemySession(conversation_id, engine=engine, create_tables=True)

    async def close() -> None:
        await engine.dispose()

    return Backend("sqlalchemy", make, close)


async def _open_sqlite(config: BackendConfig) -> Backend:
    from agents.memory import SQLiteSession

    opened: list[SQLiteSession] = []

    def make(conversation_id: str) -> BenchSession:
        session = SQLiteSession(conversation_id, db_path=config.sqlite_path)
        opened.append(session)
        return session

    async def close() -> None:
        for session in opened:
            session.close()

    return Backend("sqlite", make, close)


async def _open_redis(config: BackendConfig) -> Backend:
    from agents.extensions.memory import RedisSession
    from redis.asyncio import BlockingConnectionPool, Redis

    pool = BlockingConnectionPool.from_url(config.redis_url, max_connections=config.max_connections)
    client = Redis(connection_pool=pool)

    def make(conversation_id: str) -> BenchSession:
        return RedisSession(conversation_id, redis_client=client)

    async def close() -> None:
        await client.aclose()
        await pool.disconnect()

    return Backend("redis", make, close)


async def _open_floor(config: BackendConfig) -> Backend:
    import asyncpg

    pool = await asyncpg.create_pool(
        config.postgres_url, min_size=config.pool_size, max_size=config.max_connections
    )

    def make(conversation_id: str) -> BenchSession:
        return FloorSession(pool, conversation_id)

    async def close() -> None:
        await pool.close()

    return Backend("floor", make, close)


async def _open_floor_psycopg2(config: BackendConfig) -> Backend:
    # A bare pool has no overflow: it opens the most connections the others may use.
    pool = Psycopg2AsyncPool(config.postgres_url, config.max_connections)
    await pool.open()

    def make(conversation_id: str) -> BenchSession:
        return Psycopg2FloorSession(pool, conversation_id)

    async def close() -> None:
        await pool.close()

    return Backend("floor_psycopg2", make, close)


_OPENERS: dict[str, Callable[[BackendConfig], Awaitable[Backend]]] = {
    "agents_sessions": _open_agents_sessions,
    "sqlalchemy": _open_sqlalchemy,
    "agents_sessions_sqlite": _open_agents_sessions_sqlite,
    "sqlite": _open_sqlite,
    "redis": _open_redis,
    "floor": _open_floor,
    "floor_psycopg2": _open_floor_psycopg2,
    # The same sessions; only the server behind the URL differs.
    "citus": _open_agents_sessions,
    "agents_sessions_ttl": _open_agents_sessions_ttl,
    "agents_sessions_no_search": _open_agents_sessions_no_search,
    "agents_sessions_usage": _open_agents_sessions_usage,
}


async def open_backend(config: BackendConfig) -> Backend:
    """Open ``config.backend`` (imports its libraries, creates its pool)."""
    return await _OPENERS[config.backend](config)


async def create_floor_schema(postgres_url: str) -> None:
    """Create the floor's two tables and its index (once per benchmark database)."""
    import asyncpg

    connection = await asyncpg.connect(postgres_url)
    try:
        await connection.execute(FLOOR_SCHEMA)
    finally:
        await connection.close()
