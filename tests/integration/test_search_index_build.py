"""The PostgreSQL search index is built while the application keeps writing."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from agents_sessions.db.engine import parse_database_url
from agents_sessions.db.migrate import head_revision, upgrade
from tests.conftest import PostgresServer

pytestmark = [
    pytest.mark.postgres_only,
    pytest.mark.direct_connection_only("watches backends"),
    pytest.mark.not_on_citus("migrations run on empty databases; tests/citus migrates its own"),
]

INSERT = text(
    "INSERT INTO messages (conversation_id, role, content, item) "
    "VALUES ('c', 'user', :content, '{}')"
)


def test_the_search_index_build_lets_writes_through_while_it_waits(
    postgres_server: PostgresServer,
) -> None:
    url = postgres_server.create_database()
    upgrade(url, revision="0006")
    engine = create_engine(parse_database_url(url).url, poolclass=NullPool)
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO conversations (id) VALUES ('c')"))
        connection.execute(INSERT, [{"content": f"old message {n}"} for n in range(100)])

    # A writer's transaction stays open: a plain CREATE INDEX would queue behind it
    # for its SHARE lock, and every later writer would queue behind that request.
    open_writer = engine.connect()
    open_writer.execute(INSERT, {"content": "written before the build, committed after"})
    failures: list[BaseException] = []

    def migrate() -> None:
        try:
            upgrade(url)
        except BaseException as exc:  # reported by the test thread
            failures.append(exc)

    migration = threading.Thread(target=migrate)
    migration.start()
    try:
        with engine.connect() as watcher:
            # Wait (bounded) until the build itself waits for the open writer.
            for _ in range(600):
                waiting = watcher.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND query ILIKE 'CREATE INDEX CONCURRENTLY%' AND wait_event_type = 'Lock'"
                    )
                ).scalar_one()
                watcher.rollback()
                if waiting:
                    break
                time.sleep(0.1)
            else:
                pytest.fail("the index build never started waiting for the open writer")
            # Meanwhile other writers go straight through (they would block on a
            # plain CREATE INDEX; lock_timeout turns blocking into an error).
            with engine.begin() as writer:
                writer.execute(text("SET LOCAL lock_timeout = '5s'"))
                writer.execute(INSERT, {"content": "written during the build"})
    finally:
        open_writer.commit()
        open_writer.close()
        migration.join(timeout=120)
    assert not failures, failures
    with engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == (
            head_revision()
        )
        valid = connection.execute(
            text(
                "SELECT indisvalid FROM pg_index "
                "WHERE indexrelid = 'ix_messages_content_search'::regclass"
            )
        ).scalar_one()
        assert valid is True
        found = connection.execute(
            text(
                "SELECT count(*) FROM messages WHERE to_tsvector('english'::regconfig, content) "
                "@@ websearch_to_tsquery('english', 'written')"
            )
        ).scalar_one()
        assert found == 2
    engine.dispose()
