"""Cancellation of a started write: wait for its outcome, then let the cancellation through."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

_T = TypeVar("_T")


async def settle_then_propagate_cancellation(future: Awaitable[_T]) -> _T:
    """Wait for a started mutation to finish even if the caller is cancelled meanwhile.

    The database work (in a thread, or a statement sent on the loop) cannot be
    interrupted half-way anyway; waiting for it means the caller's cancellation never
    hides whether the write happened, and no later call on this session overtakes it.
    The cancellation is re-raised once the outcome is known (as the SDK's own backends do).
    """
    task = asyncio.ensure_future(future)
    cancellation: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError as exc:
            cancellation = cancellation or exc
    if cancellation is not None:
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log it as unhandled
        raise cancellation
    return task.result()
