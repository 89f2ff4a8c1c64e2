"""Recall: full-text search over stored messages, on PostgreSQL and SQLite."""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents_sessions import (
    InvalidArgumentError,
    InvalidConversationIdError,
    PostgreSQLSession,
    get_store,
)
from agents_sessions.ops.retention import erase_user
from agents_sessions.ops.transfer.export import export_conversations
from agents_sessions.ops.transfer.format import ExportFile
from agents_sessions.ops.transfer.import_ import import_export
from agents_sessions.repositories.search import MAX_QUERY_LENGTH, fts5_match_expression


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, Any]:
    return {
        "id": f"msg_{uuid.uuid4().hex[:8]}",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def unique_word() -> str:
    """A word no other test stores (the databases are shared by the run's tests)."""
    return "zq" + uuid.uuid4().hex[:10]


def search(url: str, query: str, **options: Any) -> Any:
    with get_store(url).read() as repos:
        return repos.messages.search(query, **options)


async def test_search_finds_stemmed_words_and_phrases_with_highlighted_snippets(
    database_url: str,
) -> None:
    topic = unique_word()
    session = PostgreSQLSession(f"trip-{uuid.uuid4()}", database_url=database_url, user_id="ana")
    await session.add_items(
        [
            user(f"We decided to meet in Lisbon for the {topic} offsite"),
            assistant(f"Noted: the {topic} offsite is in Porto, not Lisbon."),
            user("Unrelated small talk"),
        ]
    )
    page = search(database_url, f"{topic} decide")
    assert [hit.role for hit in page.hits] == ["user"]
    hit = page.hits[0]
    assert hit.conversation_id == session.session_id
    assert "**decided**" in hit.snippet and f"**{topic}**" in hit.snippet
    assert hit.rank > 0 and hit.created_at.tzinfo is not None

    phrase = search(database_url, f'"{topic} offsite is in Porto"')
    assert [h.role for h in phrase.hits] == ["assistant"]
    # Both contain the topic: both found, ties broken newest first.
    both = search(database_url, topic)
    assert {h.message_id for h in both.hits} == {hit.message_id, phrase.hits[0].message_id}


async def test_equal_ranks_come_newest_first_and_pages_neither_repeat_nor_skip(
    database_url: str,
) -> None:
    topic = unique_word()
    session = PostgreSQLSession(f"pages-{uuid.uuid4()}", database_url=database_url)
    await session.add_items([user(f"note {topic} number {n}") for n in range(7)])
    seen: list[int] = []
    after = None
    while True:
        page = search(database_url, topic, limit=3, after=after)
        seen += [hit.message_id for hit in page.hits]
        if page.next_cursor is None:
            break
        after = page.next_cursor
    assert len(seen) == 7
    assert seen == sorted(seen, reverse=True)  # identical texts rank equal: newest first
    with pytest.raises(InvalidArgumentError, match="after"):
        search(database_url, topic, after="not-a-cursor")


async def test_search_narrows_by_user_conversation_and_age(database_url: str) -> None:
    topic = unique_word()
    ana = PostgreSQLSession(f"ana-{uuid.uuid4()}", database_url=database_url, user_id="ana")
    ana_other = PostgreSQLSession(f"ana2-{uuid.uuid4()}", database_url=database_url, user_id="ana")
    bo = PostgreSQLSession(f"bo-{uuid.uuid4()}", database_url=database_url, user_id="bo")
    for session in (ana, ana_other, bo):
        await session.add_items([user(f"{topic} from {session.session_id}")])

    def conversations(**options: Any) -> set[str]:
        return {hit.conversation_id for hit in search(database_url, topic, **options).hits}

    assert conversations() == {ana.session_id, ana_other.session_id, bo.session_id}
    assert conversations(user_id="ana") == {ana.session_id, ana_other.session_id}
    assert conversations(user_id="ana", conversation_id=bo.session_id) == set()
    assert conversations(conversation_id=bo.session_id) == {bo.session_id}
    now = datetime.now(timezone.utc)
    assert len(conversations(since=now - timedelta(hours=1))) == 3
    assert conversations(since=now + timedelta(hours=1)) == set()


async def test_the_index_follows_pops_clears_deletes_erasures_and_imports(
    database_url: str,
) -> None:
    topic = unique_word()
    session = PostgreSQLSession(f"sync-{uuid.uuid4()}", database_url=database_url, user_id=topic)
    await session.add_items([user(f"{topic} first"), user(f"{topic} second")])
    assert len(search(database_url, topic).hits) == 2

    await session.pop_item()
    assert [h.snippet for h in search(database_url, topic).hits] == [f"**{topic}** first"]

    await session.clear_session()
    assert search(database_url, topic).hits == []

    await session.add_items([user(f"{topic} third")])
    store = get_store(database_url)
    exported = io.BytesIO()
    export_conversations(store, exported, user_id=topic)
    with store.transaction() as repos:
        assert repos.conversations.delete(session.session_id)
    assert search(database_url, topic).hits == []

    exported.seek(0)
    import_export(store, ExportFile(exported))
    assert [h.snippet for h in search(database_url, topic).hits] == [f"**{topic}** third"]

    erase_user(store, topic)
    assert search(database_url, topic).hits == []


def test_queries_are_validated_before_any_sql(database_url: str) -> None:
    with pytest.raises(InvalidArgumentError, match="query"):
        search(database_url, "x" * (MAX_QUERY_LENGTH + 1))
    with pytest.raises(InvalidArgumentError, match="query"):
        search(database_url, 42)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="limit"):
        search(database_url, "x", limit=0)
    with pytest.raises(InvalidConversationIdError, match="user_id"):
        search(database_url, "x", user_id="")


# Everything a user might type, hostile or not: SQL, FTS5 and tsquery operators,
# quotes, NUL, control and astral characters.
OPERATOR_WORDS = [
    '"',
    "'",
    "(",
    ")",
    "*",
    ":",
    "^",
    "-",
    "+",
    "|",
    "&",
    "!",
    "<->",
    "NEAR",
    "AND",
    "OR",
    "NOT",
    "--",
    ";",
    "DROP TABLE messages",
    "\x00",
    "\\",
    "%",
    "_",
    "{",
    "}",
    "col:",
    "NEAR(",
    "')--",
    "\ud83d\ude00",
    "é",
    "\t",
    "\n",
]
OPERATOR_SOUP = st.sampled_from(OPERATOR_WORDS)
HOSTILE_QUERIES = st.lists(st.one_of(OPERATOR_SOUP, st.text(max_size=12)), max_size=8).map("".join)


@pytest.fixture
def hostile_search_url(fresh_database_url: Callable[[], str]) -> str:
    """A database of its own holding the operator soup as text.

    Not the run's shared database: what a query matches there, and so what it costs
    to rank, depends on the random items other tests stored (property tests store
    tens of megabytes of random text, and a one-character query matched so much of it
    that this test once took minutes).
    """
    url = fresh_database_url()
    session = PostgreSQLSession(f"hostile-{uuid.uuid4()}", database_url=url)
    # (Stored text has no NUL and no lone surrogates: PostgreSQL and UTF-8 refuse them.)
    soup = " ".join(word for word in OPERATOR_WORDS if word.isprintable())
    asyncio.run(session.add_items([user(soup), user(f"plain words around {soup} again")]))
    return url


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(query=HOSTILE_QUERIES)
def test_any_user_query_is_searched_as_text_never_as_sql(
    hostile_search_url: str, query: str
) -> None:
    # No error, whatever the text; every hit really matched.
    page = search(hostile_search_url, query, limit=5)
    assert len(page.hits) <= 5
    for hit in page.hits:
        assert isinstance(hit.snippet, str)


async def test_a_search_for_operators_finds_the_text_they_were_written_in(
    database_url: str,
) -> None:
    topic = unique_word()
    session = PostgreSQLSession(f"ops-{uuid.uuid4()}", database_url=database_url)
    await session.add_items([user(f"run {topic} OR NOT; DROP TABLE messages -- NEAR(x)")])
    page = search(database_url, f"{topic} DROP TABLE")
    assert [hit.conversation_id for hit in page.hits] == [session.session_id]
    assert search(database_url, f'"{topic}" NEAR(x')  # parentheses are text


def test_fts5_expressions_quote_every_term() -> None:
    assert fts5_match_expression('lisbon "meet in" NEAR(a') == '"lisbon" "meet in" "NEAR(a"'
    assert fts5_match_expression('say "hi') == '"say" "hi"'
    assert fts5_match_expression('a"b') == '"a""b"'
    assert fts5_match_expression("*** -- ;") is None
