"""``agents-sessions search``: hits as a table or JSON, narrowed like the library call."""

from __future__ import annotations

import json
import uuid
from typing import Any

from click.testing import CliRunner

from agents_sessions import PostgreSQLSession
from agents_sessions.cli import cli
from agents_sessions.errors import ExitCode


def run(url: str, *arguments: str) -> Any:
    return CliRunner().invoke(cli, ["--database-url", url, "search", *arguments])


async def test_search_prints_ranked_hits_pages_and_narrows_by_user(database_url: str) -> None:
    topic = "zq" + uuid.uuid4().hex[:10]
    ana = PostgreSQLSession(f"ana-{uuid.uuid4()}", database_url=database_url, user_id="ana")
    bo = PostgreSQLSession(f"bo-{uuid.uuid4()}", database_url=database_url, user_id="bo")
    await ana.add_items([{"role": "user", "content": f"the {topic} plan\nsecond line"}])
    await bo.add_items([{"role": "user", "content": f"another {topic} plan"}] * 2)

    result = run(database_url, topic, "--json", "--limit", "2")
    assert result.exit_code == 0, result.output
    page = json.loads(result.stdout)
    assert len(page["hits"]) == 2 and page["next_cursor"]
    assert set(page["hits"][0]) == {
        "conversation_id",
        "message_id",
        "role",
        "snippet",
        "rank",
        "created_at",
    }
    rest = json.loads(run(database_url, topic, "--json", "--after", page["next_cursor"]).stdout)
    assert len(rest["hits"]) == 1 and rest["next_cursor"] is None

    mine = json.loads(run(database_url, topic, "--json", "--user", "ana", "--since", "1h").stdout)
    assert [hit["conversation_id"] for hit in mine["hits"]] == [ana.session_id]
    one = json.loads(run(database_url, topic, "--json", "--conversation", bo.session_id).stdout)
    assert {hit["conversation_id"] for hit in one["hits"]} == {bo.session_id}

    table = run(database_url, topic, "--user", "ana")
    assert table.exit_code == 0
    assert f"**{topic}** plan second line" in table.stdout  # one line per hit
    assert "no matches" in run(database_url, "nothing-like-this-" + topic).stdout


def test_bad_search_arguments_exit_with_usage_errors(database_url: str) -> None:
    assert run(database_url, "x", "--since", "soon").exit_code == ExitCode.USAGE
    assert run(database_url, "x", "--after", "bogus").exit_code == ExitCode.USAGE
