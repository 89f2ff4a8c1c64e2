"""Branches of a conversation: views that share items, the current branch, truncation.

The model (no item is ever copied):

* Every message row is owned by one branch (``messages.branch_id``, ``main`` by default).
* A branch created from turn *N* of branch *P* records ``parent_branch_id = P`` and
  ``fork_before_id`` = the id of that turn's user message. Its history -- its *view* --
  is *P*'s view below that id, followed by its own rows. Ids grow with time, so every
  row a branch owns is newer than everything it inherits, and a view ordered by id is
  the branch's history.
* The current branch is stored on the conversation (``conversations.current_branch``)
  and every append lands on it under the conversation's row lock.

Removing rows from a view (``pop_item``, compaction) must not take them from a child
that shares them: such rows first move to an internal *frozen* branch that both the
child and the truncated branch then inherit from (one ``UPDATE`` of ``branch_id``; the
documents are not rewritten). Deleted branches keep the rows a child still shares, and
their names stay reserved, as in the SDK's ``AdvancedSQLiteSession``.

Every mutation here runs inside the caller's transaction and first locks the
conversation row (:meth:`BranchRepository.lock`): the same lock appends take, so a
branch operation and an append on one conversation never interleave.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, insert, select, update

from ..db.statements import INSERT_MESSAGE, MAIN_BRANCH
from ..db.tables import branches_table as branches
from ..db.tables import conversations_table as conversations
from ..db.tables import messages_table as messages
from ..db.tables import utcnow
from ..errors import (
    BranchNameTakenError,
    ProtectedBranchError,
    TurnNotFoundError,
    UnknownBranchError,
)
from ..items import EncodedItem
from .branch_views import DELETED, FROZEN, LIVE, BranchReader, BranchRow, min_bound

_FROZEN_PREFIX = "frozen:"


class BranchRepository(BranchReader):
    """Branches of conversations, their views, and the current branch."""

    # ------------------------------------------------------------------ locking

    def lock(self, conversation_id: str) -> bool:
        """Lock the conversation row for this transaction; ``False`` if it does not exist.

        Appends take the same row lock, so nothing is appended to a view while an
        operation here reads and rewrites it. (On SQLite the transaction's
        ``BEGIN IMMEDIATE`` already holds the database's write lock.)
        """
        # FOR UPDATE (not the weaker lock an UPDATE of a non-key column takes): it
        # conflicts with the key-share locks of concurrent inserts' foreign-key checks
        # and with DELETE, as the conversation-first lock order of every writer needs.
        found = self.connection.execute(
            select(conversations.c.id)
            .where(conversations.c.id == conversation_id)
            .with_for_update()
        ).first()
        if found is None:
            return False
        self.connection.execute(
            update(conversations)
            .where(conversations.c.id == conversation_id)
            .values(updated_at=utcnow())
        )
        return True

    # ------------------------------------------------------------------ creating and switching

    def create_from_turn(
        self, conversation_id: str, turn_number: int, branch_name: str | None
    ) -> tuple[str, Any, str]:
        """Branch off the current branch before its user turn ``turn_number``; switch to it.

        Returns the new branch id, the turn's user content and the source branch.
        """
        self.lock(conversation_id)
        rows = self.rows(conversation_id)
        source = self.current(conversation_id)
        turns = [
            row
            for row in self.view(conversation_id, source, rows=rows, users_only=True)
            if row.is_user
        ]
        if not 1 <= turn_number <= len(turns):
            raise TurnNotFoundError(
                f"Turn {turn_number} does not contain a user message in branch '{source}'; "
                "get_conversation_turns() lists the turns you can branch from"
            )
        fork = turns[turn_number - 1]
        branch_id = self._reserve(conversation_id, rows, branch_name, turn_number)
        self.connection.execute(
            insert(branches).values(
                conversation_id=conversation_id,
                branch_id=branch_id,
                parent_branch_id=source,
                fork_before_id=fork.id,
                state=LIVE,
                created_at=utcnow(),
            )
        )
        self._set_current(conversation_id, branch_id)
        content = fork.item.get("content", "") if isinstance(fork.item, dict) else ""
        return branch_id, content, source

    def _reserve(
        self,
        conversation_id: str,
        rows: dict[str, BranchRow],
        branch_name: str | None,
        turn_number: int,
    ) -> str:
        def taken(name: str) -> bool:
            return name == MAIN_BRANCH or name in rows or name.startswith(_FROZEN_PREFIX)

        if branch_name is not None:
            if taken(branch_name):
                raise BranchNameTakenError(
                    f"Branch ID '{branch_name}' has already been used. Choose a new branch ID."
                )
            return branch_name
        base = f"branch_from_turn_{turn_number}_{int(time.time())}"
        name, suffix = base, 1
        while taken(name):
            suffix += 1
            name = f"{base}_{suffix}"
        return name

    def _set_current(self, conversation_id: str, branch_id: str) -> None:
        self.connection.execute(
            update(conversations)
            .where(conversations.c.id == conversation_id)
            .values(current_branch=None if branch_id == MAIN_BRANCH else branch_id)
        )

    def switch(self, conversation_id: str, branch_id: str) -> None:
        """Make ``branch_id`` the conversation's current branch."""
        self.lock(conversation_id)
        if not self.exists(conversation_id, branch_id, self.rows(conversation_id)):
            raise UnknownBranchError(
                f"Branch '{branch_id}' does not exist; list_branches() names the branches"
            )
        self._set_current(conversation_id, branch_id)

    # ------------------------------------------------------------------ deleting

    def delete(self, conversation_id: str, branch_id: str, *, force: bool) -> int:
        """Delete a branch (its name stays reserved); returns how many rows it had in view."""
        if branch_id == MAIN_BRANCH:
            raise ProtectedBranchError("Cannot delete the 'main' branch")
        self.lock(conversation_id)
        rows = self.rows(conversation_id)
        if branch_id == self.current(conversation_id):
            if not force:
                raise ProtectedBranchError(
                    f"Cannot delete current branch '{branch_id}'. Use force=True or switch "
                    "branches first"
                )
            if not self.exists(conversation_id, branch_id, rows):
                raise UnknownBranchError(f"Branch '{branch_id}' does not exist")
            if not self.exists(conversation_id, MAIN_BRANCH, rows):
                raise UnknownBranchError(f"Branch '{MAIN_BRANCH}' does not exist")
            self._set_current(conversation_id, MAIN_BRANCH)
        size = len(self.view(conversation_id, branch_id, rows=rows))
        if not size:
            raise UnknownBranchError(
                f"Branch '{branch_id}' does not exist; list_branches() names the branches"
            )
        self.connection.execute(
            update(branches)
            .where(branches.c.conversation_id == conversation_id, branches.c.branch_id == branch_id)
            .values(state=DELETED)
        )
        self._release(conversation_id, branch_id)
        return size

    def _release(self, conversation_id: str, branch_id: str) -> None:
        """Drop what a deleted or frozen branch holds that no child shares any more.

        A child shares its parent's rows below its ``fork_before_id``. When nothing is
        shared, the branch also stops needing its own parent, which is then released
        in turn.
        """
        while True:
            rows = self.rows(conversation_id)
            row = rows.get(branch_id)
            if row is None or row.state == LIVE:
                return
            bounds = [
                child.fork_before_id
                for child in rows.values()
                if child.parent_branch_id == branch_id
            ]
            known = [bound for bound in bounds if bound is not None]
            keep_below = None if len(known) < len(bounds) else max(known, default=0)
            own = (messages.c.conversation_id == conversation_id) & (
                messages.c.branch_id == branch_id
            )
            if keep_below is not None:
                self.connection.execute(delete(messages).where(own, messages.c.id >= keep_below))
            if bounds:
                return
            parent = row.parent_branch_id
            target = branches.c.conversation_id == conversation_id
            if row.state == FROZEN:
                self.connection.execute(
                    delete(branches).where(target, branches.c.branch_id == branch_id)
                )
            else:
                self.connection.execute(
                    update(branches)
                    .where(target, branches.c.branch_id == branch_id)
                    .values(parent_branch_id=None, fork_before_id=None)
                )
            if parent is None:
                return
            branch_id = parent

    # ------------------------------------------------------------------ truncating

    def truncate(self, conversation_id: str, branch_id: str, from_id: int) -> None:
        """Remove the view's items from id ``from_id`` on, leaving every other view intact."""
        rows = self.rows(conversation_id)
        if any(
            child.parent_branch_id == branch_id
            and (child.fork_before_id is None or child.fork_before_id > from_id)
            for child in rows.values()
        ):
            self._freeze(conversation_id, branch_id, rows.get(branch_id))
            rows = self.rows(conversation_id)
        self.connection.execute(
            delete(messages).where(
                messages.c.conversation_id == conversation_id,
                messages.c.branch_id == branch_id,
                messages.c.id >= from_id,
            )
        )
        row = rows.get(branch_id)
        if row is not None and row.parent_branch_id is not None:
            bound = min_bound(row.fork_before_id, from_id)
            self.connection.execute(
                update(branches)
                .where(
                    branches.c.conversation_id == conversation_id,
                    branches.c.branch_id == branch_id,
                )
                .values(fork_before_id=bound)
            )
            self._release(conversation_id, row.parent_branch_id)

    def _freeze(self, conversation_id: str, branch_id: str, row: BranchRow | None) -> None:
        """Hand a branch's own rows to a new frozen branch that it and its children inherit.

        Rows change owner (an update of ``branch_id``), the documents stay as they are.
        """
        frozen = f"{_FROZEN_PREFIX}{uuid.uuid4().hex}"
        target = branches.c.conversation_id == conversation_id
        self.connection.execute(
            insert(branches).values(
                conversation_id=conversation_id,
                branch_id=frozen,
                parent_branch_id=None if row is None else row.parent_branch_id,
                fork_before_id=None if row is None else row.fork_before_id,
                state=FROZEN,
                created_at=utcnow(),
            )
        )
        self.connection.execute(
            update(messages)
            .where(messages.c.conversation_id == conversation_id, messages.c.branch_id == branch_id)
            .values(branch_id=frozen)
        )
        self.connection.execute(
            update(branches)
            .where(target, branches.c.parent_branch_id == branch_id)
            .values(parent_branch_id=frozen)
        )
        if row is None:
            self.connection.execute(
                insert(branches).values(
                    conversation_id=conversation_id,
                    branch_id=branch_id,
                    parent_branch_id=frozen,
                    fork_before_id=None,
                    state=LIVE,
                    created_at=utcnow(),
                )
            )
        else:
            self.connection.execute(
                update(branches)
                .where(target, branches.c.branch_id == branch_id)
                .values(parent_branch_id=frozen, fork_before_id=None)
            )

    def pop(self, conversation_id: str) -> Any | None:
        """Remove and return the newest item of the current branch's view."""
        if not self.lock(conversation_id):
            return None
        branch_id = self.current(conversation_id)
        newest = self.view(conversation_id, branch_id, limit=1)
        if not newest:
            return None
        self.truncate(conversation_id, branch_id, newest[0].id)
        return newest[0].item

    def append_to(
        self, conversation_id: str, branch_id: str, encoded: Sequence[EncodedItem]
    ) -> None:
        """Append rows owned by ``branch_id`` (the conversation must be locked)."""
        if encoded:
            self.connection.execute(
                INSERT_MESSAGE,
                [
                    {
                        "conversation_id": conversation_id,
                        "role": item.role,
                        "content": item.content,
                        "document": item.document,
                        "append_key": None,
                        "branch_id": branch_id,
                    }
                    for item in encoded
                ],
            )

    def replace_suffix(
        self,
        conversation_id: str,
        branch_id: str,
        expected: Sequence[tuple[int, Any]],
        encoded: Sequence[EncodedItem],
    ) -> bool:
        """Swap the view's newest rows for ``encoded`` if they are still ``expected``.

        ``expected`` are the (id, item) pairs read earlier; when the branch changed or
        anything was appended or removed since, nothing is written and the answer is
        ``False``. Otherwise the swap commits with the caller's transaction: readers
        see the old history or the new one, never a gap.
        """
        if not expected or not self.lock(conversation_id):
            return False
        if self.current(conversation_id) != branch_id:
            return False
        current = self.view(conversation_id, branch_id, limit=len(expected))
        if [(row.id, row.item) for row in current] != list(expected):
            return False
        self.truncate(conversation_id, branch_id, expected[0][0])
        self.append_to(conversation_id, branch_id, encoded)
        return True

    def replace_all(self, conversation_id: str, encoded: Sequence[EncodedItem]) -> None:
        """Replace the current branch's whole history with ``encoded``, atomically."""
        self.lock(conversation_id)
        branch_id = self.current(conversation_id)
        oldest = self.view(conversation_id, branch_id)
        if oldest:
            self.truncate(conversation_id, branch_id, oldest[0].id)
        self.append_to(conversation_id, branch_id, encoded)

    def reset(self, conversation_id: str) -> None:
        """After every message was deleted: back to ``main``; other names stay reserved."""
        target = branches.c.conversation_id == conversation_id
        self.connection.execute(
            delete(branches).where(
                target, (branches.c.branch_id == MAIN_BRANCH) | (branches.c.state == FROZEN)
            )
        )
        self.connection.execute(
            update(branches)
            .where(target)
            .values(state=DELETED, parent_branch_id=None, fork_before_id=None)
        )
        self._set_current(conversation_id, MAIN_BRANCH)

    # ------------------------------------------------------------------ listing
