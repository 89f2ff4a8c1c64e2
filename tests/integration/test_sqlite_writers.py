"""The embedded SQLite file's writers: one process's calls share a transaction, each whole."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from agents_sessions.db.sqlite_writers import WriteQueue


def _connect(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    return connection


def test_a_failing_call_in_a_shared_transaction_fails_alone(tmp_path: Path) -> None:
    path = tmp_path / "writers.sqlite3"
    _connect(path).execute("CREATE TABLE t (x INTEGER NOT NULL)")
    queue = WriteQueue()
    gate = threading.Event()
    leading = threading.Event()
    outcomes: dict[int, object] = {}

    def insert(value: int, *, fail: bool = False, first: bool = False) -> None:
        def work(driver: sqlite3.Connection) -> int:
            if first:
                leading.set()
                gate.wait(timeout=60)  # hold the writer while the others queue up
            driver.execute("INSERT INTO t VALUES (?)", (value,))
            if fail:
                raise ValueError(f"call {value} fails after its insert")
            return value

        try:
            outcomes[value] = queue.run(_connect(path), work)
        except ValueError as exc:
            outcomes[value] = exc

    first = threading.Thread(target=insert, args=(0,), kwargs={"first": True})
    first.start()
    assert leading.wait(timeout=60)
    others = [
        threading.Thread(target=insert, args=(1,)),
        threading.Thread(target=insert, args=(2,), kwargs={"fail": True}),
        threading.Thread(target=insert, args=(3,)),
    ]
    for thread in others:
        thread.start()
    while queue.queued < len(others):  # all three wait for the next batch
        threading.Event().wait(0.01)
    gate.set()
    for thread in [first, *others]:
        thread.join(timeout=60)
    assert outcomes[0] == 0 and outcomes[1] == 1 and outcomes[3] == 3
    assert isinstance(outcomes[2], ValueError)
    rows = sorted(row[0] for row in _connect(path).execute("SELECT x FROM t"))
    assert rows == [0, 1, 3], "the failing call left its insert, or took another call with it"


def test_a_batch_whose_commit_cannot_begin_stores_none_of_its_calls(tmp_path: Path) -> None:
    path = tmp_path / "locked.sqlite3"
    _connect(path).execute("CREATE TABLE t (x INTEGER NOT NULL)")
    holder = _connect(path)
    holder.execute("BEGIN IMMEDIATE")  # another process's writer, as far as the queue knows
    waiting = _connect(path)
    waiting.execute("PRAGMA busy_timeout=50")
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            WriteQueue().run(waiting, lambda driver: driver.execute("INSERT INTO t VALUES (1)"))
    finally:
        holder.rollback()
    assert _connect(path).execute("SELECT count(*) FROM t").fetchone() == (0,)
