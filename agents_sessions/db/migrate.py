"""Programmatic Alembic: locate the shipped migrations, upgrade under a lock, check head.

The same ``migrations/env.py`` serves the ``alembic`` command line and this module:
code passes an open connection through ``Config.attributes["connection"]``, and
``env.py`` takes the cross-process migration lock on it (a PostgreSQL advisory lock,
or SQLite's write lock via ``BEGIN IMMEDIATE``) before Alembic reads the current
revision. So any number of processes may upgrade one database at once: the first
migrates, the others wait and then find nothing to do.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from sqlalchemy import Connection, Engine, inspect, text

from ..errors import InvalidArgumentError, SchemaNotAtHeadError, translate_database_errors
from ..settings import Settings, load_settings
from .engine import create_pooled_engine, mask_url, parse_database_url

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

# Alembic is imported where it is used, not here: an app whose database is at head
# never loads it (see SHIPPED_HEAD_REVISION), and ``import agents_sessions`` stays light.

#: The revision the shipped migrations end at, written down so that the check every
#: engine makes on first use needs no Alembic import. A unit test holds it equal to
#: :func:`head_revision` (the migration scripts' own answer).
SHIPPED_HEAD_REVISION = "0008"

# Alembic's `context` and `op` are process-global proxies: two migrations running in
# one process at once (two engines' first use, say) would cross their wires. The
# database lock in env.py serialises processes; this serialises threads.
_alembic_lock = threading.Lock()


def _renew_lock_in_forked_child() -> None:
    # A lock held by a parent thread at fork time would stay held in the child.
    global _alembic_lock
    _alembic_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_lock_in_forked_child)


class RevisionRecordedConcurrently(Exception):
    """Raised by a migration that commits part-way when another migrator recorded it meanwhile.

    A revision that builds an index with ``CREATE INDEX CONCURRENTLY`` (0008) commits
    the migration transaction first, which releases the migration lock: a second
    migrator can then reach the same revision. Whichever records it second raises
    this after re-taking the lock; ``migrations/env.py`` rolls back and starts over
    from the revision now recorded.
    """


def migrations_directory() -> Path:
    """Where the Alembic scripts are: inside the installed package, or the checkout.

    A built wheel carries them as the ``agents_sessions.migrations`` package; an
    editable install maps that package onto the checkout's top-level
    ``migrations/``; running from a bare checkout finds the folder next to the package.
    """
    spec = importlib.util.find_spec("agents_sessions.migrations")
    if spec is not None and spec.origin:
        return Path(spec.origin).parent
    checkout = Path(__file__).resolve().parent.parent / "migrations"
    if (checkout / "env.py").is_file():
        return checkout
    raise FileNotFoundError("the agents_sessions migrations are not installed")  # pragma: no cover


def alembic_config(
    *,
    connection: Connection | None = None,
    database_url: str | None = None,
    settings: Settings | None = None,
) -> Config:
    """An Alembic ``Config`` for the shipped migrations, without needing ``alembic.ini``.

    Pass ``connection`` to migrate on it (the caller's engine and pool), or
    ``database_url`` to let ``env.py`` open its own; with neither, ``env.py`` reads
    the URL from the settings (``DATABASE_URL``).
    """
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_directory()))
    if connection is not None:
        config.attributes["connection"] = connection
    if database_url is not None:
        config.attributes["database_url"] = database_url
    if settings is not None:
        config.attributes["settings"] = settings
    return config


@functools.lru_cache(maxsize=1)
def _script_directory() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The revision the shipped migrations end at."""
    head = _script_directory().get_current_head()
    if head is None:  # pragma: no cover - the package always ships a first revision
        raise RuntimeError("the shipped migrations have no head revision")
    return head


def current_revision(connection: Connection) -> str | None:
    """The revision the database is at (``None`` for an empty database).

    Read from Alembic's ``alembic_version`` table directly (what Alembic's own
    ``MigrationContext.get_current_heads`` reads), so the check needs no Alembic.
    """
    if not inspect(connection).has_table("alembic_version"):
        return None
    heads = connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    return heads[0] if heads else None


def upgrade(
    database_url: str | None = None, *, revision: str = "head", settings: Settings | None = None
) -> None:
    """Upgrade the database to ``revision`` (default: head), under the migration lock.

    The equivalent of ``alembic upgrade head`` from the repository root, usable
    from an installed package. ``database_url`` defaults to the settings' URL.
    """
    settings = settings or load_settings()
    url = database_url or settings.resolved_migration_url()
    parse_database_url(url)  # a bad URL fails here, with a clear message
    from alembic import command

    with translate_database_errors(), _alembic_lock:
        command.upgrade(alembic_config(database_url=url, settings=settings), revision)


def _is_known_revision(revision: str) -> bool:
    from alembic.util import CommandError as AlembicError

    try:
        return _script_directory().get_revision(revision) is not None
    except AlembicError:
        return False


def ensure_schema_at_head(engine: Engine, *, auto_migrate: bool, settings: Settings) -> None:
    """Bring the database behind ``engine`` to head, or explain why it is not.

    Called once per engine before its first operation. A database already at head
    costs one query. Otherwise, with ``auto_migrate`` the upgrade runs through
    Alembic under the migration lock; without it :class:`SchemaNotAtHeadError`
    says which command to run.
    """
    with translate_database_errors(), engine.connect() as connection:
        current = current_revision(connection)
        connection.rollback()
        if current == SHIPPED_HEAD_REVISION:
            return
        from alembic import command

        head = head_revision()
        if current is not None and not _is_known_revision(current):
            raise SchemaNotAtHeadError(
                f"the database is at revision {current}, which this version of "
                f"agents_sessions does not know (its newest is {head}); a newer release "
                "migrated it: upgrade agents_sessions"
            )
        if not auto_migrate:
            where = "empty" if current is None else f"at revision {current}"
            raise SchemaNotAtHeadError(
                f"the database {mask_url(engine.url)} is {where}, but this version of "
                f"agents_sessions needs revision {head}: run `agents-sessions migrate "
                "upgrade` (or `alembic upgrade head`) on this database as the role that "
                "owns the tables (DATABASE_MIGRATION_URL or --database-url). Nothing "
                "migrates it here: auto-migration is off for this process "
                "(AGENTS_SESSIONS_AUTO_MIGRATE=false), and agents-sessions commands other "
                "than `migrate` never migrate"
            )
        with _alembic_lock:
            if settings.migration_url is None:
                command.upgrade(alembic_config(connection=connection, settings=settings), "head")
                # A revision that ran in Alembic's autocommit_block (0008) left this
                # connection's isolation level set through SQLAlchemy, which resets it
                # on check-in to the level it first saw -- not necessarily the READ
                # COMMITTED the engine sets per connection. Never pool it again.
                connection.invalidate()
                return
            # Behind a transaction-pooling proxy: migrate on the direct URL, then make
            # sure it was this database that got migrated.
            command.upgrade(
                alembic_config(database_url=settings.resolved_migration_url(), settings=settings),
                "head",
            )
            connection.rollback()
            reached = current_revision(connection)
            connection.rollback()
            if reached != head:
                raise SchemaNotAtHeadError(
                    f"migrating through migration_url left this database at {reached!r}, "
                    f"not {head}: does migration_url point at the same database as the URL "
                    "of this store?"
                )


def downgrade(
    database_url: str | None = None, *, revision: str, settings: Settings | None = None
) -> None:
    """Downgrade the database to ``revision`` (``"base"`` removes every table).

    The equivalent of ``alembic downgrade REVISION``: the same migrations, under the
    same cross-process migration lock as :func:`upgrade`. Destroys the data of every
    table a downgraded revision drops.

    Raises:
        InvalidArgumentError: ``revision`` is unknown, or not below the current one.
    """
    settings = settings or load_settings()
    url = database_url or settings.resolved_migration_url()
    parse_database_url(url)  # a bad URL fails here, with a clear message
    from alembic import command
    from alembic.util import CommandError as AlembicError

    try:
        with translate_database_errors(), _alembic_lock:
            command.downgrade(alembic_config(database_url=url, settings=settings), revision)
    except AlembicError as exc:
        raise InvalidArgumentError(f"cannot downgrade to revision {revision!r}: {exc}") from exc


@dataclass(frozen=True)
class RevisionInfo:
    """One shipped migration.

    Attributes:
        revision: Its id (what ``alembic_version`` holds once it is applied).
        down_revisions: The revision(s) it follows; empty for the first one.
        description: The first paragraph of its docstring.
        is_head: Whether it is the newest revision.
    """

    revision: str
    down_revisions: tuple[str, ...]
    description: str
    is_head: bool


def history() -> list[RevisionInfo]:
    """The shipped migrations, newest first (what ``alembic history`` lists)."""
    revisions = []
    for script in _script_directory().walk_revisions():
        down = script.down_revision
        down_revisions = (down,) if isinstance(down, str) else tuple(down or ())
        revisions.append(
            RevisionInfo(
                revision=script.revision,
                down_revisions=down_revisions,
                description=" ".join((script.doc or "").split()),
                is_head=script.is_head,
            )
        )
    return revisions


#: Where a database stands against the shipped migrations.
SchemaState = Literal["at_head", "behind", "ahead", "empty"]


@dataclass(frozen=True)
class SchemaStatus:
    """A database's schema revision compared with the head of the shipped migrations.

    Attributes:
        current: The database's revision; ``None`` when it has no schema yet.
        head: The revision this version of agents_sessions needs.
    """

    current: str | None
    head: str

    @property
    def state(self) -> SchemaState:
        """``at_head``; ``empty`` (no schema); ``behind`` (an older revision this
        package can upgrade); ``ahead`` (a revision unknown here: a newer release
        migrated the database)."""
        if self.current == self.head:
            return "at_head"
        if self.current is None:
            return "empty"
        if not _is_known_revision(self.current):
            return "ahead"
        return "behind"

    @property
    def at_head(self) -> bool:
        """Whether the database is exactly at :attr:`head`."""
        return self.state == "at_head"

    def describe(self) -> str:
        """One sentence saying where the database stands."""
        state = self.state
        if state == "at_head":
            return f"the database is at the head revision {self.head}"
        if state == "empty":
            return (
                "the database has no schema yet; this version of agents_sessions "
                f"needs revision {self.head}"
            )
        if state == "ahead":
            return (
                f"the database is at revision {self.current}, which this version of "
                f"agents_sessions does not know (its newest is {self.head})"
            )
        return f"the database is at revision {self.current}, behind the head revision {self.head}"

    def advice(self) -> str | None:
        """What to run to bring the database to head; ``None`` when it is there."""
        state = self.state
        if state == "at_head":
            return None
        if state == "ahead":
            return (
                "a newer release of agents_sessions migrated this database: upgrade the "
                "agents_sessions package (or run `agents-sessions migrate downgrade "
                f"{self.head}` with that newer release installed)"
            )
        return (
            "run `agents-sessions migrate upgrade` (or `alembic upgrade head`) with this "
            "database URL"
        )


def schema_status_of(connection: Connection) -> SchemaStatus:
    """The :class:`SchemaStatus` of the database behind ``connection`` (one query)."""
    return SchemaStatus(current=current_revision(connection), head=head_revision())


def schema_status(
    database_url: str | None = None, *, settings: Settings | None = None
) -> SchemaStatus:
    """The :class:`SchemaStatus` of a database, on a one-off connection (no pool).

    ``database_url`` defaults to the settings' URL. A SQLite file that does not
    exist is reported as empty without creating it.
    """
    settings = settings or load_settings()
    target = parse_database_url(database_url or settings.resolved_database_url())
    if target.dialect == "sqlite" and not Path(str(target.url.database)).expanduser().exists():
        return SchemaStatus(current=None, head=head_revision())
    engine = create_pooled_engine(
        target, pooled=False, sqlite_busy_timeout_ms=settings.sqlite_busy_timeout_ms
    )
    try:
        with translate_database_errors(), engine.connect() as connection:
            return schema_status_of(connection)
    finally:
        engine.dispose()
