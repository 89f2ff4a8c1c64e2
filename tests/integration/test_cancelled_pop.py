"""A cancelled ``pop_item``: the same outcome as the Agents SDK's own backends.

Decision (README, "Cancellation"): a pop that has started is finished, then the
cancellation is re-raised -- the SDK's ``_await_mutation`` rule for every write. The
item is then gone and the cancelled caller never receives it, exactly as with the
SDK's ``SQLiteSession``. Putting it back could reorder history (another append may
have landed meanwhile); a caller that must not lose popped items does not cancel
the pop (``asyncio.shield`` it).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from agents.memory import SQLiteSession

from agents_sessions import PostgreSQLSession


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


async def _cancel_a_started_pop(session: Any) -> tuple[str, list[Any]]:
    """The script: two items, a pop cancelled once it has started, then the history."""
    await session.add_items([user("a"), user("b")])
    task = asyncio.ensure_future(session.pop_item())
    await asyncio.sleep(0)  # the pop has started (its write is handed to a thread)
    task.cancel()
    try:
        popped = await task
    except asyncio.CancelledError:
        outcome = "cancelled"
    else:
        outcome = f"returned {popped!r}"
    return outcome, await session.get_items()


async def test_a_cancelled_pop_item_behaves_as_the_sdk_backends_do(
    database_url: str, conversation_id: str, tmp_path: Path
) -> None:
    sdk = SQLiteSession(conversation_id, str(tmp_path / "sdk.sqlite3"))
    try:
        expected = await _cancel_a_started_pop(sdk)
    finally:
        sdk.close()
    ours = await _cancel_a_started_pop(
        PostgreSQLSession(conversation_id, database_url=database_url)
    )

    assert expected == ("cancelled", [user("a")])  # the SDK: finished, item gone, re-raised
    assert ours == expected


async def test_a_shielded_pop_item_survives_its_callers_cancellation(
    database_url: str, conversation_id: str
) -> None:
    session = PostgreSQLSession(conversation_id, database_url=database_url)
    await session.add_items([user("a"), user("b")])
    pop = asyncio.ensure_future(session.pop_item())
    waiter = asyncio.ensure_future(asyncio.shield(pop))
    await asyncio.sleep(0)
    waiter.cancel()
    assert await pop == user("b")  # the documented way not to lose a popped item
