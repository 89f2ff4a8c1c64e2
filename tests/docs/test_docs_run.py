"""The README and the deployment guide run: every Python snippet and every shell block.

Each fenced ``python`` block is executed (as ``__main__``, in a fresh namespace) and
each ``bash``/``sh`` block runs under ``bash -euo pipefail``, in document order, against
a throwaway PostgreSQL server set up the way the guide describes (an owner role, an
application role). A doc that drifts from the code fails here.

What cannot run here is marked in the markdown, right above the block, with
``<!-- not-run: why -->`` (an HTML comment: invisible on the rendered page); this
test counts those marks, so a new one is a visible decision, not an accident.

What the environment provides (and nothing else: ``set -u`` fails on any other
variable): the URLs a reader would have (``DATABASE_URL``, ``DATABASE_MIGRATION_URL``,
``ADMIN_URL``, ``OWNER_URL``, ``APP_URL``, ``SCRATCH_URL``), ``BACKUP_DIR``, the
package's virtualenv first on ``PATH``, and a working directory with ``alembic.ini``
and ``migrations/`` as in a checkout. The README's placeholder URLs
(``postgresql://user:pass@host:5432/agents_db``, ``postgresql://app@db/agents``) are
replaced by the throwaway database's. Agent runs use the SDK's offline
``ScriptedModel`` with the real ``Runner`` unless ``OPENAI_API_KEY`` is set.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from agents.models.multi_provider import MultiProvider
from agents.testing import ModelStep, ScriptedModel, assistant_message
from agents.usage import Usage

from agents_sessions import dispose_all
from tests.support.pgcluster import Cluster

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
GUIDE = ROOT / "docs" / "03_deployment_guide.md"

#: Blocks each document marks as not runnable here. Change these numbers only with a
#: reason in the mark itself.
EXPECTED_NOT_RUN = {"README.md": 11, "03_deployment_guide.md": 10}

SHELL = {"bash", "sh", "shell"}
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<language>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(?P<reason>.+?)\s*-->")

PLACEHOLDER_URLS = ("postgresql://user:pass@host:5432/agents_db", "postgresql://app@db/agents")


@dataclass(frozen=True)
class Block:
    document: str
    line: int
    language: str
    body: str
    not_run: str | None

    @property
    def where(self) -> str:
        return f"{self.document}:{self.line}"


def blocks_of(path: Path) -> list[Block]:
    """Every fenced code block of ``path`` with its language, line and not-run mark."""
    markdown = path.read_text(encoding="utf-8")
    found = []
    for match in FENCE.finditer(markdown):
        before = markdown[: match.start()].rstrip().splitlines()
        mark = NOT_RUN.search(before[-1]) if before else None
        found.append(
            Block(
                document=path.name,
                line=markdown.count("\n", 0, match.start()) + 1,
                language=match.group("language").lower(),
                body=textwrap.dedent(match.group("body")),
                not_run=mark.group("reason") if mark else None,
            )
        )
    return found


def runnable(path: Path) -> list[Block]:
    return [
        block
        for block in blocks_of(path)
        if block.not_run is None and (block.language == "python" or block.language in SHELL)
    ]


# ------------------------------------------------------------------ the marks


@pytest.mark.parametrize("path", [README, GUIDE], ids=lambda path: path.name)
def test_blocks_that_cannot_run_here_are_marked_and_counted(path: Path) -> None:
    blocks = blocks_of(path)
    marked = [block for block in blocks if block.not_run is not None]
    assert len(marked) == EXPECTED_NOT_RUN[path.name], [
        f"{block.where}: {block.not_run}" for block in marked
    ]
    for block in marked:
        assert len(block.not_run or "") >= 10, f"{block.where}: say why it cannot run"
    # Every code block is either run, marked, or not code a reader runs (yaml, text).
    unlabelled = [block.where for block in blocks if block.language in ("", "console")]
    assert all(
        block.language in ("python", *SHELL, "yaml", "text", "dotenv", "sql", "ini", "cron")
        for block in blocks
    ), [(block.where, block.language) for block in blocks]
    assert unlabelled == [], "label each code block with its language (text for diagrams)"
    assert len(runnable(path)) >= 5


# ------------------------------------------------------------------ the environment


@dataclass
class DocEnvironment:
    cluster: Cluster
    workdir: Path
    env: dict[str, str]
    readme_url: str


def _offline_model() -> ScriptedModel:
    usage = Usage(requests=1, input_tokens=12, output_tokens=5, total_tokens=17)
    return ScriptedModel(
        [ModelStep(output=[assistant_message("Hello!")], usage=usage) for _ in range(20)]
    )


@pytest.fixture
def docs_environment(throwaway_cluster: Cluster, tmp_path: Path) -> Iterator[DocEnvironment]:
    """A throwaway server with the guide's roles, and a reader's shell environment."""
    workdir = tmp_path / "docs-run"
    workdir.mkdir()
    for name in ("alembic.ini", "migrations"):  # what `alembic` needs from a checkout
        (workdir / name).symlink_to(ROOT / name)
    backups = workdir / "backups"
    backups.mkdir()
    cluster = throwaway_cluster
    cluster.create_database("agents")
    readme_url = cluster.create_database("readme")
    cluster.create_database("scratch")
    admin_url = cluster.url("agents")
    owner_url = cluster.url("agents", user="agents_owner")
    app_url = cluster.url("agents", user="agents_app")
    bin_dir = str(Path(sys.executable).parent)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(workdir),
        "XDG_DATA_HOME": str(workdir / "xdg"),
        "LANG": "C.UTF-8",
        "OPENAI_AGENTS_DISABLE_TRACING": "1",
        "ADMIN_URL": admin_url,
        "OWNER_URL": owner_url,
        "APP_URL": app_url,
        # The guide's production setup: the app role in DATABASE_URL, the owner's
        # direct URL for migrations (and operator work row-level security would hide).
        "DATABASE_URL": app_url,
        "DATABASE_MIGRATION_URL": owner_url,
        "SCRATCH_URL": cluster.url("scratch"),
        "BACKUP_DIR": str(backups),
    }
    # The administrator's one-time step (section 2 of the guide runs it again:
    # it is idempotent), so that the migrate job can connect as the owner.
    provision = subprocess.run(
        [
            "bash",
            "-euo",
            "pipefail",
            "-c",
            "agents-sessions roles sql --owner agents_owner --app agents_app "
            '| psql "$ADMIN_URL" -v ON_ERROR_STOP=1 -q',
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert provision.returncode == 0, provision.stderr
    try:
        yield DocEnvironment(cluster, workdir, env, readme_url)
    finally:
        dispose_all()


def _run_shell(block: Block, environment: DocEnvironment, env: dict[str, str]) -> str | None:
    finished = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.body],
        cwd=environment.workdir,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if finished.returncode == 0:
        return None
    return f"exit {finished.returncode}\n{finished.stdout[-2000:]}\n{finished.stderr[-3000:]}"


def _run_python(
    block: Block, environment: DocEnvironment, monkeypatch: pytest.MonkeyPatch, url: str
) -> str | None:
    source = block.body
    for placeholder in PLACEHOLDER_URLS:
        source = source.replace(placeholder, url)
    namespace: dict[str, Any] = {"__name__": "__main__"}
    with monkeypatch.context() as patch:
        for name, value in environment.env.items():
            patch.setenv(name, value)
        patch.setenv("DATABASE_URL", url)
        patch.delenv("DATABASE_MIGRATION_URL")
        patch.chdir(environment.workdir)
        if not os.environ.get("OPENAI_API_KEY"):
            patch.setattr(MultiProvider, "get_model", lambda self, name: _offline_model())
        try:
            exec(compile(source, block.where, "exec"), namespace)
        except Exception as exc:  # reported with the block's place in the document
            return f"{type(exc).__name__}: {exc}"
        finally:
            dispose_all()
            asyncio.set_event_loop(None)
    return None


def _run_document(
    path: Path, environment: DocEnvironment, monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
) -> None:
    failures = []
    for block in runnable(path):
        if block.language == "python":
            failure = _run_python(block, environment, monkeypatch, env["DATABASE_URL"])
        else:
            failure = _run_shell(block, environment, env)
        if failure is not None:
            failures.append(f"--- {block.where} ({block.language}):\n{block.body}\n{failure}")
    assert failures == [], "\n\n".join(failures)


def test_every_runnable_block_of_the_readme_runs(
    docs_environment: DocEnvironment, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The README works on one database of its own, as a first user would.
    env = {
        **docs_environment.env,
        "DATABASE_URL": docs_environment.readme_url,
        "DATABASE_MIGRATION_URL": docs_environment.readme_url,
    }
    _run_document(README, docs_environment, monkeypatch, env)


def test_every_runnable_block_of_the_deployment_guide_runs(
    docs_environment: DocEnvironment, monkeypatch: pytest.MonkeyPatch
) -> None:
    _run_document(GUIDE, docs_environment, monkeypatch, docs_environment.env)
