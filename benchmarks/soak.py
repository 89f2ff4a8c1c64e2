"""Soak test: app-server processes doing agent turns while their database connections die.

Usage (``make soak`` runs it with the defaults; ``make soak SOAK_ARGS="--shared"``)::

    python -m benchmarks.soak                         # 4 processes, 400 conversations, 120 s
    python -m benchmarks.soak --shared                # every process serves every conversation
    python -m benchmarks.soak --turns 50000 --kill-every 1
    python -m benchmarks.soak --database-url postgresql://u:p@host/db   # use that database

Each turn is what the Agents SDK Runner does -- ``get_items(limit=20)``, then
``add_items([user message, assistant message])`` -- and sometimes a ``pop_item()``.
Meanwhile this process runs ``pg_terminate_backend`` on every backend of the soak
database every few seconds. At the end every conversation's history is read
straight from the ``messages`` table and checked against what the writers were
told: nothing lost, nothing duplicated, nothing reordered, each turn's two items
adjacent. The exit status is 1 if anything is off.

By default a fresh database is created on ``--server-url`` and dropped at the end.
With ``--database-url`` that database is used (and kept): every connection to it
is killed over and over, so never point it at a database others are using.

The engine lives in ``tests/support/soak.py``, shared with the CI tests
``tests/cluster/test_soak.py`` and ``tests/cluster/test_many_servers.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from agents_sessions.db.engine import mask_url, parse_database_url
from tests.support.soak import SoakConfig, SoakError, run_soak

DEFAULT_SERVER_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--processes", type=int, default=4, help="worker processes")
    parser.add_argument("--conversations", type=int, default=400, help="conversations in play")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--duration", type=float, default=120.0, help="seconds of turns")
    length.add_argument("--turns", type=int, help="stop after this many turns in all instead")
    parser.add_argument(
        "--kill-every",
        type=float,
        default=3.0,
        help="mean seconds between kill rounds (jittered +/- 50%%); 0: no faults",
    )
    parser.add_argument(
        "--shared",
        action="store_true",
        help="every process takes turns of every conversation (no stickiness)",
    )
    parser.add_argument("--pop-rate", type=float, default=0.05, help="share of turns that pop")
    parser.add_argument(
        "--concurrency", type=int, help="turns in flight per process (default: conv./processes)"
    )
    parser.add_argument("--pool-size", type=int, default=5, help="each worker's pool_size")
    parser.add_argument("--max-overflow", type=int, default=5, help="each worker's max_overflow")
    parser.add_argument("--seed", type=int, default=0, help="seeds the workers' choices")
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--database-url", help="soak this database (kept) instead of a fresh one; see above"
    )
    where.add_argument(
        "--server-url",
        default=DEFAULT_SERVER_URL,
        help="create (and drop) a fresh database on this server",
    )
    parser.add_argument(
        "--admin-url",
        help="where the killer connects (default: --server-url, or --database-url)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    server = parse_database_url(arguments.server_url).url
    created: str | None = None
    if arguments.database_url:
        database_url = arguments.database_url
        admin_url = arguments.admin_url or database_url
    else:
        created = f"agents_sessions_soak_{uuid.uuid4().hex[:10]}"
        admin_url = arguments.admin_url or arguments.server_url
        database_url = server.set(database=created).render_as_string(hide_password=False)
    try:
        config = SoakConfig(
            database_url=database_url,
            admin_url=admin_url,
            processes=arguments.processes,
            conversations=arguments.conversations,
            duration_s=arguments.duration,
            turns=arguments.turns,
            kill_every_s=arguments.kill_every,
            shared=arguments.shared,
            pop_rate=arguments.pop_rate,
            concurrency=arguments.concurrency,
            pool_size=arguments.pool_size,
            max_overflow=arguments.max_overflow,
            seed=arguments.seed,
        )
        config.validate()
    except ValueError as exc:
        _parser().error(str(exc))

    admin = create_engine(server, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    if created is not None:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{created}"'))
    try:
        length = f"{config.turns:,} turns" if config.turns else f"{config.duration_s:g} s"
        print(
            f"soak: {config.processes} processes, {config.conversations} "
            f"{'shared' if config.shared else 'partitioned'} conversations, {length}, "
            f"kills every ~{config.kill_every_s:g} s, on {mask_url(make_url(database_url))}",
            flush=True,
        )
        started = time.monotonic()
        try:
            report = run_soak(config, progress=lambda line: print(f"soak: {line}", flush=True))
        except SoakError as exc:
            print(f"soak: FAILED to run: {exc}", file=sys.stderr)
            return 1
        print(report.render())
        print(f"soak: done in {time.monotonic() - started:.0f} s (verification included)")
        return 0 if report.ok else 1
    finally:
        if created is not None:
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{created}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    sys.exit(main())
