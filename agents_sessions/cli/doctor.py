"""``agents-sessions doctor``: health checks of the configured database.

The checks themselves are :func:`agents_sessions.ops.doctor.diagnose`; this module
prints them and turns a failure into exit status 1.
"""

from __future__ import annotations

import click

from ..errors import ExitCode
from ..ops.doctor import diagnose
from .common import (
    CliContext,
    emit_json,
    json_option,
    pass_cli_context,
    render_table,
)
from .main import cli

_MARKS = {"ok": "ok", "warn": "WARN", "fail": "FAIL"}


@cli.command("doctor")
@click.option(
    "--connect-timeout",
    default=10,
    show_default=True,
    type=click.IntRange(min=1),
    metavar="SECONDS",
    help="Give up connecting after this long (unless the URL sets connect_timeout).",
)
@json_option
@pass_cli_context
def doctor_command(context: CliContext, connect_timeout: int, as_json: bool) -> None:
    """Check the database: connection, server version, TLS, schema revision, pool
    settings, indexes, the role's privileges, and WAL archiving for point-in-time
    recovery (SQLite: file, WAL, revision, indexes).

    Exits 1 if any check fails; each failure says what to do. Warnings (e.g. a
    superuser application role) do not change the exit status.
    """
    # The settings are read inside diagnose(): a bad URL or setting is a failed check.
    report = diagnose(context.database_url, connect_timeout=connect_timeout)
    if as_json:
        emit_json(report.to_dict())
    else:
        click.echo(f"database: {report.database}")
        click.echo(
            render_table(
                ["check", "status", "detail"],
                [[check.name, _MARKS[check.status], check.detail] for check in report.checks],
            )
        )
        for check in report.checks:
            if check.advice is not None:
                click.echo(f"\n{_MARKS[check.status]} {check.name}: {check.advice}")
        failures, warnings = len(report.failures), len(report.warnings)
        summary = "all checks passed" if report.ok else f"{failures} check(s) failed"
        click.echo(f"\n{summary}" + (f", {warnings} warning(s)" if warnings else ""))
    if not report.ok:
        raise SystemExit(int(ExitCode.PROBLEM))
