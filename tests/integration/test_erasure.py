"""Erased data stays erased: a long-lived session that keeps writing after its
conversation was erased, deleted or pruned re-creates it *owned*, so the next
erasure of that user finds it (the owner rides with every write, not only the first).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from agents_sessions import PostgreSQLSession, get_store
from agents_sessions.ops.retention import erase_user, prune

FreshUrl = Callable[[], str]


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def _erase(url: str) -> None:
    erase_user(get_store(url), "alice")


def _delete(url: str) -> None:
    with get_store(url).transaction() as repos:
        assert repos.conversations.delete("alice-conv")


def _prune(url: str) -> None:
    later = datetime.now(timezone.utc) + timedelta(days=30)
    assert prune(get_store(url), timedelta(days=1), now=later).conversations == 1


@pytest.mark.parametrize("remove", [_erase, _delete, _prune], ids=["erase", "delete", "prune"])
async def test_a_session_writing_after_its_conversation_was_removed_recreates_it_owned(
    fresh_database_url: FreshUrl, remove: Callable[[str], None]
) -> None:
    url = fresh_database_url()
    session = PostgreSQLSession("alice-conv", database_url=url, user_id="alice")
    await session.add_items([user("before")])
    await session.add_items([user("second turn")])  # the owner is no longer "pending"
    remove(url)

    await session.add_items([user("after removal")])  # the same long-lived object
    await session.pop_item()
    await session.add_items([user("private text")])

    with get_store(url).read() as repos:
        record = repos.conversations.get("alice-conv")
        assert record is not None and record.user_id == "alice"
    erased = erase_user(get_store(url), "alice")
    assert erased.conversations == 1
    with get_store(url).read() as repos:
        assert repos.conversations.get("alice-conv") is None
        assert repos.messages.all("alice-conv") == []
