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

* PostgreSQL: ``pg_advisory_xact_lock`` as the first statement of Alembic's
  (single) migration transaction, released when that transaction ends.
* SQLite: the migration transaction begins with ``BEGIN IMMEDIATE`` (SQLite's one
  write lock), and DDL runs inside that transaction.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection, text

from agents_sessions.db.engine import SQLITE_WRITE_OPTION, create_pooled_engine, parse_database_url
from agents_sessions.db.migrate import RevisionRecordedConcurrently
from agents_sessions.db.models import Base, comparison_filter, is_modelled
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
        # SQLite-only indexes (see models.sqlite_only) are not expected elsewhere.
        include_object=comparison_filter(connection.dialect.name),
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


def _migrate_locked(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        _configure(connection)
        while True:
            try:
                with context.begin_transaction():
                    # A transaction-level lock inside Alembic's transaction: taken
                    # before Alembic reads the current revision, released by the
                    # COMMIT or ROLLBACK that ends the migration (or by the commit of
                    # an autocommit block, see revision 0008), so it cannot be left
                    # behind -- not even on a transaction-pooling proxy's connection.
                    connection.execute(
                        text("SELECT pg_advisory_xact_lock(:lock_id)"),
                        {"lock_id": _settings().migration_lock_id},
                    )
                    context.run_migrations()
                return
            except RevisionRecordedConcurrently:
                # A revision that commits part-way (an index built CONCURRENTLY) found
                # that another migrator recorded it meanwhile: start over from the
                # revision now recorded (usually: nothing left to do).
                continue

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
