"""The ``agents-sessions`` command group and its entry point."""

from __future__ import annotations

import importlib

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
    "search",
    "runs",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--database-url",
    envvar=None,  # DATABASE_URL / AGENTS_SESSIONS_DATABASE_URL are read by the settings
    default=None,
    metavar="URL",
    help=(
        "Database URL (postgresql://user:pass@host:5432/db?pool_size=5, sqlite:///file). "
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
    cli(prog_name="agents-sessions")


_register()
