"""Import: an export file into a database, validated first, atomic per conversation, idempotent.

Import reads the whole file once to validate it -- a bad line is reported with its
line number and nothing is written -- then imports each conversation in its own
transaction. It is idempotent: per conversation the row is upserted; messages are
positional (when the database already holds the first N messages and they equal
the file's first N -- document and owning branch -- only the rest is appended; when
they differ, that conversation is refused and left untouched); a branch row already
stored must equal the file's (or the conversation is refused); usage rows already
present (equal in every column but ``id``) are not inserted again. References to
messages, positions in the file, become the new messages' ids.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from ...errors import DatabaseError
from ...store import SessionStore
from ...validation import validate_batch_size
from .format import (
    DEFAULT_BATCH_SIZE,
    BranchLine,
    ConversationLine,
    EndLine,
    ExportFile,
    HeaderLine,
    MessageLine,
    Progress,
    RunStateLine,
)
from .writing import ConversationImport, Refused


@dataclass(frozen=True)
class RefusedConversation:
    """A conversation of the file that was not imported, and why."""

    conversation_id: str
    line: int
    reason: str


@dataclass
class ImportSummary:
    """What an import did, per conversation and per row."""

    conversations_created: int = 0
    conversations_updated: int = 0
    conversations_unchanged: int = 0
    messages_imported: int = 0
    messages_already_present: int = 0
    usage_imported: int = 0
    usage_already_present: int = 0
    branches_imported: int = 0
    branches_already_present: int = 0
    run_states_imported: int = 0
    run_states_already_present: int = 0
    refused: list[RefusedConversation] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The summary as JSON-ready data."""
        return asdict(self)


# --------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------


def _blocks(entries: Iterable[Any]) -> Iterator[tuple[int, Any]]:
    """Tag each record with the number of its conversation block (0: header and end)."""
    block = 0
    for entry in entries:
        if isinstance(entry, ConversationLine):
            block += 1
        yield (0 if isinstance(entry, HeaderLine | EndLine) else block), entry


def import_export(
    store: SessionStore,
    export: ExportFile,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
) -> ImportSummary:
    """Import a validated :class:`ExportFile` into ``store``; idempotent.

    Each conversation is imported in its own transaction: all of its new rows or
    none. A conversation whose stored messages or branches differ from the file's
    (or that belongs to another user, or already holds a request of a run with
    other usage) is refused and listed in the summary; the others are imported.
    ``progress(1)`` is called after each conversation.

    Raises:
        DatabaseError: the database failed; the conversations before the failing
            one are imported (importing the file again completes the rest).
    """
    size = validate_batch_size(batch_size)
    summary = ImportSummary()
    done = 0
    # groupby streams: one conversation's records at a time, never the whole file.
    for block, tagged in itertools.groupby(_blocks(export.entries()), key=lambda pair: pair[0]):
        if block == 0:
            continue
        group = (entry for _, entry in tagged)
        first = next(group)
        assert isinstance(first, ConversationLine)  # the validation guarantees it
        try:
            with store.transaction() as repos:
                work = ConversationImport(repos.connection, first, size)
                created = work.upsert_conversation()
                for entry in group:
                    if isinstance(entry, MessageLine):
                        work.add_message(entry)
                    elif isinstance(entry, BranchLine):
                        work.add_branch(entry)
                    elif isinstance(entry, RunStateLine):
                        if work.add_run_state(entry):
                            summary.run_states_imported += 1
                        else:
                            summary.run_states_already_present += 1
                    else:
                        work.add_usage(entry, export.version)
                work.finish()
        except Refused as refusal:
            summary.refused.append(RefusedConversation(first.id, refusal.line, refusal.reason))
        except DatabaseError as exc:
            raise DatabaseError(
                f"{exc} (while importing conversation {first.id!r} from line {first.line}; "
                f"the {done} conversations before it are imported, and importing the file "
                "again is safe)"
            ) from exc
        else:
            if created:
                summary.conversations_created += 1
            elif work.changed:
                summary.conversations_updated += 1
            else:
                summary.conversations_unchanged += 1
            summary.messages_imported += work.messages_imported
            summary.messages_already_present += work.messages_present
            summary.usage_imported += work.usage_imported
            summary.usage_already_present += work.usage_present
            summary.branches_imported += work.branches_imported
            summary.branches_already_present += work.branches_present
        done += 1
        if progress is not None:
            progress(1)
    return summary


def import_file(
    store: SessionStore,
    source: str | Path | IO[bytes],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
) -> ImportSummary:
    """Validate ``source`` (a path, ``"-"`` or a binary stream), then import it.

    Raises:
        ExportFormatError: the file is not a valid export (nothing was written).
    """
    with ExportFile(source, max_item_bytes=store.settings.max_item_bytes) as export:
        return import_export(store, export, batch_size=batch_size, progress=progress)
