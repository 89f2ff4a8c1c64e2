"""Functions run in child processes by the multi-process tests (spawned, not forked)."""

from __future__ import annotations

import asyncio
from typing import Any

from agents_sessions import PostgreSQLSession


def write_batches(
    database_url: str, conversation_id: str, writer: int, calls: int, size: int
) -> int:
    """Append ``calls`` batches of ``size`` items labelled (writer, call, index)."""

    async def run() -> int:
        session = PostgreSQLSession(conversation_id, database_url=database_url)
        for call in range(calls):
            await session.add_items(
                [
                    {"role": "user", "content": f"w{writer}-c{call}-i{index}"}
                    for index in range(size)
                ]
            )
        return calls * size

    return asyncio.run(run())


def pop_until_empty(database_url: str, conversation_id: str) -> list[Any]:
    """Pop items until the conversation is empty; return what this process got."""

    async def run() -> list[Any]:
        session = PostgreSQLSession(conversation_id, database_url=database_url)
        popped = []
        while (item := await session.pop_item()) is not None:
            popped.append(item)
        return popped

    return asyncio.run(run())
