"""Health checks of a database used by agents_sessions: what ``agents-sessions doctor`` runs.

:func:`diagnose` connects once (a one-off connection, not the shared pool) and runs
named checks, each ending ``ok``, ``warn`` or ``fail`` with a detail and, unless it
is ``ok``, advice saying what to do:

* ``database`` -- the server answers (PostgreSQL) or the file exists (SQLite);
* ``server_version`` -- the server or SQLite library is new enough;
* ``tls`` (PostgreSQL) -- whether this connection is encrypted (``pg_stat_ssl``);
* ``journal_mode`` (SQLite) -- WAL, which lets readers and a writer proceed together;
* ``schema`` -- the revision compared with the head of the shipped migrations;
* ``pool`` -- the pool settings taken from the URL (and the server's connection limit);
* ``indexes`` -- every index the models define exists, on the right columns;
* ``privileges`` (PostgreSQL) -- the role may read and write the tables;
* ``role`` (PostgreSQL) -- the role does not hold more power than an app needs;
* ``archiving`` (PostgreSQL) -- WAL archiving for point-in-time recovery: on, and
  not failing (``pg_stat_archiver``); see :mod:`agents_sessions.ops.archiving`.
* ``row_level_security`` (PostgreSQL) -- whether tenant row-level security is enabled,
  and whether it filters this role (then operator commands need the owner's URL).

A failure never raises: an unreachable server is a failed ``database`` check with
advice, and the checks that need a connection are then not run. No check
changes data, and no detail or advice contains the password.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Connection, Table, inspect, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.schema import CreateIndex

from ..db.engine import DatabaseTarget, create_pooled_engine, mask_url, parse_database_url
from ..db.migrate import schema_status_of
from ..db.models import ONLY_ON_DIALECT, Base
from ..errors import AgentsSessionsError
from ..settings import Settings, load_settings
from .archiving import judge_archiving, read_archiver_state
from .citus import DISTRIBUTION_COLUMNS, citus_version, distributed_tables
from .tenancy import (
    isolation_problem,
    row_level_security_status,
    tables_filtered_for_current_role,
)

#: The outcome of one check.
Status = Literal["ok", "warn", "fail"]

#: Oldest PostgreSQL this package runs on: identity columns arrived in 10.
MIN_POSTGRESQL_VERSION: tuple[int, ...] = (10, 0)
#: Oldest SQLite library: pops use ``DELETE ... RETURNING`` (3.35).
MIN_SQLITE_VERSION: tuple[int, ...] = (3, 35, 0)

#: What the application does to its tables (the repositories read, append, update
#: ``updated_at``, pop and delete) and to ``alembic_version`` (reads it at startup).
APP_TABLE_PRIVILEGES: tuple[str, ...] = ("SELECT", "INSERT", "UPDATE", "DELETE")
VERSION_TABLE = "alembic_version"
VERSION_TABLE_PRIVILEGES: tuple[str, ...] = ("SELECT",)

_LOCAL_HOSTS = {"localhost"}


@dataclass(frozen=True)
class Check:
    """The outcome of one named check.

    Attributes:
        name: Stable identifier (``database``, ``schema``, ``indexes``, ...).
        status: ``ok``, ``warn`` (works, but worth changing) or ``fail`` (broken).
        detail: What was found.
        advice: What to do about it; ``None`` when the status is ``ok``.
    """

    name: str
    status: Status
    detail: str
    advice: str | None = None


@dataclass(frozen=True)
class DoctorReport:
    """Every check run against one database.

    Attributes:
        database: The URL checked, password masked.
        dialect: ``postgresql`` or ``sqlite``; ``None`` if the URL could not be parsed.
        checks: In the order they ran.
    """

    database: str
    dialect: str | None
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no check failed (warnings allowed)."""
        return not self.failures

    @property
    def failures(self) -> list[Check]:
        """The checks that failed."""
        return [check for check in self.checks if check.status == "fail"]

    @property
    def warnings(self) -> list[Check]:
        """The checks that warned."""
        return [check for check in self.checks if check.status == "warn"]

    def check(self, name: str) -> Check:
        """The check called ``name``.

        Raises:
            KeyError: no check of that name ran.
        """
        for check in self.checks:
            if check.name == name:
                return check
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict: ``database``, ``dialect``, ``ok`` and ``checks``."""
        return {
            "database": self.database,
            "dialect": self.dialect,
            "ok": self.ok,
            "checks": [asdict(check) for check in self.checks],
        }


class _Scrubber:
    """Removes the password from any text that reaches a report."""

    def __init__(self, target: DatabaseTarget) -> None:
        password = target.url.password
        self._password = str(password) if password else None

    def __call__(self, value: str) -> str:
        if self._password and self._password in value:
            return value.replace(self._password, "***")
        return value


def _first_line(error: BaseException) -> str:
    """The readable first line of a driver error, without SQLAlchemy's decoration."""
    original = getattr(error, "orig", None) or error
    lines = [line.strip() for line in str(original).splitlines() if line.strip()]
    return lines[0] if lines else type(original).__name__


def _version_text(version: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in version)


def _is_local(target: DatabaseTarget) -> bool:
    host = target.url.host
    if not host or host.startswith("/"):
        return True  # a Unix-domain socket
    if host in _LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _quote(connection: Connection, name: str) -> str:
    return connection.dialect.identifier_preparer.quote(name)


def _app_tables() -> list[Table]:
    return list(Base.metadata.sorted_tables)


# --------------------------------------------------------------------------- checks


def _check_server_version(connection: Connection) -> Check:
    if connection.dialect.name == "postgresql":
        shown = str(connection.exec_driver_sql("SHOW server_version").scalar_one())
        version = tuple(connection.dialect.server_version_info or ())
        minimum = MIN_POSTGRESQL_VERSION
        product = "PostgreSQL"
    else:
        shown = sqlite3.sqlite_version
        version = sqlite3.sqlite_version_info
        minimum = MIN_SQLITE_VERSION
        product = "SQLite library"
    if version < minimum:
        return Check(
            "server_version",
            "fail",
            f"{product} {shown}; agents_sessions needs {_version_text(minimum)} or newer",
            f"upgrade {product} to {_version_text(minimum)} or newer",
        )
    return Check("server_version", "ok", f"{product} {shown}")


def _check_tls(connection: Connection, target: DatabaseTarget) -> Check:
    row = connection.execute(
        text("SELECT ssl, version, cipher FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    ).one_or_none()
    sslmode = str(target.url.query.get("sslmode", "prefer (the libpq default)"))
    host = target.url.host or "a Unix socket"
    if row is not None and row.ssl:
        detail = f"in use: {row.version}, {row.cipher} (sslmode={sslmode})"
        if sslmode in ("verify-full", "verify-ca"):
            return Check("tls", "ok", detail + "; the server's certificate is verified")
        return Check(
            "tls",
            "warn",
            detail + "; the server's certificate is not verified",
            "add sslmode=verify-full (and sslrootcert=... if the CA is not in the system "
            "store) to the database URL, so a machine in the middle cannot pose as the server",
        )
    if _is_local(target):
        return Check("tls", "ok", f"not in use; the connection to {host} is local")
    return Check(
        "tls",
        "warn",
        f"not in use: conversations travel unencrypted to {host}",
        "enable TLS on the server and add sslmode=verify-full (at least sslmode=require) "
        "to the database URL",
    )


def _check_journal_mode(connection: Connection) -> Check:
    mode = str(connection.exec_driver_sql("PRAGMA journal_mode").scalar_one()).lower()
    if mode == "wal":
        return Check("journal_mode", "ok", "wal: readers and one writer work side by side")
    return Check(
        "journal_mode",
        "warn",
        f"{mode}, not wal: SQLite could not switch this file to WAL (its file system may "
        "not support the shared memory WAL needs), so readers and writers block each other",
        "keep the database file on a local disk (not a network share), or use PostgreSQL",
    )


def _check_schema(connection: Connection) -> Check:
    status = schema_status_of(connection)
    if status.at_head:
        return Check("schema", "ok", f"at revision {status.head} (head)")
    return Check("schema", "fail", status.describe(), status.advice())


def _check_pool(connection: Connection, target: DatabaseTarget) -> Check:
    pool = target.pool
    detail = (
        f"{pool.describe()}, pool_recycle={pool.pool_recycle}, "
        f"pool_pre_ping={str(pool.pool_pre_ping).lower()}: at most "
        f"{pool.max_connections} connections per process"
    )
    if connection.dialect.name != "postgresql":
        return Check("pool", "ok", detail)
    server_max = int(connection.exec_driver_sql("SHOW max_connections").scalar_one())
    reserved = int(connection.exec_driver_sql("SHOW superuser_reserved_connections").scalar_one())
    available = server_max - reserved
    detail += f" (the server accepts {available} connections from ordinary roles)"
    if pool.max_connections > available:
        return Check(
            "pool",
            "warn",
            detail,
            "one process could ask for more connections than the server accepts: lower "
            "pool_size/max_overflow in the database URL, raise max_connections, or put "
            "PgBouncer in front",
        )
    return Check("pool", "ok", detail)


def _check_indexes(connection: Connection) -> Check:
    inspector = inspect(connection)
    missing_tables: list[str] = []
    problems: list[str] = []
    statements: list[str] = []
    expected_count = 0
    for table in _app_tables():
        if not inspector.has_table(table.name):
            missing_tables.append(table.name)
            continue
        present = {index["name"]: index for index in inspector.get_indexes(table.name)}
        for index in sorted(table.indexes, key=lambda index: str(index.name)):
            only_on = index.info.get(ONLY_ON_DIALECT)
            if only_on is not None and only_on != connection.dialect.name:
                continue
            dialects = index.info.get("dialects")
            if dialects is not None and connection.dialect.name not in dialects:
                continue  # e.g. the PostgreSQL full-text index (SQLite has FTS5 instead)
            expected_count += 1
            name = str(index.name)
            columns = [column.name for column in index.columns]
            found = present.get(name)
            if found is None:
                problems.append(f"{name} is missing")
                statements.append(str(CreateIndex(index).compile(dialect=connection.dialect)))
            elif not columns:
                continue  # an expression index: its presence is what can be checked
            elif list(found["column_names"]) != columns or bool(found["unique"]) != bool(
                index.unique
            ):
                unique = "unique " if index.unique else ""
                problems.append(
                    f"{name} is on ({', '.join(str(c) for c in found['column_names'])}), "
                    f"expected a {unique}index on ({', '.join(columns)})"
                )
                statements.append(f"DROP INDEX {_quote(connection, name)}")
                statements.append(str(CreateIndex(index).compile(dialect=connection.dialect)))
    if missing_tables:
        return Check(
            "indexes",
            "fail",
            f"table(s) {', '.join(missing_tables)} do not exist",
            "create the schema: run `agents-sessions migrate upgrade`",
        )
    if problems:
        return Check(
            "indexes",
            "fail",
            "; ".join(problems),
            "recreate them (as the tables' owner): "
            + "; ".join(" ".join(statement.split()) for statement in statements)
            + " -- on a busy PostgreSQL database use CREATE INDEX CONCURRENTLY",
        )
    return Check("indexes", "ok", f"all {expected_count} indexes of the models exist")


def _required_privileges() -> dict[str, tuple[str, ...]]:
    required: dict[str, tuple[str, ...]] = {
        table.name: APP_TABLE_PRIVILEGES for table in _app_tables()
    }
    required[VERSION_TABLE] = VERSION_TABLE_PRIVILEGES
    return required


def _check_privileges(connection: Connection) -> Check:
    role = str(connection.execute(text("SELECT current_user")).scalar_one())
    missing: dict[str, list[str]] = {}
    absent: list[str] = []
    for table, privileges in _required_privileges().items():
        if connection.execute(text("SELECT to_regclass(:t)"), {"t": table}).scalar() is None:
            absent.append(table)
            continue
        lacking = [
            privilege
            for privilege in privileges
            if not connection.execute(
                text("SELECT has_table_privilege(:t, :p)"), {"t": table, "p": privilege}
            ).scalar_one()
        ]
        if lacking:
            missing[table] = lacking
    if missing:
        grants = "; ".join(
            f"GRANT {', '.join(privileges)} ON {_quote(connection, table)} "
            f"TO {_quote(connection, role)}"
            for table, privileges in missing.items()
        )
        lacks = "; ".join(f"{table}: {', '.join(p)}" for table, p in missing.items())
        return Check(
            "privileges",
            "fail",
            f"role {role} lacks privileges the application needs ({lacks})",
            f"as the tables' owner, run: {grants}",
        )
    checked = [table for table in _required_privileges() if table not in absent]
    if absent:
        return Check(
            "privileges",
            "fail",
            f"table(s) {', '.join(absent)} do not exist, so their privileges cannot be checked",
            "create the schema: run `agents-sessions migrate upgrade`",
        )
    return Check(
        "privileges",
        "ok",
        f"role {role} may {'/'.join(APP_TABLE_PRIVILEGES)} the tables and read "
        f"{VERSION_TABLE} ({', '.join(checked)})",
    )


def _check_role(connection: Connection) -> Check:
    row = connection.execute(
        text("SELECT current_user AS name, rolsuper FROM pg_roles WHERE rolname = current_user")
    ).one()
    owned = [
        table
        for table in (*(table.name for table in _app_tables()), VERSION_TABLE)
        if connection.execute(
            text(
                "SELECT pg_get_userbyid(relowner) = current_user FROM pg_class "
                "WHERE oid = to_regclass(:t)"
            ),
            {"t": table},
        ).scalar()
    ]
    advice = (
        "run the application as a role granted only SELECT, INSERT, UPDATE, DELETE on "
        f"the tables and SELECT on {VERSION_TABLE}; keep the owner role for migrations "
        "(`agents-sessions migrate upgrade`) and set AGENTS_SESSIONS_AUTO_MIGRATE=false "
        "for the application"
    )
    if row.rolsuper:
        return Check(
            "role",
            "warn",
            f"role {row.name} is a superuser: it bypasses every permission check and can "
            "read or destroy any database on the server",
            advice,
        )
    if owned:
        return Check(
            "role",
            "warn",
            f"role {row.name} owns {', '.join(owned)}: it may ALTER or DROP them, more "
            "than an application needs",
            advice,
        )
    return Check("role", "ok", f"role {row.name} is not a superuser and owns none of the tables")


def _check_archiving(connection: Connection) -> Check:
    status, detail, advice = judge_archiving(read_archiver_state(connection))
    return Check("archiving", status, detail, advice)


def _check_row_level_security(connection: Connection) -> Check:
    states = row_level_security_status(connection)
    enabled = [table for table, on in states.items() if on]
    if not enabled:
        return Check("row_level_security", "ok", "disabled: no tenant isolation by the database")
    role = str(connection.execute(text("SELECT current_user")).scalar_one())
    filtered = tables_filtered_for_current_role(connection)
    if not filtered:
        return Check(
            "row_level_security",
            "ok",
            f"enabled on {', '.join(enabled)}; role {role} is not filtered by it (it owns "
            "the tables or bypasses row-level security): operator commands see every tenant",
        )
    return Check(
        "row_level_security",
        "warn",
        f"enabled, and it filters role {role} ({', '.join(filtered)}): this role sees only "
        "the rows of the tenant it acts for, and none without one. Right for the "
        "application; operator commands (erase, prune, stats, export, conversations) "
        "refuse to run as it, since they would find nothing",
        "run operator commands as the tables' owner: set DATABASE_MIGRATION_URL to the "
        "owner's URL (they use it when this role is filtered) or pass it with --database-url",
    )


def _check_tenant_isolation(connection: Connection) -> Check:
    detail, problem = isolation_problem(connection)
    if problem is None:
        return Check("tenant_isolation", "ok", detail)
    return Check("tenant_isolation", "fail", f"{detail}; {problem}", problem)


# --------------------------------------------------------------------------- runner


def _check_citus(connection: Connection) -> Check:
    """A Citus cluster: which, and whether the store's tables are distributed."""
    version = citus_version(connection)
    assert version is not None  # only run where the extension exists
    workers = connection.execute(
        text(
            "SELECT count(*) FROM pg_dist_node "
            "WHERE isactive AND noderole = 'primary' AND groupid <> 0"
        )
    ).scalar_one()
    done = distributed_tables(connection)
    cluster = f"Citus {version}, {workers} active worker(s)"
    if len(done) == len(DISTRIBUTION_COLUMNS):
        return Check("citus", "ok", f"{cluster}; all tables distributed by conversation id")
    if not done:
        return Check(
            "citus",
            "warn",
            f"{cluster}; the tables are not distributed (everything stays on the coordinator)",
            "run `agents-sessions citus distribute` (see `--dry-run` first)",
        )
    missing = [table for table in DISTRIBUTION_COLUMNS if table not in done]
    return Check(
        "citus",
        "fail",
        f"{cluster}; only {', '.join(sorted(done))} distributed, not {', '.join(missing)}",
        "run `agents-sessions citus distribute` again to finish",
    )


def _with_connect_timeout(target: DatabaseTarget, seconds: int) -> DatabaseTarget:
    """Bound how long an unreachable server can make the doctor wait (psycopg2 only)."""
    if target.dialect != "postgresql" or "connect_timeout" in target.url.query:
        return target
    if not target.url.drivername.endswith("psycopg2"):
        return target
    url = target.url.update_query_dict({"connect_timeout": str(seconds)})
    return dataclasses.replace(target, url=url)


def _database_check(target: DatabaseTarget, error: BaseException | None) -> Check:
    url = target.url
    if target.dialect == "sqlite":
        path = Path(str(url.database)).expanduser()
        if error is not None:
            return Check(
                "database",
                "fail",
                f"cannot open {path}: {_first_line(error)}",
                "check that the file is a SQLite database this user may read and write",
            )
        size = path.stat().st_size
        return Check("database", "ok", f"file {path} ({size:,} bytes)")
    where = f"{url.host or 'local socket'}:{url.port or 5432}/{url.database or ''}"
    if error is not None:
        return Check(
            "database",
            "fail",
            f"cannot connect to {where}: {_first_line(error)}",
            "check that the server is running and reachable from here, that the database "
            "exists, and the user name and password in the URL (--database-url or "
            "DATABASE_URL)",
        )
    return Check("database", "ok", f"connected to {where} as {url.username or 'the OS user'}")


@contextmanager
def _open(target: DatabaseTarget, settings: Settings) -> Iterator[Connection]:
    engine = create_pooled_engine(
        target, pooled=False, sqlite_busy_timeout_ms=settings.sqlite_busy_timeout_ms
    )
    try:
        with engine.connect() as connection:
            yield connection
    finally:
        engine.dispose()


def _run(
    name: str, function: Callable[[], Check], connection: Connection, scrub: _Scrubber
) -> Check:
    """Run one check; a query it could not run makes it fail, not the doctor."""
    try:
        check = function()
    except (sa_exc.SQLAlchemyError, AgentsSessionsError) as exc:
        check = Check(
            name,
            "fail",
            f"the check could not run: {_first_line(exc)}",
            "see the error above; the other checks may say more",
        )
    finally:
        # Each check reads in its own transaction: a failed query in one (which
        # aborts a PostgreSQL transaction) cannot spoil the next.
        connection.rollback()
    return Check(
        check.name,
        check.status,
        scrub(check.detail),
        None if check.advice is None else scrub(check.advice),
    )


def diagnose(
    database_url: str | None = None,
    *,
    settings: Settings | None = None,
    connect_timeout: int = 10,
) -> DoctorReport:
    """Check the database at ``database_url`` (default: the settings' URL).

    Never raises for a problem with the database: every problem is a failed
    :class:`Check` in the returned :class:`DoctorReport`, with advice. Connects
    once, on a connection of its own (``connect_timeout`` seconds at most, unless
    the URL sets one), and changes no data; a SQLite file that does not exist is
    reported, not created.
    """
    try:
        settings = settings or load_settings()
        raw_url = database_url or settings.resolved_database_url()
        target = parse_database_url(raw_url)
    except AgentsSessionsError as exc:
        shown = mask_url(database_url) if database_url else "the configured database URL"
        return DoctorReport(
            database=shown,
            dialect=None,
            checks=[
                Check(
                    "configuration",
                    "fail",
                    str(exc),
                    "fix the database URL (--database-url or DATABASE_URL) or the named setting",
                )
            ],
        )
    report = DoctorReport(database=mask_url(raw_url), dialect=target.dialect)
    scrub = _Scrubber(target)
    if target.dialect == "sqlite":
        path = Path(str(target.url.database)).expanduser()
        if not path.is_file():
            report.checks.append(
                Check(
                    "database",
                    "fail",
                    f"no database file at {path}",
                    "create it: run `agents-sessions migrate upgrade` (the application also "
                    "creates it on first use); or point --database-url / "
                    "AGENTS_SESSIONS_SQLITE_PATH at the existing file",
                )
            )
            return report

    try:
        with _open(_with_connect_timeout(target, connect_timeout), settings) as connection:
            connection.exec_driver_sql("SELECT 1").scalar()
            connection.rollback()
            report.checks.append(_database_check(target, None))
            checks: list[tuple[str, Callable[[], Check]]] = [
                ("server_version", lambda: _check_server_version(connection)),
            ]
            if target.dialect == "postgresql":
                checks.append(("tls", lambda: _check_tls(connection, target)))
            else:
                checks.append(("journal_mode", lambda: _check_journal_mode(connection)))
            checks += [
                ("schema", lambda: _check_schema(connection)),
                ("pool", lambda: _check_pool(connection, target)),
                ("indexes", lambda: _check_indexes(connection)),
            ]
            if target.dialect == "postgresql":
                checks += [
                    ("privileges", lambda: _check_privileges(connection)),
                    ("role", lambda: _check_role(connection)),
                    ("archiving", lambda: _check_archiving(connection)),
                    ("row_level_security", lambda: _check_row_level_security(connection)),
                    ("tenant_isolation", lambda: _check_tenant_isolation(connection)),
                ]
                if citus_version(connection) is not None:
                    checks.append(("citus", lambda: _check_citus(connection)))
            for name, function in checks:
                report.checks.append(_run(name, function, connection, scrub))
    except (sa_exc.SQLAlchemyError, AgentsSessionsError) as exc:
        failed = _database_check(target, exc)
        report.checks.append(Check(failed.name, failed.status, scrub(failed.detail), failed.advice))
    return report


__all__ = [
    "APP_TABLE_PRIVILEGES",
    "Check",
    "DoctorReport",
    "Status",
    "diagnose",
]
