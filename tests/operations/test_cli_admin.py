"""The operator commands: ``migrate``, ``stats``, ``conversations`` and ``doctor``.

Every command runs through click's ``CliRunner`` against real databases (a fresh
SQLite file or PostgreSQL database per test), and what it prints is checked against
what the test wrote through the package. The console script itself is run as a
subprocess too, once to prove the entry point, once to show that ``migrate upgrade``
waits on the same advisory lock as every other migration.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Connection, create_engine, inspect, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from agents_sessions import Settings, UsageEntry, dispose_all, get_store, upgrade
from agents_sessions.cli import cli
from agents_sessions.db.engine import mask_url, parse_database_url
from agents_sessions.db.migrate import current_revision, head_revision, history
from agents_sessions.db.models import conversations_table
from agents_sessions.errors import ExitCode
from agents_sessions.ops.analytics import collect_statistics, run_seed_queries
from tests.conftest import PostgresServer

FreshUrl = Callable[[], str]
SCRIPT = Path(sys.executable).with_name("agents-sessions")
SUBPROCESS_TIMEOUT = 120


# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _close_pools() -> Iterator[None]:
    # Each test uses fresh databases; do not leave their pooled connections open on
    # a server other test runs share.
    yield
    dispose_all()


def run(url: str | None, *args: str, input: str | None = None) -> Result:
    """``agents-sessions [--database-url URL] ARGS...`` in this process."""
    argv = (["--database-url", url] if url is not None else []) + list(args)
    result = CliRunner().invoke(cli, argv, input=input, prog_name="agents-sessions")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback is a bug, whatever the input
    return result


def run_json(url: str | None, *args: str) -> Any:
    result = run(url, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@contextmanager
def connect(url: str) -> Iterator[Connection]:
    """A plain autocommit connection (no package engine state)."""
    engine = create_engine(
        parse_database_url(url).url, poolclass=NullPool, isolation_level="AUTOCOMMIT"
    )
    try:
        with engine.connect() as connection:
            yield connection
    finally:
        engine.dispose()


def revision_of(url: str) -> str | None:
    with connect(url) as connection:
        return current_revision(connection)


@pytest.fixture
def migrated_url(fresh_database_url: FreshUrl) -> str:
    """An empty database of the test's backend, upgraded to head."""
    url = fresh_database_url()
    upgrade(url)
    return url


def user_message(text_: str) -> dict[str, str]:
    return {"role": "user", "content": text_}


# --------------------------------------------------------------------------- help


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["migrate"],
        ["migrate", "upgrade"],
        ["migrate", "downgrade"],
        ["migrate", "current"],
        ["migrate", "history"],
        ["migrate", "check"],
        ["stats"],
        ["conversations"],
        ["conversations", "list"],
        ["conversations", "show"],
        ["conversations", "delete"],
        ["doctor"],
    ],
    ids=lambda command: " ".join(command) or "agents-sessions",
)
def test_every_command_has_help_that_exits_0(command: list[str]) -> None:
    result = run(None, *command, "--help")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"Usage: agents-sessions {' '.join(command)}".rstrip())


def test_the_console_script_is_installed_and_runs(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'script.sqlite3'}"
    assert SCRIPT.is_file(), f"{SCRIPT} is missing: pip install -e ."

    def script(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SCRIPT), "--database-url", url, *args],
            capture_output=True,
            text=True,
            timeout=SUBPROCESS_TIMEOUT,
        )

    behind = script("migrate", "check")
    assert behind.returncode == ExitCode.PROBLEM, behind.stderr
    assert "agents-sessions migrate upgrade" in behind.stderr
    assert script("migrate", "upgrade").returncode == 0
    current = script("migrate", "current", "--json")
    assert current.returncode == 0, current.stderr
    assert json.loads(current.stdout)["current"] == head_revision()
    assert script("migrate", "check").returncode == 0


# --------------------------------------------------------------------------- migrate


def test_migrate_upgrade_current_history_and_check(fresh_database_url: FreshUrl) -> None:
    url = fresh_database_url()
    head = head_revision()

    empty = run_json(url, "migrate", "current")
    assert (empty["current"], empty["head"], empty["state"]) == (None, head, "empty")
    check = run(url, "migrate", "check")
    assert check.exit_code == ExitCode.PROBLEM
    assert "agents-sessions migrate upgrade" in check.stderr
    assert revision_of(url) is None  # looking changed nothing

    upgraded = run(url, "migrate", "upgrade")
    assert upgraded.exit_code == 0, upgraded.output
    assert revision_of(url) == head
    assert f"to {head}" in upgraded.stdout
    again = run(url, "migrate", "upgrade")
    assert again.exit_code == 0 and "already at" in again.stdout

    status = run_json(url, "migrate", "current")
    assert (status["current"], status["state"], status["advice"]) == (head, "at_head", None)
    checked = run(url, "migrate", "check")
    assert checked.exit_code == 0, checked.output
    assert run_json(url, "migrate", "check")["state"] == "at_head"

    revisions = run_json(url, "migrate", "history")
    assert [entry["revision"] for entry in revisions] == [info.revision for info in history()]
    assert revisions[0]["revision"] == head and revisions[0]["is_head"]
    assert [entry["is_head"] for entry in revisions[1:]] == [False] * (len(revisions) - 1)
    assert revisions[-1]["down_revisions"] == []
    marked = run_json(url, "migrate", "history", "--indicate-current")
    assert [entry["revision"] for entry in marked if entry["is_current"]] == [head]
    table = run(url, "migrate", "history", "-i")
    assert table.exit_code == 0
    assert all(entry["revision"] in table.stdout for entry in revisions)


def test_downgrade_leaves_the_database_behind_head_until_upgraded(migrated_url: str) -> None:
    head = head_revision()
    previous = history()[1].revision if len(history()) > 1 else None

    declined = run(migrated_url, "migrate", "downgrade", "-1", input="n\n")
    assert declined.exit_code == ExitCode.PROBLEM
    assert revision_of(migrated_url) == head  # nothing changed

    downgraded = run(migrated_url, "migrate", "downgrade", "-1", "--yes")
    assert downgraded.exit_code == 0, downgraded.output
    assert revision_of(migrated_url) == previous

    check = run(migrated_url, "migrate", "check")
    assert check.exit_code == ExitCode.PROBLEM
    assert "agents-sessions migrate upgrade" in check.stderr
    assert run_json(migrated_url, "migrate", "current")["state"] == (
        "empty" if previous is None else "behind"
    )
    doctor = run(migrated_url, "doctor", "--json")
    assert doctor.exit_code == ExitCode.PROBLEM
    schema = _check(json.loads(doctor.stdout), "schema")
    assert schema["status"] == "fail" and "migrate upgrade" in schema["advice"]

    assert run(migrated_url, "migrate", "upgrade").exit_code == 0
    assert run(migrated_url, "migrate", "check").exit_code == 0

    to_base = run(migrated_url, "migrate", "downgrade", "base", "--yes")
    assert to_base.exit_code == 0, to_base.output
    with connect(migrated_url) as connection:
        assert not {"conversations", "messages", "usage_logs"} & set(
            inspect(connection).get_table_names()
        )


def test_unknown_revisions_are_usage_errors_and_change_nothing(migrated_url: str) -> None:
    for command in (["upgrade", "no-such-rev"], ["downgrade", "no-such-rev", "--yes"]):
        result = run(migrated_url, "migrate", *command)
        assert result.exit_code == ExitCode.USAGE, result.output
        assert "no-such-rev" in result.stderr
        assert revision_of(migrated_url) == head_revision()


def test_a_database_ahead_of_the_package_is_reported_not_touched(migrated_url: str) -> None:
    with connect(migrated_url) as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'ffffffff9999'"))

    status = run_json(migrated_url, "migrate", "current")
    assert (status["current"], status["state"]) == ("ffffffff9999", "ahead")
    check = run(migrated_url, "migrate", "check")
    assert check.exit_code == ExitCode.PROBLEM
    assert "upgrade the agents_sessions package" in check.stderr
    refused = run(migrated_url, "migrate", "upgrade")
    assert refused.exit_code == ExitCode.SCHEMA
    assert revision_of(migrated_url) == "ffffffff9999"


def test_migrate_upgrade_waits_for_the_migration_advisory_lock(
    postgres_server: PostgresServer,
) -> None:
    """The console script takes the same lock as `alembic upgrade head` and app servers."""
    url = postgres_server.create_database()
    lock_id = Settings().migration_lock_id
    with connect(url) as holder, connect(url) as observer:
        holder.execute(text("SELECT pg_advisory_lock(:id)"), {"id": lock_id})
        process = subprocess.Popen(
            [str(SCRIPT), "--database-url", url, "migrate", "upgrade"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            waiting = 0
            deadline = time.monotonic() + SUBPROCESS_TIMEOUT
            while waiting == 0 and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
                waiting = observer.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                        "current_database() AND wait_event_type = 'Lock' "
                        "AND wait_event = 'advisory'"
                    )
                ).scalar_one()
            assert waiting == 1, "the upgrade never waited on the advisory lock"
            assert process.poll() is None
            assert current_revision(observer) is None  # it migrated nothing meanwhile
        finally:
            holder.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": lock_id})
            stdout, stderr = process.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert process.returncode == 0, stderr
    assert f"to {head_revision()}" in stdout
    assert revision_of(url) == head_revision()


# --------------------------------------------------------------------------- stats

# Conversations to write: (user, messages, hours since last update).
CONVERSATIONS = [
    ("alice", 4, 0),
    ("alice", 3, 30),
    ("bob", 5, 0),
    ("carol", 1, 24 * 10),
    (None, 2, 2),
    ("dave", 0, 24 * 3),  # no messages: counted as a conversation, not in top users
]
USAGE = [("gpt-4.1", 100, 20), ("gpt-4.1", 11, 7), ("o3", 40, 60), ("gpt-4.1-mini", 3, 1)]


def write_statistics_data(url: str) -> list[str]:
    store = get_store(url)
    ids = [f"stats-{index}" for index in range(len(CONVERSATIONS))]
    now = datetime.now(timezone.utc)
    with store.transaction() as repos:
        for conversation_id, (user_id, count, _hours) in zip(ids, CONVERSATIONS, strict=True):
            repos.conversations.upsert(conversation_id, user_id=user_id)
            repos.messages.append(conversation_id, [user_message(f"m{n}") for n in range(count)])
        repos.usage.record(
            ids[0],
            [
                UsageEntry(model=model, prompt_tokens=p, completion_tokens=c)
                for model, p, c in USAGE
            ],
        )
    with store.transaction() as repos:
        for conversation_id, (_user, _count, hours) in zip(ids, CONVERSATIONS, strict=True):
            repos.connection.execute(
                update(conversations_table)
                .where(conversations_table.c.id == conversation_id)
                .values(updated_at=now - timedelta(hours=hours, minutes=1 if hours else 0))
            )
    return ids


def expected_statistics(window_hours: int) -> dict[str, Any]:
    messages_by_user: dict[str | None, int] = {}
    for user_id, count, _hours in CONVERSATIONS:
        if count:
            messages_by_user[user_id] = messages_by_user.get(user_id, 0) + count
    tokens: dict[str, list[int]] = {}
    for model, prompt, completion in USAGE:
        sums = tokens.setdefault(model, [0, 0])
        sums[0] += prompt
        sums[1] += completion
    return {
        "total_conversations": len(CONVERSATIONS),
        "active_conversations": sum(1 for *_, hours in CONVERSATIONS if hours < window_hours),
        "active_window_seconds": window_hours * 3600,
        "top_users_by_message_count": [
            {"user_id": user_id, "message_count": count}
            for user_id, count in sorted(messages_by_user.items(), key=lambda kv: -kv[1])
        ],
        "token_usage_by_model": [
            {"model": model, "prompt_tokens": p, "completion_tokens": c}
            for model, (p, c) in sorted(tokens.items())
        ],
    }


def test_stats_reports_exactly_what_was_written(migrated_url: str, backend: str) -> None:
    write_statistics_data(migrated_url)
    expected = expected_statistics(24)
    # The sums per user differ, so the order of top users is determined.
    counts = [entry["message_count"] for entry in expected["top_users_by_message_count"]]
    assert len(set(counts)) == len(counts)

    for arguments, hours in (([], 24), (["--since", "7d"], 24 * 7), (["--since", "60m"], 1)):
        document = run_json(migrated_url, "stats", *arguments)
        assert document.pop("database") == mask_url(migrated_url)
        assert document == expected_statistics(hours), arguments
    # The windows really differ on this data.
    assert len({expected_statistics(hours)["active_conversations"] for hours in (1, 24, 168)}) == 3

    top_two = run_json(migrated_url, "stats", "--top", "2")["top_users_by_message_count"]
    assert top_two == expected_statistics(24)["top_users_by_message_count"][:2]

    table = run(migrated_url, "stats")
    assert table.exit_code == 0, table.output
    for pattern in (
        rf"^conversations +{expected['total_conversations']}$",
        rf"^active in the last 24h +{expected['active_conversations']}$",
        r"^alice +7$",
        r"^\(none\) +2$",
        r"^o3 +40 +60$",
        r"^gpt-4\.1 +111 +27$",
    ):
        assert re.search(pattern, table.stdout, re.MULTILINE), (pattern, table.stdout)

    if backend == "postgresql":
        # On PostgreSQL the numbers come from the seed's own SQL.
        with connect(migrated_url) as connection:
            seed = run_seed_queries(connection)
            statistics = collect_statistics(connection)
        assert seed["total_conversations"][0]["count"] == statistics.total_conversations
        assert seed["active_conversations_24h"][0]["count"] == statistics.active_conversations
        assert [(r["user_id"], r["message_count"]) for r in seed["top_users_by_message_count"]] == [
            (u.user_id, u.message_count) for u in statistics.top_users
        ]


@pytest.mark.parametrize("since", ["0d", "7x", "-1h", "soon"])
def test_stats_rejects_a_bad_window_naming_the_option(migrated_url: str, since: str) -> None:
    result = run(migrated_url, "stats", "--since", since)
    assert result.exit_code == ExitCode.USAGE
    assert "--since" in result.stderr


def test_stats_on_an_empty_database_reports_zeros(migrated_url: str) -> None:
    document = run_json(migrated_url, "stats")
    assert document["total_conversations"] == 0
    assert document["active_conversations"] == 0
    assert document["top_users_by_message_count"] == []
    assert document["token_usage_by_model"] == []


# --------------------------------------------------------------------------- conversations


def test_keyset_pagination_visits_every_conversation_exactly_once(migrated_url: str) -> None:
    store = get_store(migrated_url)
    written: dict[str, str | None] = {}
    # Many conversations created in one transaction share created_at (PostgreSQL's
    # now() is the transaction's start): the id must break those ties.
    with store.transaction() as repos:
        for index in range(17):
            conversation_id = f"bulk-{index:02d}"
            written[conversation_id] = "alice" if index % 3 == 0 else "bob"
            repos.conversations.upsert(conversation_id, user_id=written[conversation_id])
    for index in range(6):
        with store.transaction() as repos:
            conversation_id = f"single-{index}"
            written[conversation_id] = None if index % 2 else "alice"
            repos.conversations.upsert(conversation_id, user_id=written[conversation_id])
            repos.messages.append(conversation_id, [user_message("x")] * index)

    def walk(*filters: str) -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            after = ["--after", cursor] if cursor else []
            page = run_json(migrated_url, "conversations", "list", "--limit", "4", *filters, *after)
            assert len(page["conversations"]) <= 4
            seen += page["conversations"]
            cursor = page["next_cursor"]
            if cursor is None:
                return seen

    everything = walk()
    assert sorted(entry["id"] for entry in everything) == sorted(written)
    keys = [(entry["created_at"], entry["id"]) for entry in everything]
    assert keys == sorted(keys, reverse=True)  # newest first, ties by id
    counts = {entry["id"]: entry["message_count"] for entry in everything}
    assert counts == {
        conversation_id: int(conversation_id.split("-")[1])
        if conversation_id.startswith("single")
        else 0
        for conversation_id in written
    }

    alices = walk("--user", "alice")
    assert sorted(entry["id"] for entry in alices) == sorted(
        conversation_id for conversation_id, owner in written.items() if owner == "alice"
    )
    assert {entry["user_id"] for entry in alices} == {"alice"}

    # The human listing prints the cursor; following it gives the next page.
    first = run(migrated_url, "conversations", "list", "--limit", "5")
    assert first.exit_code == 0
    cursor = first.stdout.rsplit("next cursor: ", 1)[1].split()[0]
    second = run_json(migrated_url, "conversations", "list", "--limit", "5", "--after", cursor)
    assert [entry["id"] for entry in second["conversations"]] == [
        entry["id"] for entry in everything[5:10]
    ]
    for entry in everything[:5]:
        assert entry["id"] in first.stdout


def test_conversations_list_rejects_a_bad_cursor_and_limit(migrated_url: str) -> None:
    bad_cursor = run(migrated_url, "conversations", "list", "--after", "not-a-cursor")
    assert bad_cursor.exit_code == ExitCode.USAGE
    assert "after" in bad_cursor.stderr
    bad_limit = run(migrated_url, "conversations", "list", "--limit", "0")
    assert bad_limit.exit_code == ExitCode.USAGE
    assert "--limit" in bad_limit.stderr
    empty = run(migrated_url, "conversations", "list")
    assert empty.exit_code == 0 and "no conversations" in empty.stdout


TRANSCRIPT: list[dict[str, Any]] = [
    {"role": "user", "content": "What's the weather in Paris?"},
    {
        "type": "reasoning",
        "id": "rs_1",
        "summary": [{"type": "summary_text", "text": "I should call the weather tool."}],
    },
    {
        "type": "function_call",
        "call_id": "call_42",
        "name": "get_weather",
        "arguments": '{"city": "Paris"}',
        "id": "fc_1",
    },
    {"type": "function_call_output", "call_id": "call_42", "output": "Sunny, 21 C"},
    {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [
            {"type": "output_text", "text": "It is sunny.", "annotations": [], "logprobs": []}
        ],
    },
    # Stored exactly, so shown exactly: a NUL, a terminal escape and a lone surrogate.
    {"role": "user", "content": "odd \x00 \x1b[31m \ud800 text"},
]


def test_show_prints_a_transcript_and_dumps_the_exact_items(migrated_url: str) -> None:
    store = get_store(migrated_url)
    with store.transaction() as repos:
        repos.conversations.upsert("conv-show", user_id="alice", metadata={"plan": "pro"})
        repos.messages.append("conv-show", TRANSCRIPT)
        repos.usage.record(
            "conv-show", [UsageEntry(model="o3", prompt_tokens=9, completion_tokens=4)]
        )

    document = run_json(migrated_url, "conversations", "show", "conv-show")
    assert document["items"] == TRANSCRIPT
    assert document["conversation"]["user_id"] == "alice"
    assert document["conversation"]["metadata"] == {"plan": "pro"}
    assert document["usage"] == {
        "requests": 1,
        "prompt_tokens": 9,
        "completion_tokens": 4,
        "total_tokens": 13,
    }

    shown = run(migrated_url, "conversations", "show", "conv-show")
    assert shown.exit_code == 0, shown.output
    transcript = shown.stdout
    for expected in (
        "[1] user",
        "What's the weather in Paris?",
        "[2] reasoning summary",
        "I should call the weather tool.",
        "[3] function_call get_weather call_id=call_42",
        'arguments: {"city": "Paris"}',
        "[4] function_call_output call_id=call_42",
        "Sunny, 21 C",
        "[5] assistant",
        "It is sunny.",
        "9 prompt + 4 completion tokens",
    ):
        assert expected in transcript, expected
    # Control characters and the surrogate are shown escaped, never sent raw.
    assert "\x1b" not in transcript and "\x00" not in transcript
    assert "\\u001b[31m" in transcript and "\\ud800" in transcript

    missing = run(migrated_url, "conversations", "show", "no-such-conversation")
    assert missing.exit_code == ExitCode.PROBLEM
    assert "no-such-conversation" in missing.stderr
    invalid = run(migrated_url, "conversations", "show", " ")
    assert invalid.exit_code == ExitCode.USAGE


def test_delete_asks_first_and_removes_messages_and_usage(migrated_url: str) -> None:
    store = get_store(migrated_url)
    with store.transaction() as repos:
        repos.messages.append("conv-del", [user_message("a"), user_message("b")], user_id="u")
        repos.usage.record("conv-del", [UsageEntry(model="m", prompt_tokens=1)])

    declined = run(migrated_url, "conversations", "delete", "conv-del", input="n\n")
    assert declined.exit_code == ExitCode.PROBLEM
    assert "2 messages" in declined.stderr  # the prompt says what would go
    with store.read() as repos:
        assert repos.conversations.get("conv-del") is not None

    confirmed = run(migrated_url, "conversations", "delete", "conv-del", input="y\n")
    assert confirmed.exit_code == 0, confirmed.output
    with store.read() as repos:
        assert repos.conversations.get("conv-del") is None
        assert repos.messages.count("conv-del") == 0
        assert repos.usage.totals_for_conversation("conv-del").requests == 0

    again = run(migrated_url, "conversations", "delete", "conv-del", "--yes")
    assert again.exit_code == ExitCode.PROBLEM
    assert "no conversation" in again.stderr

    with store.transaction() as repos:
        repos.messages.append("conv-json", [user_message("a")])
    scripted = run(migrated_url, "conversations", "delete", "conv-json", "--yes", "--json")
    assert scripted.exit_code == 0
    document = json.loads(scripted.stdout)
    # A PostgreSQL database gets a restore point first (tests/operations/test_restore_points.py).
    point = document.pop("restore_point")
    assert point["created"] is (store.dialect == "postgresql")
    assert document == {"deleted": "conv-json", "messages": 1}


# --------------------------------------------------------------------------- doctor


def _check(report: dict[str, Any], name: str) -> dict[str, Any]:
    matching: list[dict[str, Any]] = [check for check in report["checks"] if check["name"] == name]
    assert len(matching) == 1, report
    return matching[0]


def with_query(url: str, **query: str) -> str:
    return make_url(url).update_query_dict(query).render_as_string(hide_password=False)


def test_doctor_passes_on_a_healthy_database(migrated_url: str, backend: str) -> None:
    url = with_query(migrated_url, pool_size="3", max_overflow="2")
    result = run(url, "doctor", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["dialect"] == backend
    names = [check["name"] for check in report["checks"]]
    common = ["database", "server_version", "schema", "pool", "indexes"]
    if backend == "postgresql":
        tail = ["privileges", "role", "archiving", "row_level_security", "tenant_isolation"]
        assert names == [*common[:2], "tls", *common[2:], *tail]
        assert _check(report, "privileges")["status"] == "ok"
        # The test's role created (owns) the tables: more than an app needs.
        assert _check(report, "role")["status"] == "warn"
    else:
        assert names == [*common[:2], "journal_mode", *common[2:]]
        assert _check(report, "journal_mode")["status"] == "ok"
    assert {check["status"] for check in report["checks"]} <= {"ok", "warn"}
    assert head_revision() in _check(report, "schema")["detail"]
    pool = _check(report, "pool")["detail"]
    assert "pool_size=3" in pool and "max_overflow=2" in pool and "at most 5 connections" in pool

    table = run(url, "doctor")
    assert table.exit_code == 0
    assert "all checks passed" in table.stdout


def test_doctor_fails_on_a_missing_index_and_its_advice_repairs_it(migrated_url: str) -> None:
    with connect(migrated_url) as connection:
        connection.execute(text("DROP INDEX ix_messages_created_at"))

    result = run(migrated_url, "doctor", "--json")
    assert result.exit_code == ExitCode.PROBLEM
    indexes = _check(json.loads(result.stdout), "indexes")
    assert indexes["status"] == "fail"
    assert "ix_messages_created_at is missing" in indexes["detail"]
    statement = indexes["advice"].split(": ", 1)[1].split(" -- ")[0]
    assert statement.startswith("CREATE INDEX ix_messages_created_at ON messages")

    with connect(migrated_url) as connection:
        connection.execute(text(statement))
    assert run(migrated_url, "doctor").exit_code == 0


def test_doctor_fails_with_advice_on_an_unreachable_server() -> None:
    url = "postgresql://someone:doctor-secret-pw@127.0.0.1:1/nowhere"
    result = run(url, "doctor", "--json")
    assert result.exit_code == ExitCode.PROBLEM
    report = json.loads(result.stdout)
    assert report["ok"] is False
    database = _check(report, "database")
    assert database["status"] == "fail" and "127.0.0.1:1" in database["detail"]
    assert "server is running" in database["advice"]
    assert len(report["checks"]) == 1  # nothing else could run
    text_result = run(url, "doctor")
    assert text_result.exit_code == ExitCode.PROBLEM
    assert "FAIL database" in text_result.stdout
    for output in (result.output, text_result.output):
        assert "doctor-secret-pw" not in output


def test_doctor_reports_a_missing_sqlite_file_without_creating_it(tmp_path: Path) -> None:
    path = tmp_path / "absent" / "sessions.sqlite3"
    result = run(f"sqlite:///{path}", "doctor", "--json")
    assert result.exit_code == ExitCode.PROBLEM
    database = _check(json.loads(result.stdout), "database")
    assert database["status"] == "fail" and str(path) in database["detail"]
    assert "migrate upgrade" in database["advice"]
    assert not path.parent.exists()


def test_doctor_reports_a_bad_url_as_a_failed_check() -> None:
    result = run("mysql://root:bad-url-secret@db/x", "doctor", "--json")
    assert result.exit_code == ExitCode.PROBLEM
    configuration = _check(json.loads(result.stdout), "configuration")
    assert configuration["status"] == "fail" and "mysql" in configuration["detail"]
    assert "bad-url-secret" not in result.output


@pytest.fixture
def app_role(postgres_server: PostgresServer) -> Iterator[tuple[str, str]]:
    """A migrated database and a login role with no privileges on it yet."""
    url = postgres_server.create_database()
    upgrade(url)
    role = f"as_doctor_{uuid.uuid4().hex[:8]}"
    postgres_server.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        yield url, role
    finally:
        dispose_all()
        with connect(url) as connection:
            connection.execute(text(f'DROP OWNED BY "{role}"'))
        postgres_server.execute(f'DROP ROLE "{role}"')


def test_doctor_checks_the_roles_privileges_and_gives_the_grants(
    app_role: tuple[str, str],
) -> None:
    url, role = app_role
    with connect(url) as connection:
        connection.execute(
            text(
                "GRANT SELECT, INSERT, UPDATE, DELETE ON conversations, messages, "
                f'conversation_branches, run_states TO "{role}"'
            )
        )
        connection.execute(text(f'GRANT SELECT, INSERT, UPDATE, DELETE ON append_keys TO "{role}"'))
        connection.execute(text(f'GRANT SELECT, INSERT, UPDATE ON usage_logs TO "{role}"'))
        connection.execute(text(f'GRANT SELECT ON alembic_version TO "{role}"'))
    role_url = make_url(url).set(username=role, password=None).render_as_string(hide_password=False)

    result = run(role_url, "doctor", "--json")
    assert result.exit_code == ExitCode.PROBLEM, result.output
    privileges = _check(json.loads(result.stdout), "privileges")
    assert privileges["status"] == "fail"
    assert "usage_logs: DELETE" in privileges["detail"]
    grant = privileges["advice"].split("run: ", 1)[1]
    assert grant == f"GRANT DELETE ON usage_logs TO {role}"

    with connect(url) as connection:
        connection.execute(text(grant))
    fixed = run(role_url, "doctor", "--json")
    assert fixed.exit_code == 0, fixed.output
    report = json.loads(fixed.stdout)
    assert _check(report, "privileges")["status"] == "ok"
    # Neither superuser nor owner: exactly what an application role should be.
    assert _check(report, "role")["status"] == "ok"


# --------------------------------------------------------------------------- errors, secrets


def test_commands_on_an_unreachable_database_exit_with_the_database_code() -> None:
    url = "postgresql://someone:unreachable-pw@127.0.0.1:1/nowhere"
    for command in (["stats"], ["conversations", "list"], ["migrate", "current"]):
        result = run(url, *command)
        assert result.exit_code == ExitCode.DATABASE, (command, result.output)
        assert result.stderr.startswith("error: ")
        assert "unreachable-pw" not in result.output


def test_a_password_in_the_url_never_appears_in_any_output(
    postgres_server: PostgresServer,
) -> None:
    plain = make_url(postgres_server.create_database())
    # The test server trusts local connections, so an added password is ignored
    # by it; a configured real one is used as it is.
    secret = plain.password or f"pw-{uuid.uuid4().hex}"
    url = plain.set(password=secret).render_as_string(hide_password=False)
    query_url = with_query(plain.render_as_string(hide_password=False), password=secret)

    outputs: list[Result] = []
    for database_url in (url, query_url):
        outputs += [
            run(database_url, "migrate", "check"),  # fails: empty
            run(database_url, "migrate", "upgrade"),
            run(database_url, "migrate", "current"),
            run(database_url, "migrate", "current", "--json"),
            run(database_url, "migrate", "history", "-i"),
            run(database_url, "migrate", "downgrade", "-1", input="n\n"),
            run(database_url, "migrate", "check", "--json"),
        ]
        with get_store(database_url).transaction() as repos:
            repos.messages.append("conv-secret", [user_message("hello")], user_id="u")
        outputs += [
            run(database_url, "stats"),
            run(database_url, "stats", "--json"),
            run(database_url, "conversations", "list"),
            run(database_url, "conversations", "list", "--json"),
            run(database_url, "conversations", "show", "conv-secret"),
            run(database_url, "conversations", "show", "missing"),
            run(database_url, "conversations", "delete", "conv-secret", input="n\n"),
            run(database_url, "conversations", "delete", "conv-secret", "--yes"),
            run(database_url, "doctor"),
            run(database_url, "doctor", "--json"),
        ]
        dispose_all()
    wrong_port = plain.set(password=secret, port=1).render_as_string(hide_password=False)
    outputs += [
        run(wrong_port, "doctor"),
        run(wrong_port, "stats"),
        run(wrong_port, "migrate", "check"),
    ]

    assert {result.exit_code for result in outputs} >= {0, ExitCode.PROBLEM, ExitCode.DATABASE}
    for result in outputs:
        assert secret not in result.output
    masked = [result for result in outputs if "***" in result.output]
    assert masked, "the URL is shown, masked, somewhere"
