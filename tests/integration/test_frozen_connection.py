"""A connection that freezes (no FIN, no RST, no answer) never hangs a call.

A proxy between us and the server stops forwarding: the kernel still acknowledges
what we send, so only the response watchdog (``response_timeout``) can tell. Writes
then fail as :class:`ConnectionLostError` -- their outcome is unknown to the caller --
within the documented bound, and the session works again once the path does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from agents_sessions import ConnectionLostError, PostgreSQLSession, get_store, load_settings
from agents_sessions.db.engine import NETWORK_DEFAULTS, create_pooled_engine, parse_database_url
from tests.conftest import PostgresServer
from tests.support.frozen_proxy import FrozenProxy

pytestmark = pytest.mark.postgres_only

# Only a guard against the old behaviour (hanging forever), not a timing assertion;
# the bound under test is response_timeout=1 + one retry's connect_timeout=1 + backoff.
HANG_GUARD_S = 120


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


@pytest.mark.parametrize("operation", ["add_items", "pop_item", "clear_session"])
async def test_a_frozen_connection_fails_writes_as_connection_lost_instead_of_hanging(
    postgres_server: PostgresServer, operation: str
) -> None:
    url = postgres_server.create_database()
    get_store(url).ensure_schema()
    direct = make_url(url)
    settings = load_settings(retry_attempts=1, auto_migrate=False)
    with FrozenProxy(direct.host or "127.0.0.1", direct.port or 5432) as proxy:
        proxied = (
            direct.set(host="127.0.0.1", port=proxy.port)
            .update_query_dict({"response_timeout": "1", "connect_timeout": "1"})
            .render_as_string(hide_password=False)
        )
        session = PostgreSQLSession("frozen", database_url=proxied, settings=settings)
        await session.add_items([user("before")])  # a pooled connection through the proxy
        proxy.freeze()
        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "add_items": lambda: session.add_items([user("during")]),
            "pop_item": session.pop_item,
            "clear_session": session.clear_session,
        }

        task = asyncio.ensure_future(calls[operation]())
        # Not wait_for: a write's cancellation waits for its outcome, so it could not
        # end a hung call. Closing the proxy (on the way out) releases one.
        await asyncio.wait({task}, timeout=HANG_GUARD_S)
        assert task.done(), f"{operation} still hangs on a frozen connection"
        with pytest.raises(ConnectionLostError, match="may or may not have taken effect"):
            await task

    # The proxy forwarded nothing of the call: the history is as it was.
    assert await PostgreSQLSession("frozen", database_url=url).get_items() == [user("before")]


def test_every_network_wait_is_bounded_by_default_and_overridable_in_the_url(
    postgres_server: PostgresServer,
) -> None:
    url = postgres_server.create_database()
    engine = create_pooled_engine(parse_database_url(url + "?keepalives_idle=7"))
    try:
        with engine.connect() as connection:
            parameters = connection.connection.dbapi_connection.get_dsn_parameters()  # type: ignore[union-attr]
    finally:
        engine.dispose()
    for keyword, value in NETWORK_DEFAULTS.items():
        assert parameters[keyword] == ("7" if keyword == "keepalives_idle" else value), keyword


async def test_an_append_whose_outcome_is_unknown_can_be_repeated_with_its_key(
    postgres_server: PostgresServer,
) -> None:
    url = postgres_server.create_database()
    get_store(url).ensure_schema()
    direct = make_url(url)
    settings = load_settings(retry_attempts=1, auto_migrate=False)
    with FrozenProxy(direct.host or "127.0.0.1", direct.port or 5432) as proxy:
        proxied = (
            direct.set(host="127.0.0.1", port=proxy.port)
            .update_query_dict({"response_timeout": "1", "connect_timeout": "1"})
            .render_as_string(hide_password=False)
        )
        session = PostgreSQLSession("unknown", database_url=proxied, settings=settings)
        await session.add_items([user("before")])
        # The server gets the append and commits it; its answer never arrives.
        proxy.freeze_replies()
        task = asyncio.ensure_future(session.add_items([user("committed, unheard")]))
        await asyncio.wait({task}, timeout=HANG_GUARD_S)
        assert task.done()
        with pytest.raises(ConnectionLostError) as lost:
            await task
    key = lost.value.idempotency_key
    assert key is not None and key in str(lost.value)

    # The caller's own retry, on a working path, with the key: stored once, not twice.
    retry = PostgreSQLSession("unknown", database_url=url)
    await retry.add_items([user("committed, unheard")], idempotency_key=key)
    assert await retry.get_items() == [user("before"), user("committed, unheard")]
