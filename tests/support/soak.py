"""The soak engine: app-server processes doing agent turns while their connections are killed.

Shared by ``benchmarks/soak.py`` (``make soak``), ``tests/cluster/test_soak.py`` and
``tests/cluster/test_many_servers.py``. :func:`run_soak` does the whole run:

1. migrates the soak database once (the workers then only check the schema);
2. spawns ``processes`` worker processes -- each one an app server with its own
   engine, pool and event loop -- and waits until every one has warmed up;
3. lets them run turns for ``duration_s`` seconds (or ``turns`` turns in all), while
   a killer thread in this process runs ``pg_terminate_backend`` on every backend of
   the soak database every ``kill_every_s`` seconds (jittered);
4. reads every stored item straight from the ``messages`` table and checks it
   against what the workers were told (acknowledged), returning a :class:`SoakReport`.

A turn is what the Agents SDK Runner does: ``get_items(limit=20)``, then
``add_items([user message, assistant message])``, and sometimes a ``pop_item()``.
Each item carries a tag ``soak:c<conversation>:w<writer>:s<sequence>:<u|a>``; a
writer is a worker process, and its sequence numbers grow with every turn.

Conversations are either partitioned (each belongs to one process, which then knows
its exact history at every moment and checks every read against it) or shared
(``shared=True``: any process takes a turn of any conversation at any time, so
writers in several processes append to one conversation concurrently -- the
"many app servers, no sticky sessions" deployment). Within one process a
conversation has at most one turn in flight, so each process's turns of a
conversation are acknowledged in sequence order, and must be stored in that order.

Outcomes the caller cannot know are never guessed: when ``add_items`` raises
(its retries ran out) or ``pop_item`` raises (``ConnectionLostError``: it is never
retried), the writer re-reads the history to learn what happened and records it.
In shared mode another process may change the history in between, so a lost pop is
settled at verification instead: an item that is missing, was acknowledged, and was
returned by no pop may be attributed to a lost pop of the same conversation (at
most one item each, and only an item absent from the history read right after that
pop failed). Anything else missing is a loss.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import multiprocessing
import multiprocessing.process
import multiprocessing.queues
import multiprocessing.synchronize
import queue
import random
import re
import threading
import time
import traceback
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.pool import NullPool

from agents_sessions import DatabaseError, PostgreSQLSession, upgrade
from agents_sessions.db.engine import parse_database_url

#: How the tag of an item is spelled; verification finds it in the stored JSON text.
TAG_PATTERN = r"soak:c[0-9]+:w[0-9]+:s[0-9]+:[ua]"
_TAG = re.compile(r"soak:c([0-9]+):w([0-9]+):s([0-9]+):([ua])")

# Realistic-looking bodies (a few hundred bytes per turn) without dominating the run.
_USER_TEXT = "Could you summarise the last message and list the open questions? " * 2
_ASSISTANT_TEXT = "Here is a short summary, followed by the open questions, one per line. " * 3

#: Pool of each worker process unless the URL sets its own: workers x (size +
#: overflow) connections in all, well under a default max_connections of 100.
DEFAULT_POOL_SIZE = 5
DEFAULT_MAX_OVERFLOW = 5


# ------------------------------------------------------------------------- items


def tag(conversation: int, writer: int, sequence: int, part: str) -> str:
    """The tag of one item of a turn: ``part`` is ``"u"`` (user) or ``"a"`` (assistant)."""
    return f"soak:c{conversation}:w{writer}:s{sequence}:{part}"


@dataclass(frozen=True, order=True)
class Tag:
    """A parsed item tag."""

    conversation: int
    writer: int
    sequence: int
    part: str

    @classmethod
    def parse(cls, value: str) -> Tag | None:
        match = _TAG.fullmatch(value)
        if match is None:
            return None
        conversation, writer, sequence, part = match.groups()
        return cls(int(conversation), int(writer), int(sequence), part)


def turn_items(conversation: int, writer: int, sequence: int) -> list[dict[str, Any]]:
    """The two items of one turn, shaped as the Agents SDK stores them."""
    return [
        {"role": "user", "content": f"{tag(conversation, writer, sequence, 'u')} {_USER_TEXT}"},
        {
            "id": f"msg_{writer}_{sequence}",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [
                {
                    "type": "output_text",
                    "text": f"{tag(conversation, writer, sequence, 'a')} {_ASSISTANT_TEXT}",
                    "annotations": [],
                    "logprobs": [],
                }
            ],
        },
    ]


def item_for_tag(value: str) -> dict[str, Any]:
    """The item that carries tag ``value`` (exactly as it was appended)."""
    parsed = Tag.parse(value)
    assert parsed is not None, value
    items = turn_items(parsed.conversation, parsed.writer, parsed.sequence)
    return items[0] if parsed.part == "u" else items[1]


def tag_of_item(item: Any) -> str:
    """The tag carried by an item read back through a session ("?" when it has none)."""
    content = item.get("content") if isinstance(item, Mapping) else None
    if isinstance(content, list):
        content = "".join(
            str(part.get("text", "")) for part in content if isinstance(part, Mapping)
        )
    match = _TAG.search(str(content))
    return match.group(0) if match else "?"


def conversation_id(run_id: str, conversation: int) -> str:
    return f"soak-{run_id}-{conversation:05d}"


# ------------------------------------------------------------------------ config


@dataclass(frozen=True)
class SoakConfig:
    """One soak run.

    Attributes:
        database_url: The database the workers use. Every backend connected to it
            is killed, again and again: give it a database of its own.
        admin_url: Where the killer connects (a role allowed to
            ``pg_terminate_backend`` the workers' backends, e.g. the superuser).
        processes: Worker processes (app servers), each with its own engine and pool.
        conversations: Conversations in play.
        duration_s: How long the workers take turns (ignored when ``turns`` is set).
        turns: Stop after this many turns in all instead (shared out among processes).
        kill_every_s: Mean seconds between kill rounds (uniformly jittered by
            +/- 50 %); 0 injects no faults.
        shared: Conversations shared by every process (no stickiness), instead of
            partitioned among them.
        pop_rate: Probability that a turn ends with a ``pop_item()``.
        concurrency: Turns in flight per process; default: conversations / processes.
        history_limit: The ``limit`` of each turn's ``get_items``.
        pool_size, max_overflow: Each worker's pool, unless the URL sets its own.
        seed: Seeds the workers' choices (not the timing).
        run_id: Prefix of the conversation ids (fresh by default).
    """

    database_url: str
    admin_url: str
    processes: int = 4
    conversations: int = 400
    duration_s: float = 120.0
    turns: int | None = None
    kill_every_s: float = 3.0
    shared: bool = False
    pop_rate: float = 0.05
    concurrency: int | None = None
    history_limit: int = 20
    pool_size: int = DEFAULT_POOL_SIZE
    max_overflow: int = DEFAULT_MAX_OVERFLOW
    seed: int = 0
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad parameter."""
        checks: list[tuple[str, bool]] = [
            ("processes", self.processes >= 1),
            ("conversations", self.conversations >= 1),
            ("duration_s", self.duration_s > 0),
            ("turns", self.turns is None or self.turns >= 1),
            ("kill_every_s", self.kill_every_s >= 0),
            ("pop_rate", 0.0 <= self.pop_rate <= 1.0),
            ("concurrency", self.concurrency is None or self.concurrency >= 1),
            ("history_limit", self.history_limit >= 1),
            ("pool_size", self.pool_size >= 1),
            ("max_overflow", self.max_overflow >= 0),
        ]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"invalid soak parameter {name}={getattr(self, name)!r}")
        if not self.shared and self.conversations < self.processes:
            raise ValueError(
                f"invalid soak parameter conversations={self.conversations}: partitioned "
                f"mode needs at least one conversation per process ({self.processes})"
            )
        for name in ("database_url", "admin_url"):
            try:
                backend = make_url(getattr(self, name)).get_backend_name()
            except Exception:  # SQLAlchemy's message would quote the password
                raise ValueError(f"invalid soak parameter {name}: not a database URL") from None
            if backend != "postgresql":
                raise ValueError(f"invalid soak parameter {name}: the soak needs PostgreSQL")

    @property
    def database_name(self) -> str:
        name = make_url(self.database_url).database
        if not name:
            raise ValueError("invalid soak parameter database_url: it names no database")
        return name

    def owned_by(self, process: int) -> list[int]:
        """The conversations ``process`` takes turns of."""
        if self.shared:
            return list(range(self.conversations))
        return [c for c in range(self.conversations) if c % self.processes == process]

    def tasks_per_process(self, process: int) -> int:
        wanted = self.concurrency or math.ceil(self.conversations / self.processes)
        # A task holds one conversation at a time; never more tasks than conversations.
        return min(wanted, len(self.owned_by(process)))

    def worker_url(self) -> str:
        url = make_url(self.database_url)
        extra = {
            name: str(value)
            for name, value in (("pool_size", self.pool_size), ("max_overflow", self.max_overflow))
            if name not in url.query
        }
        return url.update_query_dict(extra).render_as_string(hide_password=False)

    def turn_budgets(self) -> list[int | None]:
        if self.turns is None:
            return [None] * self.processes
        share, extra = divmod(self.turns, self.processes)
        return [share + (1 if n < extra else 0) for n in range(self.processes)]


# -------------------------------------------------------------------- worker log


@dataclass
class UnknownAppend:
    """An ``add_items`` that raised: its outcome had to be found out."""

    conversation: int
    sequence: int
    error: str
    resolution: str  # "stored" | "not stored" | "unexplained"


@dataclass
class UnknownPop:
    """A ``pop_item`` that raised: its outcome had to be found out."""

    conversation: int
    error: str
    resolution: str  # "popped" | "not popped" | "pending" (shared) | "unexplained"
    snapshot: list[str] | None = None  # shared mode: the history read right after


@dataclass
class WorkerLog:
    """Everything one worker process did and was told, returned to the parent."""

    process: int
    turns: int = 0
    appends: int = 0
    pops: int = 0
    empty_pops: int = 0
    read_failures: int = 0
    elapsed_s: float = 0.0
    # Sequences of the acknowledged turns, per conversation, in acknowledgement order.
    acked: dict[int, list[int]] = field(default_factory=dict)
    # Tags this writer removed by pops (returned items, and lost pops it settled).
    popped: dict[int, list[str]] = field(default_factory=dict)
    unknown_appends: list[UnknownAppend] = field(default_factory=list)
    unknown_pops: list[UnknownPop] = field(default_factory=list)
    # Partitioned mode: the exact history this writer intends each conversation to have.
    intended: dict[int, list[str]] | None = None
    # What this writer saw go wrong while running (stale reads, wrong pops...).
    anomalies: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    # From the `agents_sessions` logger, and the pool's invalidation events.
    retries: Counter[str] = field(default_factory=Counter)
    replaced_at_checkout: int = 0
    lost_mid_call: int = 0
    other_log_records: Counter[str] = field(default_factory=Counter)

    def anomaly(self, kind: str, detail: str) -> None:
        self.anomalies[kind] += 1
        if len(self.examples) < 10:
            self.examples.append(f"process {self.process}: {kind}: {detail}")


class _RecordCounter(logging.Handler):
    """Counts the package's retry warnings (and any other record) instead of printing them."""

    def __init__(self, log: WorkerLog) -> None:
        super().__init__(level=logging.DEBUG)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.name.startswith("agents_sessions") and "retry" in message:
            cause = "connection lost" if "connection lost" in message else "could not connect"
            self.log.retries[cause] += 1
        elif record.levelno >= logging.WARNING:
            self.log.other_log_records[f"{record.name} {record.levelname}"] += 1


# ------------------------------------------------------------------------ worker


class _Worker:
    """One app server: its own engine and pool, ``tasks`` turns in flight."""

    def __init__(self, config: SoakConfig, process: int, budget: int | None) -> None:
        self.config = config
        self.process = process
        self.budget = budget
        self.log = WorkerLog(process=process)
        url = config.worker_url()
        owned = config.owned_by(process)
        self.sessions = {
            c: PostgreSQLSession(conversation_id(config.run_id, c), database_url=url) for c in owned
        }
        # Conversations with no turn in flight in this process.
        self.free = list(owned)
        self.intended: dict[int, list[str]] | None = (
            None if config.shared else {c: [] for c in owned}
        )
        self.sequence = 0
        self.started = 0
        self.rng = random.Random(f"{config.seed}-{process}")
        self._watch(self.sessions[owned[0]])

    def _watch(self, session: PostgreSQLSession) -> None:
        counter = _RecordCounter(self.log)
        for name in ("agents_sessions", "sqlalchemy"):
            logger = logging.getLogger(name)
            logger.addHandler(counter)
            logger.propagate = False  # counted and reported, not printed

        def invalidated(_dbapi: Any, _record: Any, exception: BaseException | None) -> None:
            # The checkout liveness check raises DisconnectionError for a pooled
            # connection the server closed; anything else died during a call.
            if isinstance(exception, DisconnectionError):
                self.log.replaced_at_checkout += 1
            else:
                self.log.lost_mid_call += 1

        event.listen(session.store.engine, "invalidate", invalidated)

    async def warm_up(self) -> None:
        # The first call checks the schema (once per engine): done before the
        # killer starts, so every fault lands on ordinary calls.
        session = next(iter(self.sessions.values()))
        await session.get_items(limit=1)

    async def run(self, duration_s: float) -> WorkerLog:
        started = time.monotonic()
        # With a turn budget the deadline is only a safety net.
        deadline = started + (duration_s if self.budget is None else 24 * 3600)
        tasks = self.config.tasks_per_process(self.process)
        await asyncio.gather(*(self._drive(deadline) for _ in range(tasks)))
        self.log.elapsed_s = time.monotonic() - started
        self.log.intended = self.intended
        return self.log

    async def _drive(self, deadline: float) -> None:
        while time.monotonic() < deadline and (self.budget is None or self.started < self.budget):
            self.started += 1
            # Any free conversation: no stickiness. Swap-remove keeps this O(1).
            index = self.rng.randrange(len(self.free))
            conversation = self.free[index]
            self.free[index] = self.free[-1]
            self.free.pop()
            try:
                await self._turn(conversation)
            finally:
                self.free.append(conversation)

    async def _turn(self, conversation: int) -> None:
        session = self.sessions[conversation]
        limit = self.config.history_limit
        try:
            seen = await session.get_items(limit=limit)
        except DatabaseError:
            # Its retries ran out: the Runner would fail this run; so does the turn.
            self.log.read_failures += 1
            return
        self._check_read(conversation, seen)

        self.sequence += 1
        sequence = self.sequence
        self.log.turns += 1
        try:
            await session.add_items(turn_items(conversation, self.process, sequence))
        except DatabaseError as exc:
            await self._settle_append(conversation, sequence, exc)
        else:
            self.log.appends += 1
            self.log.acked.setdefault(conversation, []).append(sequence)
            if self.intended is not None:
                self.intended[conversation] += [
                    tag(conversation, self.process, sequence, "u"),
                    tag(conversation, self.process, sequence, "a"),
                ]

        if self.rng.random() < self.config.pop_rate:
            await self._pop(conversation)

    def _check_read(self, conversation: int, items: list[Any]) -> None:
        tags = [tag_of_item(item) for item in items]
        if self.intended is not None:
            # The only writer of this conversation: the read must be exactly the
            # newest `limit` items it was told are stored, intact.
            expected = self.intended[conversation][-self.config.history_limit :]
            if tags != expected:
                self.log.anomaly(
                    "stale or wrong read", f"c{conversation}: read {tags}, expected {expected}"
                )
            elif items != [item_for_tag(value) for value in expected]:
                self.log.anomaly("item changed", f"c{conversation}: {tags}")
            return
        # Shared: whatever the others did, a read holds each item once, in each
        # writer's order.
        if len(set(tags)) != len(tags):
            self.log.anomaly("duplicate in a read", f"c{conversation}: {tags}")
        if _descents(tags):
            self.log.anomaly("writer order broken in a read", f"c{conversation}: {tags}")

    async def _history(self, conversation: int) -> list[str]:
        """The whole history's tags, read until a read succeeds (faults go on meanwhile)."""
        session = self.sessions[conversation]
        for attempt in range(60):
            try:
                return [tag_of_item(item) for item in await session.get_items()]
            except DatabaseError:
                await asyncio.sleep(0.05 * min(attempt + 1, 10))
        raise RuntimeError(f"could not read conversation {conversation} back after 60 tries")

    async def _settle_append(self, conversation: int, sequence: int, exc: Exception) -> None:
        user, assistant = (tag(conversation, self.process, sequence, p) for p in "ua")
        history = await self._history(conversation)
        if self.intended is not None:
            intended = self.intended[conversation]
            if history == intended:
                resolution = "not stored"
            elif history == [*intended, user, assistant]:
                resolution = "stored"
                intended += [user, assistant]
            else:
                resolution = "unexplained"
                self.log.anomaly(
                    "history unexplained after a failed append",
                    f"c{conversation}: {history[-6:]} vs intended {intended[-6:]}",
                )
                self.intended[conversation] = history
        else:
            # Another process may have popped one of them since; verification decides.
            resolution = "stored" if user in history or assistant in history else "not stored"
        self.log.unknown_appends.append(
            UnknownAppend(conversation, sequence, type(exc).__name__, resolution)
        )

    async def _pop(self, conversation: int) -> None:
        session = self.sessions[conversation]
        try:
            item = await session.pop_item()
        except DatabaseError as exc:
            # ConnectionLostError: the pop may or may not have happened. (Any other
            # DatabaseError means it did not, but it costs nothing to check.)
            await self._settle_pop(conversation, exc)
            return
        if item is None:
            self.log.empty_pops += 1
            if self.intended is not None and self.intended[conversation]:
                self.log.anomaly("pop found nothing", f"c{conversation} holds items")
            return
        popped = tag_of_item(item)
        self.log.pops += 1
        self.log.popped.setdefault(conversation, []).append(popped)
        if self.intended is not None:
            intended = self.intended[conversation]
            if not intended or intended[-1] != popped:
                self.log.anomaly(
                    "pop returned the wrong item",
                    f"c{conversation}: {popped}, newest was {intended[-1:] or None}",
                )
                if popped in intended:
                    intended.remove(popped)
            else:
                intended.pop()

    async def _settle_pop(self, conversation: int, exc: Exception) -> None:
        history = await self._history(conversation)
        error = type(exc).__name__
        if self.intended is None:
            self.log.unknown_pops.append(UnknownPop(conversation, error, "pending", history))
            return
        intended = self.intended[conversation]
        if history == intended:
            resolution = "not popped"
        elif intended and history == intended[:-1]:
            resolution = "popped"
            self.log.popped.setdefault(conversation, []).append(intended.pop())
        else:
            resolution = "unexplained"
            self.log.anomaly(
                "history unexplained after a failed pop",
                f"c{conversation}: {history[-6:]} vs intended {intended[-6:]}",
            )
            self.intended[conversation] = history
        self.log.unknown_pops.append(UnknownPop(conversation, error, resolution))


def _descents(tags: Sequence[str]) -> int:
    """How often a writer's item comes after one of its own later items (per writer)."""
    last: dict[int, tuple[int, bool]] = {}
    descents = 0
    for value in tags:
        parsed = Tag.parse(value)
        if parsed is None:
            continue
        key = (parsed.sequence, parsed.part == "a")  # a turn's answer after its question
        previous = last.get(parsed.writer)
        if previous is not None and key <= previous:
            descents += 1
        last[parsed.writer] = key
    return descents


def _worker_main(
    config: SoakConfig,
    process: int,
    budget: int | None,
    messages: multiprocessing.queues.Queue[tuple[str, int, Any]],
    go: multiprocessing.synchronize.Event,
) -> None:
    """Entry point of a spawned worker process."""
    try:
        worker = _Worker(config, process, budget)
        asyncio.run(worker.warm_up())
        messages.put(("ready", process, None))
        if not go.wait(600):
            raise RuntimeError("the parent never said go")
        log = asyncio.run(worker.run(config.duration_s))
        messages.put(("done", process, log))
    except BaseException:
        messages.put(("error", process, traceback.format_exc()))


# ------------------------------------------------------------------------ killer

_KILL = text(
    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) FROM pg_stat_activity "
    "WHERE datname = :database AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
)


class Killer(threading.Thread):
    """Terminates every backend of one database every ``every_s`` seconds (jittered)."""

    def __init__(self, admin_url: str, database: str, every_s: float, seed: int = 0) -> None:
        super().__init__(name="soak-killer", daemon=True)
        self.admin_url = admin_url
        self.database = database
        self.every_s = every_s
        self.rng = random.Random(f"killer-{seed}")
        self.rounds = 0
        self.killed = 0
        self.errors: Counter[str] = Counter()
        self._stop_requested = threading.Event()

    def run(self) -> None:
        engine = create_engine(
            parse_database_url(self.admin_url).url, isolation_level="AUTOCOMMIT", poolclass=NullPool
        )
        try:
            while not self._stop_requested.wait(self.every_s * self.rng.uniform(0.5, 1.5)):
                try:
                    with engine.connect() as connection:
                        killed = connection.execute(_KILL, {"database": self.database}).scalar_one()
                except Exception as exc:  # a soak reports its killer's trouble, never dies of it
                    self.errors[type(exc).__name__] += 1
                    continue
                self.rounds += 1
                self.killed += int(killed)
        finally:
            engine.dispose()

    def stop(self) -> None:
        self._stop_requested.set()
        if self.is_alive():
            self.join(30)


# ---------------------------------------------------------------------- verdict


@dataclass
class SoakReport:
    """What a soak run did, what it injected, and what verification found."""

    mode: str
    processes: int
    conversations: int
    tasks_per_process: int
    elapsed_s: float
    turns: int
    turns_per_process: list[int]
    appends: int
    pops: int
    empty_pops: int
    kill_rounds: int
    connections_killed: int
    killer_errors: dict[str, int]
    retries_connection_lost: int
    retries_could_not_connect: int
    replaced_at_checkout: int
    lost_mid_call: int
    read_failures: int
    unknown_appends: int
    unknown_appends_stored: int
    unknown_appends_not_stored: int
    unknown_pops: int
    unknown_pops_popped: int
    unknown_pops_not_popped: int
    stored_items: int
    min_writers_per_conversation: int
    writer_switches: int
    losses: int = 0
    duplicates: int = 0
    reorders: int = 0
    split_turns: int = 0
    partial_turns: int = 0
    phantoms: int = 0
    history_mismatches: int = 0
    in_flight_anomalies: int = 0
    other_log_records: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def failures(self) -> list[str]:
        """Every broken guarantee, by name (empty when the run passed)."""
        names = (
            "losses",
            "duplicates",
            "reorders",
            "split_turns",
            "partial_turns",
            "phantoms",
            "history_mismatches",
            "in_flight_anomalies",
        )
        return [f"{name}={getattr(self, name)}" for name in names if getattr(self, name)]

    @property
    def ok(self) -> bool:
        return not self.failures()

    def render(self) -> str:
        """A plain-text report."""
        rate = self.turns / self.elapsed_s if self.elapsed_s else 0.0
        unknown_pops = (
            f"{self.unknown_pops} (popped: {self.unknown_pops_popped}, "
            f"not popped: {self.unknown_pops_not_popped})"
        )
        lines = [
            f"agents_sessions soak: {self.mode} conversations, {self.processes} processes",
            f"  conversations       {self.conversations:,} "
            f"({self.tasks_per_process} turns in flight per process)",
            f"  duration            {self.elapsed_s:.1f} s",
            f"  turns               {self.turns:,} ({rate:,.0f}/s); per process: "
            + ", ".join(f"{n:,}" for n in self.turns_per_process),
            f"  appends acknowledged {self.appends:,} ({2 * self.appends:,} items)",
            f"  pops                {self.pops:,} returned an item, {self.empty_pops:,} found none",
            f"  faults injected     {self.kill_rounds:,} kill rounds, "
            f"{self.connections_killed:,} connections killed"
            + (f" (killer errors: {self.killer_errors})" if self.killer_errors else ""),
            f"  recovery            {self.retries_connection_lost:,} retries after a lost "
            f"connection, {self.retries_could_not_connect:,} after a failed connect; "
            f"{self.replaced_at_checkout:,} dead pooled connections replaced at checkout, "
            f"{self.lost_mid_call:,} connections lost during a call",
            f"  read failures       {self.read_failures:,} (get_items raised after its retries)",
            f"  unknown outcomes    add_items: {self.unknown_appends} (stored once: "
            f"{self.unknown_appends_stored}, not stored: {self.unknown_appends_not_stored}); "
            f"pop_item: {unknown_pops}",
            f"  stored items        {self.stored_items:,} read back; every conversation had "
            f">= {self.min_writers_per_conversation} writer(s), "
            f"{self.writer_switches:,} writer switches between adjacent turns",
            f"  verification        losses {self.losses}, duplicates {self.duplicates}, "
            f"reorders {self.reorders}, split turns {self.split_turns}, partial turns "
            f"{self.partial_turns}, phantoms {self.phantoms}, history mismatches "
            f"{self.history_mismatches}, in-flight anomalies {self.in_flight_anomalies}",
        ]
        if self.other_log_records:
            lines.append(f"  other log records   {self.other_log_records}")
        lines += [f"  ! {example}" for example in self.examples]
        lines.append(f"  RESULT: {'PASS' if self.ok else 'FAIL: ' + ', '.join(self.failures())}")
        return "\n".join(lines)


def read_stored(config: SoakConfig) -> dict[int, list[str | None]]:
    """Every stored item's tag, per conversation, in history order -- straight from the table.

    Not through the package under test: a plain query, duplicates included.
    """
    engine = create_engine(parse_database_url(config.database_url).url, poolclass=NullPool)
    prefix = conversation_id(config.run_id, 0)[:-5]
    stored: dict[int, list[str | None]] = defaultdict(list)
    try:
        with engine.connect() as connection:
            rows = connection.execution_options(yield_per=10_000).execute(
                text(
                    "SELECT conversation_id, substring(item::text from :pattern) "
                    "FROM messages WHERE starts_with(conversation_id, :prefix) "
                    "ORDER BY conversation_id, id"
                ),
                {"pattern": TAG_PATTERN, "prefix": prefix},
            )
            for conversation, value in rows:
                stored[int(conversation[len(prefix) :])].append(value)
    finally:
        engine.dispose()
    return dict(stored)


def _match(candidates: list[set[str]], missing: list[str]) -> int:
    """Most missing items attributable to lost pops, one each (augmenting paths)."""
    owner: dict[str, int] = {}

    def assign(pop: int, seen: set[str]) -> bool:
        for item in missing:
            if item in candidates[pop] and item not in seen:
                seen.add(item)
                if item not in owner or assign(owner[item], seen):
                    owner[item] = pop
                    return True
        return False

    return sum(assign(pop, set()) for pop in range(len(candidates)))


@dataclass
class _Verdict:
    losses: int = 0
    duplicates: int = 0
    reorders: int = 0
    split_turns: int = 0
    partial_turns: int = 0
    phantoms: int = 0
    history_mismatches: int = 0
    unknown_appends_stored: int = 0
    unknown_pops_popped: int = 0
    min_writers: int = 0
    writer_switches: int = 0
    examples: list[str] = field(default_factory=list)

    def note(self, example: str) -> None:
        if len(self.examples) < 10:
            self.examples.append(example)


def verify(
    config: SoakConfig, logs: Sequence[WorkerLog], stored: Mapping[int, Sequence[str | None]]
) -> _Verdict:
    """Check every conversation's stored history against what the writers were told."""
    verdict = _Verdict(min_writers=config.processes)
    acked: dict[int, set[str]] = defaultdict(set)
    unknown: dict[int, list[tuple[str, str]]] = defaultdict(list)
    popped: dict[int, Counter[str]] = defaultdict(Counter)
    pending: dict[int, list[set[str]]] = defaultdict(list)
    for log in logs:
        for conversation, sequences in log.acked.items():
            for sequence in sequences:
                for part in "ua":
                    acked[conversation].add(tag(conversation, log.process, sequence, part))
        for lost in log.unknown_appends:
            user, assistant = (tag(lost.conversation, log.process, lost.sequence, p) for p in "ua")
            unknown[lost.conversation].append((user, assistant))
        for conversation, tags in log.popped.items():
            popped[conversation].update(tags)
        for pop in log.unknown_pops:
            if pop.resolution == "pending":
                pending[pop.conversation].append(set(pop.snapshot or ()))

    for conversation in range(config.conversations):
        history = stored.get(conversation, [])
        where = f"conversation {conversation}"
        counts = Counter(history)
        written = acked[conversation] | {t for turn in unknown[conversation] for t in turn}

        for value, count in counts.items():
            if count > 1:
                verdict.duplicates += count - 1
                verdict.note(f"{where}: {value} stored {count} times")
            parsed = Tag.parse(value) if value else None
            if value not in written or parsed is None or parsed.conversation != conversation:
                verdict.phantoms += count
                verdict.note(f"{where}: stored item {value!r} was never appended here")
        for value, count in popped[conversation].items():
            if count > 1:
                verdict.duplicates += count - 1
                verdict.note(f"{where}: {value} returned by {count} pops")
            if value in counts:
                verdict.duplicates += 1
                verdict.note(f"{where}: {value} was popped, yet is stored")
            if value not in written:
                verdict.phantoms += 1
                verdict.note(f"{where}: a pop returned {value!r}, which was never appended")

        # Stored now, or stored and then returned by a pop.
        accounted = counts.keys() | popped[conversation].keys()
        missing = sorted(acked[conversation] - accounted)
        for user, assistant in unknown[conversation]:
            if user not in accounted and assistant not in accounted:
                continue  # not stored: the failed call wrote nothing
            verdict.unknown_appends_stored += 1
            if user not in accounted:
                # The answer without its question: half of an atomic append. (A pop
                # takes the newest item, so it cannot take the question and leave
                # the answer that follows it.)
                verdict.partial_turns += 1
                verdict.note(f"{where}: only part of the turn {user} is stored")
            elif assistant not in accounted:
                missing.append(assistant)  # stored, then removed by a lost pop -- or lost
        # Shared mode: a lost pop may have removed one item that was gone from the
        # history read right after it failed.
        candidates = [
            {value for value in missing if value not in snapshot}
            for snapshot in pending[conversation]
        ]
        attributed = _match(candidates, missing)
        verdict.unknown_pops_popped += attributed
        if len(missing) > attributed:
            verdict.losses += len(missing) - attributed
            verdict.note(f"{where}: acknowledged items missing: {missing[:6]}")

        tags = [value for value in history if value is not None]
        descents = _descents(tags)
        if descents:
            verdict.reorders += descents
            verdict.note(f"{where}: a writer's items out of order: {tags[:12]}")
        position = {value: index for index, value in enumerate(tags)}
        for value, index in position.items():
            if value.endswith(":u"):
                answer = value[:-1] + "a"
                if answer in position and position[answer] != index + 1:
                    verdict.split_turns += 1
                    verdict.note(f"{where}: {value} and its answer are not adjacent")

        turn_writers = [Tag.parse(value) for value in tags if value.endswith(":u")]
        writers = {parsed.writer for parsed in turn_writers if parsed is not None}
        verdict.min_writers = min(verdict.min_writers, len(writers))
        verdict.writer_switches += sum(
            1
            for before, after in itertools.pairwise(turn_writers)
            if before is not None and after is not None and before.writer != after.writer
        )

    for log in logs:
        for conversation, intended in (log.intended or {}).items():
            if list(stored.get(conversation, [])) != intended:
                verdict.history_mismatches += 1
                verdict.note(f"conversation {conversation}: stored history != its writer's")
    return verdict


# -------------------------------------------------------------------------- run


class SoakError(RuntimeError):
    """A worker process failed (its traceback is in the message) or hung."""


def _collect(
    messages: multiprocessing.queues.Queue[tuple[str, int, Any]],
    processes: Sequence[multiprocessing.process.BaseProcess],
    kind: str,
    timeout_s: float,
    progress: Callable[[], None] | None = None,
) -> dict[int, Any]:
    """Wait for one ``kind`` message from every worker (raising on an error or a death)."""
    received: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    while len(received) < len(processes):
        if time.monotonic() > deadline:
            raise SoakError(
                f"workers {sorted(set(range(len(processes))) - set(received))} "
                f"sent no {kind!r} within {timeout_s:.0f} s"
            )
        try:
            what, process, payload = messages.get(timeout=1.0)
        except queue.Empty:
            if progress is not None:
                progress()
            dead = [
                p.name for n, p in enumerate(processes) if n not in received and not p.is_alive()
            ]
            if dead:
                raise SoakError(f"worker processes {dead} died without a word") from None
            continue
        if what == "error":
            raise SoakError(f"worker process {process} failed:\n{payload}")
        if what == kind:
            received[process] = payload
    return received


def run_soak(config: SoakConfig, *, progress: Callable[[str], None] | None = None) -> SoakReport:
    """Run one soak (see the module docstring) and verify it. Blocks until done."""
    config.validate()
    # Once, here: workers then only check the schema (and the killer never meets
    # a migration).
    upgrade(config.database_url)

    context = multiprocessing.get_context("spawn")
    messages: multiprocessing.queues.Queue[tuple[str, int, Any]] = context.Queue()
    go = context.Event()
    workers = [
        context.Process(
            target=_worker_main,
            args=(config, n, budget, messages, go),
            name=f"soak-worker-{n}",
            daemon=True,
        )
        for n, budget in enumerate(config.turn_budgets())
    ]
    killer = Killer(config.admin_url, config.database_name, config.kill_every_s, config.seed)
    for worker in workers:
        worker.start()
    try:
        _collect(messages, workers, "ready", 300)
        go.set()
        started = time.monotonic()
        if config.kill_every_s > 0:
            killer.start()
        last_said = [started]

        def tick() -> None:
            now = time.monotonic()
            if progress is not None and now - last_said[0] >= 10:
                last_said[0] = now
                progress(
                    f"{now - started:5.0f} s: {killer.rounds} kill rounds, "
                    f"{killer.killed} connections killed"
                )

        limit = (config.duration_s if config.turns is None else 24 * 3600) + 600
        logs = [log for _, log in sorted(_collect(messages, workers, "done", limit, tick).items())]
    finally:
        killer.stop()
        go.set()
        for worker in workers:
            worker.join(60)
            if worker.is_alive():  # only the processes this run started
                worker.terminate()
                worker.join(10)

    stored = read_stored(config)
    verdict = verify(config, logs, stored)
    retries: Counter[str] = Counter()
    other: Counter[str] = Counter()
    anomalies: Counter[str] = Counter()
    for log in logs:
        retries.update(log.retries)
        other.update(log.other_log_records)
        anomalies.update(log.anomalies)
    unknown_appends = [u for log in logs for u in log.unknown_appends]
    unknown_pops = [p for log in logs for p in log.unknown_pops]
    settled_popped = sum(p.resolution == "popped" for p in unknown_pops)
    popped_in_all = settled_popped + verdict.unknown_pops_popped
    return SoakReport(
        mode="shared" if config.shared else "partitioned",
        processes=config.processes,
        conversations=config.conversations,
        tasks_per_process=config.tasks_per_process(0),
        elapsed_s=max(log.elapsed_s for log in logs),
        turns=sum(log.turns for log in logs),
        turns_per_process=[log.turns for log in logs],
        appends=sum(log.appends for log in logs),
        pops=sum(log.pops for log in logs),
        empty_pops=sum(log.empty_pops for log in logs),
        kill_rounds=killer.rounds,
        connections_killed=killer.killed,
        killer_errors=dict(killer.errors),
        retries_connection_lost=retries["connection lost"],
        retries_could_not_connect=retries["could not connect"],
        replaced_at_checkout=sum(log.replaced_at_checkout for log in logs),
        lost_mid_call=sum(log.lost_mid_call for log in logs),
        read_failures=sum(log.read_failures for log in logs),
        unknown_appends=len(unknown_appends),
        unknown_appends_stored=verdict.unknown_appends_stored,
        unknown_appends_not_stored=len(unknown_appends) - verdict.unknown_appends_stored,
        unknown_pops=len(unknown_pops),
        unknown_pops_popped=popped_in_all,
        unknown_pops_not_popped=len(unknown_pops) - popped_in_all,
        stored_items=sum(len(history) for history in stored.values()),
        min_writers_per_conversation=verdict.min_writers,
        writer_switches=verdict.writer_switches,
        losses=verdict.losses,
        duplicates=verdict.duplicates,
        reorders=verdict.reorders,
        split_turns=verdict.split_turns,
        partial_turns=verdict.partial_turns,
        phantoms=verdict.phantoms,
        history_mismatches=verdict.history_mismatches,
        in_flight_anomalies=sum(anomalies.values()),
        other_log_records=dict(other),
        examples=[*(e for log in logs for e in log.examples)][:10] + verdict.examples,
    )
