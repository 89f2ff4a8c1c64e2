"""``agents-sessions roles``: least-privilege database roles.

``agents-sessions roles sql --owner agents_owner --app agents_app`` prints the
script that creates a migration-owner role and an application role with only the
row access the package needs; pipe it to ``psql`` as an administrator::

    agents-sessions roles sql --owner agents_owner --app agents_app \\
        | psql "$ADMIN_URL" -v ON_ERROR_STOP=1

It needs no database connection and contains no password.
"""

from __future__ import annotations

import click

from ..errors import InvalidArgumentError
from ..ops.roles import least_privilege_sql
from .main import cli


@cli.group()
def roles() -> None:
    """Least-privilege PostgreSQL roles: a migration owner and an application role."""


@roles.command("sql")
@click.option(
    "--owner",
    required=True,
    metavar="NAME",
    help="Role that owns the tables and runs the migrations (created LOGIN if missing).",
)
@click.option(
    "--app",
    required=True,
    metavar="NAME",
    help="Role the application connects as: SELECT/INSERT/UPDATE/DELETE on the tables only.",
)
@click.option("--schema", default="public", show_default=True, help="Schema that holds the tables.")
@click.option(
    "--database",
    default=None,
    metavar="DB",
    help="Database the grants are for; the script refuses to run in any other. "
    "Default: the database psql is connected to.",
)
@click.option(
    "--owner-login/--owner-nologin",
    default=True,
    show_default=True,
    help="Create a missing owner role that can log in (to run migrations as itself), "
    "or NOLOGIN (deployers then connect with options=-c role=OWNER).",
)
def sql(owner: str, app: str, schema: str, database: str | None, owner_login: bool) -> None:
    """Print the SQL that creates the roles and grants their privileges.

    Idempotent: run it before the first migration, and again after upgrades. No
    passwords: set them afterwards with psql's \\password or ALTER ROLE ... PASSWORD.
    """
    try:
        script = least_privilege_sql(
            owner=owner, app=app, schema=schema, database=database, owner_login=owner_login
        )
    except InvalidArgumentError as exc:
        # The message starts with the parameter's name (owner, app, schema, database).
        raise click.BadParameter(str(exc)) from None
    click.echo(script, nl=False)
