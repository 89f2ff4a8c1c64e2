"""``agents-sessions search``: full-text search over stored messages (recall)."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any

import click

from ..repositories import SearchHit
from .common import (
    CliContext,
    emit_json,
    json_option,
    parse_duration,
    pass_cli_context,
    render_table,
    reported_errors,
)
from .main import cli

# Control characters (newlines and tabs included: one hit per table row) and lone
# surrogates: stored text may hold anything, and a terminal must not interpret it.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")


def _one_line(value: str) -> str:
    return _UNPRINTABLE.sub(" ", value)


def _hit_document(hit: SearchHit) -> dict[str, Any]:
    return {
        "conversation_id": hit.conversation_id,
        "message_id": hit.message_id,
        "role": hit.role,
        "snippet": hit.snippet,
        "rank": hit.rank,
        "created_at": hit.created_at.isoformat(),
    }


@cli.command("search")
@click.argument("query")
@click.option("--user", "user_id", metavar="USER_ID", help="Only this user's conversations.")
@click.option("--conversation", "conversation_id", metavar="ID", help="Only this conversation.")
@click.option(
    "--since", metavar="DURATION", help="Only messages stored this recently: 7d, 12h, 30m."
)
@click.option(
    "--limit", default=20, show_default=True, type=click.IntRange(min=1), help="Hits per page."
)
@click.option("--after", metavar="CURSOR", help="Continue after this cursor (next page).")
@json_option
@pass_cli_context
def search_command(
    context: CliContext,
    query: str,
    user_id: str | None,
    conversation_id: str | None,
    since: str | None,
    limit: int,
    after: str | None,
    as_json: bool,
) -> None:
    """Find messages by what was said: plain words (all must occur) and "quoted phrases".

    Best matches first, newest first among equals; matched terms are **marked** in
    the snippet. The query is never SQL: any text is searched as text.
    """
    since_instant: datetime | None = None
    if since is not None:
        since_instant = datetime.now(timezone.utc) - parse_duration(since, name="--since")
    # Lag-tolerant: served by the read replica when one is configured.
    with reported_errors(), context.store().read(lag_tolerant=True) as repositories:
        page = repositories.messages.search(
            query,
            user_id=user_id,
            conversation_id=conversation_id,
            limit=limit,
            since=since_instant,
            after=after,
        )
    if as_json:
        emit_json(
            {"hits": [_hit_document(hit) for hit in page.hits], "next_cursor": page.next_cursor}
        )
        return
    if not page.hits:
        click.echo("no matches")
    else:
        click.echo(
            render_table(
                ["conversation", "message", "role", "created_at", "snippet"],
                [
                    [
                        _one_line(hit.conversation_id),
                        hit.message_id,
                        _one_line(hit.role),
                        hit.created_at.isoformat(sep=" ", timespec="seconds"),
                        _one_line(hit.snippet),
                    ]
                    for hit in page.hits
                ],
            )
        )
    if page.next_cursor is not None:
        click.echo(f"next cursor: {page.next_cursor}")
        click.echo(f"(next page: add --after {page.next_cursor})", err=True)
