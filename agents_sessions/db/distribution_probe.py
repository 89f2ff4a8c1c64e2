"""Whether the database is a Citus cluster: the once-per-engine check behind the append's form.

On plain PostgreSQL an append is one statement whose parts share one snapshot.
Citus runs such a statement as a sequence of sub-plans (every CTE that inserts is
planned on its own), each with a snapshot of its own, which breaks what the single
statement relies on (an expired conversation seen as expired before it is touched).
Where Citus is installed, the store therefore runs appends statement by statement
in a transaction instead (see ``agents_sessions.repositories.messages``).
"""

from __future__ import annotations

from sqlalchemy import Engine, text

_CITUS_INSTALLED = text("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus')")


def citus_installed(engine: Engine) -> bool:
    """Whether the Citus extension is installed in this PostgreSQL database.

    Installed is enough: the statement-by-statement form is correct on local tables
    too, and the tables may be distributed later (``agents-sessions citus distribute``)
    while this process runs.
    """
    with engine.connect() as connection:
        return bool(connection.execute(_CITUS_INSTALLED).scalar())
