"""What the PostgreSQL server counts about a database (for tests and benchmarks)."""

from __future__ import annotations

from sqlalchemy import Engine, text


def sessions_opened(admin: Engine, database: str) -> int:
    """How many server sessions ``database`` has had (``pg_stat_database.sessions``).

    Every connection opened to it counts once, closed or not: the difference between
    two readings is how many connections were opened in between.
    """
    with admin.connect() as connection:
        return int(
            connection.execute(
                text("SELECT sessions FROM pg_stat_database WHERE datname = :name"),
                {"name": database},
            ).scalar_one()
        )
