"""A small, known database for the explorer's tests: what each page must show.

One conversation is a real agent run (the SDK's ``Runner`` with its offline
``ScriptedModel``: a user question, a tool call and its output, the answer, usage
per request); the others hold what a hostile or unusual store can hold -- markup
in every field a page shows, an image, reasoning, an id full of URL syntax -- and
enough conversations of one user to need a second page, and a transcript longer
than a page. Conversations are written oldest to newest in the order of this module;
the last three (hostile, odd id, long) head the list.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from agents import Agent, Runner, function_tool
from agents.testing import ModelStep, ScriptedModel, assistant_message, function_call
from agents.usage import Usage
from sqlalchemy import Connection, insert

from agents_sessions import PostgreSQLSession, get_store
from agents_sessions.db.models import messages_table, usage_logs_table
from agents_sessions.repositories import UsageEntry
from agents_sessions.ui.queries import PAGE_SIZE, TRANSCRIPT_PAGE_SIZE

WEATHER_CONVERSATION = "weather-run"
IMAGE_CONVERSATION = "picture-question"
HOSTILE_CONVERSATION = "<script>alert('id')</script>"
ODD_ID_CONVERSATION = "odd/id?with=query#and %20 percent"
LONG_CONVERSATION = "long-transcript"
#: Items of LONG_CONVERSATION: more than one page of a transcript.
LONG_CONVERSATION_ITEMS = TRANSCRIPT_PAGE_SIZE + 3
HOSTILE_USER = "<b>mallory</b>"
HOSTILE_TEXT = "<script>alert('pwned')</script>"
HOSTILE_MODEL = "<svg onload=alert(1)>"
BULK_USER = "carol"
#: Conversations of BULK_USER: more than one page of the list.
BULK_CONVERSATIONS = PAGE_SIZE + 5


HISTORY_CONVERSATION = "daily-report"
#: Days back (1 = within the last 24 hours) of HISTORY_CONVERSATION's usage rows.
HISTORY_DAYS = range(1, 30)


def history_usage() -> list[tuple[str, int, int]]:
    """``(model, days back, total tokens)`` of the backdated usage rows."""
    rows = []
    for day in HISTORY_DAYS:
        rows.append(("gpt-4.1", day, 2_000 + 150 * (day % 7)))
        if day % 3 == 0:
            rows.append(("gpt-4.1-mini", day, 5_000 + 400 * (day % 5)))
    return rows


def stored_time(connection: Connection, moment: datetime) -> datetime:
    """A timestamp as the backend stores it (SQLite: naive UTC)."""
    return moment.replace(tzinfo=None) if connection.dialect.name == "sqlite" else moment


@dataclass(frozen=True)
class SeededDatabase:
    """The seeded database's URL and what a test can check against."""

    url: str


@function_tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"18°C and sunny in {city}"


async def seed(url: str) -> SeededDatabase:
    """Write the explorer's test conversations into the (migrated) database at ``url``."""
    model = ScriptedModel(
        [
            ModelStep(
                output=[function_call("get_weather", {"city": "Paris"}, call_id="call-weather")],
                usage=Usage(requests=1, input_tokens=120, output_tokens=18, total_tokens=138),
                response_id="resp-1",
            ),
            ModelStep(
                output=[assistant_message("It is 18°C and sunny in Paris.")],
                usage=Usage(requests=1, input_tokens=160, output_tokens=12, total_tokens=172),
                response_id="resp-2",
            ),
        ]
    )
    agent = Agent(name="forecaster", model=model, tools=[get_weather])
    session = PostgreSQLSession(WEATHER_CONVERSATION, database_url=url, user_id="alice")
    result = await Runner.run(agent, "What's the weather in Paris?", session=session)
    await session.record_usage(result, model="gpt-4.1")

    store = get_store(url)
    with store.transaction() as repos:
        repos.conversations.upsert(IMAGE_CONVERSATION, user_id="bob")
        repos.messages.append(
            IMAGE_CONVERSATION,
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "What is in this picture?"},
                        {
                            "type": "input_image",
                            "detail": "auto",
                            "image_url": "data:image/png;base64," + "iVBORw0KGgo" * 200,
                        },
                    ],
                },
                {
                    "id": "rs_1",
                    "type": "reasoning",
                    "summary": [{"type": "summary_text", "text": "The picture shows a cat."}],
                },
                {
                    "id": "msg_1",
                    "type": "message",
                    "role": "assistant",
                    "status": "completed",
                    "content": [
                        {"type": "output_text", "text": "A cat.", "annotations": [], "logprobs": []}
                    ],
                },
            ],
        )
        repos.usage.record(
            IMAGE_CONVERSATION,
            [UsageEntry(model="gpt-4.1-mini", prompt_tokens=900, completion_tokens=40)],
        )
    with store.transaction() as repos:
        # A month of history, backdated (the repositories always write "now").
        repos.conversations.upsert(HISTORY_CONVERSATION, user_id="dave")
        now = datetime.now(timezone.utc)
        for model_name, day, tokens in history_usage():
            moment = now - timedelta(days=day) + timedelta(hours=1)
            repos.connection.execute(
                insert(usage_logs_table).values(
                    conversation_id=HISTORY_CONVERSATION,
                    model=model_name,
                    prompt_tokens=tokens - 100,
                    completion_tokens=100,
                    total_tokens=tokens,
                    timestamp=stored_time(repos.connection, moment),
                )
            )
            repos.connection.execute(
                insert(messages_table).values(
                    conversation_id=HISTORY_CONVERSATION,
                    role="user",
                    content=f"day {day}",
                    item=json.dumps({"role": "user", "content": f"day {day}"}),
                    created_at=stored_time(repos.connection, moment),
                )
            )
    # One transaction per conversation: PostgreSQL's now() is the transaction's start,
    # and the list's order (newest first) should be visible, not a tie.
    for number in range(BULK_CONVERSATIONS):
        conversation_id = f"bulk-{number:03d}"
        with store.transaction() as repos:
            repos.conversations.upsert(conversation_id, user_id=BULK_USER)
            repos.messages.append(conversation_id, [{"role": "user", "content": f"n{number}"}])
    with store.transaction() as repos:
        repos.conversations.upsert(
            HOSTILE_CONVERSATION,
            user_id=HOSTILE_USER,
            metadata={"note": "<img src=x onerror=alert(1)>"},
        )
        repos.messages.append(
            HOSTILE_CONVERSATION,
            [
                {"role": "user", "content": HOSTILE_TEXT},
                {
                    "type": "function_call",
                    "call_id": "c-x",
                    "name": "<i>tool</i>",
                    "arguments": '{"html": "</pre><script>alert(2)</script>"}',
                },
                {"type": "function_call_output", "call_id": "c-x", "output": HOSTILE_TEXT},
            ],
        )
        repos.usage.record(
            HOSTILE_CONVERSATION,
            [UsageEntry(model=HOSTILE_MODEL, prompt_tokens=1, completion_tokens=1)],
        )

    with store.transaction() as repos:
        repos.conversations.upsert(ODD_ID_CONVERSATION)
        repos.messages.append(ODD_ID_CONVERSATION, [{"role": "user", "content": "odd id"}])

    # Written last, and observably so: SQLite stores timestamps to the millisecond,
    # and two writes within one would tie (then the id decides the order).
    await asyncio.sleep(0.002)
    with store.transaction() as repos:
        repos.messages.append(
            LONG_CONVERSATION,
            [{"role": "user", "content": f"line {n}"} for n in range(LONG_CONVERSATION_ITEMS)],
        )
    return SeededDatabase(url=url)
