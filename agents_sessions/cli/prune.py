"""``agents-sessions prune``: retention by age, in short batches, safe next to a live app.

The work is done by :func:`agents_sessions.ops.retention.prune`, which explains the
batching and locking.
"""

from __future__ import annotations

from datetime import datetime, timezone

import click

from ..errors import ExitCode
from ..ops.append_key_retention import prune_append_keys
from ..ops.recovery import RestorePoint
from ..ops.retention import (
    DEFAULT_PRUNE_BATCH_SIZE,
    PruneSummary,
    prune,
    prune_expired,
    prune_plan,
    trim_turns,
)
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
    metavar="DURATION",
    help="Delete conversations not updated for this long: 90d, 12w, 24h, 30m, 45s.",
)
@click.option(
    "--expired",
    is_flag=True,
    help="Delete conversations whose time-to-live (session ttl / AGENTS_SESSIONS_TTL) has passed.",
)
@click.option(
    "--keep-last-turns",
    type=click.IntRange(min=1),
    metavar="N",
    help="Trim every conversation to its newest N turns (a turn starts at a user message).",
)
@click.option(
    "--append-keys",
    is_flag=True,
    help="Delete append (idempotency) keys past their one-day retention, in every "
    "conversation; no conversation or item is touched.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=DEFAULT_PRUNE_BATCH_SIZE,
    show_default=True,
    help="Most message rows (with --append-keys: keys) deleted per transaction "
    "(bounds how long locks are held).",
)
@click.option("--dry-run", is_flag=True, help="Only count what would be deleted.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@json_option
@pass_cli_context
def prune_command(
    context: CliContext,
    older_than: str | None,
    expired: bool,
    keep_last_turns: int | None,
    append_keys: bool,
    batch_size: int,
    dry_run: bool,
    yes: bool,
    as_json: bool,
) -> None:
    """Delete conversations (with their messages, usage and paused runs) not updated for
    a while (--older-than) or past their time-to-live (--expired); or trim histories
    to their last turns (--keep-last-turns); or reclaim the append keys past their
    retention (--append-keys).

    Works in batches, each its own short transaction, while the application keeps
    running: a conversation that gets a new message meanwhile is kept. Asks for
    confirmation, showing what will be deleted, unless --yes or --dry-run; declining
    exits with status 1. On PostgreSQL, when there is something to delete, a named
    restore point is created first and its name printed (stderr; "restore_point" in
    --json).
    """
    chosen = [older_than is not None, expired, keep_last_turns is not None, append_keys]
    if sum(chosen) != 1:
        raise click.UsageError(
            "give exactly one of --older-than, --expired, --keep-last-turns, --append-keys"
        )
    if append_keys:
        _prune_append_keys(context, batch_size, dry_run, as_json)
        return
    if keep_last_turns is not None:
        _trim(context, keep_last_turns, dry_run, yes, as_json)
        return
    if expired:
        point = None
        with reported_errors():
            store = context.unfiltered_store("prune")
            summary = prune_expired(store, batch_size=batch_size, dry_run=True)
            if not dry_run:
                if summary.conversations:
                    _confirm(
                        yes,
                        f"This permanently deletes {summary.conversations} conversations "
                        f"past their time-to-live from {context.safe_url()}.",
                    )
                    point = restore_point_before(store.engine, "prune")
                with progress("pruning expired conversations", summary.messages) as bar:
                    summary = prune_expired(
                        store, batch_size=batch_size, progress=bar.update, now=summary.cutoff
                    )
        _report(context, summary, as_json, point, what="past their time-to-live at")
        return
    assert older_than is not None
    age = parse_duration(older_than, name="--older-than")
    now = datetime.now(timezone.utc)  # one cutoff for the plan and the run
    with reported_errors():
        store = context.unfiltered_store("prune")
        plan = prune_plan(store, age, batch_size=batch_size, now=now)
        point = None
        if dry_run:
            summary = plan
        else:
            if plan.conversations:
                _confirm(
                    yes,
                    f"This permanently deletes {plan.conversations} conversations, "
                    f"{plan.messages} messages and {plan.usage_rows} usage rows not updated "
                    f"since {plan.cutoff.isoformat()} from {context.safe_url()}.",
                )
                point = restore_point_before(store.engine, "prune")
            with progress("pruning messages", plan.messages) as bar:
                summary = prune(store, age, batch_size=batch_size, progress=bar.update, now=now)
    _report(context, summary, as_json, point)


def _confirm(yes: bool, what: str) -> None:
    """Ask before deleting (unless --yes); declining exits with status 1."""
    if yes:
        return
    click.echo(what, err=True)
    if not click.confirm("Delete them?", default=False, err=True):
        click.echo("Nothing was deleted.", err=True)
        raise SystemExit(int(ExitCode.PROBLEM))


def _prune_append_keys(context: CliContext, batch_size: int, dry_run: bool, as_json: bool) -> None:
    # Keys past their retention are bookkeeping outside what the session promises
    # (a call repeated with its key is stored once within the retention): no history
    # changes, so nothing to confirm and no restore point.
    now = datetime.now(timezone.utc)  # one cutoff for the count and the run
    with reported_errors():
        store = context.unfiltered_store("prune")
        plan = prune_append_keys(store, batch_size=batch_size, dry_run=True, now=now)
        summary = plan
        if not dry_run:
            with progress("pruning append keys", plan.keys) as bar:
                summary = prune_append_keys(
                    store, batch_size=batch_size, progress=bar.update, now=now
                )
    if as_json:
        emit_json({"database": context.safe_url(), **summary.as_dict()})
        return
    verb = "would delete" if summary.dry_run else "deleted"
    click.echo(f"{verb} {summary.keys} append keys created before {summary.cutoff.isoformat()}")
    if not summary.dry_run:
        click.echo(f"  in {summary.batches} batches of at most {summary.batch_size} keys")


def _trim(context: CliContext, turns: int, dry_run: bool, yes: bool, as_json: bool) -> None:
    if dry_run:
        raise click.UsageError("--keep-last-turns has no --dry-run")
    _confirm(
        yes,
        f"This permanently deletes, in every conversation of {context.safe_url()}, the "
        f"messages before its last {turns} turns.",
    )
    with reported_errors():
        store = context.unfiltered_store("prune")
        point = restore_point_before(store.engine, "prune")
        summary = trim_turns(store, turns)
    if as_json:
        document = {"database": context.safe_url(), **summary.as_dict()}
        document["restore_point"] = point.as_dict()
        emit_json(document)
        return
    click.echo(
        f"deleted {summary.messages} messages before the last {turns} turns of "
        f"{summary.conversations_trimmed} conversations"
    )


def _report(
    context: CliContext,
    summary: PruneSummary,
    as_json: bool,
    point: RestorePoint | None,
    *,
    what: str = "not updated since",
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
        f"{summary.usage_rows} usage rows {what} {summary.cutoff.isoformat()}"
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
