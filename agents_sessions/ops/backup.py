"""Backups of the whole database, and restoring one into an empty database.

PostgreSQL: ``pg_dump`` (plain SQL, without owners and privileges, so it restores
under any role) gzipped into ``--dir``; restored with ``psql`` in one transaction
that stops at the first error. SQLite: a consistent copy through SQLite's online
backup API (readers and writers carry on meanwhile), gzipped; restored by writing
the copy to a path that holds no database yet.

A backup is written under a temporary name, flushed to disk (``fsync``) and only
then renamed to its final name, so a dump that failed half-way never looks like a
backup. Final names are ``agents-sessions-<label>-<UTC timestamp>.sql.gz``
(PostgreSQL) or ``...sqlite3.gz`` (SQLite), where the label is the database's name
made file-name safe plus a fingerprint of its exact server and name
(:func:`backup_label`); retention (``keep_days``) deletes only files of exactly
that shape, with this database's label, older than the limit.

The database password reaches ``pg_dump``/``psql`` through the ``PGPASSWORD``
environment variable, never their command line (which other users can read in
``ps``), and is masked out of any tool output shown in an error.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from ..db.engine import create_pooled_engine, mask_url, parse_database_url
from ..errors import (
    BackupError,
    BackupFileError,
    ConfigurationError,
    ExternalToolError,
    RestoreTargetNotEmptyError,
    translate_database_errors,
)
from .backup_names import BACKUP_PREFIX, backup_file_name, backup_label, expired_backups
from .citus import is_distributed
from .files import atomic_file
from .libpq import LibpqArguments, find_tool, libpq_arguments, tool_failure
from .restore_guard import (
    PSQL_RESTRICTED_MESSAGE,
    foreign_sqlite_objects,
    psql_supports_restrict,
    restricted_prologue,
    verified_dump_lines,
    verify_dump,
)

_CHUNK = 1 << 20
_PG_DUMP_HEADER = b"--\n-- PostgreSQL database dump"
_SQLITE_HEADER = b"SQLite format 3\x00"

Progress = Callable[[int], None]


@dataclass(frozen=True)
class BackupResult:
    """A backup that was written.

    Attributes:
        path: The backup file.
        size_bytes: Its size (compressed).
        dialect: ``"postgresql"`` or ``"sqlite"``.
        removed: Older backups deleted by the ``keep_days`` rule.
    """

    path: Path
    size_bytes: int
    dialect: str
    removed: list[Path] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready data."""
        return {
            "file": str(self.path),
            "size_bytes": self.size_bytes,
            "dialect": self.dialect,
            "removed": [str(path) for path in self.removed],
        }


@dataclass(frozen=True)
class RestoreResult:
    """A restore that completed.

    Attributes:
        path: The backup file read.
        size_bytes: Its size.
        target: The database restored into (password masked).
    """

    path: Path
    size_bytes: int
    dialect: str
    target: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready data."""
        return {
            "file": str(self.path),
            "size_bytes": self.size_bytes,
            "dialect": self.dialect,
            "target": self.target,
        }


# --------------------------------------------------------------------------------------
# Backup
# --------------------------------------------------------------------------------------


def backup_database(
    database_url: str,
    directory: str | Path,
    *,
    keep_days: int | None = 7,
    now: datetime | None = None,
) -> BackupResult:
    """Back up the database into ``directory`` (created if missing), then apply retention.

    ``keep_days``: afterwards, delete this command's backups of the same database
    older than that many days (never the one just written); ``None`` keeps all.

    Raises:
        ExternalToolError: ``pg_dump`` is missing or failed (nothing is left behind).
        ConfigurationError: a bad URL, a missing SQLite file, or an unusable directory.
    """
    if keep_days is not None and (isinstance(keep_days, bool) or keep_days < 0):
        raise ConfigurationError("keep_days must be a whole number of days, 0 or more")
    target = parse_database_url(database_url)
    when = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    folder = Path(directory).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigurationError(f"cannot create the backup directory {folder}: {exc}") from exc
    if not os.access(folder, os.W_OK):
        raise ConfigurationError(f"the backup directory {folder} is not writable")
    label = backup_label(database_url)
    final = folder / backup_file_name(label, target.dialect, when)
    if target.dialect == "postgresql":
        _refuse_distributed_store(database_url)
        _pg_dump(database_url, final)
    else:
        _sqlite_backup(Path(target.url.database or "").expanduser(), final)
    removed: list[Path] = []
    if keep_days is not None:
        for path in expired_backups(folder, label, target.dialect, keep_days, now=when):
            if path != final:
                path.unlink()
                removed.append(path)
    return BackupResult(
        path=final, size_bytes=final.stat().st_size, dialect=target.dialect, removed=removed
    )


def _refuse_distributed_store(database_url: str) -> None:
    """Refuse to back up a Citus-distributed store with ``pg_dump``: it would be empty.

    The rows of distributed tables live in shards on the workers; ``pg_dump`` of the
    coordinator holds only their empty shells, so the "backup" would restore an
    empty store -- a failure that shows only on the day it is needed.
    """
    engine = create_pooled_engine(parse_database_url(database_url), pooled=False)
    try:
        with engine.connect() as connection:
            distributed = is_distributed(connection)
    except sa_exc.SQLAlchemyError:
        return  # unreachable: pg_dump reports it, in its own words
    finally:
        engine.dispose()
    if distributed:
        raise BackupError(
            "this store is distributed by Citus: pg_dump of the coordinator holds none of "
            "its rows (they live in shards on the workers). Use `agents-sessions export` for "
            "a logical copy through the coordinator, or back up every node (see docs/scaling.md)"
        )


def _pg_dump(database_url: str, final: Path) -> None:
    arguments = libpq_arguments(database_url)
    program = find_tool("pg_dump")
    command = [
        program,
        "--no-password",  # fail, never prompt, when the password is missing or wrong
        "--format=plain",
        "--no-owner",
        "--no-privileges",
        "--dbname",
        arguments.conninfo,
    ]
    with tempfile.TemporaryFile() as stderr, atomic_file(final) as (raw, _):
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env={**os.environ, **arguments.environment},
        )
        assert process.stdout is not None
        try:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6) as archive:
                while chunk := process.stdout.read(_CHUNK):
                    archive.write(chunk)
        finally:
            process.stdout.close()
            returncode = process.wait()
        if returncode != 0:
            # Raising inside _atomic_file removes the temporary file: no false backup.
            raise ExternalToolError(tool_failure("pg_dump", returncode, stderr, arguments.password))


def _sqlite_backup(source: Path, final: Path) -> None:
    if not source.is_file():
        raise ConfigurationError(f"there is no SQLite database at {source}")
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".agents-sessions-") as scratch:
        copy = Path(scratch) / "copy.sqlite3"
        try:
            origin = sqlite3.connect(source, timeout=30)
            try:
                destination = sqlite3.connect(copy)
                try:
                    # One step (pages=-1): the copy is one consistent snapshot of the
                    # database, taken under a read lock that does not stop writers (WAL).
                    origin.backup(destination)
                    # A self-contained file: no -wal beside it to lose.
                    destination.execute("PRAGMA journal_mode=DELETE")
                finally:
                    destination.close()
            finally:
                origin.close()
        except sqlite3.Error as exc:
            raise BackupError(f"SQLite backup of {source} failed: {exc}") from exc
        with (
            atomic_file(final) as (raw, _),
            copy.open("rb") as plain,
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6) as archive,
        ):
            shutil.copyfileobj(plain, archive, _CHUNK)


# --------------------------------------------------------------------------------------
# Restore
# --------------------------------------------------------------------------------------


def _check_backup_file(path: Path, expected_header: bytes, kind: str) -> int:
    if not path.is_file():
        raise BackupFileError(f"no backup file at {path}")
    try:
        with gzip.open(path, "rb") as archive:
            head = archive.read(len(expected_header))
    except (OSError, EOFError) as exc:
        raise BackupFileError(f"{path} is not a gzip-compressed backup ({exc})") from None
    if head != expected_header:
        raise BackupFileError(f"{path} is not a {kind} backup made by agents-sessions backup")
    return path.stat().st_size


def restore_database(
    database_url: str, backup_file: str | Path, *, progress: Progress | None = None
) -> RestoreResult:
    """Restore ``backup_file`` into the database of ``database_url``, which must be empty.

    PostgreSQL: the database must exist and hold no tables (create it with
    ``createdb``); ``psql`` runs the dump in a single transaction and stops at the
    first error, so a failed restore leaves the database empty. SQLite: the file
    must not exist yet, or be empty (no tables). ``progress(n)`` reports bytes of
    the backup file read.

    Raises:
        RestoreTargetNotEmptyError: the target holds tables (nothing was changed).
        BackupFileError: the file is missing or not a backup of this kind.
        ExternalToolError: ``psql`` is missing or failed.
    """
    target = parse_database_url(database_url)
    path = Path(backup_file).expanduser()
    if target.dialect == "postgresql":
        size = _check_backup_file(path, _PG_DUMP_HEADER, "PostgreSQL (pg_dump)")
        _require_empty_postgres(database_url)
        _psql_restore(database_url, path, progress)
    else:
        size = _check_backup_file(path, _SQLITE_HEADER, "SQLite")
        _sqlite_restore(Path(target.url.database or "").expanduser(), path, progress)
    return RestoreResult(
        path=path, size_bytes=size, dialect=target.dialect, target=mask_url(database_url)
    )


def _require_empty_postgres(database_url: str) -> None:
    target = parse_database_url(database_url)
    # Not the shared store: its first use would migrate the empty database.
    engine = create_pooled_engine(target, pooled=False)
    try:
        with translate_database_errors(), engine.connect() as connection:
            names = (
                connection.execute(
                    text(
                        "SELECT n.nspname || '.' || c.relname FROM pg_catalog.pg_class c "
                        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                        "WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') "
                        "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
                        "AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%' "
                        # Members of an installed extension (e.g. Citus's catalog
                        # tables, when restoring into a cluster's coordinator) are
                        # not data of an earlier restore.
                        "AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d "
                        "WHERE d.classid = 'pg_catalog.pg_class'::regclass "
                        "AND d.objid = c.oid AND d.deptype = 'e') "
                        "ORDER BY 1 LIMIT 6"
                    )
                )
                .scalars()
                .all()
            )
    finally:
        engine.dispose()
    if names:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise RestoreTargetNotEmptyError(
            f"refusing to restore into {target.safe_url}: it already holds tables ({shown}); "
            "restore into a new, empty database (createdb) instead"
        )


def _require_restricting_psql(program: str) -> None:
    version = subprocess.run(
        [program, "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    if not psql_supports_restrict(version):
        raise ExternalToolError(
            f"{version or program} cannot run a restore safely: it lacks \\restrict, which "
            "stops a backup file from running psql meta-commands; install a PostgreSQL client "
            "from August 2025 or later (13.22, 14.19, 15.14, 16.10, 17.6, 18)"
        )


def _verify_pg_dump_file(path: Path) -> None:
    try:
        with gzip.open(path, "rb") as archive:
            verify_dump(archive, path)
    except (OSError, EOFError) as exc:
        raise BackupFileError(f"{path} is damaged: {exc}; nothing was restored") from None


def _psql_restore(database_url: str, path: Path, progress: Progress | None) -> None:
    arguments = libpq_arguments(database_url)
    program = find_tool("psql")
    _require_restricting_psql(program)
    # First pass: refuse an altered file before anything reaches the database.
    _verify_pg_dump_file(path)
    command = [
        program,
        "--no-psqlrc",
        "--no-password",
        "--quiet",
        "--set=ON_ERROR_STOP=1",
        "--single-transaction",  # all of the dump or nothing
        "--dbname",
        arguments.conninfo,
        "--file=-",
    ]
    with tempfile.TemporaryFile() as stderr, path.open("rb") as compressed:
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env={**os.environ, **arguments.environment},
        )
        assert process.stdin is not None
        try:
            # Our own random-key guard first: psql then refuses every backslash command
            # in the file, even one the line check above cannot see (mid-line).
            process.stdin.write(restricted_prologue())
            with gzip.GzipFile(fileobj=compressed, mode="rb") as archive:
                position = 0
                # Verified again while streaming: the file may change between the passes.
                for line in verified_dump_lines(archive, path):
                    process.stdin.write(line)
                    now_at = compressed.tell()
                    if progress is not None and now_at != position:
                        progress(now_at - position)
                        position = now_at
        except BrokenPipeError:
            pass  # psql stopped at an error; its exit status and stderr say which
        except BackupFileError:
            process.kill()  # mid-transaction: nothing is committed
            process.wait()
            raise
        except (OSError, EOFError) as exc:
            process.kill()
            process.wait()
            raise BackupFileError(f"{path} is damaged: {exc}; nothing was restored") from None
        finally:
            with contextlib.suppress(BrokenPipeError):
                process.stdin.close()
        returncode = process.wait()
        if returncode != 0:
            failure = tool_failure("psql", returncode, stderr, arguments.password)
            if PSQL_RESTRICTED_MESSAGE in failure:
                raise BackupFileError(
                    f"{path} holds a psql meta-command, which pg_dump never writes there: "
                    f"the file was altered; nothing was restored\n{failure}"
                )
            raise ExternalToolError(
                failure + "\n(the restore ran in one transaction: nothing was restored)"
            )


def _sqlite_has_tables(path: Path) -> bool:
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return bool(
            connection.execute(
                "SELECT count(*) FROM sqlite_master WHERE type IN ('table', 'view')"
            ).fetchone()[0]
        )
    finally:
        connection.close()


def _sqlite_restore(destination: Path, path: Path, progress: Progress | None) -> None:
    if not str(destination):
        raise ConfigurationError("the SQLite URL names no file to restore into")
    if destination.exists():
        try:
            not_empty = destination.stat().st_size > 0 and _sqlite_has_tables(destination)
        except sqlite3.Error as exc:
            raise RestoreTargetNotEmptyError(
                f"refusing to restore into {destination}: it is not an empty database ({exc})"
            ) from None
        if not_empty:
            raise RestoreTargetNotEmptyError(
                f"refusing to restore into {destination}: it already holds tables; "
                "restore to a new path"
            )
    # A write-ahead log left beside the path would be replayed into the new file.
    wal = destination.with_name(destination.name + "-wal")
    if wal.exists() and wal.stat().st_size > 0:
        raise RestoreTargetNotEmptyError(
            f"refusing to restore into {destination}: {wal.name} beside it holds changes; "
            "restore to a new path"
        )
    destination.parent.mkdir(parents=True, exist_ok=True)
    with path.open("rb") as compressed, atomic_file(destination) as (raw, temporary):
        try:
            with gzip.GzipFile(fileobj=compressed, mode="rb") as archive:
                position = 0
                while chunk := archive.read(_CHUNK):
                    raw.write(chunk)
                    if progress is not None:
                        now_at = compressed.tell()
                        progress(now_at - position)
                        position = now_at
        except (OSError, EOFError) as exc:
            raise BackupFileError(f"{path} is damaged: {exc}; nothing was restored") from None
        raw.flush()
        _check_sqlite_copy(temporary, path)
    # A stale shared-memory index of the old (empty) file must not describe the new one.
    with contextlib.suppress(FileNotFoundError):
        destination.with_name(destination.name + "-shm").unlink()


def _check_sqlite_copy(copy: Path, path: Path) -> None:
    connection = sqlite3.connect(f"file:{copy}?mode=ro", uri=True)
    try:
        verdict = connection.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.Error as exc:
        raise BackupFileError(f"{path} does not hold a usable SQLite database ({exc})") from None
    finally:
        connection.close()
    if verdict != "ok":
        raise BackupFileError(f"{path} holds a damaged SQLite database ({verdict})")
    connection = sqlite3.connect(f"file:{copy}?mode=ro", uri=True)
    try:
        foreign = foreign_sqlite_objects(connection)
    finally:
        connection.close()
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise BackupFileError(
            f"{path} holds schema objects agents-sessions never creates ({shown}): "
            "the file was altered or is not our backup; nothing was restored"
        )


__all__ = [
    "BACKUP_PREFIX",
    "BackupError",
    "BackupFileError",
    "BackupResult",
    "ExternalToolError",
    "LibpqArguments",
    "RestoreResult",
    "RestoreTargetNotEmptyError",
    "backup_database",
    "backup_file_name",
    "backup_label",
    "expired_backups",
    "libpq_arguments",
    "restore_database",
]
