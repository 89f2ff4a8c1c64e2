"""Idempotency keys for ``add_items``: unique per call, and cheap to make.

Every ``add_items`` call on PostgreSQL carries a key so that a retry after a connection
lost around the commit stores its items once (see ``MessageRepository.append``). The
key only has to be unique among the keys of one conversation within
``APPEND_KEY_RETENTION``; a ``uuid4`` per call (an ``os.urandom`` system call and a
``UUID`` object) is more than that needs. A key here is a random 96-bit prefix drawn
once per process -- again in a forked child, which must not repeat its parent's keys --
followed by a counter: two processes collide only if their prefixes do (one chance in
2**96 per pair).
"""

from __future__ import annotations

import itertools
import os

_prefix = os.urandom(12).hex()
# itertools.count's __next__ is one C call: atomic under the GIL, so threads never
# draw the same number.
_counter = itertools.count()


def new_append_key() -> str:
    """A key no other call of any process is using (at most 40 characters)."""
    return f"{_prefix}{next(_counter):x}"


def _reset_after_fork() -> None:
    global _prefix, _counter
    _prefix = os.urandom(12).hex()
    _counter = itertools.count()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
