"""The explorer's safety rules: stored text is only ever text, tokens, headers, no secrets.

Against the real app on the seeded databases (both backends); the read-only rules
against real roles and connections.
"""

from __future__ import annotations

import hmac
import secrets
import uuid
from html.parser import HTMLParser

import pytest
from sqlalchemy import create_engine, insert, text
from sqlalchemy.engine import make_url
from starlette.testclient import TestClient

from agents_sessions import ConfigurationError, dispose_all, get_store
from agents_sessions.db.models import conversations_table
from agents_sessions.errors import DatabaseError
from agents_sessions.ui import ExplorerAccess, create_app
from agents_sessions.ui.reading import read_only
from agents_sessions.ui.security import CONTENT_SECURITY_POLICY, TOKEN_COOKIE
from tests.ui.conftest import BASE_URL
from tests.ui.seed import (
    HOSTILE_CONVERSATION,
    HOSTILE_MODEL,
    HOSTILE_TEXT,
    HOSTILE_USER,
    WEATHER_CONVERSATION,
    SeededDatabase,
)

TOKEN = "explorer-token-" + "x" * 24

#: Markup the seed stored in ids, user ids, messages, tool names, metadata and models.
STORED_MARKUP = (
    "<script>alert(",
    "<b>mallory</b>",
    "<img src=x onerror",
    "<i>tool</i>",
    "</pre><script>",
    "<svg onload",
)


class _TagCollector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.handlers: set[str] = set()
        self.text: list[str] = []

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.handlers.update(name for name, _ in attrs if name.startswith("on"))


def tags_and_event_handlers(page: str) -> tuple[set[str], set[str]]:
    """The element names of ``page`` as a browser parses it, and any ``on*`` attributes."""
    collector = _TagCollector()
    collector.feed(page)
    return collector.tags, collector.handlers


def visible_text(page: str) -> str:
    """The text of ``page`` as a reader sees it (entities decoded)."""
    collector = _TagCollector()
    collector.feed(page)
    return "".join(collector.text)


def pages_showing_stored_text(client: TestClient) -> dict[str, str]:
    return {
        "list": client.get("/").text,
        "list by user": client.get("/", params={"user": HOSTILE_USER}).text,
        "conversation": client.get("/conversation", params={"id": HOSTILE_CONVERSATION}).text,
        "usage": client.get("/usage").text,
        "error": client.get("/", params={"user": "<script>" + "x" * 300}).text,
    }


def test_stored_markup_is_shown_as_text_on_every_page(client: TestClient) -> None:
    for name, page in pages_showing_stored_text(client).items():
        for markup in STORED_MARKUP:
            assert markup not in page, f"{markup!r} reached the {name} page as markup"
        tags, handlers = tags_and_event_handlers(page)
        assert not tags & {"script", "img", "iframe", "object", "embed", "b", "i"}, name
        assert not handlers, name
    conversation = visible_text(pages_showing_stored_text(client)["conversation"])
    for stored in (HOSTILE_TEXT, HOSTILE_USER, HOSTILE_MODEL, HOSTILE_CONVERSATION):
        assert stored in conversation  # shown, as text


def test_every_response_carries_the_security_headers(client: TestClient) -> None:
    responses = [
        client.get("/"),
        client.get("/conversation", params={"id": WEATHER_CONVERSATION}),
        client.get("/export", params={"id": WEATHER_CONVERSATION}),
        client.get("/usage"),
        client.get("/static/explorer.css"),
        client.get("/conversation", params={"id": "missing"}),  # 404
        client.get("/", params={"after": "garbage"}),  # 400
        client.get("/", headers={"host": "attacker.example"}),  # refused
    ]
    for response in responses:
        headers = response.headers
        assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY, response.url
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"
        assert headers["cache-control"] == "no-store"
        assert headers["referrer-policy"] == "no-referrer"
    policy = dict(
        directive.strip().split(" ", 1) for directive in CONTENT_SECURITY_POLICY.split(";")
    )
    assert policy["default-src"] == "'none'"  # so no script-src: no script runs at all
    assert "script-src" not in policy
    assert policy["frame-ancestors"] == "'none'"
    assert "unsafe-inline" not in CONTENT_SECURITY_POLICY


def test_a_loopback_explorer_answers_only_to_loopback_host_names(client: TestClient) -> None:
    # DNS rebinding: a page on attacker.example resolving to 127.0.0.1 is refused.
    assert client.get("/", headers={"host": "attacker.example"}).status_code == 400
    assert client.get("/", headers={"host": "attacker.example:8765"}).status_code == 400
    for host in ("localhost:8765", "127.0.0.1:8765", "[::1]:8765", "localhost"):
        assert client.get("/", headers={"host": host}).status_code == 200, host


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "::", "example.com", ""])
def test_listening_beyond_loopback_without_a_token_refuses_to_start(host: str) -> None:
    with pytest.raises(ConfigurationError, match="without a token"):
        ExplorerAccess.for_bind(host, None)
    assert ExplorerAccess.for_bind(host, TOKEN).token == TOKEN


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_needs_no_token(host: str) -> None:
    assert ExplorerAccess.for_bind(host, None).token is None


@pytest.mark.parametrize("token", ["short", "with space " + "x" * 20, "semi;colon" + "x" * 20])
def test_a_weak_or_unsendable_token_is_refused(token: str) -> None:
    with pytest.raises(ConfigurationError, match="token"):
        ExplorerAccess.for_bind("0.0.0.0", token)


def test_with_a_token_every_request_must_present_it(
    seeded: SeededDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    comparisons: list[tuple[bytes, bytes]] = []
    real_compare = hmac.compare_digest

    def recording_compare(a: bytes, b: bytes) -> bool:
        comparisons.append((a, b))
        return real_compare(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording_compare)
    app = create_app(get_store(seeded.url), ExplorerAccess.for_bind("0.0.0.0", TOKEN))
    with TestClient(app, base_url="http://explorer.internal:8765") as client:
        assert client.get("/").status_code == 401
        assert client.get("/usage", headers={"authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/", params={"token": "wrong-" + TOKEN}).status_code == 401
        assert client.get("/static/explorer.css").status_code == 401
        assert client.get("/usage", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200

        # A browser: the token once in the address, then a cookie; the address is cleaned.
        visit = client.get("/", params={"token": TOKEN, "user": "alice"}, follow_redirects=False)
        assert visit.status_code == 303
        assert visit.headers["location"] == "/?user=alice"
        cookie = visit.headers["set-cookie"]
        assert cookie.startswith(f"{TOKEN_COOKIE}=") and "HttpOnly" in cookie
        assert "SameSite=Strict" in cookie
        assert client.get("/?user=alice").status_code == 200  # the client kept the cookie
        elsewhere = client.get(
            "http://explorer.internal:8765//attacker.example/",
            params={"token": TOKEN},
            follow_redirects=False,
        )
        assert elsewhere.headers["location"] == "/attacker.example/"  # never off-site
        client.cookies.clear()
        assert client.get("/").status_code == 401
    assert comparisons and all(b == TOKEN.encode() for _, b in comparisons)


def test_no_page_shows_the_database_url_or_its_password(
    seeded: SeededDatabase, tmp_path_factory: pytest.TempPathFactory
) -> None:
    password = "hunter2-" + secrets.token_hex(4)
    url = make_url(seeded.url)
    if url.get_backend_name() == "postgresql":
        # Trust authentication ignores the password; the URL still carries it.
        url = url.set(password=password)
    with_password = url.render_as_string(hide_password=False)
    app = create_app(get_store(with_password))
    with TestClient(app, base_url=BASE_URL) as client:
        pages = [
            client.get("/").text,
            client.get("/conversation", params={"id": WEATHER_CONVERSATION}).text,
            client.get("/usage").text,
            client.get("/conversation", params={"id": "missing"}).text,
        ]
    secrets_of_url = [password, str(url.database)]
    if url.host:
        secrets_of_url.append(f"{url.host}:{url.port or 5432}")
    for page in pages:
        for secret in secrets_of_url:
            assert secret not in page

    # A database that cannot be reached: the error page names no address either.
    unreachable = f"postgresql://explorer:{password}@127.0.0.1:1/nowhere?connect_timeout=2"
    with TestClient(create_app(get_store(unreachable)), base_url=BASE_URL) as client:
        response = client.get("/")
    assert response.status_code == 503
    for secret in (password, "127.0.0.1:1", "nowhere", "explorer:"):
        assert secret not in response.text


def test_the_reading_transaction_refuses_writes(seeded: SeededDatabase) -> None:
    store = get_store(seeded.url)
    with pytest.raises(DatabaseError), read_only(store) as connection:
        connection.execute(insert(conversations_table).values(id="written-by-the-explorer"))
    with store.read() as repos:  # nothing was written, and the pooled connection still writes
        assert repos.conversations.get("written-by-the-explorer") is None
    with store.transaction() as repos:
        repos.conversations.upsert("ui-write-check")
        repos.conversations.delete("ui-write-check")


@pytest.mark.postgres_only
@pytest.mark.parametrize("seeded", ["postgresql"], indirect=True)
def test_every_page_works_for_a_role_that_may_only_select(seeded: SeededDatabase) -> None:
    role = f"explorer_reader_{uuid.uuid4().hex[:8]}"
    database = make_url(seeded.url).database
    admin = create_engine(seeded.url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE ROLE "{role}" LOGIN'))
            connection.execute(text(f'GRANT CONNECT ON DATABASE "{database}" TO "{role}"'))
            connection.execute(text(f'GRANT USAGE ON SCHEMA public TO "{role}"'))
            # SELECT and nothing else, on every table the schema has (the export
            # reads paused runs too; branches and append keys are read by pages).
            connection.execute(text(f'GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{role}"'))
        reader_url = make_url(seeded.url).set(username=role).render_as_string(hide_password=False)
        with TestClient(create_app(get_store(reader_url)), base_url=BASE_URL) as client:
            for path, params in [
                ("/", {}),
                ("/", {"user": "carol"}),
                ("/conversation", {"id": WEATHER_CONVERSATION}),
                ("/export", {"id": WEATHER_CONVERSATION}),
                ("/usage", {"window": "30d"}),
            ]:
                response = client.get(path, params=params)
                assert response.status_code == 200, (path, response.text[-500:])
    finally:
        dispose_all()  # pooled connections log in as the role
        with admin.connect() as connection:
            connection.execute(text(f'DROP OWNED BY "{role}"'))
            connection.execute(text(f'DROP ROLE "{role}"'))
        admin.dispose()
