"""The Citus suite: the store on a throwaway 1-coordinator + 2-worker Citus cluster.

Collected only in Citus mode (``AGENTS_SESSIONS_TEST_CITUS=1``, which ``make
test-citus`` and CI set): then ``postgres_server`` (tests/conftest.py) is the Citus
cluster, shared with the core behaviour suite of the same run, and every database
it hands out is migrated and distributed. Without Citus mode these tests are not
collected (the report header says so); in Citus mode a missing Citus installation
fails the run under ``CI`` / ``AGENTS_SESSIONS_REQUIRE_POSTGRES``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from agents_sessions import dispose_all
from tests.conftest import CITUS_MODE, CitusPostgresServer, PostgresServer
from tests.support.pgcluster import CitusCluster

if not CITUS_MODE:
    collect_ignore_glob = ["test_*.py"]


def pytest_report_header(config: pytest.Config) -> str | None:
    if CITUS_MODE:
        return None
    return "agents_sessions: tests/citus not collected (run `make test-citus`)"


@pytest.fixture(scope="session")
def citus_server(postgres_server: PostgresServer) -> CitusPostgresServer:
    """The run's Citus cluster, as the server the fixtures create databases on."""
    assert isinstance(postgres_server, CitusPostgresServer)
    return postgres_server


@pytest.fixture(scope="session")
def citus(citus_server: CitusPostgresServer) -> CitusCluster:
    """The cluster itself: its coordinator and workers (to restart, inspect...)."""
    return citus_server.cluster


@pytest.fixture
def citus_url(citus_server: CitusPostgresServer) -> Iterator[str]:
    """A fresh migrated and distributed database of this test's own, dropped afterwards
    (each Citus database keeps a maintenance daemon of its own)."""
    url = citus_server.create_database("citus_test")
    yield url
    dispose_all()
    citus_server.cluster.drop_database(str(make_url(url).database))


@pytest.fixture
def strict_url(citus_url: str, citus: CitusCluster) -> Iterator[str]:
    """``citus_url`` as a role for which any multi-shard query is an error.

    ``citus.multi_task_query_log_level = 'error'`` on the role: a statement that
    Citus would fan out to several shards fails instead of running.
    """
    role = f"strict_{uuid.uuid4().hex[:8]}"
    database = make_url(citus_url).database
    # Run in the Citus database, so the role is propagated to the workers (the
    # coordinator connects to them as the same role). A superuser, so no grants are
    # needed; the point is the setting.
    citus.execute(f"CREATE ROLE {role} LOGIN SUPERUSER", database=str(database))
    citus.execute(
        f"ALTER ROLE {role} SET citus.multi_task_query_log_level = 'error'",
        database=str(database),
    )
    yield make_url(citus_url).set(username=role).render_as_string(hide_password=False)
    dispose_all()
    citus.execute(f"DROP ROLE IF EXISTS {role}", database=str(database))


@pytest.fixture
def admin_engine(citus_url: str) -> Iterator[Engine]:
    """Superuser autocommit connections to ``citus_url`` on the coordinator."""
    engine = create_engine(
        citus_url.replace("postgresql://", "postgresql+psycopg2://", 1),
        isolation_level="AUTOCOMMIT",
        poolclass=NullPool,
    )
    yield engine
    engine.dispose()
