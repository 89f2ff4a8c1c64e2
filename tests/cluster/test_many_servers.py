"""Many app servers, no sticky sessions: any process takes a turn of any conversation.

Each worker process is an app server with its own engine and pool (see
``tests/support/soak.py``). Every conversation is shared by all of them, so writers in
different processes append to one conversation concurrently. Afterwards every
history is read straight from the table: each acknowledged turn is there exactly
once, its two items adjacent (``add_items`` is atomic), and each process's turns of
a conversation in the order that process was told they were stored.
"""

from __future__ import annotations

import pytest

from tests.conftest import PostgresServer
from tests.support.soak import SoakConfig, run_soak

pytestmark = pytest.mark.postgres_only


def shared_config(server: PostgresServer, *, kill_every_s: float, pop_rate: float) -> SoakConfig:
    """3 processes, 20 conversations shared by all of them, 8 seconds of turns."""
    return SoakConfig(
        database_url=server.create_database("agents_sessions_servers"),
        admin_url=server.admin_url.render_as_string(hide_password=False),
        processes=3,
        conversations=20,
        shared=True,
        duration_s=8,
        kill_every_s=kill_every_s,
        pop_rate=pop_rate,
    )


def test_three_servers_sharing_every_conversation_store_each_acknowledged_turn_exactly_once(
    postgres_server: PostgresServer,
) -> None:
    report = run_soak(shared_config(postgres_server, kill_every_s=0, pop_rate=0))

    summary = report.render()
    print(summary)  # the figures, in the log of every run (pytest -rP)
    assert report.failures() == [], summary
    # No faults: every call was answered, so the histories are exactly the
    # acknowledged turns -- each once (no losses, duplicates or phantoms above).
    assert (report.unknown_appends, report.read_failures) == (0, 0), summary
    assert report.stored_items == 2 * report.appends, summary
    # No stickiness: every process wrote every conversation, and their turns
    # interleave within conversations.
    assert report.min_writers_per_conversation == 3, summary
    assert report.writer_switches > 0, summary


def test_three_servers_sharing_every_conversation_survive_killed_backends_and_pops(
    postgres_server: PostgresServer,
) -> None:
    report = run_soak(shared_config(postgres_server, kill_every_s=1, pop_rate=0.1))

    summary = report.render()
    print(summary)  # the figures, in the log of every run (pytest -rP)
    assert (report.losses, report.duplicates, report.reorders) == (0, 0, 0), summary
    assert report.failures() == [], summary
    assert report.kill_rounds > 0, summary
    assert report.connections_killed > 0, summary
    assert report.pops > 0, summary
    assert report.min_writers_per_conversation == 3, summary
    assert report.stored_items == (
        2 * (report.appends + report.unknown_appends_stored)
        - report.pops
        - report.unknown_pops_popped
    ), summary
