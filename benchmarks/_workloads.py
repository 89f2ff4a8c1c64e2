"""The workloads, as run inside one benchmark child process on one backend.

Each ``run_*`` coroutine takes an open :class:`~_backends.Backend` and its
parameters and returns a JSON-able dict of measurements. Timing uses
``time.perf_counter``; percentiles are nearest-rank on the sorted samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import resource
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

from benchmarks._backends import Backend, BenchSession
from tests.support.items import ItemFactory


def percentile(samples: list[float], fraction: float) -> float:
    """Nearest-rank percentile of ``samples`` (``fraction`` in [0, 1])."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]


def summarize_ms(samples_s: list[float]) -> dict[str, float]:
    """p50/p95/p99/mean/max of durations given in seconds, in milliseconds."""
    if not samples_s:
        return {"n": 0}
    ms = [sample * 1000 for sample in samples_s]
    return {
        "n": len(ms),
        "p50_ms": percentile(ms, 0.50),
        "p95_ms": percentile(ms, 0.95),
        "p99_ms": percentile(ms, 0.99),
        "mean_ms": sum(ms) / len(ms),
        "max_ms": max(ms),
    }


def current_rss_kb() -> int:
    """Resident set size of this process now, in KiB (Linux ``/proc``)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def peak_rss_kb() -> int:
    """Peak resident set size of this process so far, in KiB (``ru_maxrss``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def machine_cpu_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine since boot (``/proc/stat``)."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])
    return total - idle, total


async def _timed(calls: int, call: Callable[[], Awaitable[Any]]) -> list[float]:
    durations: list[float] = []
    for _ in range(calls):
        started = time.perf_counter()
        await call()
        durations.append(time.perf_counter() - started)
    return durations


# --------------------------------------------------------------------------- prepare


async def run_prepare(backend: Backend, _params: dict[str, Any]) -> dict[str, Any]:
    """First use of a fresh database: schema creation/migration, one round trip each."""
    items = ItemFactory()
    session = backend.session("prepare")
    started = time.perf_counter()
    await session.add_items(items.turn())
    first_call = time.perf_counter() - started
    await session.get_items(limit=20)
    while await session.pop_item() is not None:
        pass
    return {"first_call_ms": first_call * 1000}


# --------------------------------------------------------------------------- latency


async def run_latency(backend: Backend, params: dict[str, Any]) -> dict[str, Any]:
    """Sequential per-call latency: add 2 items, get 20 / all of 200, pop."""
    iterations: int = params["iterations"]
    warmup: int = params["warmup"]
    history: int = params["history"]
    items = ItemFactory(id_prefix="1")
    result: dict[str, Any] = {}
    tag = os.getpid()  # fresh conversations in every round

    adder = backend.session(f"latency-add-{tag}")

    async def add() -> None:
        await adder.add_items(items.turn())

    await _timed(warmup, add)
    result["add_items_2"] = summarize_ms(await _timed(iterations, add))

    reader = backend.session(f"latency-get-{tag}")
    for _ in range(history // 2):
        await reader.add_items(items.turn())

    async def get_latest() -> None:
        got = await reader.get_items(limit=20)
        assert len(got) == 20, len(got)

    async def get_all() -> None:
        got = await reader.get_items()
        assert len(got) == history, len(got)

    await _timed(warmup, get_latest)
    result["get_items_limit_20"] = summarize_ms(await _timed(iterations, get_latest))
    await _timed(warmup, get_all)
    result["get_items_all_200"] = summarize_ms(await _timed(iterations, get_all))

    popper = backend.session(f"latency-pop-{tag}")
    to_pop = warmup + iterations
    filled = 0
    while filled < to_pop:
        batch = min(100, to_pop - filled)
        await popper.add_items(items.history(batch))
        filled += batch

    async def pop() -> None:
        assert await popper.pop_item() is not None

    await _timed(warmup, pop)
    result["pop_item"] = summarize_ms(await _timed(iterations, pop))
    return result


# --------------------------------------------------------------------------- throughput


StartSignal = Callable[[], Awaitable[float]]


async def run_throughput(
    backend: Backend,
    params: dict[str, Any],
    start_signal: StartSignal,
    on_window: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``conversations`` tasks doing turns (get 20, add 2) for a fixed window.

    Sessions are created and seeded with ``seed_items`` each, then
    ``start_signal()`` returns the wall-clock start (a barrier across processes
    when several run at once). Turns completed within ``[start + warmup, start +
    warmup + duration]`` count. ``on_window("start"|"end")`` is called at the
    window's edges (used to start and stop profilers).
    """
    conversations: int = params["conversations"]
    warmup: float = params["warmup_s"]
    duration: float = params["duration_s"]
    seed_items: int = params["seed_items"]
    prefix = f"{params.get('prefix', 'turns')}-{os.getpid()}"
    items = ItemFactory(id_prefix=f"{os.getpid():x}")

    sessions = [backend.session(f"{prefix}-{index}") for index in range(conversations)]
    errors: list[str] = []
    seed_semaphore = asyncio.Semaphore(100)

    async def seed(session: BenchSession) -> None:
        async with seed_semaphore:
            try:
                await session.add_items(items.history(seed_items))
            except Exception as exc:
                errors.append(f"seed: {type(exc).__name__}: {str(exc)[:200]}")

    await asyncio.gather(*(seed(session) for session in sessions))
    seed_errors = len(errors)
    baseline_rss = current_rss_kb()

    start_wall = await start_signal()
    # Map the shared wall-clock start onto this process's monotonic clock.
    start = time.perf_counter() + (start_wall - time.time())
    window_start = start + warmup
    window_end = window_start + duration
    latencies: list[float] = []
    counters = {"turns": 0, "errors_in_window": 0, "turns_total": 0}

    async def converse(session: BenchSession) -> None:
        while True:
            now = time.perf_counter()
            if now >= window_end:
                return
            started = now
            try:
                await session.get_items(limit=20)
                await session.add_items(items.turn())
            except Exception as exc:
                finished = time.perf_counter()
                if len(errors) < 1000:
                    errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                if window_start <= finished <= window_end:
                    counters["errors_in_window"] += 1
                continue
            finished = time.perf_counter()
            counters["turns_total"] += 1
            if window_start <= finished <= window_end:
                counters["turns"] += 1
                latencies.append(finished - started)

    usage: dict[str, float] = {}

    async def window_edges() -> None:
        await asyncio.sleep(max(0.0, window_start - time.perf_counter()))
        usage["cpu_start"] = time.process_time()
        usage["machine_start_busy"], usage["machine_start_total"] = machine_cpu_ticks()
        if on_window is not None:
            on_window("start")
        await asyncio.sleep(max(0.0, window_end - time.perf_counter()))
        usage["cpu_end"] = time.process_time()
        usage["machine_end_busy"], usage["machine_end_total"] = machine_cpu_ticks()
        if on_window is not None:
            on_window("end")

    delay = start - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    edges = asyncio.ensure_future(window_edges())
    await asyncio.gather(*(converse(session) for session in sessions))
    await edges
    unique_errors = sorted(set(errors))
    machine_total = usage["machine_end_total"] - usage["machine_start_total"]
    return {
        "conversations": conversations,
        "duration_s": duration,
        "turns": counters["turns"],
        "turns_per_s": counters["turns"] / duration,
        "turn_latency": summarize_ms(latencies),
        "errors": len(errors),
        "seed_errors": seed_errors,
        "errors_in_window": counters["errors_in_window"],
        "error_samples": unique_errors[:5],
        "baseline_rss_kb": baseline_rss,
        "peak_rss_kb": peak_rss_kb(),
        "threads": len(os.listdir("/proc/self/task")),
        # CPU this process used during the window, in cores (1.0 = one core busy).
        "process_cpu_cores": (usage["cpu_end"] - usage["cpu_start"]) / duration,
        # Share of all the machine's CPU busy during the window (PostgreSQL, Redis,
        # this process and anything else running: a noise indicator).
        "machine_cpu_busy": (
            (usage["machine_end_busy"] - usage["machine_start_busy"]) / machine_total
            if machine_total
            else None
        ),
    }


# --------------------------------------------------------------------------- depth


async def run_depth(
    backend: Backend,
    params: dict[str, Any],
    analyze: Callable[[], None] | None,
) -> dict[str, Any]:
    """get_items(limit=20) on conversations of increasing length.

    Each conversation is filled with ``add_items`` in batches of ``batch`` items,
    except its last ``tail`` items, which arrive as ordinary 2-item turns (so each
    backend's newest rows look as they do in production: one transaction per turn).
    A fill that would exceed ``fill_budget_s`` is abandoned and reported.
    """
    depths: list[int] = params["depths"]
    iterations: int = params["iterations"]
    batch: int = params["batch"]
    budget: float = params["fill_budget_s"]
    tail_items: int = params["tail"]
    items = ItemFactory(id_prefix="d")
    results: dict[str, Any] = {}
    for depth in depths:
        session = backend.session(f"depth-{depth}")
        tail = min(depth, tail_items)
        bulk = depth - tail
        started = time.perf_counter()
        filled = 0
        abandoned = None
        while filled < bulk:
            count = min(batch, bulk - filled)
            await session.add_items(items.history(count))
            filled += count
            elapsed = time.perf_counter() - started
            projected = elapsed / filled * bulk
            if projected > budget and filled < bulk:
                abandoned = (
                    f"filling {depth:,} items would take ~{projected:.0f} s "
                    f"(budget {budget:.0f} s; {filled / elapsed:,.0f} items/s); not measured"
                )
                break
        fill_s = time.perf_counter() - started
        if abandoned is not None:
            results[str(depth)] = {"skipped": abandoned, "fill_s": fill_s, "filled": filled}
            continue
        for _ in range(tail // 2):
            await session.add_items(items.turn())
        if analyze is not None:
            analyze()  # fresh planner statistics, as autovacuum would give them

        async def get_latest(session: BenchSession = session) -> None:
            got = await session.get_items(limit=20)
            assert len(got) == 20, len(got)

        await _timed(10, get_latest)
        results[str(depth)] = {
            **summarize_ms(await _timed(iterations, get_latest)),
            "fill_s": fill_s,
            "fill_items_per_s": bulk / fill_s if fill_s > 0 else None,
        }
    return results


# --------------------------------------------------------------------------- memory


async def run_memory(backend: Backend, params: dict[str, Any]) -> dict[str, Any]:
    """Bytes per idle session object: ``objects`` constructed under tracemalloc."""
    objects: int = params["objects"]
    warm = backend.session("memory-warm")
    await warm.get_items(limit=1)  # shared state (engine, pool, caches) exists first
    names = [f"memory-{index}" for index in range(objects)]
    holder: list[BenchSession] = []
    holder.append(backend.session("memory-warm-2"))  # lazily created per-class state
    holder.clear()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        started = time.perf_counter()
        holder = [backend.session(name) for name in names]
        elapsed = time.perf_counter() - started
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    result = {
        "objects": objects,
        "bytes_per_session": (after - before) / objects,
        "construct_us_per_session_traced": elapsed / objects * 1e6,
    }
    del holder
    with contextlib.suppress(Exception):
        gc.collect()
    return result
