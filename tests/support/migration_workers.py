"""Worker processes for ``tests/integration/test_migrations.py``.

Run as a script; pytest does not collect it.

``python tests/support/migration_workers.py DATABASE_URL N`` imports the package, prints
``ready``, waits for a line ``go`` on stdin (so the parent can release every worker at
the same moment), then stores one item through a :class:`PostgreSQLSession` -- the
first operation on that engine, which auto-migrates the database -- and prints ``done``.
"""

from __future__ import annotations

import asyncio
import sys


async def _add_one_item(database_url: str, number: int) -> None:
    from agents_sessions import PostgreSQLSession, dispose_all

    session = PostgreSQLSession(f"worker-{number}", database_url=database_url)
    try:
        await session.add_items([{"role": "user", "content": f"hello from {number}"}])
    finally:
        dispose_all()


def main(argv: list[str]) -> int:
    database_url, number = argv[1], int(argv[2])
    import agents_sessions  # noqa: F401 -- pay the import cost before the start signal

    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 2
    asyncio.run(_add_one_item(database_url, number))
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
