"""Alembic environment of agents_sessions.

Used both by the ``alembic`` command line (``alembic upgrade head`` from the
repository root) and by :mod:`agents_sessions.db.migrate`, which passes an open
connection in ``config.attributes["connection"]``.

The database URL comes from the package's settings (``DATABASE_URL`` and friends),
never from ``alembic.ini``, so credentials stay out of the repository.

Concurrency: several processes may run the upgrade against one database at the same
time (deploy jobs, or app servers auto-migrating on first use). Each takes a lock
*before* Alembic reads the current revision, so the first one migrates and the
others, once they get the lock, find the database at head and do nothing:

* PostgreSQL: a session-level advisory lock, polled for in autocommit mode before
  Alembic's migration transaction begins and released after it ends (see
  ``_postgres_migration_lock`` for why session-level, and why polled).
* SQLite: the migration transaction begins with ``BEGIN IMMEDIATE`` (SQLite's one
  write lock), and DDL runs inside that transaction.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection, text

from agents_sessions.db.engine import SQLITE_WRITE_OPTION, create_pooled_engine, parse_database_url
from agents_sessions.db.models import Base, is_modelled
from agents_sessions.settings import Settings, load_settings

config = context.config

if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _settings() -> Settings:
    settings = config.attributes.get("settings")
    return settings if isinstance(settings, Settings) else load_settings()


def _database_url() -> str:
    url = config.attributes.get("database_url")
    # The migration URL: a direct connection when the app's URL goes through a
    # transaction-pooling proxy (it defaults to the app's URL).
    return url if isinstance(url, str) else _settings().resolved_migration_url()


def _configure(connection: Connection) -> None:
    is_sqlite = connection.dialect.name == "sqlite"
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite can run DDL inside a transaction, though Alembic assumes it cannot;
        # one transaction per upgrade means a failed step leaves nothing half-done.
        transactional_ddl=True,
        render_as_batch=is_sqlite,
        compare_type=True,
        include_name=is_modelled,
    )


def run_migrations_offline() -> None:
    """``alembic upgrade head --sql``: print the SQL for review instead of running it."""
    target = parse_database_url(_database_url())
    context.configure(
        url=target.url,
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        transactional_ddl=True,
        render_as_batch=target.dialect == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


@contextmanager
def _postgres_migration_lock(connection: Connection) -> Iterator[None]:
    """Hold the migration lock (a session-level advisory lock) around the whole upgrade.

    Session-level, not transaction-level: a revision that builds an index with
    ``CREATE INDEX CONCURRENTLY`` commits inside the upgrade (Alembic's
    ``autocommit_block``), and the lock must outlive that commit, or a second
    migrator would start the same revision. It is waited for by polling
    ``pg_try_advisory_lock``, never by blocking: a concurrent index build waits for
    every transaction whose snapshot predates it, and a migrator blocked on the lock
    inside a statement would be one of them -- waiting for the lock the builder
    holds (a deadlock). Each poll is a short transaction of its own; between polls
    the waiter holds no snapshot. The lock goes when unlocked here or when the
    connection ends.
    """
    lock = {"lock_id": _settings().migration_lock_id}
    if connection.in_transaction():  # e.g. the caller read the revision first
        connection.rollback()
    # A session-level lock taken in a transaction survives its commit.
    while not connection.execute(text("SELECT pg_try_advisory_lock(:lock_id)"), lock).scalar():
        connection.commit()
        time.sleep(0.05 + random.random() * 0.1)
    connection.commit()
    try:
        yield
    finally:
        if connection.in_transaction():  # a failed upgrade is rolled back before this
            connection.rollback()
        connection.execute(text("SELECT pg_advisory_unlock(:lock_id)"), lock)
        connection.rollback()


def _migrate_locked(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        # Taken before Alembic reads the current revision, released after it
        # committed the last one.
        with _postgres_migration_lock(connection):
            _configure(connection)
            with context.begin_transaction():
                context.run_migrations()
        return

    # SQLite: the listener installed by create_pooled_engine turns this option into
    # BEGIN IMMEDIATE when Alembic begins its transaction.
    connection.execution_options(**{SQLITE_WRITE_OPTION: True})
    _configure(connection)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Migrate on the caller's connection, or on a fresh one from the settings' URL."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _migrate_locked(connection)
        return

    settings = _settings()
    engine = create_pooled_engine(
        parse_database_url(_database_url()),
        sqlite_busy_timeout_ms=settings.sqlite_busy_timeout_ms,
        pooled=False,
    )
    try:
        with engine.connect() as connection:
            _migrate_locked(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
