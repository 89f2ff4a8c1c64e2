"""A throwaway database for one benchmark run: created, migrated, dropped afterwards."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from agents_sessions import dispose_all
from agents_sessions.db.migrate import upgrade


@dataclass(frozen=True)
class ScratchDatabase:
    """Attributes:
    name: The database's name.
    url: Its URL (the admin URL with this database; password included, never printed).
    admin: An AUTOCOMMIT engine on the admin URL (server statistics, DDL).
    """

    name: str
    url: str
    admin: Engine


@contextmanager
def scratch_database(admin_url: str, prefix: str) -> Iterator[ScratchDatabase]:
    """A fresh database named ``<prefix>_<random>`` on ``admin_url``'s server.

    Migrated to head, as a deploy pipeline leaves it. At the end this process's pools are
    closed and the database dropped (``WITH (FORCE)``), also after an error or Ctrl-C.
    """
    admin = create_engine(make_url(admin_url), isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url)
        yield ScratchDatabase(name, url, admin)
    finally:
        dispose_all()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
