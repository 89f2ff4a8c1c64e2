"""``agents-sessions stats``: the seed's monitoring numbers as a table (or JSON).

The queries live in :mod:`agents_sessions.ops.analytics` (seed SQL on PostgreSQL,
SQLAlchemy Core equivalents on SQLite), where application code can call them too.
"""

from __future__ import annotations

import click

from ..ops import analytics
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


@cli.command("stats")
@click.option(
    "--since",
    default="24h",
    show_default=True,
    metavar="DURATION",
    help="Window of 'active conversations' (updated within it): 45s, 30m, 24h, 7d, 2w.",
)
@click.option(
    "--top",
    default=10,
    show_default=True,
    type=click.IntRange(min=1),
    help="How many users to list by message count.",
)
@json_option
@pass_cli_context
def stats_command(context: CliContext, since: str, top: int, as_json: bool) -> None:
    """Conversations, recent activity, top users by messages, token usage by model."""
    window = parse_duration(since, name="--since")
    # Lag-tolerant: served by the read replica when one is configured.
    with (
        reported_errors(),
        context.unfiltered_store("stats", lag_tolerant=True).read(
            lag_tolerant=True
        ) as repositories,
    ):
        statistics = analytics.collect_statistics(
            repositories.connection, window=window, top_users=top
        )
    if as_json:
        emit_json(
            {
                "database": context.safe_url(),
                "total_conversations": statistics.total_conversations,
                "active_conversations": statistics.active_conversations,
                "active_window_seconds": int(window.total_seconds()),
                "top_users_by_message_count": [
                    {"user_id": entry.user_id, "message_count": entry.message_count}
                    for entry in statistics.top_users
                ],
                "token_usage_by_model": [
                    {
                        "model": entry.model,
                        "prompt_tokens": entry.prompt_tokens,
                        "completion_tokens": entry.completion_tokens,
                    }
                    for entry in statistics.token_usage_by_model
                ],
            }
        )
        return
    click.echo(f"database: {context.safe_url()}")
    click.echo(
        render_table(
            ["metric", "value"],
            [
                ["conversations", statistics.total_conversations],
                [f"active in the last {since.strip()}", statistics.active_conversations],
            ],
        )
    )
    click.echo(f"\ntop {top} users by message count")
    click.echo(
        render_table(
            ["user_id", "messages"],
            [
                ["(none)" if entry.user_id is None else entry.user_id, entry.message_count]
                for entry in statistics.top_users
            ],
        )
    )
    click.echo("\ntoken usage by model")
    click.echo(
        render_table(
            ["model", "prompt_tokens", "completion_tokens"],
            [
                [entry.model, entry.prompt_tokens, entry.completion_tokens]
                for entry in statistics.token_usage_by_model
            ],
        )
    )
