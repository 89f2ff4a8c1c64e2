"""Export and import conversations as versioned, self-describing JSON Lines.

* :mod:`.format` -- the file format's specification (its docstring), writing lines,
  opening a file for import (:class:`ExportFile`);
* :mod:`.records` -- the records of a file and each format version's fields;
* :mod:`.reading` and :mod:`.structure` -- validating a file, line by line and per
  conversation;
* :mod:`.queries` -- statements export and import share (message references as
  positions);
* :mod:`.export` -- a database's conversations to a file, from one snapshot;
* :mod:`.import_` and :mod:`.writing` -- a validated file into a database, atomic
  per conversation and idempotent.
"""

from ...errors import ConversationNotFoundError, ExportFormatError
from .export import count_export, export_conversations, export_to_file, iter_export
from .format import (
    DEFAULT_BATCH_SIZE,
    FORMAT_NAME,
    FORMAT_VERSION,
    READABLE_VERSIONS,
    ExportFile,
    TransferCounts,
)
from .import_ import ImportSummary, RefusedConversation, import_export, import_file

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "ConversationNotFoundError",
    "ExportFile",
    "ExportFormatError",
    "ImportSummary",
    "RefusedConversation",
    "TransferCounts",
    "count_export",
    "export_conversations",
    "export_to_file",
    "import_export",
    "import_file",
    "iter_export",
]
