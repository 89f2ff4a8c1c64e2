"""Is the server's WAL being archived? The ``archiving`` check of ``agents-sessions doctor``.

Point-in-time recovery (back to just before a bad ``erase`` or ``prune``) needs a
base backup and every WAL file written since, copied away by the server's
``archive_command`` (or ``archive_library``). This reads what the server says
about that -- ``archive_mode`` and ``pg_stat_archiver`` (any role may read both)
-- and judges it:

* ``fail``: archiving is failing now (the last attempt failed after the last
  success). Nothing new reaches the archive, and the server keeps every unarchived
  WAL file in ``pg_wal`` until its disk fills;
* ``warn``: ``archive_mode`` is off on a database that holds conversations (no
  point-in-time recovery), or it is on and nothing has been archived yet although
  there is data, or (when the role may read it) no ``archive_command`` is set;
* ``ok``: otherwise, with the last archived WAL file and its age, and any earlier
  failures.

A standby archives nothing unless ``archive_mode = always``: there the primary's
archiving is what counts, and the check says so. Managed services (RDS, Cloud SQL,
Azure) archive in their own way and may show ``archive_mode`` and the archiver
differently: their point-in-time recovery is a setting of the service.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import Connection, text

from .recovery import holds_conversations

#: The outcome of the check (the doctor's ``Status``).
ArchivingStatus = Literal["ok", "warn", "fail"]

_TURN_ON = (
    "for point-in-time recovery set wal_level = replica, archive_mode = on and an "
    "archive_command (pgBackRest: archive_command = 'pgbackrest --stanza=main "
    "archive-push %p'), restart the server and take a base backup; on a managed "
    "service, turn on its point-in-time recovery / backup retention instead"
)


@dataclass(frozen=True)
class ArchiverState:
    """What the server reports about WAL archiving (``archive_mode``, ``pg_stat_archiver``).

    Attributes:
        archive_mode: ``off``, ``on`` or ``always``.
        in_recovery: The server is a standby.
        archived_count: WAL files archived since the statistics were reset.
        last_archived_wal: The newest archived WAL file, if any.
        last_archived_time: When it was archived.
        failed_count: Failed archiving attempts since the statistics were reset.
        last_failed_wal: The WAL file of the latest failure, if any.
        last_failed_time: When that was.
        archiver_configured: Whether ``archive_command`` or ``archive_library`` is
            set; ``None`` when this role may not read them (superuser or
            ``pg_read_all_settings`` only).
        archive_timeout: ``archive_timeout`` in seconds (0: off).
        now: The server's clock.
        holds_data: The database has conversations.
    """

    archive_mode: str
    in_recovery: bool
    archived_count: int
    last_archived_wal: str | None
    last_archived_time: datetime | None
    failed_count: int
    last_failed_wal: str | None
    last_failed_time: datetime | None
    archiver_configured: bool | None
    archive_timeout: int
    now: datetime
    holds_data: bool

    @property
    def failing(self) -> bool:
        """The latest archiving attempt failed (no success since)."""
        if self.last_failed_time is None:
            return False
        return self.last_archived_time is None or self.last_failed_time > self.last_archived_time


def read_archiver_state(connection: Connection) -> ArchiverState:
    """Read ``archive_mode``, ``pg_stat_archiver`` and the related settings (PostgreSQL)."""
    row = connection.execute(
        text(
            "SELECT current_setting('archive_mode') AS archive_mode, "
            "pg_is_in_recovery() AS in_recovery, "
            "current_setting('archive_timeout') AS archive_timeout, clock_timestamp() AS now, "
            "a.archived_count, a.last_archived_wal, a.last_archived_time, "
            "a.failed_count, a.last_failed_wal, a.last_failed_time "
            "FROM pg_stat_archiver AS a"
        )
    ).one()
    # archive_command is readable by superusers and pg_read_all_settings only;
    # pg_settings leaves out the rows a role may not see instead of failing.
    # archive_library appeared in PostgreSQL 15 (absent before: no row).
    configured = {
        str(name): bool(setting)
        for name, setting in connection.execute(
            text(
                "SELECT name, setting FROM pg_settings "
                "WHERE name IN ('archive_command', 'archive_library')"
            )
        )
    }
    return ArchiverState(
        archive_mode=str(row.archive_mode),
        in_recovery=bool(row.in_recovery),
        archived_count=int(row.archived_count),
        last_archived_wal=row.last_archived_wal,
        last_archived_time=row.last_archived_time,
        failed_count=int(row.failed_count),
        last_failed_wal=row.last_failed_wal,
        last_failed_time=row.last_failed_time,
        archiver_configured=any(configured.values()) if "archive_command" in configured else None,
        archive_timeout=_seconds(str(row.archive_timeout)),
        now=row.now,
        holds_data=holds_conversations(connection),
    )


def _seconds(setting: str) -> int:
    """``archive_timeout`` as SHOWn (``0``, ``60s``, ``5min``, ``1h``) in seconds."""
    units = {"ms": 0.001, "s": 1, "min": 60, "h": 3600, "d": 86400}
    number = setting.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = setting[len(number) :] or "s"
    return int(float(number) * units.get(unit, 1))


def _age(delta: timedelta) -> str:
    seconds = max(0, int(delta.total_seconds()))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 2 * 3600:
        return f"{seconds // 60} min"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} d"


def judge_archiving(state: ArchiverState) -> tuple[ArchivingStatus, str, str | None]:
    """(status, detail, advice) of the ``archiving`` doctor check; advice ``None`` if ok."""
    mode = f"archive_mode={state.archive_mode}"
    if state.in_recovery and state.archive_mode != "always":
        return (
            "ok",
            f"{mode} on a standby: it archives nothing itself; the primary's archiving "
            "is what point-in-time recovery uses (run doctor against the primary)",
            None,
        )
    if state.archive_mode == "off":
        if state.holds_data:
            return (
                "warn",
                f"{mode}: no WAL is archived, so this database can be restored only to "
                "its last backup, not to a moment before a mistake (a bad erase or prune)",
                _TURN_ON,
            )
        return (
            "ok",
            f"{mode}; the database holds no conversations yet (turn archiving on before it does)",
            None,
        )
    failures = (
        f"{state.failed_count} failed attempts, the latest on {state.last_failed_wal} "
        f"{_age(state.now - state.last_failed_time)} ago"
        if state.last_failed_time is not None
        else "no failures"
    )
    last = (
        f"last archived {state.last_archived_wal} {_age(state.now - state.last_archived_time)} "
        f"ago ({state.archived_count} archived)"
        if state.last_archived_time is not None
        else "nothing archived yet"
    )
    if state.failing:
        return (
            "fail",
            f"{mode}, archiving is failing: {failures}; {last}",
            "the server log says why archive_command fails; until it succeeds nothing "
            "new reaches the archive and every unarchived WAL file stays in pg_wal, "
            "filling its disk. Fix the command (or the archive's storage), then check "
            "that pg_stat_archiver.last_archived_wal advances",
        )
    if state.archiver_configured is False:
        return (
            "warn",
            f"{mode} but no archive_command or archive_library is set: WAL files pile "
            "up in pg_wal and none is archived",
            _TURN_ON,
        )
    timeout = (
        f"archive_timeout={state.archive_timeout}s"
        if state.archive_timeout
        else "archive_timeout=0: a quiet server's last writes reach the archive only when "
        "a 16 MB WAL file fills"
    )
    detail = f"{mode}, {last}; {failures}; {timeout}"
    if state.last_archived_time is None and state.holds_data:
        return (
            "warn",
            detail,
            "the database holds conversations but no WAL file has been archived yet: "
            "check archive_command, and run SELECT pg_switch_wal() to archive the current "
            "file now",
        )
    return "ok", detail, None


__all__ = ["ArchiverState", "ArchivingStatus", "judge_archiving", "read_archiver_state"]
