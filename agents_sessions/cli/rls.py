"""``agents-sessions rls``: switch tenant row-level security on or off, or show it."""

from __future__ import annotations

import click

from ..errors import ExitCode
from ..ops.tenancy import (
    PROTECTED_TABLES,
    disable_row_level_security,
    enable_row_level_security,
    row_level_security_status,
)
from .common import (
    CliContext,
    as_owner,
    emit_json,
    json_option,
    pass_cli_context,
    reported_errors,
)
from .main import cli


@cli.group()
def rls() -> None:
    """Tenant isolation by PostgreSQL row-level security (run as the tables' owner).

    Once enabled, a non-owner role sees only rows of the user it acts for
    (PostgreSQLSession(..., tenant_id=...)); with no tenant, nothing.
    """


@rls.command()
@json_option
@pass_cli_context
def status(context: CliContext, as_json: bool) -> None:
    """Show, per table, whether row-level security is enforced."""
    with reported_errors(), context.store().read() as repos:
        states = row_level_security_status(repos.connection)
    if as_json:
        emit_json(states)
        return
    for table, enabled in states.items():
        click.echo(f"{table}: {'enabled' if enabled else 'disabled'}")


@rls.command()
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@pass_cli_context
def enable(context: CliContext, yes: bool) -> None:
    """Enforce the tenant policies on every table that holds a tenant's data.

    From then on the application role sees only the rows of the tenant it acts for,
    and none without one. Asks for confirmation unless --yes; declining exits with
    status 1.
    """
    if not yes:
        click.echo(
            f"This enables row-level security on {context.safe_url()}: every role that does "
            "not own the tables then sees and writes only the rows of the tenant it acts "
            "for (PostgreSQLSession(..., tenant_id=...)), and nothing without one.",
            err=True,
        )
        if not click.confirm("Enable it?", default=False, err=True):
            click.echo("Nothing was changed.", err=True)
            raise SystemExit(int(ExitCode.PROBLEM))
    with reported_errors(), as_owner("rls enable"), context.store().transaction() as repos:
        enable_row_level_security(repos.connection)
    click.echo(f"row-level security enabled on {', '.join(PROTECTED_TABLES)}")


@rls.command()
@pass_cli_context
def disable(context: CliContext) -> None:
    """Stop enforcing the tenant policies (they stay defined)."""
    with reported_errors(), as_owner("rls disable"), context.store().transaction() as repos:
        disable_row_level_security(repos.connection)
    click.echo(f"row-level security disabled on {', '.join(PROTECTED_TABLES)}")
