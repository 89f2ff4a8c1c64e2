"""Where the time goes: profiles of our throughput workload, summarised by layer.

Two views of the same workload (``make profile``):

* **py-spy** (``--gil`` by default): each sample is the thread holding the GIL, so
  shares are shares of the Python CPU time of the process -- on a small machine the
  resource that caps one process's throughput. Time inside a C extension that
  keeps the GIL (psycopg2 building a query or parsing rows, the json accelerator)
  is charged to the Python frame that called it; the rules below name those frames.
* **pyinstrument**, in the event-loop thread and in every worker thread of the
  store's executor: wall-clock time, including waits on PostgreSQL and on the GIL,
  with C calls (``cursor.execute``) as frames of their own.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

Frame = tuple[str, str]  # (function, file)
Stack = tuple[list[Frame], float]  # root-first frames, weight

_PYSPY_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

_DRIVER_CALLS = r"^(cursor\.)?(execute|executemany|fetchall|fetchone|fetchmany)$"

# Self time: the innermost frame matching a rule decides the bucket.
# (bucket, function regex or None, file regex)
_SELF_RULES: list[tuple[str, str | None, str]] = [
    ("json encode/decode", None, r"(^|/)json/"),
    ("psycopg2 C calls (query out, rows in)", _DRIVER_CALLS, r"^<built-in>$"),
    (
        "psycopg2 C calls (query out, rows in)",
        r"^(do_execute|do_executemany|_fetchall_impl|fetchall|_fetchone_impl|fetchone)$",
        r"sqlalchemy/engine/(default|cursor)\.py",
    ),
    (
        # agents_sessions' hot path calls cursor.execute/fetchall itself.
        "psycopg2 C calls (query out, rows in)",
        r"^exec_driver_sql$",
        r"agents_sessions/hot_path\.py",
    ),
    ("psycopg2 (Python side: json typecaster, extras)", None, r"psycopg2/"),
    ("SQLAlchemy pool (checkout/checkin/reset)", None, r"sqlalchemy/pool/"),
    ("SQLAlchemy compile + cache key", None, r"sqlalchemy/sql/"),
    ("SQLAlchemy dialect glue", None, r"sqlalchemy/dialects/"),
    ("SQLAlchemy engine (execute, context, result)", None, r"sqlalchemy/engine/"),
    ("SQLAlchemy other (events, util)", None, r"sqlalchemy/"),
    ("agents_sessions: items (validate + encode)", None, r"agents_sessions/items\.py"),
    ("agents_sessions: other code", None, r"agents_sessions/"),
    (
        "thread hop (executor, futures, queue)",
        None,
        r"(concurrent/futures/|threading\.py|queue\.py)",
    ),
    ("asyncio event loop", None, r"asyncio/"),
    ("benchmark harness", None, r"(_workloads|_items|_backends|bench)\.py"),
    (
        "other stdlib (contextlib, selectors, uuid, ...)",
        None,
        r"(contextlib|selectors|weakref|abc|enum|typing|functools|uuid|reprlib)\.py",
    ),
]

# Inclusive time: a sample counts if any frame of its stack matches.
_INCLUSIVE_RULES: list[tuple[str, str, str]] = [
    ("event-loop thread (all of it)", r"^<module>$", r"bench\.py"),
    ("worker threads (all of it)", r"^_worker$", r"concurrent/futures/thread\.py"),
    ("Connection.execute (SQLAlchemy + driver)", r"^execute$", r"sqlalchemy/engine/base\.py"),
    (
        "statement compile / compiled-cache lookup",
        r"^_compile_w_cache$",
        r"sqlalchemy/sql/elements\.py",
    ),
    (
        "cursor.execute in the driver (via SQLAlchemy)",
        r"^(do_execute|do_executemany)$",
        r"sqlalchemy/engine/default\.py",
    ),
    (
        "hot path: DriverConnection.exec_driver_sql (execute + fetchall)",
        r"^exec_driver_sql$",
        r"agents_sessions/hot_path\.py",
    ),
    (
        "hot path: driver_connection (pool checkout/checkin)",
        r"^driver_connection$",
        r"agents_sessions/hot_path\.py",
    ),
    ("result fetch (rows, processors)", r".*", r"sqlalchemy/engine/(result|cursor)\.py"),
    ("pool checkout + checkin", r".*", r"sqlalchemy/pool/"),
    (
        "engine.connect / Connection close",
        r"^(connect|close|__exit__|__init__)$",
        r"sqlalchemy/engine/base\.py",
    ),
    ("json.loads (incl. psycopg2's json typecaster)", r"^(loads|decode|raw_decode)$", r"json/"),
    ("json.dumps", r"^(dumps|encode|iterencode)$", r"json/"),
    (
        "encode_items (validation + json.dumps + columns)",
        r"^encode_items$",
        r"agents_sessions/items\.py",
    ),
    (
        "_exactness_problem (item validation walk)",
        r"^_exactness_problem$",
        r"agents_sessions/items\.py",
    ),
    ("agents_sessions/store.py (incl. what it calls)", r".*", r"agents_sessions/store\.py"),
    ("translate_database_errors", r"^translate_database_errors$", r"agents_sessions/errors\.py"),
    ("agents_sessions/session.py (incl. what it calls)", r".*", r"agents_sessions/session\.py"),
    (
        "loop-side executor plumbing (run_in_executor, futures, wake-ups)",
        r"^(run_in_executor|wrap_future|_chain_future|_copy_future_state|_set_state|"
        r"_call_set_state|_call_check_cancel|call_soon_threadsafe|_write_to_self|"
        r"_read_from_self|_process_self_data)$",
        r"(asyncio/|concurrent/futures/)",
    ),
]


def _matches(rule: re.Pattern[str], function: str) -> bool:
    """Match ``Class.method`` (py-spy) and bare ``method`` (pyinstrument) alike."""
    return bool(rule.match(function) or rule.match(function.rsplit(".", 1)[-1]))


def _idle(frames: list[Frame]) -> bool:
    """A worker waiting for work, or the event loop waiting for events."""
    if not frames or frames[-1][1] != "<built-in>":
        return False
    callers = {function for function, _ in frames[-3:-1]}
    return bool(callers & {"_worker", "select", "EpollSelector.select", "get", "SimpleQueue.get"})


def summarize(stacks: Iterable[Stack]) -> dict[str, Any]:
    """Self-time buckets, inclusive shares and top leaf frames of weighted stacks."""
    self_rules = [
        (name, re.compile(function) if function else None, re.compile(file))
        for name, function, file in _SELF_RULES
    ]
    inclusive_rules = [
        (name, re.compile(function), re.compile(file)) for name, function, file in _INCLUSIVE_RULES
    ]
    # Weights are floats (seconds for pyinstrument): plain dicts, not Counters.
    self_time: dict[str, float] = defaultdict(float)
    inclusive: dict[str, float] = defaultdict(float)
    leaves: dict[str, float] = defaultdict(float)
    total = 0.0
    idle = 0.0
    for frames, weight in stacks:
        if _idle(frames):
            idle += weight
            continue
        total += weight
        if frames:
            function, file = frames[-1]
            leaves[f"{function} ({_short(file)})"] += weight
        bucket = "other"
        for function, file in reversed(frames):
            matched = next(
                (
                    name
                    for name, function_rule, file_rule in self_rules
                    if file_rule.search(file)
                    and (function_rule is None or _matches(function_rule, function))
                ),
                None,
            )
            if matched is not None:
                bucket = matched
                break
        self_time[bucket] += weight
        for name, function_rule, file_rule in inclusive_rules:
            if any(_matches(function_rule, f) and file_rule.search(p) for f, p in frames):
                inclusive[name] += weight
    if not total:
        return {"total": 0, "idle": idle, "self": [], "inclusive": [], "top_leaves": []}
    return {
        "total": total,
        "idle": idle,
        "self": [(name, value / total) for name, value in _most(self_time)],
        "inclusive": [(name, inclusive[name] / total) for name, _, _ in _INCLUSIVE_RULES],
        "top_leaves": [(name, value / total) for name, value in _most(leaves)[:20]],
    }


def _most(weights: dict[str, float]) -> list[tuple[str, float]]:
    return sorted(weights.items(), key=lambda item: item[1], reverse=True)


def _short(file: str) -> str:
    """A path from its package on (``sqlalchemy/engine/base.py``), as py-spy prints it."""
    for marker in ("site-packages/", "lib/python3.", "/agents_sessions/", "/benchmarks/"):
        if marker in file:
            tail = file.split(marker, 1)[1]
            if marker == "lib/python3.":
                tail = tail.split("/", 1)[1] if "/" in tail else tail
            if marker in ("/agents_sessions/", "/benchmarks/"):
                tail = marker.strip("/") + "/" + tail
            return tail
    return file


def read_pyspy(path: Path) -> list[Stack]:
    """Stacks of a ``py-spy record --format raw`` file (collapsed stacks)."""
    stacks: list[Stack] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text or not count_text.isdigit():
            continue
        frames: list[Frame] = []
        for text in stack_text.split(";"):
            match = _PYSPY_FRAME.match(text.strip())
            if match is not None:
                frames.append((match["function"], match["file"]))
        stacks.append((frames, float(count_text)))
    return stacks


def read_pyinstrument(frame_records: Iterable[tuple[list[str], float]]) -> list[Stack]:
    """Stacks of pyinstrument frame records (identifiers ``function\\0file\\0line``)."""
    stacks: list[Stack] = []
    for call_stack, seconds in frame_records:
        frames: list[Frame] = []
        for identifier in call_stack:
            parts = identifier.split("\x01", 1)[0].split("\x00")
            if len(parts) >= 2 and parts[1] != "<thread>":
                frames.append((parts[0], parts[1]))
        stacks.append((frames, seconds))
    return stacks


def render_summary(
    title: str, summary: dict[str, Any], *, unit: str, notes: list[str] | None = None
) -> str:
    """One profile summary as markdown."""
    lines = [f"## {title}", ""]
    lines += notes or []
    lines += [
        "",
        f"### Self time by layer (share of {unit})",
        "",
        "| layer | share |",
        "|---|---|",
    ]
    lines += [f"| {name} | {share:.1%} |" for name, share in summary["self"]]
    lines += [
        "",
        "### Inclusive (share with the frame anywhere on the stack)",
        "",
        "| frame | share |",
        "|---|---|",
    ]
    lines += [f"| {name} | {share:.1%} |" for name, share in summary["inclusive"]]
    lines += ["", "### Top leaf frames", "", "| frame | share |", "|---|---|"]
    lines += [f"| `{name}` | {share:.1%} |" for name, share in summary["top_leaves"]]
    lines.append("")
    return "\n".join(lines)
