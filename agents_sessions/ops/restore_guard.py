"""What a backup file may contain before ``restore`` lets it near a database.

A backup file is input from outside: it may have been edited. Two attacks matter.

PostgreSQL: ``psql`` executes *meta-commands* (``\\! shell command``, ``\\o file``,
``\\copy ... to program``) that appear in the SQL it reads. ``restore`` therefore
never lets ``psql`` run one from the file, with two independent defences:

1. :func:`verified_dump_lines` reads the dump line by line, tracking ``COPY ...
   FROM stdin`` data blocks (inside them a backslash is data: ``COPY`` escapes every
   backslash in a value as ``\\\\``), and refuses the file at the first line outside
   a data block that starts with a backslash — except pg_dump's own
   ``\\restrict KEY`` / ``\\unrestrict KEY`` guard pair, which it drops.
2. The stream handed to ``psql`` starts with ``\\restrict`` and a fresh random key
   that the file cannot know (:func:`restricted_prologue`): from then on ``psql``
   itself, with its own lexer, refuses every backslash command (a meta-command
   hidden mid-line after SQL included), and nothing in the file can lift that,
   because ``\\unrestrict`` needs the key. This needs a ``psql`` from the August
   2025 minor releases or later (:func:`psql_supports_restrict`).

SQLite: a database file carries its schema, and a trigger in it runs inside every
later write (one planted in a backup copied other users' new messages into the
attacker's conversation). :func:`foreign_sqlite_objects` lists every trigger, view
and table that this package's schema does not define; ``restore`` refuses a file
that has any.
"""

from __future__ import annotations

import functools
import re
import secrets
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import BackupFileError

_COPY_FROM_STDIN = re.compile(rb"^COPY .* FROM stdin;\r?\n?$")
_END_OF_COPY_DATA = re.compile(rb"^\\\.\r?\n?$")
_GUARD_LINE = re.compile(rb"^\\(?P<command>restrict|unrestrict) (?P<key>[A-Za-z0-9]+)\r?\n?$")

# psql learned \restrict in the minor releases of 2025-08-14 (CVE-2025-8714).
_FIRST_RESTRICT_RELEASE = {13: 22, 14: 19, 15: 14, 16: 10, 17: 6}
_PSQL_VERSION = re.compile(r"\(PostgreSQL\)\s+(?P<major>\d+)(?:\.(?P<minor>\d+))?")


def _shown(line: bytes) -> str:
    text = line.decode("utf-8", "replace").rstrip("\r\n")
    return text if len(text) <= 80 else text[:77] + "..."


def verified_dump_lines(lines: Iterable[bytes], source: Path) -> Iterator[bytes]:
    """The lines of a pg_dump plain-SQL file that may be given to ``psql``.

    Yields every line except pg_dump's ``\\restrict``/``\\unrestrict`` guard lines
    (the caller supplies its own guard); raises at the first line that ``psql``
    would read as a meta-command.

    Raises:
        BackupFileError: a meta-command outside ``COPY`` data, a guard line that does
            not pair up, or ``COPY`` data left unterminated.
    """
    in_copy_data = False
    guard_key: bytes | None = None
    guard_closed = False
    for number, line in enumerate(lines, start=1):
        if in_copy_data:
            if _END_OF_COPY_DATA.match(line):
                in_copy_data = False
            yield line
            continue
        if line.startswith(b"\\"):
            guard = _GUARD_LINE.match(line)
            if guard is not None and guard["command"] == b"restrict" and guard_key is None:
                guard_key = guard["key"]
                continue
            if (
                guard is not None
                and guard["command"] == b"unrestrict"
                and guard["key"] == guard_key
                and not guard_closed
            ):
                guard_closed = True
                continue
            raise BackupFileError(
                f"{source} line {number} holds a psql meta-command ({_shown(line)!r}), "
                "which pg_dump never writes there: the file was altered; nothing was restored"
            )
        if _COPY_FROM_STDIN.match(line):
            in_copy_data = True
        yield line
    if in_copy_data:
        raise BackupFileError(f"{source} ends inside COPY data: it is truncated or altered")


def verify_dump(lines: Iterable[bytes], source: Path) -> None:
    """Read the whole dump through :func:`verified_dump_lines` (raises on a bad line)."""
    for _ in verified_dump_lines(lines, source):
        pass


def restricted_prologue() -> bytes:
    """A first line that makes ``psql`` refuse every later backslash command.

    The key is fresh and random, so no line in the file can ``\\unrestrict`` it.
    """
    return b"\\restrict " + secrets.token_hex(32).encode() + b"\n"


def psql_supports_restrict(version_output: str) -> bool:
    """Whether the ``psql --version`` output names a release that knows ``\\restrict``."""
    match = _PSQL_VERSION.search(version_output)
    if match is None:
        return False
    major = int(match["major"])
    minor = int(match["minor"] or 0)
    if major >= 18:
        return True
    first = _FIRST_RESTRICT_RELEASE.get(major)
    return first is not None and minor >= first


#: What ``psql`` says when restricted mode refused a backslash command.
PSQL_RESTRICTED_MESSAGE = "backslash commands are restricted"


_SQLITE_BOOKKEEPING = {
    "sqlite_sequence",
    "sqlite_stat1",
    "sqlite_stat2",
    "sqlite_stat3",
    "sqlite_stat4",
}


@functools.lru_cache(maxsize=1)
def _our_sqlite_schema() -> frozenset[tuple[str, str, str | None]]:
    """Every ``(type, name, sql)`` our migrations leave in a SQLite database.

    Made once per process by migrating an empty temporary file to head: the
    full-text table, its shadow tables and the triggers that keep it in step are
    ours exactly as written there, and a trigger with one of their names but other
    SQL is not.
    """
    from ..db.migrate import upgrade

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "schema.sqlite3"
        upgrade(f"sqlite:///{path}")
        connection = sqlite3.connect(path)
        try:
            rows = connection.execute("SELECT type, name, sql FROM sqlite_master").fetchall()
        finally:
            connection.close()
    return frozenset((kind, name, sql) for kind, name, sql in rows)


def foreign_sqlite_objects(connection: sqlite3.Connection) -> list[str]:
    """Triggers, views, tables and indexes this package's migrations do not create.

    An object is ours only if a database migrated by this version holds the same
    type, name and SQL. SQLite's own bookkeeping tables (``sqlite_sequence``,
    ``sqlite_stat*``) and automatic indexes (no SQL) on our tables are ours too.
    """
    ours = _our_sqlite_schema()
    our_tables = {name for kind, name, _ in ours if kind == "table"}
    foreign = []
    rows = connection.execute(
        "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"
    ).fetchall()
    for kind, name, table, sql in rows:
        if (kind, name, sql) in ours:
            continue
        if kind == "table" and name in _SQLITE_BOOKKEEPING:
            continue
        if kind == "index" and sql is None and table in our_tables:
            continue
        foreign.append(f"{kind} {name}")
    return foreign


__all__ = [
    "PSQL_RESTRICTED_MESSAGE",
    "foreign_sqlite_objects",
    "psql_supports_restrict",
    "restricted_prologue",
    "verified_dump_lines",
    "verify_dump",
]
