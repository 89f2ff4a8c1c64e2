"""docker/: the image and the compose stack, checked without a Docker engine.

There is no engine (and no compose plugin) where these tests run, so they check what
can be checked statically: the compose file's services, health check, volumes and
dependency conditions, that no password is written down, and the Dockerfile's
stages, user, entry point and command -- the command is run through the real CLI.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]  # no types-PyYAML in the dev extra
from click.testing import CliRunner

from agents_sessions.cli import cli

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - mypy (a dev dependency) brings tomli on 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
DOCKERIGNORE = ROOT / ".dockerignore"

# `${NAME:?message}`: compose refuses to start when NAME is unset or empty.
REQUIRED_VARIABLE = re.compile(r"^\$\{[A-Z][A-Z0-9_]*:\?[^}]+\}$")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY", re.IGNORECASE)
# user[:password]@ of a URL whose parts may be ${...} references (which hold colons).
USERINFO = re.compile(
    r"(?P<user>(?:\$\{[^}]*\}|[^:@$])*)(?::(?P<password>(?:\$\{[^}]*\}|[^@$])*))?@"
)


# ------------------------------------------------------------------ compose


def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


def walk(node: Any, path: str = "") -> list[tuple[str, Any]]:
    """Every (dotted path, scalar) pair of a YAML document."""
    if isinstance(node, dict):
        return [pair for key, value in node.items() for pair in walk(value, f"{path}.{key}")]
    if isinstance(node, list):
        return [
            pair for index, value in enumerate(node) for pair in walk(value, f"{path}[{index}]")
        ]
    return [(path, node)]


def test_compose_has_the_three_services() -> None:
    services = compose()["services"]
    assert set(services) == {"postgres", "pgadmin", "migrate"}
    assert services["postgres"]["image"] == "postgres:16"
    assert services["pgadmin"]["image"].startswith("dpage/pgadmin4")


def test_postgres_has_a_pg_isready_healthcheck_and_a_named_volume() -> None:
    document = compose()
    postgres = document["services"]["postgres"]
    check = postgres["healthcheck"]
    assert check["test"][0] in ("CMD", "CMD-SHELL")
    assert "pg_isready" in " ".join(check["test"][1:])
    assert {"interval", "timeout", "retries"} <= set(check)

    mounts = [volume.split(":") for volume in postgres["volumes"]]
    data = [source for source, target, *_ in mounts if target == "/var/lib/postgresql/data"]
    assert len(data) == 1
    # A named volume (declared at the top level), not a bind mount of a host path.
    assert not data[0].startswith((".", "/", "~"))
    assert data[0] in document["volumes"]


def test_migrate_is_a_one_shot_job_after_postgres_is_healthy() -> None:
    migrate = compose()["services"]["migrate"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate["restart"] == "no"  # the string: an unquoted `no` would be False
    build = migrate["build"]
    assert (COMPOSE.parent / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE
    # Without a `command`, the image's CMD runs: `migrate upgrade`.
    assert "command" not in migrate
    url = migrate["environment"]["DATABASE_URL"]
    # As the owner role of the least-privilege setup, never the superuser.
    assert url.startswith("postgresql://agents_owner:${AGENTS_OWNER_PASSWORD:?")
    assert "@postgres:5432/" in url  # the compose service, by name
    assert "${POSTGRES_DB" in url
    assert "POSTGRES_USER" not in url and "POSTGRES_PASSWORD" not in url


def test_pgadmin_takes_its_credentials_from_the_environment() -> None:
    pgadmin = compose()["services"]["pgadmin"]
    environment = pgadmin["environment"]
    assert environment["PGADMIN_DEFAULT_EMAIL"].startswith("${PGADMIN_DEFAULT_EMAIL")
    assert REQUIRED_VARIABLE.match(environment["PGADMIN_DEFAULT_PASSWORD"])
    assert pgadmin["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose_writes_down_no_password() -> None:
    secrets = 0
    for path, value in walk(compose()):
        key = path.rsplit(".", 1)[-1]
        if SECRET_NAME.search(key):
            secrets += 1
            assert isinstance(value, str) and REQUIRED_VARIABLE.match(value), path
        if isinstance(value, str) and "://" in value and "@" in value:
            userinfo = USERINFO.match(value.split("://", 1)[1])
            assert userinfo is not None, path
            secrets += 1
            password = userinfo.group("password") or ""
            assert REQUIRED_VARIABLE.match(password), (
                f"{path}: the URL's password must be a ${{VAR:?...}} reference"
            )
    # POSTGRES_PASSWORD, AGENTS_OWNER_PASSWORD, AGENTS_APP_PASSWORD,
    # PGADMIN_DEFAULT_PASSWORD, DATABASE_URL
    assert secrets == 5


def test_the_env_example_holds_no_values_for_secrets() -> None:
    example = (COMPOSE.parent / ".env.example").read_text(encoding="utf-8")
    assignments = {
        name: value
        for name, _, value in (
            line.partition("=") for line in example.splitlines() if line and line[0] != "#"
        )
    }
    secrets = {name: value for name, value in assignments.items() if SECRET_NAME.search(name)}
    assert secrets == {
        "POSTGRES_PASSWORD": "",
        "AGENTS_OWNER_PASSWORD": "",
        "AGENTS_APP_PASSWORD": "",
        "PGADMIN_DEFAULT_PASSWORD": "",
    }
    # Every variable the compose file reads is listed.
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", COMPOSE.read_text(encoding="utf-8")))
    assert used == set(assignments)


# ------------------------------------------------------------------ Dockerfile


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [argument for name, argument in self.instructions if name == keyword]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    pairs = []
    for line in logical:
        keyword, _, argument = line.partition(" ")
        pairs.append((keyword.upper(), argument.strip()))
    return pairs


def stages() -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults, and the build stages in order."""
    arguments: dict[str, str] = {}
    result: list[Stage] = []
    for keyword, argument in dockerfile_instructions():
        if keyword == "FROM":
            parts = argument.split()
            base = re.sub(
                r"\$\{(\w+)\}|\$(\w+)", lambda m: arguments[m.group(1) or m.group(2)], parts[0]
            )
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            result.append(Stage(base=base, name=name))
        elif not result and keyword == "ARG":
            name, _, default = argument.partition("=")
            arguments[name] = default
        elif result:
            result[-1].instructions.append((keyword, argument))
    return arguments, result


def exec_form(argument: str) -> list[str]:
    value = json.loads(argument)
    assert isinstance(value, list) and all(isinstance(part, str) for part in value)
    return value


def test_the_image_is_multi_stage_on_python_slim() -> None:
    _, all_stages = stages()
    assert len(all_stages) >= 2
    builder, final = all_stages[0], all_stages[-1]
    assert builder.name == "builder"
    assert {stage.base for stage in all_stages} == {"python:3.11-slim"}
    assert any("pip wheel" in run for run in builder.all("RUN"))
    # The final stage installs the built wheels and never copies the source tree.
    installs = [run for run in final.all("RUN") if "pip install" in run]
    assert len(installs) == 1
    assert "from=builder" in installs[0]
    assert "--no-index" in installs[0]
    assert not final.all("COPY")
    assert not final.all("ADD")


def test_the_final_stage_runs_as_an_unprivileged_user() -> None:
    final = stages()[1][-1]
    users = final.all("USER")
    assert users, "the final stage must switch away from root"
    user = users[-1].split(":")[0]
    # Numeric, so that Kubernetes' runAsNonRoot can verify it; never uid 0.
    assert user.isdigit() and int(user) != 0, user


def test_no_credentials_in_any_layer() -> None:
    arguments, all_stages = stages()
    declared = list(arguments.items())
    for stage in all_stages:
        for keyword, argument in stage.instructions:
            if keyword in ("ENV", "ARG", "LABEL"):
                for assignment in shlex.split(argument):
                    name, _, value = assignment.partition("=")
                    declared.append((name, value))
    assert declared
    for name, value in declared:
        assert not SECRET_NAME.search(name), f"{name} would be stored in the image"
        assert not re.search(r"://[^/\s]*:[^/\s]*@", value), f"{name} holds a URL with a password"
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert "DATABASE_URL=" not in text  # given at run time only


def test_entrypoint_and_default_command_are_a_real_cli_command() -> None:
    final = stages()[1][-1]
    entrypoint = exec_form(final.all("ENTRYPOINT")[-1])
    command = exec_form(final.all("CMD")[-1])
    assert entrypoint == ["agents-sessions"]
    assert command == ["migrate", "upgrade"]

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "scripts"
    ]
    assert scripts[entrypoint[0]] == "agents_sessions.cli:main"
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0, result.output


# ------------------------------------------------------------------ build context


def dockerignore_excludes(path: str) -> bool:
    """Whether Docker's .dockerignore rules leave ``path`` (or a parent) out of the context."""
    rules: list[tuple[bool, re.Pattern[str]]] = []
    for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        index = 0
        while index < len(pattern):
            if pattern.startswith("**/", index):
                regex += "(?:.*/)?"
                index += 3
            elif pattern.startswith("**", index):
                regex += ".*"
                index += 2
            elif pattern[index] == "*":
                regex += "[^/]*"
                index += 1
            elif pattern[index] == "?":
                regex += "[^/]"
                index += 1
            elif pattern[index] == "[":
                end = pattern.index("]", index)
                regex += pattern[index : end + 1]
                index = end + 1
            else:
                regex += re.escape(pattern[index])
                index += 1
        rules.append((negated, re.compile(regex)))
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: depth + 1]) for depth in range(len(parts))]
    excluded = False
    for negated, compiled in rules:  # the last matching rule wins
        if any(compiled.fullmatch(candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def test_the_build_context_holds_what_the_wheel_needs_and_nothing_private() -> None:
    builder = stages()[1][0]
    sources = []
    for argument in builder.all("COPY"):
        parts = [part for part in shlex.split(argument) if not part.startswith("--")]
        sources += parts[:-1]
    assert set(sources) == {"pyproject.toml", "README.md", "agents_sessions", "migrations"}
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not dockerignore_excludes(source), f"{source} is excluded from the context"
    for source in ("agents_sessions/sql/least_privilege.sql", "migrations/versions/x.py"):
        assert not dockerignore_excludes(source)

    for private in (
        ".venv",
        ".venv/lib/python3.11/site-packages/x.py",
        ".git/config",
        ".env",
        "docker/.env",
        "agents_sessions/__pycache__/store.cpython-311.pyc",
        ".pytest_cache/v/cache",
        ".mypy_cache/3.11/x.json",
        ".ruff_cache/x",
        "sessions.sqlite3",
        "build/lib/x.py",
        "dist/agents_sessions-0.1.0-py3-none-any.whl",
    ):
        assert dockerignore_excludes(private), f"{private} would be sent to the builder"


def test_the_wheel_declares_every_package_and_its_data_files() -> None:
    """What the image installs is the wheel: every subpackage and data file must be in it."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"][
        "setuptools"
    ]
    directories = {name: ROOT / name.replace(".", "/") for name in setuptools["packages"]}
    directories.update(
        {name: ROOT / where for name, where in setuptools.get("package-dir", {}).items()}
    )
    for name in list(directories):
        for parent, mapped in setuptools.get("package-dir", {}).items():
            if name.startswith(parent + "."):
                directories[name] = ROOT / mapped / name[len(parent) + 1 :].replace(".", "/")

    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "agents_sessions").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert on_disk <= set(setuptools["packages"]), "a package is missing from the wheel"
    assert {"agents_sessions.migrations", "agents_sessions.ops"} <= set(setuptools["packages"])

    package_data = setuptools.get("package-data", {})
    for name, where in directories.items():
        assert (where / "__init__.py").is_file(), name
        data_files = [
            path.name
            for path in where.iterdir()
            if path.is_file() and path.suffix not in (".py", ".pyc")
        ]
        for data_file in data_files:
            globs = package_data.get(name, [])
            assert any(Path(data_file).match(glob) for glob in globs), (
                f"{name}: {data_file} would be left out of the wheel"
            )
