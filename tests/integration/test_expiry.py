"""Retention by time-to-live and by turns: expired conversations read as empty and restart."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from agents import Agent, Runner, function_tool
from agents.testing import ScriptedModel, function_call
from click.testing import CliRunner
from sqlalchemy import event, func, select, update

from agents_sessions import (
    ConfigurationError,
    InvalidArgumentError,
    PostgreSQLSession,
    UsageEntry,
    get_store,
    load_settings,
)
from agents_sessions.cli import cli
from agents_sessions.db.models import conversations_table, messages_table, stored_utc
from agents_sessions.ops.retention import prune_expired, trim_turns


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def expire_now(session: PostgreSQLSession) -> None:
    """Move the conversation's expiry into the past (no sleeping in tests)."""
    with session.store.transaction() as repos:
        repos.connection.execute(
            update(conversations_table)
            .where(conversations_table.c.id == session.session_id)
            .values(expires_at=datetime.now(timezone.utc) - timedelta(minutes=1))
        )


def expiry_of(session: PostgreSQLSession) -> datetime | None:
    with session.store.read() as repos:
        value = repos.connection.execute(
            select(conversations_table.c.expires_at).where(
                conversations_table.c.id == session.session_id
            )
        ).scalar_one()
    return None if value is None else stored_utc(value)


def stored_rows(session: PostgreSQLSession) -> int:
    with session.store.read() as repos:
        return int(
            repos.connection.execute(
                select(func.count()).where(messages_table.c.conversation_id == session.session_id)
            ).scalar_one()
        )


async def test_every_write_sets_and_extends_the_expiry(database_url: str) -> None:
    session = PostgreSQLSession(
        f"ttl-{uuid.uuid4()}", database_url=database_url, ttl=timedelta(days=30)
    )
    before = datetime.now(timezone.utc)
    await session.add_items([user("a"), user("b")])
    first = expiry_of(session)
    assert first is not None
    assert before + timedelta(days=29) < first < before + timedelta(days=31)
    with session.store.transaction() as repos:  # pretend it was written long ago
        repos.connection.execute(
            update(conversations_table)
            .where(conversations_table.c.id == session.session_id)
            .values(expires_at=first - timedelta(days=10))
        )
    await session.pop_item()
    popped = expiry_of(session)
    assert popped is not None and popped > first - timedelta(days=1)


async def test_an_expired_conversation_reads_as_empty_before_anything_deletes_it(
    database_url: str,
) -> None:
    word = "zq" + uuid.uuid4().hex[:10]
    session = PostgreSQLSession(
        f"ttl-{uuid.uuid4()}", database_url=database_url, ttl=timedelta(hours=1)
    )
    await session.add_items([user(f"{word} one"), user(f"{word} two")])
    await session.create_branch_from_turn(2, "alt")
    await session.add_items([user(f"{word} three")])
    assert len(await session.list_branches()) == 2
    expire_now(session)
    assert await session.get_items() == []
    assert await session.get_items(limit=1) == []
    # Every branch of it, named or current, and every view built on them.
    assert await session.get_items(branch_id="main") == []
    assert await session.get_items(limit=1, branch_id="alt") == []
    assert await session.get_conversation_turns() == []
    assert await session.get_conversation_turns("main") == []
    assert await session.list_branches() == []
    assert await session.get_session_usage() is None
    assert await session.pop_item() is None
    with session.store.read() as repos:
        assert repos.messages.search(word).hits == []
    assert stored_rows(session) == 3  # still there until pruned or restarted


async def test_the_next_write_starts_an_expired_conversation_afresh(database_url: str) -> None:
    ttl = timedelta(hours=1)
    session = PostgreSQLSession(f"ttl-{uuid.uuid4()}", database_url=database_url, ttl=ttl)
    await session.add_items([user("old 1"), user("old 2")])

    @function_tool(needs_approval=True)
    def act() -> str:
        """Needs approval."""
        return "done"

    agent = Agent(
        name="a", model=ScriptedModel([[function_call("act", {}, call_id="x")]]), tools=[act]
    )
    result = await Runner.run(agent, "old 3", session=session)
    await session.save_run_state(result.to_state())
    expire_now(session)

    await session.add_items([user("new 1")])
    assert await session.get_items() == [user("new 1")]
    assert stored_rows(session) == 1  # the old history is gone for good
    assert await session.load_run_state(agent) is None
    expiry = expiry_of(session)
    assert expiry is not None and expiry > datetime.now(timezone.utc) + timedelta(minutes=30)

    # A writer without a TTL restarts it too, leaving it without expiry.
    expire_now(session)
    plain = PostgreSQLSession(session.session_id, database_url=database_url)
    await plain.add_items([user("newer")])
    assert await plain.get_items() == [user("newer")]
    assert expiry_of(plain) is None


async def test_other_writers_never_revive_an_expired_history(database_url: str) -> None:
    session = PostgreSQLSession(
        f"ttl-{uuid.uuid4()}", database_url=database_url, ttl=timedelta(hours=1)
    )
    await session.add_items([user("secret")])
    expire_now(session)
    with session.store.transaction() as repos:
        repos.conversations.ensure(session.session_id)
        repos.usage.record(session.session_id, [UsageEntry(model="m", prompt_tokens=1)])
        repos.conversations.upsert(session.session_id, metadata={"k": "v"})
    await session.clear_session()
    assert await session.get_items() == []
    assert await PostgreSQLSession(session.session_id, database_url=database_url).get_items() == []


@pytest.mark.postgres_only
async def test_concurrent_writers_of_an_expired_conversation_both_land(
    database_url: str,
) -> None:
    conversation_id = f"ttl-{uuid.uuid4()}"
    first = PostgreSQLSession(conversation_id, database_url=database_url, ttl=timedelta(hours=1))
    await first.add_items([user(f"old {n}") for n in range(50)])
    for _ in range(5):
        expire_now(first)
        writers = [
            PostgreSQLSession(conversation_id, database_url=database_url, ttl=timedelta(hours=1))
            for _ in range(4)
        ]
        await asyncio.gather(*(w.add_items([user(f"w{n}")]) for n, w in enumerate(writers)))
        items = await first.get_items()
        assert sorted(item["content"] for item in items) == ["w0", "w1", "w2", "w3"]


def test_the_ttl_setting_reads_durations_with_units() -> None:
    assert load_settings(ttl="30d").ttl == timedelta(days=30)
    assert load_settings(ttl="12h").ttl == timedelta(hours=12)
    assert load_settings(ttl=90).ttl == timedelta(seconds=90)
    assert load_settings().ttl is None
    with pytest.raises(ConfigurationError, match="ttl"):
        load_settings(ttl="soon")
    with pytest.raises(ConfigurationError, match="ttl"):
        load_settings(ttl="0s")


async def test_sessions_take_the_ttl_setting_and_check_their_own(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTS_SESSIONS_TTL", "12h")
    session = PostgreSQLSession(f"env-{uuid.uuid4()}", database_url=database_url)
    assert session.ttl == timedelta(hours=12)
    with pytest.raises(InvalidArgumentError, match="ttl"):
        PostgreSQLSession("x", database_url=database_url, ttl=timedelta(0))
    with pytest.raises(InvalidArgumentError, match="keep_last_turns"):
        PostgreSQLSession("x", database_url=database_url, keep_last_turns=0)


async def test_keep_last_turns_trims_after_each_write(database_url: str) -> None:
    session = PostgreSQLSession(
        f"turns-{uuid.uuid4()}", database_url=database_url, keep_last_turns=2
    )
    for turn in range(4):
        await session.add_items([user(f"q{turn}"), {"role": "assistant", "content": f"a{turn}"}])
    assert [item["content"] for item in await session.get_items()] == ["q2", "a2", "q3", "a3"]


async def test_prune_expired_deletes_only_expired_conversations_in_batches(
    fresh_database_url: Any,
) -> None:
    url = fresh_database_url()
    live = PostgreSQLSession("live", database_url=url, ttl=timedelta(hours=1))
    forever = PostgreSQLSession("forever", database_url=url)
    gone = [
        PostgreSQLSession(f"gone-{n}", database_url=url, ttl=timedelta(hours=1)) for n in range(3)
    ]
    for session in (live, forever, *gone):
        await session.add_items([user(f"m{n}") for n in range(4)])
    for session in gone:
        expire_now(session)
    store = get_store(url)

    dry = json.loads(
        CliRunner()
        .invoke(cli, ["--database-url", url, "prune", "--expired", "--dry-run", "--json"])
        .stdout
    )
    assert (dry["conversations"], dry["messages"], dry["dry_run"]) == (3, 12, True)
    summary = prune_expired(store, batch_size=5)
    assert (summary.conversations, summary.messages) == (3, 12)
    assert summary.batches >= 3 and summary.largest_batch <= 5
    with store.read() as repos:
        assert repos.conversations.get("gone-0") is None
        assert len(repos.messages.all("live")) == len(repos.messages.all("forever")) == 4
    again = CliRunner().invoke(cli, ["--database-url", url, "prune", "--expired"])
    assert again.exit_code == 0 and "deleted 0 conversations" in again.output

    # Every message is a user message here: each is a turn, the newest one stays.
    trimmed = trim_turns(store, 1)
    assert (trimmed.messages, trimmed.conversations_trimmed) == (6, 2)


async def test_prune_options_are_exclusive_and_trim_turns_from_the_cli(
    fresh_database_url: Any,
) -> None:
    url = fresh_database_url()
    session = PostgreSQLSession("chat", database_url=url)
    for turn in range(3):
        await session.add_items([user(f"q{turn}"), {"role": "assistant", "content": f"a{turn}"}])
    both = CliRunner().invoke(
        cli, ["--database-url", url, "prune", "--expired", "--older-than", "1d"]
    )
    assert both.exit_code == 2
    result = CliRunner().invoke(
        cli, ["--database-url", url, "prune", "--keep-last-turns", "1", "--yes", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["messages"] == 4
    assert [item["content"] for item in await session.get_items()] == ["q2", "a2"]


def _expire_in(session: PostgreSQLSession, delay: timedelta) -> datetime:
    expires = datetime.now(timezone.utc) + delay
    with session.store.transaction() as repos:
        repos.connection.execute(
            update(conversations_table)
            .where(conversations_table.c.id == session.session_id)
            .values(expires_at=expires)
        )
    return expires


async def test_a_pop_extends_the_expiry_only_when_it_pops_an_item(database_url: str) -> None:
    session = PostgreSQLSession(
        f"ttl-{uuid.uuid4()}", database_url=database_url, ttl=timedelta(days=30)
    )
    await session.add_items([user("a")])
    _expire_in(session, timedelta(days=1))
    assert await session.pop_item() == user("a")
    extended = expiry_of(session)
    assert extended is not None and extended > datetime.now(timezone.utc) + timedelta(days=29)

    unchanged = _expire_in(session, timedelta(days=1))
    assert await session.pop_item() is None  # nothing to pop: the expiry stays
    assert expiry_of(session) == unchanged


@pytest.mark.not_on_citus("on Citus the session's calls run in worker threads")
async def test_a_pop_with_a_ttl_is_one_round_trip_on_the_event_loop(postgres_url: str) -> None:
    session = PostgreSQLSession(
        f"ttl-{uuid.uuid4()}", database_url=postgres_url, ttl=timedelta(days=30)
    )
    await session.add_items([user("a"), user("b")])
    _expire_in(session, timedelta(days=1))
    checkouts: list[Any] = []
    event.listen(session.store.engine, "checkout", lambda *_: checkouts.append(1))

    assert await session.pop_item() == user("b")
    assert checkouts == []  # no transaction in a worker thread
    extended = expiry_of(session)
    assert extended is not None and extended > datetime.now(timezone.utc) + timedelta(days=29)


@pytest.mark.not_on_citus("on Citus the session's calls run in worker threads")
async def test_a_trimming_session_appends_and_trims_in_one_round_trip_on_the_event_loop(
    postgres_url: str,
) -> None:
    session = PostgreSQLSession(
        f"trim-{uuid.uuid4()}", database_url=postgres_url, keep_last_turns=2
    )
    await session.get_items()  # the schema check (a worker thread) is behind us
    checkouts: list[Any] = []
    event.listen(session.store.engine, "checkout", lambda *_: checkouts.append(1))

    for turn in range(4):
        await session.add_items([user(f"q{turn}"), {"role": "assistant", "content": f"a{turn}"}])

    assert checkouts == []  # no second statement in a worker thread
    contents = [item["content"] for item in await session.get_items()]
    assert contents == ["q2", "a2", "q3", "a3"]
