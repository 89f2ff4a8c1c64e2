"""The point-in-time recovery drill: undo an ``agents-sessions erase`` from the WAL archive.

On a throwaway server that archives its WAL (``archive_mode = on``, an
``archive_command`` copying into a directory of its own):

1. a base backup (``pg_basebackup -X stream --checkpoint=fast``);
2. agent traffic: real ``Runner`` runs (offline ``ScriptedModel``) with tool calls
   and usage, through ``PostgreSQLSession``, for three users;
3. the moment: every conversation's history and usage is read, and the server's
   clock recorded;
4. the mistake: the real CLI (``python -m agents_sessions erase --user bob``), which
   creates a named restore point first and prints it;
5. more traffic: a later turn, a new conversation; then ``pg_switch_wal()`` and a
   wait for the archiver, so the archive holds everything;
6. recovery, twice, each a new server from the base backup and the archive: to the
   CLI's restore point (``recovery_target_name``) and to the recorded moment
   (``recovery_target_time``). Each must hold exactly the conversations of the
   moment -- the erased one back, item for item, the later writes absent -- and
   take new writes once promoted.

The drill runs twice: with PostgreSQL's own tools (``pg_basebackup``, a ``cp``
archive and ``restore_command``) and with pgBackRest (``archive-push``, ``backup``,
``restore --type=name|time``), the tool the deployment guide recommends. The
commands are the ones docs/03_deployment_guide.md shows. Timings are printed
(``pytest -s``), never asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from agents import Agent, Runner, function_tool
from agents.testing import ModelStep, ScriptedModel, assistant_message, function_call
from agents.usage import Usage

from agents_sessions import PostgreSQLSession, dispose_all, get_store
from agents_sessions.ops.recovery import RESTORE_POINT_PREFIX
from tests.support.pgcluster import Cluster, PgBackRest

pytestmark = pytest.mark.postgres_only


@function_tool
def order_status(order: str) -> str:
    """The shipping status of an order."""
    return f"order {order} shipped yesterday"


async def agent_turn(session: PostgreSQLSession, question: str, answer: str) -> None:
    """One Runner turn that calls a tool, then answers; its usage is recorded."""
    model = ScriptedModel(
        [
            ModelStep(
                output=[
                    function_call(
                        "order_status", {"order": question[-4:]}, call_id=f"call-{question[-4:]}"
                    )
                ],
                usage=Usage(requests=1, input_tokens=40, output_tokens=8, total_tokens=48),
            ),
            ModelStep(
                output=[assistant_message(answer)],
                usage=Usage(requests=1, input_tokens=60, output_tokens=12, total_tokens=72),
            ),
        ]
    )
    agent = Agent(name="support", model=model, tools=[order_status])
    result = await Runner.run(agent, question, session=session)
    assert result.final_output == answer
    await session.record_usage(result, model="gpt-drill")


@dataclass(frozen=True)
class Conversation:
    """What a conversation holds: owner, every item in order, usage totals."""

    user_id: str | None
    items: list[dict[str, Any]]
    usage: tuple[int, int, int, int]


async def everything(url: str) -> dict[str, Conversation]:
    """Every conversation of the database at ``url``, read through the package."""
    store = get_store(url)
    with store.read() as repositories:
        page = repositories.conversations.list_all(limit=1000)
        assert page.next_cursor is None
        owners = {record.id: record.user_id for record in page.conversations}
        usage = {}
        for conversation_id in owners:
            totals = repositories.usage.totals_for_conversation(conversation_id)
            usage[conversation_id] = (
                totals.requests,
                totals.prompt_tokens,
                totals.completion_tokens,
                totals.total_tokens,
            )
    result = {}
    for conversation_id, owner in owners.items():
        items = await PostgreSQLSession(conversation_id, database_url=url).get_items()
        result[conversation_id] = Conversation(owner, items, usage[conversation_id])
    return result


def agents_sessions_cli(url: str, *arguments: str) -> dict[str, Any]:
    """Run ``python -m agents_sessions --database-url URL ARGUMENTS --json``; its JSON."""
    environment = {
        name: value
        for name, value in os.environ.items()
        if name != "DATABASE_URL" and not name.startswith("AGENTS_SESSIONS_")
    }
    completed = subprocess.run(
        [sys.executable, "-m", "agents_sessions", "--database-url", url, *arguments, "--json"],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    document: dict[str, Any] = json.loads(completed.stdout)
    document["stderr"] = completed.stderr
    return document


class Stopwatch:
    """Wall-clock time of each step, printed at the end (never asserted)."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, float]] = []

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        yield
        self.steps.append((name, time.monotonic() - started))

    def report(self) -> str:
        width = max(len(name) for name, _ in self.steps)
        lines = [f"  {name.ljust(width)}  {seconds:6.2f} s" for name, seconds in self.steps]
        total = sum(seconds for _, seconds in self.steps)
        return "\n".join([*lines, f"  {'total'.ljust(width)}  {total:6.2f} s"])


class BaseBackups:
    """Backups and recovery with PostgreSQL's own tools: ``pg_basebackup``, a ``cp``
    archive_command and restore_command (tests/support/pgcluster.py)."""

    tool = "pg_basebackup"

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.base_backup: Path | None = None

    def back_up(self) -> None:
        self.base_backup = self.cluster.base_backup()

    def recover(self, name: str, *, target_name: str | None, target_time: str | None) -> Cluster:
        assert self.base_backup is not None
        return self.cluster.recover(
            self.base_backup, name=name, target_name=target_name, target_time=target_time
        )


class PgBackRestBackups:
    """Backups and recovery with pgBackRest (``archive-push``, ``backup``, ``restore``)."""

    tool = "pgbackrest"

    def __init__(self, backrest: PgBackRest) -> None:
        self.backrest = backrest

    def back_up(self) -> None:
        self.backrest.run("backup", "--type=full")
        # restore --type=time picks the newest backup that stopped strictly before the
        # target, comparing whole seconds: a target in the second the backup ended
        # finds none ("unable to find backup set with stop time less than"). No
        # operator targets that second; the drill, being fast, could.
        time.sleep(1.0 - time.time() % 1.0 + 0.01)

    def recover(self, name: str, *, target_name: str | None, target_time: str | None) -> Cluster:
        return self.backrest.recover(name=name, target_name=target_name, target_time=target_time)


async def test_recovery_to_the_restore_point_of_an_erase_brings_back_exactly_that_moment(
    archiving_cluster: Cluster,
) -> None:
    await drill(archiving_cluster, BaseBackups(archiving_cluster))


async def test_the_same_recovery_with_pgbackrest(
    pgbackrest_cluster: tuple[Cluster, PgBackRest],
) -> None:
    cluster, backrest = pgbackrest_cluster
    await drill(cluster, PgBackRestBackups(backrest))


async def drill(cluster: Cluster, backups: BaseBackups | PgBackRestBackups) -> None:
    """The drill of the module docstring; prints what it checked and how long it took."""
    clock = Stopwatch()
    with clock.step("create and migrate the database"):
        url = cluster.create_database("drill")
        database = url.rsplit("/", 1)[1]
        get_store(url).ensure_schema()
    with clock.step(f"base backup ({backups.tool})"):
        backups.back_up()

    with clock.step("agent traffic: 3 users, 4 conversations, 6 runs"):
        alice_trip = PostgreSQLSession("alice-trip", database_url=url, user_id="alice")
        alice_refund = PostgreSQLSession("alice-refund", database_url=url, user_id="alice")
        bob = PostgreSQLSession("bob-support", database_url=url, user_id="bob")
        carol = PostgreSQLSession("carol-order", database_url=url, user_id="carol")
        await agent_turn(alice_trip, "Where is order 1001", "Order 1001 shipped yesterday.")
        await agent_turn(alice_trip, "And order 1002", "Order 1002 shipped too.")
        await agent_turn(alice_refund, "Refund order 2001", "Refund for 2001 started.")
        await agent_turn(bob, "Status of order 3001", "Order 3001 is on its way.")
        await agent_turn(bob, "Status of order 3002", "Order 3002 is on its way too.")
        await agent_turn(carol, "Track order 4001", "Order 4001 arrives Monday.")

    with clock.step("the moment: read every history, record the time"):
        moment = await everything(url)
        (recorded_time,) = cluster.execute("SELECT clock_timestamp()::text")[0]
    assert sorted(moment) == ["alice-refund", "alice-trip", "bob-support", "carol-order"]
    assert len(moment["bob-support"].items) == 8  # 2 runs x (input, call, output, answer)
    assert moment["bob-support"].usage == (4, 200, 40, 240)

    with clock.step("the mistake: agents-sessions erase --user bob (CLI)"):
        erased = agents_sessions_cli(url, "erase", "--user", "bob", "--yes")
    assert (erased["conversations"], erased["messages"]) == (1, 8)
    point = erased["restore_point"]
    assert point["created"] is True, point
    assert point["name"].startswith(f"{RESTORE_POINT_PREFIX}-erase-")
    assert point["note"] is None  # archiving is on
    assert point["name"] in erased["stderr"]  # printed for the operator too

    with clock.step("more traffic, then pg_switch_wal() and wait for the archiver"):
        await agent_turn(alice_trip, "Finally order 1003", "Order 1003 shipped today.")
        dave = PostgreSQLSession("dave-new", database_url=url, user_id="dave")
        await agent_turn(dave, "Where is order 5001", "Order 5001 is packed.")
        cluster.switch_wal()
    after = await everything(url)
    assert "bob-support" not in after and "dave-new" in after
    assert len(after["alice-trip"].items) == len(moment["alice-trip"].items) + 4

    targets = {
        "recovery_target_name": (point["name"], None),
        "recovery_target_time": (None, recorded_time),
    }
    for setting, (target_name, target_time) in targets.items():
        with clock.step(f"recover a new server to {setting}"):
            recovered = backups.recover(
                setting.rsplit("_", 1)[1], target_name=target_name, target_time=target_time
            )
        recovered_url = recovered.url(database)
        with clock.step(f"compare every conversation ({setting})"):
            restored = await everything(recovered_url)
        # Exactly the moment: the erased conversation back, item for item, with its
        # usage; alice's later turn and dave's conversation absent.
        assert restored == moment, setting
        with clock.step(f"the promoted server takes writes ({setting})"):
            bob_again = PostgreSQLSession("bob-support", database_url=recovered_url)
            await bob_again.add_items([{"role": "user", "content": "thanks for restoring me"}])
            assert len(await bob_again.get_items()) == len(moment["bob-support"].items) + 1
        dispose_all()
        recovered.cleanup()

    (archived,) = cluster.execute("SELECT archived_count FROM pg_stat_archiver")[0]
    print(
        f"\npoint-in-time recovery drill ({backups.tool}): restore point {point['name']} at WAL "
        f"{point['lsn']}, recorded time {recorded_time}; {archived} WAL files "
        f"archived; checked {len(moment)} conversations, "
        f"{sum(len(c.items) for c in moment.values())} items and their usage, twice\n"
        + clock.report()
    )
