"""The ``agents-sessions`` operator command line (installed with the package).

One module per command group; each registers itself on :data:`cli` in
:mod:`agents_sessions.cli.main`. Shared conventions (database URL, ``--json``,
exit codes, progress bars, error reporting) live in :mod:`agents_sessions.cli.common`.
"""

from .main import cli, main

__all__ = ["cli", "main"]
