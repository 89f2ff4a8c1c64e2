"""The README's promise: plain ``make test`` -- no TEST_DATABASE_URL -- runs the PostgreSQL tests
wherever a PostgreSQL server is reachable, and drops every database it created.

Each test runs a small selection of the suite in a child pytest whose environment has no
``TEST_DATABASE_URL`` (nor CI's demand for PostgreSQL, so a failed discovery would show as
skips) and reads its JUnit report: every selected test passed, none skipped.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tests.conftest import PostgresServer
from tests.support.postgres_discovery import LIBPQ_VARIABLES, SOCKET_DIRECTORIES

ROOT = Path(__file__).resolve().parents[2]
#: PostgreSQL-only tests of the core suite, a few seconds in all.
SELECTION = ["tests/integration/test_store.py", "-k", "postgres"]


def _plain_environment() -> dict[str, str]:
    environment = dict(os.environ)
    for name in (
        "TEST_DATABASE_URL",
        "CI",
        "AGENTS_SESSIONS_REQUIRE_POSTGRES",
        "AGENTS_SESSIONS_TEST_PGBOUNCER",
        "PYTEST_ADDOPTS",
    ):
        environment.pop(name, None)
    return environment


def _run_suite_selection(environment: dict[str, str], tmp_path: Path) -> tuple[str, list[str]]:
    """Run :data:`SELECTION` in a child pytest; its output and the ids of its passed tests."""
    report = tmp_path / "report.xml"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            *SELECTION,
            "-p",
            "no:cacheprovider",
            f"--junitxml={report}",
        ],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    passed: list[str] = []
    for case in ElementTree.parse(report).iter("testcase"):
        outcomes = [child.tag for child in case if child.tag in ("skipped", "failure", "error")]
        assert outcomes == [], f"{case.get('name')}: {outcomes}\n{output}"
        passed.append(str(case.get("name")))
    assert len(passed) >= 3, output
    return output, passed


def _assert_left_no_database(output: str, postgres_server: PostgresServer) -> None:
    tag = re.search(r"named agents_sessions_test_(\w+)_\*", output)
    assert tag is not None, output
    with postgres_server._engine.connect() as connection:
        left = connection.exec_driver_sql(
            "SELECT datname FROM pg_database WHERE datname LIKE %(pattern)s",
            {"pattern": f"agents_sessions_test_{tag.group(1)}_%"},
        ).all()
    assert left == []


@pytest.mark.postgres_only
def test_make_test_finds_the_server_that_the_pg_variables_name(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    # libpq's own variables, and nothing else, point at this run's server.
    url = make_url(postgres_server.admin_url)
    environment = {
        name: value for name, value in _plain_environment().items() if name not in LIBPQ_VARIABLES
    }
    host = url.host or str(url.query.get("host", ""))
    port = url.port or url.query.get("port")
    settings = {
        "PGHOST": host,
        "PGPORT": str(port or ""),
        "PGUSER": url.username or "",
        "PGPASSWORD": str(url.password or ""),
        "PGDATABASE": url.database or "",
    }
    environment.update({name: value for name, value in settings.items() if value})

    output, _passed = _run_suite_selection(environment, tmp_path)

    assert "agents_sessions prerequisites: used PostgreSQL" in output
    assert "found via the PG* environment" in output
    assert "skipped: nothing" in output
    _assert_left_no_database(output, postgres_server)


@pytest.mark.postgres_only
def test_make_test_with_no_environment_at_all_finds_the_local_server(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    url = make_url(postgres_server.admin_url)
    host = url.host or str(url.query.get("host", ""))
    local = host in ("127.0.0.1", "localhost", *SOCKET_DIRECTORIES)
    port = int(url.port or url.query.get("port") or 5432)  # type: ignore[arg-type]
    if not (local and port == 5432):
        pytest.skip(
            f"this run's server ({url.render_as_string()}) is not where a plain `make test` "
            "looks (a Unix socket or 127.0.0.1, port 5432)"
        )
    environment = {
        name: value for name, value in _plain_environment().items() if name not in LIBPQ_VARIABLES
    }

    output, _passed = _run_suite_selection(environment, tmp_path)

    assert "agents_sessions prerequisites: used PostgreSQL" in output
    assert "skipped: nothing" in output
    _assert_left_no_database(output, postgres_server)
