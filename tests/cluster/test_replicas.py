"""Read replicas: lag-tolerant reads go to a streaming standby, with a fallback to the primary.

A primary and a hot standby of its own (``pg_basebackup -R``) are started for this
module by the ``replica_pair`` fixture (tests/support/pgcluster.py).
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from agents_sessions import (
    PostgreSQLSession,
    ReadOnlyDatabaseError,
    StatementTimeoutError,
    get_store,
    load_settings,
)
from agents_sessions.cli import cli
from tests.support.pgcluster import Cluster, wait_for_replay

pytestmark = pytest.mark.postgres_only


def user(text_: str) -> dict[str, Any]:
    return {"role": "user", "content": text_}


def _in_recovery(repos: Any) -> bool:
    """True when the connection reads from a standby."""
    return bool(repos.connection.execute(text("SELECT pg_is_in_recovery()")).scalar_one())


@pytest.fixture
def replicated(replica_pair: tuple[Cluster, Cluster]) -> tuple[Cluster, Cluster, str, str]:
    """A fresh database on the primary, migrated and replayed: (primary, replica, urls)."""
    primary, replica = replica_pair
    primary_url = primary.create_database()
    database = primary_url.rsplit("/", 1)[1]
    get_store(primary_url).ensure_schema()
    wait_for_replay(primary, replica)
    return primary, replica, primary_url, replica.url(database)


async def test_analytics_read_from_the_replica_after_replay(
    replicated: tuple[Cluster, Cluster, str, str],
) -> None:
    primary, replica, primary_url, replica_url = replicated
    session = PostgreSQLSession("conv-r", database_url=primary_url, user_id="u1")
    await session.add_items([user("one"), user("two")])
    wait_for_replay(primary, replica)

    store = get_store(primary_url, replica_url=replica_url)
    with store.read(lag_tolerant=True) as repos:
        assert _in_recovery(repos)
        assert repos.messages.count("conv-r") == 2
        assert [totals.key for totals in repos.usage.totals_by_user()] == []
        page = repos.conversations.list_by_user("u1")
        assert [record.id for record in page.conversations] == ["conv-r"]
    # Without lag tolerance the same store reads the primary.
    with store.read() as repos:
        assert not _in_recovery(repos)


async def test_history_reads_stay_on_the_primary_unless_opted_in(
    replicated: tuple[Cluster, Cluster, str, str],
) -> None:
    _, _, primary_url, replica_url = replicated
    default = PostgreSQLSession(
        "conv-h", database_url=primary_url, settings=load_settings(replica_url=replica_url)
    )
    await default.add_items([user("x")])
    assert await default.get_items() == [user("x")]  # read-your-writes, on the primary
    replica_store = default.store.replica
    assert replica_store is not None
    assert replica_store.pool.checkedin() == 0  # the replica was never used

    opted_in = PostgreSQLSession(
        "conv-h",
        database_url=primary_url,
        settings=load_settings(replica_url=replica_url, history_reads_from_replica=True),
    )
    await opted_in.get_items()
    assert opted_in.store.replica is not None
    assert opted_in.store.replica.pool.checkedin() == 1  # it went to the replica


async def test_a_write_on_the_replica_is_refused_clearly(
    replicated: tuple[Cluster, Cluster, str, str],
) -> None:
    _, _, _, replica_url = replicated
    on_replica = PostgreSQLSession("conv-w", database_url=replica_url)
    with pytest.raises(ReadOnlyDatabaseError, match="read-only") as refused:
        await on_replica.add_items([user("lost?")])
    assert "primary" in str(refused.value)
    with get_store(replica_url).read() as repos:
        assert repos.messages.count("conv-w") == 0


def test_stats_from_the_command_line_read_the_replica(
    replicated: tuple[Cluster, Cluster, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    primary, replica, primary_url, replica_url = replicated
    with get_store(primary_url).transaction() as repos:
        repos.messages.append("conv-s", [user("a")], user_id="stats-user")
    wait_for_replay(primary, replica)
    monkeypatch.setenv("DATABASE_REPLICA_URL", replica_url)
    # With the primary stopped, only the replica can answer.
    primary.stop()
    try:
        runner = CliRunner()
        result = runner.invoke(cli, ["--database-url", primary_url, "stats", "--json"])
        assert result.exit_code == 0, result.output
        assert '"total_conversations": 1' in result.output
        listed = runner.invoke(
            cli, ["--database-url", primary_url, "conversations", "list", "--json"]
        )
        assert listed.exit_code == 0, listed.output
        assert "conv-s" in listed.output
    finally:
        primary.start()


def test_replica_down_falls_back_to_the_primary_and_logs_it(
    replica_pair: tuple[Cluster, Cluster],
    caplog: pytest.LogCaptureFixture,
) -> None:
    primary, replica = replica_pair
    primary_url = primary.create_database()
    database = primary_url.rsplit("/", 1)[1]
    get_store(primary_url).ensure_schema()
    wait_for_replay(primary, replica)
    store = get_store(primary_url, replica_url=replica.url(database))
    replica.stop()
    try:
        with caplog.at_level(logging.WARNING, logger="agents_sessions"):
            with store.read(lag_tolerant=True) as repos:
                assert not _in_recovery(repos)  # the primary answered
            assert (
                store.run_read(lambda repos: repos.messages.count("nobody"), lag_tolerant=True) == 0
            )
        warnings = [r.getMessage() for r in caplog.records if "replica" in r.getMessage()]
        assert warnings and "reading from the primary" in warnings[0]
        assert "postgres@" in warnings[0] or "127.0.0.1" in warnings[0]
    finally:
        replica.start()


def test_a_statement_timeout_on_the_replica_is_the_querys_error_not_a_fallback(
    replicated: tuple[Cluster, Cluster, str, str],
) -> None:
    _, _, primary_url, replica_url = replicated
    settings = load_settings(statement_timeout_ms=50)
    store = get_store(primary_url, replica_url=replica_url, settings=settings)
    with pytest.raises(StatementTimeoutError):
        store.run_read(
            lambda repos: repos.connection.execute(text("SELECT pg_sleep(1)")), lag_tolerant=True
        )
    # The replica is still in use: a slow query does not mean the replica is down.
    replica = store.replica
    assert replica is not None
    with store.read(lag_tolerant=True) as repos:
        assert _in_recovery(repos)


def test_a_replica_url_gets_a_connect_timeout(
    replicated: tuple[Cluster, Cluster, str, str],
) -> None:
    _, _, primary_url, replica_url = replicated
    replica = get_store(primary_url, replica_url=replica_url).replica
    assert replica is not None
    assert replica.target.url.query["connect_timeout"] == "5"
