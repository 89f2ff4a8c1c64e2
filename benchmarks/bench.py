"""Side-by-side benchmark: agents_sessions against the Agents SDK's own backends.

Usage (``make bench`` installs the comparison backends and runs this)::

    python -m benchmarks.bench                       # everything, ~15 minutes
    python -m benchmarks.bench --quick               # a smoke run, ~3 minutes
    python -m benchmarks.bench --only agents_sessions,floor
    python -m benchmarks.bench --profile             # our throughput under py-spy + pyinstrument
    python -m benchmarks.bench --profile --profile-backend agents_sessions_sqlite
                                                     # the same, on the embedded SQLite file
    python -m benchmarks.bench --only agents_sessions,citus --workloads throughput
                                                     # the same turns on a Citus cluster

Each workload of each backend runs in a child process of its own (so one backend's
memory, threads and caches never affect another), on a fresh PostgreSQL database
per backend (created on the ``--database-url`` server, dropped afterwards), Redis
db 15 (flushed before and after), or a SQLite file in a temporary directory.
Results: tables on stdout, ``benchmarks/results/<timestamp>.json`` and
``latest.json`` / ``latest.md`` next to it. See ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from benchmarks._backends import (
    BACKENDS,
    LABELS,
    OPTIONAL_BACKENDS,
    POSTGRES_BACKENDS,
    Backend,
    BackendConfig,
    create_floor_schema,
    open_backend,
)
from benchmarks._report import render_report

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"

# Workload parameters: full run and --quick smoke run.
FULL: dict[str, dict[str, Any]] = {
    "latency": {"iterations": 400, "warmup": 50, "history": 200},
    "throughput": {"conversations": 100, "warmup_s": 3.0, "duration_s": 10.0, "seed_items": 20},
    "throughput_3p": {
        "processes": 3,
        "conversations": 100,
        "warmup_s": 3.0,
        "duration_s": 10.0,
        "seed_items": 20,
    },
    "depth": {
        "depths": [100, 10_000, 100_000],
        "iterations": 300,
        "batch": 2000,
        "tail": 100,
        "fill_budget_s": 300.0,
    },
    "scale": {"conversations": 1000, "warmup_s": 3.0, "duration_s": 10.0, "seed_items": 20},
    "memory": {"objects": 10_000},
}
QUICK: dict[str, dict[str, Any]] = {
    "latency": {"iterations": 60, "warmup": 10, "history": 200},
    "throughput": {"conversations": 100, "warmup_s": 1.0, "duration_s": 3.0, "seed_items": 20},
    "throughput_3p": {
        "processes": 3,
        "conversations": 100,
        "warmup_s": 1.0,
        "duration_s": 3.0,
        "seed_items": 20,
    },
    "depth": {
        "depths": [100, 1_000, 10_000],
        "iterations": 50,
        "batch": 2000,
        "tail": 100,
        "fill_budget_s": 120.0,
    },
    "scale": {"conversations": 1000, "warmup_s": 1.0, "duration_s": 3.0, "seed_items": 20},
    "memory": {"objects": 1000},
}
WORKLOADS = ("latency", "throughput", "throughput_3p", "depth", "scale", "memory")
#: Workloads run ``--rounds`` times per backend (interleaved), keeping the best round.
REPEATED = frozenset({"latency", "throughput", "throughput_3p", "scale"})


# =============================================================================== child


def _read_go_line() -> float:
    """The barrier: say READY on stdout, wait for ``GO <wall-clock start>`` on stdin."""
    print("READY", flush=True)
    line = sys.stdin.readline()
    if not line.startswith("GO "):
        raise SystemExit(f"benchmark child: expected 'GO <time>', got {line!r}")
    return float(line.split()[1])


class _ThreadProfilers:
    """pyinstrument in the event-loop thread *and* in the store's worker threads.

    pyinstrument samples only the thread that started it, and agents_sessions does
    its database work in a thread pool. So the benchmark swaps the store's executor
    (a profiling-only hack on a private attribute) for one whose tasks start a
    profiler in their thread while the measurement window is open.
    """

    def __init__(self) -> None:
        self.enabled = False
        self.sessions: list[Any] = []
        self._local = threading.local()
        self._lock = threading.Lock()
        self._main: Any = None
        self._workers = 0
        self.worker_threads = 0

    def wrap(self, function: Callable[..., Any]) -> Callable[..., Any]:
        def profiled(*args: Any) -> Any:
            if self.enabled and getattr(self._local, "profiler", None) is None:
                from pyinstrument import Profiler

                self._local.profiler = Profiler(interval=0.0005, async_mode="disabled")
                self._local.profiler.start()
            return function(*args)

        return profiled

    def install(self, backend: Backend) -> None:
        from concurrent.futures import ThreadPoolExecutor

        store = backend.session("profile-probe").store  # type: ignore[attr-defined]
        state = store._state
        workers = state.target.pool.max_connections
        profilers = self

        class ProfilingExecutor(ThreadPoolExecutor):
            def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
                return super().submit(profilers.wrap(fn), *args, **kwargs)

        state.executor.shutdown(wait=True)
        state.executor = ProfilingExecutor(max_workers=workers, thread_name_prefix="profiled")
        self._executor = state.executor
        self._workers = workers

    def on_window(self, edge: str) -> None:
        from pyinstrument import Profiler

        if edge == "start":
            self.enabled = True
            self._main = Profiler(interval=0.0005, async_mode="disabled")
            self._main.start()
        else:
            self.enabled = False
            self.sessions.append(self._main.stop())

    def collect(self) -> tuple[Any, Any]:
        """Stop every profiler: (event-loop session, worker threads merged into one or None).

        A barrier puts one stopping task on each worker thread (a profiler can only
        be stopped by its own thread).
        """
        barrier = threading.Barrier(self._workers)
        workers: list[Any] = []

        def stop_here() -> None:
            barrier.wait(timeout=30)
            profiler = getattr(self._local, "profiler", None)
            if profiler is not None:
                self._local.profiler = None
                session = profiler.stop()
                with self._lock:
                    workers.append(session)

        futures = [self._executor.submit(stop_here) for _ in range(self._workers)]
        for future in futures:
            future.result()
        from pyinstrument.session import Session

        self.worker_threads = len(workers)
        if not workers:
            # Every call ran on the event loop (the session's hot statements do): no
            # worker thread did anything in the window.
            return self.sessions[0], None
        merged = workers[0]
        for session in workers[1:]:
            merged = Session.combine(merged, session)
        # One tree for all workers rather than one per thread: same root frame.
        root = f"{len(workers)} worker threads\x00<thread>\x000"
        merged.frame_records = [
            ([root, *stack[1:]], seconds) for stack, seconds in merged.frame_records
        ]
        return self.sessions[0], merged


async def _child(spec: dict[str, Any]) -> dict[str, Any]:
    import agents  # noqa: F401  -- every child is an Agents SDK app: same baseline memory

    config = BackendConfig(**spec["backend"])
    workload: str = spec["workload"]
    params: dict[str, Any] = spec.get("params", {})
    from benchmarks._workloads import (
        run_depth,
        run_latency,
        run_memory,
        run_prepare,
        run_throughput,
    )

    backend = await open_backend(config)
    try:
        if workload == "prepare":
            return await run_prepare(backend, params)
        if workload == "latency":
            return await run_latency(backend, params)
        if workload == "throughput":
            profilers = None
            if spec.get("pyinstrument_out"):
                profilers = _ThreadProfilers()
                profilers.install(backend)

            async def start_signal() -> float:
                if spec.get("barrier"):
                    return await asyncio.to_thread(_read_go_line)
                return time.time()

            result = await run_throughput(
                backend,
                params,
                start_signal,
                on_window=None if profilers is None else profilers.on_window,
            )
            if profilers is not None:
                from benchmarks._profile import read_pyinstrument, summarize

                loop_session, worker_session = await asyncio.to_thread(profilers.collect)
                stem = spec["pyinstrument_out"]
                _write_pyinstrument(loop_session, Path(f"{stem}-loop"))
                result["pyinstrument"] = {
                    "loop": summarize(read_pyinstrument(loop_session.frame_records)),
                    "worker_threads": profilers.worker_threads,
                }
                if worker_session is not None:
                    _write_pyinstrument(worker_session, Path(f"{stem}-workers"))
                    result["pyinstrument"]["workers"] = summarize(
                        read_pyinstrument(worker_session.frame_records)
                    )
            return result
        if workload == "depth":
            analyze = None
            if config.backend in POSTGRES_BACKENDS:

                def analyze() -> None:
                    import psycopg2

                    connection = psycopg2.connect(config.postgres_url)
                    try:
                        connection.autocommit = True
                        with connection.cursor() as cursor:
                            cursor.execute("ANALYZE")
                    finally:
                        connection.close()

            return await run_depth(backend, params, analyze)
        if workload == "memory":
            return await run_memory(backend, params)
        raise SystemExit(f"unknown workload {workload!r}")
    finally:
        await backend.close()


def _write_pyinstrument(session: Any, stem: Path) -> None:
    from pyinstrument.renderers import ConsoleRenderer, HTMLRenderer

    Path(f"{stem}.html").write_text(HTMLRenderer().render(session), encoding="utf-8")
    text = ConsoleRenderer(unicode=True, color=False, show_all=False, short_mode=False).render(
        session
    )
    Path(f"{stem}.txt").write_text(text, encoding="utf-8")


def child_main(raw_spec: str) -> None:
    """Entry point of a benchmark child: run one workload, write its JSON result."""
    spec = json.loads(raw_spec)
    result = asyncio.run(_child(spec))
    Path(spec["out"]).write_text(json.dumps(result), encoding="utf-8")


# =============================================================================== parent


class BenchError(RuntimeError):
    """A benchmark child failed; the message carries its log's tail."""


def _libpq_url(url: str, database: str | None = None) -> str:
    """``url`` as a plain ``postgresql://`` URL (no driver, no query), on ``database``."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url).set(drivername="postgresql", query={})
    if database is not None:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(hide_password=False)


def _safe(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _admin_connection(admin_url: str) -> Any:
    import psycopg2

    connection = psycopg2.connect(_libpq_url(admin_url))
    connection.autocommit = True
    return connection


def _citus_resources(pool_size: int, max_overflow: int) -> Iterator[BackendConfig]:
    """A throwaway Citus cluster (coordinator + 2 workers), its database migrated and
    distributed by conversation id; removed afterwards."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    from agents_sessions.db.migrate import upgrade
    from agents_sessions.ops.citus import distribute
    from tests.support.pgcluster import CitusCluster

    with CitusCluster(workers=2, name="bench_citus") as cluster:
        url = cluster.create_database("bench")
        upgrade(url)
        engine = create_engine(
            url.replace("postgresql://", "postgresql+psycopg2://", 1),
            isolation_level="AUTOCOMMIT",
            poolclass=NullPool,
        )
        try:
            with engine.connect() as connection:
                distribute(connection, shard_count=32)
        finally:
            engine.dispose()
        yield BackendConfig(
            "citus", postgres_url=url, pool_size=pool_size, max_overflow=max_overflow
        )


class ConnectionMonitor:
    """Samples the server-side connection count every ``interval`` s in a thread.

    PostgreSQL: client backends on the benchmark database (``pg_stat_activity``),
    seen from a monitoring connection to the admin database. Redis: clients
    selected on the benchmark db (``CLIENT LIST``), seen from db 0.
    """

    def __init__(
        self, *, admin_url: str | None, database: str | None, redis_url: str | None
    ) -> None:
        self._admin_url = admin_url
        self._database = database
        self._redis_url = redis_url
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="connection-monitor", daemon=True)
        self.error: str | None = None

    def _run(self) -> None:
        try:
            if self._admin_url is not None:
                connection = _admin_connection(self._admin_url)
                try:
                    with connection.cursor() as cursor:
                        while not self._stop.is_set():
                            cursor.execute(
                                "SELECT count(*) FROM pg_stat_activity "
                                "WHERE datname = %s AND backend_type = 'client backend'",
                                (self._database,),
                            )
                            self.samples.append(int(cursor.fetchone()[0]))
                            self._stop.wait(0.1)
                finally:
                    connection.close()
            elif self._redis_url is not None:
                import redis

                # Watch from db 0, so the monitor itself is not counted.
                client = redis.Redis.from_url(self._redis_url, db=0)
                target = redis.Redis.from_url(self._redis_url)
                db = int(target.connection_pool.connection_kwargs.get("db", 0))
                target.close()
                try:
                    while not self._stop.is_set():
                        clients = client.client_list()
                        self.samples.append(sum(1 for c in clients if int(c.get("db", -1)) == db))
                        self._stop.wait(0.1)
                finally:
                    client.close()
        except Exception as exc:  # the benchmark goes on; the report says why
            self.error = f"{type(exc).__name__}: {exc}"

    def __enter__(self) -> ConnectionMonitor:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def summary(self) -> dict[str, Any]:
        """Max and mean of the samples, and how many were taken."""
        if not self.samples:
            return {"max_connections": None, "samples": 0, "monitor_error": self.error}
        return {
            "max_connections": max(self.samples),
            "mean_connections": sum(self.samples) / len(self.samples),
            "samples": len(self.samples),
            "monitor_error": self.error,
        }


class Orchestrator:
    """Runs the children of one benchmark invocation and collects their results."""

    def __init__(self, args: argparse.Namespace, stamp: str) -> None:
        self.args = args
        self.stamp = stamp
        self.params = QUICK if args.quick else FULL
        self.workdir = Path(tempfile.mkdtemp(prefix="agents-sessions-bench-"))
        self.env = {
            key: value
            for key, value in os.environ.items()
            if key not in ("DATABASE_URL",) and not key.startswith("AGENTS_SESSIONS_")
        }
        self._children = 0
        self.last_quiet: float | None = None

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------------ children

    def _spawn(self, spec: dict[str, Any]) -> tuple[subprocess.Popen[str], Path, Path, IO[str]]:
        self._children += 1
        out = self.workdir / f"child-{self._children}.json"
        log = self.workdir / f"child-{self._children}.log"
        spec = {**spec, "out": str(out)}
        log_file = open(log, "w", encoding="utf-8")  # noqa: SIM115 - closed by the caller
        process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.bench", "--child", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
            cwd=str(REPO),
            env=self.env,
        )
        return process, out, log, log_file

    def run_children(
        self,
        specs: Sequence[dict[str, Any]],
        *,
        barrier: bool = False,
        timeout: float = 1800,
        on_go: Callable[[float, list[int]], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Start ``specs`` together; with ``barrier``, release them at one instant."""
        spawned = [self._spawn({**spec, "barrier": barrier}) for spec in specs]
        try:
            if barrier:
                for process, _, log, _ in spawned:
                    assert process.stdout is not None
                    while True:
                        line = process.stdout.readline()
                        if not line:
                            process.wait(timeout=60)
                            raise BenchError(self._failure(log, process.returncode))
                        if line.strip() == "READY":
                            break
                start = time.time() + 0.5
                for process, _, _, _ in spawned:
                    assert process.stdin is not None
                    process.stdin.write(f"GO {start!r}\n")
                    process.stdin.flush()
                if on_go is not None:
                    on_go(start, [process.pid for process, _, _, _ in spawned])
            deadline = time.monotonic() + timeout
            for process, _, log, _ in spawned:
                try:
                    process.wait(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    raise BenchError(f"timed out after {timeout:.0f} s") from None
                if process.returncode != 0:
                    raise BenchError(self._failure(log, process.returncode))
            return [json.loads(out.read_text(encoding="utf-8")) for _, out, _, _ in spawned]
        finally:
            for process, _, _, log_file in spawned:
                if process.poll() is None:
                    process.kill()
                    process.wait()
                for stream in (process.stdin, process.stdout):
                    if stream is not None:
                        with contextlib.suppress(OSError):
                            stream.close()
                log_file.close()

    @staticmethod
    def _failure(log: Path, returncode: int | None) -> str:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-15:]
        return f"child exited with {returncode}:\n    " + "\n    ".join(tail)

    # ------------------------------------------------------------------ resources

    @contextlib.contextmanager
    def backend_resources(self, backend: str) -> Iterator[BackendConfig]:
        """A fresh database / Redis db / SQLite directory for one backend's runs."""
        pool_size, max_overflow = self.args.pool_size, self.args.max_overflow
        if backend in POSTGRES_BACKENDS:
            database = f"bench_{backend}_{self.stamp}_{os.getpid()}".lower()
            admin = _admin_connection(self.args.database_url)
            try:
                with admin.cursor() as cursor:
                    cursor.execute(f'CREATE DATABASE "{database}"')
            finally:
                admin.close()
            url = _libpq_url(self.args.database_url, database)
            try:
                if backend in ("floor", "floor_psycopg2"):
                    asyncio.run(create_floor_schema(url))
                yield BackendConfig(
                    backend, postgres_url=url, pool_size=pool_size, max_overflow=max_overflow
                )
            finally:
                admin = _admin_connection(self.args.database_url)
                try:
                    with admin.cursor() as cursor:
                        cursor.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
                finally:
                    admin.close()
        elif backend == "citus":
            yield from _citus_resources(pool_size, max_overflow)
        elif backend == "redis":
            import redis

            def flush() -> None:
                # A short-lived client: an idle one would count as a benchmark connection.
                client = redis.Redis.from_url(self.args.redis_url)
                try:
                    client.flushdb()
                finally:
                    client.close()

            flush()
            try:
                yield BackendConfig(
                    backend,
                    redis_url=self.args.redis_url,
                    pool_size=pool_size,
                    max_overflow=max_overflow,
                )
            finally:
                flush()
        else:
            directory = Path(tempfile.mkdtemp(prefix="sqlite-", dir=self.workdir))
            try:
                yield BackendConfig(
                    backend,
                    sqlite_path=str(directory / "sessions.sqlite3"),
                    pool_size=pool_size,
                    max_overflow=max_overflow,
                )
            finally:
                shutil.rmtree(directory, ignore_errors=True)

    def monitor(self, config: BackendConfig) -> ConnectionMonitor:
        if config.backend in POSTGRES_BACKENDS:
            from sqlalchemy.engine import make_url

            return ConnectionMonitor(
                admin_url=self.args.database_url,
                database=make_url(config.postgres_url).database,
                redis_url=None,
            )
        return ConnectionMonitor(
            admin_url=None,
            database=None,
            redis_url=config.redis_url if config.backend == "redis" else None,
        )

    # ------------------------------------------------------------------ workloads

    def run_all(self, backends: Sequence[str], workloads: Sequence[str]) -> dict[str, Any]:
        """Every selected workload of every backend, each in its own child process(es).

        Workload-major and interleaved: round 1 of a workload runs on every backend,
        then round 2, ... and the best round of each backend is kept (highest
        turns/s; lowest p50 per operation). On a shared machine, other people's jobs
        come and go; interleaved best-of-N keeps one backend from being measured
        only while the machine is busy. Depth and memory run once (their fills
        persist). Each backend keeps its database for the whole run.
        """
        results: dict[str, Any] = {
            # machine_busy_before: share of the machine's CPU busy in the second
            # before each run started (after waiting for quiet): a noise indicator.
            backend: {"failures": {}, "machine_busy_before": {}}
            for backend in backends
        }
        with contextlib.ExitStack() as stack:
            configs: dict[str, BackendConfig] = {}
            for backend in backends:
                configs[backend] = stack.enter_context(self.backend_resources(backend))
                _say(f"[{LABELS[backend]}] prepare (schema on first use)")
                try:
                    results[backend]["prepare"] = self.run_children(
                        [{"backend": asdict(configs[backend]), "workload": "prepare"}]
                    )[0]
                except BenchError as exc:
                    _say(f"[{LABELS[backend]}] prepare FAILED, skipping the backend: {exc}")
                    results[backend]["failures"] = {
                        workload: f"prepare failed: {exc}" for workload in workloads
                    }
            for workload in workloads:
                rounds = self.args.rounds if workload in REPEATED else 1
                collected: dict[str, list[Any]] = {backend: [] for backend in backends}
                for round_number in range(1, rounds + 1):
                    for backend in backends:
                        if workload in results[backend]["failures"]:
                            continue
                        self._wait_quiet()
                        label = f"[{LABELS[backend]}] {workload}" + (
                            f" round {round_number}/{rounds}" if rounds > 1 else ""
                        )
                        _say(f"{label} ...")
                        started = time.monotonic()
                        try:
                            result = self._run_workload(configs[backend], workload)
                        except BenchError as exc:
                            results[backend]["failures"][workload] = str(exc)
                            _say(f"{label} FAILED: {exc}")
                            continue
                        busy = results[backend]["machine_busy_before"]
                        busy.setdefault(workload, []).append(self.last_quiet)
                        collected[backend].append(result)
                        _say(
                            f"{label} done in {time.monotonic() - started:.0f} s: "
                            f"{_headline(workload, result)}"
                        )
                for backend in backends:
                    if collected[backend]:
                        results[backend][workload] = _best(workload, collected[backend])
        return results

    def _run_workload(self, config: BackendConfig, workload: str) -> Any:
        params = dict(self.params[workload])
        if workload == "throughput_3p":
            processes = params.pop("processes")
            per_process = BackendConfig(
                **{
                    **asdict(config),
                    "pool_size": self.args.multi_pool_size,
                    "max_overflow": self.args.multi_max_overflow,
                }
            )
            specs = [
                {
                    "backend": asdict(per_process),
                    "workload": "throughput",
                    "params": {**params, "prefix": f"mp{index}"},
                }
                for index in range(processes)
            ]
            with self.monitor(config) as monitor:
                children = self.run_children(specs, barrier=True)
            return {
                "processes": processes,
                "pool_per_process": f"pool_size={per_process.pool_size}, "
                f"max_overflow={per_process.max_overflow}",
                "turns_per_s": sum(child["turns_per_s"] for child in children),
                "errors": sum(child["errors"] for child in children),
                "per_process": children,
                **monitor.summary(),
            }
        spec = {"backend": asdict(config), "workload": workload, "params": params}
        if workload in ("throughput", "scale"):
            spec["workload"] = "throughput"
            spec["params"] = {**params, "prefix": workload}
            with self.monitor(config) as monitor:
                result = self.run_children([spec], barrier=True)[0]
            return {**result, **monitor.summary()}
        return self.run_children([spec])[0]

    # ------------------------------------------------------------------ profile

    def profile(self) -> dict[str, Any]:
        """Our throughput workload under py-spy, then under pyinstrument.

        py-spy attaches to the child for exactly the measurement window. Writes
        ``benchmarks/results/profile-<timestamp>*`` and ``profile-latest.md``.
        """
        from benchmarks._profile import read_pyspy, render_summary, summarize

        params = {**self.params["throughput"], "prefix": "profile"}
        RESULTS.mkdir(parents=True, exist_ok=True)
        stem = RESULTS / f"profile-{self.stamp}"
        pyspy_out = Path(f"{stem}-pyspy.txt")
        pyspy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which(
            "py-spy"
        )
        pyspy_args = self.args.pyspy_args.split()
        with self.backend_resources(self.args.profile_backend) as config:
            base = {"backend": asdict(config)}
            self.run_children([{**base, "workload": "prepare"}])
            recorder: list[subprocess.Popen[bytes]] = []

            def attach(start: float, pids: list[int]) -> None:
                if pyspy is None:
                    return
                time.sleep(max(0.0, start + params["warmup_s"] - time.time()))
                command = [
                    pyspy,
                    "record",
                    "--pid",
                    str(pids[0]),
                    "--duration",
                    str(round(params["duration_s"])),
                    "--rate",
                    "250",
                    # Not pausing the process perturbs it least; native stacks need pauses.
                    *([] if "--native" in pyspy_args else ["--nonblocking"]),
                    *pyspy_args,
                    "--format",
                    "raw",
                    "--output",
                    str(pyspy_out),
                ]
                recorder.append(
                    subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                )

            self._wait_quiet()
            _say(f"[profile] throughput under py-spy {' '.join(pyspy_args)} ...")
            spied = self.run_children(
                [{**base, "workload": "throughput", "params": params}], barrier=True, on_go=attach
            )[0]
            for process in recorder:
                process.wait(timeout=60)
            self._wait_quiet()
            _say("[profile] throughput under pyinstrument (loop thread + worker threads) ...")
            instrumented = self.run_children(
                [
                    {
                        **base,
                        "workload": "throughput",
                        "params": params,
                        "pyinstrument_out": f"{stem}-pyinstrument",
                    }
                ],
                barrier=True,
            )[0]
        files = sorted(
            str(path.relative_to(REPO)) for path in RESULTS.glob(f"profile-{self.stamp}-*")
        )
        sections = [
            f"# Profile: {LABELS[self.args.profile_backend]}, throughput workload",
            "",
            f"{params['conversations']} conversations, turns of get_items(limit=20) + "
            f"add_items(2 items), {params['duration_s']:g} s window after "
            f"{params['warmup_s']:g} s warm-up. Without a profiler this workload is in "
            "`latest.json` (throughput).",
            "",
            "Files: " + ", ".join(f"`{name}`" for name in files),
            "",
        ]
        report: dict[str, Any] = {"files": files}
        if pyspy_out.exists():
            spy = summarize(read_pyspy(pyspy_out))
            report["py_spy"] = spy
            sections.append(
                render_summary(
                    f"py-spy {' '.join(pyspy_args)} (every thread)",
                    spy,
                    unit="GIL-holding samples" if "--gil" in pyspy_args else "on-CPU samples",
                    notes=[
                        f"{spied['turns_per_s']:,.0f} turns/s under py-spy; process CPU "
                        f"{spied['process_cpu_cores']:.2f} cores; machine CPU busy "
                        f"{spied['machine_cpu_busy']:.0%}; {spy['total']:,.0f} samples.",
                    ],
                )
            )
        else:
            sections.append("py-spy: no profile (py-spy missing or failed).\n")
        pyinstrument = instrumented.get("pyinstrument", {})
        report["pyinstrument"] = pyinstrument
        for key, title in (
            ("workers", f"pyinstrument: {pyinstrument.get('worker_threads')} worker threads"),
            ("loop", "pyinstrument: event-loop thread"),
        ):
            if key in pyinstrument:
                summary = pyinstrument[key]
                busy = summary["total"] / ((summary["total"] + summary["idle"]) or 1)
                sections.append(
                    render_summary(
                        title,
                        summary,
                        unit="busy wall-clock time, idle waits excluded",
                        notes=[
                            f"{instrumented['turns_per_s']:,.0f} turns/s under pyinstrument; "
                            f"busy {busy:.0%} of the sampled wall-clock time (the rest: "
                            "waiting for work). Wall-clock: includes waiting for PostgreSQL "
                            "(inside the psycopg2 C calls) and for the GIL (anywhere).",
                        ],
                    )
                )
        text = "\n".join(sections)
        Path(f"{stem}-summary.md").write_text(text, encoding="utf-8")
        (RESULTS / "profile-latest.md").write_text(text, encoding="utf-8")
        print(text)
        return report

    def _wait_quiet(self) -> None:
        """Wait (up to ``--quiet-wait`` s) until the machine's CPU is mostly idle.

        Other people's jobs on a shared machine are the main source of noise; this
        avoids starting a measurement in the middle of one. Records what it saw.
        """
        from benchmarks._workloads import machine_cpu_ticks

        deadline = time.monotonic() + self.args.quiet_wait
        while True:
            busy_start, total_start = machine_cpu_ticks()
            time.sleep(1.0)
            busy_end, total_end = machine_cpu_ticks()
            busy = (busy_end - busy_start) / max(1, total_end - total_start)
            if busy <= self.args.quiet_threshold or time.monotonic() >= deadline:
                self.last_quiet = busy
                if busy > self.args.quiet_threshold:
                    _say(f"  (machine still {busy:.0%} busy; measuring anyway)")
                return


def _best(workload: str, rounds: list[Any]) -> Any:
    """The best of several rounds of one workload on one backend (all kept in "rounds")."""
    if len(rounds) == 1:
        return rounds[0]
    if workload == "latency":
        best: dict[str, Any] = {}
        for operation in rounds[0]:
            best[operation] = min(
                (round_[operation] for round_ in rounds), key=lambda summary: summary["p50_ms"]
            )
        best["rounds_p50_ms"] = {
            operation: [round_[operation]["p50_ms"] for round_ in rounds] for operation in rounds[0]
        }
        return best
    chosen = max(rounds, key=lambda result: result["turns_per_s"])
    return {**chosen, "rounds_turns_per_s": [result["turns_per_s"] for result in rounds]}


def _headline(workload: str, result: Any) -> str:
    if workload in ("throughput", "throughput_3p", "scale"):
        connections = result.get("max_connections")
        return f"{result['turns_per_s']:,.0f} turns/s, {result['errors']} errors" + (
            f", max {connections} connections" if connections is not None else ""
        )
    if workload == "latency":
        return ", ".join(f"{name} p50 {values['p50_ms']:.2f} ms" for name, values in result.items())
    if workload == "depth":
        return ", ".join(
            f"{depth}: " + (f"{values['p50_ms']:.2f} ms" if "p50_ms" in values else "skipped")
            for depth, values in result.items()
        )
    if workload == "memory":
        return f"{result['bytes_per_session']:,.0f} B/session"
    return ""


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def machine_info(admin_url: str) -> dict[str, Any]:
    """CPU, cores, memory, PostgreSQL/Redis/Python versions, load at the start."""
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gb = None
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="ascii") as meminfo:
        memory_gb = round(int(meminfo.readline().split()[1]) / 1024 / 1024, 1)
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": memory_gb,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": os.getloadavg(),
    }
    try:
        admin = _admin_connection(admin_url)
        try:
            with admin.cursor() as cursor:
                cursor.execute("SHOW server_version")
                info["postgresql"] = cursor.fetchone()[0]
                cursor.execute("SHOW max_connections")
                info["postgresql_max_connections"] = int(cursor.fetchone()[0])
        finally:
            admin.close()
    except Exception as exc:
        info["postgresql"] = f"unavailable: {exc}"
    versions: dict[str, str] = {}
    from importlib import metadata

    for package in (
        "agents-sessions",
        "openai-agents",
        "sqlalchemy",
        "psycopg2-binary",
        "asyncpg",
        "redis",
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    info["packages"] = versions
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "agents_sessions"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
        # The code measured: a commit, plus uncommitted changes to the package if any.
        info["git"] = f"{commit}{' + uncommitted changes in agents_sessions/' if dirty else ''}"
    return info


def _redis_version(url: str) -> str | None:
    try:
        import redis

        client = redis.Redis.from_url(url)
        try:
            return str(client.info("server")["redis_version"])
        finally:
            client.close()
    except Exception:
        return None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description="agents_sessions vs the Agents SDK session backends, side by side."
    )
    parser.add_argument("--quick", action="store_true", help="short durations (a smoke run)")
    parser.add_argument(
        "--only",
        default=",".join(BACKENDS),
        help=f"comma-separated backends to run (default: all of {','.join(BACKENDS)})",
    )
    parser.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help=f"comma-separated workloads (default: all of {','.join(WORKLOADS)})",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_ADMIN_URL),
        help="admin URL of the PostgreSQL server where benchmark databases are created "
        "and dropped (default: $BENCH_DATABASE_URL or %(default)s)",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL),
        help="Redis database to use; it is FLUSHED before and after (default: %(default)s)",
    )
    parser.add_argument("--pool-size", type=int, default=20, help="pool size of every backend")
    parser.add_argument("--max-overflow", type=int, default=10, help="pool overflow")
    parser.add_argument(
        "--multi-pool-size",
        type=int,
        default=10,
        help="pool size per process in the 3-process run (3 x (10 + 5) stays well under "
        "PostgreSQL's default max_connections=100 on a shared server)",
    )
    parser.add_argument("--multi-max-overflow", type=int, default=5)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="only profile our throughput workload (py-spy + pyinstrument) into "
        "benchmarks/results/",
    )
    parser.add_argument(
        "--profile-backend",
        default="agents_sessions",
        choices=("agents_sessions", "agents_sessions_sqlite"),
        help="which of our backends --profile profiles (default: %(default)s; "
        "agents_sessions_sqlite: the embedded default, on a SQLite file)",
    )
    parser.add_argument(
        "--pyspy-args",
        default="--gil",
        help="py-spy record arguments for --profile (default: %(default)s, samples of the "
        "GIL-holding thread; pass ' ' for every on-CPU thread)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds of the latency/throughput/scale workloads per backend, interleaved "
        "across backends; the best round is reported (default: 2, --quick: 1)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        help="before each workload, wait up to this many seconds for the machine's CPU "
        "to be mostly idle (shared machines; default: %(default)s)",
    )
    parser.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.35,
        help="'mostly idle': at most this share of all CPUs busy over 1 s (default: %(default)s)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 2
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    args.backends = [name.strip() for name in args.only.split(",") if name.strip()]
    choices = (*BACKENDS, *OPTIONAL_BACKENDS)
    unknown = [name for name in args.backends if name not in choices]
    if unknown:
        parser.error(f"--only: unknown backend(s) {', '.join(unknown)}; choose from {choices}")
    args.workload_list = [name.strip() for name in args.workloads.split(",") if name.strip()]
    unknown = [name for name in args.workload_list if name not in WORKLOADS]
    if unknown:
        parser.error(f"--workloads: unknown {', '.join(unknown)}; choose from {WORKLOADS}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or, with ``--child``, one workload of it)."""
    args = parse_args(argv)
    if args.child:
        child_main(args.child)
        return 0
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    orchestrator = Orchestrator(args, stamp)
    try:
        try:
            _admin_connection(args.database_url).close()
        except Exception as exc:
            print(
                f"bench: cannot reach PostgreSQL at {_safe(args.database_url)}: {exc}",
                file=sys.stderr,
            )
            return 2
        if args.profile:
            orchestrator.profile()
            return 0
        info = machine_info(args.database_url)
        if "redis" in args.backends:
            info["redis"] = _redis_version(args.redis_url)
            if info["redis"] is None:
                print(f"bench: cannot reach Redis at {args.redis_url}", file=sys.stderr)
                return 2
        started = time.monotonic()
        results = orchestrator.run_all(args.backends, args.workload_list)
        document = {
            "timestamp": stamp,
            "quick": args.quick,
            "elapsed_s": round(time.monotonic() - started, 1),
            "machine": info,
            "options": {
                "backends": args.backends,
                "workloads": args.workload_list,
                "rounds": args.rounds,
                "pool": f"pool_size={args.pool_size}, max_overflow={args.max_overflow}",
                "pool_3_processes": f"pool_size={args.multi_pool_size}, "
                f"max_overflow={args.multi_max_overflow} per process",
                "database_server": _safe(args.database_url),
            },
            "parameters": orchestrator.params,
            "results": results,
        }
        markdown, derived = render_report(document)
        document.update(derived)
        print(markdown)
        RESULTS.mkdir(parents=True, exist_ok=True)
        text = json.dumps(document, indent=2, sort_keys=True, default=str) + "\n"
        (RESULTS / f"{stamp}.json").write_text(text, encoding="utf-8")
        (RESULTS / "latest.json").write_text(text, encoding="utf-8")
        (RESULTS / "latest.md").write_text(markdown, encoding="utf-8")
        _say(f"results: {RESULTS.relative_to(REPO)}/{stamp}.json (and latest.json, latest.md)")
        return 0
    finally:
        orchestrator.close()


if __name__ == "__main__":
    sys.exit(main())
