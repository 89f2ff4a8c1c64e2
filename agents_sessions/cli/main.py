"""The ``agents-sessions`` command group and its entry point."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, NoReturn

import click

from .common import CliContext

# Each of these modules (in this package) adds its commands to `cli` when imported.
_COMMAND_MODULES: tuple[str, ...] = (
    "rls",
    "roles",
    "migrate",
    "stats",
    "conversations",
    "doctor",
    "transfer",
    "erase",
    "prune",
    "backup",
    # The explorer: its command loads the [ui] extra only when run.
    "ui",
    "citus",
    "search",
    "runs",
)


#: Options of the top-level group that may also follow the subcommand
#: (`agents-sessions stats --database-url URL`).
_GLOBAL_OPTIONS = ("--database-url",)


def _hoist_global_options(arguments: list[str]) -> list[str]:
    """Move global options (and their values) found after the subcommand to the front.

    Stops at ``--`` (everything after it is an argument). No subcommand has an
    option of the same name, so nothing is taken from a subcommand.
    """
    hoisted: list[str] = []
    rest: list[str] = []
    index = 0
    while index < len(arguments):
        token = arguments[index]
        if token == "--":
            rest += arguments[index:]
            break
        if token in _GLOBAL_OPTIONS and index + 1 < len(arguments):
            hoisted += arguments[index : index + 2]
            index += 2
            continue
        if token.split("=", 1)[0] in _GLOBAL_OPTIONS and "=" in token:
            hoisted.append(token)
        else:
            rest.append(token)
        index += 1
    return hoisted + rest


def _quiet_broken_pipe() -> NoReturn:
    """End quietly after the reader of stdout went away (`| head`), like other Unix tools.

    Python would otherwise complain when it flushes stdout at exit; pointing stdout
    at /dev/null leaves nothing to complain about. Exit status 0: the reader had
    what it wanted.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(0)


class _OperatorGroup(click.Group):
    """The top-level group: global options anywhere, a closed pipe is not an error."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _hoist_global_options(args))

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            _quiet_broken_pipe()


@click.group(
    cls=_OperatorGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "--database-url",
    envvar=None,  # DATABASE_URL / AGENTS_SESSIONS_DATABASE_URL are read by the settings
    default=None,
    metavar="URL",
    help=(
        "Database URL (postgresql://user:pass@host:5432/db?pool_size=5, sqlite:///file); "
        "may also follow the subcommand. "
        "Default: DATABASE_URL, AGENTS_SESSIONS_DATABASE_URL or .env, else the embedded "
        "SQLite file."
    ),
)
@click.version_option(package_name="agents-sessions")
@click.pass_context
def cli(context: click.Context, database_url: str | None) -> None:
    """Operate an agents_sessions conversation store: migrations, statistics,
    conversations, export/import, erasure, retention, backups and health checks."""
    context.obj = CliContext(database_url=database_url)


def _register() -> None:
    for name in _COMMAND_MODULES:
        importlib.import_module(f"{__package__}.{name}")


def main() -> None:
    """Console-script entry point."""
    try:
        cli(prog_name="agents-sessions")
    finally:
        # Output still buffered is written now; a reader that already left is fine.
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _quiet_broken_pipe()


_register()
