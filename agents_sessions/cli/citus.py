"""``agents-sessions citus``: shard the store across a Citus cluster, and show the cluster.

``citus distribute`` runs on the coordinator, over the direct (migration) URL; the
work and its checks are :mod:`agents_sessions.ops.citus`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import click
from sqlalchemy import Connection

from ..db.engine import create_pooled_engine, parse_database_url
from ..errors import CitusError, translate_database_errors
from ..ops.citus import ClusterStatus, DistributionPlan, cluster_status, distribute
from .common import (
    CliContext,
    emit_json,
    json_option,
    pass_cli_context,
    render_table,
    reported_errors,
)
from .main import cli


@contextmanager
def _coordinator(context: CliContext) -> Iterator[Connection]:
    """An autocommit connection to the coordinator, at the direct (migration) URL.

    The schema must be at head (checked through the store first): distributing
    needs the keys of migration 0004.
    """
    target = parse_database_url(context.migration_url())
    if target.dialect != "postgresql":
        raise CitusError(
            "Citus is not available on SQLite: point --database-url at the coordinator"
        )
    context.store().ensure_schema()
    engine = create_pooled_engine(target, pooled=False)
    try:
        with translate_database_errors(), engine.connect() as connection:
            yield connection.execution_options(isolation_level="AUTOCOMMIT")
    finally:
        engine.dispose()


@cli.group()
def citus() -> None:
    """Shard the store across a Citus cluster (run against the coordinator)."""


def _print_plan(plan: DistributionPlan, *, dry_run: bool) -> None:
    click.echo(f"citus {plan.citus_version}, workers: {', '.join(plan.workers)}")
    for table, action in plan.steps:
        if action == "distribute":
            verb = "would distribute" if dry_run else "distributed"
            click.echo(f"{table}: {verb} by conversation id")
        else:
            click.echo(f"{table}: {action}")
    for note in plan.notes:
        click.echo(f"note: {note}")
    if plan.pending and not dry_run:
        click.echo(
            f"conversations has {plan.shard_count} shards; messages and usage_logs are "
            "co-located with it"
        )


@citus.command("distribute")
@click.option(
    "--shard-count",
    default=32,
    show_default=True,
    type=click.IntRange(min=1),
    help="Shards per table (tables already distributed keep theirs). A few per worker "
    "core; more shards let more workers be added later without splitting.",
)
@click.option(
    "--dry-run", is_flag=True, help="Check and report what would be done; change nothing."
)
@json_option
@pass_cli_context
def distribute_command(context: CliContext, shard_count: int, dry_run: bool, as_json: bool) -> None:
    """Distribute conversations, messages and usage_logs by conversation id, co-located.

    Idempotent: tables already distributed are skipped. Checks first and refuses
    (exit 1) without Citus, off the coordinator, without workers, with the schema
    behind head, or with row-level security enabled. Existing rows are copied into
    the shards; writes to a table wait while it is copied.
    """
    with reported_errors(), _coordinator(context) as connection:
        plan = distribute(connection, shard_count=shard_count, dry_run=dry_run)
    if as_json:
        emit_json({"database": context.safe_url(), "dry_run": dry_run, **plan.as_dict()})
        return
    _print_plan(plan, dry_run=dry_run)


def _print_status(status: ClusterStatus) -> None:
    click.echo(f"citus {status.citus_version}\n")
    click.echo(
        render_table(
            ["node", "role", "active", "shards"],
            [
                [n["node"], n["role"], "yes" if n["active"] else "NO", n["shards"]]
                for n in status.nodes
            ],
        )
    )
    click.echo("")
    click.echo(
        render_table(
            ["table", "distributed by", "shards", "size"],
            [
                [
                    t["table"],
                    t["distributed_by"] or "(not distributed)",
                    t["shards"],
                    _size(t["size_bytes"]),
                ]
                for t in status.tables
            ],
        )
    )


def _size(size: int) -> str:
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # pragma: no cover


@citus.command("status")
@json_option
@pass_cli_context
def status_command(context: CliContext, as_json: bool) -> None:
    """Show the cluster's nodes, the store's shards per node, and table sizes."""
    with reported_errors(), context.store().read() as repos:
        status = cluster_status(repos.connection)
    if as_json:
        emit_json({"database": context.safe_url(), **status.as_dict()})
        return
    _print_status(status)
