"""Test fixtures: a real PostgreSQL server and real SQLite files, fresh databases per run.

Where PostgreSQL comes from (tests/support/postgres_discovery.py), in order:

1. ``TEST_DATABASE_URL`` (any database on the server; the tests create their own
   databases next to it and drop them afterwards);
2. a local server, found as libpq finds one (``PG*`` variables, the usual Unix sockets),
   then ``postgresql://postgres@127.0.0.1:5432/postgres``;
3. testcontainers, when a Docker engine answers;
4. nowhere: the PostgreSQL tests are skipped with a loud reason and the command that would
   run them -- unless the run demands PostgreSQL (``CI`` or
   ``AGENTS_SESSIONS_REQUIRE_POSTGRES`` set), in which case they fail.

The suite only ever creates and drops databases of its own (uniquely named
``agents_sessions_test_<run>_<id>``). Throwaway servers, TLS, replicas and PgBouncer are
found the same way (tests/support/prerequisites.py, where other suites register theirs), and
the run ends with one line saying what was skipped and why.

PgBouncer mode (``AGENTS_SESSIONS_TEST_PGBOUNCER=1``): instead, a throwaway server
(tests/support/pgcluster.py) with a transaction-pooling PgBouncer in front of it; databases
are created on the server directly, and every database URL the fixtures hand out
goes through PgBouncer. Tests marked ``direct_connection_only`` are skipped then,
with their reason.

Citus mode (``AGENTS_SESSIONS_TEST_CITUS=1``): instead, a throwaway Citus cluster
(a coordinator and two workers); every database the fixtures hand out is migrated
and its tables distributed by conversation id. Tests marked ``not_on_citus`` are
skipped then, with their reason.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from agents import set_tracing_disabled
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from agents_sessions import dispose_all
from agents_sessions.db.engine import parse_database_url
from tests.support import prerequisites
from tests.support.pgcluster import (
    CitusCluster,
    Cluster,
    PgBackRest,
    PgBouncer,
    ToolMissingError,
    check_citus_tools,
    check_server_tools,
    pgbouncer_program,
    require_program,
    server_bindir,
)
from tests.support.postgres_discovery import FoundServer, find_postgres

_TRUTHY = {"1", "true", "yes", "on"}

# Offline runs: ScriptedModel needs no API key, and there is nowhere to export traces.
set_tracing_disabled(True)


#: ``AGENTS_SESSIONS_TEST_PGBOUNCER=1``: run the PostgreSQL tests through PgBouncer.
#: Read once here: the autouse fixture below scrubs AGENTS_SESSIONS_* variables.
PGBOUNCER_MODE = os.environ.get("AGENTS_SESSIONS_TEST_PGBOUNCER", "").strip().lower() in _TRUTHY

#: PgBouncer mode: server connections per database/user pair, far fewer than the
#: clients (a session store's pool alone may open 15).
PGBOUNCER_MODE_POOL_SIZE = 5

#: ``AGENTS_SESSIONS_TEST_CITUS=1``: run the PostgreSQL tests on a throwaway Citus
#: cluster (a coordinator and two workers), every database's tables distributed.
CITUS_MODE = os.environ.get("AGENTS_SESSIONS_TEST_CITUS", "").strip().lower() in _TRUTHY

#: Citus mode: shards per table. Few: each database the tests create is distributed
#: (a shard is a table on a worker), and a turn touches one shard whatever the count.
CITUS_MODE_SHARD_COUNT = 4


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = [f"agents_sessions: this run's databases are named agents_sessions_test_{RUN_TAG}_*"]
    if CITUS_MODE:
        lines.append(
            "agents_sessions: Citus mode (AGENTS_SESSIONS_TEST_CITUS): PostgreSQL tests run "
            "on a throwaway Citus cluster (coordinator + 2 workers), tables distributed "
            f"by conversation id in {CITUS_MODE_SHARD_COUNT} shards"
        )
    if PGBOUNCER_MODE:
        lines.append(
            "agents_sessions: PgBouncer mode (AGENTS_SESSIONS_TEST_PGBOUNCER): PostgreSQL "
            f"tests go through a transaction-pooling PgBouncer, {PGBOUNCER_MODE_POOL_SIZE} "
            "server connections per database"
        )
    return lines


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # `direct_connection_only` tests look at or kill their own server backend,
    # which a transaction-pooling proxy hides: skipped in PgBouncer mode, saying why
    # (`-ra` lists every reason in the summary).
    if CITUS_MODE:
        _skip_marked(items, "not_on_citus", "Citus mode")
    if not PGBOUNCER_MODE:
        return
    for item in items:
        marker = item.get_closest_marker("direct_connection_only")
        if marker is not None:
            reason = marker.args[0] if marker.args else marker.kwargs.get("reason", "")
            item.add_marker(
                pytest.mark.skip(
                    reason="PgBouncer mode: needs a direct server connection"
                    + (f" ({reason})" if reason else "")
                )
            )


def _skip_marked(items: list[pytest.Item], marker_name: str, mode: str) -> None:
    """Skip the tests carrying ``marker_name``, with the marker's reason."""
    for item in items:
        marker = item.get_closest_marker(marker_name)
        if marker is not None:
            reason = marker.args[0] if marker.args else marker.kwargs.get("reason", "")
            item.add_marker(pytest.mark.skip(reason=f"{mode}: {reason}"))


# ---------------------------------------------------------------- prerequisites
# What parts of the suite need, found once a run (tests/support/prerequisites.py): a
# fixture calls `.require()`, which skips its tests with the reason (fails them in CI).


def _throwaway_tools(*, tls: bool = False) -> str:
    try:
        check_server_tools(tls=tls)
    except ToolMissingError as exc:
        raise prerequisites.Unavailable(
            str(exc), how="apt-get install postgresql" + (" openssl" if tls else "")
        ) from None
    return f"initdb in {server_bindir()}"


def _pgbouncer() -> str:
    try:
        return pgbouncer_program()
    except ToolMissingError as exc:
        raise prerequisites.Unavailable(str(exc), how="apt-get install pgbouncer") from None


#: The shared server of the run (tests/support/postgres_discovery.py).
POSTGRES = prerequisites.register("PostgreSQL", find_postgres)
#: `initdb`/`pg_ctl`/`pg_basebackup`: servers of the tests' own (faults, replicas, PgBouncer).
THROWAWAY_SERVERS = prerequisites.register("throwaway servers", _throwaway_tools)
#: Throwaway servers that speak TLS also need `openssl` for their certificates.
TLS_SERVERS = prerequisites.register("TLS servers", lambda: _throwaway_tools(tls=True))
PGBOUNCER = prerequisites.register("PgBouncer", _pgbouncer)


def _citus_tools() -> str:
    try:
        check_citus_tools()
    except ToolMissingError as exc:
        raise prerequisites.Unavailable(
            str(exc), how="../shared/citus/install-citus (or Citus's own packages)"
        ) from None
    return "Citus extension installed"


def _pgbackrest() -> str:
    try:
        return require_program("pgbackrest", "install it (Debian: apt-get install pgbackrest)")
    except ToolMissingError as exc:
        raise prerequisites.Unavailable(str(exc), how="apt-get install pgbackrest") from None


CITUS = prerequisites.register("Citus", _citus_tools)
PGBACKREST = prerequisites.register("pgBackRest", _pgbackrest)

#: Names every test database of this run: `agents_sessions_test_<RUN_TAG>_<id>`.
RUN_TAG = uuid.uuid4().hex[:6]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    # One line saying what this machine could not run, and why (issue: `make test` alone
    # must either run everything or say so).
    reasons: list[str] = []
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = getattr(report, "longrepr", None)
        if isinstance(longrepr, tuple) and len(longrepr) == 3:
            reasons.append(str(longrepr[2]).removeprefix("Skipped: "))
    terminalreporter.write_line(prerequisites.summary_line(reasons))


class PostgresServer:
    """A PostgreSQL server on which tests create (and drop) databases of their own."""

    #: Databases created by every server of this run (see `_close_pools_of_new_databases`).
    created_in_run = 0

    def __init__(self, admin_url: str) -> None:
        self.admin_url = parse_database_url(admin_url).url
        self._engine = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        self._created: list[str] = []

    def create_database(self, prefix: str = "agents_sessions_test") -> str:
        """Create an empty database and return its URL (with the admin credentials)."""
        name = f"{prefix}_{RUN_TAG}_{uuid.uuid4().hex[:10]}"
        with self._engine.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        self._record_created(name)
        return self.admin_url.set(database=name).render_as_string(hide_password=False)

    def _record_created(self, name: str) -> None:
        self._created.append(name)
        PostgresServer.created_in_run += 1

    def execute(self, statement: str) -> None:
        with self._engine.connect() as connection:
            connection.execute(text(statement))

    def drop_all(self) -> None:
        dispose_all()  # our pools hold connections into these databases
        with self._engine.connect() as connection:
            for name in self._created:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self._created.clear()
        self._engine.dispose()


class BouncedPostgresServer(PostgresServer):
    """PgBouncer mode: a throwaway cluster whose databases are reached through PgBouncer.

    Administration (:meth:`execute`, :attr:`admin_url`, creating and dropping
    databases) talks to the cluster directly; the URLs :meth:`create_database`
    returns go through :attr:`bouncer` (transaction pooling).
    """

    def __init__(self, cluster: Cluster, bouncer: PgBouncer) -> None:
        super().__init__(cluster.url())
        self.cluster = cluster
        self.bouncer = bouncer

    def create_database(self, prefix: str = "agents_sessions_test") -> str:
        """Create an empty database on the cluster; return its URL through PgBouncer."""
        direct = make_url(super().create_database(prefix))
        return direct.set(port=self.bouncer.port).render_as_string(hide_password=False)

    def direct_url(self, url: str) -> str:
        """``url`` (through PgBouncer) turned into the same database on the cluster."""
        return make_url(url).set(port=self.cluster.port).render_as_string(hide_password=False)


def _pgbouncer_extra_settings(bouncer: PgBouncer, settings: dict[str, str]) -> None:
    """Append ``settings`` to the ``[pgbouncer]`` section (the last one) before start."""
    with bouncer.config.open("a") as config:
        config.write("".join(f"{key} = {value}\n" for key, value in settings.items()))


def _bounced_postgres_server() -> Iterator[PostgresServer]:
    THROWAWAY_SERVERS.require()
    PGBOUNCER.require()
    with Cluster(name="bounced_suite", settings={"max_connections": "300"}) as cluster:
        bouncer = PgBouncer(
            cluster, pool_size=PGBOUNCER_MODE_POOL_SIZE, max_client_conn=2000, name="suite"
        )
        _pgbouncer_extra_settings(
            bouncer,
            {
                # Roles the tests create (row-level security, least privilege) are
                # looked up on the server (auth_query) instead of the auth file.
                "auth_user": "postgres",
                # Every test database gets pools of its own: close idle server
                # connections soon, so they never add up to max_connections.
                "server_idle_timeout": "5",
            },
        )
        with bouncer:
            server = BouncedPostgresServer(cluster, bouncer)
            try:
                yield server
            finally:
                server.drop_all()


class CitusPostgresServer(PostgresServer):
    """Citus mode: databases on a throwaway Citus cluster, handed out migrated and distributed.

    :meth:`create_database` makes the database on every node (Citus keeps its
    metadata per database), migrates it to head and distributes its tables (what an
    operator does with ``agents-sessions migrate upgrade`` and ``citus distribute``).
    """

    def __init__(self, cluster: CitusCluster) -> None:
        super().__init__(cluster.url())
        self.cluster = cluster

    def create_database(self, prefix: str = "agents_sessions_test") -> str:
        """A migrated, distributed database on the cluster; its coordinator URL."""
        from agents_sessions.db.migrate import upgrade
        from agents_sessions.ops.citus import distribute

        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        self.cluster.create_database(name)
        self._record_created(name)
        url = self.admin_url.set(database=name).render_as_string(hide_password=False)
        upgrade(url)
        engine = create_engine(
            parse_database_url(url).url, isolation_level="AUTOCOMMIT", poolclass=NullPool
        )
        try:
            with engine.connect() as connection:
                distribute(connection, shard_count=CITUS_MODE_SHARD_COUNT)
        finally:
            engine.dispose()
        return url

    def drop_all(self) -> None:
        dispose_all()
        for name in self._created:
            self.cluster.drop_database(name)
        self._created.clear()
        self._engine.dispose()


def _citus_postgres_server() -> Iterator[PostgresServer]:
    THROWAWAY_SERVERS.require()
    CITUS.require()
    with CitusCluster(workers=2, name="citus_suite") as cluster:
        server = CitusPostgresServer(cluster)
        try:
            yield server
        finally:
            server.drop_all()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The PostgreSQL server of this test run (see the module docstring)."""
    if CITUS_MODE:
        yield from _citus_postgres_server()
        return
    if PGBOUNCER_MODE:
        yield from _bounced_postgres_server()
        return
    found: FoundServer = POSTGRES.require()
    server = PostgresServer(found.url)
    try:
        yield server
    finally:
        server.drop_all()
        if found.container is not None:
            found.container.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh database for this test run, shared by the behaviour tests."""
    return postgres_server.create_database()


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh SQLite file for this test run, shared by the behaviour tests."""
    return f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'sessions.sqlite3'}"


# PgBouncer mode is about PostgreSQL: the SQLite runs would only repeat the normal pass.
BACKENDS = ["postgresql"] if PGBOUNCER_MODE or CITUS_MODE else ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each behaviour test runs once per backend."""
    return str(request.param)


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest) -> str:
    """The shared database of this run for ``backend``."""
    fixture = "postgres_url" if backend == "postgresql" else "sqlite_url"
    return str(request.getfixturevalue(fixture))


@pytest.fixture
def fresh_database_url(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> Callable[[], str]:
    """A factory of empty databases of ``backend`` (for migration and analytics tests)."""

    def make() -> str:
        if backend == "postgresql":
            server: PostgresServer = request.getfixturevalue("postgres_server")
            return server.create_database()
        return f"sqlite:///{tmp_path / f'fresh-{uuid.uuid4().hex[:8]}.sqlite3'}"

    return make


@pytest.fixture
def conversation_id() -> str:
    """A conversation id no other test uses."""
    return f"conv-{uuid.uuid4()}"


@pytest.fixture(autouse=True)
def _close_pools_of_new_databases() -> Iterator[None]:
    # A test that made databases of its own leaves their pools' idle connections open
    # until something disposes them (the databases are dropped at the end of the run).
    # Closing them when the test ends bounds what a test run holds open on the shared
    # server to one test's worth -- the matrix runs two suites against it at once.
    created_before = PostgresServer.created_in_run
    yield
    if PostgresServer.created_in_run != created_before:
        dispose_all()


@pytest.fixture(autouse=True)
def _isolated_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Tests pass URLs explicitly; a developer's DATABASE_URL or .env must not leak in,
    # and the embedded default must land in a temporary directory.
    for name in list(os.environ):
        configures_us = name == "DATABASE_URL" or name.startswith("AGENTS_SESSIONS_")
        if configures_us and name not in (
            "AGENTS_SESSIONS_REQUIRE_POSTGRES",
            "AGENTS_SESSIONS_TEST_PGBOUNCER",
            "AGENTS_SESSIONS_TEST_CITUS",
        ):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)


# ---------------------------------------------------------------- throwaway servers
# Tests that restart, crash or re-wire a server get one of their own (tests/support/pgcluster.py):
# the shared TEST_DATABASE_URL server is never restarted or reconfigured.


@pytest.fixture(scope="session")
def tls_cluster() -> Iterator[Cluster]:
    """A throwaway server that accepts TCP connections only over TLS.

    Its CA certificate (for ``sslrootcert``) is ``tls_cluster.ca.cert``; the server
    certificate names ``localhost`` and ``127.0.0.1``.
    """
    TLS_SERVERS.require()
    with Cluster(tls=True, name="tls") as cluster:
        yield cluster
        dispose_all()  # our pools hold connections into it


@pytest.fixture
def throwaway_cluster() -> Iterator[Cluster]:
    """A PostgreSQL server of this test's own, to stop, crash and restart at will."""
    THROWAWAY_SERVERS.require()
    with Cluster(name="throwaway") as cluster:
        yield cluster
        dispose_all()


@pytest.fixture
def archiving_cluster() -> Iterator[Cluster]:
    """A throwaway server that archives its WAL (``archive_mode = on``) into
    ``archiving_cluster.archive_dir``: for base backups and point-in-time recovery
    (``Cluster.base_backup``, ``switch_wal``, ``recover``)."""
    THROWAWAY_SERVERS.require()
    with Cluster(name="archiving", archive=True) as cluster:
        yield cluster
        dispose_all()


@pytest.fixture
def pgbackrest_cluster() -> Iterator[tuple[Cluster, PgBackRest]]:
    """A throwaway server archiving through pgBackRest into a repository of its own
    (stanza ``main`` created); back it up with ``backrest.run("backup", "--type=full")``
    and restore with ``backrest.recover(...)``."""
    THROWAWAY_SERVERS.require()
    PGBACKREST.require()
    cluster = Cluster(name="backrest", archive=True)
    try:
        backrest = PgBackRest(cluster)
        cluster.start()
        backrest.run("stanza-create")
        yield cluster, backrest
        dispose_all()
    finally:
        cluster.cleanup()


@pytest.fixture(scope="module")
def replica_pair() -> Iterator[tuple[Cluster, Cluster]]:
    """``(primary, replica)``: a throwaway server and its streaming standby.

    Shared by a module's tests: create databases of your own on the primary, then
    ``pgcluster.wait_for_replay(primary, replica)`` before reading them on the replica.
    """
    THROWAWAY_SERVERS.require()
    with Cluster(name="primary") as primary:
        replica = primary.make_replica()
        yield primary, replica
        dispose_all()


@pytest.fixture(scope="module")
def pgbouncer_server() -> Iterator[Cluster]:
    """The throwaway server behind the ``pgbouncer`` fixture (shared by a module)."""
    THROWAWAY_SERVERS.require()
    with Cluster(name="bounced") as cluster:
        yield cluster
        dispose_all()


@pytest.fixture
def pgbouncer(pgbouncer_server: Cluster, request: pytest.FixtureRequest) -> Iterator[PgBouncer]:
    """A fresh PgBouncer (transaction pooling) in front of ``pgbouncer_server``.

    Configure it with indirect parametrization, e.g.
    ``@pytest.mark.parametrize("pgbouncer", [{"pool_size": 3}], indirect=True)``;
    the keywords are :class:`pgcluster.PgBouncer`'s (default ``pool_size=2``).
    """
    PGBOUNCER.require()
    options: dict[str, Any] = dict(getattr(request, "param", {}))
    with PgBouncer(pgbouncer_server, **options) as bouncer:
        yield bouncer
        dispose_all()
