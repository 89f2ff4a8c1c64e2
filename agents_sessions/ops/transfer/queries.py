"""Statements export and import share: references to messages read as positions.

Message ids do not survive an import, so the file refers to a message by its
position in the conversation (0 for the oldest, in ``messages.id`` order). Export
writes those positions and import compares stored rows with the file's in the same
terms, with these statements. Each filters on one conversation id in every part, so
on Citus each runs on the one worker holding that conversation.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Text, bindparam, case, func, select

from ...db.models import branches_table as branches
from ...db.models import messages_table as messages
from ...db.models import usage_logs_table as usage_logs

_CONVERSATION = bindparam("conversation_id", type_=Text)


def _numbered() -> Any:
    """The conversation's messages with their positions (``row_number`` in id order)."""
    position = func.row_number().over(
        # Partitioned by the distribution column: Citus pushes such a window down.
        partition_by=messages.c.conversation_id,
        order_by=messages.c.id,
    )
    return (
        select(messages.c.conversation_id, messages.c.id, (position - 1).label("position"))
        .where(messages.c.conversation_id == _CONVERSATION)
        .subquery("numbered")
    )


_NUMBERED = _numbered()

#: The conversation's ``usage_logs`` rows in id order, each with ``turn_position``:
#: the position of its turn message (NULL when it has none or that message is gone).
USAGE_WITH_POSITIONS = (
    select(usage_logs, _NUMBERED.c.position.label("turn_position"))
    .select_from(
        usage_logs.outerjoin(
            _NUMBERED,
            (_NUMBERED.c.conversation_id == usage_logs.c.conversation_id)
            & (_NUMBERED.c.id == usage_logs.c.turn_message_id),
        )
    )
    .where(usage_logs.c.conversation_id == _CONVERSATION)
    .order_by(usage_logs.c.id)
)

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

#: The ids of the messages at the given ``positions`` (an expanding parameter).
IDS_AT_POSITIONS = select(_NUMBERED.c.position, _NUMBERED.c.id).where(
    _NUMBERED.c.position.in_(bindparam("positions", expanding=True))
)

#: The conversation's highest message id (NULL when it has none).
LAST_MESSAGE_ID = select(func.max(messages.c.id)).where(messages.c.conversation_id == _CONVERSATION)

__all__ = [
    "BRANCHES_WITH_POSITIONS",
    "IDS_AT_POSITIONS",
    "LAST_MESSAGE_ID",
    "USAGE_WITH_POSITIONS",
]
