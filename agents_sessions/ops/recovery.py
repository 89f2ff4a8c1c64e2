"""Named restore points before destructive commands, for point-in-time recovery.

A PostgreSQL server that archives its WAL can be recovered to any moment since its
last base backup. ``recovery_target_time`` needs the operator to know the moment;
a *named restore point* (``pg_create_restore_point(name)``) marks it in the WAL
itself. The destructive commands (``erase``, ``prune``, ``conversations delete``,
``import`` into a database that holds conversations, ``migrate downgrade``) call
:func:`create_restore_point` just before they change anything, and print the name,
so undoing one of them is ``recovery_target_name = '<that name>'`` (see the
deployment guide's point-in-time recovery section).

A restore point is a single WAL record written outside any transaction: it costs
nothing, stays even if the command then fails, and is only useful if the WAL is
archived. Creating one needs ``EXECUTE`` on ``pg_create_restore_point(text)``
(superusers have it; PostgreSQL revokes it from ``PUBLIC``, and a superuser may
grant it), ``wal_level`` ``replica`` or ``logical``, and a primary. Where any of
these is missing the command goes ahead without one and :class:`RestorePoint`
says why -- it never fails a command. SQLite has no point-in-time recovery:
nothing is created there (take ``agents-sessions backup`` first).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Connection, Engine, text
from sqlalchemy import exc as sa_exc

from ..db.engine import create_pooled_engine, parse_database_url

#: Every restore point the package creates is named ``agents-sessions-<command>-<UTC time>``.
RESTORE_POINT_PREFIX = "agents-sessions"

#: PostgreSQL refuses restore point names of this many bytes or more (``MAXFNAMELEN``).
MAX_RESTORE_POINT_NAME_BYTES = 64

_GRANT_ADVICE = (
    "a superuser can allow it: GRANT EXECUTE ON FUNCTION pg_create_restore_point(text) TO {role}"
)


@dataclass(frozen=True)
class RestorePoint:
    """The restore point created before a destructive command, or why there is none.

    Attributes:
        command: The command it was made for (``erase``, ``conversations-delete``...).
        name: The restore point's name (``recovery_target_name``); ``None`` when
            none was created.
        lsn: Where in the WAL it was written (``pg_create_restore_point``'s result).
        at: The server's clock when it was created -- or, when none could be, when
            that was found out: still a usable ``recovery_target_time`` just before
            the command. ``None`` on SQLite or when the server could not be asked.
        skipped_because: Why none was created; ``None`` when one was.
        note: A caveat worth knowing even when one was created (no WAL archiving).
    """

    command: str
    name: str | None
    lsn: str | None
    at: datetime | None
    skipped_because: str | None = None
    note: str | None = None

    @property
    def created(self) -> bool:
        """Whether a restore point was written."""
        return self.name is not None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ``created``, ``name``, ``lsn``, ``at``, ``skipped_because``, ``note``."""
        return {
            "created": self.created,
            "name": self.name,
            "lsn": self.lsn,
            "at": None if self.at is None else self.at.isoformat(),
            "skipped_because": self.skipped_because,
            "note": self.note,
        }

    def describe(self) -> str:
        """One line for the operator: the name to recover to, or why there is none."""
        if self.name is not None:
            line = (
                f"restore point {self.name!r} created at WAL {self.lsn}: to undo this "
                f"{self.command}, recover with recovery_target_name = '{self.name}'"
            )
        else:
            line = f"no restore point before this {self.command}: {self.skipped_because}"
            if self.at is not None:
                line += f"; to undo it, recover with recovery_target_time = '{self.at.isoformat()}'"
        return line + (f" ({self.note})" if self.note else "")


def restore_point_name(command: str, at: datetime) -> str:
    """``agents-sessions-<command>-<UTC time, to the millisecond>``.

    Milliseconds keep two commands run in the same second apart: recovery stops at
    the *first* restore point of a given name.

    Raises:
        ValueError: the name would be too long for PostgreSQL (a command name over
            about 20 characters).
    """
    moment = at.astimezone(timezone.utc)
    stamp = moment.strftime("%Y%m%dT%H%M%S") + f".{moment.microsecond // 1000:03d}Z"
    name = f"{RESTORE_POINT_PREFIX}-{command}-{stamp}"
    if len(name.encode()) >= MAX_RESTORE_POINT_NAME_BYTES:
        raise ValueError(f"restore point name {name!r} is too long for PostgreSQL")
    return name


def holds_conversations(connection: Connection) -> bool:
    """Whether the ``conversations`` table exists and has a row (that the role can see).

    A PostgreSQL role that may not read the table (a monitoring role) cannot tell:
    the answer is then ``True``, the cautious one.
    """
    if connection.dialect.name == "postgresql":
        readable = connection.execute(
            text(
                "SELECT has_table_privilege(to_regclass('conversations'), 'SELECT') "
                "WHERE to_regclass('conversations') IS NOT NULL"
            )
        ).scalar()
        if readable is None:  # no such table
            return False
        if not readable:
            return True
    elif not connection.dialect.has_table(connection, "conversations"):
        return False
    return bool(
        connection.execute(text("SELECT EXISTS (SELECT 1 FROM conversations)")).scalar_one()
    )


def _refusal(connection: Connection) -> tuple[str | None, str | None, datetime]:
    """(why no restore point can be made here, a caveat, the server's clock)."""
    row = connection.execute(
        text(
            "SELECT current_user AS role, pg_is_in_recovery() AS in_recovery, "
            "current_setting('wal_level') AS wal_level, "
            "current_setting('archive_mode') AS archive_mode, "
            "has_function_privilege('pg_catalog.pg_create_restore_point(text)', 'EXECUTE') "
            "AS may_create, clock_timestamp() AS now"
        )
    ).one()
    note = (
        "archive_mode is off: without a WAL archive there is nothing to recover from"
        if row.archive_mode == "off"
        else None
    )
    if row.in_recovery:
        return "the server is a standby (restore points are written on the primary)", None, row.now
    if row.wal_level == "minimal":
        return (
            "wal_level is minimal, too little WAL for recovery (set wal_level = replica)",
            None,
            row.now,
        )
    if not row.may_create:
        role = connection.dialect.identifier_preparer.quote(str(row.role))
        reason = f"role {row.role} may not call pg_create_restore_point(); " + _GRANT_ADVICE.format(
            role=role
        )
        return reason, note, row.now
    return None, note, row.now


def _first_line(error: BaseException) -> str:
    original = getattr(error, "orig", None) or error
    lines = [line.strip() for line in str(original).splitlines() if line.strip()]
    return lines[0] if lines else type(original).__name__


@contextmanager
def _engine_for(database: Engine | str) -> Iterator[Engine]:
    if isinstance(database, Engine):
        yield database
        return
    engine = create_pooled_engine(parse_database_url(database), pooled=False)
    try:
        yield engine
    finally:
        engine.dispose()


def create_restore_point(database: Engine | str, command: str) -> RestorePoint:
    """Mark the WAL of ``database``'s server just before ``command`` changes anything.

    ``database`` is an engine (a store's) or a URL (one connection is opened and
    closed). Never raises for a database reason: where no restore point can be
    made (SQLite, a role without the privilege, a standby, ``wal_level = minimal``,
    a failed query) the result says why, and the caller carries on.
    """
    with _engine_for(database) as engine:
        if engine.dialect.name != "postgresql":
            return RestorePoint(
                command,
                None,
                None,
                None,
                skipped_because=(
                    "SQLite has no point-in-time recovery; copy the file first "
                    "(agents-sessions backup)"
                ),
            )
        try:
            with engine.connect() as connection:
                reason, note, now = _refusal(connection)
                if reason is not None:
                    return RestorePoint(command, None, None, now, reason, note)
                name = restore_point_name(command, now)
                # Not transactional: the WAL record is written at once, and stays
                # even if what follows is rolled back.
                lsn = connection.execute(
                    text("SELECT pg_create_restore_point(:name)::text"), {"name": name}
                ).scalar_one()
                connection.commit()
                return RestorePoint(command, name, str(lsn), now, None, note)
        except sa_exc.SQLAlchemyError as exc:
            return RestorePoint(
                command,
                None,
                None,
                None,
                skipped_because=f"creating one failed: {_first_line(exc)}",
            )


__all__ = [
    "MAX_RESTORE_POINT_NAME_BYTES",
    "RESTORE_POINT_PREFIX",
    "RestorePoint",
    "create_restore_point",
    "holds_conversations",
    "restore_point_name",
]
