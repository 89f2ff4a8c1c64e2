"""Statements export and import share: references to messages read as positions.

Message ids do not survive an import, so the file refers to a message by its
position in the conversation (0 for the oldest, in ``messages.id`` order). Export
writes those positions and import compares stored rows with the file's in the same
terms, with these statements. Each filters on one conversation id in every part, so
on Citus each runs on the one worker holding that conversation.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from sqlalchemy import Connection, Text, bindparam, case, func, select

from ...db.models import branches_table as branches
from ...db.models import messages_table as messages
from ...db.models import usage_logs_table as usage_logs

_CONVERSATION = bindparam("conversation_id", type_=Text)

#: The conversation's ``usage_logs`` rows, in id order.
USAGE_OF = (
    select(usage_logs)
    .where(usage_logs.c.conversation_id == _CONVERSATION)
    .order_by(usage_logs.c.id)
)

#: The messages its usage rows name as their turn's, in id order.
TURN_MESSAGE_IDS = (
    select(usage_logs.c.turn_message_id)
    .where(
        usage_logs.c.conversation_id == _CONVERSATION,
        usage_logs.c.turn_message_id.isnot(None),
    )
    .distinct()
    .order_by(usage_logs.c.turn_message_id)
)

# Message ids a keyset page at a time: tiny rows, so big pages, and no cursor to
# declare and close for the common short conversation.
_ID_PAGE = 10_000
_MESSAGE_IDS = (
    select(messages.c.id)
    .where(messages.c.conversation_id == _CONVERSATION, messages.c.id > bindparam("after_id"))
    .order_by(messages.c.id)
    .limit(_ID_PAGE)
)


def _message_ids(connection: Connection, conversation_id: str) -> Iterator[int]:
    """The conversation's message ids in history order (position 0 first)."""
    after_id = -1
    while True:
        parameters = {"conversation_id": conversation_id, "after_id": after_id}
        page = connection.execute(_MESSAGE_IDS, parameters).scalars().all()
        yield from page
        if len(page) < _ID_PAGE:
            return
        after_id = page[-1]


# Why one ordered walk over the ids rather than SQL: a join of usage rows to a
# row_number() subquery re-numbers the messages for every usage row on SQLite (and
# on PostgreSQL when it plans a cursor) -- quadratic in a long conversation. The
# walk is linear on both, and keeps one entry per id or position asked for (one per
# turn with usage, not one per message).


def positions_of(
    connection: Connection, conversation_id: str, ids: Iterable[int]
) -> dict[int, int]:
    """The positions of the messages ``ids`` in their conversation (absent: no such message)."""
    wanted = set(ids)
    found: dict[int, int] = {}
    if wanted:
        for position, message_id in enumerate(_message_ids(connection, conversation_id)):
            if message_id in wanted:
                found[message_id] = position
                if len(found) == len(wanted):
                    break
    return found


def ids_at(
    connection: Connection, conversation_id: str, positions: Iterable[int]
) -> dict[int, int]:
    """The ids of the messages at ``positions`` (absent: beyond the last message)."""
    wanted = set(positions)
    found: dict[int, int] = {}
    if wanted:
        last = max(wanted)
        for position, message_id in enumerate(_message_ids(connection, conversation_id)):
            if position in wanted:
                found[position] = message_id
            if position == last:
                break
    return found


# How many of the conversation's messages lie below a branch's fork bound: the
# bound as a position (it need not be the id of a message that still exists).
_BELOW_FORK = (
    select(func.count())
    .where(
        # The conversation as a parameter here too, not only through the
        # correlation: every table of the statement is filtered on one value.
        messages.c.conversation_id == _CONVERSATION,
        messages.c.conversation_id == branches.c.conversation_id,
        messages.c.id < branches.c.fork_before_id,
    )
    .scalar_subquery()
)

#: The conversation's ``conversation_branches`` rows, oldest first, each with
#: ``fork_before_position`` (NULL when the branch has no bound).
BRANCHES_WITH_POSITIONS = (
    select(
        branches.c.branch_id,
        branches.c.parent_branch_id,
        case((branches.c.fork_before_id.is_(None), None), else_=_BELOW_FORK).label(
            "fork_before_position"
        ),
        branches.c.state,
        branches.c.created_at,
    )
    .where(branches.c.conversation_id == _CONVERSATION)
    .order_by(branches.c.created_at, branches.c.branch_id)
)

#: The conversation's highest message id (NULL when it has none).
LAST_MESSAGE_ID = select(func.max(messages.c.id)).where(messages.c.conversation_id == _CONVERSATION)

__all__ = [
    "BRANCHES_WITH_POSITIONS",
    "LAST_MESSAGE_ID",
    "TURN_MESSAGE_IDS",
    "USAGE_OF",
    "ids_at",
    "positions_of",
]
