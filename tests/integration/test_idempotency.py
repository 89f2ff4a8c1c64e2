"""Exactly-once appends: an idempotency key makes a repeated append write nothing."""

from __future__ import annotations

import threading
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import text

from agents_sessions import get_store
from agents_sessions.repositories import Repositories


def user(text_: str) -> dict[str, Any]:
    return {"role": "user", "content": text_}


def test_an_append_repeated_with_its_key_writes_nothing_the_second_time(
    database_url: str, conversation_id: str
) -> None:
    store = get_store(database_url)
    key = uuid.uuid4().hex
    with store.transaction() as repos:
        assert (
            repos.messages.append(conversation_id, [user("a"), user("b")], idempotency_key=key) == 2
        )
    with store.transaction() as repos:
        assert (
            repos.messages.append(conversation_id, [user("a"), user("b")], idempotency_key=key) == 0
        )
        # The transaction stays usable after the replay was detected.
        assert repos.messages.append(conversation_id, [user("c")]) == 1
    with store.read() as repos:
        assert repos.messages.all(conversation_id) == [user("a"), user("b"), user("c")]


def test_keys_are_scoped_to_their_conversation_and_unkeyed_appends_never_collide(
    database_url: str,
) -> None:
    store = get_store(database_url)
    first, second = f"c-{uuid.uuid4()}", f"c-{uuid.uuid4()}"
    with store.transaction() as repos:
        repos.messages.append(first, [user("x")], idempotency_key="same-key")
        assert repos.messages.append(second, [user("y")], idempotency_key="same-key") == 1
        for _ in range(3):
            assert repos.messages.append(first, [user("z")]) == 1
    with store.read() as repos:
        assert repos.messages.all(first) == [user("x")] + [user("z")] * 3
        assert repos.messages.all(second) == [user("y")]


def test_a_facade_append_in_autocommit_mode_returns_zero_on_replay(
    database_url: str, conversation_id: str
) -> None:
    store = get_store(database_url)
    append = store.run_write(
        lambda repos: repos.messages.append(conversation_id, [user("a")], idempotency_key="k1"),
        repeatable=True,
    )
    replay = store.run_write(
        lambda repos: repos.messages.append(conversation_id, [user("a")], idempotency_key="k1"),
        repeatable=True,
    )
    assert (append, replay) == (1, 0)


@pytest.mark.postgres_only
@pytest.mark.not_on_citus("watches the lock wait on the coordinator; a worker holds it there")
def test_a_retry_racing_its_still_running_first_attempt_is_stored_once(
    postgres_url: str, conversation_id: str
) -> None:
    """The first attempt is uncommitted when the retry starts (a network partition).

    The retry's EXISTS check cannot see the first attempt's rows (its snapshot
    predates that commit); the partial unique index makes it fail, and the
    repository reports "already appended" rather than storing the items twice.
    """
    store = get_store(postgres_url)
    key = uuid.uuid4().hex
    with store.transaction() as repos:
        repos.conversations.ensure(conversation_id)
    first = store.engine.connect()
    first_transaction = first.begin()
    Repositories(first).messages.append(conversation_id, [user("once")], idempotency_key=key)
    results: list[int] = []
    errors: list[BaseException] = []

    def retry() -> None:
        try:
            results.append(
                store.run_write(
                    lambda repos: repos.messages.append(
                        conversation_id, [user("once")], idempotency_key=key
                    ),
                    repeatable=True,
                )
            )
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=retry)
    thread.start()
    # The retry now waits on the conversation row lock the first attempt holds.
    with store.engine.connect() as observer:
        for _ in range(200):
            waiting = observer.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE wait_event_type = 'Lock' AND datname = current_database()"
                )
            ).scalar_one()
            # pg_stat_activity is a snapshot per transaction: end it to see anew.
            observer.rollback()
            if waiting:
                break
            threading.Event().wait(0.05)
        activity = observer.execute(
            text(
                "SELECT state, wait_event_type, wait_event, left(query, 60) "
                "FROM pg_stat_activity WHERE datname = current_database()"
            )
        ).all()
        assert waiting == 1, activity
    first_transaction.commit()
    first.close()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert errors == []
    assert results == [0]
    with store.read() as repos:
        assert repos.messages.all(conversation_id) == [user("once")]


@pytest.mark.postgres_only
def test_a_keyed_append_after_another_statement_in_autocommit_mode_works(
    postgres_url: str, conversation_id: str
) -> None:
    store = get_store(postgres_url)

    def count_then_append(repos: Repositories) -> int:
        repos.messages.count(conversation_id)  # SQLAlchemy now thinks it is "in a transaction"
        return repos.messages.append(conversation_id, [user("x")], idempotency_key="k-auto")

    assert store.run_write(count_then_append, repeatable=True) == 1
    assert store.run_write(count_then_append, repeatable=True) == 0


@pytest.mark.parametrize("remove", ["pop", "clear"])
def test_a_repeated_append_finds_its_key_after_a_pop_or_clear_took_its_items(
    database_url: str, conversation_id: str, remove: str
) -> None:
    # The retry after a lost commit, when a concurrent pop or clear has already
    # removed the call's first row (which used to be the only place its key lived).
    store = get_store(database_url)
    for _ in range(2):
        key = uuid.uuid4().hex
        with store.transaction() as repos:
            repos.messages.append(conversation_id, [user("once")], idempotency_key=key)
        with store.transaction() as repos:
            if remove == "pop":
                assert repos.messages.pop_latest(conversation_id) == user("once")
            else:
                repos.messages.clear(conversation_id)
        stored = store.run_write(
            lambda repos, key=key: repos.messages.append(  # type: ignore[misc]
                conversation_id, [user("once")], idempotency_key=key
            ),
            repeatable=True,
        )
        assert stored == 0
        with store.read() as repos:
            assert repos.messages.all(conversation_id) == []


async def test_add_items_repeated_with_the_same_idempotency_key_stores_its_items_once(
    database_url: str, conversation_id: str
) -> None:
    from agents_sessions import PostgreSQLSession

    session = PostgreSQLSession(conversation_id, database_url=database_url)
    await session.add_items([user("a"), user("b")], idempotency_key="call-1")
    assert await session.pop_item() == user("b")
    await session.add_items([user("a"), user("b")], idempotency_key="call-1")
    await session.add_items([user("c")])
    assert await session.get_items() == [user("a"), user("c")]
    with pytest.raises(ValueError, match="idempotency_key"):
        await session.add_items([user("d")], idempotency_key="")


def test_append_keys_older_than_their_retention_are_deleted_by_later_appends(
    database_url: str, conversation_id: str
) -> None:
    from agents_sessions.repositories.messages import APPEND_KEY_RETENTION

    store = get_store(database_url)
    with store.transaction() as repos:
        repos.messages.append(conversation_id, [user("old")], idempotency_key="old-key")
        repos.connection.execute(
            text(
                "UPDATE append_keys SET created_at = :then WHERE key = 'old-key' "
                "AND conversation_id = :c"
            ),
            {
                "then": datetime.now(timezone.utc) - APPEND_KEY_RETENTION - timedelta(hours=1),
                "c": conversation_id,
            },
        )
    # On PostgreSQL one append in KEY_CLEANUP_ONE_IN (at random) drops the old keys:
    # 1,000 appends miss it with a probability below 1e-13.
    keys: list[str] = []
    for attempt in range(1000):
        with store.transaction() as repos:
            repos.messages.append(conversation_id, [user("new")], idempotency_key=f"k{attempt}")
        with store.read() as repos:
            keys = list(
                repos.connection.execute(
                    text("SELECT key FROM append_keys WHERE conversation_id = :c"),
                    {"c": conversation_id},
                ).scalars()
            )
        if "old-key" not in keys:
            break
    assert "old-key" not in keys
    assert f"k{attempt}" in keys  # the recent keys stay
