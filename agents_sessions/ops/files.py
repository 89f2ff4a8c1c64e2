"""Files written whole or not at all: backups and exports.

A reader (or a crash) never sees a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[tuple[IO[bytes], Path]]:
    """A new file that appears at ``final`` only once complete and on disk.

    Used for backups and exports: a failed write never leaves a file that looks
    complete.

    Yields the open file and its temporary path. It is written under a hidden
    temporary name in the same directory (so the rename is atomic), readable by the
    owner only (backups hold every conversation).
    """
    temporary = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.partial")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as raw:
            yield raw, temporary
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(temporary, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise
    fsync_directory(final.parent)


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort where directories cannot be opened)."""
    # The rename itself must reach the disk for the backup to survive a power loss.
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
