"""The data commands: ``export``/``import``, ``erase`` and ``prune`` (CLI and library).

Every test writes through the package into real databases (a fresh SQLite file or
PostgreSQL database per test), runs the command through click's ``CliRunner`` or
calls the library function, then reads every row of the three tables back with
plain SQL and compares.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Text, cast, create_engine, func, insert, select, text, update
from sqlalchemy.pool import NullPool

from agents_sessions import UsageEntry, dispose_all, get_store
from agents_sessions.cli import cli
from agents_sessions.db.engine import parse_database_url
from agents_sessions.db.models import (
    append_keys_table,
    conversations_table,
    messages_table,
    usage_logs_table,
)
from agents_sessions.db.statements import APPEND_KEY_RETENTION
from agents_sessions.errors import ExitCode
from agents_sessions.ops.retention import prune
from agents_sessions.ops.transfer import ExportFile, ExportFormatError, iter_export
from tests.conftest import PostgresServer

FreshUrl = Callable[[], str]
Rows = dict[str, list[tuple[Any, ...]]]

# Items of every shape the SDK writes, plus what is hard to store exactly: NUL,
# non-ASCII, a lone surrogate, key order, big and float numbers, nesting.
ITEMS: list[dict[str, Any]] = [
    {"role": "user", "content": "Hello \x00 NUL, ünïcödé, 日本語, emoji 🎉"},
    {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": "Hi!", "annotations": [], "logprobs": []}],
    },
    {
        "type": "function_call",
        "call_id": "call_1",
        "name": "lookup",
        "arguments": '{"q": "x\\u0000y"}',
        "id": "fc_1",
    },
    {"type": "function_call_output", "call_id": "call_1", "output": "lone \ud800 surrogate"},
    {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "hmm"}]},
    {"z": 1, "a": {"deep": [1, 2.5, 10**20, None, True]}, "m": "keys stay z, a, m"},
]


# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _close_pools() -> Iterator[None]:
    yield
    dispose_all()


@pytest.fixture
def fresh_database_url(
    fresh_database_url: Callable[[], str],
) -> Callable[[], str]:
    """Empty databases migrated to head, as an operator's pipeline leaves them.

    The operator commands never migrate on their own (they exit 5 and say so).
    """

    def make() -> str:
        url = fresh_database_url()
        result = run(url, "migrate", "upgrade")
        assert result.exit_code == 0, result.output
        return url

    return make


def run(url: str, *args: str, input: str | bytes | None = None) -> Result:
    """``agents-sessions --database-url URL ARGS...`` in this process."""
    result = CliRunner().invoke(
        cli, ["--database-url", url, *args], input=input, prog_name="agents-sessions"
    )
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback is a bug, whatever the input
    return result


def fill_store(url: str, *, users: tuple[str | None, ...] = ("alice", "bob", None)) -> list[str]:
    """Write two conversations per user (None: no owner) through the repository API."""
    store = get_store(url)
    written = []
    for user in users:
        for number in range(2):
            conversation_id = f"{user or 'nobody'}-conv-{number}"
            with store.transaction() as repos:
                repos.conversations.upsert(
                    conversation_id,
                    user_id=user,
                    metadata={"channel": "web", "n": number, "ünï": "✓"},
                )
                repos.messages.append(
                    conversation_id, ITEMS[:3], idempotency_key=f"{conversation_id}-turn-1"
                )
                repos.messages.append(conversation_id, ITEMS[3:])
                repos.usage.record(
                    conversation_id,
                    [
                        UsageEntry(
                            model="gpt-4.1",
                            prompt_tokens=12,
                            completion_tokens=30,
                            run_id="run-1",
                            response_id="resp_1",
                        ),
                        # Two identical rows: both must survive a round trip.
                        UsageEntry(model="gpt-4.1-mini", prompt_tokens=3),
                        UsageEntry(model="gpt-4.1-mini", prompt_tokens=3),
                    ],
                )
            written.append(conversation_id)
    return written


def _utc(value: datetime) -> datetime:
    return (
        value.replace(tzinfo=timezone.utc)
        if value.tzinfo is None
        else value.astimezone(timezone.utc)
    )


def table_rows(url: str, *, ids: bool = True) -> Rows:
    """Every row of the three tables, read with plain SQL (item as its stored text)."""
    engine = create_engine(parse_database_url(url).url, poolclass=NullPool)
    c, m, u = conversations_table, messages_table, usage_logs_table
    try:
        with engine.connect() as connection:
            conversations = [
                (row.id, row.user_id, _utc(row.created_at), _utc(row.updated_at), row.metadata)
                for row in connection.execute(select(c).order_by(c.c.id))
            ]
            messages = [
                ((row.id,) if ids else ())
                + (
                    row.conversation_id,
                    row.role,
                    row.content,
                    row.document,
                    _utc(row.created_at),
                    row.append_key,
                )
                for row in connection.execute(
                    select(
                        m.c.id,
                        m.c.conversation_id,
                        m.c.role,
                        m.c.content,
                        cast(m.c.item, Text).label("document"),
                        m.c.created_at,
                        m.c.append_key,
                    ).order_by(m.c.conversation_id, m.c.id)
                )
            ]
            usage = [
                ((row.id,) if ids else ())
                + (
                    row.conversation_id,
                    row.run_id,
                    row.response_id,
                    row.model,
                    row.requests,
                    row.prompt_tokens,
                    row.completion_tokens,
                    row.total_tokens,
                    _utc(row.timestamp),
                )
                for row in connection.execute(select(u).order_by(u.c.conversation_id, u.c.id))
            ]
    finally:
        engine.dispose()
    return {"conversations": conversations, "messages": messages, "usage_logs": usage}


def items_of(rows: Rows, conversation_id: str) -> list[Any]:
    """The parsed items of one conversation, from :func:`table_rows` (with ids)."""
    return [json.loads(row[4]) for row in rows["messages"] if row[1] == conversation_id]


def export_file(url: str, path: Path, *args: str) -> dict[str, Any]:
    result = run(url, "export", "--output", str(path), "--json", *args)
    assert result.exit_code == 0, result.output
    summary: dict[str, Any] = json.loads(result.stdout)
    return summary


def import_file(url: str, path: Path, expected_exit: int = 0) -> dict[str, Any]:
    result = run(url, "import", str(path), "--json")
    assert result.exit_code == expected_exit, result.output
    summary: dict[str, Any] = json.loads(result.stdout)
    return summary


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


# --------------------------------------------------------------------------- export/import


def test_export_then_import_into_a_fresh_database_keeps_every_row(
    fresh_database_url: FreshUrl, tmp_path: Path
) -> None:
    source, target = fresh_database_url(), fresh_database_url()
    conversation_ids = fill_store(source)
    path = tmp_path / "export.jsonl"

    exported = export_file(source, path)
    assert (exported["conversations"], exported["messages"], exported["usage_rows"]) == (
        6,
        6 * len(ITEMS),
        6 * 3,
    )
    header = records(path)[0]
    assert (header["type"], header["format"], header["version"]) == (
        "header",
        "agents-sessions-export",
        2,
    )

    imported = import_file(target, path)
    assert imported["conversations_created"] == 6
    assert imported["messages_imported"] == 6 * len(ITEMS)
    assert imported["usage_imported"] == 18
    assert imported["refused"] == []

    # Every row but the identity ids: same conversations (owners, metadata,
    # timestamps), same messages in the same order with byte-identical documents,
    # same usage rows (the duplicate pair included), same append keys.
    assert table_rows(target, ids=False) == table_rows(source, ids=False)
    rows = table_rows(target)
    for conversation_id in conversation_ids:
        assert items_of(rows, conversation_id) == ITEMS
    # ...and the session API reads them back equal, NUL and lone surrogate included.
    with get_store(target).read() as repos:
        assert repos.messages.all("alice-conv-0") == ITEMS


@pytest.mark.parametrize("direction", ["sqlite-to-postgresql", "postgresql-to-sqlite"])
def test_export_import_round_trip_across_backends(
    direction: str, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    sqlite = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    postgres = postgres_server.create_database()
    source, target = (sqlite, postgres) if direction.startswith("sqlite") else (postgres, sqlite)
    assert run(target, "migrate", "upgrade").exit_code == 0
    fill_store(source)
    path = tmp_path / "export.jsonl"
    export_file(source, path)
    import_file(target, path)
    assert table_rows(target, ids=False) == table_rows(source, ids=False)


def test_importing_the_same_file_twice_changes_nothing(
    fresh_database_url: FreshUrl, tmp_path: Path
) -> None:
    source, target = fresh_database_url(), fresh_database_url()
    fill_store(source)
    path = tmp_path / "export.jsonl"
    export_file(source, path)
    import_file(target, path)
    after_first = table_rows(target)

    again = import_file(target, path)

    assert again["conversations_created"] == again["conversations_updated"] == 0
    assert again["conversations_unchanged"] == 6
    assert (again["messages_imported"], again["messages_already_present"]) == (0, 36)
    assert (again["usage_imported"], again["usage_already_present"]) == (0, 18)
    assert table_rows(target) == after_first  # ids, timestamps, everything


def test_import_appends_only_the_missing_tail_and_refuses_a_diverged_conversation(
    fresh_database_url: FreshUrl, tmp_path: Path
) -> None:
    source, target = fresh_database_url(), fresh_database_url()
    fill_store(source)
    path = tmp_path / "export.jsonl"
    export_file(source, path)
    import_file(target, path)
    with get_store(target).transaction() as repos:
        # alice-conv-0 lost its last two items: the import puts them back.
        repos.messages.pop_latest("alice-conv-0")
        repos.messages.pop_latest("alice-conv-0")
        # bob-conv-0's last item was replaced: its history diverged from the file.
        repos.messages.pop_latest("bob-conv-0")
        repos.messages.append("bob-conv-0", [{"role": "user", "content": "diverged"}])
    before = table_rows(target)

    summary = import_file(target, path, expected_exit=ExitCode.PROBLEM)

    assert summary["messages_imported"] == 2
    assert summary["conversations_updated"] == 1
    assert [entry["conversation_id"] for entry in summary["refused"]] == ["bob-conv-0"]
    assert "differs" in summary["refused"][0]["reason"]
    after = table_rows(target)
    assert items_of(after, "alice-conv-0") == ITEMS
    bob_rows = [row for row in after["messages"] if row[1] == "bob-conv-0"]
    assert bob_rows == [row for row in before["messages"] if row[1] == "bob-conv-0"]
    assert items_of(after, "bob-conv-0")[-1] == {"role": "user", "content": "diverged"}


def test_import_refuses_a_conversation_owned_by_another_user(
    fresh_database_url: FreshUrl, tmp_path: Path
) -> None:
    source, target = fresh_database_url(), fresh_database_url()
    fill_store(source, users=("alice",))
    path = tmp_path / "export.jsonl"
    export_file(source, path)
    with get_store(target).transaction() as repos:
        repos.conversations.upsert("alice-conv-0", user_id="mallory")

    summary = import_file(target, path, expected_exit=ExitCode.PROBLEM)

    assert [entry["conversation_id"] for entry in summary["refused"]] == ["alice-conv-0"]
    assert summary["conversations_created"] == 1  # alice-conv-1
    with get_store(target).read() as repos:
        taken = repos.conversations.get("alice-conv-0")
        assert taken is not None and taken.user_id == "mallory"
        assert repos.messages.count("alice-conv-0") == 0


def _corrupt(record: dict[str, Any], how: str) -> bytes:
    if how == "truncated_json":
        return json.dumps(record).encode()[:40]
    if how == "bad_timestamp":
        record["created_at"] = "yesterday"
    elif how == "missing_field":
        del record["item_json"]
    elif how == "item_not_json":
        record["item_json"] = '{"role": "user", "content": '
    elif how == "position_gap":
        record["position"] += 1
    elif how == "nul_in_role":
        record["role"] = "us\x00er"
    return json.dumps(record).encode()


@pytest.mark.parametrize(
    "how",
    [
        "truncated_json",
        "bad_timestamp",
        "missing_field",
        "item_not_json",
        "position_gap",
        "nul_in_role",
    ],
)
def test_a_corrupt_line_is_rejected_with_its_number_and_nothing_is_written(
    how: str, fresh_database_url: FreshUrl, tmp_path: Path
) -> None:
    source, target = fresh_database_url(), fresh_database_url()
    fill_store(source)
    path = tmp_path / "export.jsonl"
    export_file(source, path)
    lines = path.read_bytes().splitlines()
    # The third message of a conversation in the middle of the file.
    number = next(
        index
        for index, line in enumerate(lines, start=1)
        if b'"conversation_id":"bob-conv-0","position":2' in line
    )
    lines[number - 1] = _corrupt(json.loads(lines[number - 1]), how)
    path.write_bytes(b"\n".join(lines) + b"\n")
    get_store(target).ensure_schema()

    result = run(target, "import", str(path))

    assert result.exit_code == ExitCode.CONFIGURATION, result.output
    assert f"line {number}:" in result.stderr
    assert "nothing was imported" in result.stderr
    rows = table_rows(target)
    assert rows == {"conversations": [], "messages": [], "usage_logs": []}


@pytest.mark.parametrize(
    ("mutate", "line", "message"),
    [
        (lambda lines: lines[:-1], 4, "ends without its end record"),
        (lambda lines: [b"{}", *lines[1:]], 1, "not an agents-sessions export"),
        (
            lambda lines: [lines[0].replace(b'"version":2', b'"version":3'), *lines[1:]],
            1,
            "version 3 is not supported",
        ),
        (
            lambda lines: [*lines[:-1], b'{"type":"end","conversations":1,"messages":9,"usage":0}'],
            4,
            "end record announces",
        ),
        (lambda lines: [lines[0], lines[2], *lines[1:2], *lines[3:]], 2, "does not follow"),
        (lambda lines: [*lines, b"trailing"], 5, "after the end record"),
        (lambda lines: [lines[0], b"\xff\xfe", *lines[1:]], 2, "not UTF-8"),
    ],
)
def test_export_file_validation_names_the_line(
    mutate: Callable[[list[bytes]], list[bytes]], line: int, message: str, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'one.sqlite3'}"
    with get_store(url).transaction() as repos:
        repos.messages.append("c", [{"role": "user", "content": "x"}])
    path = tmp_path / "one.jsonl"
    export_file(url, path)
    lines = path.read_bytes().splitlines()
    assert len(lines) == 4  # header, conversation, message, end
    path.write_bytes(b"\n".join(mutate(lines)) + b"\n")

    with pytest.raises(ExportFormatError) as raised:
        ExportFile(path)

    assert raised.value.line == line
    assert message in str(raised.value)


def test_export_scopes_a_user_or_chosen_conversations(
    fresh_database_url: FreshUrl, tmp_path: Path
) -> None:
    url = fresh_database_url()
    fill_store(url)

    export_file(url, tmp_path / "alice.jsonl", "--user", "alice")
    export_file(
        url,
        tmp_path / "two.jsonl",
        "--conversation",
        "bob-conv-1",
        "--conversation",
        "nobody-conv-0",
    )

    def conversations(path: Path) -> list[str]:
        return [record["id"] for record in records(path) if record["type"] == "conversation"]

    assert conversations(tmp_path / "alice.jsonl") == ["alice-conv-0", "alice-conv-1"]
    assert conversations(tmp_path / "two.jsonl") == ["bob-conv-1", "nobody-conv-0"]
    missing = run(url, "export", "--conversation", "no-such-conversation")
    assert missing.exit_code == ExitCode.PROBLEM
    assert "no-such-conversation" in missing.stderr
    assert missing.stdout == ""


def test_export_to_standard_output_and_import_from_standard_input(
    fresh_database_url: FreshUrl,
) -> None:
    source, target = fresh_database_url(), fresh_database_url()
    fill_store(source, users=("alice",))

    exported = run(source, "export", "--json")  # data on stdout, summary on stderr
    assert exported.exit_code == 0, exported.output
    summary = json.loads(exported.stderr[exported.stderr.index("{") :])
    assert summary["messages"] == 2 * len(ITEMS)
    assert exported.stdout_bytes.count(b"\n") == 1 + 2 + 2 * len(ITEMS) + 2 * 3 + 1
    imported = run(target, "import", "-", "--json", input=exported.stdout_bytes)

    assert imported.exit_code == 0, imported.output
    assert json.loads(imported.stdout)["conversations_created"] == 2
    assert table_rows(target, ids=False) == table_rows(source, ids=False)


def test_export_streams_one_snapshot_of_a_large_conversation(
    backend: str, fresh_database_url: FreshUrl
) -> None:
    url = fresh_database_url()
    store = get_store(url)
    with store.transaction() as repos:
        for start in range(0, 3000, 500):
            repos.messages.append(
                "big", [{"role": "user", "content": f"m{n}"} for n in range(start, start + 500)]
            )

    lines = iter_export(store, conversation_ids=["big"], batch_size=100)
    head = [next(lines) for _ in range(2 + 250)]  # header, conversation, 250 messages

    if backend == "postgresql":
        # The export is parked mid-conversation: its connection is reading a
        # server-side cursor a batch at a time, not holding the whole result.
        engine = create_engine(parse_database_url(url).url, poolclass=NullPool)
        with engine.connect() as connection:
            queries = (
                connection.execute(
                    text(
                        "SELECT query FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                        "AND query LIKE 'FETCH FORWARD %'"
                    )
                )
                .scalars()
                .all()
            )
        engine.dispose()
        assert len(queries) == 1, queries
        assert int(queries[0].split()[2]) <= 100
    # Writes committed meanwhile are not in the export, even those it reads later
    # (the usage rows are queried after the messages): it is one snapshot.
    with get_store(url).transaction() as repos:
        repos.messages.append("big", [{"role": "user", "content": "late"}])
        repos.usage.record("big", [UsageEntry(model="gpt-4.1", prompt_tokens=1)])
    rest = list(lines)

    exported = [json.loads(line) for line in head + rest]
    assert len(exported) == 1 + 1 + 3000 + 1
    contents = [json.loads(r["item_json"])["content"] for r in exported if r["type"] == "message"]
    assert contents == [f"m{n}" for n in range(3000)]
    assert exported[-1] == {"type": "end", "conversations": 1, "messages": 3000, "usage": 0}


# --------------------------------------------------------------------------- erase


def _rows_not_of(rows: Rows, user: str) -> Rows:
    theirs = {row[0] for row in rows["conversations"] if row[1] == user}
    return {
        "conversations": [row for row in rows["conversations"] if row[0] not in theirs],
        "messages": [row for row in rows["messages"] if row[1] not in theirs],
        "usage_logs": [row for row in rows["usage_logs"] if row[1] not in theirs],
    }


def test_erase_removes_everything_of_the_user_and_nothing_else(
    fresh_database_url: FreshUrl,
) -> None:
    url = fresh_database_url()
    fill_store(url, users=("alice", "bob", None, "alice-2"))
    before = table_rows(url)

    result = run(url, "erase", "--user", "alice", "--yes", "--json")

    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["conversations"], summary["messages"], summary["usage_rows"]) == (
        2,
        2 * len(ITEMS),
        2 * 3,
    )
    after = table_rows(url)
    alice = {"alice-conv-0", "alice-conv-1"}
    assert not [row for row in after["conversations"] if row[1] == "alice" or row[0] in alice]
    assert not [row for row in after["messages"] if row[1] in alice]
    assert not [row for row in after["usage_logs"] if row[1] in alice]
    # Everyone else's rows are exactly as they were (ids and timestamps included).
    assert after == _rows_not_of(before, "alice")
    assert len(after["conversations"]) == 6


def test_erase_asks_first_and_deletes_nothing_when_declined(
    fresh_database_url: FreshUrl,
) -> None:
    url = fresh_database_url()
    fill_store(url, users=("alice", "bob"))
    before = table_rows(url)

    declined = run(url, "erase", "--user", "alice", input="n\n")

    assert declined.exit_code == ExitCode.PROBLEM
    assert "2 conversations, 12 messages and 6 usage rows" in declined.stderr
    assert "Nothing was deleted" in declined.stderr
    assert table_rows(url) == before

    accepted = run(url, "erase", "--user", "alice", input="y\n")
    assert accepted.exit_code == 0, accepted.output
    assert table_rows(url) == _rows_not_of(before, "alice")


# --------------------------------------------------------------------------- prune

CONVERSATIONS = 200
PER_CONVERSATION = 500  # 100,000 messages
OLD = {index for index in range(CONVERSATIONS) if index % 10 in (0, 3, 7)}  # 60 of them


def _conversation(index: int) -> str:
    return f"conv-{index:04d}"


_BULK_MESSAGES = {
    "postgresql": (
        "INSERT INTO messages (conversation_id, role, content, item) "
        "SELECT 'conv-' || lpad((g / :per)::text, 4, '0'), 'user', 'message ' || g, "
        "json_build_object('role', 'user', 'content', 'message ' || g) "
        "FROM generate_series(0, :total - 1) AS g"
    ),
    "sqlite": (
        "WITH RECURSIVE seq(g) AS (SELECT 0 UNION ALL SELECT g + 1 FROM seq WHERE g + 1 < :total) "
        "INSERT INTO messages (conversation_id, role, content, item) "
        "SELECT 'conv-' || printf('%04d', g / :per), 'user', 'message ' || g, "
        "json_object('role', 'user', 'content', 'message ' || g) FROM seq"
    ),
}


def bulk_fill(url: str) -> None:
    """200 conversations of 500 messages and one usage row each; 60 last updated 100 days ago."""
    store = get_store(url)
    store.ensure_schema()
    ids = [_conversation(index) for index in range(CONVERSATIONS)]
    with store.engine.begin() as connection:
        connection.execute(
            insert(conversations_table),
            [{"id": cid, "user_id": f"user-{index % 7}"} for index, cid in enumerate(ids)],
        )
        connection.execute(
            text(_BULK_MESSAGES[store.dialect]),
            {"per": PER_CONVERSATION, "total": CONVERSATIONS * PER_CONVERSATION},
        )
        connection.execute(
            insert(usage_logs_table),
            [{"conversation_id": cid, "model": "gpt-4.1", "prompt_tokens": 5} for cid in ids],
        )
        connection.execute(
            update(conversations_table)
            .where(conversations_table.c.id.in_([_conversation(i) for i in OLD]))
            .values(updated_at=datetime.now(timezone.utc) - timedelta(days=100))
        )


def counts(url: str) -> tuple[int, int, int]:
    engine = create_engine(parse_database_url(url).url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return tuple(  # type: ignore[return-value]
                connection.execute(select(func.count()).select_from(table)).scalar_one()
                for table in (conversations_table, messages_table, usage_logs_table)
            )
    finally:
        engine.dispose()


def test_prune_deletes_exactly_the_old_conversations_in_batches(
    fresh_database_url: FreshUrl,
) -> None:
    url = fresh_database_url()
    bulk_fill(url)
    assert counts(url) == (200, 100_000, 200)
    old_messages = len(OLD) * PER_CONVERSATION

    dry = run(url, "prune", "--older-than", "90d", "--dry-run", "--json")

    assert dry.exit_code == 0, dry.output
    planned = json.loads(dry.stdout)
    assert planned["dry_run"] is True
    assert (planned["conversations"], planned["messages"], planned["usage_rows"]) == (
        len(OLD),
        old_messages,
        len(OLD),
    )
    assert counts(url) == (200, 100_000, 200)  # a dry run deletes nothing

    result = run(url, "prune", "--older-than", "90d", "--batch-size", "4000", "--yes", "--json")

    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["conversations"], summary["messages"], summary["usage_rows"]) == (
        planned["conversations"],
        planned["messages"],
        planned["usage_rows"],
    )
    # Bounded batches: no transaction deleted more than 4,000 messages, so it took
    # at least 30,000 / 4,000 of them.
    assert summary["largest_batch"] == 4000
    assert summary["batches"] >= -(-old_messages // 4000)
    assert summary["interrupted"] == 0
    kept = {_conversation(index) for index in range(CONVERSATIONS) if index not in OLD}
    rows = table_rows(url)
    assert {row[0] for row in rows["conversations"]} == kept
    assert {row[1] for row in rows["messages"]} == kept
    assert {row[1] for row in rows["usage_logs"]} == kept
    assert counts(url) == (140, 140 * PER_CONVERSATION, 140)


def _age(url: str, conversation_ids: list[str], days: int) -> None:
    with get_store(url).engine.begin() as connection:
        connection.execute(
            update(conversations_table)
            .where(conversations_table.c.id.in_(conversation_ids))
            .values(updated_at=datetime.now(timezone.utc) - timedelta(days=days))
        )


def test_prune_keeps_conversations_that_get_a_message_while_it_runs(
    fresh_database_url: FreshUrl,
) -> None:
    url = fresh_database_url()
    store = get_store(url)
    with store.transaction() as repos:
        # Processed in id order: "a-long" first (25 messages: three batches of 10),
        # "m-*" after it, "z-late" last.
        repos.messages.append("a-long", [{"role": "user", "content": str(n)} for n in range(25)])
        for name in ("m-1", "m-2", "z-late"):
            repos.messages.append(name, [{"role": "user", "content": "x"}] * 3)
        repos.messages.append("fresh", [{"role": "user", "content": "x"}])
    _age(url, ["a-long", "m-1", "m-2", "z-late"], days=30)
    calls: list[int] = []

    def app_writes_meanwhile(deleted: int) -> None:
        calls.append(deleted)
        if len(calls) == 1:  # after the first batch committed
            with store.transaction() as repos:
                repos.messages.append("a-long", [{"role": "user", "content": "back!"}])
                repos.messages.append("z-late", [{"role": "user", "content": "back!"}])

    summary = prune(store, timedelta(days=7), batch_size=10, progress=app_writes_meanwhile)

    with store.read() as repos:
        # Half-pruned when the user came back: kept, newest messages and all.
        assert [item["content"] for item in repos.messages.all("a-long")] == [
            *[str(n) for n in range(10, 25)],
            "back!",
        ]
        assert [item["content"] for item in repos.messages.all("z-late")] == ["x"] * 3 + ["back!"]
        assert repos.conversations.get("m-1") is None
        assert repos.conversations.get("m-2") is None
        assert repos.messages.count("fresh") == 1
    assert (summary.conversations, summary.messages) == (2, 10 + 6)
    assert (summary.interrupted, summary.interrupted_ids) == (1, ["a-long"])


@pytest.mark.postgres_only
def test_prune_skips_a_conversation_a_writer_holds_instead_of_waiting(
    postgres_server: PostgresServer,
) -> None:
    url = postgres_server.create_database()
    store = get_store(url)
    with store.transaction() as repos:
        for name in ("held", "free"):
            repos.messages.append(name, [{"role": "user", "content": "x"}] * 5)
    _age(url, ["held", "free"], days=30)
    writer = create_engine(parse_database_url(url).url, poolclass=NullPool)
    outcome: list[Any] = []
    with writer.connect() as connection:
        # An app transaction in the middle of writing "held": it holds the row lock.
        connection.execute(text("SELECT 1 FROM conversations WHERE id = 'held' FOR UPDATE"))
        worker = threading.Thread(
            target=lambda: outcome.append(prune(store, timedelta(days=7), batch_size=2))
        )
        worker.start()
        worker.join(timeout=60)
        finished_while_locked = not worker.is_alive()
        connection.rollback()
    worker.join()
    writer.dispose()

    assert finished_while_locked  # SKIP LOCKED: it did not wait for the writer
    assert outcome[0].conversations == 1
    with store.read() as repos:
        assert repos.conversations.get("free") is None
        assert repos.messages.count("held") == 5


def test_prune_append_keys_deletes_only_keys_past_their_retention(
    fresh_database_url: FreshUrl,
) -> None:
    url = fresh_database_url()
    store = get_store(url)
    # Three conversations, four keyed appends each; no session writes to them again,
    # so nothing else would ever delete their old keys.
    for conversation in ("a", "b", "c"):
        for call in range(4):
            with store.transaction() as repos:
                repos.messages.append(
                    conversation, ITEMS[:1], idempotency_key=f"{conversation}-{call}"
                )
    aged = {"a-0", "a-1", "b-0", "c-0", "c-1"}
    with store.engine.begin() as connection:
        connection.execute(
            update(append_keys_table)
            .where(append_keys_table.c.key.in_(aged))
            .values(
                created_at=datetime.now(timezone.utc) - APPEND_KEY_RETENTION - timedelta(hours=1)
            )
        )
    before = table_rows(url)

    dry = run(url, "prune", "--append-keys", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    assert (json.loads(dry.stdout)["keys"], json.loads(dry.stdout)["dry_run"]) == (5, True)
    assert len(_append_keys(url)) == 12  # a dry run deletes nothing

    result = run(url, "prune", "--append-keys", "--batch-size", "2", "--json")

    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["keys"], summary["batches"]) == (5, 3)  # at most two keys a batch
    assert _append_keys(url) == {f"{c}-{n}" for c in "abc" for n in range(4)} - aged
    assert table_rows(url) == before  # no conversation, message or usage row touched
    # A key within its retention still makes a repeated call a no-op.
    with store.transaction() as repos:
        repos.messages.append("a", ITEMS[:1], idempotency_key="a-3")
        assert repos.messages.count("a") == 4
    again = run(url, "prune", "--append-keys", "--json")
    assert json.loads(again.stdout)["keys"] == 0


def _append_keys(url: str) -> set[str]:
    engine = create_engine(parse_database_url(url).url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return set(connection.execute(select(append_keys_table.c.key)).scalars())
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- import hardening


def _one_conversation_export(tmp_path: Path, *, user_id: str | None = "alice") -> Path:
    url = f"sqlite:///{tmp_path / 'one-source.sqlite3'}"
    with get_store(url).transaction() as repos:
        repos.conversations.upsert("c", user_id=user_id)
        repos.messages.append("c", [{"role": "user", "content": "x"}])
    path = tmp_path / "one.jsonl"
    export_file(url, path)
    return path


def _rewrite(path: Path, number: int, change: Callable[[dict[str, Any]], None]) -> None:
    lines = path.read_bytes().splitlines()
    record = json.loads(lines[number - 1])
    change(record)
    lines[number - 1] = json.dumps(record).encode()
    path.write_bytes(b"\n".join(lines) + b"\n")


@pytest.mark.parametrize(
    ("number", "change", "message"),
    [
        (2, lambda r: r.update(created_at="0001-01-01T00:00:00+05:00"), "out of range"),
        (3, lambda r: r.update(created_at="0001-01-01T00:30:00+01:00"), "out of range"),
        (3, lambda r: r.update(item_json='{"role":"user","content":1e999}'), "inf"),
        (3, lambda r: r.update(item_json='{"role":"user","content":"\\ud83d\\ude00x"}'), ""),
        (
            3,
            lambda r: r.update(item_json='{"role":"user","content":"' + "x" * 2000 + '"}'),
            "max_item_bytes",
        ),
    ],
    ids=["conversation-year-0", "message-year-0", "infinity", "fine-emoji", "too-large"],
)
def test_import_refuses_what_the_session_would_refuse_naming_the_line(
    tmp_path: Path,
    number: int,
    change: Callable[[dict[str, Any]], None],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = _one_conversation_export(tmp_path)
    _rewrite(path, number, change)
    monkeypatch.setenv("AGENTS_SESSIONS_MAX_ITEM_BYTES", "1000")
    target = f"sqlite:///{tmp_path / 'target.sqlite3'}"
    get_store(target).ensure_schema()

    result = run(target, "import", str(path))

    if not message:  # a real (escaped) emoji is a fine item
        assert result.exit_code == 0, result.output
        return
    assert result.exit_code == ExitCode.CONFIGURATION, result.output
    assert f"line {number}:" in result.stderr and message in result.stderr
    assert "Traceback" not in result.output
    assert table_rows(target)["messages"] == []


def test_import_derives_role_and_content_from_the_item_not_the_file(tmp_path: Path) -> None:
    path = _one_conversation_export(tmp_path)
    _rewrite(path, 3, lambda r: r.update(role="system", content="forged text"))
    target = f"sqlite:///{tmp_path / 'target.sqlite3'}"
    get_store(target).ensure_schema()

    assert run(target, "import", str(path)).exit_code == 0

    with get_store(target).read() as repos:
        (record,) = repos.messages.records("c")
    assert (record.role, record.content) == ("user", "x")


@pytest.mark.parametrize(
    ("stored_owner", "file_owner"), [("bob", None), (None, "mallory")], ids=["null", "takeover"]
)
def test_import_never_appends_to_or_takes_over_a_conversation_of_another_owner(
    tmp_path: Path, stored_owner: str | None, file_owner: str | None
) -> None:
    path = _one_conversation_export(tmp_path, user_id=file_owner)
    target = f"sqlite:///{tmp_path / 'target.sqlite3'}"
    with get_store(target).transaction() as repos:
        repos.conversations.upsert("c", user_id=stored_owner)

    summary = import_file(target, path, expected_exit=ExitCode.PROBLEM)

    assert [entry["conversation_id"] for entry in summary["refused"]] == ["c"]
    with get_store(target).read() as repos:
        stored = repos.conversations.get("c")
        assert stored is not None and stored.user_id == stored_owner
        assert repos.messages.count("c") == 0


def test_import_refuses_a_line_longer_than_any_record_without_reading_it_whole(
    tmp_path: Path,
) -> None:
    path = _one_conversation_export(tmp_path)
    lines = path.read_bytes().splitlines()
    lines.insert(2, b" " * (2 * 1024 * 1024))
    path.write_bytes(b"\n".join(lines) + b"\n")

    with pytest.raises(ExportFormatError, match="longer than") as raised:
        ExportFile(path, max_item_bytes=1000)  # lines up to 12 KB + 64 KiB
    assert raised.value.line == 3


def test_sqlite_usage_totals_beyond_64_bits_are_reported_clearly(tmp_path: Path) -> None:
    # An import (or the repository API) can store rows of up to 2**63-1 tokens each;
    # SQLite cannot sum two of them.
    url = f"sqlite:///{tmp_path / 'huge.sqlite3'}"
    with get_store(url).transaction() as repos:
        repos.conversations.ensure("c")
        huge = UsageEntry(model="m", prompt_tokens=2**63 - 1, completion_tokens=0)
        repos.usage.record("c", [huge, huge])

    result = run(url, "stats")

    assert result.exit_code == ExitCode.DATABASE, result.output
    assert "exceeds SQLite's 64-bit integer range" in result.stderr
    assert "Traceback" not in result.output
