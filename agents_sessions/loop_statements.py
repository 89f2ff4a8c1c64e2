"""The session facade's single statements on the caller's event loop, with no thread hop.

A call of ``get_items`` or ``add_items`` (without usage) is one statement on
PostgreSQL (:class:`~agents_sessions.db.hot_path.HotStatement`). Where the store
allows it -- PostgreSQL with psycopg2, no tenant, no echo or statement listeners
(:attr:`~agents_sessions.store.SessionStore.async_pools`), and not a read meant
for the replica -- it runs on an asynchronous connection driven by the event loop
(:mod:`agents_sessions.db.async_pool`); everywhere else, and for every transaction,
the store's worker threads run it on the synchronous engine, as before.

On the embedded SQLite file, a bounded read runs on the loop too
(:func:`read_sqlite_on_loop`): a local read costs less than the hop to a thread.

Both paths give the same answers, errors and retries: the same statement and
parameters, SQLAlchemy's exception classes translated by
:func:`~agents_sessions.errors.translate_database_errors`, and the store's retry
rules (:class:`~agents_sessions.db.failures.RetryPlan`).
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from .db.failures import RetryPlan
from .db.hot_path import HotStatement
from .db.sqlite_hot_path import NotOnTheHotPath, parse_documents, sqlite_hot_path_allowed
from .db.sqlite_loop_reader import MAX_BYTES_PARSED_ON_LOOP, MAX_ITEMS_READ_ON_LOOP
from .errors import DatabaseError, translate_database_errors
from .store import SessionStore

# Windows' default loop has no add_reader/add_writer: the worker threads serve it.
_PROACTOR: Any = getattr(asyncio, "ProactorEventLoop", None)


async def runs_on_loop(
    store: SessionStore, tenant_id: str | None, *, lag_tolerant: bool = False
) -> bool:
    """Whether a hot call of ``store`` for ``tenant_id`` runs on the running event loop."""
    if tenant_id is not None:
        return False
    if not store.schema_ready and store.dialect == "postgresql":
        # Once per engine, before the first answer: the check may migrate (blocking:
        # in a worker thread), and it learns whether the database is a Citus cluster,
        # whose appends are transactions (then async_pools is None).
        await store.call_in_thread(store.ensure_schema)
    if store.async_pools is None:
        return False
    if _PROACTOR is not None and isinstance(asyncio.get_running_loop(), _PROACTOR):
        return False
    # A read that may go to the replica takes the store's replica routing (threads).
    return not (lag_tolerant and store.replica is not None)


async def run_on_loop(
    store: SessionStore, hot: HotStatement, *, write: bool, repeatable: bool
) -> Any:
    """Run ``hot`` on the running loop's asynchronous connections, retried as the store retries.

    Only where :func:`runs_on_loop` says so. ``repeatable``: running it twice has the
    effect of running it once (reads, keyed appends).

    Raises:
        ConnectionLostError: the connection died while non-repeatable work ran, or
            the retries ran out after a write was sent; whether it took effect is
            unknown.
        DatabaseError: any other database failure, as the synchronous path raises it.
    """
    pools = store.async_pools  # (set once runs_on_loop's schema check has run)
    assert pools is not None, "runs_on_loop() said no"
    plan: RetryPlan | None = None  # made on the first failure
    while True:
        sent = False
        try:
            with translate_database_errors(pools.description):
                pool, connection = await pools.checkout()
                sent = True
                return await pools.execute(pool, connection, hot)
        except DatabaseError as exc:
            plan = plan or RetryPlan(
                store.settings.retry_attempts,
                write=write,
                repeatable=repeatable,
                where=store.target.safe_url,
            )
            await asyncio.sleep(plan.after_failure(exc, sent=sent))


async def read_sqlite_on_loop(
    store: SessionStore, conversation_id: str, limit: int | None
) -> list[Any] | None:
    """``get_items``' read of a SQLite file on the running loop (see
    :mod:`agents_sessions.db.sqlite_loop_reader`); ``None`` where it does not apply.

    ``limit`` ``None`` (every item): the loop reads one item more than
    ``MAX_ITEMS_READ_ON_LOOP``; a branch that short is read whole, in one statement.

    ``None``: more than ``MAX_ITEMS_READ_ON_LOOP`` items asked for (or found, when
    every item is), not the SQLite hot path, the schema not yet checked, a branch
    that inherits, or the read would have waited or failed. The worker threads then
    read, with the store's waits, retries and error translation -- the answer is the
    same either way.
    """
    if limit is not None and limit > MAX_ITEMS_READ_ON_LOOP:
        return None
    if not (store.schema_ready and sqlite_hot_path_allowed(store)):
        return None  # (the first call checks the schema, which may migrate: threads)
    # The read itself never suspends: yield to the loop first, as any I/O would, so
    # a task reading in a loop cannot starve the others.
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    readers = store.loop_readers
    try:
        if not readers.has_reader(loop):
            # Loops hold all but one of the pool's connections at most: the threads
            # need one for every write.
            most = store.target.pool.max_connections - 1
            if not readers.room_for_another(most):
                return None
            with translate_database_errors(store.target.pool.describe()):
                await store.call_in_thread(functools.partial(readers.open, loop, most=most))
        most_items = MAX_ITEMS_READ_ON_LOOP + 1 if limit is None else limit
        documents = readers.read(
            loop, lambda hot: hot.latest_documents(conversation_id, most_items)
        )
    except NotOnTheHotPath:
        return None
    if len(documents) > MAX_ITEMS_READ_ON_LOOP:
        return None  # every item was asked for, and there are more: the threads read
    if sum(map(len, documents)) > MAX_BYTES_PARSED_ON_LOOP:
        return await store.call_in_thread(parse_documents, documents)
    return parse_documents(documents)
