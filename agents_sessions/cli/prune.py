"""``agents-sessions prune``: retention by age, in short batches, safe next to a live app.

The work is done by :func:`agents_sessions.ops.retention.prune`, which explains the
batching and locking.
"""

from __future__ import annotations

from datetime import datetime, timezone

import click

from ..errors import ExitCode
from ..ops.recovery import RestorePoint
from ..ops.retention import DEFAULT_PRUNE_BATCH_SIZE, PruneSummary, prune, prune_plan
from .common import (
    CliContext,
    emit_json,
    json_option,
    parse_duration,
    pass_cli_context,
    progress,
    reported_errors,
    restore_point_before,
)
from .main import cli


@cli.command("prune")
@click.option(
    "--older-than",
    required=True,
    metavar="DURATION",
    help="Delete conversations not updated for this long: 90d, 12w, 24h, 30m, 45s.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=DEFAULT_PRUNE_BATCH_SIZE,
    show_default=True,
    help="Most message rows deleted per transaction (bounds how long locks are held).",
)
@click.option("--dry-run", is_flag=True, help="Only count what would be deleted.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@json_option
@pass_cli_context
def prune_command(
    context: CliContext,
    older_than: str,
    batch_size: int,
    dry_run: bool,
    yes: bool,
    as_json: bool,
) -> None:
    """Delete conversations (with their messages and usage) not updated for a while.

    Works in batches, each its own short transaction, while the application keeps
    running: a conversation that gets a new message meanwhile is kept. Asks for
    confirmation, showing what will be deleted, unless --yes or --dry-run; declining
    exits with status 1. On PostgreSQL, when there is something to delete, a named
    restore point is created first and its name printed (stderr; "restore_point" in
    --json).
    """
    age = parse_duration(older_than, name="--older-than")
    now = datetime.now(timezone.utc)  # one cutoff for the plan and the run
    with reported_errors():
        store = context.unfiltered_store("prune")
        plan = prune_plan(store, age, batch_size=batch_size, now=now)
        point = None
        if dry_run:
            summary = plan
        else:
            if not yes and plan.conversations:
                click.echo(
                    f"This permanently deletes {plan.conversations} conversations, "
                    f"{plan.messages} messages and {plan.usage_rows} usage rows not updated "
                    f"since {plan.cutoff.isoformat()} from {context.safe_url()}.",
                    err=True,
                )
                if not click.confirm("Delete them?", default=False, err=True):
                    click.echo("Nothing was deleted.", err=True)
                    raise SystemExit(int(ExitCode.PROBLEM))
            if plan.conversations:
                point = restore_point_before(store.engine, "prune")
            with progress("pruning messages", plan.messages) as bar:
                summary = prune(store, age, batch_size=batch_size, progress=bar.update, now=now)
    _report(context, summary, as_json, point)


def _report(
    context: CliContext, summary: PruneSummary, as_json: bool, point: RestorePoint | None
) -> None:
    if as_json:
        document = {"database": context.safe_url(), **summary.as_dict()}
        if not summary.dry_run:
            document["restore_point"] = None if point is None else point.as_dict()
        emit_json(document)
        return
    verb = "would delete" if summary.dry_run else "deleted"
    click.echo(
        f"{verb} {summary.conversations} conversations, {summary.messages} messages and "
        f"{summary.usage_rows} usage rows not updated since {summary.cutoff.isoformat()}"
    )
    if not summary.dry_run:
        click.echo(
            f"  in {summary.batches} batches of at most {summary.batch_size} messages "
            f"(largest: {summary.largest_batch})"
        )
    if summary.interrupted:
        click.echo(
            f"  kept {summary.interrupted} conversations that became active while being "
            f"pruned: {', '.join(summary.interrupted_ids)}",
            err=True,
        )
