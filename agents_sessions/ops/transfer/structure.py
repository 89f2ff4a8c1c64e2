"""The structure rules of one conversation in an export file, and its cross-references.

:class:`ConversationBlock` holds what :mod:`.reading` needs to check a conversation's
records against each other: their order (fixed in version 2), and once all are read,
that every branch a message names has a record, that every parent exists and no
branch is its own ancestor, and that the current branch is a live one.
"""

from __future__ import annotations

from typing import Any

from ...db.statements import MAIN_BRANCH
from ...errors import ExportFormatError
from .records import SECTIONS, BranchLine, ConversationLine


def short(value: Any) -> str:
    """``repr(value)``, cut to 60 characters for an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class ConversationBlock:
    """What the structure rules need of the conversation being read.

    Never its messages: counters, its append keys and (run, request) keys, its
    branch records and the names of the branches its messages belong to.
    """

    def __init__(self, entry: ConversationLine, version: int) -> None:
        self.entry = entry
        self.version = version
        self.messages = 0
        self.section = 0
        self.run_state_seen = False
        self.append_keys: set[str] = set()
        self.usage_keys: set[tuple[str, int]] = set()
        # Branch name -> the first message line it owns.
        self.owners: dict[str, int] = {}
        self.branches: dict[str, BranchLine] = {}

    def enter(self, kind: str, line: int) -> None:
        """Check a record of type ``kind`` may come here (version 2 fixes the order)."""
        section = SECTIONS[kind]
        if self.version >= 2 and section < self.section:
            later = next(name for name, rank in SECTIONS.items() if rank == self.section)
            raise ExportFormatError(
                line,
                f"a {kind} record after conversation {short(self.entry.id)}'s "
                f"{later} records (the order is message, branch, usage, run_state)",
            )
        self.section = max(self.section, section)

    def close(self) -> None:
        """The cross-references, once every record of the conversation was read."""
        conversation = short(self.entry.id)
        for name, line in self.owners.items():
            if name != MAIN_BRANCH and name not in self.branches:
                raise ExportFormatError(
                    line,
                    f"message.branch_id {short(name)} names no branch record of "
                    f"conversation {conversation}",
                )
        for branch in self.branches.values():
            parent = branch.parent_branch_id
            if parent is not None and parent != MAIN_BRANCH and parent not in self.branches:
                raise ExportFormatError(
                    branch.line,
                    f"branch.parent_branch_id {short(parent)} names no branch record of "
                    f"conversation {conversation} (nor main)",
                )
            seen = {branch.branch_id}
            while parent is not None and parent in self.branches:
                if parent in seen:
                    raise ExportFormatError(
                        branch.line,
                        f"branch.parent_branch_id: branch {short(branch.branch_id)} is its "
                        f"own ancestor (a cycle) in conversation {conversation}",
                    )
                seen.add(parent)
                parent = self.branches[parent].parent_branch_id
        current = self.entry.current_branch
        if current is not None and current != MAIN_BRANCH:
            found = self.branches.get(current)
            if found is None or found.state != "live":
                raise ExportFormatError(
                    self.entry.line,
                    f"conversation.current_branch {short(current)} is not a live branch "
                    "record of the conversation",
                )
