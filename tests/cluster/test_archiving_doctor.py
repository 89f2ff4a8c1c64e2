"""``agents-sessions doctor`` reports WAL archiving, on throwaway servers in each state.

Off with no data (ok), off with conversations (warning), on with nothing archived
yet (warning), on without a command (warning), archived (ok, with the last WAL file
and its age), failing (failure, exit status 1), and fixed again (ok, the earlier
failures counted). A standby's judgement is in tests/unit/test_archiving.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy.engine import make_url

from agents_sessions import dispose_all, get_store
from agents_sessions.cli import cli
from agents_sessions.errors import ExitCode
from tests.support.pgcluster import Cluster

pytestmark = pytest.mark.postgres_only


@pytest.fixture(autouse=True)
def _close_pools() -> Iterator[None]:
    yield
    dispose_all()


def archiving_check(url: str, *, exit_code: int = 0) -> dict[str, Any]:
    """Run ``agents-sessions doctor --json``; its ``archiving`` check."""
    result = CliRunner().invoke(cli, ["--database-url", url, "doctor", "--json"])
    assert result.exit_code == exit_code, result.output
    (check,) = [c for c in json.loads(result.stdout)["checks"] if c["name"] == "archiving"]
    return dict(check)


def migrated_database(cluster: Cluster, *, with_conversation: bool) -> str:
    url = cluster.create_database()
    store = get_store(url)
    store.ensure_schema()
    if with_conversation:
        with store.transaction() as repositories:
            repositories.messages.append("c-1", [{"role": "user", "content": "keep me"}])
    return url


def test_archiving_off_is_a_warning_once_the_database_holds_conversations(
    throwaway_cluster: Cluster,
) -> None:
    empty = migrated_database(throwaway_cluster, with_conversation=False)
    check = archiving_check(empty)
    assert check["status"] == "ok"
    assert "archive_mode=off" in check["detail"] and "no conversations yet" in check["detail"]

    holding = migrated_database(throwaway_cluster, with_conversation=True)
    check = archiving_check(holding)
    assert check["status"] == "warn"
    assert "archive_mode=off" in check["detail"]
    assert "archive_mode = on" in check["advice"] and "pgbackrest" in check["advice"]


def test_archiving_on_reports_the_last_archived_wal_and_its_age(
    archiving_cluster: Cluster,
) -> None:
    url = migrated_database(archiving_cluster, with_conversation=True)
    check = archiving_check(url)
    assert check["status"] == "warn"  # data, but not one WAL file archived yet
    assert "nothing archived yet" in check["detail"] and "pg_switch_wal" in check["advice"]

    walfile = archiving_cluster.switch_wal()

    check = archiving_check(url)
    assert check["status"] == "ok", check
    assert f"last archived {walfile}" in check["detail"] and " s ago" in check["detail"]
    assert "no failures" in check["detail"] and "archive_timeout=0" in check["detail"]

    # A role that may not read archive_command (superusers and pg_read_all_settings
    # only) gets the same answer from pg_stat_archiver.
    archiving_cluster.execute("CREATE ROLE plain LOGIN")
    plain = make_url(url).set(username="plain").render_as_string(hide_password=False)
    result = CliRunner().invoke(cli, ["--database-url", plain, "doctor", "--json"])
    (check,) = [c for c in json.loads(result.stdout)["checks"] if c["name"] == "archiving"]
    assert check["status"] == "ok" and f"last archived {walfile}" in check["detail"]


def wait_for_archive_failure(cluster: Cluster, timeout: float = 30.0) -> None:
    """Write, close the WAL file, and wait for the archiver to fail on it."""
    # pg_switch_wal() does nothing when no WAL was written since the last switch.
    cluster.execute("CREATE TABLE IF NOT EXISTS wal_filler AS SELECT 1 AS n")
    cluster.execute("SELECT pg_switch_wal()")
    deadline = time.monotonic() + timeout
    while cluster.execute("SELECT failed_count FROM pg_stat_archiver")[0][0] == 0:
        assert time.monotonic() < deadline, cluster.log_tail()
        time.sleep(0.05)


def set_archive_command(cluster: Cluster, command: str | None) -> None:
    """``ALTER SYSTEM`` the command (``None``: back to postgresql.conf's) and reload."""
    if command is None:
        cluster.execute("ALTER SYSTEM RESET archive_command")
    else:
        cluster.execute("ALTER SYSTEM SET archive_command = %s", [command])
    cluster.execute("SELECT pg_reload_conf()")
    # The reload is asynchronous: wait until a new connection sees the new value.
    expected = command if command is not None else cluster.archive_command
    deadline = time.monotonic() + 30
    while cluster.execute("SHOW archive_command") != [(expected,)]:
        assert time.monotonic() < deadline, cluster.log_tail()
        time.sleep(0.02)


def test_failing_archiving_fails_the_doctor_until_it_is_fixed(archiving_cluster: Cluster) -> None:
    url = migrated_database(archiving_cluster, with_conversation=True)
    archiving_cluster.switch_wal()

    set_archive_command(archiving_cluster, "")
    check = archiving_check(url)
    assert check["status"] == "warn" and "no archive_command" in check["detail"], check

    set_archive_command(archiving_cluster, "false")
    wait_for_archive_failure(archiving_cluster)
    check = archiving_check(url, exit_code=ExitCode.PROBLEM)
    assert check["status"] == "fail"
    assert "archiving is failing" in check["detail"] and "failed attempts" in check["detail"]
    assert "pg_wal" in check["advice"] and "server log" in check["advice"]

    set_archive_command(archiving_cluster, None)
    walfile = archiving_cluster.switch_wal()
    check = archiving_check(url)
    assert check["status"] == "ok", check
    assert f"last archived {walfile}" in check["detail"]
    assert "failed attempts" in check["detail"]  # the history stays visible
