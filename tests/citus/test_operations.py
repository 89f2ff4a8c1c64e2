"""Operator commands on a Citus cluster: distribute and status, doctor, the data commands.

Every command runs through the real ``agents-sessions`` CLI (click's runner) against
the coordinator.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from agents_sessions import PostgreSQLSession, UsageEntry, dispose_all, get_store
from agents_sessions.cli.main import cli
from agents_sessions.db.migrate import upgrade
from agents_sessions.errors import ExitCode
from agents_sessions.ops.citus import DISTRIBUTION_COLUMNS
from tests.support.pgcluster import CitusCluster


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def run(url: str, *args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, ["--database-url", url, *args], input=input)


def ok(url: str, *args: str) -> Any:
    """Run a ``--json`` command that must succeed; return its document."""
    result = run(url, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def fill(url: str) -> None:
    async def write() -> None:
        for owner, count in (("alice", 3), ("bob", 2)):
            for n in range(count):
                session = PostgreSQLSession(f"{owner}-{n}", database_url=url, user_id=owner)
                await session.add_items([user(f"{owner} {n} a"), user(f"{owner} {n} b")])

    asyncio.run(write())
    with get_store(url).transaction() as repos:
        repos.usage.record("alice-0", [UsageEntry(model="m", prompt_tokens=5)])


def citus_database(citus: CitusCluster, *, migrated: bool) -> str:
    """A database with the Citus extension and the workers, not distributed."""
    name = f"citus_ops_{uuid.uuid4().hex[:8]}"
    url = make_url(citus.create_database(name)).set(drivername="postgresql+psycopg2")
    rendered = url.render_as_string(hide_password=False)
    if migrated:
        upgrade(rendered)
    return rendered


def test_distribute_checks_first_then_distributes_once(citus: CitusCluster, tmp_path: Path) -> None:
    url = citus_database(citus, migrated=True)
    fill(url)  # rows written before distribution are copied into the shards

    plan = ok(url, "citus", "distribute", "--dry-run", "--shard-count", "6")
    assert [step["action"] for step in plan["steps"]] == ["distribute"] * len(DISTRIBUTION_COLUMNS)
    assert len(plan["workers"]) == 2
    assert ok(url, "citus", "status")["tables"][0]["distributed_by"] is None

    done = ok(url, "citus", "distribute", "--shard-count", "6")
    assert done["notes"]  # the subquery policies, dropped
    again = ok(url, "citus", "distribute", "--shard-count", "6")
    assert {step["action"] for step in again["steps"]} == {"already distributed"}
    assert len(again["steps"]) == len(DISTRIBUTION_COLUMNS)

    status = ok(url, "citus", "status")
    tables = {t["table"]: t for t in status["tables"]}
    assert tables["messages"]["distributed_by"] == "conversation_id"
    assert all(t["shards"] == 6 for t in tables.values())
    workers = [n for n in status["nodes"] if n["role"] == "worker"]
    assert len(workers) == 2 and sum(n["shards"] for n in workers) == 6 * len(DISTRIBUTION_COLUMNS)
    assert all(n["shards"] > 0 for n in workers)

    doctor = ok(url, "doctor")
    citus_check = next(c for c in doctor["checks"] if c["name"] == "citus")
    assert citus_check["status"] == "ok" and "all tables distributed" in citus_check["detail"]

    # Nothing was lost on the way into the shards.
    session = PostgreSQLSession("alice-1", database_url=url)
    assert asyncio.run(session.get_items()) == [user("alice 1 a"), user("alice 1 b")]
    human = run(url, "citus", "status")
    assert human.exit_code == 0 and "conversation_id" in human.output


def test_distribute_refuses_clearly_where_it_cannot_work(
    citus: CitusCluster, citus_url: str, postgres_server: Any
) -> None:
    # A plain database on the same server: no Citus extension.
    plain = make_url(citus.coordinator.create_database()).set(drivername="postgresql+psycopg2")
    plain_url = plain.render_as_string(hide_password=False)
    upgrade(plain_url)
    refused = run(plain_url, "citus", "distribute")
    assert refused.exit_code == ExitCode.PROBLEM
    assert "Citus is not available" in refused.output
    assert "citus" not in {c["name"] for c in ok(plain_url, "doctor")["checks"]}

    # Behind head: the keys do not include the distribution column yet.
    old = citus_database(citus, migrated=False)
    from alembic import command

    from agents_sessions.db.migrate import alembic_config

    command.upgrade(alembic_config(database_url=old), "0003")
    behind = run(old, "citus", "distribute")
    assert behind.exit_code == ExitCode.SCHEMA, behind.output

    # Row-level security enabled: its policies cannot be distributed.
    fresh = citus_database(citus, migrated=True)
    assert run(fresh, "rls", "enable", "--yes").exit_code == 0
    with_rls = run(fresh, "citus", "distribute")
    assert with_rls.exit_code == ExitCode.PROBLEM
    assert "row-level security" in with_rls.output

    # And on a distributed store, row-level security cannot be switched on.
    refused_rls = run(citus_url, "rls", "enable", "--yes")
    assert refused_rls.exit_code == ExitCode.PROBLEM
    assert "cannot be enforced on a Citus-distributed store" in refused_rls.output


def test_listings_stats_export_import_erase_and_prune_work_on_the_cluster(
    citus: CitusCluster, citus_server: Any, citus_url: str, tmp_path: Path
) -> None:
    fill(citus_url)

    stats = ok(citus_url, "stats")
    assert stats["total_conversations"] == 5
    listed = ok(citus_url, "conversations", "list", "--limit", "2")
    assert len(listed["conversations"]) == 2 and listed["next_cursor"]
    assert len(ok(citus_url, "conversations", "list", "--user", "bob")["conversations"]) == 2
    shown = ok(citus_url, "conversations", "show", "alice-0")
    assert len(shown["items"]) == 2 and shown["usage"]["prompt_tokens"] == 5

    export = tmp_path / "all.jsonl"
    assert run(citus_url, "export", "-o", str(export)).exit_code == 0
    target = citus_server.create_database("citus_import")
    imported = ok(target, "import", str(export))
    assert imported["messages_imported"] == 10
    again = ok(target, "import", str(export))  # idempotent
    assert again["messages_imported"] == 0
    session = PostgreSQLSession("bob-1", database_url=target)
    assert asyncio.run(session.get_items()) == [user("bob 1 a"), user("bob 1 b")]

    erased = ok(citus_url, "erase", "--user", "alice", "--yes")
    assert (erased["conversations"], erased["messages"], erased["usage_rows"]) == (3, 6, 1)
    assert ok(citus_url, "stats")["total_conversations"] == 2

    engine = create_engine(citus_url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            connection.execute(
                text(
                    "UPDATE conversations SET updated_at = now() - interval '3 days' "
                    "WHERE id = 'bob-0'"
                )
            )
    finally:
        engine.dispose()
    pruned = ok(citus_url, "prune", "--older-than", "2d", "--batch-size", "1", "--yes")
    assert (pruned["conversations"], pruned["messages"]) == (1, 2)
    assert [c["id"] for c in ok(citus_url, "conversations", "list")["conversations"]] == ["bob-1"]

    # Append keys past their retention go across the shards, in batches.
    engine = create_engine(citus_url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            aged = connection.execute(
                text(
                    "UPDATE append_keys SET created_at = now() - interval '2 days' "
                    "WHERE conversation_id = 'bob-1'"
                )
            ).rowcount
    finally:
        engine.dispose()
    assert aged >= 1
    keys = ok(citus_url, "prune", "--append-keys", "--batch-size", "1")
    assert (keys["keys"], keys["batches"]) == (aged, aged)
    session = PostgreSQLSession("bob-1", database_url=citus_url)
    assert asyncio.run(session.get_items()) == [user("bob 1 a"), user("bob 1 b")]


def test_backup_refuses_a_distributed_store_and_a_plain_backup_restores_into_a_cluster(
    citus: CitusCluster, citus_url: str, tmp_path: Path
) -> None:
    refused = run(citus_url, "backup", "--dir", str(tmp_path))
    assert refused.exit_code == ExitCode.PROBLEM
    assert "holds none of its rows" in refused.output
    assert list(tmp_path.iterdir()) == []

    # Moving a single server's store onto a cluster: back it up, restore it into
    # the coordinator, distribute.
    plain = make_url(citus.coordinator.create_database()).set(drivername="postgresql+psycopg2")
    plain_url = plain.render_as_string(hide_password=False)
    fill(plain_url)
    backup = ok(plain_url, "backup", "--dir", str(tmp_path))
    target = citus_database(citus, migrated=False)
    assert run(target, "restore", backup["file"], "--json").exit_code == 0
    dispose_all()
    ok(target, "citus", "distribute", "--shard-count", "4")
    assert ok(target, "stats")["total_conversations"] == 5
    session = PostgreSQLSession("alice-2", database_url=target)
    assert asyncio.run(session.get_items()) == [user("alice 2 a"), user("alice 2 b")]


def test_search_and_paused_runs_work_on_the_cluster(citus_url: str) -> None:
    from tests.integration.test_paused_runs import paused_state

    fill(citus_url)
    session = PostgreSQLSession("carol-0", database_url=citus_url, user_id="carol")
    asyncio.run(session.add_items([user("the quarterly budget for Lisbon")]))
    asyncio.run(session.save_run_state(asyncio.run(paused_state(session))[1]))

    # search fans out: every shard's text index answers, the coordinator merges.
    hits = ok(citus_url, "search", "Lisbon budget")["hits"]
    assert [hit["conversation_id"] for hit in hits] == ["carol-0"]
    assert len(ok(citus_url, "search", "alice")["hits"]) == 6
    assert ok(citus_url, "search", "alice", "--user", "bob")["hits"] == []

    # Paused runs: listed across shards; shown and discarded on the conversation's shard.
    [listed] = ok(citus_url, "runs", "list")["runs"]
    assert listed["conversation_id"] == "carol-0" and listed["agent"] == "launcher"
    assert ok(citus_url, "runs", "show", "carol-0")["conversation_id"] == "carol-0"
    assert run(citus_url, "runs", "discard", "carol-0", "--yes").exit_code == 0
    assert ok(citus_url, "runs", "list")["runs"] == []
