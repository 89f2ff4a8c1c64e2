"""Finding the PostgreSQL server a test run uses, so that plain ``make test`` runs every test.

In order:

1. ``TEST_DATABASE_URL``, when set: that server and no other (unreachable is an answer);
2. a local server, as libpq finds one: the ``PG*`` environment variables (``PGHOST``,
   ``PGPORT``, ``PGUSER``, ``PGPASSWORD``, ``PGSERVICE``...) or, without them, the usual Unix
   socket directories (``/var/run/postgresql``, ``/run/postgresql``, ``/tmp``) as the OS
   user, then ``postgresql://postgres@127.0.0.1:5432/postgres``;
3. a testcontainers PostgreSQL, when a Docker engine answers;
4. nowhere: :class:`~tests.support.prerequisites.Unavailable`, with what each attempt
   answered and the exact command that would have run the tests.

A local server counts only if the role may ``CREATE DATABASE``: the suite works in databases
it creates itself (uniquely named, dropped at the end) and never writes anywhere else.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url

from agents_sessions.db.engine import parse_database_url
from tests.support.prerequisites import Unavailable

#: Where PostgreSQL servers put their socket: Debian/Ubuntu, Fedora/Arch, the upstream default.
SOCKET_DIRECTORIES = ("/var/run/postgresql", "/run/postgresql", "/tmp")
#: The TCP fallback the README names.
LOCAL_TCP_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
#: What to run when nothing was found (the skip reason says it).
EXPLICIT_COMMAND = f"TEST_DATABASE_URL={LOCAL_TCP_URL} make test"
#: libpq's connection variables: any of them set means "connect the way libpq would".
LIBPQ_VARIABLES = (
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGUSER",
    "PGPASSWORD",
    "PGPASSFILE",
    "PGDATABASE",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGSSLMODE",
)
#: ``DROP DATABASE ... WITH (FORCE)`` (how the suite drops its databases) is PostgreSQL 13+.
MINIMUM_SERVER_VERSION = 130000
CONNECT_TIMEOUT_S = 3


@dataclass
class FoundServer:
    """A server the suite may create databases on.

    Attributes:
        url: An explicit URL of a database on it (the password included, when one was
            needed): every fixture, worker process and CLI test can use it as is.
        how: How it was found, for the run's summary line (never the password).
        container: The testcontainers container to stop at the end, if one was started.
    """

    url: str
    how: str
    container: Any = field(default=None, repr=False)

    def __str__(self) -> str:
        return self.how


def find_postgres(
    *,
    socket_directories: Sequence[str] = SOCKET_DIRECTORIES,
    tcp_url: str = LOCAL_TCP_URL,
    docker: bool = True,
) -> FoundServer:
    """The server of this test run (see the module docstring).

    The keywords narrow the search (the suite's own tests of it use them).

    Raises:
        Unavailable: none was found; the reason lists every attempt.
    """
    explicit = os.environ.get("TEST_DATABASE_URL", "").strip()
    if explicit:
        safe = make_url(explicit).render_as_string(hide_password=True)
        problem = _unusable(explicit)
        if problem:
            raise Unavailable(
                f"TEST_DATABASE_URL ({safe}): {problem}",
                how="start that server or point TEST_DATABASE_URL at one that runs",
            )
        return FoundServer(explicit, f"TEST_DATABASE_URL {safe}")

    attempts: list[str] = []
    for label, parameters in _local_candidates(socket_directories, tcp_url):
        try:
            connection = psycopg2.connect(connect_timeout=CONNECT_TIMEOUT_S, **parameters)
        except psycopg2.Error as exc:
            attempts.append(f"{label}: {_first_line(exc)}")
            continue
        try:
            url, where = _explicit_url(connection)
        finally:
            connection.close()
        problem = _unusable(url)
        if problem:
            attempts.append(f"{label} ({where}): {problem}")
            continue
        return FoundServer(url, f"{where}, found via {label}")

    docker_problem = _docker_problem() if docker else "not tried"
    if docker_problem is None:
        return _start_container()
    attempts.append(f"testcontainers: {docker_problem}")
    raise Unavailable(
        "TEST_DATABASE_URL is unset and no server was found (" + "; ".join(attempts) + ")",
        how=EXPLICIT_COMMAND,
    )


def _local_candidates(
    socket_directories: Sequence[str], tcp_url: str
) -> list[tuple[str, dict[str, Any]]]:
    """Where a local server may be, in the order libpq users expect."""
    candidates: list[tuple[str, dict[str, Any]]] = []
    if any(os.environ.get(name) for name in LIBPQ_VARIABLES):
        # Exactly what psql would do; the database defaults to `postgres` (always there)
        # rather than libpq's user-named one, unless PGDATABASE/PGSERVICE says otherwise.
        chosen = os.environ.get("PGDATABASE") or os.environ.get("PGSERVICE")
        candidates.append(("the PG* environment", {} if chosen else {"dbname": "postgres"}))
    port = os.environ.get("PGPORT") or "5432"
    for directory in socket_directories:
        if (Path(directory) / f".s.PGSQL.{port}").exists():
            candidates.append(
                (
                    f"the Unix socket in {directory}",
                    {"host": directory, "port": port, "dbname": "postgres"},
                )
            )
    candidates.append((tcp_url, {"dsn": tcp_url}))
    return candidates


def _explicit_url(connection: Any) -> tuple[str, str]:
    """The URL of the database ``connection`` reached, as libpq resolved it, and a safe label.

    A server reached over a Unix socket that also answers on 127.0.0.1 (same port, same
    postmaster) gets its TCP URL: tests and tools that add a query string to a URL, or
    read its host, expect one in that form.
    """
    info = connection.info
    socket = info.host.startswith("/")
    if socket and _same_server_over_tcp(connection):
        socket = False
        info = _TcpInfo(info)
    query = {"host": info.host, "port": str(info.port)} if socket else {}
    url = URL.create(
        "postgresql",
        username=info.user,
        password=info.password or None,
        host=None if socket else info.host,
        port=None if socket else info.port,
        database=info.dbname,
        query=query,
    )
    where = f"{info.user}@{info.host}:{info.port}/{info.dbname}"
    return url.render_as_string(hide_password=False), where


class _TcpInfo:
    """``connection.info``, as if the connection had gone to 127.0.0.1."""

    def __init__(self, info: Any) -> None:
        self.host = "127.0.0.1"
        self.port = info.port
        self.user = info.user
        self.password = info.password
        self.dbname = info.dbname


def _same_server_over_tcp(connection: Any) -> bool:
    info = connection.info
    started = "SELECT pg_postmaster_start_time()::text"
    try:
        with connection.cursor() as cursor:
            cursor.execute(started)
            over_socket = cursor.fetchone()
        tcp = psycopg2.connect(
            host="127.0.0.1",
            port=info.port,
            user=info.user,
            password=info.password or None,
            dbname=info.dbname,
            connect_timeout=CONNECT_TIMEOUT_S,
        )
    except psycopg2.Error:
        return False
    try:
        with tcp.cursor() as cursor:
            cursor.execute(started)
            return bool(cursor.fetchone() == over_socket)
    finally:
        tcp.close()


def _unusable(url: str) -> str | None:
    """Why the suite cannot work on ``url``'s server, or ``None``."""
    engine = create_engine(
        parse_database_url(url).url, connect_args={"connect_timeout": CONNECT_TIMEOUT_S}
    )
    try:
        with engine.connect() as connection:
            version = int(connection.execute(text("SHOW server_version_num")).scalar_one())
            may_create = connection.execute(
                text("SELECT rolsuper OR rolcreatedb FROM pg_roles WHERE rolname = current_user")
            ).scalar_one()
    except Exception as exc:
        return f"cannot connect: {_first_line(exc)}"
    finally:
        engine.dispose()
    if version < MINIMUM_SERVER_VERSION:
        return f"server version {version} is older than PostgreSQL 13"
    if not may_create:
        return "the role may not CREATE DATABASE (the suite works in databases of its own)"
    return None


def _docker_problem() -> str | None:
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception as exc:
        return f"no Docker engine answers ({_first_line(exc)})"
    return None


def _start_container() -> FoundServer:
    from testcontainers.postgres import PostgresContainer

    container = PostgresContainer("postgres:16-alpine", driver="psycopg2")
    container.start()
    url = container.get_connection_url()
    return FoundServer(url, "a testcontainers postgres:16-alpine", container=container)


def _first_line(exc: BaseException) -> str:
    text_ = str(exc).strip()
    return text_.splitlines()[0] if text_ else type(exc).__name__
