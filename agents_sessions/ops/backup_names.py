"""Backup file names: which database a backup holds, and which files retention may delete."""

from __future__ import annotations

import hashlib
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

from ..db.engine import parse_database_url
from ..errors import ConfigurationError
from .libpq import libpq_arguments

#: Every backup file name starts with this.
BACKUP_PREFIX = "agents-sessions-"
#: The file name ending of a backup, per dialect.
BACKUP_SUFFIX = {"postgresql": ".sql.gz", "sqlite": ".sqlite3.gz"}
_LABEL = re.compile(r"^[A-Za-z0-9_.-]*[A-Za-z0-9]-[0-9a-f]{16}$")
_BACKUP_NAME = re.compile(
    r"^agents-sessions-(?P<label>[A-Za-z0-9_.-]*[A-Za-z0-9]-[0-9a-f]{16})-(?P<stamp>\d{8}T\d{12}Z)"
    r"(?P<suffix>\.sql\.gz|\.sqlite3\.gz)$"
)
_STAMP_FORMAT = "%Y%m%dT%H%M%S%fZ"


_READABLE_LENGTH = 40


def backup_label(database_url: str) -> str:
    """What names this database's backups: a readable part and an exact fingerprint.

    The readable part is the database name (the SQLite file's stem) reduced to
    ``[A-Za-z0-9_.-]`` -- safe in any file name, but not unique (``adv_bk_é`` and
    ``adv_bk`` both read ``adv_bk``). The fingerprint is the first 16 hex digits of
    the SHA-256 of the exact identity: for PostgreSQL the server (hosts, lower-cased,
    and ports) and the database name; for SQLite the file's absolute path. The same
    database name on two servers, or two names that read alike, get different labels,
    so retention never deletes another database's backups.
    """
    target = parse_database_url(database_url)
    url = target.url
    database = url.database or ""
    if target.dialect == "postgresql":
        arguments = libpq_arguments(database_url)
        host = arguments.keywords.get("host", "").lower()
        port = arguments.keywords.get("port", "5432")
        identity = f"postgresql\0{host}\0{port}\0{database}"
        readable = database
    else:
        path = Path(database).expanduser().resolve()
        identity = f"sqlite\0{path}"
        readable = path.stem
    fingerprint = hashlib.sha256(identity.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", readable).strip("._-")[:_READABLE_LENGTH]
    return f"{cleaned or 'database'}-{fingerprint}"


def backup_file_name(label: str, dialect: str, when: datetime) -> str:
    """The file name of a backup of the database labelled ``label`` (:func:`backup_label`)."""
    if not _LABEL.match(label):
        raise ConfigurationError(f"{label!r} is not a backup label")
    stamp = when.astimezone(timezone.utc).strftime(_STAMP_FORMAT)
    return f"{BACKUP_PREFIX}{label}-{stamp}{BACKUP_SUFFIX[dialect]}"


def expired_backups(
    directory: Path, label: str, dialect: str, keep_days: int, *, now: datetime
) -> list[Path]:
    """This command's backups of the database labelled ``label`` older than ``keep_days``.

    Only regular files named exactly as :func:`backup_file_name` names them for this
    label and dialect are considered (never another database's, nor files named
    before labels carried a fingerprint); their age is the timestamp in the name
    (copying a file keeps it meaningful).
    """
    cutoff = now.astimezone(timezone.utc) - timedelta(days=keep_days)
    expired = []
    for path in sorted(directory.iterdir()):
        match = _BACKUP_NAME.match(path.name)
        if match is None or match["label"] != label or match["suffix"] != BACKUP_SUFFIX[dialect]:
            continue
        if path.is_symlink() or not path.is_file():
            continue
        taken = datetime.strptime(match["stamp"], _STAMP_FORMAT).replace(tzinfo=timezone.utc)
        if taken < cutoff:
            expired.append(path)
    return expired


__all__ = ["BACKUP_PREFIX", "BACKUP_SUFFIX", "backup_file_name", "backup_label", "expired_backups"]
