"""``agents-sessions conversations``: list (keyset-paginated), show a transcript, delete."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import click

from ..errors import ExitCode
from ..ops import analytics
from ..repositories import ConversationRecord, Repositories
from .common import (
    CliContext,
    emit_json,
    fail,
    json_option,
    pass_cli_context,
    render_table,
    reported_errors,
    restore_point_before,
)
from .main import cli

#: Messages read per query by ``show``: a long conversation is streamed in pages.
_PAGE = 1000

# Control characters (bar newline and tab) and lone surrogates: a stored item may hold
# anything, and a terminal must not interpret it (escape sequences) or choke on it.
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f\ud800-\udfff]")


def _printable(value: str) -> str:
    return _UNPRINTABLE.sub(lambda match: f"\\u{ord(match.group()):04x}", value)


def _conversation_document(record: ConversationRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "user_id": record.user_id,
        "created_at": record.created_at.isoformat(),
        "updated_at": record.updated_at.isoformat(),
        "metadata": record.metadata,
    }


def _timestamp(record_time: Any) -> str:
    return str(record_time.isoformat(sep=" ", timespec="seconds"))


@cli.group("conversations")
def conversations_group() -> None:
    """List, read and delete stored conversations."""


@conversations_group.command("list")
@click.option("--user", "user_id", metavar="USER_ID", help="Only this user's conversations.")
@click.option(
    "--limit",
    default=50,
    show_default=True,
    type=click.IntRange(min=1),
    help="Conversations per page.",
)
@click.option(
    "--after",
    metavar="CURSOR",
    help="Continue after this cursor (printed at the end of the previous page).",
)
@json_option
@pass_cli_context
def list_command(
    context: CliContext, user_id: str | None, limit: int, after: str | None, as_json: bool
) -> None:
    """List conversations, newest first, one page at a time.

    Pagination is by keyset on (created_at, id): pages stay consistent while new
    conversations arrive, and a deep page costs as little as the first.
    """
    # Lag-tolerant: served by the read replica when one is configured.
    with (
        reported_errors(),
        context.unfiltered_store("conversations list", lag_tolerant=True).read(
            lag_tolerant=True
        ) as repositories,
    ):
        if user_id is None:
            page = repositories.conversations.list_all(limit=limit, after=after)
        else:
            page = repositories.conversations.list_by_user(user_id, limit=limit, after=after)
        counts = analytics.message_counts(
            repositories.connection, [record.id for record in page.conversations]
        )
    if as_json:
        emit_json(
            {
                "conversations": [
                    {**_conversation_document(record), "message_count": counts[record.id]}
                    for record in page.conversations
                ],
                "next_cursor": page.next_cursor,
            }
        )
        return
    if not page.conversations:
        click.echo("no conversations")
    else:
        click.echo(
            render_table(
                ["id", "user_id", "created_at", "updated_at", "messages"],
                [
                    [
                        _printable(record.id),
                        None if record.user_id is None else _printable(record.user_id),
                        _timestamp(record.created_at),
                        _timestamp(record.updated_at),
                        counts[record.id],
                    ]
                    for record in page.conversations
                ],
            )
        )
    if page.next_cursor is not None:
        click.echo(f"next cursor: {page.next_cursor}")
        click.echo(f"(next page: add --after {page.next_cursor})", err=True)


def _messages(repositories: Repositories, conversation_id: str) -> Iterator[dict[str, Any]]:
    """Every item of the conversation, oldest first, read ``_PAGE`` rows at a time."""
    after_id: int | None = None
    while True:
        page = repositories.messages.records(conversation_id, after_id=after_id, limit=_PAGE)
        for message in page:
            yield message.item
        if len(page) < _PAGE:
            return
        after_id = page[-1].id


def _parts_text(parts: Sequence[Any]) -> str:
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, Mapping):
            for key in ("text", "refusal", "transcript"):
                if isinstance(part.get(key), str):
                    texts.append(part[key])
                    break
            else:
                texts.append(f"[{part.get('type', 'part')}]")
    return "\n".join(texts)


def _value_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _parts_text(value)
    return json.dumps(value, ensure_ascii=False)


def _describe_item(item: Mapping[str, Any]) -> tuple[str, list[str]]:
    """A transcript entry: its heading and body lines."""
    kind = item.get("type")
    role = item.get("role")
    call_id = f" call_id={item['call_id']}" if isinstance(item.get("call_id"), str) else ""
    if isinstance(role, str):
        heading = role if kind in (None, "message") else f"{role} ({kind})"
        return heading, [_value_text(item.get("content", ""))]
    if kind == "reasoning":
        summary = item.get("summary")
        body = [_parts_text(summary)] if isinstance(summary, list) and summary else []
        if item.get("encrypted_content"):
            body.append("(encrypted reasoning not shown)")
        return "reasoning summary", body or ["(no summary)"]
    if isinstance(kind, str) and kind.endswith("_output"):
        return f"{kind}{call_id}", [_value_text(item.get("output", ""))]
    if "name" in item or "arguments" in item or "input" in item:
        name = f" {item['name']}" if isinstance(item.get("name"), str) else ""
        body = [
            f"{field}: {_value_text(item[field])}"
            for field in ("arguments", "input", "action", "output")
            if field in item
        ]
        return f"{kind or 'tool call'}{name}{call_id}", body
    return str(kind or "item"), [json.dumps(dict(item), ensure_ascii=False)]


@conversations_group.command("show")
@click.argument("conversation_id")
@json_option
@pass_cli_context
def show_command(context: CliContext, conversation_id: str, as_json: bool) -> None:
    """Print a conversation as a readable transcript (--json: its stored items)."""
    # Lag-tolerant: served by the read replica when one is configured.
    with (
        reported_errors(),
        context.unfiltered_store(f"conversations show {conversation_id!r}", lag_tolerant=True).read(
            lag_tolerant=True
        ) as repositories,
    ):
        record = repositories.conversations.get(conversation_id)
        if record is None:
            fail(f"no conversation {conversation_id!r}", ExitCode.PROBLEM)
        usage = repositories.usage.totals_for_conversation(conversation_id)
        if as_json:
            items = list(_messages(repositories, conversation_id))
            emit_json(
                {
                    "conversation": _conversation_document(record),
                    "usage": {
                        "requests": usage.requests,
                        "prompt_tokens": usage.prompt_tokens,
                        "completion_tokens": usage.completion_tokens,
                        "total_tokens": usage.total_tokens,
                    },
                    "items": items,
                }
            )
            return
        click.echo(f"conversation  {_printable(record.id)}")
        click.echo(f"user          {_printable(record.user_id or '(none)')}")
        click.echo(f"created       {_timestamp(record.created_at)}")
        click.echo(f"updated       {_timestamp(record.updated_at)}")
        click.echo(f"metadata      {_printable(json.dumps(record.metadata, ensure_ascii=False))}")
        click.echo(
            f"usage         {usage.requests} requests, {usage.prompt_tokens} prompt + "
            f"{usage.completion_tokens} completion tokens"
        )
        shown = 0
        for shown, item in enumerate(_messages(repositories, conversation_id), start=1):
            heading, body = _describe_item(item)
            click.echo(f"\n[{shown}] {_printable(heading)}")
            for paragraph in body:
                for line in _printable(paragraph).splitlines() or [""]:
                    click.echo(f"    {line}")
        if shown == 0:
            click.echo("\n(no messages)")


@conversations_group.command("delete")
@click.argument("conversation_id")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@json_option
@pass_cli_context
def delete_command(context: CliContext, conversation_id: str, yes: bool, as_json: bool) -> None:
    """Delete a conversation with its messages and usage (cannot be undone).

    On PostgreSQL a named restore point is created first and its name printed
    (stderr; "restore_point" in --json), to recover to with point-in-time recovery.
    """
    with reported_errors():
        store = context.unfiltered_store(f"conversations delete {conversation_id!r}")
        with store.read() as repositories:
            record = repositories.conversations.get(conversation_id)
            count = repositories.messages.count(conversation_id) if record else 0
        if record is None:
            fail(f"no conversation {conversation_id!r}", ExitCode.PROBLEM)
        if not yes and not click.confirm(
            f"Delete conversation {_printable(conversation_id)!r} "
            f"(user {_printable(record.user_id or '(none)')}, {count} messages) "
            "with its usage records?",
            default=False,
            err=True,
        ):
            fail("not confirmed; nothing was deleted", ExitCode.PROBLEM)
        point = restore_point_before(store.engine, "conversations-delete")
        with store.transaction() as repositories:
            deleted = repositories.conversations.delete(conversation_id)
        if not deleted:
            fail(f"conversation {conversation_id!r} was deleted meanwhile", ExitCode.PROBLEM)
    if as_json:
        emit_json({"deleted": conversation_id, "messages": count, "restore_point": point.as_dict()})
    else:
        click.echo(f"deleted conversation {_printable(conversation_id)} ({count} messages)")
