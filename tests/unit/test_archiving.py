"""How ``doctor`` judges what a server reports about WAL archiving.

The states a throwaway server reaches easily are run for real in
tests/cluster/test_archiving_doctor.py; these are the ones that need a standby or
hours of history: judged from the same reported values.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta, timezone

from agents_sessions.ops.archiving import ArchiverState, judge_archiving

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)

ARCHIVING = ArchiverState(
    archive_mode="on",
    in_recovery=False,
    archived_count=120,
    last_archived_wal="0000000100000000000000A0",
    last_archived_time=NOW - timedelta(minutes=5),
    failed_count=0,
    last_failed_wal=None,
    last_failed_time=None,
    archiver_configured=True,
    archive_timeout=60,
    now=NOW,
    holds_data=True,
)


def test_a_standby_defers_to_its_primary_unless_it_archives_itself() -> None:
    standby = dataclasses.replace(
        ARCHIVING, in_recovery=True, archived_count=0, last_archived_time=None
    )
    status, detail, advice = judge_archiving(standby)
    assert status == "ok" and "standby" in detail and "primary" in detail and advice is None
    # archive_mode = always: the standby archives, so it is judged like a primary.
    always = dataclasses.replace(
        standby, archive_mode="always", failed_count=3, last_failed_time=NOW
    )
    assert judge_archiving(always)[0] == "fail"


def test_old_failures_are_reported_but_only_a_failure_after_the_last_success_fails() -> None:
    recovered = dataclasses.replace(
        ARCHIVING,
        failed_count=7,
        last_failed_wal="000000010000000000000090",
        last_failed_time=NOW - timedelta(hours=3),
    )
    status, detail, _ = judge_archiving(recovered)
    assert status == "ok"
    assert "7 failed attempts, the latest on 000000010000000000000090 3 h ago" in detail
    assert "last archived 0000000100000000000000A0 5 min ago (120 archived)" in detail
    assert "archive_timeout=60s" in detail

    failing = dataclasses.replace(recovered, last_failed_time=NOW - timedelta(seconds=20))
    status, detail, advice = judge_archiving(failing)
    assert status == "fail" and "archiving is failing" in detail
    assert advice is not None and "pg_wal" in advice
