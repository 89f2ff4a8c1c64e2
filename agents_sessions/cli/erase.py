"""``agents-sessions erase``: delete everything a user has (a data-subject erasure request).

The work is done by :func:`agents_sessions.ops.retention.erase_user`.
"""

from __future__ import annotations

import click

from ..errors import ExitCode
from ..ops.retention import DeletionCounts, erase_user, user_data_counts
from .common import (
    CliContext,
    emit_json,
    json_option,
    pass_cli_context,
    reported_errors,
    restore_point_before,
)
from .main import cli


def _describe(counts: DeletionCounts) -> str:
    return (
        f"{counts.conversations} conversations, {counts.messages} messages and "
        f"{counts.usage_rows} usage rows"
    )


@cli.command("erase")
@click.option("--user", "user_id", required=True, metavar="USER_ID", help="The user to erase.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@json_option
@pass_cli_context
def erase_command(context: CliContext, user_id: str, yes: bool, as_json: bool) -> None:
    """Delete every conversation of a user, with its messages and usage rows.

    For data-subject (erasure) requests. One transaction: all of it goes, or
    nothing does. Other users' data is not touched. Asks for confirmation, showing
    what will be deleted, unless --yes; declining exits with status 1.

    On PostgreSQL a named restore point is created first and its name printed
    (stderr; "restore_point" in --json), to recover to with point-in-time recovery.
    """
    with reported_errors():
        store = context.unfiltered_store(f"erase --user {user_id!r}")
        if not yes:
            planned = user_data_counts(store, user_id)
            if planned.conversations:
                click.echo(
                    f"This permanently deletes {_describe(planned)} of user {user_id!r} "
                    f"from {context.safe_url()}.",
                    err=True,
                )
                if not click.confirm("Delete them?", default=False, err=True):
                    click.echo("Nothing was deleted.", err=True)
                    raise SystemExit(int(ExitCode.PROBLEM))
        point = restore_point_before(store.engine, "erase")
        removed = erase_user(store, user_id)
    if as_json:
        emit_json(
            {
                "database": context.safe_url(),
                "user_id": user_id,
                **removed.as_dict(),
                "restore_point": point.as_dict(),
            }
        )
        return
    click.echo(f"erased user {user_id!r}: deleted {_describe(removed)}")
