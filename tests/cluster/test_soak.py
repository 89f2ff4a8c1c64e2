"""A short soak: app-server processes doing agent turns while their backends are killed.

The long run is ``make soak`` (``benchmarks/soak.py``); both use the engine in
``tests/support/soak.py``. The first test is the soak itself, against the real server;
the others feed the verifier histories with one known defect each, so a soak that
passes is known to be able to fail.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from tests.conftest import PostgresServer
from tests.support.soak import (
    SoakConfig,
    UnknownAppend,
    UnknownPop,
    WorkerLog,
    run_soak,
    tag,
    verify,
)


def admin_url(server: PostgresServer) -> str:
    return server.admin_url.render_as_string(hide_password=False)


@pytest.mark.postgres_only
def test_a_short_soak_with_backends_killed_all_along_loses_duplicates_and_reorders_nothing(
    postgres_server: PostgresServer,
) -> None:
    config = SoakConfig(
        database_url=postgres_server.create_database("agents_sessions_soak"),
        admin_url=admin_url(postgres_server),
        processes=3,
        conversations=60,
        duration_s=15,
        kill_every_s=1.5,
        pop_rate=0.1,
    )

    report = run_soak(config)

    summary = report.render()
    print(summary)  # the figures, in the log of every run (pytest -rP)
    assert (report.losses, report.duplicates, report.reorders) == (0, 0, 0), summary
    assert report.failures() == [], summary
    # Faults were really injected, into the workers' own connections.
    assert report.kill_rounds > 0, summary
    assert report.connections_killed > 0, summary
    # Every process did turns, and pops happened (each one checked against the
    # history its writer knew, and so was every read).
    assert all(turns > 0 for turns in report.turns_per_process), summary
    assert report.pops > 0, summary
    # Every stored item is accounted for: the appends that were acknowledged (or
    # settled as stored after an error), less what pops removed.
    assert report.stored_items == (
        2 * (report.appends + report.unknown_appends_stored)
        - report.pops
        - report.unknown_pops_popped
    ), summary


# ------------------------------------------------------------ the verifier can fail


def config(*, shared: bool = False, processes: int = 1) -> SoakConfig:
    url = "postgresql://postgres@127.0.0.1:5432/unused"
    return SoakConfig(
        database_url=url, admin_url=url, processes=processes, conversations=1, shared=shared
    )


def turns(writer: int, *sequences: int) -> list[str]:
    return [tag(0, writer, sequence, part) for sequence in sequences for part in "ua"]


def writer(process: int, *sequences: int, partitioned: bool = True) -> WorkerLog:
    """A writer told that turns ``sequences`` of conversation 0 were stored."""
    log = WorkerLog(process=process, acked={0: list(sequences)})
    if partitioned:
        log.intended = {0: turns(process, *sequences)}
    return log


def test_the_verifier_passes_a_history_that_is_exactly_what_was_acknowledged() -> None:
    verdict = verify(config(), [writer(0, 1, 2, 3)], {0: turns(0, 1, 2, 3)})

    assert (verdict.losses, verdict.duplicates, verdict.reorders, verdict.phantoms) == (0, 0, 0, 0)
    assert (verdict.split_turns, verdict.partial_turns, verdict.history_mismatches) == (0, 0, 0)


DEFECTS: dict[str, tuple[Sequence[str | None], str]] = {
    "an item lost": ([*turns(0, 1), tag(0, 0, 2, "u"), *turns(0, 3)], "losses"),
    "an item stored twice": ([*turns(0, 1, 2, 3), tag(0, 0, 3, "a")], "duplicates"),
    "two turns swapped": (turns(0, 2, 1, 3), "reorders"),
    "a turn's two items swapped": (
        [*turns(0, 1), tag(0, 0, 2, "a"), tag(0, 0, 2, "u")],
        "reorders",
    ),
    "an item never appended": (turns(0, 1, 2, 3, 4), "phantoms"),
    "an item without a tag": ([*turns(0, 1, 2, 3), None], "phantoms"),
}


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_the_verifier_catches(defect: str) -> None:
    stored, counter = DEFECTS[defect]

    verdict = verify(config(), [writer(0, 1, 2, 3)], {0: stored})

    assert getattr(verdict, counter) > 0
    assert verdict.history_mismatches == 1


def test_the_verifier_catches_another_writers_turn_between_a_question_and_its_answer() -> None:
    writers = [writer(n, 1, partitioned=False) for n in (0, 1)]
    interleaved: list[str | None] = [
        tag(0, 0, 1, "u"),
        tag(0, 1, 1, "u"),
        tag(0, 1, 1, "a"),
        tag(0, 0, 1, "a"),
    ]

    verdict = verify(config(shared=True, processes=2), writers, {0: interleaved})

    assert verdict.split_turns == 1
    assert verdict.reorders == 0


def test_the_verifier_catches_one_item_returned_by_two_pops() -> None:
    writers = [writer(n, *([1] if n == 0 else []), partitioned=False) for n in (0, 1)]
    for log in writers:
        log.popped = {0: [tag(0, 0, 1, "a")]}

    verdict = verify(config(shared=True, processes=2), writers, {0: [tag(0, 0, 1, "u")]})

    assert verdict.duplicates == 1


def test_the_verifier_catches_half_of_an_append_whose_outcome_was_unknown() -> None:
    log = writer(0, 1, partitioned=False)
    log.unknown_appends = [UnknownAppend(0, 2, "DatabaseError", "stored")]

    verdict = verify(config(shared=True), [log], {0: [*turns(0, 1), tag(0, 0, 2, "a")]})

    assert verdict.partial_turns == 1


def test_a_lost_pop_explains_one_missing_item_gone_from_the_history_read_after_it() -> None:
    log = writer(0, 1, 2, partitioned=False)
    after_the_pop = [*turns(0, 1), tag(0, 0, 2, "u")]
    log.unknown_pops = [UnknownPop(0, "ConnectionLostError", "pending", after_the_pop)]

    verdict = verify(config(shared=True), [log], {0: after_the_pop})

    assert (verdict.losses, verdict.unknown_pops_popped) == (0, 1)


def test_a_lost_pop_explains_no_item_still_present_after_it_nor_a_second_one() -> None:
    log = writer(0, 1, 2, partitioned=False)
    # The history read right after the failed pop still held turn 2: that pop did
    # not remove it, so its later absence is a loss. And one pop removes one item.
    log.unknown_pops = [UnknownPop(0, "ConnectionLostError", "pending", turns(0, 1, 2))]
    verdict = verify(config(shared=True), [log], {0: [*turns(0, 1), tag(0, 0, 2, "u")]})
    assert (verdict.losses, verdict.unknown_pops_popped) == (1, 0)

    log.unknown_pops = [UnknownPop(0, "ConnectionLostError", "pending", turns(0, 1))]
    verdict = verify(config(shared=True), [log], {0: turns(0, 1)})
    assert (verdict.losses, verdict.unknown_pops_popped) == (1, 1)
