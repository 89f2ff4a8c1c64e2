"""The throwaway-server helpers themselves: replicas replay, PgBouncer pools, cleanup cleans."""

from __future__ import annotations

import socket

import psycopg2
import pytest

from tests.support.pgcluster import Cluster, PgBouncer, wait_for_replay

pytestmark = pytest.mark.postgres_only


def test_a_replica_replays_what_the_primary_commits(replica_pair: tuple[Cluster, Cluster]) -> None:
    primary, replica = replica_pair
    database = primary.create_database().rsplit("/", 1)[1]
    primary.execute("CREATE TABLE t (n int)", database=database)
    primary.execute("INSERT INTO t SELECT generate_series(1, 100)", database=database)

    wait_for_replay(primary, replica)

    assert replica.execute("SELECT pg_is_in_recovery()") == [(True,)]
    assert replica.execute("SELECT sum(n) FROM t", database=database) == [(5050,)]
    with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
        replica.execute("INSERT INTO t VALUES (1)", database=database)


@pytest.mark.parametrize("pgbouncer", [{"pool_size": 2}], indirect=True)
def test_pgbouncer_puts_many_clients_on_pool_size_server_connections(
    pgbouncer: PgBouncer,
) -> None:
    database = pgbouncer.server.create_database().rsplit("/", 1)[1]
    clients = [psycopg2.connect(pgbouncer.url(database)) for _ in range(20)]
    try:
        for client in clients:
            client.autocommit = True
            with client.cursor() as cursor:
                cursor.execute("SELECT 1")
                assert cursor.fetchone() == (1,)
        (pool,) = pgbouncer.show_pools(database)
        assert pool["pool_mode"] == "transaction"
        assert pool["cl_active"] == 20
        assert 1 <= len(pgbouncer.show_servers(database)) <= 2
        # What the server itself sees.
        server_side = pgbouncer.server.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", [database]
        )[0][0]
        assert 1 <= server_side <= 2
    finally:
        for client in clients:
            client.close()


def test_cleanup_stops_the_server_and_removes_its_directory() -> None:
    cluster = Cluster(name="cleanup")
    cluster.start()
    assert cluster.execute("SELECT 1") == [(1,)]
    directory, port = cluster.directory, cluster.port

    cluster.cleanup()
    cluster.cleanup()  # idempotent

    assert not directory.exists()
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", port))
