"""The prebuilt SQL of the hot paths, and the cache that compiles each once per driver.

Statements are built once, at import time, as SQLAlchemy Core constructs, so each
call only binds parameters. The session's hot paths -- append, latest N on the current
branch -- are one statement each on PostgreSQL, so in autocommit mode a call is one round trip.
The repositories (:mod:`agents_sessions.repositories`) execute them through
:func:`execute`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import (
    ARRAY,
    JSON,
    Boolean,
    Connection,
    Integer,
    Text,
    and_,
    bindparam,
    case,
    cast,
    delete,
    exists,
    func,
    insert,
    literal_column,
    null,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import IntegrityError

from .tables import (
    JSONDocument,
    append_keys_table,
    branches_table,
    conversations_table,
    expiry_after,
    messages_table,
    run_states_table,
    utcnow,
)

conversations = conversations_table
messages = messages_table
branches = branches_table
append_keys = append_keys_table

#: The branch every conversation starts on; it cannot be deleted.
MAIN_BRANCH = "main"

#: How long an append's idempotency key is kept at least: a call repeated with the
#: same key within this time stores its items once (see ``models.AppendKey``).
APPEND_KEY_RETENTION = timedelta(days=1)


def keys_expire_before() -> datetime:
    """Append keys created before this instant are past their retention."""
    return datetime.now(timezone.utc) - APPEND_KEY_RETENTION


# None must bind as SQL NULL (not JSON 'null') so COALESCE can keep existing metadata.
_metadata_param = bindparam(
    "metadata", type_=JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
)


# An empty JSON object as each dialect wants it in COALESCE: PostgreSQL needs the
# jsonb type spelled out; SQLite must NOT get CAST(... AS JSON), which its type
# affinity rules turn into the number 0.
_EMPTY_METADATA = {
    "postgresql": cast(literal_column("'{}'"), JSONB),
    "sqlite": literal_column("'{}'"),
}


# Both dialects' INSERTs offer on_conflict_do_update() with the same signature.
_DIALECT_INSERT: dict[str, Callable[..., Any]] = {
    "postgresql": postgresql.insert,
    "sqlite": sqlite.insert,
}


#: The conversation id, typed: the hot statements name it in every table they touch
#: (so a sharded cluster routes them to one shard), and prepare it as text (see
#: agents_sessions.db.prepared).
CONVERSATION_ID = bindparam("conversation_id", type_=Text)
#: How many items a read returns.
LIMIT = bindparam("limit", type_=Integer)


# --- retention (time-to-live): see agents_sessions.repositories.messages ---------------
#: Seconds to live from now, or NULL (no time-to-live given: the expiry is unchanged).
TTL_SECONDS = bindparam("ttl_seconds", None, type_=Integer)
#: Whether this write may restart an expired conversation (appends only: they purge
#: the expired history first). Other writers leave an expired conversation expired.
_RESTART_EXPIRED = bindparam("restart_expired", False, type_=Boolean)


def expired(conversation_id: Any) -> Any:
    """EXISTS: the conversation has expired (it reads as empty)."""
    return exists().where(
        conversations.c.id == conversation_id, conversations.c.expires_at <= utcnow()
    )


def _new_expiry(excluded: Any) -> Any:
    """The expiry an upsert leaves: extended by a TTL, restarted, or unchanged.

    Only ``EXCLUDED`` values stand for "now" here (its ``updated_at``, and its
    ``expires_at`` = now + TTL): a function call in DO UPDATE SET is refused by
    Citus on distributed tables (see ``updated_at`` below).
    """
    return case(
        (
            conversations.c.expires_at <= excluded.updated_at,
            case((_RESTART_EXPIRED, excluded.expires_at), else_=conversations.c.expires_at),
        ),
        else_=func.coalesce(excluded.expires_at, conversations.c.expires_at),
    )


def _branch_after_upsert(excluded: Any) -> Any:
    """The current branch an upsert leaves: ``main`` (NULL) when it restarts an expired
    conversation (its branches are purged with its messages), else unchanged."""
    restarting = and_(conversations.c.expires_at <= excluded.updated_at, _RESTART_EXPIRED)
    return case((restarting, null()), else_=conversations.c.current_branch)


def _conversation_upsert(
    dialect_name: str, *, replace_user: bool, unexpired_only: bool = False
) -> Any:
    """INSERT a conversation, or touch it (and update what was given) if it exists.

    ON CONFLICT DO UPDATE also locks the conversation row until the transaction
    ends; appends rely on that lock to serialise writers of one conversation.
    ``unexpired_only``: an expired conversation is locked but left as it is (the
    ``WHERE`` of DO UPDATE is false, so RETURNING yields no row), never restarted.
    """
    statement = _DIALECT_INSERT[dialect_name](conversations).values(
        id=bindparam("conversation_id"),
        user_id=bindparam("user_id", type_=Text),
        metadata=func.coalesce(_metadata_param, _EMPTY_METADATA[dialect_name]),
        created_at=utcnow(),
        updated_at=utcnow(),
        expires_at=expiry_after(TTL_SECONDS),
    )
    excluded = statement.excluded
    user_id = (
        func.coalesce(excluded.user_id, conversations.c.user_id)
        if replace_user
        # The session facade never re-assigns an owned conversation to another user.
        else func.coalesce(conversations.c.user_id, excluded.user_id)
    )
    changes = {
        # The time the row would have been inserted with: now() is evaluated once,
        # in VALUES. A function call here would be refused by Citus (functions in
        # DO UPDATE SET must be IMMUTABLE on distributed tables); a reference to
        # EXCLUDED is not, and the timestamp still comes from the database (the
        # coordinator's clock), never from the client's.
        "updated_at": excluded.updated_at,
        "user_id": user_id,
        "metadata": func.coalesce(_metadata_param, conversations.c.metadata),
    }
    if unexpired_only:
        # The WHERE is evaluated on the row as locked (its newest committed version),
        # so a concurrent restart of an expired conversation is seen here.
        return statement.on_conflict_do_update(
            index_elements=[conversations.c.id],
            set_={
                **changes,
                "expires_at": func.coalesce(excluded.expires_at, conversations.c.expires_at),
            },
            where=or_(
                conversations.c.expires_at.is_(None),
                conversations.c.expires_at > excluded.updated_at,
            ),
        )
    return statement.on_conflict_do_update(
        index_elements=[conversations.c.id],
        set_={
            **changes,
            "expires_at": _new_expiry(excluded),
            "current_branch": _branch_after_upsert(excluded),
        },
    )


ENSURE_CONVERSATION = {
    name: _conversation_upsert(name, replace_user=False) for name in _DIALECT_INSERT
}
UPSERT_CONVERSATION = {
    name: _conversation_upsert(name, replace_user=True).returning(*conversations.c)
    for name in _DIALECT_INSERT
}


def unnested_rows(name: str, **columns: tuple[str, Any]) -> Any:
    """Rows that arrive as parallel array parameters, with their 1-based ``position``.

    ``columns`` maps each column to ``(array parameter name, element type)``; the
    arrays are unnested WITH ORDINALITY, so ``ORDER BY position`` inserts the rows
    in the caller's order -- history order is the order ``messages.id`` is drawn.
    One statement carries a whole batch, whatever its size.
    """
    return (
        func.unnest(
            *(bindparam(parameter, type_=ARRAY(kind)) for parameter, kind in columns.values())
        )
        .table_valued(*columns, with_ordinality="position")
        .render_derived(name=name)
    )


def _postgres_append(*, common_case: bool) -> Any:
    """One statement: upsert (and lock) the conversation, then insert the items after it.

    The CTE's ``ON CONFLICT DO UPDATE`` takes the conversation's row lock before
    any message row is produced (the join needs its row), so ``nextval`` for this
    call's ids runs only once earlier writers of the conversation have committed:
    ids -- history order -- follow commit order, and each call's items are
    contiguous. Items arrive as parallel arrays, unnested WITH ORDINALITY and
    inserted in that order.

    ``common_case``: the lean form for a conversation that has not expired. It
    leaves an expired one untouched and stores nothing (rowcount 0), as it does for
    a key an earlier attempt claimed; the caller then runs the full form, which
    restarts an expired conversation (purging its history) and answers for the key.
    Only the full form drops the conversation's append keys past their retention.
    """
    upsert = (
        _conversation_upsert("postgresql", replace_user=False, unexpired_only=True)
        if common_case
        else ENSURE_CONVERSATION["postgresql"]
    )
    conversation = upsert.returning(conversations.c.id, conversations.c.current_branch).cte(
        "conversation"
    )
    housekeeping: list[Any] = []
    if not common_case:
        # Whether the conversation had expired, as of this statement's snapshot (a
        # writer that restarted it since committed a fresh expiry, which the upsert's
        # CASE sees on the locked row; its messages are not in this snapshot either).
        was_expired = (
            select(conversations.c.id)
            .where(
                conversations.c.id == bindparam("conversation_id"),
                conversations.c.expires_at <= utcnow(),
            )
            .cte("was_expired")
        )
        # An expired conversation starts afresh: its old messages and paused run go.
        # The deletes read `conversation`, so they run after its upsert locked the row
        # (the lock order of every writer). When nothing expired they are one-time-
        # filtered. Each delete also names the conversation id parameter itself: a
        # sharded cluster (Citus) then routes the whole statement to one shard.
        restarted = exists(
            select(conversation.c.id).where(conversation.c.id.in_(select(was_expired.c.id)))
        )
        for table, returned in (
            (messages, messages.c.id),
            (branches, branches.c.conversation_id),
            (run_states_table, run_states_table.c.conversation_id),
        ):
            housekeeping.append(
                delete(table)
                .where(table.c.conversation_id == CONVERSATION_ID, restarted)
                .returning(returned)
                .cte(f"purged_{table.name}")
            )
        # Keys past their retention go as the conversation is written (after its lock).
        housekeeping.append(
            delete(append_keys)
            .where(
                append_keys.c.conversation_id == CONVERSATION_ID,
                exists(select(conversation.c.id)),
                append_keys.c.created_at < bindparam("keys_expire_before"),
            )
            .cte("expired_keys")
        )
    rows = unnested_rows(
        "new_items", role=("roles", Text), content=("contents", Text), document=("documents", Text)
    )
    append_key = bindparam("append_key", type_=Text)
    # The key is claimed in append_keys; only a call that claims it (or has none)
    # inserts items. A concurrent attempt holding the same key makes ON CONFLICT
    # wait for it, then do nothing: one of them stores the items, never both.
    claimed = (
        postgresql.insert(append_keys)
        .from_select(
            ["conversation_id", "key", "created_at"],
            # The conversation id parameter itself (so a sharded cluster routes the
            # whole statement to one shard), once the upsert above has locked its row.
            select(CONVERSATION_ID, append_key, utcnow()).where(
                append_key.is_not(None), exists(select(conversation.c.id))
            ),
        )
        .on_conflict_do_nothing(index_elements=[append_keys.c.conversation_id, append_keys.c.key])
        .returning(append_keys.c.conversation_id)
        .cte("claimed")
    )
    source = (
        select(
            conversation.c.id,
            rows.c.role,
            rows.c.content,
            cast(rows.c.document, JSONDocument),
            # Also on the call's first message row (exports carry it).
            case((rows.c.position == 1, append_key), else_=null()),
            # The conversation's current branch, read under its row lock: a
            # concurrent switch_to_branch lands wholly before or after this call.
            func.coalesce(conversation.c.current_branch, MAIN_BRANCH),
        )
        .select_from(conversation.join(rows, true()))
        .where(or_(append_key.is_(None), exists(select(claimed.c.conversation_id))))
        .order_by(rows.c.position)
    )
    return (
        insert(messages)
        .from_select(
            ["conversation_id", "role", "content", "item", "append_key", "branch_id"], source
        )
        .add_cte(*housekeeping)
    )


POSTGRES_APPEND = _postgres_append(common_case=False)
POSTGRES_APPEND_COMMON_CASE = _postgres_append(common_case=True)
INSERT_MESSAGE = insert(messages).values(
    conversation_id=bindparam("conversation_id"),
    role=bindparam("role"),
    content=bindparam("content"),
    item=bindparam("document", type_=JSONDocument),
    append_key=bindparam("append_key", type_=Text),
    branch_id=bindparam("branch_id", type_=Text),
)
SELECT_CURRENT_BRANCH = select(func.coalesce(conversations.c.current_branch, MAIN_BRANCH)).where(
    conversations.c.id == bindparam("conversation_id")
)
# Statement by statement (SQLite, row-level security): each row lands on the current
# branch, read in the INSERT itself, after the caller locked the conversation.
INSERT_MESSAGE_ON_CURRENT_BRANCH = insert(messages).values(
    conversation_id=bindparam("conversation_id"),
    role=bindparam("role"),
    content=bindparam("content"),
    item=bindparam("document", type_=JSONDocument),
    append_key=bindparam("append_key", type_=Text),
    branch_id=SELECT_CURRENT_BRANCH.scalar_subquery(),
)
# The current branch, and whether it inherits from a parent (then its history is
# read branch by branch; without one, by SELECT_BRANCH_LATEST/ALL alone).
SELECT_CURRENT_BRANCH_FORKED = select(
    func.coalesce(conversations.c.current_branch, MAIN_BRANCH),
    exists().where(
        branches.c.conversation_id == conversations.c.id,
        branches.c.branch_id == func.coalesce(conversations.c.current_branch, MAIN_BRANCH),
        branches.c.parent_branch_id.isnot(None),
    ),
).where(
    conversations.c.id == bindparam("conversation_id"),
    # An expired conversation reads as empty (no row: no branch to read).
    or_(conversations.c.expires_at.is_(None), conversations.c.expires_at > utcnow()),
)
_BRANCH_LATEST = (
    select(messages.c.id, messages.c.item)
    .where(
        messages.c.conversation_id == bindparam("conversation_id"),
        messages.c.branch_id == bindparam("branch_id"),
    )
    .order_by(messages.c.id.desc())
    .limit(bindparam("limit", type_=Integer))
    .subquery("latest")
)
SELECT_BRANCH_LATEST = select(_BRANCH_LATEST.c.item).order_by(_BRANCH_LATEST.c.id)
SELECT_BRANCH_ALL = (
    select(messages.c.item)
    .where(
        messages.c.conversation_id == bindparam("conversation_id"),
        messages.c.branch_id == bindparam("branch_id"),
    )
    .order_by(messages.c.id)
)
# Statement by statement (SQLite; PostgreSQL under row-level security), after the
# conversation's lock: claim the key (rowcount 0: an earlier attempt stored the call).
CLAIM_APPEND_KEY = {
    name: _DIALECT_INSERT[name](append_keys)
    .values(
        conversation_id=bindparam("conversation_id"),
        key=bindparam("append_key", type_=Text),
        created_at=utcnow(),
    )
    .on_conflict_do_nothing(index_elements=[append_keys.c.conversation_id, append_keys.c.key])
    for name in _DIALECT_INSERT
}
DELETE_EXPIRED_APPEND_KEYS = delete(append_keys).where(
    append_keys.c.conversation_id == bindparam("conversation_id"),
    append_keys.c.created_at < bindparam("keys_expire_before"),
)

SELECT_RECORDS = select(
    messages.c.id,
    messages.c.conversation_id,
    messages.c.role,
    messages.c.content,
    messages.c.item,
    messages.c.created_at,
).where(messages.c.conversation_id == bindparam("conversation_id"))


# The current branch's history in one statement (PostgreSQL). The recursive CTE
# walks from the conversation's current branch up through its parents; each step
# narrows the id bound (LEAST ignores NULL, "no bound"). The LATERAL arm takes the
# newest :limit rows of one branch below its bound with one backward scan of
# (conversation_id, branch_id, id), so a read costs the same at any history depth;
# an unforked conversation has one arm.
#: The chain CTE alone (``chain(branch_id, bound)``), also used to find a turn.
VIEW_CHAIN = """
WITH RECURSIVE chain(branch_id, bound) AS (
    SELECT COALESCE(c.current_branch, 'main'), CAST(NULL AS BIGINT)
    FROM conversations c
    WHERE c.id = :conversation_id AND (c.expires_at IS NULL OR c.expires_at > now())
  UNION ALL
    SELECT b.parent_branch_id, LEAST(chain.bound, b.fork_before_id)
    FROM chain JOIN conversation_branches b
      ON b.conversation_id = :conversation_id AND b.branch_id = chain.branch_id
    WHERE b.parent_branch_id IS NOT NULL
)
"""
NO_BOUND = "9223372036854775807"
POSTGRES_VIEW_LATEST = (
    text(
        VIEW_CHAIN
        + f"""
SELECT latest.item FROM (
    SELECT own.id, own.item FROM chain CROSS JOIN LATERAL (
        SELECT m.id, m.item FROM messages m
        WHERE m.conversation_id = :conversation_id AND m.branch_id = chain.branch_id
          AND m.id < COALESCE(chain.bound, {NO_BOUND})
        ORDER BY m.id DESC LIMIT :limit
    ) own
    ORDER BY own.id DESC LIMIT :limit
) latest ORDER BY latest.id
"""
    )
    .bindparams(CONVERSATION_ID, LIMIT)
    .columns(item=JSONDocument)
)
POSTGRES_VIEW_ALL = (
    text(
        VIEW_CHAIN
        + f"""
SELECT m.item FROM chain JOIN messages m
    ON m.conversation_id = :conversation_id AND m.branch_id = chain.branch_id
   AND m.id < COALESCE(chain.bound, {NO_BOUND})
ORDER BY m.id
"""
    )
    .bindparams(CONVERSATION_ID)
    .columns(item=JSONDocument)
)
IS_EXPIRED = select(expired(bindparam("conversation_id")))
# Touch a conversation: its expiry is left as it is (TOUCH_CONVERSATION), or set to
# now + ttl_seconds (EXTEND_CONVERSATION). Two statements rather than one with
# COALESCE(now() + ttl, expires_at): Citus refuses a non-IMMUTABLE function inside
# COALESCE or CASE on a distributed table.
TOUCH_CONVERSATION = (
    update(conversations)
    .where(conversations.c.id == bindparam("conversation_id"))
    .values(updated_at=utcnow())
)
EXTEND_CONVERSATION = TOUCH_CONVERSATION.values(expires_at=expiry_after(TTL_SECONDS))
CLEAR = delete(messages).where(messages.c.conversation_id == bindparam("conversation_id"))


def _trim_to_last_turns() -> Any:
    """DELETE the messages before the conversation's newest ``turns`` user messages.

    A turn starts at a user message; what came before the oldest kept one goes.
    Fewer turns than that: the subquery is NULL and nothing is deleted.
    """
    oldest_kept = (
        select(messages.c.id)
        .where(
            messages.c.conversation_id == bindparam("conversation_id"), messages.c.role == "user"
        )
        .order_by(messages.c.id.desc())
        .offset(bindparam("turns_before", type_=Integer))
        .limit(1)
        .scalar_subquery()
    )
    return delete(messages).where(
        messages.c.conversation_id == bindparam("conversation_id"), messages.c.id < oldest_kept
    )


TRIM_TO_LAST_TURNS = _trim_to_last_turns()
PURGE_MESSAGES = delete(messages).where(messages.c.conversation_id == bindparam("conversation_id"))
PURGE_BRANCHES = delete(branches).where(branches.c.conversation_id == bindparam("conversation_id"))
PURGE_RUN_STATE = delete(run_states_table).where(
    run_states_table.c.conversation_id == bindparam("conversation_id")
)
LOCK_IF_EXPIRED = (
    select(conversations.c.id)
    .where(
        conversations.c.id == bindparam("conversation_id"), conversations.c.expires_at <= utcnow()
    )
    .with_for_update()
)
COUNT_MESSAGES = select(func.count()).where(
    messages.c.conversation_id == bindparam("conversation_id")
)


# Prebuilt statement (by id) and driver -> (the statement, its SQL text, default
# parameters). The statement is kept so that its id cannot be reused by another.
_DRIVER_SQL: dict[tuple[int, str], tuple[Any, str, dict[str, Any]]] = {}


def execute(connection: Connection, statement: Any, parameters: dict[str, Any]) -> Any:
    """Execute one of this module's prebuilt statements; on PostgreSQL as SQL compiled once.

    ``Connection.execute()`` of a Core statement looks its compiled form up in
    SQLAlchemy's cache and rebuilds the parameter dict on every call, a large share
    of a hot call's client CPU (``docs/performance.md`` has the profile). The hot
    statements never change, so on PostgreSQL
    they are compiled once per driver and sent with ``exec_driver_sql()``: the same
    SQL on the same connection, with the same events and error handling. Values
    must then be in the driver's form -- JSON goes as text, cast in the SQL.
    """
    dialect = connection.dialect
    if dialect.name != "postgresql" or dialect.paramstyle != "pyformat":
        return connection.execute(statement, parameters)
    sql, defaults = driver_sql(statement, dialect)
    return connection.exec_driver_sql(sql, {**defaults, **parameters})


def execute_together(
    connection: Connection, statements: tuple[Any, ...], parameters: dict[str, Any]
) -> Any:
    """Execute prebuilt statements in order, in one round trip where the driver allows.

    psycopg2 (the simple query protocol) sends them as one query string: one implicit
    transaction on an autocommit connection, a snapshot per statement, and the last
    statement's rows as the result. Other drivers send them one by one (run them in
    a transaction). Returns the last statement's result.
    """
    dialect = connection.dialect
    if dialect.driver != "psycopg2" or dialect.paramstyle != "pyformat":
        for statement in statements:
            result = connection.execute(statement, parameters)
        return result
    sql, defaults = together_sql(statements, dialect)
    return connection.exec_driver_sql(sql, {**defaults, **parameters})


def together_sql(statements: Any, dialect: Any) -> tuple[str, dict[str, Any]]:
    """:func:`driver_sql` of one prebuilt statement, or of a tuple sent as one query
    (joined once, like a statement's compiled once)."""
    if not isinstance(statements, tuple):
        return driver_sql(statements, dialect)
    key = (id(statements), dialect.driver)
    entry = _DRIVER_SQL.get(key)
    if entry is None or entry[0] is not statements:
        parts = [driver_sql(statement, dialect) for statement in statements]
        defaults = {name: value for _, part in parts for name, value in part.items()}
        entry = _DRIVER_SQL[key] = (statements, ";\n".join(sql for sql, _ in parts), defaults)
    return entry[1], entry[2]


def driver_sql(statement: Any, dialect: Any) -> tuple[str, dict[str, Any]]:
    """A prebuilt statement's SQL for ``dialect``'s driver (compiled once), and its defaults."""
    key = (id(statement), dialect.driver)
    entry = _DRIVER_SQL.get(key)
    if entry is None or entry[0] is not statement:
        compiled = statement.compile(dialect=dialect)
        # Defaults: every bind name, with the values of literal binds (e.g. the 1 in
        # "position = 1"); the call's parameters fill in the rest.
        defaults = {
            compiled.bind_names[bind]: bind.effective_value for bind in compiled.binds.values()
        }
        # Concurrent first calls may both compile; they store equal entries.
        entry = _DRIVER_SQL[key] = (statement, str(compiled), defaults)
    return entry[1], entry[2]


def violates_append_key(error: IntegrityError) -> bool:
    diag = getattr(error.orig, "diag", None)
    return getattr(diag, "constraint_name", None) == "uq_messages_conversation_id_append_key"
