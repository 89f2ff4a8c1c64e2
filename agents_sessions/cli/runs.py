"""``agents-sessions runs``: paused agent runs waiting for a human's approval."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import click

from ..errors import ConversationNotFoundError, ExitCode
from ..repositories import StoredRunState
from .common import (
    CliContext,
    emit_json,
    fail,
    json_option,
    pass_cli_context,
    render_table,
    reported_errors,
)
from .main import cli


def _age(record: StoredRunState) -> str:
    seconds = max(0, int((datetime.now(timezone.utc) - record.created_at).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _document(record: StoredRunState, *, with_state: bool = False) -> dict[str, Any]:
    document: dict[str, Any] = {
        "conversation_id": record.conversation_id,
        "user_id": record.user_id,
        "agent": record.agent_name,
        "approvals": [approval.__dict__ for approval in record.approvals],
        "created_at": record.created_at.isoformat(),
        "schema_version": record.schema_version,
        "sdk_version": record.sdk_version,
        "state_bytes": record.state_bytes,
    }
    if with_state:
        document["state"] = record.state
    return document


def _calls(record: StoredRunState) -> str:
    return "; ".join(f"{a.tool_name}({a.arguments or ''})" for a in record.approvals)


@cli.group("runs")
def runs_group() -> None:
    """Paused agent runs awaiting approval (saved with session.save_run_state)."""


@runs_group.command("list")
@click.option("--user", "user_id", metavar="USER_ID", help="Only this user's paused runs.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--after", metavar="CURSOR", help="Continue after this cursor (next page).")
@json_option
@pass_cli_context
def list_command(
    context: CliContext, user_id: str | None, limit: int, after: str | None, as_json: bool
) -> None:
    """List paused runs, longest waiting first: who, which tool calls, how long."""
    with reported_errors(), context.store().read(lag_tolerant=True) as repositories:
        page = repositories.run_states.list(user_id=user_id, limit=limit, after=after)
    if as_json:
        emit_json(
            {
                "runs": [_document(record) for record in page.run_states],
                "next_cursor": page.next_cursor,
            }
        )
        return
    if not page.run_states:
        click.echo("no paused runs")
    else:
        click.echo(
            render_table(
                ["conversation", "user_id", "agent", "awaiting approval", "age"],
                [
                    [r.conversation_id, r.user_id, r.agent_name, _calls(r), _age(r)]
                    for r in page.run_states
                ],
            )
        )
    if page.next_cursor is not None:
        click.echo(f"next cursor: {page.next_cursor}")


@runs_group.command("show")
@click.argument("conversation_id")
@json_option
@pass_cli_context
def show_command(context: CliContext, conversation_id: str, as_json: bool) -> None:
    """Show one conversation's paused run (with --json: the whole stored state)."""
    with reported_errors():
        with context.store().read() as repositories:
            record = repositories.run_states.get(conversation_id)
        if record is None:
            raise ConversationNotFoundError(f"no paused run in conversation {conversation_id!r}")
    if as_json:
        emit_json(_document(record, with_state=True))
        return
    click.echo(f"conversation:   {record.conversation_id}")
    click.echo(f"user_id:        {record.user_id}")
    click.echo(f"agent:          {record.agent_name}")
    click.echo(f"paused:         {record.created_at.isoformat()} ({_age(record)} ago)")
    click.echo(f"schema version: {record.schema_version} (openai-agents {record.sdk_version})")
    click.echo(f"size:           {record.state_bytes} bytes")
    click.echo("awaiting approval:")
    for approval in record.approvals:
        click.echo(f"  {approval.tool_name} {json.dumps(approval.arguments)} [{approval.call_id}]")


@runs_group.command("discard")
@click.argument("conversation_id")
@click.option("--yes", is_flag=True, help="Confirm: the paused run cannot be resumed afterwards.")
@pass_cli_context
def discard_command(context: CliContext, conversation_id: str, yes: bool) -> None:
    """Discard a conversation's paused run (its history stays)."""
    if not yes:
        fail("discarding a paused run cannot be undone: add --yes", ExitCode.PROBLEM)
    with reported_errors():
        with context.store().transaction() as repositories:
            existed = repositories.run_states.delete(conversation_id)
        if not existed:
            raise ConversationNotFoundError(f"no paused run in conversation {conversation_id!r}")
    click.echo(f"discarded the paused run of {conversation_id}")
