"""``python -m agents_sessions`` runs the ``agents-sessions`` command line."""

from .cli import main

main()
