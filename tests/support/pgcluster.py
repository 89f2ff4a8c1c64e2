"""Throwaway PostgreSQL servers, TLS certificates, streaming replicas and PgBouncers for tests.

The shared test server (``TEST_DATABASE_URL``) must never be restarted or
reconfigured, so tests that stop, crash, restart or re-wire a server get one of
their own from here:

* :class:`Cluster` -- ``initdb`` in a temporary directory, a free TCP port on
  127.0.0.1, trust authentication, started and stopped with ``pg_ctl -w``;
  ``Cluster(tls=True)`` adds a throwaway certificate authority and a server
  certificate, and refuses unencrypted TCP connections;
  :meth:`Cluster.make_replica` adds a streaming standby (``pg_basebackup -R``);
  ``Cluster(archive=True)`` archives its WAL into a directory of its own
  (``archive_mode = on``), :meth:`Cluster.base_backup` takes a ``pg_basebackup``
  and :meth:`Cluster.recover` starts a new server from one, replaying the archive
  up to a named restore point or a moment (point-in-time recovery).
* :class:`PgBackRest` -- pgBackRest with a repository of its own for a cluster:
  ``archive-push`` as its ``archive_command``, backups, and restores to a target.
* :class:`PgBouncer` -- a ``pgbouncer`` in transaction pooling mode in front of a
  cluster, with its admin console (``SHOW POOLS`` ...) at hand.

Everything is removed by ``cleanup()`` (the fixtures call it, pass or fail), and
an ``atexit`` hook stops whatever a crashed test run left behind.

The server binaries are Debian's (``/usr/lib/postgresql/<version>/bin``, found
through ``pg_config --bindir``; ``$PG_BINDIR`` wins). ``initdb`` and ``postgres``
refuse to run as root, so when the tests run as root every server process runs
as the ``postgres`` OS user, in directories chowned to it.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlencode

import psycopg2

#: The OS user that owns and runs the throwaway servers when the tests run as root.
SERVER_OS_USER = "postgres"
#: The database superuser of every throwaway cluster (``initdb -U``).
SUPERUSER = "postgres"
HOST = "127.0.0.1"

StopMode = Literal["smart", "fast", "immediate"]


class ToolMissingError(RuntimeError):
    """A program these helpers need (``initdb``, ``openssl``, ``pgbouncer``...) is missing."""


class ClusterError(RuntimeError):
    """A throwaway server failed to initialise, start or stop; the message has its log."""


# ------------------------------------------------------------------------ tools


def server_bindir() -> Path:
    """The directory holding ``initdb``, ``pg_ctl`` and ``pg_basebackup``.

    ``$PG_BINDIR``, then ``pg_config --bindir``, then the newest
    ``/usr/lib/postgresql/<version>/bin`` (Debian keeps the server binaries off
    ``PATH``), then ``PATH`` itself.

    Raises:
        ToolMissingError: no directory has all three programs.
    """
    candidates: list[Path] = []
    if os.environ.get("PG_BINDIR"):
        candidates.append(Path(os.environ["PG_BINDIR"]))
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            output = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
            candidates.append(Path(output))

    def version(path: str) -> tuple[int, ...]:
        number = Path(path).parent.name
        return tuple(int(part) for part in number.split(".") if part.isdigit())

    candidates.extend(
        Path(path) for path in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version)[::-1]
    )
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).parent)
    for directory in candidates:
        if all((directory / name).is_file() for name in ("initdb", "pg_ctl", "pg_basebackup")):
            return directory
    raise ToolMissingError(
        "PostgreSQL server binaries (initdb, pg_ctl, pg_basebackup) not found in "
        f"{[str(c) for c in candidates] or 'pg_config --bindir / /usr/lib/postgresql/*/bin'}; "
        "install them (Debian: apt-get install postgresql) or set PG_BINDIR"
    )


def require_program(name: str, hint: str) -> str:
    """The path of ``name`` on ``PATH``, or :class:`ToolMissingError` saying how to get it."""
    path = shutil.which(name)
    if path is None:
        raise ToolMissingError(f"{name!r} not found on PATH; {hint}")
    return path


#: Where Debian and others install ``pgbouncer`` (``/usr/sbin`` is not on a user's ``PATH``).
PGBOUNCER_DIRECTORIES = ("/usr/sbin", "/usr/local/sbin", "/usr/local/bin", "/opt/homebrew/bin")


def pgbouncer_program() -> str:
    """The path of ``pgbouncer``: on ``PATH``, else in :data:`PGBOUNCER_DIRECTORIES`.

    Raises:
        ToolMissingError: it is in neither.
    """
    found = shutil.which("pgbouncer") or shutil.which(
        "pgbouncer", path=os.pathsep.join(PGBOUNCER_DIRECTORIES)
    )
    if found is None:
        raise ToolMissingError(
            f"'pgbouncer' not found on PATH nor in {', '.join(PGBOUNCER_DIRECTORIES)}; "
            "install it (Debian: apt-get install pgbouncer)"
        )
    return found


def check_server_tools(*, tls: bool = False) -> None:
    """Raise :class:`ToolMissingError` unless a throwaway cluster can be made here."""
    server_bindir()
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_OS_USER)
        except KeyError:
            raise ToolMissingError(
                f"running as root, but there is no {SERVER_OS_USER!r} OS user to run "
                "initdb/postgres as (they refuse to run as root)"
            ) from None
    if tls:
        require_program("openssl", "install it (Debian: apt-get install openssl)")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def _as_server_user() -> dict[str, Any]:
    """``subprocess`` arguments that run a child as the server's OS user.

    As root: switch to ``postgres`` (and drop root's supplementary groups). As
    anyone else: run as that user, who then owns the cluster.
    """
    if os.geteuid() != 0:
        return {}
    return {"user": SERVER_OS_USER, "group": SERVER_OS_USER, "extra_groups": []}


def _give_to_server_user(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, SERVER_OS_USER, SERVER_OS_USER)


def _child_environment() -> dict[str, str]:
    # PGPORT/PGHOST/PGDATA... of the caller (CI exports them for the shared server)
    # must not steer tools run against a throwaway cluster.
    environment = {name: value for name, value in os.environ.items() if not name.startswith("PG")}
    environment["LC_ALL"] = "C.UTF-8"
    return environment


def _run(
    command: Sequence[str | Path], *, cwd: Path, as_server: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    kwargs = _as_server_user() if as_server else {}
    return subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=_child_environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kwargs,
    )


def _checked(result: subprocess.CompletedProcess[str], what: str, log: Path | None = None) -> None:
    if result.returncode == 0:
        return
    details = (result.stdout + result.stderr).strip()
    if log is not None and log.exists():
        details += "\n--- server log (tail) ---\n" + _tail(log)
    raise ClusterError(f"{what} failed (exit {result.returncode}):\n{details}")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"


def _make_directory(prefix: str) -> Path:
    # Short paths: the Unix socket lives in here, and socket paths max out at 107 bytes.
    directory = Path(tempfile.mkdtemp(prefix=f"as_{prefix}_", dir="/tmp"))
    _give_to_server_user(directory)
    return directory


# ------------------------------------------------------------------- cleanup


_CREATOR_PID = os.getpid()
_live: dict[int, Cluster | PgBouncer] = {}


@atexit.register
def _cleanup_leftovers() -> None:
    # Only the process that started them: a forked child exiting must not stop
    # the parent's servers.
    if os.getpid() != _CREATOR_PID:
        return
    for thing in list(_live.values()):
        with contextlib.suppress(Exception):
            thing.cleanup()


# ---------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class CertificateAuthority:
    """A throwaway certificate authority made with the ``openssl`` CLI.

    Attributes:
        cert: The CA certificate (PEM): what a client passes as ``sslrootcert``.
        key: The CA's private key.
    """

    cert: Path
    key: Path

    @classmethod
    def create(cls, directory: Path, name: str = "agents_sessions test CA") -> CertificateAuthority:
        """Make a new CA (P-256 key, valid for two days) in ``directory``."""
        openssl = require_program("openssl", "install it (Debian: apt-get install openssl)")
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = directory / "ca.crt", directory / "ca.key"
        result = _run(
            [
                openssl, "req", "-x509", "-new", "-nodes", "-days", "2",
                "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-keyout", key, "-out", cert, "-subj", f"/CN={name}",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            ],
            cwd=directory,
            as_server=False,
        )  # fmt: skip
        _checked(result, "openssl req (CA)")
        return cls(cert=cert, key=key)

    def issue_server_certificate(
        self,
        directory: Path,
        *,
        dns_names: Sequence[str] = ("localhost",),
        ip_addresses: Sequence[str] = (HOST,),
    ) -> tuple[Path, Path]:
        """Sign a server certificate for these names; returns ``(cert, key)`` paths.

        The names go in the subjectAltName, which is what ``sslmode=verify-full``
        checks the connection's host against.
        """
        openssl = require_program("openssl", "install it (Debian: apt-get install openssl)")
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = directory / "server.crt", directory / "server.key"
        request, extensions = directory / "server.csr", directory / "server.ext"
        names = [f"DNS:{n}" for n in dns_names] + [f"IP:{ip}" for ip in ip_addresses]
        extensions.write_text(
            f"subjectAltName={','.join(names)}\n"
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
        )
        common_name = (list(dns_names) + list(ip_addresses))[0]
        _checked(
            _run(
                [
                    openssl, "req", "-new", "-nodes",
                    "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-keyout", key, "-out", request, "-subj", f"/CN={common_name}",
                ],
                cwd=directory,
                as_server=False,
            ),
            "openssl req (server)",
        )  # fmt: skip
        _checked(
            _run(
                [
                    openssl, "x509", "-req", "-in", request, "-days", "2",
                    "-CA", self.cert, "-CAkey", self.key, "-CAcreateserial",
                    "-extfile", extensions, "-out", cert,
                ],
                cwd=directory,
                as_server=False,
            ),
            "openssl x509 (sign server certificate)",
        )  # fmt: skip
        return cert, key


# ------------------------------------------------------------------- cluster


class Cluster:
    """A PostgreSQL server of the test's own, in a temporary directory.

    Construction runs ``initdb`` and writes the configuration; :meth:`start`
    starts it. Used as a context manager it is started on entry and always
    removed on exit::

        with Cluster() as cluster:
            url = cluster.url("postgres")
            cluster.restart()

    Authentication is ``trust`` for every user, over the Unix socket (in the
    cluster's directory) and TCP on 127.0.0.1. Replication connections are
    allowed, so :meth:`make_replica` works on any cluster.

    Args:
        tls: Make a CA (:attr:`ca`) and a server certificate for ``localhost`` and
            127.0.0.1, and turn ``ssl`` on.
        allow_plaintext: With ``tls``, whether unencrypted TCP connections are
            accepted. ``False`` (the default) puts ``hostnossl ... reject`` lines
            first in ``pg_hba.conf``: TLS is enforced.
        settings: Extra ``postgresql.conf`` settings (``{"max_connections": "20"}``).
        archive: Turn on continuous archiving: ``archive_mode = on`` and an
            ``archive_command`` that copies each finished WAL file into
            :attr:`archive_dir` (and refuses to overwrite one already there).
        name: A word for the directory name and error messages.
    """

    def __init__(
        self,
        *,
        tls: bool = False,
        allow_plaintext: bool = False,
        settings: Mapping[str, str] | None = None,
        archive: bool = False,
        name: str = "pg",
        _directory: Path | None = None,
    ) -> None:
        check_server_tools(tls=tls)
        self.bindir = server_bindir()
        self.name = name
        self.tls = tls
        self.port = free_port()
        self.ca: CertificateAuthority | None = None
        self.replicas: list[Cluster] = []
        #: Servers recovered from this one's base backups (:meth:`recover`).
        self.recoveries: list[Cluster] = []
        self._running = False
        #: Whether it has run once (its port may have been handed out since).
        self._started = False
        self._removed = False
        self.directory = _directory or _make_directory(name)
        self.data_dir = self.directory / "data"
        self.log_file = self.directory / "server.log"
        #: Where ``archive_command`` copies finished WAL files (``archive=True``).
        self.archive_dir = self.directory / "archive"
        #: The ``archive_command`` of ``archive=True`` (``None`` otherwise).
        self.archive_command: str | None = None
        _live[id(self)] = self
        try:
            if _directory is None:
                self._initdb()
                self._write_pg_hba(tls=tls, allow_plaintext=allow_plaintext)
                archiving = self._archive_settings() if archive else {}
                self._write_settings(self._base_settings(tls) | archiving | dict(settings or {}))
        except BaseException:
            self.cleanup()
            raise

    # ------------------------------------------------------------ setup

    def _initdb(self) -> None:
        result = _run(
            [
                self.bindir / "initdb", "-D", self.data_dir, "-U", SUPERUSER,
                "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync",
            ],
            cwd=self.directory,
        )  # fmt: skip
        _checked(result, f"initdb of cluster {self.name!r}")

    def _base_settings(self, tls: bool) -> dict[str, str]:
        settings = {
            "listen_addresses": f"'{HOST}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.directory}'",
            "shared_buffers": "'16MB'",
            # A throwaway server needs no protection against power loss; process
            # crashes (immediate stops) lose nothing committed either way.
            "fsync": "off",
            "wal_level": "replica",
            "max_wal_senders": "5",
            "hot_standby": "on",
            "logging_collector": "off",
            "log_min_messages": "warning",
        }
        if tls:
            tls_directory = self.directory / "tls"
            self.ca = CertificateAuthority.create(tls_directory)
            cert, key = self.ca.issue_server_certificate(tls_directory)
            # The server refuses a key that others may read; it must own it.
            key.chmod(0o600)
            _give_to_server_user(key)
            _give_to_server_user(cert)
            settings |= {"ssl": "on", "ssl_cert_file": f"'{cert}'", "ssl_key_file": f"'{key}'"}
        return settings

    def _archive_settings(self) -> dict[str, str]:
        self.archive_dir.mkdir()
        _give_to_server_user(self.archive_dir)
        # The classic command of the PostgreSQL manual (§26.3.1): never overwrite a
        # file already archived, and fail (so the server retries) if the copy fails.
        archive = shlex.quote(str(self.archive_dir))
        self.archive_command = f"test ! -f {archive}/%f && cp %p {archive}/%f"
        return {"archive_mode": "on", "archive_command": _conf_string(self.archive_command)}

    def _write_pg_hba(self, *, tls: bool, allow_plaintext: bool) -> None:
        lines = ["local all all trust", "local replication all trust"]
        if tls and not allow_plaintext:
            # First match wins: an unencrypted TCP connection is rejected outright.
            lines += ["hostnossl all all 0.0.0.0/0 reject", "hostnossl all all ::/0 reject"]
        kind = "hostssl" if tls and not allow_plaintext else "host"
        lines += [
            f"{kind} all all 127.0.0.1/32 trust",
            f"{kind} all all ::1/128 trust",
            # `all` does not cover replication connections: they need their own line.
            "host replication all 127.0.0.1/32 trust",
        ]
        (self.data_dir / "pg_hba.conf").write_text("\n".join(lines) + "\n")

    def _write_settings(self, settings: Mapping[str, str]) -> None:
        # Appended: later lines win, so a replica copied from a primary can
        # override the port and socket directory the same way.
        block = "\n".join(f"{key} = {value}" for key, value in settings.items())
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(f"\n# agents_sessions tests\n{block}\n")

    # ------------------------------------------------------------ lifecycle

    def _pg_ctl(self, *arguments: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return _run(
            [self.bindir / "pg_ctl", "-D", self.data_dir, *arguments],
            cwd=self.directory,
            timeout=timeout,
        )

    @property
    def running(self) -> bool:
        """Whether the server is running (asks ``pg_ctl status``)."""
        return self._pg_ctl("status").returncode == 0

    def start(self) -> None:
        """Start the server and wait until it accepts connections (crash recovery included).

        On its first start only, a port taken since :func:`free_port` chose it (by a
        client socket's ephemeral port, say) is replaced by a new free one: nobody
        has been given the old one yet.
        """
        for attempt in range(3):
            result = self._pg_ctl("start", "-w", "-t", "90", "-l", str(self.log_file))
            taken = result.returncode != 0 and "Address already in use" in _tail(self.log_file)
            if not (taken and not self._started and attempt < 2):
                break
            self.port = free_port()
            self._write_settings({"port": str(self.port)})
        _checked(result, f"pg_ctl start of cluster {self.name!r}", self.log_file)
        self._running = self._started = True

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server and wait until it is gone.

        ``"fast"`` rolls back open transactions and disconnects clients cleanly;
        ``"immediate"`` is a crash: every server process is killed, and the next
        :meth:`start` runs crash recovery from the WAL.
        """
        result = self._pg_ctl("stop", "-w", "-t", "90", "-m", mode)
        _checked(result, f"pg_ctl stop -m {mode} of cluster {self.name!r}", self.log_file)
        self._running = False

    def crash(self) -> None:
        """Same as ``stop("immediate")``: the server dies as if killed."""
        self.stop("immediate")

    def restart(self, mode: StopMode = "fast") -> None:
        """``pg_ctl restart -m mode``: stop, then start again on the same port."""
        result = self._pg_ctl("restart", "-w", "-t", "90", "-m", mode, "-l", str(self.log_file))
        _checked(result, f"pg_ctl restart -m {mode} of cluster {self.name!r}", self.log_file)
        self._running = True

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server log (for assertion messages)."""
        return _tail(self.log_file, lines)

    def cleanup(self) -> None:
        """Stop the server (and its replicas and recoveries) immediately and delete
        the directory.

        Idempotent; never raises for a server that is already gone.
        """
        if self._removed:
            return
        for derived in (*self.replicas, *self.recoveries):
            derived.cleanup()
        if self.data_dir.exists():
            with contextlib.suppress(Exception):
                if self.running:
                    self._pg_ctl("stop", "-w", "-t", "30", "-m", "immediate")
        self._running = False
        shutil.rmtree(self.directory, ignore_errors=True)
        self._removed = True
        _live.pop(id(self), None)

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"Cluster({self.name!r}, port={self.port}, tls={self.tls})"

    # ------------------------------------------------------------ clients

    def url(
        self,
        database: str = "postgres",
        *,
        host: str = HOST,
        user: str = SUPERUSER,
        password: str | None = None,
        **query: str | int,
    ) -> str:
        """A ``postgresql://`` URL to ``database`` over TCP, with ``query`` parameters.

        ``cluster.url("app", sslmode="verify-full", sslrootcert=cluster.ca.cert)``
        """
        credentials = quote(user, safe="")
        if password is not None:
            credentials += ":" + quote(password, safe="")
        suffix = ("?" + urlencode({k: str(v) for k, v in query.items()})) if query else ""
        return f"postgresql://{credentials}@{host}:{self.port}/{database}{suffix}"

    @contextlib.contextmanager
    def connect(self, database: str = "postgres") -> Iterator[Any]:
        """A psycopg2 connection in autocommit mode, over the cluster's Unix socket.

        The socket path is not subject to the TCP rules (TLS required or not), so
        this works on every cluster.
        """
        connection = psycopg2.connect(
            host=str(self.directory), port=self.port, user=SUPERUSER, dbname=database
        )
        try:
            connection.autocommit = True
            yield connection
        finally:
            connection.close()

    def execute(
        self, sql: str, parameters: Sequence[Any] | None = None, *, database: str = "postgres"
    ) -> list[tuple[Any, ...]]:
        """Run one statement as the superuser (autocommit) and return its rows, if any."""
        with self.connect(database) as connection, connection.cursor() as cursor:
            cursor.execute(sql, parameters)
            return list(cursor.fetchall()) if cursor.description is not None else []

    def create_database(self, name: str | None = None) -> str:
        """Create a database (default: a unique name) and return its TCP URL."""
        name = name or f"test_{os.urandom(5).hex()}"
        self.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def terminate_backends(self, database: str) -> int:
        """``pg_terminate_backend`` every client backend connected to ``database``."""
        rows = self.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            [database],
        )
        return int(rows[0][0])

    # ------------------------------------------------------------ replication

    def make_replica(self, name: str | None = None) -> Cluster:
        """A streaming standby of this (running) cluster, started on its own port.

        ``pg_basebackup -R -X stream`` copies the data directory and writes
        ``primary_conninfo`` and ``standby.signal``; the copy's port and socket
        directory are then changed. It is removed with this cluster.
        """
        name = name or f"{self.name}_replica"
        directory = _make_directory(name)
        replica = Cluster(tls=False, name=name, _directory=directory)
        replica.tls = self.tls
        replica.ca = self.ca
        self.replicas.append(replica)
        result = _run(
            [
                self.bindir / "pg_basebackup", "-D", replica.data_dir, "-h", HOST,
                "-p", str(self.port), "-U", SUPERUSER, "-R", "-X", "stream",
                "--checkpoint=fast", "--no-sync",
            ],
            cwd=directory,
        )  # fmt: skip
        _checked(result, f"pg_basebackup of {self.name!r}", self.log_file)
        replica._write_settings(
            {"port": str(replica.port), "unix_socket_directories": f"'{directory}'"}
        )
        replica.start()
        return replica

    # ------------------------------------------------------------ archiving and recovery

    def switch_wal(self, *, timeout: float = 30.0) -> str:
        """Close the current WAL file (``pg_switch_wal()``) and wait until it is archived.

        Archiving only ever copies finished 16 MB files; forcing the switch puts
        every change made so far into the archive now instead of whenever the file
        fills up. Returns the name of the file that was closed.

        Raises:
            TimeoutError: not archived within ``timeout`` seconds (the archiver's
                failures and the server log are in the message).
        """
        (walfile,) = self.execute("SELECT pg_walfile_name(pg_switch_wal())")[0]
        deadline = time.monotonic() + timeout
        while True:
            # Same timeline: WAL file names sort in WAL order.
            archived, failed, last_failed = self.execute(
                "SELECT coalesce(last_archived_wal >= %s, false), failed_count, "
                "last_failed_wal FROM pg_stat_archiver",
                [walfile],
            )[0]
            if archived:
                return str(walfile)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"WAL file {walfile} of cluster {self.name!r} not archived after "
                    f"{timeout:g}s ({failed} failed attempts, last on {last_failed})\n"
                    f"--- server log ---\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def base_backup(self, name: str = "base") -> Path:
        """``pg_basebackup`` of this running cluster into a new directory; returns it.

        Plain format, with the WAL needed to make the copy consistent streamed
        into it (``-X stream``), after an immediate checkpoint (``--checkpoint=fast``).
        """
        backups = self.directory / "backups"
        if not backups.exists():
            backups.mkdir()
            _give_to_server_user(backups)
        target = backups / name
        result = _run(
            [
                self.bindir / "pg_basebackup", "-D", target, "-h", HOST,
                "-p", str(self.port), "-U", SUPERUSER, "-X", "stream",
                "--checkpoint=fast", "--no-sync",
            ],
            cwd=self.directory,
        )  # fmt: skip
        _checked(result, f"pg_basebackup of {self.name!r}", self.log_file)
        return target

    def recover(
        self,
        base_backup: Path,
        *,
        target_name: str | None = None,
        target_time: str | None = None,
        name: str | None = None,
        timeout: float = 90.0,
    ) -> Cluster:
        """Point-in-time recovery: a new server from ``base_backup`` and this cluster's
        WAL archive, replayed up to a restore point or a moment, then promoted.

        A copy of the base backup gets ``restore_command`` (reads :attr:`archive_dir`),
        ``recovery_target_name`` or ``recovery_target_time``,
        ``recovery_target_action = 'promote'`` and a ``recovery.signal`` file; it is
        started, and this returns once it has reached the target and left recovery
        (a new timeline). It archives nothing itself, and is removed with this cluster.

        Raises:
            ValueError: not exactly one of ``target_name`` and ``target_time``.
            ClusterError: the server stopped (e.g. the target was never reached) or
                did not finish recovery within ``timeout`` seconds.
        """
        if (target_name is None) == (target_time is None):
            raise ValueError("give exactly one of target_name and target_time")
        name = name or f"{self.name}_recovered"
        directory = _make_directory(name)
        recovered = Cluster(tls=False, name=name, _directory=directory)
        recovered.tls, recovered.ca = self.tls, self.ca
        self.recoveries.append(recovered)
        # cp -a as the server user: the data directory must be its own, mode 0700.
        _checked(
            _run(["cp", "-a", base_backup, recovered.data_dir], cwd=directory),
            f"copy of base backup {base_backup}",
        )
        archive = shlex.quote(str(self.archive_dir))
        target = (
            {"recovery_target_name": _conf_string(target_name)}
            if target_name is not None
            else {"recovery_target_time": _conf_string(str(target_time))}
        )
        recovered._write_settings(
            {
                "port": str(recovered.port),
                "unix_socket_directories": f"'{directory}'",
                "archive_mode": "off",
                "restore_command": _conf_string(f"cp {archive}/%f %p"),
                **target,
                "recovery_target_action": "'promote'",
            }
        )
        signal_file = recovered.data_dir / "recovery.signal"
        signal_file.touch()
        _give_to_server_user(signal_file)
        recovered.start_recovery(timeout=timeout)
        return recovered

    def start_recovery(self, *, timeout: float = 90.0) -> None:
        """Start a server set up for targeted recovery; return once it is promoted.

        Raises:
            ClusterError: the server stopped (e.g. the target was never reached) or
                did not leave recovery within ``timeout`` seconds.
        """
        self.start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.execute("SELECT pg_is_in_recovery()") == [(False,)]:
                    return
            except psycopg2.OperationalError:
                if not self.running:
                    raise ClusterError(
                        f"recovery of {self.name!r} stopped the server:\n{self.log_tail()}"
                    ) from None
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"{self.name!r} still in recovery after {timeout:g}s:\n{self.log_tail()}"
                )
            time.sleep(0.05)


class PgBackRest:
    """pgBackRest for one throwaway cluster: a repository in a temporary directory.

    Give it the cluster *before* starting it: it writes ``pgbackrest.conf`` (stanza
    ``main``, the repository, the cluster's data directory, port and socket) and
    points the cluster's ``archive_command`` at ``pgbackrest archive-push``::

        cluster = Cluster(archive=True)
        backrest = PgBackRest(cluster)
        cluster.start()
        backrest.run("stanza-create")
        backrest.run("backup", "--type=full")
        ...
        recovered = backrest.recover(target_name="before-the-mistake")

    Every command runs as the server's OS user, with ``--config`` naming this
    file; the repository, logs and locks are removed with the cluster.
    """

    STANZA = "main"

    def __init__(self, cluster: Cluster) -> None:
        self.executable = require_program(
            "pgbackrest", "install it (Debian: apt-get install pgbackrest)"
        )
        self.cluster = cluster
        self.directory = cluster.directory / "pgbackrest"
        self.repository = self.directory / "repo"
        for path in (self.directory, self.repository, self.directory / "log"):
            path.mkdir()
            _give_to_server_user(path)
        self.config = self.directory / "pgbackrest.conf"
        self.config.write_text(
            "[global]\n"
            f"repo1-path={self.repository}\n"
            "repo1-retention-full=2\n"
            "start-fast=y\n"
            f"log-path={self.directory / 'log'}\n"
            f"lock-path={self.directory / 'lock'}\n"
            "log-level-console=warn\n"
            "log-level-file=off\n"
            f"[{self.STANZA}]\n"
            f"pg1-path={cluster.data_dir}\n"
            f"pg1-port={cluster.port}\n"
            f"pg1-socket-path={cluster.directory}\n"
        )
        _give_to_server_user(self.config)
        #: What the cluster archives with (set in its postgresql.conf).
        self.archive_command = (
            f"{self.executable} --config={self.config} --stanza={self.STANZA} archive-push %p"
        )
        cluster._write_settings({"archive_command": _conf_string(self.archive_command)})
        cluster.archive_command = self.archive_command

    def command(self, *arguments: str) -> list[str]:
        """The full command line of ``pgbackrest ARGUMENTS`` for this stanza."""
        return [self.executable, f"--config={self.config}", f"--stanza={self.STANZA}", *arguments]

    def run(self, *arguments: str, timeout: float = 120) -> str:
        """Run ``pgbackrest ARGUMENTS`` as the server user; its output.

        Raises:
            ClusterError: it failed (its output and the server log are in the message).
        """
        result = _run(self.command(*arguments), cwd=self.directory, timeout=timeout)
        _checked(result, f"pgbackrest {' '.join(arguments)}", self.cluster.log_file)
        return result.stdout

    def recover(
        self,
        *,
        target_name: str | None = None,
        target_time: str | None = None,
        name: str | None = None,
        timeout: float = 90.0,
    ) -> Cluster:
        """``pgbackrest restore`` of the latest backup into a new server, recovering
        to a restore point (``--type=name``) or a moment (``--type=time``), then
        promoted. pgBackRest writes ``restore_command`` and ``recovery.signal``
        itself. Removed with the source cluster.
        """
        if (target_name is None) == (target_time is None):
            raise ValueError("give exactly one of target_name and target_time")
        name = name or f"{self.cluster.name}_restored"
        directory = _make_directory(name)
        recovered = Cluster(tls=False, name=name, _directory=directory)
        self.cluster.recoveries.append(recovered)
        kind, target = ("name", target_name) if target_name is not None else ("time", target_time)
        self.run(
            "restore",
            f"--pg1-path={recovered.data_dir}",
            f"--type={kind}",
            f"--target={target}",
            "--target-action=promote",
        )
        recovered._write_settings(
            {
                "port": str(recovered.port),
                "unix_socket_directories": f"'{directory}'",
                "archive_mode": "off",
            }
        )
        recovered.start_recovery(timeout=timeout)
        return recovered


def _conf_string(value: str) -> str:
    """``value`` as a single-quoted ``postgresql.conf`` string."""
    return "'" + value.replace("'", "''") + "'"


def wait_for_replay(primary: Cluster, replica: Cluster, *, timeout: float = 30.0) -> None:
    """Wait until ``replica`` has replayed everything ``primary`` has written so far.

    Compares ``pg_current_wal_lsn()`` on the primary (read once, now) with
    ``pg_last_wal_replay_lsn()`` on the replica.

    Raises:
        TimeoutError: not caught up within ``timeout`` seconds.
    """
    target = primary.execute("SELECT pg_current_wal_lsn()::text")[0][0]
    deadline = time.monotonic() + timeout
    while True:
        caught_up = replica.execute(
            "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn, pg_last_wal_replay_lsn()::text",
            [target],
        )[0]
        if caught_up[0]:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"replica {replica.name!r} replayed up to {caught_up[1]}, primary is at "
                f"{target}, after {timeout:g}s\n--- replica log ---\n{replica.log_tail()}"
            )
        time.sleep(0.05)


# ------------------------------------------------------------------ PgBouncer


class PgBouncer:
    """A ``pgbouncer`` on a free port of 127.0.0.1, in front of a :class:`Cluster`.

    Every database name is forwarded to the same name on the server (a ``*``
    entry). Clients authenticate with ``trust`` (the user must still be listed in
    the auth file, which names the superuser); ``postgres`` is an admin of the
    ``pgbouncer`` console database.

    Args:
        server: The cluster to pool connections to (over its Unix socket).
        pool_size: ``default_pool_size``: server connections per database/user pair.
        pool_mode: ``transaction`` (the default), ``session`` or ``statement``.
        max_client_conn: How many clients may connect at once.
        ignore_startup_parameters: Client startup parameters PgBouncer accepts and
            drops instead of refusing the connection. Default: only
            ``extra_float_digits`` (what a typical deployment sets); a client that
            sends ``options`` (``-c statement_timeout=...``) is refused unless
            ``"options"`` is listed -- and then its settings are silently lost.
    """

    def __init__(
        self,
        server: Cluster,
        *,
        pool_size: int = 2,
        pool_mode: Literal["session", "transaction", "statement"] = "transaction",
        max_client_conn: int = 1000,
        ignore_startup_parameters: Sequence[str] = ("extra_float_digits",),
        name: str = "pgbouncer",
    ) -> None:
        self.executable = pgbouncer_program()
        self.server = server
        self.pool_size = pool_size
        self.port = free_port()
        self.directory = _make_directory(name)
        self.config = self.directory / "pgbouncer.ini"
        self.log_file = self.directory / "pgbouncer.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._removed = False
        _live[id(self)] = self
        auth_file = self.directory / "userlist.txt"
        auth_file.write_text(f'"{SUPERUSER}" ""\n')
        self.config.write_text(
            "[databases]\n"
            f"* = host={server.directory} port={server.port}\n"
            "[pgbouncer]\n"
            f"listen_addr = {HOST}\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {auth_file}\n"
            f"admin_users = {SUPERUSER}\n"
            f"pool_mode = {pool_mode}\n"
            f"default_pool_size = {pool_size}\n"
            "min_pool_size = 0\n"
            "reserve_pool_size = 0\n"
            f"max_client_conn = {max_client_conn}\n"
            f"ignore_startup_parameters = {','.join(ignore_startup_parameters)}\n"
            f"logfile = {self.log_file}\n"
            f"pidfile = {self.directory / 'pgbouncer.pid'}\n"
        )
        for path in (auth_file, self.config):
            _give_to_server_user(path)

    def start(self, timeout: float = 30.0) -> None:
        """Start PgBouncer (as the server's OS user: it refuses to run as root)."""
        self._process = subprocess.Popen(
            [self.executable, str(self.config)],
            cwd=self.directory,
            env=_child_environment(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            **_as_server_user(),
        )
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise ClusterError(
                    f"pgbouncer exited with {self._process.returncode}:\n{_tail(self.log_file)}"
                )
            try:
                self.admin("SHOW VERSION")
                return
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise ClusterError(
                        f"pgbouncer did not answer within {timeout:g}s:\n{_tail(self.log_file)}"
                    ) from None
                time.sleep(0.05)

    def stop(self) -> None:
        """Shut PgBouncer down at once (SIGTERM), dropping its client connections."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def cleanup(self) -> None:
        """Stop PgBouncer and delete its directory. Idempotent."""
        if self._removed:
            return
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
        self._removed = True
        _live.pop(id(self), None)

    def __enter__(self) -> PgBouncer:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.cleanup()

    def url(self, database: str = "postgres", **query: str | int) -> str:
        """A ``postgresql://`` URL to ``database`` through PgBouncer."""
        suffix = ("?" + urlencode({k: str(v) for k, v in query.items()})) if query else ""
        return f"postgresql://{SUPERUSER}@{HOST}:{self.port}/{database}{suffix}"

    def admin(self, command: str) -> list[dict[str, Any]]:
        """Run an admin console command (``SHOW POOLS``...) and return its rows as dicts."""
        connection = psycopg2.connect(
            host=HOST, port=self.port, user=SUPERUSER, dbname="pgbouncer", connect_timeout=5
        )
        try:
            # The console has no transactions: a BEGIN would be refused.
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(command)
                if cursor.description is None:
                    return []
                names = [column[0] for column in cursor.description]
                return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        finally:
            connection.close()

    def show_pools(self, database: str | None = None) -> list[dict[str, Any]]:
        """``SHOW POOLS`` (``cl_active``, ``cl_waiting``, ``sv_active``, ``sv_idle``...)."""
        rows = self.admin("SHOW POOLS")
        return [row for row in rows if database is None or row["database"] == database]

    def show_servers(self, database: str | None = None) -> list[dict[str, Any]]:
        """``SHOW SERVERS``: one row per server connection PgBouncer holds."""
        rows = self.admin("SHOW SERVERS")
        return [row for row in rows if database is None or row["database"] == database]

    def __repr__(self) -> str:
        return f"PgBouncer(port={self.port}, server={self.server!r}, pool_size={self.pool_size})"


# ---------------------------------------------------------------------- Citus

#: The script that installs the Citus extension into the local PostgreSQL, relative to
#: the repository (this project's machines only: CI copies ``shared/`` next to the
#: clone; users install Citus from its own packages or images).
CITUS_INSTALLER = "../shared/citus/install-citus"


def check_citus_tools() -> None:
    """Raise :class:`ToolMissingError` unless a throwaway Citus cluster can be made here.

    The extension's library must be in the server's ``pkglibdir``: run
    ``../shared/citus/install-citus`` (idempotent) to put it there.
    """
    check_server_tools()
    pg_config = shutil.which("pg_config")
    libdir = None
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            libdir = subprocess.run(
                [pg_config, "--pkglibdir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
    if not libdir or not (Path(libdir) / "citus.so").is_file():
        where = libdir or "pg_config --pkglibdir"
        raise ToolMissingError(
            f"the Citus extension is not installed (no citus.so in {where}); "
            f"run {CITUS_INSTALLER} from the repository (idempotent)"
        )


class CitusCluster:
    """A throwaway Citus cluster: one coordinator and ``workers`` worker nodes.

    Each node is a :class:`Cluster` started with ``shared_preload_libraries =
    'citus'``. Citus metadata lives per database, so :meth:`create_database`
    creates the database on every node, runs ``CREATE EXTENSION citus`` in each,
    names the coordinator (``citus_set_coordinator_host``) and adds the workers
    (``citus_add_node``). Clients connect to the coordinator::

        with CitusCluster(workers=2) as citus:
            url = citus.create_database()
            citus.workers[0].restart()
    """

    def __init__(
        self,
        *,
        workers: int = 2,
        settings: Mapping[str, str] | None = None,
        name: str = "citus",
    ) -> None:
        check_citus_tools()
        base = {
            "shared_preload_libraries": "'citus'",
            # Citus commits multi-node transactions with two-phase commit.
            "max_prepared_transactions": "100",
            "max_connections": "200",
            # Node-to-node connections: plaintext on loopback (the servers run with
            # the caller's HOME, whose ~/.postgresql they may not read).
            "citus.node_conninfo": "'sslmode=disable'",
            # Citus runs a maintenance daemon (a background worker) per database, and
            # that daemon is what recovers two-phase commits a killed client left
            # prepared: without one, their row locks stay held. Tests make many
            # databases, so room for many daemons.
            "max_worker_processes": "128",
            # Recover those prepared transactions within seconds (default: 1 min).
            "citus.recover_2pc_interval": "'2s'",
        } | dict(settings or {})
        self.name = name
        self.nodes: list[Cluster] = []
        try:
            self.coordinator = Cluster(name=f"{name}_coord", settings=base)
            self.nodes.append(self.coordinator)
            self.workers = []
            for number in range(workers):
                worker = Cluster(name=f"{name}_w{number + 1}", settings=base)
                self.nodes.append(worker)
                self.workers.append(worker)
        except BaseException:
            self.cleanup()
            raise

    @property
    def port(self) -> int:
        """The coordinator's port (where clients connect)."""
        return self.coordinator.port

    def start(self) -> None:
        """Start every node."""
        for node in self.nodes:
            node.start()

    def cleanup(self) -> None:
        """Stop and remove every node (idempotent)."""
        for node in self.nodes:
            node.cleanup()

    def __enter__(self) -> CitusCluster:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.cleanup()

    def url(self, database: str = "postgres", **kwargs: Any) -> str:
        """A URL to ``database`` on the coordinator (see :meth:`Cluster.url`)."""
        return self.coordinator.url(database, **kwargs)

    def execute(
        self, sql: str, parameters: Sequence[Any] | None = None, *, database: str = "postgres"
    ) -> list[tuple[Any, ...]]:
        """Run one statement on the coordinator as the superuser."""
        return self.coordinator.execute(sql, parameters, database=database)

    def create_database(self, name: str | None = None) -> str:
        """Create a Citus-enabled database on every node; return its coordinator URL."""
        name = name or f"test_{os.urandom(5).hex()}"
        for node in self.nodes:
            node.execute(f'CREATE DATABASE "{name}"')
            node.execute("CREATE EXTENSION IF NOT EXISTS citus", database=name)
        self.execute("SELECT citus_set_coordinator_host(%s, %s)", [HOST, self.port], database=name)
        for worker in self.workers:
            self.execute("SELECT citus_add_node(%s, %s)", [HOST, worker.port], database=name)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name`` on every node (its connections are closed first)."""
        for node in self.nodes:
            with contextlib.suppress(psycopg2.Error):
                node.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def __repr__(self) -> str:
        ports = ", ".join(str(node.port) for node in self.nodes)
        return f"CitusCluster({self.name!r}, ports=[{ports}])"
