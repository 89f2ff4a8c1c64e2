"""The session's hot calls on a SQLite file, on the pooled ``sqlite3`` connection itself.

On SQLite a call's database work is small and local (no round trips), so
SQLAlchemy's ``Connection`` around it -- execution context, compiled-cache lookup,
result objects, the ``begin`` event, reset on return -- costs several times the
statements. The calls the session facade makes every turn therefore run here on the
DBAPI connection the pool hands out (``pool.connect()``, as :mod:`.hot_path` does for
psycopg2), with SQL compiled once from the same Core statements the repositories use:

* :meth:`SQLiteHotMessages.latest` / :meth:`~SQLiteHotMessages.all`: **one** SELECT in
  autocommit mode. A single statement is its own read transaction in SQLite, so the
  current branch and its items are read from one snapshot without a BEGIN.
* :meth:`SQLiteHotMessages.append_encoded` and :meth:`SQLiteHotMessages.pop_latest`:
  a few statements, run together between ``BEGIN IMMEDIATE`` and ``COMMIT``. The write
  lock is taken up front, so writers in several processes queue (``busy_timeout``)
  instead of deadlocking on a read-to-write lock upgrade, and each call's items are
  contiguous. The transaction may be shared with other writes of this process (see
  below); each call is still all or nothing.

What needs more than this -- a branch that inherits from a parent, a pop on a
conversation that has branches -- raises :class:`NotOnTheHotPath` before writing
anything, and the store runs the call on the general path instead.

Writes go through the process's :class:`~agents_sessions.db.sqlite_writers.WriteQueue`
for the file: one writer at a time in this process, and the writes queued meanwhile
committed together (group commit).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from sqlalchemy import Engine, Integer, bindparam, case, exists, func, null, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import sqlite

from ..errors import translate_database_errors
from ..items import EncodedItem
from .engine import DatabaseTarget
from .sqlite_writers import WriteQueue, write_queue
from .statements import (
    CLAIM_APPEND_KEY,
    DELETE_EXPIRED_APPEND_KEYS,
    ENSURE_CONVERSATION,
    EXTEND_CONVERSATION,
    LOCK_IF_EXPIRED,
    MAIN_BRANCH,
    PURGE_BRANCHES,
    PURGE_MESSAGES,
    PURGE_RUN_STATE,
    SELECT_CURRENT_BRANCH_FORKED,
    TOUCH_CONVERSATION,
    keys_expire_before,
)
from .tables import branches_table as branches
from .tables import conversations_table as conversations
from .tables import messages_table as messages
from .tables import utcnow

if TYPE_CHECKING:
    import sqlite3  # loaded by the engine's driver when a SQLite file is used

_T = TypeVar("_T")


class NotOnTheHotPath(Exception):
    """The call needs the general path (branches are involved); nothing was written."""


# ----------------------------------------------------------------------------- SQL

# sqlite3 takes named parameters (":name") from a dict: the statements are compiled
# once for that paramstyle, with the same SQLite SQL the engine's dialect renders.
_DIALECT = sqlite.dialect(paramstyle="named")


class _Compiled:
    """A prebuilt statement's SQL, its literal parameters, and its bind processors."""

    __slots__ = ("defaults", "processors", "sql")

    def __init__(self, statement: Any) -> None:
        compiled = statement.compile(dialect=_DIALECT)
        self.sql = str(compiled)
        binds = [(compiled.bind_names[bind], bind) for bind in compiled.binds.values()]
        # The values of literal binds (e.g. the 'main' in COALESCE(..., 'main')).
        self.defaults = {name: bind.effective_value for name, bind in binds}
        # How SQLAlchemy would bind each value on SQLite (bool -> 0/1, datetime -> text,
        # JSON -> text), applied to the parameters a call gives.
        processors = {}
        for name, bind in binds:
            processor = bind.type.dialect_impl(_DIALECT).bind_processor(_DIALECT)
            if processor is not None:
                processors[name] = processor
        self.processors = processors

    def parameters(self, given: Mapping[str, Any]) -> dict[str, Any]:
        values = {**self.defaults, **given}
        for name, process in self.processors.items():
            if values[name] is not None:
                values[name] = process(values[name])
        return values


def _current_branch_items() -> Any:
    """One SELECT: the newest ``limit`` items of the current branch, newest first.

    The branch is read in the same statement (one snapshot). It reads as NULL --
    no rows -- when the conversation does not exist, has expired, or its current
    branch inherits from a parent (whose items this statement does not read): an
    empty answer is therefore checked again (:meth:`SQLiteHotMessages.latest`).
    ``limit`` -1 is SQLite's "no limit".
    """
    branch = func.coalesce(conversations.c.current_branch, MAIN_BRANCH)
    forked = exists().where(
        branches.c.conversation_id == conversations.c.id,
        branches.c.branch_id == branch,
        branches.c.parent_branch_id.isnot(None),
    )
    own_branch = (
        select(case((forked, null()), else_=branch))
        .where(
            conversations.c.id == bindparam("conversation_id"),
            (conversations.c.expires_at.is_(None)) | (conversations.c.expires_at > utcnow()),
        )
        .scalar_subquery()
    )
    return (
        select(messages.c.item)
        .where(
            messages.c.conversation_id == bindparam("conversation_id"),
            messages.c.branch_id == own_branch,
        )
        .order_by(messages.c.id.desc())
        .limit(bindparam("limit", type_=Integer))
    )


def _conversation_branches() -> Any:
    """The current branch, whether the conversation expired, whether it has branches."""
    return select(
        func.coalesce(conversations.c.current_branch, MAIN_BRANCH),
        conversations.c.expires_at <= utcnow(),
        exists().where(branches.c.conversation_id == conversations.c.id),
    ).where(conversations.c.id == bindparam("conversation_id"))


_READ = _Compiled(_current_branch_items())
_CURRENT_BRANCH = _Compiled(SELECT_CURRENT_BRANCH_FORKED)
_LOCK_IF_EXPIRED = _Compiled(LOCK_IF_EXPIRED)
_PURGES = tuple(_Compiled(purge) for purge in (PURGE_MESSAGES, PURGE_BRANCHES, PURGE_RUN_STATE))
# The upsert locks nothing more on SQLite (BEGIN IMMEDIATE holds the file's write lock);
# it returns the current branch, which the rows below are appended to.
_ENSURE = _Compiled(ENSURE_CONVERSATION["sqlite"].returning(conversations.c.current_branch))
_DELETE_EXPIRED_KEYS = _Compiled(DELETE_EXPIRED_APPEND_KEYS)
_CLAIM_KEY = _Compiled(CLAIM_APPEND_KEY["sqlite"])
_INSERT = (
    "INSERT INTO messages (conversation_id, role, content, item, append_key, branch_id) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
_POP_CHECK = _Compiled(_conversation_branches())
_DELETE_NEWEST = (
    "DELETE FROM messages WHERE id = (SELECT id FROM messages WHERE conversation_id = ? "
    "AND branch_id = ? ORDER BY id DESC LIMIT 1) RETURNING item"
)
_TOUCH = _Compiled(TOUCH_CONVERSATION)
_EXTEND = _Compiled(EXTEND_CONVERSATION)


def parse_documents(documents: Sequence[str]) -> list[Any]:
    """Stored JSON documents, parsed in one call (one array) rather than one by one."""
    if not documents:
        return []
    return list(json.loads(f"[{','.join(documents)}]"))


# ----------------------------------------------------------------------------- calls


def _execute(
    driver: sqlite3.Connection, statement: _Compiled, parameters: Mapping[str, Any]
) -> sqlite3.Cursor:
    return driver.execute(statement.sql, statement.parameters(parameters))


class SQLiteHotMessages:
    """The session facade's message calls on one pooled ``sqlite3`` connection.

    Structurally a :class:`~agents_sessions.db.hot_path.HotMessages`, plus
    :meth:`pop_latest`. The connection is in the driver's autocommit mode (the engine's
    connect hook sets ``isolation_level = None``): transactions are spelled out here.
    """

    def __init__(self, driver: sqlite3.Connection, writes: WriteQueue) -> None:
        self._driver = driver
        self._writes = writes

    def latest(self, conversation_id: str, limit: int) -> list[Any]:
        """The newest ``limit`` items of the current branch, oldest first."""
        return parse_documents(self.latest_documents(conversation_id, limit))

    def latest_documents(self, conversation_id: str, limit: int) -> list[str]:
        """:meth:`latest`, as the stored JSON documents (unparsed)."""
        parameters = {**_READ.defaults, "conversation_id": conversation_id, "limit": limit}
        documents = [row[0] for row in self._driver.execute(_READ.sql, parameters)]
        if not documents:
            # No conversation, an expired one, an empty branch -- or a branch that
            # inherits. Which one, and its items, from one snapshot (a transaction).
            self._driver.execute("BEGIN")
            try:
                found = _execute(
                    self._driver, _CURRENT_BRANCH, {"conversation_id": conversation_id}
                )
                current = found.fetchone()
                if current is not None and current[1]:
                    raise NotOnTheHotPath  # it inherits: read up its chain
                if current is not None:
                    documents = [row[0] for row in self._driver.execute(_READ.sql, parameters)]
            finally:
                self._driver.execute("COMMIT")  # a read: nothing to keep or undo
        documents.reverse()
        return documents

    def all(self, conversation_id: str) -> list[Any]:
        """Every item of the current branch, oldest first."""
        return self.latest(conversation_id, -1)

    def append_encoded(
        self,
        conversation_id: str,
        encoded: Sequence[EncodedItem],
        *,
        user_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        ttl_seconds: int | None = None,
    ) -> int:
        """Append encoded items in a ``BEGIN IMMEDIATE`` transaction; how many were written.

        The same statements, in the same order, as ``MessageRepository.append_encoded``
        on SQLite: an expired conversation is purged, the conversation upserted, the
        key claimed (none claimed: an earlier attempt stored the call, nothing is
        written), the rows inserted on the current branch.
        """
        if not encoded:
            return 0

        def append(driver: sqlite3.Connection) -> int:
            parameters = {"conversation_id": conversation_id}
            if _execute(driver, _LOCK_IF_EXPIRED, parameters).fetchone() is not None:
                for purge in _PURGES:
                    _execute(driver, purge, parameters)
            row = _execute(
                driver,
                _ENSURE,
                {
                    "conversation_id": conversation_id,
                    "user_id": user_id,
                    "metadata": metadata,
                    "ttl_seconds": ttl_seconds,
                    "restart_expired": True,
                },
            ).fetchone()
            branch_id = (row[0] if row is not None else None) or MAIN_BRANCH
            if idempotency_key is not None:
                expire_before = keys_expire_before()
                _execute(
                    driver,
                    _DELETE_EXPIRED_KEYS,
                    {"conversation_id": conversation_id, "keys_expire_before": expire_before},
                )
                claim = {"conversation_id": conversation_id, "append_key": idempotency_key}
                if not _execute(driver, _CLAIM_KEY, claim).rowcount:
                    return 0  # an earlier attempt of this call stored it
            driver.executemany(
                _INSERT,
                [
                    (
                        conversation_id,
                        item.role,
                        item.content,
                        item.document,
                        # The key also rides on the call's first row (exports carry it).
                        idempotency_key if position == 0 else None,
                        branch_id,
                    )
                    for position, item in enumerate(encoded)
                ],
            )
            return len(encoded)

        return self._writes.run(self._driver, append)

    def pop_latest(self, conversation_id: str, *, ttl_seconds: int | None = None) -> Any | None:
        """Remove and return the newest item of a conversation without branches.

        Under ``BEGIN IMMEDIATE`` no other writer runs, so the newest row read is the
        one deleted. A conversation with branch rows raises :class:`NotOnTheHotPath`
        (an item may be shared with another branch).
        """

        def pop(driver: sqlite3.Connection) -> Any | None:
            parameters = {"conversation_id": conversation_id}
            found = _execute(driver, _POP_CHECK, parameters).fetchone()
            if found is None or found[1]:
                return None  # no conversation, or expired: it reads as empty
            branch_id, _, has_branches = found
            if has_branches or branch_id != MAIN_BRANCH:
                raise NotOnTheHotPath
            row = driver.execute(_DELETE_NEWEST, (conversation_id, branch_id)).fetchone()
            # As BranchRepository.lock does: the conversation is touched even when empty;
            # the expiry is extended only when an item was popped.
            extend = row is not None and ttl_seconds is not None
            _execute(
                driver,
                _EXTEND if extend else _TOUCH,
                {"conversation_id": conversation_id, "ttl_seconds": ttl_seconds},
            )
            return None if row is None else row[0]

        document = self._writes.run(self._driver, pop)
        return None if document is None else json.loads(document)


@contextmanager
def sqlite_messages(engine: Engine) -> Iterator[SQLiteHotMessages]:
    """:class:`SQLiteHotMessages` on a pooled connection, returned to the pool afterwards.

    Driver errors come out as SQLAlchemy's ``DBAPIError`` kinds (as from a
    ``Connection``), so the store's error translation sees the same thing.
    """
    dialect = engine.dialect
    dbapi = dialect.loaded_dbapi
    try:
        pooled = engine.pool.connect()
    except dbapi.Error as exc:
        raise sa_exc.DBAPIError.instance(None, None, exc, dbapi.Error, dialect=dialect) from exc
    try:
        yield SQLiteHotMessages(
            cast("sqlite3.Connection", pooled.dbapi_connection), write_queue(engine)
        )
    except dbapi.Error as exc:
        lost = dialect.is_disconnect(exc, pooled.dbapi_connection, None)
        if lost:
            pooled.invalidate(exc)
        raise sa_exc.DBAPIError.instance(
            None, None, exc, dbapi.Error, connection_invalidated=lost, dialect=dialect
        ) from exc
    finally:
        pooled.close()


class EmbeddedStore(Protocol):
    """What :func:`run_on_sqlite` needs of the store (``agents_sessions.store.SessionStore``)."""

    @property
    def engine(self) -> Engine: ...

    @property
    def target(self) -> DatabaseTarget: ...

    @property
    def replica(self) -> Any: ...

    settings: Any

    def ensure_schema(self) -> None: ...


def run_on_sqlite(store: EmbeddedStore, work: Callable[[SQLiteHotMessages], _T]) -> _T:
    """Run ``work`` here, errors translated as the store's are.

    Raises :class:`NotOnTheHotPath` (nothing written) where this path does not apply:
    not SQLite, SQL echo on, something else listening to the engine's statements
    (tracing, e.g. OpenTelemetry's SQLAlchemy instrumentation, which this path would
    bypass), a replica configured -- or the call needs the general path. No retries:
    a SQLite connection is a local file handle, never lost around a commit, so a
    call's outcome is always known.
    """
    if not sqlite_hot_path_allowed(store):
        raise NotOnTheHotPath
    store.ensure_schema()
    with (
        translate_database_errors(store.target.pool.describe()),
        sqlite_messages(store.engine) as hot,
    ):
        return work(hot)


def sqlite_hot_path_allowed(store: EmbeddedStore) -> bool:
    """Whether ``store``'s hot calls may run on the ``sqlite3`` connection itself.

    SQLite, and nothing that must see every statement: SQL echo, something
    listening to the engine's statements (tracing, e.g. OpenTelemetry's SQLAlchemy
    instrumentation), a replica configured.
    """
    engine = store.engine
    dispatch = engine.dispatch
    return not (
        engine.dialect.name != "sqlite"
        or store.settings.echo
        or dispatch.before_cursor_execute
        or dispatch.after_cursor_execute
        or store.replica is not None
    )
