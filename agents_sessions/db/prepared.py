"""Server-side prepared statements for the hot statements on the event loop's connections.

psycopg2 sends every statement as text (the simple query protocol), so the server
parses and plans it on every call -- for the hot statements, most of the server's
work: the append's CTEs take longer to plan than to run. On each asynchronous
connection (:mod:`agents_sessions.db.async_pool`) a statement's first call sends
``PREPARE name (types) AS ...`` on its own, then ``EXECUTE name (...)``, which is
all later calls send: parsed once per connection, and planned once too (a generic
plan, see :func:`executes_text`). Values still travel as psycopg2 literals, now
cast to the declared types. (``PREPARE`` is sent alone because a prepared statement
outlives a failed transaction: sent together with an ``EXECUTE`` that fails, it
would stay prepared unknown to the connection's bookkeeping.)

A statement's name is derived from its SQL and parameter types, so one name means
one statement in every process and every version of this package: a name found on
a server connection can only be the same statement.

Behind a transaction-pooling proxy (PgBouncer) one client connection's statements may
reach different server connections, where a name is unknown (SQLSTATE 26000) or
already taken (42P05). Either error means nothing ran: the caller sends the
statement as plain text instead and prepares no more (:class:`PreparingSwitch`).
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from typing import Any

import psycopg2
from sqlalchemy.types import NullType

logger = logging.getLogger("agents_sessions")

_PLACEHOLDER = re.compile(r"%\(([^)]+)\)s")
# The server's answers that say a name is not this connection's own: the statement
# reached another server connection than the one it was prepared on.
_POOLER_SIGNS = ("26000", "42P05")


@dataclass(frozen=True, slots=True)
class PreparedForm:
    """A prebuilt statement as ``PREPARE`` and ``EXECUTE`` text, for psycopg2's pyformat.

    Attributes:
        name: The prepared statement's name, derived from its SQL and types.
        prepare: Before the first call on a connection (sent with no parameters:
            psycopg2 then turns the SQL's ``%%`` into ``%``).
        execute: Every call.
    """

    name: str
    prepare: str
    execute: str


# Sent in the same query string as a call's EXECUTEs: the string runs as one implicit
# transaction, so SET LOCAL ends with the call -- it never reaches a later statement on
# the connection, nor, behind a transaction-pooling proxy, another client's.
#
# Why force the generic plan: every hot statement finds its rows from one conversation
# id through the primary keys, and its generic plan (index scans, a LIMIT taken as
# given) is the right plan for any conversation. Left to choose ('auto'), the server
# compares the generic plan's estimate -- which has to guess what `LIMIT $n` keeps --
# with the first five custom plans of the connection, and where those were for a
# conversation much longer or shorter than the average it keeps planning every call
# anew: for a read, several times the server time of running it.
_GENERIC_PLAN_FOR_THIS_CALL = "SET LOCAL plan_cache_mode = force_generic_plan;\n"


def executes_text(forms: list[PreparedForm]) -> str:
    """One query string running each of ``forms`` (``EXECUTE``), in order, on generic plans."""
    return _GENERIC_PLAN_FOR_THIS_CALL + ";\n".join(form.execute for form in forms)


# Prebuilt statement (by id) and driver -> (the statement, its prepared form). The
# statement is kept so that its id cannot be reused by another.
_FORMS: dict[tuple[int, str], tuple[Any, PreparedForm]] = {}


def prepared_form(statement: Any, dialect: Any) -> PreparedForm:
    """``statement`` (a prebuilt statement) as ``PREPARE``/``EXECUTE`` text; compiled once.

    Every bound parameter needs a SQL type (``PREPARE`` declares them); a parameter
    without one is a programming error, raised as ``TypeError`` naming it.
    """
    key = (id(statement), dialect.driver)
    entry = _FORMS.get(key)
    if entry is not None and entry[0] is statement:
        return entry[1]
    compiled = statement.compile(dialect=dialect)
    binds = {compiled.bind_names[bind]: bind for bind in compiled.binds.values()}
    order: list[str] = []

    def numbered(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in order:
            order.append(name)
        return f"${order.index(name) + 1}"

    body = _PLACEHOLDER.sub(numbered, str(compiled))
    types = []
    for name in order:
        kind = binds[name].type
        if isinstance(kind, NullType):
            raise TypeError(f"parameter {name!r} of a hot statement has no SQL type")
        types.append(dialect.type_compiler_instance.process(kind.dialect_impl(dialect)))
    digest = hashlib.sha256(f"{types}\n{body}".encode()).hexdigest()[:24]
    name = f"agents_sessions_{digest}"
    arguments = f" ({', '.join(f'%({parameter})s' for parameter in order)})" if order else ""
    execute = f"EXECUTE {name}{arguments}"
    declared = f" ({', '.join(types)})" if types else ""
    form = PreparedForm(name, f"PREPARE {name}{declared} AS {body}", execute)
    # Concurrent first calls may both compile; they store equal entries.
    _FORMS[key] = (statement, form)
    return form


class PreparingSwitch:
    """Whether the pools of one database URL prepare statements; off for good once a
    transaction-pooling proxy shows itself (logged once)."""

    __slots__ = ("on",)

    def __init__(self) -> None:
        self.on = True

    def pooler_answered(self, error: psycopg2.Error) -> bool:
        """Whether ``error`` says a proxy moved the statement to another server connection.

        If so, preparing is switched off (the statement did not run: send it as text).
        """
        if getattr(error, "pgcode", None) not in _POOLER_SIGNS:
            return False
        if self.on:
            self.on = False
            logger.warning(
                "agents_sessions: a prepared statement was not found where it was "
                "prepared (a transaction-pooling proxy such as PgBouncer?); hot "
                "statements are sent as plain text from now on"
            )
        return True
