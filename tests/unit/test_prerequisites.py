"""What the suite does when part of it cannot run here: skip loudly, fail in CI, say so once."""

from __future__ import annotations

import socket

import pytest

from tests.support import postgres_discovery, prerequisites
from tests.support.postgres_discovery import find_postgres


def _missing() -> str:
    raise prerequisites.Unavailable("no frobnicator on PATH", how="apt-get install frobnicator")


def _casual_run(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CI", "AGENTS_SESSIONS_REQUIRE_POSTGRES"):
        monkeypatch.delenv(name, raising=False)


def test_a_missing_prerequisite_skips_its_tests_saying_why_and_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _casual_run(monkeypatch)
    frobnicator = prerequisites.Prerequisite("frobnicator", _missing)

    with pytest.raises(pytest.skip.Exception) as skipped:
        frobnicator.require()

    assert str(skipped.value) == (
        "frobnicator unavailable: no frobnicator on PATH"
        " -- to run these tests: apt-get install frobnicator"
    )


@pytest.mark.parametrize("variable", ["CI", "AGENTS_SESSIONS_REQUIRE_POSTGRES"])
def test_a_missing_prerequisite_fails_the_run_when_it_demands_everything(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    _casual_run(monkeypatch)
    monkeypatch.setenv(variable, "1")
    frobnicator = prerequisites.Prerequisite("frobnicator", _missing)

    with pytest.raises(pytest.fail.Exception, match=r"frobnicator is required .*no frobnicator"):
        frobnicator.require()


def test_a_prerequisite_is_probed_once_per_run() -> None:
    calls: list[int] = []

    def probe() -> str:
        calls.append(1)
        return "/usr/bin/frobnicator"

    frobnicator = prerequisites.Prerequisite("frobnicator", probe)

    assert [frobnicator.require() for _ in range(3)] == ["/usr/bin/frobnicator"] * 3
    assert len(calls) == 1


def test_the_summary_line_counts_the_tests_skipped_for_each_missing_prerequisite(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _casual_run(monkeypatch)
    present = prerequisites.Prerequisite("PostgreSQL", lambda: "postgres@127.0.0.1:5432")
    missing = prerequisites.Prerequisite("frobnicator", _missing)
    unused = prerequisites.Prerequisite("browser", _missing)
    present.require()
    reasons: list[str] = []
    for _ in range(3):
        with pytest.raises(pytest.skip.Exception) as skipped:
            missing.require()
        reasons.append(str(skipped.value))
    reasons.append("psycopg 3 is part of the test extra")

    line = prerequisites.summary_line(reasons, among=[present, missing, unused])

    assert line == (
        "agents_sessions prerequisites: used PostgreSQL (postgres@127.0.0.1:5432); "
        "skipped: 3 test(s) needing frobnicator (no frobnicator on PATH; run them with: "
        "apt-get install frobnicator); 1 other(s) (their reasons are listed above)"
    )
    assert "browser" not in line  # never needed by this run: not reported


def test_the_summary_line_says_when_nothing_was_skipped() -> None:
    present = prerequisites.Prerequisite("PgBouncer", lambda: "/usr/sbin/pgbouncer")
    present.require()

    assert prerequisites.summary_line([], among=[present]) == (
        "agents_sessions prerequisites: used PgBouncer (/usr/sbin/pgbouncer); skipped: nothing"
    )


def test_with_no_server_anywhere_the_reason_lists_every_attempt_and_the_command_to_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    for name in ("TEST_DATABASE_URL", *postgres_discovery.LIBPQ_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"postgresql://postgres@127.0.0.1:{probe.getsockname()[1]}/postgres"
    empty_directory = str(tmp_path_factory.mktemp("no-socket-here"))

    with pytest.raises(prerequisites.Unavailable) as missing:
        find_postgres(socket_directories=[empty_directory], tcp_url=closed, docker=False)

    assert missing.value.reason.startswith("TEST_DATABASE_URL is unset and no server was found")
    assert f"{closed}: " in missing.value.reason
    assert missing.value.how == (
        "TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres make test"
    )


def test_an_unreachable_test_database_url_is_reported_and_never_replaced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("TEST_DATABASE_URL", f"postgresql://app:s3cret-pw@127.0.0.1:{port}/db")

    with pytest.raises(prerequisites.Unavailable) as missing:
        find_postgres(docker=False)

    assert missing.value.reason.startswith(
        f"TEST_DATABASE_URL (postgresql://app:***@127.0.0.1:{port}/db): cannot connect"
    )
    assert "s3cret-pw" not in str(missing.value.reason)
