"""Pointing ``pg_dump``/``psql`` at a database without exposing its password.

The password reaches the tools through the ``PGPASSWORD`` environment variable,
never their command line (which other users can read in ``ps``), and is masked out
of any tool output shown in an error.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from typing import IO

from ..db.engine import parse_database_url
from ..errors import ConfigurationError, ExternalToolError

# --------------------------------------------------------------------------------------
# libpq arguments
# --------------------------------------------------------------------------------------


def _conninfo_value(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


@dataclass(frozen=True)
class LibpqArguments:
    """How to point ``pg_dump``/``psql`` at a database without exposing the password.

    Attributes:
        conninfo: A libpq ``key='value'`` connection string, password-free, for
            ``--dbname``.
        environment: Variables to add to the tool's environment (``PGPASSWORD``).
        password: The password, to mask it in tool output (never shown).
        keywords: The libpq keywords of ``conninfo`` (no password).
    """

    conninfo: str
    environment: dict[str, str]
    password: str | None
    keywords: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"LibpqArguments(conninfo={self.conninfo!r})"


def libpq_arguments(database_url: str) -> LibpqArguments:
    """The libpq connection string and environment for a PostgreSQL database URL.

    The SQLAlchemy URL's driver suffix and this package's pool parameters are
    dropped (:func:`~agents_sessions.db.engine.parse_database_url`); the remaining query
    parameters are libpq keywords (``sslmode``, ``connect_timeout``, ...), passed on.

    Raises:
        ConfigurationError: the URL is not a PostgreSQL URL, or carries an
            ``sslpassword`` (libpq reads it from no environment variable, so it
            could only travel on the command line).
    """
    target = parse_database_url(database_url)
    if target.dialect != "postgresql":
        raise ConfigurationError(f"{target.safe_url} is not a PostgreSQL URL")
    url = target.url
    if target.secret_connect_args:
        raise ConfigurationError(
            "the database URL parameter 'sslpassword' cannot be passed to pg_dump/psql "
            "without showing it on their command line; use a key without a passphrase"
        )
    keywords: dict[str, str] = {}
    hosts: list[str] = []
    ports: list[str] = []
    for name, value in url.query.items():
        values = list(value) if isinstance(value, tuple) else [value]
        if name == "host":
            # SQLAlchemy's multi-host form: ?host=a:5432&host=b:5433.
            for entry in values:
                if entry.startswith("/"):  # a Unix socket directory
                    hosts.append(entry)
                    ports.append("")
                else:
                    host, _, port = entry.partition(":")
                    hosts.append(host)
                    ports.append(port)
            continue
        keywords[name] = ",".join(values)
    if url.host:
        hosts.insert(0, url.host)
        ports.insert(0, str(url.port or ""))
    elif url.port:
        keywords["port"] = str(url.port)
    if hosts:
        keywords["host"] = ",".join(hosts)
        if any(ports):
            keywords["port"] = ",".join(port or "5432" for port in ports)
    if url.username:
        keywords["user"] = url.username
    if url.database:
        keywords["dbname"] = url.database
    # Where and who first, then the rest in a stable order.
    order = {"host": 0, "port": 1, "user": 2, "dbname": 3}
    ordered = sorted(keywords.items(), key=lambda pair: (order.get(pair[0], 4), pair[0]))
    conninfo = " ".join(f"{key}={_conninfo_value(value)}" for key, value in ordered)
    password = url.password if url.password else None
    environment = {"PGPASSWORD": str(password)} if password else {}
    return LibpqArguments(
        conninfo=conninfo,
        environment=environment,
        password=str(password) if password else None,
        keywords=dict(ordered),
    )


def masked(output: str, password: str | None) -> str:
    if password:
        output = output.replace(password, "***")
    return output


def find_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ExternalToolError(
            f"{name} was not found on PATH; install the PostgreSQL client programs "
            f"(Debian/Ubuntu: apt-get install postgresql-client; their major version "
            "must be at least the server's)"
        )
    return path


def tool_failure(name: str, returncode: int, stderr: IO[bytes], password: str | None) -> str:
    stderr.seek(0)
    output = stderr.read().decode("utf-8", "replace").strip()
    lines = output.splitlines()
    if len(lines) > 20:
        lines = ["...", *lines[-20:]]
    detail = masked("\n".join(lines), password) or "(no error output)"
    return f"{name} failed (exit status {returncode}):\n{detail}"


__all__ = ["LibpqArguments", "find_tool", "libpq_arguments", "masked", "tool_failure"]
