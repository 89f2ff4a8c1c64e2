"""Tables, ratios and targets from a benchmark results document (markdown)."""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable
from typing import Any

from benchmarks._backends import LABELS

OURS = "agents_sessions"
#: agents_sessions on a SQLite file, compared with the SDK's SQLiteSession ("sqlite").
EMBEDDED = "agents_sessions_sqlite"

LATENCY_ROWS = (
    ("add_items_2", "add_items (2 items)"),
    ("get_items_limit_20", "get_items(limit=20), 200-item history"),
    ("get_items_all_200", "get_items() (all 200 items)"),
    ("pop_item", "pop_item"),
)


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _fmt(value: Any, digits: int = 2) -> str:
    number = _number(value)
    if number is None:
        return "—"
    if abs(number) >= 100:
        return f"{number:,.0f}"
    return f"{number:.{digits}f}"


def _ratio(ours: Any, other: Any) -> float | None:
    a, b = _number(ours), _number(other)
    if a is None or b is None or b == 0:
        return None
    return a / b


def _fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _get(results: dict[str, Any], backend: str, *path: str) -> Any:
    node: Any = results.get(backend, {})
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _client_cpu_per_turn_us(results: dict[str, Any], backend: str) -> float | None:
    """CPU time the benchmark process spent per turn of the 1-process throughput run."""
    cores = _number(_get(results, backend, "throughput", "process_cpu_cores"))
    turns = _number(_get(results, backend, "throughput", "turns_per_s"))
    return cores / turns * 1e6 if cores is not None and turns else None


def _rest_cpu_per_turn_us(results: dict[str, Any], backend: str, cores: Any) -> float | None:
    """CPU time the rest of the machine spent per turn: the database server, mostly
    (client and server share the machine's cores, so a turn costs the sum)."""
    busy = _number(_get(results, backend, "throughput", "machine_cpu_busy"))
    client = _number(_get(results, backend, "throughput", "process_cpu_cores"))
    turns = _number(_get(results, backend, "throughput", "turns_per_s"))
    if busy is None or client is None or not turns or _number(cores) is None:
        return None
    return (busy * float(cores) - client) / turns * 1e6


def _pick(results: dict[str, Any], *path: str) -> Callable[[str], Any]:
    """A function of the backend name giving ``results[backend][path...]``."""

    def pick(backend: str) -> Any:
        return _get(results, backend, *path)

    return pick


def render_report(document: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The markdown report, and the derived ratios and targets (for the JSON)."""
    results: dict[str, Any] = document["results"]
    backends: list[str] = [name for name in document["options"]["backends"] if name in results]
    others = [name for name in backends if name != OURS]
    has_ours = OURS in backends
    params = document["parameters"]
    out: list[str] = []
    ratios: dict[str, Any] = {}
    machine = document["machine"]
    out.append(f"# Benchmark {document['timestamp']}" + (" (--quick)" if document["quick"] else ""))
    out.append(
        f"{machine.get('cpu')}, {machine.get('cores')} cores, {machine.get('memory_gb')} GB; "
        f"PostgreSQL {machine.get('postgresql')}; Redis {machine.get('redis', '—')}; "
        f"Python {machine.get('python')}. Load average at start: "
        + ", ".join(f"{value:.2f}" for value in machine.get("load_average_at_start", ()))
        + f". Code: {machine.get('git', '?')}. Pool: {document['options']['pool']}. "
        f"Latency, throughput and scale: best of {document['options'].get('rounds', 1)} "
        "interleaved round(s) per backend (all rounds in the JSON). "
        f"Took {document['elapsed_s']:.0f} s."
    )
    header = ["", *(LABELS[name] for name in backends)]
    selected = set(document["options"].get("workloads", ()))
    depths: list[int] = []

    def ran(*workloads: str) -> bool:
        return any(workload in selected for workload in workloads)

    def ratio_rows(
        rows: list[tuple[str, Callable[[str], Any]]], key: str
    ) -> tuple[list[list[str]], dict[str, Any]]:
        table_rows: list[list[str]] = []
        derived: dict[str, Any] = {}
        for label, pick in rows:
            ours = pick(OURS)
            values = {name: _ratio(ours, pick(name)) for name in others}
            derived[label] = values
            table_rows.append([label, *(_fmt_ratio(values[name]) for name in others)])
        ratios[key] = derived
        return table_rows, derived

    # 1. latency -------------------------------------------------------------------
    if ran("latency"):
        latency = params.get("latency", {})
        out.append(
            f"\n## 1. Sequential latency per call (ms, p50 / p95; lower is better)\n\n"
            f"{latency.get('iterations')} timed calls after {latency.get('warmup')} warm-up calls, "
            "one at a time."
        )
        rows = []
        for key, label in LATENCY_ROWS:
            rows.append(
                [
                    label,
                    *(
                        f"{_fmt(_get(results, name, 'latency', key, 'p50_ms'))} / "
                        f"{_fmt(_get(results, name, 'latency', key, 'p95_ms'))}"
                        for name in backends
                    ),
                ]
            )
        out.append("\n" + _table(header, rows))
        if has_ours and others:
            table_rows, _ = ratio_rows(
                [(label, _pick(results, "latency", key, "p50_ms")) for key, label in LATENCY_ROWS],
                "latency_p50",
            )
            out.append(
                "\nagents_sessions ÷ other, p50 time (**lower is better**; < 1x: ours is faster):"
                "\n\n" + _table(["", *(LABELS[name] for name in others)], table_rows)
            )

    # 2 + 3. throughput --------------------------------------------------------------
    if ran("throughput", "throughput_3p"):
        tp = params.get("throughput", {})
        out.append(
            "\n## 2-3. Throughput (turns/s; higher is better)\n\n"
            f"{tp.get('conversations')} concurrent conversations per process (asyncio tasks), each "
            "turn = get_items(limit=20) + add_items(2 items); "
            f"{tp.get('duration_s'):g} s measured after {tp.get('warmup_s'):g} s warm-up. "
            f"3 processes: started together, barrier-synchronised, "
            f"{document['options']['pool_3_processes']}."
        )
        rows = [
            [
                "1 process: turns/s",
                *(_fmt(_get(results, n, "throughput", "turns_per_s")) for n in backends),
            ],
            [
                "1 process: turn p50 / p95 ms",
                *(
                    f"{_fmt(_get(results, n, 'throughput', 'turn_latency', 'p50_ms'))} / "
                    f"{_fmt(_get(results, n, 'throughput', 'turn_latency', 'p95_ms'))}"
                    for n in backends
                ),
            ],
            [
                "1 process: errors",
                *(_fmt(_get(results, n, "throughput", "errors"), 0) for n in backends),
            ],
            [
                "1 process: client CPU (cores)",
                *(_fmt(_get(results, n, "throughput", "process_cpu_cores")) for n in backends),
            ],
            [
                "1 process: client CPU per turn (µs)",
                *(_fmt(_client_cpu_per_turn_us(results, n), 0) for n in backends),
            ],
            [
                "1 process: rest of the machine per turn (µs; the server, mostly)",
                *(
                    _fmt(_rest_cpu_per_turn_us(results, n, machine.get("cores")), 0)
                    for n in backends
                ),
            ],
            [
                "1 process: max PG/Redis connections",
                *(_fmt(_get(results, n, "throughput", "max_connections"), 0) for n in backends),
            ],
            [
                "3 processes: turns/s (sum)",
                *(_fmt(_get(results, n, "throughput_3p", "turns_per_s")) for n in backends),
            ],
            [
                "3 processes: errors",
                *(_fmt(_get(results, n, "throughput_3p", "errors"), 0) for n in backends),
            ],
        ]
        out.append("\n" + _table(header, rows))
        if has_ours and others:
            table_rows, _ = ratio_rows(
                [
                    ("1 process", lambda n: _get(results, n, "throughput", "turns_per_s")),
                    ("3 processes", lambda n: _get(results, n, "throughput_3p", "turns_per_s")),
                ],
                "throughput",
            )
            out.append(
                "\nagents_sessions ÷ other, turns/s (**higher is better**; > 1x: ours is faster):"
                "\n\n" + _table(["", *(LABELS[name] for name in others)], table_rows)
            )

    # 4. depth ---------------------------------------------------------------------------
    if ran("depth"):
        depth_params = params.get("depth", {})
        depths = list(depth_params.get("depths", []))
        out.append(
            "\n## 4. History depth: get_items(limit=20) p50 ms (lower is better)\n\n"
            f"{depth_params.get('iterations')} calls per depth; filled with add_items in "
            f"batches of {depth_params.get('batch')}, the newest {depth_params.get('tail')} "
            "items as 2-item turns; ANALYZE after each fill (PostgreSQL backends)."
        )
        rows = []
        skipped: list[str] = []
        for depth in depths:
            cells = []
            for name in backends:
                node = _get(results, name, "depth", str(depth)) or {}
                if "skipped" in node:
                    cells.append("not measured")
                    skipped.append(f"{LABELS[name]} at {depth:,}: {node['skipped']}")
                else:
                    cells.append(_fmt(node.get("p50_ms")))
            rows.append([f"{depth:,} items", *cells])
        if depths:
            rows.append(
                [
                    f"{depths[-1]:,} ÷ {depths[0]:,}",
                    *(
                        _fmt_ratio(
                            _ratio(
                                _get(results, n, "depth", str(depths[-1]), "p50_ms"),
                                _get(results, n, "depth", str(depths[0]), "p50_ms"),
                            )
                        )
                        for n in backends
                    ),
                ]
            )
            rows.append(
                [
                    "fill rate (items/s, largest)",
                    *(
                        _fmt(_get(results, n, "depth", str(depths[-1]), "fill_items_per_s"), 0)
                        for n in backends
                    ),
                ]
            )
        out.append("\n" + _table(header, rows))
        for note in skipped:
            out.append(f"\n- {note}")
        if has_ours and others and depths:
            table_rows, _ = ratio_rows(
                [
                    (f"{depth:,} items", _pick(results, "depth", str(depth), "p50_ms"))
                    for depth in depths
                ],
                "depth_p50",
            )
            out.append(
                "\nagents_sessions ÷ other, p50 time (**lower is better**):\n\n"
                + _table(["", *(LABELS[name] for name in others)], table_rows)
            )

    # 5. scale ---------------------------------------------------------------------------
    if ran("scale"):
        scale = params.get("scale", {})
        out.append(
            f"\n## 5. Scale: {scale.get('conversations'):,} concurrent conversations, "
            "one process\n\n"
            f"{document['options']['pool']}; {scale.get('duration_s'):g} s measured after "
            f"{scale.get('warmup_s'):g} s. Server-side connections sampled every 100 ms from a "
            "separate monitoring connection (PostgreSQL: pg_stat_activity client backends on the "
            "benchmark database; Redis: clients on the benchmark db)."
        )
        rows = [
            ["turns/s", *(_fmt(_get(results, n, "scale", "turns_per_s")) for n in backends)],
            [
                "errors (all, incl. seeding)",
                *(_fmt(_get(results, n, "scale", "errors"), 0) for n in backends),
            ],
            [
                "turn p50 / p95 / max ms",
                *(
                    f"{_fmt(_get(results, n, 'scale', 'turn_latency', 'p50_ms'))} / "
                    f"{_fmt(_get(results, n, 'scale', 'turn_latency', 'p95_ms'))} / "
                    f"{_fmt(_get(results, n, 'scale', 'turn_latency', 'max_ms'))}"
                    for n in backends
                ),
            ],
            [
                "max server connections",
                *(_fmt(_get(results, n, "scale", "max_connections"), 0) for n in backends),
            ],
            [
                "threads in process",
                *(_fmt(_get(results, n, "scale", "threads"), 0) for n in backends),
            ],
        ]
        out.append("\n" + _table(header, rows))
        samples = {n: _get(results, n, "scale", "error_samples") for n in backends}
        for name, errors in samples.items():
            if errors:
                out.append(f"\n- {LABELS[name]} errors, e.g.: `{errors[0]}`")

    # 6. memory --------------------------------------------------------------------------
    if ran("throughput", "memory"):
        memory = params.get("memory", {})
        out.append(
            "\n## 6. Memory (lower is better)\n\n"
            "Peak RSS: ru_maxrss of the 1-process throughput child (every child imports the "
            "Agents SDK first, like any agent app). Idle session: tracemalloc over "
            f"{memory.get('objects'):,} session objects constructed (ids preallocated), divided."
        )
        rows = [
            [
                "peak RSS, throughput run (MB)",
                *(
                    _fmt(
                        (_number(_get(results, n, "throughput", "peak_rss_kb")) or math.nan) / 1024,
                        1,
                    )
                    for n in backends
                ),
            ],
            [
                "RSS after imports + seeding (MB)",
                *(
                    _fmt(
                        (_number(_get(results, n, "throughput", "baseline_rss_kb")) or math.nan)
                        / 1024,
                        1,
                    )
                    for n in backends
                ),
            ],
            [
                "idle session object (bytes)",
                *(_fmt(_get(results, n, "memory", "bytes_per_session"), 0) for n in backends),
            ],
        ]
        out.append("\n" + _table(header, rows))
        if has_ours and others:
            table_rows, _ = ratio_rows(
                [
                    ("peak RSS", lambda n: _get(results, n, "throughput", "peak_rss_kb")),
                    (
                        "idle session object",
                        lambda n: _get(results, n, "memory", "bytes_per_session"),
                    ),
                ],
                "memory",
            )
            out.append(
                "\nagents_sessions ÷ other (**lower is better**):\n\n"
                + _table(["", *(LABELS[name] for name in others)], table_rows)
            )

    # embedded default -------------------------------------------------------------------
    if EMBEDDED in backends and "sqlite" in backends:
        rows = []
        derived_embedded: dict[str, float | None] = {}
        for label, ours, sdk, faster in _embedded_pairs(results):
            speedup = _ratio(sdk, ours) if faster == "time" else _ratio(ours, sdk)
            derived_embedded[label] = speedup
            rows.append([label, _fmt(ours), _fmt(sdk), _fmt_ratio(speedup)])
        ratios["embedded"] = derived_embedded
        out.append(
            "\n## 7. The embedded default: agents_sessions on a SQLite file vs the SDK's "
            "SQLiteSession on a file\n\n"
            "Both on a file of their own in the same temporary directory; 3 processes share "
            "one file per backend. Speed-up: the SDK's time ÷ ours (latency p50), ours ÷ the "
            "SDK's (turns/s): **higher is better**, target ≥ 1.2x."
        )
        out.append(
            "\n"
            + _table(
                ["", LABELS[EMBEDDED], LABELS["sqlite"], "speed-up"],
                rows,
            )
        )

    # failures ---------------------------------------------------------------------------
    for name in backends:
        for workload, message in (_get(results, name, "failures") or {}).items():
            out.append(f"\n**{LABELS[name]} / {workload} failed:**\n```\n{message}\n```")

    # targets ----------------------------------------------------------------------------
    targets = _targets(results, depths)
    out.append("\n## Targets\n")
    out.append(
        _table(
            ["target", "measured", "result"],
            [[t["target"], t["measured"], t["result"]] for t in targets],
        )
    )
    out.append("")
    return "\n".join(out), {"ratios": ratios, "targets": targets}


def _embedded_pairs(results: dict[str, Any]) -> list[tuple[str, Any, Any, str]]:
    """(label, ours, the SDK's, "time" or "rate") for the embedded default's comparison."""
    pairs: list[tuple[str, Any, Any, str]] = [
        (
            f"{label} p50 ms",
            _get(results, EMBEDDED, "latency", key, "p50_ms"),
            _get(results, "sqlite", "latency", key, "p50_ms"),
            "time",
        )
        for key, label in LATENCY_ROWS
    ]
    for workload, label in (("throughput", "1 process"), ("throughput_3p", "3 processes")):
        pairs.append(
            (
                f"{label}: turns/s",
                _get(results, EMBEDDED, workload, "turns_per_s"),
                _get(results, "sqlite", workload, "turns_per_s"),
                "rate",
            )
        )
    return pairs


def _targets(results: dict[str, Any], depths: list[int]) -> list[dict[str, Any]]:
    targets: list[dict[str, Any]] = []

    def check(label: str, value: float | None, passes: Callable[[float], bool], unit: str) -> None:
        if value is None:
            targets.append({"target": label, "measured": "n/a (not run)", "result": "n/a"})
            return
        targets.append(
            {
                "target": label,
                "value": value,
                "measured": f"{value:.2f}{unit}",
                "result": "PASS" if passes(value) else "FAIL",
            }
        )

    def tps(name: str) -> Any:
        return _get(results, name, "throughput", "turns_per_s")

    check(
        "throughput ≥ 3x SDK SQLAlchemySession",
        _ratio(tps(OURS), tps("sqlalchemy")),
        lambda v: v >= 3.0,
        "x",
    )
    check(
        "throughput ≥ 1.0x asyncpg floor",
        _ratio(tps(OURS), tps("floor")),
        lambda v: v >= 1.0,
        "x",
    )
    check(
        "throughput ≥ 0.8x psycopg2-async floor",
        _ratio(tps(OURS), tps("floor_psycopg2")),
        lambda v: v >= 0.8,
        "x",
    )
    check(
        "throughput ≥ 1.0x SDK RedisSession",
        _ratio(tps(OURS), tps("redis")),
        lambda v: v >= 1.0,
        "x",
    )
    for key, label, bound in (
        ("add_items_2", "add_items", 1.2),
        ("get_items_limit_20", "get_items(limit=20)", 1.1),
        ("pop_item", "pop_item", 1.2),
    ):
        check(
            f"{label} p50 ≤ {bound}x psycopg2-async floor",
            _ratio(
                _get(results, OURS, "latency", key, "p50_ms"),
                _get(results, "floor_psycopg2", "latency", key, "p50_ms"),
            ),
            functools.partial(operator.ge, bound),
            "x",
        )
    if depths:
        check(
            f"get_items(limit=20) at {depths[-1]:,} items ≤ 1.2x at {depths[0]:,}",
            _ratio(
                _get(results, OURS, "depth", str(depths[-1]), "p50_ms"),
                _get(results, OURS, "depth", str(depths[0]), "p50_ms"),
            ),
            lambda v: v <= 1.2,
            "x",
        )
    for label, ours, sdk, faster in _embedded_pairs(results):
        check(
            f"on SQLite, {label.replace(' ms', '')} ≥ 1.2x SDK SQLiteSession",
            _ratio(sdk, ours) if faster == "time" else _ratio(ours, sdk),
            lambda v: v >= 1.2,
            "x",
        )
    scale = _get(results, OURS, "scale")
    if isinstance(scale, dict):
        errors = scale.get("errors")
        connections = scale.get("max_connections")
        ok = errors == 0 and connections is not None and connections <= 30
        targets.append(
            {
                "target": "1,000 conversations: 0 errors, ≤ 30 server connections",
                "measured": f"{errors} errors, max {connections} connections",
                "result": "PASS" if ok else "FAIL",
            }
        )
    else:
        targets.append(
            {
                "target": "1,000 conversations: 0 errors, ≤ 30 server connections",
                "measured": "n/a (not run)",
                "result": "n/a",
            }
        )
    return targets
