"""``agents-sessions ui``: serve the read-only conversation explorer (the ``[ui]`` extra).

The explorer itself lives in :mod:`agents_sessions.ui`; this command resolves the
database like every other command, checks the schema before it listens, and refuses
to listen beyond loopback without a token.
"""

from __future__ import annotations

import click

from ..errors import ExitCode
from .common import CliContext, fail, pass_cli_context, reported_errors
from .main import cli


@cli.command("ui")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. Anything but loopback needs --token.",
)
@click.option(
    "--port", default=8765, show_default=True, type=click.IntRange(1, 65535), help="TCP port."
)
@click.option(
    "--token",
    envvar="AGENTS_SESSIONS_UI_TOKEN",
    default=None,
    metavar="TOKEN",
    help=(
        "Secret every request must present (open the page once with ?token=TOKEN; "
        "scripts send 'Authorization: Bearer TOKEN'). Default: AGENTS_SESSIONS_UI_TOKEN. "
        "Required unless --host is loopback."
    ),
)
@pass_cli_context
def ui_command(context: CliContext, host: str, port: int, token: str | None) -> None:
    """Browse conversations, transcripts and usage charts in a web browser (read-only)."""
    try:
        import uvicorn

        from ..ui import ExplorerAccess, create_app
    except ImportError as exc:
        fail(
            f"the explorer needs the [ui] extra ({exc.name} is missing): "
            "pip install 'agents-sessions[ui]'",
            ExitCode.CONFIGURATION,
        )
    with reported_errors():
        access = ExplorerAccess.for_bind(host, token)
        store = context.store()
        store.ensure_schema()  # fail now, not on the first page
        app = create_app(store, access)
    shown_host = f"[{host}]" if ":" in host else host
    click.echo(f"agents-sessions explorer (read-only) on {context.safe_url()}")
    click.echo(f"serving http://{shown_host}:{port}/" + ("  (token required)" if token else ""))
    click.echo("press Ctrl+C to stop", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
