"""Export format version 2: branches, expiry and usage details survive export and import.

A conversation is written through the public API (real Runner runs on a
``ScriptedModel``, so usage rows carry their turn and request index), with a
time-to-live, branches forked from turns, a deleted branch, a frozen branch (pops
that took rows a child shares) and a switched current branch. It is exported,
imported into a fresh database of the same backend, and everything the API shows
is compared. Malformed version-2 files are refused naming the line, and nothing is
written; version-1 files still import as before.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from agents import Agent, Runner
from agents.testing import ModelStep, ScriptedModel, assistant_message
from agents.usage import Usage
from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails
from sqlalchemy import Text, cast, create_engine, select, update
from sqlalchemy.pool import NullPool

from agents_sessions import BranchNameTakenError, PostgreSQLSession, dispose_all, get_store
from agents_sessions.db.engine import parse_database_url
from agents_sessions.db.models import (
    branches_table,
    conversations_table,
    messages_table,
    usage_logs_table,
)
from agents_sessions.ops.transfer import (
    ExportFile,
    ExportFormatError,
    export_conversations,
    import_export,
)
from tests.conftest import PostgresServer

FreshUrl = Callable[[], str]
CONVERSATION = "branched"


@pytest.fixture(autouse=True)
def _close_pools() -> Iterator[None]:
    yield
    dispose_all()


def _usage(tokens: int) -> Usage:
    return Usage(
        requests=1,
        input_tokens=tokens,
        output_tokens=7,
        total_tokens=tokens + 7,
        input_tokens_details=InputTokensDetails.model_validate(
            {"cached_tokens": tokens // 10, "cache_write_tokens": 0}
        ),
        output_tokens_details=OutputTokensDetails(reasoning_tokens=3),
    )


async def _turn(session: PostgreSQLSession, text: str, tokens: int) -> None:
    model = ScriptedModel(
        [ModelStep(output=[assistant_message(f"answer to {text}")], usage=_usage(tokens))]
    )
    await Runner.run(Agent(name="helper", model=model), text, session=session)


async def _write_branched_conversation(url: str) -> PostgreSQLSession:
    """Every branch feature at once, through the public API only."""
    session = PostgreSQLSession(CONVERSATION, database_url=url, ttl=timedelta(days=30))
    for number in (1, 2, 3):
        await _turn(session, f"question {number}", 100 * number)
    # "retry": forked before turn 2, with a turn of its own.
    assert await session.create_branch_from_turn(2, "retry") == "retry"
    await _turn(session, "question 2, asked again", 250)
    # "doomed": forked from main's turn 3, written to, then deleted (name reserved).
    await session.switch_to_branch("main")
    await session.create_branch_from_turn(3, "doomed")
    await session.add_items([{"role": "user", "content": "a dead end"}])
    await session.switch_to_branch("retry")
    await session.delete_branch("doomed")
    # "keep" shares main's turns 1-2; popping main below its fork freezes them.
    await session.switch_to_branch("main")
    await session.create_branch_from_turn(3, "keep")
    await _turn(session, "question 3 on keep", 300)
    await session.switch_to_branch("main")
    for _ in range(3):
        assert await session.pop_item() is not None
    await _turn(session, "question 4 on main", 400)
    # The conversation continues on "retry".
    await session.switch_to_branch("retry")
    return session


def _branch_names(url: str) -> list[str]:
    rows = _rows(url, branches_table)
    return ["main", *sorted(row.branch_id for row in rows if row.branch_id != "main")]


def _rows(url: str, table: Any, *columns: Any) -> list[Any]:
    engine = create_engine(parse_database_url(url).url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            query = select(*columns) if columns else select(table)
            return list(connection.execute(query.select_from(table)))
    finally:
        engine.dispose()


async def _api_view(
    session: PostgreSQLSession, names: list[str], *, timestamps: bool = True
) -> dict[str, Any]:
    """Everything the session API shows of the conversation (turn times optional)."""
    view: dict[str, Any] = {
        "current_items": await session.get_items(),
        "branches": await session.list_branches(),
        "session_usage": await session.get_session_usage(),
    }
    for name in names:
        view[name] = {
            "items": await session.get_items(branch_id=name),
            "turns": [
                turn if timestamps else {**turn, "timestamp": None}
                for turn in await session.get_conversation_turns(branch_id=name)
            ],
            "turn_usage": await session.get_turn_usage(branch_id=name),
            "usage": await session.get_session_usage(branch_id=name),
        }
    return view


def _export(url: str, conversation_ids: list[str] | None = None) -> bytes:
    output = io.BytesIO()
    export_conversations(get_store(url), output, conversation_ids=conversation_ids)
    return output.getvalue()


def _import(url: str, data: bytes) -> Any:
    with ExportFile(io.BytesIO(data)) as export:
        return import_export(get_store(url), export)


def _expiry(url: str, conversation_id: str) -> datetime | None:
    (row,) = [
        row
        for row in _rows(url, conversations_table)
        if row.id == conversation_id  # one conversation per check: small tables
    ]
    value: datetime | None = row.expires_at
    if value is not None and value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value


def _everything(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the four tables, ids included (for "nothing changed")."""
    m = messages_table
    return {
        "conversations": sorted(tuple(row) for row in _rows(url, conversations_table)),
        "messages": sorted(
            tuple(row)
            for row in _rows(
                url, m, m.c.id, m.c.branch_id, m.c.append_key, cast(m.c.item, Text), m.c.created_at
            )
        ),
        "branches": sorted(tuple(row) for row in _rows(url, branches_table)),
        "usage": sorted(
            tuple(json.dumps(value, sort_keys=True, default=str) for value in row)
            for row in _rows(url, usage_logs_table)
        ),
    }


# ---------------------------------------------------------------------- the round trip


async def test_branches_expiry_and_usage_details_survive_export_and_import(
    fresh_database_url: FreshUrl,
) -> None:
    source_url, target_url = fresh_database_url(), fresh_database_url()
    source = await _write_branched_conversation(source_url)
    # The scenario exercises what it means to: usage attributed to turns and
    # requests, a deleted branch, a frozen one, a row for main itself.
    usage_rows = _rows(source_url, usage_logs_table)
    assert all(row.request_index is not None for row in usage_rows)
    assert {row.branch_id for row in usage_rows} == {"main", "retry", "keep"}
    assert any(row.turn_message_id is not None for row in usage_rows)
    states = {row.branch_id: row.state for row in _rows(source_url, branches_table)}
    assert states["doomed"] == "deleted" and states["main"] == "live"
    assert sorted(states.values()).count("frozen") == 1
    names = _branch_names(source_url)
    before = await _api_view(source, names)
    assert before["current_items"] == before["retry"]["items"] != before["main"]["items"]
    assert before["doomed"]["items"] == []

    data = _export(source_url)
    records = [json.loads(line) for line in data.splitlines()]
    assert records[0]["version"] == 2
    assert [r["branch_id"] for r in records if r["type"] == "branch"] != []
    summary = _import(target_url, data)

    assert summary.refused == []
    assert summary.branches_imported == len(states)
    target = PostgreSQLSession(CONVERSATION, database_url=target_url, ttl=timedelta(days=30))
    assert _branch_names(target_url) == names
    assert await _api_view(target, names) == before
    assert _expiry(target_url, CONVERSATION) == _expiry(source_url, CONVERSATION) is not None
    # A deleted branch's name stays reserved after the move.
    with pytest.raises(BranchNameTakenError):
        await target.create_branch_from_turn(1, "doomed")

    # The moved conversation goes on as the original does: a new turn on main is
    # not inherited by the branches forked from it (fork bounds map to new ids).
    for session in (source, target):
        await session.switch_to_branch("main")
        await _turn(session, "question 5 on main", 500)
        await session.switch_to_branch("keep")
        await _turn(session, "question 4 on keep", 450)
    # (Turn times apart: the two new turns were written at different instants.)
    assert await _api_view(target, names, timestamps=False) == await _api_view(
        source, names, timestamps=False
    )


@pytest.mark.not_on_citus("moves between SQLite and PostgreSQL; the cluster runs the test above")
@pytest.mark.parametrize("direction", ["sqlite-to-postgresql", "postgresql-to-sqlite"])
async def test_branches_move_between_sqlite_and_postgresql(
    direction: str, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    sqlite_url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    postgres_url = postgres_server.create_database()
    source_url, target_url = (
        (sqlite_url, postgres_url) if direction.startswith("sqlite") else (postgres_url, sqlite_url)
    )
    source = await _write_branched_conversation(source_url)
    names = _branch_names(source_url)

    _import(target_url, _export(source_url))

    target = PostgreSQLSession(CONVERSATION, database_url=target_url)
    assert await _api_view(target, names) == await _api_view(source, names)
    assert _expiry(target_url, CONVERSATION) == _expiry(source_url, CONVERSATION)


async def test_importing_a_version_2_file_twice_changes_nothing(
    fresh_database_url: FreshUrl,
) -> None:
    source_url, target_url = fresh_database_url(), fresh_database_url()
    await _write_branched_conversation(source_url)
    data = _export(source_url)
    first = _import(target_url, data)
    after_first = _everything(target_url)

    again = _import(target_url, data)

    assert again.refused == []
    assert (again.conversations_unchanged, again.conversations_updated) == (1, 0)
    assert (again.messages_imported, again.messages_already_present) == (
        0,
        first.messages_imported,
    )
    assert (again.branches_imported, again.branches_already_present) == (
        0,
        first.branches_imported,
    )
    assert (again.usage_imported, again.usage_already_present) == (0, first.usage_imported)
    assert _everything(target_url) == after_first
    # ...and a re-export of the imported copy is the same file (but its header).
    assert _export(target_url).splitlines()[1:] == data.splitlines()[1:]


async def test_an_expired_conversation_stays_expired_after_the_move(
    fresh_database_url: FreshUrl,
) -> None:
    source_url, target_url = fresh_database_url(), fresh_database_url()
    session = PostgreSQLSession("gone", database_url=source_url, ttl=timedelta(hours=1))
    await session.add_items([{"role": "user", "content": "short-lived"}])
    with get_store(source_url).transaction() as repos:
        repos.connection.execute(
            update(conversations_table)
            .where(conversations_table.c.id == "gone")
            .values(expires_at=datetime.now(timezone.utc) - timedelta(minutes=1))
        )

    _import(target_url, _export(source_url))

    moved = PostgreSQLSession("gone", database_url=target_url)
    assert await moved.get_items() == []
    assert _expiry(target_url, "gone") == _expiry(source_url, "gone")


async def test_a_stored_branch_that_differs_refuses_the_conversation(
    fresh_database_url: FreshUrl,
) -> None:
    source_url, target_url = fresh_database_url(), fresh_database_url()
    await _write_branched_conversation(source_url)
    data = _export(source_url)
    _import(target_url, data)
    with get_store(target_url).transaction() as repos:
        repos.connection.execute(
            update(branches_table)
            .where(branches_table.c.branch_id == "retry")
            .values(state="deleted")
        )
    after_change = _everything(target_url)

    summary = _import(target_url, data)

    (refused,) = summary.refused
    assert "branch 'retry'" in refused.reason and "differs" in refused.reason
    assert _everything(target_url) == after_change


async def test_a_request_stored_with_other_usage_refuses_the_conversation(
    fresh_database_url: FreshUrl,
) -> None:
    source_url, target_url = fresh_database_url(), fresh_database_url()
    await _write_branched_conversation(source_url)
    data = _export(source_url)
    _import(target_url, data)
    # The same request of the same run, counted differently in the database.
    with get_store(target_url).transaction() as repos:
        repos.connection.execute(
            update(usage_logs_table)
            .where(usage_logs_table.c.branch_id == "retry")
            .values(prompt_tokens=usage_logs_table.c.prompt_tokens + 1)
        )
    after_change = _everything(target_url)

    summary = _import(target_url, data)

    (refused,) = summary.refused
    assert "is stored with other usage" in refused.reason
    assert _everything(target_url) == after_change


# ---------------------------------------------------------------------- a small v2 file


def _small_file(version: int = 2) -> list[dict[str, Any]]:
    """Conversation c: main holds q1 a1 q2 a2; b1 forks before q2 and holds q2' a2'."""
    at = "2026-11-01T10:00:00.000000+00:00"
    items = [
        ("main", {"role": "user", "content": "q1"}),
        ("main", {"role": "assistant", "content": "a1"}),
        ("main", {"role": "user", "content": "q2"}),
        ("main", {"role": "assistant", "content": "a2"}),
        ("b1", {"role": "user", "content": "q2'"}),
        ("b1", {"role": "assistant", "content": "a2'"}),
    ]
    conversation: dict[str, Any] = {
        "type": "conversation",
        "id": "c",
        "user_id": None,
        "created_at": at,
        "updated_at": at,
        "metadata": {},
    }
    usage: dict[str, Any] = {
        "type": "usage",
        "conversation_id": "c",
        "run_id": "run-1",
        "response_id": None,
        "model": "m",
        "requests": 1,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "timestamp": at,
    }
    if version >= 2:
        conversation.update(current_branch="b1", expires_at="2099-01-01T00:00:00.000000+00:00")
        usage.update(
            branch_id="b1",
            turn_position=4,
            request_index=0,
            cached_tokens=2,
            reasoning_tokens=1,
            input_tokens_details={"cached_tokens": 2},
            output_tokens_details={"reasoning_tokens": 1},
        )
    messages: list[dict[str, Any]] = []
    for position, (branch, item) in enumerate(items[: 6 if version >= 2 else 4]):
        message = {
            "type": "message",
            "conversation_id": "c",
            "position": position,
            "role": item["role"],
            "content": item["content"],
            "created_at": at,
            "append_key": None,
            "item_json": json.dumps(item),
        }
        if version >= 2:
            message["branch_id"] = branch
        messages.append(message)
    branches: list[dict[str, Any]] = [
        {
            "type": "branch",
            "conversation_id": "c",
            "branch_id": "b1",
            "parent_branch_id": "main",
            "fork_before_position": 2,
            "state": "live",
            "created_at": at,
        },
        {
            "type": "branch",
            "conversation_id": "c",
            "branch_id": "b2",
            "parent_branch_id": "b1",
            "fork_before_position": None,
            "state": "deleted",
            "created_at": at,
        },
        {
            # Forked after b1's last message, the conversation's last (a bound
            # past every message).
            "type": "branch",
            "conversation_id": "c",
            "branch_id": "b3",
            "parent_branch_id": "b1",
            "fork_before_position": 6,
            "state": "live",
            "created_at": at,
        },
    ]
    header: dict[str, Any] = {
        "type": "header",
        "format": "agents-sessions-export",
        "version": version,
        "exported_at": at,
        "source": "sqlite",
        "scope": {"conversation_ids": None, "user_id": None},
    }
    end: dict[str, Any] = {"type": "end", "conversations": 1, "messages": len(messages), "usage": 1}
    return [header, conversation, *messages, *(branches if version >= 2 else []), usage, end]


def _encode(records: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(record).encode() + b"\n" for record in records)


def _line_of(records: list[dict[str, Any]], kind: str, **match: Any) -> int:
    return next(
        number
        for number, record in enumerate(records, start=1)
        if record["type"] == kind and all(record.get(k) == v for k, v in match.items())
    )


async def test_a_small_version_2_file_imports_to_the_views_it_describes(
    fresh_database_url: FreshUrl,
) -> None:
    url = fresh_database_url()
    summary = _import(url, _encode(_small_file()))
    assert summary.refused == [] and summary.branches_imported == 3

    session = PostgreSQLSession("c", database_url=url)
    q1, a1 = {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}
    assert await session.get_items(branch_id="main") == [
        q1,
        a1,
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]
    b1 = [q1, a1, {"role": "user", "content": "q2'"}, {"role": "assistant", "content": "a2'"}]
    assert await session.get_items() == b1  # b1 is current
    assert await session.get_items(branch_id="b2") == []  # deleted
    assert await session.get_turn_usage(2, branch_id="b1") == {
        "requests": 1,
        "input_tokens": 10,
        "output_tokens": 5,
        "total_tokens": 15,
        "input_tokens_details": {"cached_tokens": 2},
        "output_tokens_details": {"reasoning_tokens": 1},
    }
    assert _expiry(url, "c") == datetime(2099, 1, 1, tzinfo=timezone.utc)
    # b3 inherits all of b1 as it was; what b1 gains later is not b3's.
    assert await session.get_items(branch_id="b3") == b1
    await session.add_items([{"role": "user", "content": "q3"}])
    assert len(await session.get_items(branch_id="b1")) == 5
    assert await session.get_items(branch_id="b3") == b1


def _set(kind: str, match: dict[str, Any], **values: Any) -> Callable[[list[dict[str, Any]]], int]:
    def mutate(records: list[dict[str, Any]]) -> int:
        number = _line_of(records, kind, **match)
        records[number - 1].update(values)
        return number

    return mutate


def _cycle(records: list[dict[str, Any]]) -> int:
    # b1's parent becomes b2, whose parent is b1.
    return _set("branch", {"branch_id": "b1"}, parent_branch_id="b2")(records)


def _usage_first(records: list[dict[str, Any]]) -> int:
    first_branch = _line_of(records, "branch", branch_id="b1")
    records.insert(first_branch - 1, records.pop(_line_of(records, "usage") - 1))
    return first_branch + 1  # now after the usage record


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_set("branch", {"branch_id": "b2"}, state="zombie"), "branch.state 'zombie'"),
        (
            _set("branch", {"branch_id": "b1"}, fork_before_position=7),
            "fork_before_position 7 is beyond the conversation's 6 messages",
        ),
        (
            _set("branch", {"branch_id": "b2"}, parent_branch_id="nowhere"),
            "'nowhere' names no branch record",
        ),
        (_cycle, "a cycle"),
        (
            _set("usage", {}, turn_position=6),
            "usage.turn_position 6 is beyond the conversation's 6 messages",
        ),
        (_set("message", {"position": 5}, branch_id="b9"), "'b9' names no branch record"),
        (_set("message", {"position": 5}, branch_id=" "), "message.branch_id cannot be empty"),
        (
            _set("conversation", {}, current_branch="b2"),
            "current_branch 'b2' is not a live branch",
        ),
        (_set("conversation", {}, expires_at="tomorrow"), "conversation.expires_at is not"),
        (_set("usage", {}, request_index=2**31), "usage.request_index must be null or"),
        (_set("usage", {}, input_tokens_details=[1]), "input_tokens_details must be null or"),
        (_usage_first, "a branch record after conversation 'c''s usage records"),
        (_set("branch", {"branch_id": "b2"}, branch_id="b1"), "branch 'b1' appears twice"),
        (
            _set("branch", {"branch_id": "b2"}, branch_id="main", parent_branch_id=None),
            "main is always live",
        ),
    ],
    ids=[
        "unknown-state",
        "fork-beyond-messages",
        "parent-missing",
        "cycle",
        "turn-position-out-of-range",
        "message-branch-missing",
        "blank-branch-name",
        "current-branch-deleted",
        "bad-expiry",
        "request-index-beyond-32-bits",
        "details-not-an-object",
        "out-of-order",
        "branch-twice",
        "main-deleted",
    ],
)
def test_a_malformed_version_2_file_is_refused_naming_the_line_and_nothing_is_written(
    fresh_database_url: FreshUrl,
    mutate: Callable[[list[dict[str, Any]]], int],
    message: str,
) -> None:
    url = fresh_database_url()
    get_store(url).ensure_schema()
    # A valid conversation before the bad one: it is not written either.
    good = _small_file()
    for record in good[1:-1]:
        record["conversation_id" if record["type"] != "conversation" else "id"] = "first"
    records = _small_file()
    number = mutate(records)
    combined = [good[0], *good[1:-1], *records[1:-1]]
    combined.append({**records[-1], "conversations": 2, "messages": 12, "usage": 2})
    number += len(good) - 2

    with pytest.raises(ExportFormatError) as raised:
        _import(url, _encode(combined))

    assert raised.value.line == number, str(raised.value)
    assert message in str(raised.value)
    assert _rows(url, conversations_table) == []
    assert _rows(url, branches_table) == []


# ---------------------------------------------------------------------- version 1


async def test_a_version_1_file_still_imports_onto_main_without_expiry_or_details(
    fresh_database_url: FreshUrl,
) -> None:
    url = fresh_database_url()
    data = _encode(_small_file(version=1))

    summary = _import(url, data)

    assert summary.refused == [] and summary.messages_imported == 4
    session = PostgreSQLSession("c", database_url=url)
    assert [item["content"] for item in await session.get_items()] == ["q1", "a1", "q2", "a2"]
    branches = await session.list_branches()
    assert [(branch["branch_id"], branch["is_current"]) for branch in branches] == [("main", True)]
    assert _expiry(url, "c") is None
    (usage,) = _rows(url, usage_logs_table)
    assert (usage.branch_id, usage.turn_message_id, usage.request_index) == (None, None, None)
    assert (usage.cached_tokens, usage.input_tokens_details) == (0, None)
    # Importing it again changes nothing; nor does it touch an expiry set since.
    with get_store(url).transaction() as repos:
        repos.connection.execute(
            update(conversations_table).values(expires_at=datetime(2099, 1, 1, tzinfo=timezone.utc))
        )
    before = _everything(url)
    again = _import(url, data)
    assert (again.messages_already_present, again.usage_already_present) == (4, 1)
    assert _everything(url) == before


def test_a_version_1_file_may_not_hold_version_2_records(tmp_path: Path) -> None:
    records = _small_file(version=1)
    records.insert(2, _small_file()[8])  # a branch record
    path = tmp_path / "v1.jsonl"
    path.write_bytes(_encode(records))

    with pytest.raises(ExportFormatError, match="unknown record type 'branch'") as raised:
        ExportFile(path)
    assert raised.value.line == 3
