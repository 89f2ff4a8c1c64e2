"""Export and import conversations as versioned, self-describing JSON Lines.

* :mod:`.format` -- the file format: its records, writing lines, validating a file
  (:class:`ExportFile`);
* :mod:`.export` -- a database's conversations to a file, from one snapshot;
* :mod:`.import_` -- a validated file into a database, atomic per conversation and
  idempotent.
"""

from ...errors import ConversationNotFoundError, ExportFormatError
from .export import count_export, export_conversations, export_to_file, iter_export
from .format import (
    DEFAULT_BATCH_SIZE,
    FORMAT_NAME,
    FORMAT_VERSION,
    ExportFile,
    TransferCounts,
)
from .import_ import ImportSummary, RefusedConversation, import_export, import_file

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
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
