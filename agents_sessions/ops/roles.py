"""SQL scripts shipped with the package, and how to fill in their parameters.

``least_privilege.sql`` creates a migration-owner role and an application role with
only the row access the package needs (see the script's header). Its parameters
are psql variables (``:"owner"``, ``:'app'``); :func:`least_privilege_sql` fills
them in the way psql would, so the result runs through ``psql`` or any driver.
"""

from __future__ import annotations

import re
from importlib import resources

from ..errors import InvalidArgumentError

#: PostgreSQL truncates longer identifiers silently (NAMEDATALEN - 1 bytes).
MAX_IDENTIFIER_BYTES = 63

# Role names PostgreSQL reserves or gives a special meaning in GRANT.
_RESERVED_ROLE_NAMES = {"public", "none", "current_user", "current_role", "session_user"}

# psql's variable references: :"name" (identifier) and :'name' (literal).
_VARIABLE = re.compile(r""":(["'])([A-Za-z_][A-Za-z0-9_]*)\1""")


def quote_identifier(value: str) -> str:
    """``value`` as a double-quoted SQL identifier (what psql's ``:"var"`` produces)."""
    return '"' + value.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """``value`` as a SQL string literal (what psql's ``:'var'`` produces).

    Backslashes are doubled in an ``E''`` literal, so the result means the same
    whatever ``standard_conforming_strings`` is.
    """
    escaped = value.replace("'", "''")
    if "\\" in escaped:
        return " E'" + escaped.replace("\\", "\\\\") + "'"
    return "'" + escaped + "'"


def _check_name(value: str, *, name: str, role: bool) -> str:
    if not value or not value.strip():
        raise InvalidArgumentError(f"{name} must be a non-empty name")
    if "\x00" in value:
        raise InvalidArgumentError(f"{name} must not contain a NUL character")
    if len(value.encode("utf-8")) > MAX_IDENTIFIER_BYTES:
        raise InvalidArgumentError(
            f"{name} is longer than {MAX_IDENTIFIER_BYTES} bytes; PostgreSQL would "
            "silently truncate it"
        )
    if role and (value.lower() in _RESERVED_ROLE_NAMES or value.startswith("pg_")):
        raise InvalidArgumentError(
            f"{name} {value!r} is reserved by PostgreSQL (pg_*, public, none, current_user, "
            "current_role, session_user); choose another role name"
        )
    return value


def render_psql_variables(script: str, variables: dict[str, str]) -> str:
    """Substitute psql variable references in ``script`` as psql would.

    ``:"name"`` becomes a quoted identifier and ``:'name'`` a quoted literal.
    Comment lines are left alone (psql does not substitute there either); a
    reference to a variable not in ``variables`` raises ``KeyError``.
    """

    def substitute(match: re.Match[str]) -> str:
        quote, variable = match.group(1), match.group(2)
        value = variables[variable]
        return quote_identifier(value) if quote == '"' else quote_literal(value)

    return "".join(
        line if line.lstrip().startswith("--") else _VARIABLE.sub(substitute, line)
        for line in script.splitlines(keepends=True)
    )


def least_privilege_template() -> str:
    """The shipped ``least_privilege.sql``, parameters not filled in."""
    return (resources.files(__package__) / "least_privilege.sql").read_text(encoding="utf-8")


def least_privilege_sql(
    *,
    owner: str,
    app: str,
    schema: str = "public",
    database: str | None = None,
    owner_login: bool = True,
    tables: list[str] | None = None,
) -> str:
    """The least-privilege script with its role, schema and database names filled in.

    Args:
        owner: The role that owns the tables and runs the migrations.
        app: The role the application connects as (row access only).
        schema: The schema holding the tables.
        database: The database the grants are for; the script refuses to run
            connected to any other. ``None``: whichever database it runs in.
        owner_login: Create a missing owner role with ``LOGIN`` (``True``) or
            ``NOLOGIN``.
        tables: The tables to hand over and grant on; defaults to every table
            of the package's models.

    Raises:
        InvalidArgumentError: a name is empty, too long for PostgreSQL, reserved,
            or the two roles are the same (the message names the parameter).
    """
    _check_name(owner, name="owner", role=True)
    _check_name(app, name="app", role=True)
    if owner == app:
        raise InvalidArgumentError("owner and app must be two different roles")
    _check_name(schema, name="schema", role=False)
    if database is not None:
        _check_name(database, name="database", role=False)
    if tables is None:
        from ..db.models import Base  # the tables the package's migrations create

        tables = [table.name for table in Base.metadata.sorted_tables]
    for table in tables:
        if "," in table:  # the script splits the list on commas
            raise InvalidArgumentError(f"tables: {table!r} contains a comma")
    return render_psql_variables(
        least_privilege_template(),
        {
            "owner": owner,
            "app": app,
            "schema": schema,
            "database": database or "",
            "owner_login": "true" if owner_login else "false",
            "tables": ",".join(tables),
        },
    )
