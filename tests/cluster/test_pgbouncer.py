"""Behind PgBouncer in transaction pooling mode.

Each test gets a fresh PgBouncer (``pgbouncer`` fixture, tests/support/pgcluster.py) in
front of a throwaway server (``pgbouncer_server``), so it can configure the pooler
and look at its admin console (``SHOW SERVERS``, ``SHOW POOLS``) and at the server
directly. In transaction mode a server connection serves one client only for the
length of a transaction; these tests show that the package keeps every guarantee
there, migrates on a direct URL (or through the pooler), reports the pooler's
refusal of startup timeouts clearly, and leaves no session state behind.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from agents_sessions import (
    ConfigurationError,
    PostgreSQLSession,
    StatementTimeoutError,
    dispose_all,
    get_store,
    load_settings,
    upgrade,
)
from agents_sessions.db.engine import TENANT_SETTING, parse_database_url
from agents_sessions.db.migrate import schema_status
from tests.support.pgcluster import Cluster, PgBouncer

pytestmark = pytest.mark.postgres_only

#: Server connections PgBouncer may open per database/user pair in the load test:
#: far fewer than the package's client-side pool (40 + 20).
SERVER_POOL = 8
CONVERSATIONS = 500
TURNS = 4
HISTORY_LIMIT = 20


def user(content: str) -> dict[str, Any]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, Any]:
    return {
        "id": f"msg_{uuid.uuid4().hex[:12]}",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": content, "annotations": [], "logprobs": []}],
    }


def database_of(url: str) -> str:
    name = make_url(url).database
    assert name is not None
    return name


def server_backends(cluster: Cluster, database: str) -> int:
    """Client backends connected to ``database`` on the server, the observer excluded."""
    rows = cluster.execute(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = %s AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
        [database],
    )
    return int(rows[0][0])


# ------------------------------------------------------------------ under load


@dataclass
class PoolSamples:
    """The pooler and the server, sampled while the load runs."""

    max_servers: int = 0  # SHOW SERVERS rows of the database (any state)
    max_server_backends: int = 0  # pg_stat_activity, counted on the server itself
    max_clients: int = 0  # SHOW POOLS cl_active + cl_waiting
    max_clients_waiting: int = 0  # SHOW POOLS cl_waiting: queued for a server connection
    samples: int = 0


def sample_pool_until(
    stop: threading.Event, bouncer: PgBouncer, database: str, samples: PoolSamples
) -> None:
    while not stop.is_set():
        servers = len(bouncer.show_servers(database))
        pools = bouncer.show_pools(database)
        clients = sum(pool["cl_active"] + pool["cl_waiting"] for pool in pools)
        waiting = sum(pool["cl_waiting"] for pool in pools)
        backends = server_backends(bouncer.server, database)
        samples.max_servers = max(samples.max_servers, servers)
        samples.max_server_backends = max(samples.max_server_backends, backends)
        samples.max_clients = max(samples.max_clients, clients)
        samples.max_clients_waiting = max(samples.max_clients_waiting, waiting)
        samples.samples += 1
        stop.wait(0.01)


@pytest.mark.parametrize("pgbouncer", [{"pool_size": SERVER_POOL}], indirect=True)
async def test_500_concurrent_conversations_through_a_small_server_pool_lose_nothing(
    pgbouncer: PgBouncer,
) -> None:
    database = database_of(pgbouncer.server.create_database())
    url = pgbouncer.url(database, pool_size=40, max_overflow=20)
    settings = load_settings(migration_url=pgbouncer.server.url(database))
    sessions = [
        PostgreSQLSession(f"load-{number}", database_url=url, settings=settings)
        for number in range(CONVERSATIONS)
    ]
    await sessions[0].get_items()  # migrates (on the direct URL) before the clock starts

    async def converse(session: PostgreSQLSession) -> list[Any]:
        written: list[Any] = []
        for turn in range(TURNS):
            history = await session.get_items(limit=HISTORY_LIMIT)
            # The only writer of this conversation must read back exactly its writes.
            assert history == written[-HISTORY_LIMIT:], (session.session_id, turn)
            new = [user(f"{session.session_id} turn {turn}"), assistant(f"reply {turn}")]
            await session.add_items(new)
            written.extend(new)
        return written

    samples = PoolSamples()
    stop = threading.Event()
    sampler = threading.Thread(
        target=sample_pool_until, args=(stop, pgbouncer, database, samples), daemon=True
    )
    sampler.start()
    started = time.perf_counter()
    try:
        results = await asyncio.gather(
            *(converse(session) for session in sessions), return_exceptions=True
        )
    finally:
        elapsed = time.perf_counter() - started
        stop.set()
        sampler.join(timeout=30)
    errors = [result for result in results if isinstance(result, BaseException)]

    print(
        f"\nPgBouncer transaction pooling (default_pool_size={SERVER_POOL}), client pool "
        f"40+20: {CONVERSATIONS} conversations, {CONVERSATIONS * TURNS} turns "
        f"(get_items(limit={HISTORY_LIMIT}) + add_items(2 items)) in {elapsed:.1f}s; "
        f"max server connections used: {samples.max_servers} (SHOW SERVERS), "
        f"{samples.max_server_backends} (pg_stat_activity); max clients: "
        f"{samples.max_clients} ({samples.max_clients_waiting} waiting at once); "
        f"{samples.samples} samples; errors: {len(errors)}"
    )
    assert errors == [], errors[:3]
    assert samples.samples > 0
    assert samples.max_servers <= SERVER_POOL
    assert samples.max_server_backends <= SERVER_POOL
    # The point of the exercise: more clients than server connections.
    assert samples.max_clients > SERVER_POOL
    for session, written in zip(sessions, results, strict=True):
        assert await session.get_items() == written
    rows = pgbouncer.server.execute("SELECT count(*) FROM messages", database=database)
    assert rows[0][0] == CONVERSATIONS * TURNS * 2


# ------------------------------------------------------------------ migrations


@dataclass
class OwnedDatabase:
    """A database owned by a migrator role: its tables are owned by whoever migrated."""

    name: str
    owner: str
    direct_url: str  # as the owner, straight to the server
    bounced_url: str  # as the superuser, through PgBouncer


@pytest.fixture
def owned_database(pgbouncer_server: Cluster, pgbouncer: PgBouncer) -> Iterator[OwnedDatabase]:
    suffix = uuid.uuid4().hex[:10]
    name, owner = f"owned_{suffix}", f"migrator_{suffix}"
    pgbouncer_server.execute(f'CREATE ROLE "{owner}" LOGIN')
    pgbouncer_server.execute(f'CREATE DATABASE "{name}" OWNER "{owner}"')
    try:
        yield OwnedDatabase(
            name=name,
            owner=owner,
            direct_url=pgbouncer_server.url(name, user=owner),
            bounced_url=pgbouncer.url(name),
        )
    finally:
        dispose_all()
        pgbouncer_server.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        pgbouncer_server.execute(f'DROP ROLE IF EXISTS "{owner}"')


def table_owners(cluster: Cluster, database: str) -> dict[str, str]:
    rows = cluster.execute(
        "SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'public'",
        database=database,
    )
    return {str(table): str(owner) for table, owner in rows}


def test_upgrade_runs_on_the_migration_url_not_through_pgbouncer(
    owned_database: OwnedDatabase, pgbouncer: PgBouncer, pgbouncer_server: Cluster
) -> None:
    settings = load_settings(
        database_url=owned_database.bounced_url, migration_url=owned_database.direct_url
    )

    upgrade(settings=settings)

    assert schema_status(owned_database.direct_url).at_head
    # The migrator role created every table, and PgBouncer never saw the database.
    owners = table_owners(pgbouncer_server, owned_database.name)
    assert set(owners) >= {"alembic_version", "conversations", "messages", "usage_logs"}
    assert set(owners.values()) == {owned_database.owner}
    assert pgbouncer.show_pools(owned_database.name) == []


async def test_auto_migration_on_first_use_runs_on_the_migration_url(
    owned_database: OwnedDatabase, pgbouncer: PgBouncer, pgbouncer_server: Cluster
) -> None:
    settings = load_settings(migration_url=owned_database.direct_url)
    session = PostgreSQLSession(
        "first-use", database_url=owned_database.bounced_url, settings=settings
    )

    await session.add_items([user("hello")])

    assert await session.get_items() == [user("hello")]
    owners = table_owners(pgbouncer_server, owned_database.name)
    assert set(owners.values()) == {owned_database.owner}
    # ...while the session's own statements went through PgBouncer.
    assert [pool["user"] for pool in pgbouncer.show_pools(owned_database.name)] == ["postgres"]


def test_migrating_through_pgbouncer_itself_works_its_lock_is_transaction_scoped(
    pgbouncer: PgBouncer, pgbouncer_server: Cluster
) -> None:
    """No migration_url: the advisory lock lives and dies with the migration transaction,
    which PgBouncer keeps on one server connection, so the pooler cannot strand it."""
    database = database_of(pgbouncer_server.create_database())
    url = pgbouncer.url(database)
    lock_id = load_settings().migration_lock_id
    holder_engine = create_engine(parse_database_url(url).url, poolclass=NullPool)
    failures: list[BaseException] = []

    def migrate() -> None:
        try:
            upgrade(url)
        except BaseException as exc:  # reported below
            failures.append(exc)

    migrator = threading.Thread(target=migrate)
    try:
        with holder_engine.connect() as holder:
            # Another migrator, mid-transaction (through PgBouncer too).
            holder.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": lock_id})
            migrator.start()
            waits = 0
            deadline = time.monotonic() + 60
            while waits == 0 and migrator.is_alive() and time.monotonic() < deadline:
                time.sleep(0.05)
                waits = int(
                    pgbouncer_server.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                        "AND wait_event_type = 'Lock' AND wait_event = 'advisory'",
                        [database],
                    )[0][0]
                )
            assert waits == 1, "the upgrade never waited on the migration lock"
            assert table_owners(pgbouncer_server, database) == {}  # nothing migrated meanwhile
            holder.commit()
        migrator.join(timeout=60)
    finally:
        holder_engine.dispose()
    assert not migrator.is_alive()
    assert failures == []
    assert schema_status(pgbouncer_server.url(database)).at_head
    # Nothing outlived the migration: no advisory lock is left on any server connection.
    locks = pgbouncer_server.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'", database=database
    )
    assert locks[0][0] == 0
    # And the app keeps working through the same pooler.
    store = get_store(url)
    with store.transaction() as repos:
        repos.messages.append("after-migration", [user("hi")])
    with store.read() as repos:
        assert repos.messages.all("after-migration") == [user("hi")]


# ------------------------------------------------------------------ timeouts


@pytest.mark.parametrize("setting", ["statement_timeout_ms", "lock_timeout_ms"])
async def test_startup_timeouts_are_refused_by_pgbouncer_with_a_clear_error(
    pgbouncer: PgBouncer, pgbouncer_server: Cluster, setting: str
) -> None:
    database = database_of(pgbouncer_server.create_database())
    url = pgbouncer.url(database)
    settings = load_settings(**{setting: 1_000})
    refused = "unsupported startup parameter: options"

    with (
        pytest.raises(ConfigurationError, match=refused) as info,
        get_store(url, settings=settings).read(),
    ):
        pass
    assert "ALTER ROLE" in str(info.value)
    assert type(info.value.__cause__).__name__ == "OperationalError"
    session = PostgreSQLSession("refused", database_url=url, settings=settings)
    with pytest.raises(ConfigurationError, match=refused):
        await session.add_items([user("never stored")])
    # Nothing reached the database (the refused session cannot even migrate it).
    assert table_owners(pgbouncer_server, database) == {}


@pytest.mark.parametrize(
    "pgbouncer",
    [{"ignore_startup_parameters": ("extra_float_digits", "options")}],
    indirect=True,
)
def test_a_pgbouncer_told_to_ignore_options_silently_drops_statement_timeout_ms(
    pgbouncer: PgBouncer, pgbouncer_server: Cluster
) -> None:
    """Documents why the role is the place for timeouts behind PgBouncer."""
    database = database_of(pgbouncer_server.create_database())
    settings = load_settings(statement_timeout_ms=50, migration_url=pgbouncer_server.url(database))

    with get_store(pgbouncer.url(database), settings=settings).read() as repos:
        repos.connection.execute(text("SELECT pg_sleep(0.3)"))  # no timeout
        timeout = repos.connection.execute(text("SHOW statement_timeout")).scalar_one()
    assert timeout == "0"


@pytest.mark.parametrize("scope", ["role in database", "database"])
async def test_a_statement_timeout_set_on_the_server_applies_through_pgbouncer(
    pgbouncer: PgBouncer, pgbouncer_server: Cluster, scope: str
) -> None:
    database = database_of(pgbouncer_server.create_database())
    # Migrated first: the timeout is there for the app's statements.
    upgrade(pgbouncer_server.url(database))
    target = "ROLE postgres IN DATABASE" if scope == "role in database" else "DATABASE"
    # New server connections read it at backend start; PgBouncer has none to this
    # database yet.
    pgbouncer_server.execute(f"ALTER {target} \"{database}\" SET statement_timeout = '200ms'")
    url = pgbouncer.url(database)
    store = get_store(url)

    with pytest.raises(StatementTimeoutError), store.read() as repos:
        repos.connection.execute(text("SELECT pg_sleep(5)"))

    with store.read() as repos:
        assert repos.connection.execute(text("SHOW statement_timeout")).scalar_one() == "200ms"
    session = PostgreSQLSession("timed", database_url=url)
    await session.add_items([user("fast enough")])
    assert await session.get_items() == [user("fast enough")]


# ------------------------------------------------------------------ session state


def server_connection_state(bouncer: PgBouncer, database: str) -> list[tuple[Any, ...]]:
    """What every server connection of the pool carries, as another client sees it.

    Each probe holds a transaction open, so PgBouncer must give each one a server
    connection of its own: together they see every connection in the pool.
    """
    import psycopg2

    probes = [
        psycopg2.connect(host="127.0.0.1", port=bouncer.port, user="postgres", dbname=database)
        for _ in range(bouncer.pool_size)
    ]
    try:
        states = []
        for probe in probes:
            with probe.cursor() as cursor:
                cursor.execute(
                    "SELECT pg_backend_pid(), current_setting('default_transaction_isolation'), "
                    "current_setting('transaction_isolation'), "
                    "coalesce(current_setting(%s, true), ''), "
                    "current_setting('statement_timeout'), current_setting('search_path'), "
                    "(SELECT array_agg(name ORDER BY name) FROM pg_settings "
                    " WHERE source = 'session' AND name NOT IN ("
                    "  'application_name', 'client_encoding', 'DateStyle', 'TimeZone', "
                    "  'standard_conforming_strings'))",
                    [TENANT_SETTING],
                )
                states.append(tuple(cursor.fetchone()))
        return states
    finally:
        for probe in probes:
            probe.close()


@pytest.mark.parametrize("pgbouncer", [{"pool_size": 3}], indirect=True)
async def test_no_session_state_is_left_on_pgbouncers_server_connections(
    pgbouncer: PgBouncer, pgbouncer_server: Cluster
) -> None:
    database = database_of(pgbouncer_server.create_database())
    url = pgbouncer.url(database, pool_size=10, max_overflow=0)
    tenants = [f"tenant-{number}" for number in range(6)]

    async def work(number: int) -> None:
        tenant = tenants[number % len(tenants)]
        scoped = PostgreSQLSession(f"scoped-{number}", database_url=url, tenant_id=tenant)
        plain = PostgreSQLSession(f"plain-{number}", database_url=url, user_id=tenant)
        for session in (scoped, plain):
            await session.add_items([user("one"), user("two"), user("three")])
            assert await session.get_items(limit=2) == [user("two"), user("three")]
            assert await session.pop_item() == user("three")
            await session.clear_session()
            assert await session.get_items() == []
        with scoped.store.transaction(tenant_id=tenant) as repos:
            repos.conversations.upsert(f"scoped-{number}", user_id=tenant)

    await asyncio.gather(*(work(number) for number in range(60)))
    dispose_all()  # every client gone: only PgBouncer's server connections remain
    used = {row["remote_pid"] for row in pgbouncer.show_servers(database)}

    states = server_connection_state(pgbouncer, database)

    # The probes saw the very server connections the sessions used.
    assert len(used) == pgbouncer.pool_size
    assert {state[0] for state in states} == used
    for _pid, default_isolation, isolation, tenant, timeout, search_path, sets in states:
        assert (default_isolation, isolation) == ("read committed", "read committed")
        assert tenant == ""  # no tenant outlived its transaction
        assert (timeout, search_path) == ("0", '"$user", public')
        assert sets is None  # nothing was SET for the session
