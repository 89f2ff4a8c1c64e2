"""What this machine can run: the servers and programs parts of the suite need, found once a run.

Each optional part of the suite -- the shared PostgreSQL server, throwaway servers, TLS,
replicas, PgBouncer, and whatever other suites register (Citus, a browser...) -- is a
:class:`Prerequisite`: a *probe* that finds it and returns what it found (a URL, a path),
or raises :class:`Unavailable` saying why not and how to get it.

A fixture calls :meth:`Prerequisite.require`. The first call runs the probe (once per test
run; the result is kept); when the prerequisite is missing the test is

* **failed** when the run demands everything (``CI`` or ``AGENTS_SESSIONS_REQUIRE_POSTGRES``
  set: CI can never pass on skips), otherwise
* **skipped**, with a reason that starts ``"<name> unavailable:"`` and ends with what would
  run it.

At the end of the run :func:`summary_line` (printed by ``pytest_terminal_summary`` in
tests/conftest.py) says in one line what ran and what was skipped, why, and how many tests.

Registering another suite (its conftest.py or fixture module; ``register`` at import time)::

    from tests.support import prerequisites

    def _find_citus() -> str:
        if shutil.which("citus_dev") is None:  # whatever tells that it is there
            raise prerequisites.Unavailable(
                "no Citus extension in the PostgreSQL server binaries",
                how="apt-get install postgresql-16-citus-12.1",
            )
        return "Citus 12.1"  # what was found, shown in the summary line

    CITUS = prerequisites.register("Citus", _find_citus)

    @pytest.fixture(scope="session")
    def citus_cluster() -> Iterator[Cluster]:
        CITUS.require()  # skips (or fails in CI) with the probe's reason
        ...

That is all a suite needs: the summary line then reports it beside the others.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import pytest

T = TypeVar("T")

_TRUTHY = {"1", "true", "yes", "on"}


def everything_required() -> bool:
    """Whether a missing prerequisite fails the run.

    ``CI`` or ``AGENTS_SESSIONS_REQUIRE_POSTGRES`` set: CI can never pass on skips.
    """
    return any(
        os.environ.get(name, "").strip().lower() in _TRUTHY
        for name in ("CI", "AGENTS_SESSIONS_REQUIRE_POSTGRES")
    )


class Unavailable(Exception):
    """A probe's answer: the prerequisite is not on this machine.

    Args:
        reason: Why not (what was tried and what each attempt answered).
        how: What would make it available, ideally the exact command to run.
    """

    def __init__(self, reason: str, *, how: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.how = how


@dataclass
class _Outcome(Generic[T]):
    value: T | None = None
    found: str = ""
    missing: Unavailable | None = None


class Prerequisite(Generic[T]):
    """One thing part of the suite needs; see the module docstring."""

    def __init__(
        self, name: str, probe: Callable[[], T], describe: Callable[[T], str] = str
    ) -> None:
        self.name = name
        self._probe = probe
        self._describe = describe
        self._outcome: _Outcome[T] | None = None

    @property
    def skip_prefix(self) -> str:
        """How the reason of every test skipped for want of this prerequisite starts."""
        return f"{self.name} unavailable:"

    def probe(self) -> _Outcome[T]:
        """Run the probe once per test run; later calls return the first answer."""
        if self._outcome is None:
            try:
                value = self._probe()
            except Unavailable as missing:
                self._outcome = _Outcome(missing=missing)
            else:
                self._outcome = _Outcome(value=value, found=self._describe(value))
        return self._outcome

    @property
    def probed(self) -> bool:
        return self._outcome is not None

    def require(self) -> T:
        """What the probe found; otherwise skip the calling test (fail it in CI)."""
        outcome = self.probe()
        if outcome.missing is None:
            return outcome.value  # type: ignore[return-value]  # None only when missing
        missing = outcome.missing
        if everything_required():
            pytest.fail(
                f"{self.name} is required (CI / AGENTS_SESSIONS_REQUIRE_POSTGRES is set) but "
                f"unavailable: {missing.reason}",
                pytrace=False,
            )
        how = f" -- to run these tests: {missing.how}" if missing.how else ""
        pytest.skip(f"{self.skip_prefix} {missing.reason}{how}")


_registry: dict[str, Prerequisite[object]] = {}


def register(
    name: str, probe: Callable[[], T], describe: Callable[[T], str] = str
) -> Prerequisite[T]:
    """Add a prerequisite (once, at import time) and return it for fixtures to ``require()``.

    ``describe`` turns what the probe found into the few words the summary line shows.
    """
    if name in _registry:
        raise ValueError(f"prerequisite {name!r} is registered twice")
    prerequisite = Prerequisite(name, probe, describe)
    _registry[name] = prerequisite  # type: ignore[assignment]  # invariant generic, read-only use
    return prerequisite


def registered() -> list[Prerequisite[object]]:
    return list(_registry.values())


def summary_line(skip_reasons: list[str], among: Iterable[Prerequisite[Any]] | None = None) -> str:
    """One line: which prerequisites this run used, which it skipped tests for, and why.

    ``skip_reasons`` are the reasons of every skipped test of the run; ``among`` the
    prerequisites to report (default: every registered one the run needed).
    """
    ran: list[str] = []
    skipped: list[str] = []
    counted = 0
    for prerequisite in registered() if among is None else among:
        if not prerequisite.probed:
            continue
        outcome = prerequisite.probe()
        if outcome.missing is None:
            ran.append(f"{prerequisite.name} ({outcome.found})")
            continue
        count = sum(reason.startswith(prerequisite.skip_prefix) for reason in skip_reasons)
        counted += count
        how = f"; run them with: {outcome.missing.how}" if outcome.missing.how else ""
        skipped.append(
            f"{count} test(s) needing {prerequisite.name} ({outcome.missing.reason}{how})"
        )
    others = len(skip_reasons) - counted
    if others:
        skipped.append(f"{others} other(s) (their reasons are listed above)")
    return (
        "agents_sessions prerequisites: "
        + (f"used {', '.join(ran)}" if ran else "none needed")
        + "; skipped: "
        + ("; ".join(skipped) or "nothing")
    )
