"""`make test-matrix`: the core behaviour suite on every Python and dependency floor we declare.

Legs (each in its own virtualenv under ``.matrix/``, gitignored, made by ``uv``):

* ``lowest`` -- the lowest version ``pyproject.toml`` allows of every direct dependency
  (``uv pip install --resolution lowest-direct``), on the oldest Python we support;
* ``py3.10``, ``py3.12``, ``py3.13`` -- the newest versions our ranges allow, on each Python
  besides the 3.11 that ``make test`` uses.

Each leg runs ``tests/unit`` and ``tests/integration`` (the core behaviour suite; not the
cluster, operations or docs tests) with ``AGENTS_SESSIONS_REQUIRE_POSTGRES=1``: its pytest run
creates uniquely named databases of its own on the server that ``TEST_DATABASE_URL`` names (or
that plain ``make test`` would find) and drops them. It prints its result and duration; a
leg whose Python is not on this machine is skipped with the reason printed. The exit status
is non-zero when any leg that ran failed.

Usage: ``python .ci/matrix.py [LEG ...]`` (default: every leg); ``MATRIX_JOBS`` legs at a
time (default 2).
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MATRIX_DIRECTORY = ROOT / ".matrix"
#: The core behaviour suite.
SUITE = ["tests/unit", "tests/integration"]
#: Legs run side by side (``MATRIX_JOBS`` overrides): the suite waits on the server as much as
#: it computes, and CI's machine has two cores.
JOBS = 2
#: What the lowest leg prints the installed versions of: our direct dependencies.
DIRECT_DEPENDENCIES = (
    "sqlalchemy",
    "alembic",
    "psycopg2-binary",
    "pydantic-settings",
    "click",
    "openai-agents",
    "pytest",
    "pytest-asyncio",
    "psycopg",
    "testcontainers",
    "hypothesis",
    "pyyaml",
)


#: How many of a failed leg's failures are printed by name (the rest are counted).
MAX_FAILURES_PRINTED = 40

_INSTALLING = threading.Lock()


@dataclass(frozen=True)
class Leg:
    name: str
    python: str  # "3.10"
    resolution: str  # uv's --resolution: "highest" or "lowest-direct"


LEGS = (
    Leg("lowest", "3.10", "lowest-direct"),
    Leg("py3.10", "3.10", "highest"),
    Leg("py3.12", "3.12", "highest"),
    Leg("py3.13", "3.13", "highest"),
)


@dataclass
class Outcome:
    leg: Leg
    result: str  # "passed", "FAILED", "skipped"
    detail: str
    seconds: float


def find_python(version: str) -> tuple[str | None, str]:
    """An interpreter of ``version`` on this machine, or ``None`` and where it was looked for."""
    on_path = shutil.which(f"python{version}")
    if on_path and _is_python(on_path, version):  # a pyenv shim may name a version it lacks
        return on_path, ""
    pyenv_root = os.environ.get("PYENV_ROOT") or str(Path.home() / ".pyenv")
    pyenv = shutil.which("pyenv")
    if pyenv:
        answer = subprocess.run([pyenv, "root"], capture_output=True, text=True, check=False)
        pyenv_root = answer.stdout.strip() or pyenv_root

    def patch_level(path: str) -> tuple[int, ...]:
        name = Path(path).parents[1].name
        return tuple(int(part) if part.isdigit() else -1 for part in name.split("."))

    installed = sorted(glob.glob(f"{pyenv_root}/versions/{version}.*/bin/python"), key=patch_level)
    installed = [path for path in installed if _is_python(path, version)]
    if installed:
        return installed[-1], ""
    uv_found = subprocess.run(
        [*_uv(), "python", "find", "--no-python-downloads", version],
        capture_output=True,
        text=True,
        check=False,
    )
    if uv_found.returncode == 0 and uv_found.stdout.strip():
        return uv_found.stdout.strip(), ""
    return None, (
        f"no Python {version} on this machine (looked for python{version} on PATH, in "
        f"{pyenv_root}/versions/{version}.*, and asked `uv python find`); install it, e.g. "
        f"`pyenv install {version}`"
    )


def _is_python(path: str, version: str) -> bool:
    """Whether ``path`` runs and is Python ``version``."""
    try:
        answer = subprocess.run(
            [path, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except OSError:
        return False
    return answer.returncode == 0 and answer.stdout.strip() == version


def _uv() -> list[str]:
    """How to run uv: the one installed beside this interpreter, else on PATH."""
    beside = Path(sys.executable).with_name("uv")
    if beside.is_file():
        return [str(beside)]
    on_path = shutil.which("uv")
    if on_path:
        return [on_path]
    return [sys.executable, "-m", "uv"]


def _fingerprint(leg: Leg, python: str) -> str:
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes())
    digest.update(f"{leg}|{python}".encode())
    return digest.hexdigest()


def prepare_environment(leg: Leg, python: str, log: Path) -> Path:
    """The leg's virtualenv, (re)made and installed unless pyproject.toml is unchanged."""
    venv = MATRIX_DIRECTORY / leg.name
    stamp = venv / ".installed"
    fingerprint = _fingerprint(leg, python)
    if stamp.is_file() and stamp.read_text() == fingerprint:
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    with log.open("a") as out:
        for command in (
            [*_uv(), "venv", "--quiet", "--seed", "--python", python, str(venv)],
            [
                *_uv(),
                "pip",
                "install",
                "--quiet",
                *("--python", str(venv / "bin" / "python")),
                *("--resolution", leg.resolution),
                *("-e", ".[test]"),
            ],
        ):
            out.write(f"$ {' '.join(command)}\n")
            out.flush()
            subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, check=True)
    stamp.write_text(fingerprint)
    return venv


def installed_versions(venv: Path) -> str:
    frozen = subprocess.run(
        [*_uv(), "pip", "freeze", "--python", str(venv / "bin" / "python")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    wanted = {name.replace("-", "_") for name in DIRECT_DEPENDENCIES}
    return " ".join(
        line
        for line in frozen
        if "==" in line and line.split("==")[0].lower().replace("-", "_") in wanted
    )


def run_leg(leg: Leg) -> Outcome:
    started = time.monotonic()
    python, missing = find_python(leg.python)
    if python is None:
        return Outcome(leg, "skipped", missing, 0.0)
    MATRIX_DIRECTORY.mkdir(exist_ok=True)
    log = MATRIX_DIRECTORY / f"{leg.name}.log"
    log.write_text("")
    try:
        # One install at a time: editable installs of the same checkout build in its tree.
        with _INSTALLING:
            venv = prepare_environment(leg, python, log)
    except subprocess.CalledProcessError:
        return Outcome(leg, "FAILED", f"installing failed; see {log}", time.monotonic() - started)
    versions = installed_versions(venv)
    print(f"[{leg.name}] Python {leg.python} ({python}); {versions}", flush=True)
    environment = dict(os.environ, AGENTS_SESSIONS_REQUIRE_POSTGRES="1")
    environment.pop("AGENTS_SESSIONS_TEST_PGBOUNCER", None)
    with log.open("a") as out:
        command = [str(venv / "bin" / "python"), "-m", "pytest", *SUITE]
        command += ["-q", "-p", "no:cacheprovider", "--durations=10"]
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        tests = subprocess.run(
            command, cwd=ROOT, env=environment, stdout=out, stderr=subprocess.STDOUT, check=False
        )
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    closing = lines[-1] if lines else "(no output)"
    result = "passed" if tests.returncode == 0 else "FAILED"
    detail = closing if tests.returncode == 0 else f"{closing}; see {log}"
    if tests.returncode != 0:
        # The log stays on the machine that ran the leg; CI keeps only what is printed, so the
        # names of what failed (pytest's short summary) go to stdout with the leg's name.
        failed = [line for line in lines if line.startswith(("FAILED ", "ERROR "))]
        for line in failed[:MAX_FAILURES_PRINTED]:
            print(f"[{leg.name}] {line[:300]}", flush=True)
        if len(failed) > MAX_FAILURES_PRINTED:
            print(f"[{leg.name}] ... and {len(failed) - MAX_FAILURES_PRINTED} more", flush=True)
    return Outcome(leg, result, detail, time.monotonic() - started)


def main(names: list[str]) -> int:
    unknown = sorted(set(names) - {leg.name for leg in LEGS})
    if unknown:
        print(f"unknown leg(s) {unknown}; the legs are {[leg.name for leg in LEGS]}")
        return 2
    chosen = [leg for leg in LEGS if not names or leg.name in names]
    jobs = max(1, int(os.environ.get("MATRIX_JOBS") or JOBS))
    started = time.monotonic()

    def announce_and_run(leg: Leg) -> Outcome:
        print(
            f"[{leg.name}] starting: Python {leg.python}, resolution {leg.resolution}", flush=True
        )
        outcome = run_leg(leg)
        print(
            f"[{leg.name}] {outcome.result} in {outcome.seconds:.0f}s: {outcome.detail}", flush=True
        )
        return outcome

    # Legs are independent (own venv, own databases); `jobs` of them at a time.
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        outcomes = list(pool.map(announce_and_run, chosen))
    print(f"test matrix ({jobs} legs at a time, {time.monotonic() - started:.0f}s in all):")
    for outcome in outcomes:
        print(
            f"  {outcome.leg.name:<7} Python {outcome.leg.python:<5} {outcome.result:<8} "
            f"{outcome.seconds:5.0f}s  {outcome.detail}"
        )
    return 1 if any(outcome.result == "FAILED" for outcome in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
