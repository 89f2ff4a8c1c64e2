"""Plain `make test` finds a server on a Unix socket and hands the suite a URL that works."""

from __future__ import annotations

import socket

import pytest

from agents_sessions import PostgreSQLSession
from tests.conftest import PostgresServer
from tests.support.pgcluster import SUPERUSER, Cluster
from tests.support.postgres_discovery import LIBPQ_VARIABLES, find_postgres

pytestmark = pytest.mark.postgres_only


async def test_a_server_found_on_a_unix_socket_gets_a_url_the_whole_suite_can_use(
    throwaway_cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("TEST_DATABASE_URL", *LIBPQ_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    # The throwaway server listens on its own port and socket directory; only the
    # socket directory is named, as /var/run/postgresql would be.
    monkeypatch.setenv("PGPORT", str(throwaway_cluster.port))
    monkeypatch.setenv("PGUSER", SUPERUSER)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"postgresql://postgres@127.0.0.1:{probe.getsockname()[1]}/postgres"

    found = find_postgres(
        socket_directories=[str(throwaway_cluster.directory)], tcp_url=closed, docker=False
    )

    # Found over the socket; the same server answers on 127.0.0.1, so its URL is a TCP one.
    assert found.how == (
        f"{SUPERUSER}@127.0.0.1:{throwaway_cluster.port}/postgres, "
        f"found via the Unix socket in {throwaway_cluster.directory}"
    )
    server = PostgresServer(found.url)
    try:
        session = PostgreSQLSession(
            database_url=server.create_database(), conversation_id="found-over-a-socket"
        )
        await session.add_items([{"role": "user", "content": "hello"}])
        assert await session.get_items() == [{"role": "user", "content": "hello"}]
    finally:
        server.drop_all()
    assert throwaway_cluster.execute(
        "SELECT count(*) FROM pg_database WHERE datname LIKE 'agents_sessions_test_%'"
    ) == [(0,)]
