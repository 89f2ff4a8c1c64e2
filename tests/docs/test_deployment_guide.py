"""Every command the deployment guide tells an operator to run exists, with those options.

Extracts each ``agents-sessions ...`` command line from the guide's fenced shell
blocks (and exec arrays in its YAML blocks), walks it through the real click command
tree, checks every option it uses is one the command has, and runs
``agents-sessions <command path> --help``. Every ``make`` target named in the docs
must be a target of the Makefile.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from agents_sessions.cli import cli

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "03_deployment_guide.md"
DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
MAKEFILE = ROOT / "Makefile"

SHELL_LANGUAGES = {"bash", "sh", "shell", "console", "zsh"}
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
SEPARATORS = set("|&;<>()")

#: What the guide must keep telling operators (one command per topic of the guide).
REQUIRED_COMMANDS = {
    ("migrate", "upgrade"),
    ("migrate", "check"),
    ("roles", "sql"),
    ("doctor",),
    ("backup",),
    ("restore",),
    ("stats",),
    ("prune",),
    ("erase",),
}


def fenced_blocks(markdown: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return [(match.group(1).lower(), match.group(2)) for match in FENCE.finditer(markdown)]


def shell_command_lines(body: str) -> list[list[str]]:
    """The arguments after each ``agents-sessions`` in a shell block."""
    commands = []
    for line in body.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
        for index, token in enumerate(tokens):
            # In command position only: `docker build -t agents-sessions .` names an image.
            at_command = index == 0 or set(tokens[index - 1]) <= SEPARATORS
            if token != "agents-sessions" or not at_command:
                continue
            arguments = []
            for argument in tokens[index + 1 :]:
                if set(argument) <= SEPARATORS:  # |, &&, ;, >, ( ... end this command
                    break
                arguments.append(argument)
            commands.append(arguments)
    return commands


def exec_array_commands(body: str) -> list[list[str]]:
    """The arguments of ``["agents-sessions", ...]`` exec arrays (Kubernetes, compose)."""
    commands = []
    for match in re.finditer(r'\[\s*"agents-sessions"[^\]]*\]', body):
        array = json.loads(match.group(0))
        commands.append([str(part) for part in array[1:]])
    return commands


def guide_commands() -> list[list[str]]:
    """The ``agents-sessions`` commands of the guide and of the README."""
    commands: list[list[str]] = []
    text = "\n".join(path.read_text(encoding="utf-8") for path in (GUIDE, ROOT / "README.md"))
    for language, body in fenced_blocks(text):
        if language in SHELL_LANGUAGES:
            commands += shell_command_lines(body)
        elif language in ("yaml", "yml", "json"):
            commands += exec_array_commands(body)
    return commands


def _option(command: click.Command, token: str) -> click.Option | None:
    name = token.split("=", 1)[0]
    for parameter in command.params:
        if isinstance(parameter, click.Option) and name in (
            *parameter.opts,
            *parameter.secondary_opts,
        ):
            return parameter
    return None


def _is_option(token: str) -> bool:
    # `-1` (one revision down) is an argument, not an option.
    return token.startswith("-") and not re.fullmatch(r"-\d+", token)


def resolve(arguments: list[str]) -> tuple[list[str], click.Command, list[str]]:
    """Walk ``arguments`` down the command tree: (command path, leaf command, the rest)."""
    command: click.Command = cli
    path: list[str] = []
    index = 0
    while index < len(arguments):
        token = arguments[index]
        if _is_option(token):
            option = _option(command, token)
            assert option is not None, f"{' '.join(['agents-sessions', *path])}: no option {token}"
            takes_value = not option.is_flag and "=" not in token
            index += 2 if takes_value else 1
            continue
        if not isinstance(command, click.Group):
            break
        with click.Context(command) as context:
            subcommand = command.get_command(context, token)
        assert subcommand is not None, (
            f"`agents-sessions {' '.join([*path, token])}`: no such command "
            f"(commands of {'/'.join(path) or 'the top level'}: "
            f"{', '.join(sorted(command.list_commands(context)))})"
        )
        path.append(token)
        command = subcommand
        index += 1
    return path, command, arguments[index:]


COMMANDS = guide_commands()


def test_the_guide_shows_the_commands_of_every_topic() -> None:
    assert len(COMMANDS) >= 15
    paths = {tuple(resolve(arguments)[0]) for arguments in COMMANDS}
    assert paths >= REQUIRED_COMMANDS, REQUIRED_COMMANDS - paths


def test_the_documented_least_privilege_step_is_the_one_the_brief_names() -> None:
    text = GUIDE.read_text(encoding="utf-8")
    assert (
        "agents-sessions roles sql --owner agents_owner --app agents_app "
        '| psql "$ADMIN_URL" -v ON_ERROR_STOP=1'
    ) in text


@pytest.mark.parametrize("arguments", COMMANDS, ids=[" ".join(a) for a in COMMANDS])
def test_every_guide_command_exists_with_its_options(arguments: list[str]) -> None:
    path, command, rest = resolve(arguments)
    assert path, "a bare `agents-sessions` shows only the help"
    for token in rest:
        if _is_option(token) and token not in ("-h", "--help"):
            assert _option(command, token) is not None, (
                f"`agents-sessions {' '.join(path)}` has no option {token.split('=')[0]}"
            )
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------- make targets


def makefile_targets() -> set[str]:
    targets: set[str] = set()
    for line in MAKEFILE.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+(?:[ \t]+[A-Za-z0-9_.-]+)*)[ \t]*::?(?!=)", line)
        if match and not match.group(1).startswith("."):
            targets.update(match.group(1).split())
    return targets


def documented_make_invocations() -> list[tuple[Path, list[str]]]:
    """``make ...`` in code (fenced blocks and inline spans) of the docs and README."""
    found = []
    for document in DOCS:
        markdown = document.read_text(encoding="utf-8")
        snippets = [body for _, body in fenced_blocks(markdown)]
        snippets += INLINE_CODE.findall(FENCE.sub("", markdown))
        for snippet in snippets:
            for line in snippet.splitlines():
                code = line.split("#", 1)[0]
                for match in re.finditer(r"(?:^|[\s;&|(])make((?:[ \t]+[A-Za-z0-9_.=-]+)+)", code):
                    found.append((document, match.group(1).split()))
    return found


def test_every_make_target_named_in_the_docs_exists() -> None:
    targets = makefile_targets()
    assert {"demo", "test", "lint", "db-up", "db-down"} <= targets
    makefile = MAKEFILE.read_text(encoding="utf-8")
    invocations = documented_make_invocations()
    named = {word for _, words in invocations for word in words if "=" not in word}
    assert {"db-up", "db-down"} <= named  # the guide's own
    for document, words in invocations:
        for word in words:
            if "=" in word:  # a variable handed to make must be one the Makefile reads
                variable = word.split("=", 1)[0]
                assert f"$({variable})" in makefile, f"{document.name}: make {variable}=?"
            else:
                assert word in targets, f"{document.name}: `make {word}` is not a target"
