"""Conventions shared by every ``agents-sessions`` command.

* The database URL comes from ``--database-url`` (on the top-level group), else
  ``DATABASE_URL`` / ``AGENTS_SESSIONS_DATABASE_URL`` / ``.env`` like everything else,
  else the embedded SQLite file. It is never printed with its password.
* ``--json`` on a command prints one JSON document (or JSON Lines where a stream
  is the natural shape) on stdout and nothing else there; human text and progress
  bars go to stderr so a pipe stays clean.
* Exit codes mean one thing each (see :class:`ExitCode`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NoReturn, TypeVar

import click
from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc

from ..db.engine import mask_url
from ..errors import (
    AccessDeniedError,
    AgentsSessionsError,
    DatabaseError,
    ExitCode,
    RowLevelSecurityFilteredError,
    sqlstate_of,
)
from ..items import utf8_safe_json
from ..ops.recovery import RestorePoint, create_restore_point
from ..ops.tenancy import require_unfiltered_access, tables_filtered_for_current_role
from ..settings import Settings, load_settings
from ..store import SessionStore, get_store

_T = TypeVar("_T")


@dataclass
class CliContext:
    """What the top-level group resolved, handed to every command (``click.pass_obj``)."""

    database_url: str | None
    _settings: Settings | None = field(default=None, init=False, repr=False)
    # Set when row-level security made an operator command act as the owner: the
    # database named in messages is then the one actually used.
    _acting_url: str | None = field(default=None, init=False, repr=False)

    def settings(self) -> Settings:
        """Settings from the environment, with ``--database-url`` on top (read once).

        An explicit ``--database-url`` names the one database to work on, so it is
        also where migrations run (over a configured migration URL).
        """
        if self._settings is None:
            self._settings = load_settings(
                database_url=self.database_url, migration_url=self.database_url
            )
        return self._settings

    def migration_url(self) -> str:
        """The direct URL (``migration_url``, else the database URL) for work that must not
        go through a transaction-pooling proxy: backups and restores (pg_dump's script
        changes session settings) as well as migrations."""
        return self.settings().resolved_migration_url()

    def safe_url(self) -> str:
        """The URL in use with its password masked, for messages."""
        if self._acting_url is not None:
            return mask_url(self._acting_url)
        return self.settings().safe_database_url()

    def store(self) -> SessionStore:
        """The shared store for the resolved URL (schema checked on first use).

        Operator commands never migrate as a side effect: a database behind head
        fails them with exit code 5 and the advice to run ``migrate upgrade``.
        """
        settings = self.settings().model_copy(update={"auto_migrate": False})
        return get_store(settings.resolved_database_url(), settings=settings)

    def unfiltered_store(self, action: str, *, lag_tolerant: bool = False) -> SessionStore:
        """A store whose role sees every tenant's rows, for ``action`` (erase, prune, stats...).

        Under row-level security the application role sees only the tenant it acts
        for; with none, nothing -- an erasure would delete nothing and say it
        succeeded. So: the database URL's store when its role is not filtered (one
        query; always on SQLite); else the migration URL's (the tables' owner in the
        least-privilege setup) when one is configured and is not filtered either;
        else :class:`RowLevelSecurityFilteredError` saying which URL to use.

        ``lag_tolerant``: the command reads from the replica when one is configured,
        so the check runs there too (a standby has the primary's roles and policies)
        and works while the primary is down.
        """
        store = self.store()
        settings = self.settings()
        owner_url = settings.resolved_migration_url()
        with store.read(lag_tolerant=lag_tolerant) as repos:
            if not tables_filtered_for_current_role(repos.connection):
                return store
            if settings.migration_url is None or owner_url == settings.resolved_database_url():
                require_unfiltered_access(repos.connection, action)  # refuses, naming the role
        owner = get_store(owner_url, settings=settings.model_copy(update={"auto_migrate": False}))
        with owner.read(lag_tolerant=lag_tolerant) as repos:
            require_unfiltered_access(repos.connection, action)
        click.echo(
            f"note: row-level security filters the role of {self.safe_url()}; {action} runs "
            f"as the owner, on the migration URL {mask_url(owner_url)}",
            err=True,
        )
        self._acting_url = owner_url
        return owner


pass_cli_context = click.make_pass_decorator(CliContext)


def fail(message: str, code: ExitCode, *, hint: str | None = None) -> NoReturn:
    """Print ``message`` to stderr, then the database in use and ``hint``; exit with ``code``.

    Naming the database (password masked) answers the first question after any
    failure: was it the database I meant? (An unset ``DATABASE_URL`` silently means
    the embedded SQLite file.)
    """
    try:
        click.echo(f"error: {message}", err=True)
        database = _database_in_use()
        if database is not None:
            click.echo(f"database: {database}", err=True)
        if hint is not None:
            click.echo(f"hint: {hint}", err=True)
    except BrokenPipeError:  # nobody reads stderr any more: the status must still say it
        pass
    sys.exit(int(code))


def _database_in_use() -> str | None:
    """The masked URL of the command's database, if one can be named."""
    context = click.get_current_context(silent=True)
    cli_context = context.find_object(CliContext) if context is not None else None
    if cli_context is None:
        return None
    try:
        return cli_context.safe_url()
    except AgentsSessionsError:  # the settings themselves are what failed
        return mask_url(cli_context.database_url) if cli_context.database_url else None


#: What to check when the server could not be reached or refused the login.
CONNECTION_HINT = (
    "check the host and port (is the server running and reachable from here?), the "
    "database name, and the user name and password in the URL (--database-url or "
    "DATABASE_URL); `agents-sessions doctor` checks the connection step by step"
)


def _is_connection_failure(error: AgentsSessionsError) -> bool:
    """A failed connect (no SQLSTATE: libpq gave up before a session existed)."""
    cause = error.__cause__
    return (
        type(error) is DatabaseError
        and isinstance(cause, sa_exc.OperationalError)
        and sqlstate_of(cause) is None
    )


@contextmanager
def as_owner(action: str) -> Iterator[None]:
    """Turn "permission denied" / "must be owner" during ``action`` into advice.

    Schema changes (migrations, ``rls enable``) need the role that owns the tables;
    run as the application role of the least-privilege setup they are refused.
    """
    try:
        yield
    except RowLevelSecurityFilteredError:
        raise
    except AccessDeniedError as exc:
        raise AccessDeniedError(
            f"{exc}. {action} must run as the role that owns the tables (the owner role "
            "of `agents-sessions roles sql`), not the application role: set "
            "DATABASE_MIGRATION_URL to the owner's URL, or pass it with --database-url"
        ) from exc


@contextmanager
def reported_errors() -> Iterator[None]:
    """Turn package errors into one clear line on stderr and a meaningful exit code."""
    try:
        yield
    except BrokenPipeError:  # the reader went away (`| head`): the entry point ends quietly
        raise
    except AgentsSessionsError as exc:  # each error class knows its exit status
        hint = CONNECTION_HINT if _is_connection_failure(exc) else None
        fail(str(exc), exc.exit_code, hint=hint)
    except OSError as exc:  # a file or directory argument: missing, unwritable, disk full
        message = f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
        fail(message, ExitCode.CONFIGURATION)


def json_option(function: Any) -> Any:
    """``--json``: machine-readable output on stdout."""
    return click.option(
        "--json", "as_json", is_flag=True, help="Print the result as JSON on stdout."
    )(function)


def emit_json(document: Any) -> None:
    """Print one JSON document on stdout (datetimes as ISO 8601).

    Text stays readable UTF-8; a document holding a lone surrogate (valid in an
    item, impossible in UTF-8) is written with ``\\u`` escapes instead.
    """
    options: dict[str, Any] = {"default": _json_default, "indent": 2}
    rendered = json.dumps(document, ensure_ascii=False, **options)
    click.echo(utf8_safe_json(rendered, document, **options))


def _json_default(value: Any) -> Any:
    isoformat = getattr(value, "isoformat", None)
    if callable(isoformat):
        return isoformat()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def render_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain aligned text table (no extra dependency)."""
    text_rows = [["" if cell is None else str(cell) for cell in row] for row in rows]
    widths = [len(header) for header in headers]
    for row in text_rows:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))
    lines = [
        "  ".join(header.ljust(width) for header, width in zip(headers, widths, strict=True)),
        "  ".join("-" * width for width in widths),
    ]
    lines += [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in text_rows
    ]
    return "\n".join(line.rstrip() for line in lines)


@contextmanager
def progress(label: str, length: int) -> Iterator[Any]:
    """A progress bar on stderr (hidden when stderr is not a terminal).

    Yields click's bar: call ``bar.update(n)`` as rows are processed.
    """
    bar: Any = click.progressbar(
        length=length, label=label, file=sys.stderr, show_pos=True, show_eta=True
    )
    with bar:
        yield bar


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str, *, name: str) -> timedelta:
    """``"90d"``, ``"24h"``, ``"30m"``, ``"2w"``, ``"45s"`` -> a positive ``timedelta``.

    Raises:
        click.BadParameter: naming ``name`` and the accepted forms.
    """
    value = text.strip().lower()
    unit = value[-1:] if value[-1:] in _DURATION_UNITS else ""
    number = value[: -len(unit)] if unit else value
    if not unit or not number.isdigit() or int(number) <= 0:
        raise click.BadParameter(
            f"{text!r} is not a duration; use a positive whole number with a unit: "
            "45s, 30m, 24h, 90d or 2w",
            param_hint=name,
        )
    return timedelta(seconds=int(number) * _DURATION_UNITS[unit])


# ------------------------------------------------------------------ restore points


def restore_point_before(database: Engine | str, command: str) -> RestorePoint:
    """Create a named restore point before a destructive ``command`` and say so on stderr.

    ``database`` is the store's engine or a URL. One line either way: the name to
    give ``recovery_target_name``, or why there is none (the command goes ahead).
    """
    point = create_restore_point(database, command)
    click.echo(point.describe(), err=True)
    return point
