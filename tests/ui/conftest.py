"""Fixtures of the explorer's tests: a seeded database per backend, the app over it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from agents_sessions import get_store
from agents_sessions.db.migrate import upgrade
from agents_sessions.ui import ExplorerAccess, create_app
from tests.conftest import BACKENDS, PostgresServer
from tests.ui.seed import SeededDatabase, seed

#: The address the explorer's tests talk to (a loopback name, as a browser would use).
BASE_URL = "http://127.0.0.1:8765"


@pytest.fixture(scope="session", params=BACKENDS)
def seeded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> SeededDatabase:
    """A migrated database of each backend holding the seed conversations.

    Seeded once per test run: the explorer only reads, so its tests can share it.
    """
    if request.param == "postgresql":
        server: PostgresServer = request.getfixturevalue("postgres_server")
        url = server.create_database(prefix="agents_sessions_ui")
    else:
        url = f"sqlite:///{tmp_path_factory.mktemp('ui') / 'explorer.sqlite3'}"
    upgrade(url)
    return asyncio.run(seed(url))


@pytest.fixture
def client(seeded: SeededDatabase) -> Iterator[TestClient]:
    """The explorer over the seeded database, as served on loopback without a token."""
    app = create_app(get_store(seeded.url), ExplorerAccess.for_bind("127.0.0.1", None))
    with TestClient(app, base_url=BASE_URL) as test_client:
        yield test_client
