"""agents_sessions as a production service uses it: several worker processes, one database.

What it shows, in the order a deployment does it:

1. Settings from the environment: ``DATABASE_URL`` (unset -> the embedded SQLite
   file, so the demo runs anywhere), pool sizes in the URL's query string, TLS
   through ``sslmode``.
2. Migrations as a separate step before the workers start (a deploy pipeline's
   ``agents-sessions migrate upgrade``); the workers run with auto-migration off, so
   a server behind the schema head refuses to start instead of migrating.
3. Several worker processes (as gunicorn/uvicorn workers would be), each running
   many conversations concurrently as asyncio tasks through the real ``Runner``,
   recording token usage per model request.
4. Graceful shutdown: SIGTERM (or Ctrl-C) lets every conversation finish the turn
   it is in, then each process disposes of its connection pools.

Offline: the SDK's ``ScriptedModel`` answers, so no API key is needed::

    python examples/02_production_postgres.py
    DATABASE_URL='postgresql://postgres@127.0.0.1:5432/postgres?pool_size=4&max_overflow=2' \\
        python examples/02_production_postgres.py --processes 2 --conversations 4 --turns 3
    python examples/02_production_postgres.py --turns 0     # until SIGTERM / Ctrl-C
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import multiprocessing
import os
import signal
import sys
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from types import FrameType
from typing import Any

from agents import Agent, Runner, set_tracing_disabled
from agents.testing import ModelStep, ScriptedModel, assistant_message
from agents.usage import Usage
from sqlalchemy.engine import make_url

from agents_sessions import (
    PostgreSQLSession,
    Settings,
    dispose_all,
    get_store,
    load_settings,
    parse_database_url,
    upgrade,
)

#: Conversation owners: conversations are spread over a few users.
USERS = ("alice", "bob", "carol")
PROMPT_TOKENS, COMPLETION_TOKENS = 40, 12


@dataclass(frozen=True)
class Plan:
    """What each worker process does."""

    url: str  # secret: carries the password; never printed (see safe_url)
    run_id: str
    conversations: int  # concurrent conversations per process
    turns: int  # per conversation; 0 = until stopped


def database_url(settings: Settings, conversations: int) -> str:
    """The URL from the environment, with pool settings for this workload if it has none.

    Pool options ride in the query string and are read by agents_sessions; every
    other parameter reaches libpq unchanged. In production put them in the URL
    your secret store hands out, e.g.::

        postgresql://app:...@db.internal:5432/agents?pool_size=8&max_overflow=4
            &pool_recycle=300&sslmode=verify-full&sslrootcert=/etc/ssl/certs/db-ca.pem

    ``sslmode=require`` encrypts the connection; ``verify-full`` also checks the
    server's certificate and host name against ``sslrootcert`` (the only mode that
    stops a man in the middle). libpq's default, ``prefer``, silently falls back to
    plain text, so set one explicitly for any server that is not on localhost
    (``PGSSLMODE`` in the environment works too).
    """
    url = make_url(settings.resolved_database_url())
    extra: dict[str, str] = {}
    if "pool_size" not in url.query:
        # Each process runs `conversations` tasks; a call holds a connection only
        # for its one statement, so one connection per task is the most it can use.
        extra["pool_size"] = str(conversations)
    if "max_overflow" not in url.query:
        extra["max_overflow"] = "0"  # a fixed budget: see the total printed below
    if url.get_backend_name() == "postgresql" and "application_name" not in url.query:
        extra["application_name"] = "agents-sessions-example"  # visible in pg_stat_activity
    return url.update_query_dict(extra).render_as_string(hide_password=False)


def describe_connection(url: str, processes: int) -> list[str]:
    """Lines about where we connect, how pooled, and how encrypted (no password)."""
    target = parse_database_url(url)
    lines = [
        f"Database:   {target.safe_url}",
        f"Pool:       {target.pool.describe()} per process; at most "
        f"{processes} x {target.pool.max_connections} = "
        f"{processes * target.pool.max_connections} connections in total",
    ]
    if target.dialect == "postgresql":
        sslmode = target.url.query.get("sslmode") or os.environ.get("PGSSLMODE")
        lines.append(
            f"TLS:        sslmode={sslmode or 'prefer (libpq default: may be plain text)'}"
        )
    return lines


# ------------------------------------------------------------------ worker processes

_stop: Any = None  # the shared multiprocessing.Event, set in each worker process


def _init_worker(stop: Any) -> None:
    """Runs first in every worker process."""
    global _stop
    _stop = stop
    set_tracing_disabled(True)  # offline: nowhere to send traces
    # Ctrl-C reaches every process of the terminal's group: the supervisor decides
    # (it sets `stop`); workers finish their turn instead of dying mid-write.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # An orchestrator may signal a worker directly: same graceful path.
    signal.signal(signal.SIGTERM, lambda _signal, _frame: stop.set())
    # However the process ends, close its pooled connections cleanly.
    atexit.register(dispose_all)


def _scripted_step(worker: int, conversation: int, turn: int) -> ModelStep:
    return ModelStep(
        output=[assistant_message(f"Answer {turn} for conversation {conversation}.{worker}")],
        usage=Usage(
            requests=1,
            input_tokens=PROMPT_TOKENS,
            output_tokens=COMPLETION_TOKENS,
            total_tokens=PROMPT_TOKENS + COMPLETION_TOKENS,
        ),
    )


async def _converse(plan: Plan, settings: Settings, worker: int, conversation: int) -> int:
    """One conversation: turns until the plan's count, or until shutdown is requested."""
    model = ScriptedModel()
    agent = Agent(name="Support", instructions="Answer briefly.", model=model)
    session = PostgreSQLSession(
        f"{plan.run_id}-w{worker}-c{conversation}",
        database_url=plan.url,  # every session on this URL shares the process's one pool
        user_id=USERS[conversation % len(USERS)],
        metadata={"worker": worker, "run": plan.run_id},
        # Only the latest 20 items go to the model: a turn's cost stays flat however
        # long the conversation grows.
        session_settings={"limit": 20},
        settings=settings,
    )
    turn = 0
    # The stop flag is checked between turns only: a turn (the user's input, the
    # answer and its usage) is stored whole, never cut in half by a shutdown.
    while (plan.turns == 0 or turn < plan.turns) and not _stop.is_set():
        model.enqueue(_scripted_step(worker, conversation, turn))
        result = await Runner.run(agent, f"Question {turn}", session=session)
        await session.record_usage(result)  # one usage_logs row per model request
        turn += 1
        if turn == 1 and conversation == 0:
            print(f"worker {worker}: running (pid {os.getpid()})", flush=True)
    return turn


async def _worker_main(plan: Plan, worker: int) -> int:
    # AGENTS_SESSIONS_AUTO_MIGRATE=false in code: a worker never migrates; behind
    # head it fails at its first call with SchemaNotAtHeadError.
    settings = load_settings(auto_migrate=False)
    try:
        turns = await asyncio.gather(
            *(_converse(plan, settings, worker, n) for n in range(plan.conversations))
        )
    finally:
        dispose_all()  # graceful: return every pooled connection before exiting
    return sum(turns)


def run_worker(plan: Plan, worker: int, stop: Any, results: Any) -> None:
    """Entry point of one worker process: its conversations, concurrently.

    Puts ``(worker, turns completed)`` on ``results``.
    """
    _init_worker(stop)
    results.put((worker, asyncio.run(_worker_main(plan, worker))))


# ------------------------------------------------------------------ supervisor


def summarize(plan: Plan, started: datetime) -> list[str]:
    """What this run stored, read back through the repository API."""
    store = get_store(plan.url)
    conversations = messages = 0
    with store.read() as repos:
        for user in USERS:
            page = repos.conversations.list_by_user(user, limit=100)
            while True:
                for record in page.conversations:
                    if record.id.startswith(plan.run_id):
                        conversations += 1
                        messages += repos.messages.count(record.id)
                if page.next_cursor is None:
                    break
                page = repos.conversations.list_by_user(user, limit=100, after=page.next_cursor)
        per_user = repos.usage.totals_by_user(since=started)
    lines = [f"Stored:     {conversations} conversations, {messages} messages"]
    for totals in per_user:
        lines.append(
            f"Usage:      {totals.key}: {totals.requests} requests, {totals.total_tokens} tokens"
        )
    return lines


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--processes", type=int, default=2, help="worker processes")
    parser.add_argument(
        "--conversations", type=int, default=3, help="concurrent conversations per process"
    )
    parser.add_argument(
        "--turns", type=int, default=3, help="turns per conversation (0: until SIGTERM/Ctrl-C)"
    )
    arguments = parser.parse_args(argv)
    for name in ("processes", "conversations"):
        if getattr(arguments, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if arguments.turns < 0:
        parser.error("--turns must be 0 (until stopped) or more")
    return arguments


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    settings = load_settings()
    plan = Plan(
        url=database_url(settings, arguments.conversations),
        run_id=f"prod-{uuid.uuid4().hex[:8]}",
        conversations=arguments.conversations,
        turns=arguments.turns,
    )
    for line in describe_connection(plan.url, arguments.processes):
        print(line)
    atexit.register(dispose_all)

    # The deploy step: migrate once, before any worker starts (in a real pipeline,
    # `agents-sessions migrate upgrade` as its own job). It takes the migration lock,
    # so running it from several places at once is safe too.
    upgrade(plan.url)
    print("Schema:     at head")

    # spawn: each worker starts as a fresh interpreter, like separate servers would.
    context = multiprocessing.get_context("spawn")
    stop = context.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        if not stop.is_set():
            print(
                f"received {signal.Signals(signum).name}: stopping after the turns in flight",
                flush=True,
            )
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    started = datetime.now(timezone.utc)
    results = context.SimpleQueue()
    workers = [
        context.Process(
            target=run_worker, args=(plan, worker, stop, results), name=f"worker-{worker}"
        )
        for worker in range(arguments.processes)
    ]
    for process in workers:
        process.start()
    print(
        f"Running:    {arguments.processes} processes x {arguments.conversations} "
        f"conversations, run {plan.run_id}",
        flush=True,
    )
    for process in workers:
        process.join()
    failed = [process.name for process in workers if process.exitcode != 0]
    if failed:
        print(f"error: {', '.join(failed)} failed (see above)", file=sys.stderr)
        return 1
    turns = sum(results.get()[1] for _ in workers)

    print(f"Completed:  {turns} turns")
    for line in summarize(plan, started):
        print(line)
    dispose_all()  # the supervisor's own pool (migration check, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
