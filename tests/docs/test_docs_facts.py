"""What the README and the guide state as fact matches the code: precedence, exit codes,
quoted messages, the install extras, the compose roles, BuildKit."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
from pathlib import Path

import pytest

from agents_sessions import SchemaNotAtHeadError, get_store, load_settings
from agents_sessions.db.models import Base
from agents_sessions.errors import ExitCode
from tests.support.pgcluster import SUPERUSER, Cluster

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
GUIDE = (ROOT / "docs" / "03_deployment_guide.md").read_text(encoding="utf-8")
PYPROJECT = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
INIT_SCRIPT = ROOT / "docker" / "initdb" / "10-agents-sessions-roles.sh"


def test_the_readme_says_exactly_which_database_url_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "an explicit argument (`database_url=`" in README
    assert "then the process environment, then `.env`" in README
    assert "`AGENTS_SESSIONS_DATABASE_URL` over `DATABASE_URL`" in README

    def resolved() -> str:
        return load_settings().resolved_database_url().rsplit("/", 1)[-1]

    (tmp_path / ".env").write_text(
        "AGENTS_SESSIONS_DATABASE_URL=sqlite:///dotenv-prefixed\n"
        "DATABASE_URL=sqlite:///dotenv-plain\n",
        encoding="utf-8",
    )
    assert resolved() == "dotenv-prefixed"  # .env: the prefixed name over the plain one
    monkeypatch.setenv("DATABASE_URL", "sqlite:///environment-plain")
    assert resolved() == "environment-plain"  # the environment over .env
    monkeypatch.setenv("AGENTS_SESSIONS_DATABASE_URL", "sqlite:///environment-prefixed")
    assert resolved() == "environment-prefixed"
    explicit = load_settings(database_url="sqlite:///explicit").resolved_database_url()
    assert explicit.endswith("/explicit")  # an explicit argument over everything


def test_the_readme_exit_code_table_is_the_command_lines() -> None:
    table = README.split("| exit code | meaning |", 1)[1].split("\n\n", 1)[0]
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", table, re.MULTILINE)}
    assert documented == {int(code) for code in ExitCode}


def test_the_guide_quotes_the_schema_error_as_the_package_words_it(tmp_path: Path) -> None:
    quoted = re.search(r"`SchemaNotAtHeadError` \(“… (.+?) …”\)", GUIDE)
    assert quoted is not None, "the guide quotes the error's advice"
    store = get_store(
        f"sqlite:///{tmp_path / 'behind.sqlite3'}", settings=load_settings(auto_migrate=False)
    )
    with pytest.raises(SchemaNotAtHeadError) as raised, store.read():
        pass
    assert quoted.group(1) in str(raised.value)


def test_the_install_section_uses_extras_the_package_has() -> None:
    # (pyproject's extras by name: tomllib is Python 3.11+, the package supports 3.10)
    section = PYPROJECT.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    extras = set(re.findall(r"^([\w-]+) = \[", section, re.MULTILINE))
    name = re.search(r'^name = "([^"]+)"', PYPROJECT, re.MULTILINE)
    assert name is not None and {"agents", "dev"} <= extras
    install = README.split("## Install", 1)[1].split("\n## ", 1)[0]
    used = set(re.findall(r'pip install (?:-e )?"[^"\[]*\[(\w+)\]', install))
    assert used and used <= extras, used - extras
    assert f'"{name.group(1)}[agents] @ git+' in install
    assert "source .venv/bin/activate" in README


def test_the_docs_say_the_dockerfile_needs_buildkit() -> None:
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text(encoding="utf-8")
    assert "RUN --mount=" in dockerfile  # a BuildKit feature
    assert "BuildKit" in README and "BuildKit" in GUIDE


def test_the_compose_init_script_creates_the_guides_roles_with_their_passwords(
    throwaway_cluster: Cluster,
) -> None:
    script = INIT_SCRIPT.read_text(encoding="utf-8")
    tables = re.search(r"-v tables=([\w,]+)", script)
    assert tables is not None
    assert tables.group(1).split(",") == [table.name for table in Base.metadata.sorted_tables]
    throwaway_cluster.create_database("agents")
    env = {
        **os.environ,
        "PGHOST": "127.0.0.1",
        "PGPORT": str(throwaway_cluster.port),
        "POSTGRES_USER": SUPERUSER,
        "POSTGRES_DB": "agents",
        "AGENTS_OWNER_PASSWORD": "owner-pw",
        "AGENTS_APP_PASSWORD": "app-pw",
        "LEAST_PRIVILEGE_SQL": str(ROOT / "agents_sessions" / "ops" / "least_privilege.sql"),
    }
    finished = subprocess.run(
        ["sh", str(INIT_SCRIPT)], env=env, capture_output=True, text=True, timeout=120
    )
    assert finished.returncode == 0, finished.stderr
    assert "owner-pw" not in finished.stdout + finished.stderr
    rows = throwaway_cluster.execute(
        "SELECT rolname, rolcanlogin, rolpassword IS NOT NULL, rolsuper FROM pg_authid "
        "WHERE rolname IN ('agents_owner', 'agents_app') ORDER BY rolname"
    )
    assert rows == [("agents_app", True, True, False), ("agents_owner", True, True, False)]
    compose = (ROOT / "docker" / "compose.yaml").read_text(encoding="utf-8")
    assert "DATABASE_URL: postgresql://agents_owner:" in compose  # the migrate job


def test_every_python_name_the_docs_cite_exists() -> None:
    """`agents_sessions.x.y` in the docs is a module, or a module's attribute."""
    cited = set(re.findall(r"`(agents_sessions(?:\.\w+)+)`", README + GUIDE))
    assert len(cited) >= 5
    missing = []
    for dotted in sorted(cited):
        parts = dotted.split(".")
        for split in range(len(parts), 0, -1):
            try:
                found: object = importlib.import_module(".".join(parts[:split]))
            except ImportError:
                continue
            for attribute in parts[split:]:
                found = getattr(found, attribute, None)
            break
        else:
            found = None
        if found is None:
            missing.append(dotted)
    assert missing == []
