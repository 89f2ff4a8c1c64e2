"""``agents-sessions ui`` run for real, as a user starts it: a subprocess on a free port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

#: The console script, next to this interpreter (installed with the package).
AGENTS_SESSIONS = str(Path(sys.executable).with_name("agents-sessions"))


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class RunningExplorer:
    """A started ``agents-sessions ui``: its address and what it printed first."""

    base_url: str
    banner: str
    process: subprocess.Popen[str]


@contextmanager
def running_explorer(
    database_url: str, *args: str, env: dict[str, str] | None = None
) -> Iterator[RunningExplorer]:
    """Start ``agents-sessions --database-url URL ui --port P ARGS...``; stop it at the end.

    Waits (up to 30 s) until the address it printed answers.
    """
    port = free_port()
    process = subprocess.Popen(
        [AGENTS_SESSIONS, "--database-url", database_url, "ui", "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        assert process.stdout is not None
        banner = [process.stdout.readline(), process.stdout.readline()]
        base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise AssertionError(
                    f"the explorer exited: {''.join(banner)}{process.stdout.read()}"
                )
            try:
                httpx.get(base_url + "/static/favicon.svg", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield RunningExplorer(base_url=base_url, banner="".join(banner), process=process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
