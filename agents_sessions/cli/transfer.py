"""``agents-sessions export`` and ``import``: conversations to and from JSON Lines.

The work is done by :mod:`agents_sessions.ops.transfer`, which application code can
call too; the format is described there.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from ..errors import ExitCode
from ..ops.recovery import RestorePoint, holds_conversations
from ..ops.transfer import (
    DEFAULT_BATCH_SIZE,
    ExportFile,
    ImportSummary,
    TransferCounts,
    count_export,
    export_conversations,
    export_to_file,
    import_export,
)
from .common import (
    CliContext,
    emit_json,
    fail,
    json_option,
    pass_cli_context,
    progress,
    reported_errors,
    restore_point_before,
)
from .main import cli

_batch_size_option = click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    help="Rows read or written per round trip.",
)


@cli.command("export")
@click.option(
    "--conversation",
    "conversation_ids",
    multiple=True,
    metavar="ID",
    help="Export this conversation (repeat for several).",
)
@click.option("--user", "user_id", metavar="USER_ID", help="Export this user's conversations.")
@click.option(
    "--output",
    "-o",
    default="-",
    show_default=True,
    type=click.Path(dir_okay=False, writable=True, allow_dash=True),
    help="File to write ('-': standard output). A file appears only once complete.",
)
@_batch_size_option
@json_option
@pass_cli_context
def export_command(
    context: CliContext,
    conversation_ids: tuple[str, ...],
    user_id: str | None,
    output: str,
    batch_size: int,
    as_json: bool,
) -> None:
    """Export conversations with their messages, branches, usage and paused runs to JSON Lines.

    Writes export format version 2 (current branches and expiry included).
    Everything by default; --user for one user's conversations, --conversation for
    chosen ones (both: the chosen ones of that user). Streams with constant memory
    from one consistent snapshot; items are written exactly as stored.

    With --output -, the data goes to standard output and the summary (JSON with
    --json) to standard error.
    """
    ids = list(conversation_ids) or None
    if output != "-" and not Path(output).expanduser().parent.is_dir():
        fail(
            f"{output}: the directory {Path(output).expanduser().parent} does not exist; "
            "create it first",
            ExitCode.CONFIGURATION,
        )
    with reported_errors():
        store = context.unfiltered_store("export", lag_tolerant=True)
        total = count_export(store, conversation_ids=ids, user_id=user_id)
        with progress("exporting conversations", total) as bar:
            if output == "-":
                counts = export_conversations(
                    store,
                    sys.stdout.buffer,
                    conversation_ids=ids,
                    user_id=user_id,
                    batch_size=batch_size,
                    progress=bar.update,
                )
            else:
                counts = export_to_file(
                    store,
                    output,
                    conversation_ids=ids,
                    user_id=user_id,
                    batch_size=batch_size,
                    progress=bar.update,
                )
    _report_export(context, counts, output, as_json)


def _report_export(context: CliContext, counts: TransferCounts, output: str, as_json: bool) -> None:
    to_stdout = output == "-"
    document = {
        "database": context.safe_url(),
        "output": output,
        "conversations": counts.conversations,
        "messages": counts.messages,
        "usage_rows": counts.usage_rows,
    }
    if as_json:
        if to_stdout:
            click.echo(json.dumps(document, ensure_ascii=False, indent=2), err=True)
        else:
            emit_json(document)
        return
    where = "standard output" if to_stdout else str(Path(output))
    click.echo(
        f"exported {counts.conversations} conversations, {counts.messages} messages and "
        f"{counts.usage_rows} usage rows to {where}",
        err=to_stdout,
    )


@cli.command("import")
@click.argument(
    "source",
    default="-",
    type=click.Path(exists=True, dir_okay=False, readable=True, allow_dash=True),
)
@_batch_size_option
@json_option
@pass_cli_context
def import_command(context: CliContext, source: str, batch_size: int, as_json: bool) -> None:
    """Import an export file (SOURCE, default '-': standard input).

    The whole file is validated first: a bad line is reported with its number and
    nothing is written. Then each conversation is imported in its own transaction.
    Importing the same file again changes nothing. A conversation whose stored
    messages or branches differ from the file's is refused (exit status 1), never
    merged. Reads export format versions 1 and 2.
    Into a PostgreSQL database that already holds conversations, a named restore
    point is created first and its name printed (stderr; "restore_point" in --json).
    """
    max_item_bytes = context.settings().max_item_bytes
    with reported_errors(), ExportFile(source, max_item_bytes=max_item_bytes) as export:
        store = context.unfiltered_store("import")
        point = None
        with store.read() as repositories:
            populated = holds_conversations(repositories.connection)
        if populated:  # importing over existing data: mark the moment before
            point = restore_point_before(store.engine, "import")
        with progress("importing conversations", export.counts.conversations) as bar:
            summary = import_export(store, export, batch_size=batch_size, progress=bar.update)
    _report_import(context, source, summary, as_json, point)
    if summary.refused:
        raise SystemExit(int(ExitCode.PROBLEM))


def _report_import(
    context: CliContext,
    source: str,
    summary: ImportSummary,
    as_json: bool,
    point: RestorePoint | None,
) -> None:
    if as_json:
        document: dict[str, Any] = {"database": context.safe_url(), "source": source}
        document.update(summary.as_dict())
        document["restore_point"] = None if point is None else point.as_dict()
        emit_json(document)
        return
    click.echo(
        f"imported {'standard input' if source == '-' else source} into {context.safe_url()}"
    )
    click.echo(
        f"  conversations: {summary.conversations_created} created, "
        f"{summary.conversations_updated} updated, {summary.conversations_unchanged} unchanged, "
        f"{len(summary.refused)} refused"
    )
    click.echo(
        f"  messages: {summary.messages_imported} imported, "
        f"{summary.messages_already_present} already present"
    )
    click.echo(
        f"  branches: {summary.branches_imported} imported, "
        f"{summary.branches_already_present} already present"
    )
    click.echo(
        f"  usage rows: {summary.usage_imported} imported, "
        f"{summary.usage_already_present} already present"
    )
    for refused in summary.refused:
        click.echo(f"refused (line {refused.line}): {refused.reason}", err=True)
