"""``agents-sessions backup`` and ``restore``: whole-database backups.

The work is done by :mod:`agents_sessions.ops.backup` (``pg_dump``/``psql`` for
PostgreSQL, SQLite's online backup API for SQLite).
"""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import ExitCode
from ..ops.backup import (
    backup_database,
    restore_database,
)
from .common import (
    CliContext,
    emit_json,
    fail,
    json_option,
    pass_cli_context,
    progress,
    reported_errors,
)
from .main import cli


def _size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@cli.command("backup")
@click.option(
    "--dir",
    "directory",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory of the backups; it must exist (or give --mkdir).",
)
@click.option("--mkdir", is_flag=True, help="Create --dir (and its parents) if missing.")
@click.option(
    "--keep-days",
    type=click.IntRange(min=0),
    default=7,
    show_default=True,
    help="Afterwards, delete this database's backups in --dir older than this.",
)
@json_option
@pass_cli_context
def backup_command(
    context: CliContext, directory: Path, mkdir: bool, keep_days: int, as_json: bool
) -> None:
    """Back up the whole database to a timestamped, gzipped file in --dir.

    PostgreSQL: pg_dump (plain SQL, no owners or privileges), which must be on PATH.
    SQLite: a consistent online copy. The file appears only once complete.
    """
    if not mkdir and not directory.expanduser().is_dir():
        # A typo in --dir must not quietly grow a new tree that nobody restores from.
        fail(
            f"{directory}: no such directory; create it first, or add --mkdir",
            ExitCode.CONFIGURATION,
        )
    with reported_errors():
        result = backup_database(context.migration_url(), directory, keep_days=keep_days)
    if as_json:
        emit_json({"database": context.safe_url(), **result.as_dict()})
        return
    click.echo(
        f"backup of {context.safe_url()} written: {result.path} ({_size(result.size_bytes)})"
    )
    for path in result.removed:
        click.echo(f"  removed old backup {path}")


@cli.command("restore")
@click.argument(
    "backup_file", type=click.Path(exists=True, dir_okay=False, readable=True, path_type=Path)
)
@json_option
@pass_cli_context
def restore_command(context: CliContext, backup_file: Path, as_json: bool) -> None:
    """Restore BACKUP_FILE (made by `backup`) into an EMPTY database.

    PostgreSQL: the database must exist and hold no tables (createdb it first); psql
    (on PATH) runs the dump in a single transaction and stops at the first error.
    SQLite: the target file must not exist yet, or hold no tables.
    """
    with (
        reported_errors(),
        progress("restoring", backup_file.stat().st_size) as bar,
    ):
        result = restore_database(context.migration_url(), backup_file, progress=bar.update)
    if as_json:
        emit_json(result.as_dict())
        return
    click.echo(f"restored {result.path} ({_size(result.size_bytes)}) into {result.target}")
