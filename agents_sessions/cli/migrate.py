"""``agents-sessions migrate``: apply, inspect and check the schema migrations.

The same Alembic scripts as ``alembic upgrade head`` (shipped inside the package),
run through :mod:`agents_sessions.db.migrate`, so under the same cross-process lock:
a PostgreSQL advisory lock (SQLite: ``BEGIN IMMEDIATE``) taken before Alembic reads
the current revision. A deploy job and app servers may migrate at the same time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import click
from alembic.util import CommandError

from ..db import migrate as migrations
from ..db.engine import create_pooled_engine, parse_database_url
from ..errors import ExitCode, translate_database_errors
from ..ops.tenancy import isolation_problem, row_level_security_status
from .common import (
    CliContext,
    as_owner,
    emit_json,
    fail,
    json_option,
    pass_cli_context,
    render_table,
    reported_errors,
    restore_point_before,
)
from .main import cli


@contextmanager
def _revision_errors(revision: str) -> Iterator[None]:
    """Alembic's complaints about a revision argument are usage errors."""
    try:
        yield
    except CommandError as exc:
        fail(f"cannot upgrade to revision {revision!r}: {exc}", ExitCode.USAGE)


def _status_document(context: CliContext, status: migrations.SchemaStatus) -> dict[str, Any]:
    return {
        "database": context.safe_url(),
        "current": status.current,
        "head": status.head,
        "state": status.state,
        "advice": status.advice(),
    }


def _tenant_isolation(url: str) -> tuple[bool, str | None]:
    """Whether tenant isolation is enabled on any table, and what is wrong with it."""
    target = parse_database_url(url)
    if target.dialect != "postgresql":
        return False, None
    engine = create_pooled_engine(target, pooled=False)
    try:
        with translate_database_errors(), engine.connect() as connection:
            enabled = any(row_level_security_status(connection).values())
            return enabled, isolation_problem(connection)[1] if enabled else None
    finally:
        engine.dispose()


def _shown(revision: str | None) -> str:
    return revision or "none (empty)"


def _downgrade_target(current: str | None, revision: str) -> str:
    """What ``revision`` (an id, ``-N`` or ``base``) names from ``current``, for the prompt."""
    if revision == "base":
        return "base (no schema: every table dropped)"
    steps = revision[1:] if revision.startswith("-") else ""
    if not steps.isdigit() or current is None:
        return revision
    down = {info.revision: info.down_revisions for info in migrations.history()}
    target: str | None = current
    for _ in range(int(steps)):
        parents = down.get(target or "", ())
        target = parents[0] if parents else None
        if target is None:
            break
    if target is None:
        return f"{revision} (= base: no schema, every table dropped)"
    return f"{target} ({revision})"


@cli.group("migrate")
def migrate_group() -> None:
    """Apply, inspect and check the schema migrations.

    The same migrations and the same lock as `alembic upgrade head`: safe to run
    while application servers start and migrate too.
    """


@migrate_group.command("upgrade")
@click.argument("revision", default="head")
@pass_cli_context
def upgrade_command(context: CliContext, revision: str) -> None:
    """Upgrade the database to REVISION (default: head)."""
    with reported_errors(), as_owner("migrate upgrade"), _revision_errors(revision):
        settings = context.settings()
        before = migrations.schema_status(settings=settings)
        if before.state == "ahead":
            # Alembic would only say it cannot find the revision.
            fail(f"{before.describe()}; {before.advice()}", ExitCode.SCHEMA)
        migrations.upgrade(settings=settings, revision=revision)
        after = migrations.schema_status(settings=settings)
    if before.current == after.current:
        click.echo(f"{context.safe_url()}: already at {_shown(after.current)}")
    else:
        click.echo(
            f"{context.safe_url()}: upgraded from {_shown(before.current)} to {after.current}"
        )


# ignore_unknown_options: `downgrade -1` is a revision (one step down), not an option.
@migrate_group.command("downgrade", context_settings={"ignore_unknown_options": True})
@click.argument("revision")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@pass_cli_context
def downgrade_command(context: CliContext, revision: str, yes: bool) -> None:
    """Downgrade the database to REVISION (an id, `-1` for one step, or `base`).

    Tables dropped by the downgraded revisions lose their data (`base` drops them all).
    On PostgreSQL a named restore point is created first and its name printed on
    stderr, to recover to with point-in-time recovery.
    """
    with reported_errors():
        settings = context.settings()
        before = migrations.schema_status(settings=settings)
        isolated, _ = _tenant_isolation(settings.resolved_migration_url())
        # Isolation stays switched on through a downgrade (migration 0003 keeps it);
        # below 0003 its policies are gone, so the app role sees nothing until upgrade.
        isolation_note = (
            "; tenant isolation is enabled and stays enabled: below revision 0003 its "
            "policies are dropped and the application role sees no rows until "
            "`migrate upgrade`"
            if isolated
            else ""
        )
        target = _downgrade_target(before.current, revision)
        if not yes and not click.confirm(
            f"Downgrade {context.safe_url()} from {_shown(before.current)} to {target}? "
            f"Data in what the downgrade drops is lost{isolation_note}",
            default=False,
            err=True,
        ):
            fail("not confirmed; nothing was changed", ExitCode.PROBLEM)
        with as_owner("migrate downgrade"):
            restore_point_before(settings.resolved_migration_url(), "migrate-downgrade")
            migrations.downgrade(settings=settings, revision=revision)
        after = migrations.schema_status(settings=settings)
        problem = _tenant_isolation(settings.resolved_migration_url())[1] if isolated else None
    click.echo(
        f"{context.safe_url()}: downgraded from {_shown(before.current)} to {_shown(after.current)}"
    )
    if problem is not None:
        click.echo(f"note: {problem}", err=True)


@migrate_group.command("current")
@json_option
@pass_cli_context
def current_command(context: CliContext, as_json: bool) -> None:
    """Show the database's revision and the head revision."""
    with reported_errors():
        status = migrations.schema_status(settings=context.settings())
    if as_json:
        emit_json(_status_document(context, status))
        return
    head = " (head)" if status.at_head else f" (head is {status.head})"
    click.echo(f"{context.safe_url()}: {_shown(status.current)}{head}")


@migrate_group.command("history")
@click.option(
    "--indicate-current",
    "-i",
    is_flag=True,
    help="Also read the database's revision and mark it (needs a connection).",
)
@json_option
@pass_cli_context
def history_command(context: CliContext, indicate_current: bool, as_json: bool) -> None:
    """List the shipped migrations, newest first."""
    current: str | None = None
    if indicate_current:
        with reported_errors():
            current = migrations.schema_status(settings=context.settings()).current
    revisions = migrations.history()
    if as_json:
        documents = []
        for info in revisions:
            document: dict[str, Any] = asdict(info)
            document["down_revisions"] = list(info.down_revisions)
            if indicate_current:
                document["is_current"] = info.revision == current
            documents.append(document)
        emit_json(documents)
        return
    rows = []
    for info in revisions:
        marks = [
            mark
            for mark, on in (("head", info.is_head), ("current", info.revision == current))
            if on
        ]
        rows.append(
            [
                info.revision,
                ", ".join(info.down_revisions) or "-",
                ", ".join(marks),
                info.description,
            ]
        )
    click.echo(render_table(["revision", "follows", "", "description"], rows))


@migrate_group.command("check")
@json_option
@pass_cli_context
def check_command(context: CliContext, as_json: bool) -> None:
    """Exit 0 if the database is at head; otherwise say what to run and exit 1.

    For deploy pipelines and readiness probes: app servers can check they are at head
    before taking traffic.
    """
    with reported_errors():
        status = migrations.schema_status(settings=context.settings())
    if as_json:
        emit_json(_status_document(context, status))
    elif status.at_head:
        click.echo(f"{context.safe_url()}: at head ({status.head})")
    if not status.at_head:
        fail(f"{status.describe()}: {status.advice()}", ExitCode.PROBLEM)
