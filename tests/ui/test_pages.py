"""Every page of the explorer over a real database (both backends), through HTTP.

The app runs in-process (Starlette's TestClient) on the seeded database of
:mod:`tests.ui.seed`; what each page shows is checked against what was stored.
"""

from __future__ import annotations

import html
import re
from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import Text, select
from sqlalchemy import cast as sql_cast
from starlette.testclient import TestClient

from agents_sessions import get_store
from agents_sessions.db.models import messages_table
from agents_sessions.ops.transfer import ExportFile
from agents_sessions.repositories import UsageEntry
from agents_sessions.ui import create_app
from agents_sessions.ui.queries import PAGE_SIZE, TRANSCRIPT_PAGE_SIZE, WINDOWS
from tests.ui.conftest import BASE_URL
from tests.ui.seed import (
    BULK_CONVERSATIONS,
    BULK_USER,
    IMAGE_CONVERSATION,
    LONG_CONVERSATION,
    LONG_CONVERSATION_ITEMS,
    ODD_ID_CONVERSATION,
    WEATHER_CONVERSATION,
    SeededDatabase,
    history_usage,
)


def conversation_ids_listed(page: str) -> list[str]:
    return [
        html.unescape(found) for found in re.findall(r'<td class="id"><a [^>]*>([^<]*)</a>', page)
    ]


def next_page_link(page: str) -> str | None:
    found = re.search(r'<a href="([^"]*)" rel="next">', page)
    return html.unescape(found.group(1)) if found else None


def test_conversation_list_shows_newest_first_with_user_items_tokens_and_activity(
    client: TestClient, seeded: SeededDatabase
) -> None:
    response = client.get("/")
    assert response.status_code == 200
    listed = conversation_ids_listed(response.text)
    # The repository API's order: newest first by (created_at, id).
    with get_store(seeded.url).read() as repos:
        newest = repos.conversations.list_all(limit=PAGE_SIZE).conversations
    assert listed == [conversation.id for conversation in newest]
    assert listed[0] == LONG_CONVERSATION  # written last
    weather = client.get("/", params={"user": "alice"}).text
    row = re.search(r"<tr>\s*<td class=\"id\">.*?</tr>", weather, re.S)
    assert row is not None
    cells = [
        html.unescape(re.sub(r"<[^>]+>", "", cell)).strip()
        for cell in re.findall(r"<td[^>]*>(.*?)</td>", row.group(0), re.S)
    ]
    assert cells[:4] == [WEATHER_CONVERSATION, "alice", "4", "310"]
    assert cells[4].endswith("UTC") and cells[5].endswith("UTC")


def test_conversation_list_pages_by_keyset_with_every_conversation_once(
    client: TestClient,
) -> None:
    first = client.get("/", params={"user": BULK_USER}).text
    second_link = next_page_link(first)
    assert second_link is not None and "after=" in second_link and "user=carol" in second_link
    second = client.get(second_link).text
    assert next_page_link(second) is None
    seen = conversation_ids_listed(first) + conversation_ids_listed(second)
    assert len(seen) == len(set(seen)) == BULK_CONVERSATIONS
    assert seen == sorted(seen, reverse=True)  # newest first, across the page boundary


def test_conversation_list_filters_by_creation_date(client: TestClient) -> None:
    today = datetime.now(timezone.utc).date()
    tomorrow, yesterday = today + timedelta(days=1), today - timedelta(days=1)
    assert (
        len(conversation_ids_listed(client.get("/", params={"from": str(today)}).text)) == PAGE_SIZE
    )
    assert conversation_ids_listed(client.get("/", params={"from": str(tomorrow)}).text) == []
    assert conversation_ids_listed(client.get("/", params={"to": str(yesterday)}).text) == []
    both = client.get("/", params={"user": "bob", "from": str(yesterday), "to": str(today)})
    assert conversation_ids_listed(both.text) == [IMAGE_CONVERSATION]
    assert "No conversation matches this filter" in client.get("/", params={"user": "nobody"}).text


@pytest.mark.parametrize(
    ("query", "named"),
    [({"after": "not-a-cursor"}, "after"), ({"from": "30/11/2026"}, "from"), ({"to": "x"}, "to")],
)
def test_a_bad_list_parameter_is_a_400_naming_it(
    client: TestClient, query: dict[str, str], named: str
) -> None:
    response = client.get("/", params=query)
    assert response.status_code == 400
    assert named in html.unescape(response.text)


def test_conversation_page_reads_as_a_transcript_with_tool_calls_folded(
    client: TestClient,
) -> None:
    response = client.get("/conversation", params={"id": WEATHER_CONVERSATION})
    assert response.status_code == 200
    page = html.unescape(response.text)
    order = [
        page.index("What's the weather in Paris?"),
        page.index('<code class="tool-name">get_weather</code>'),
        page.index('"city": "Paris"'),  # the arguments, pretty-printed
        page.index("18°C and sunny in Paris</div>"),  # the output, inside the call's <details>
        page.index("It is 18°C and sunny in Paris."),
    ]
    assert order == sorted(order)
    tool = page[page.index('<article class="entry tool">') :]
    assert tool.index("<details>") < tool.index("<h3>Output</h3>") < tool.index("</details>")
    assert page.count('<article class="entry') == 3  # the output item joined its call
    usage = page[page.index("<h2>Usage by model</h2>") :]
    assert re.search(r"<td>gpt-4\.1</td><td class=\"number\">2</td>.*310</td>", usage)


def test_every_item_of_the_page_has_its_exact_stored_json_one_click_away(
    client: TestClient, seeded: SeededDatabase
) -> None:
    with get_store(seeded.url).read() as repos:
        stored = repos.connection.execute(
            select(messages_table.c.id, sql_cast(messages_table.c.item, Text))
            .where(messages_table.c.conversation_id == WEATHER_CONVERSATION)
            .order_by(messages_table.c.id)
        ).all()
    page = client.get("/conversation", params={"id": WEATHER_CONVERSATION}).text
    shown = {
        int(item_id): html.unescape(document)
        for item_id, document in re.findall(
            r'<pre id="item-(\d+)" class="json">(.*?)</pre>', page, re.S
        )
    }
    assert shown == {item_id: document for item_id, document in stored}
    assert page.count('<details class="raw">') == 3


def test_images_are_placeholders_and_reasoning_shows_its_summary(client: TestClient) -> None:
    page = html.unescape(client.get("/conversation", params={"id": IMAGE_CONVERSATION}).text)
    assert "What is in this picture?" in page
    assert re.search(r'<div class="placeholder">\[image \(image/png, \d+ KB inline\)\]</div>', page)
    assert "<img" not in page
    reasoning = page[page.index('<article class="entry reasoning">') :]
    assert "The picture shows a cat." in reasoning[: reasoning.index("</article>")]


def test_a_long_transcript_pages_by_item_id(client: TestClient) -> None:
    first = client.get("/conversation", params={"id": LONG_CONVERSATION}).text
    assert "line 0<" in first and f"line {TRANSCRIPT_PAGE_SIZE - 1}<" in first
    assert f"line {TRANSCRIPT_PAGE_SIZE}<" not in first
    later = next_page_link(first)
    assert later is not None
    second = client.get(later).text
    assert [
        f"line {n}" for n in range(TRANSCRIPT_PAGE_SIZE, LONG_CONVERSATION_ITEMS)
    ] == re.findall(r'<div class="text">(line \d+)</div>', second)
    assert "From the first item" in second


def test_an_id_full_of_url_syntax_links_to_its_own_page(client: TestClient) -> None:
    listing = client.get("/").text
    links = [
        html.unescape(link) for link in re.findall(r'<td class="id"><a href="([^"]*)"', listing)
    ]
    (link,) = [
        link for link in links if parse_qs(urlsplit(link).query)["id"] == [ODD_ID_CONVERSATION]
    ]
    page = client.get(link)
    assert page.status_code == 200
    assert html.escape(ODD_ID_CONVERSATION) in page.text
    assert "odd id" in page.text


def test_an_unknown_conversation_is_a_404(client: TestClient) -> None:
    assert client.get("/conversation", params={"id": "no-such"}).status_code == 404
    assert client.get("/export", params={"id": "no-such"}).status_code == 404
    assert client.get("/no-such-page").status_code == 404


def test_download_is_the_export_format_of_that_conversation(
    client: TestClient, tmp_path_factory: pytest.TempPathFactory
) -> None:
    response = client.get("/export", params={"id": WEATHER_CONVERSATION})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    assert 'filename="weather-run.jsonl"' in response.headers["content-disposition"]
    path = tmp_path_factory.mktemp("download") / "weather-run.jsonl"
    path.write_bytes(response.content)
    with ExportFile(path) as export:
        entries = list(export.entries())
    kinds = [type(entry).__name__ for entry in entries]
    assert kinds.count("ConversationLine") == 1
    assert kinds.count("MessageLine") == 4
    assert kinds.count("UsageLine") == 2


@pytest.mark.parametrize("window", sorted(WINDOWS))
def test_usage_page_draws_charts_and_shows_the_monitoring_numbers(
    client: TestClient, window: str
) -> None:
    response = client.get("/usage", params={"window": window})
    assert response.status_code == 200
    assert response.text.count("<svg") == 2
    page = html.unescape(response.text)
    titles = [
        html.unescape(title) for title in re.findall(r"<title>([^<]*)</title>", response.text)
    ]
    by_model: dict[str, int] = {}
    for model, value in re.findall(r"· (.+): ([\d,]+) tokens$", "\n".join(titles), re.M):
        by_model[model] = by_model.get(model, 0) + int(value.replace(",", ""))
    expected = {"gpt-4.1": 310, "gpt-4.1-mini": 940, "<svg onload=alert(1)>": 2}
    for model, day, tokens in history_usage():
        if timedelta(days=day) <= WINDOWS[window].length:
            expected[model] += tokens
    assert by_model == expected
    assert re.search(r"active conversations: \d+ conversations</title>", page)
    total = re.search(r'<span class="value">([\d,]+)</span><span class="name">conversations', page)
    assert total is not None and int(total.group(1).replace(",", "")) == BULK_CONVERSATIONS + 6
    assert "Top users by messages, all time" in page and ">carol</a>" in page
    assert "Token usage by model, all time" in page


def test_usage_rejects_an_unknown_window(client: TestClient) -> None:
    response = client.get("/usage", params={"window": "1y"})
    assert response.status_code == 400
    assert "window must be one of 24h, 7d, 30d" in html.unescape(response.text)


def test_the_stylesheet_and_icon_are_served_from_the_package(client: TestClient) -> None:
    assert client.get("/static/explorer.css").headers["content-type"].startswith("text/css")
    assert client.get("/static/favicon.svg").status_code == 200


def test_usage_numbers_are_reused_for_a_while_then_read_again(seeded: SeededDatabase) -> None:
    store = get_store(seeded.url)

    def total_tokens_shown(client: TestClient) -> int:
        page = client.get("/usage", params={"window": "24h"}).text
        found = re.search(r'<span class="value">([\d,]+)</span><span class="name">tokens', page)
        assert found is not None
        return int(found.group(1).replace(",", ""))

    reusing = TestClient(create_app(store, usage_max_age_s=3600), base_url=BASE_URL)
    reading = TestClient(create_app(store, usage_max_age_s=0), base_url=BASE_URL)
    before = total_tokens_shown(reusing)
    assert total_tokens_shown(reading) == before
    with store.transaction() as repos:
        repos.conversations.upsert("late-usage")
        repos.usage.record("late-usage", [UsageEntry(model="gpt-4.1", prompt_tokens=7)])
    try:
        assert total_tokens_shown(reusing) == before  # within its age: the same numbers
        assert total_tokens_shown(reading) == before + 7  # read again
    finally:
        with store.transaction() as repos:
            repos.conversations.delete("late-usage")
