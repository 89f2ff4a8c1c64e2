"""``agents-sessions ui`` as a user runs it: the console script, a real server, real HTTP."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from agents_sessions.cli import cli
from agents_sessions.errors import ExitCode
from tests.ui.seed import WEATHER_CONVERSATION, SeededDatabase
from tests.ui.server import running_explorer

TOKEN = "command-token-" + "y" * 24


@pytest.mark.parametrize("seeded", ["sqlite"], indirect=True)
def test_the_command_prints_its_address_and_serves_the_pages(seeded: SeededDatabase) -> None:
    with running_explorer(seeded.url) as explorer:
        assert f"serving {explorer.base_url}/" in explorer.banner
        assert "read-only" in explorer.banner
        for path, params in [
            ("/", {}),
            ("/conversation", {"id": WEATHER_CONVERSATION}),
            ("/usage", {"window": "24h"}),
        ]:
            response = httpx.get(explorer.base_url + path, params=params)
            assert response.status_code == 200, response.text[-300:]
        assert (
            "It is 18°C and sunny in Paris."
            in httpx.get(
                explorer.base_url + "/conversation", params={"id": WEATHER_CONVERSATION}
            ).text
        )


@pytest.mark.parametrize("seeded", ["sqlite"], indirect=True)
def test_the_command_takes_its_token_from_the_environment(seeded: SeededDatabase) -> None:
    with running_explorer(seeded.url, env={"AGENTS_SESSIONS_UI_TOKEN": TOKEN}) as explorer:
        assert "token required" in explorer.banner
        assert TOKEN not in explorer.banner
        assert httpx.get(explorer.base_url + "/").status_code == 401
        authorized = httpx.get(
            explorer.base_url + "/", headers={"authorization": f"Bearer {TOKEN}"}
        )
        assert authorized.status_code == 200


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_the_command_refuses_a_public_address_without_a_token(tmp_path: Path, host: str) -> None:
    url = f"sqlite:///{tmp_path / 'any.sqlite3'}"
    result = CliRunner().invoke(cli, ["--database-url", url, "ui", "--host", host])
    assert result.exit_code == ExitCode.CONFIGURATION
    assert "without a token" in result.output
    assert "serving" not in result.output


def test_the_command_checks_the_schema_before_it_listens(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.sqlite3'}"
    result = CliRunner().invoke(cli, ["--database-url", url, "ui"])
    assert result.exit_code == ExitCode.SCHEMA
    assert "agents-sessions migrate upgrade" in result.output
    assert "serving" not in result.output
