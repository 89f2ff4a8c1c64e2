"""A first agent conversation stored by agents_sessions.

Runs with zero configuration: no DATABASE_URL means the embedded SQLite file, and
no OPENAI_API_KEY means the SDK's offline ScriptedModel answers. Set either to use
the real thing:

    make demo
    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres make demo
    OPENAI_API_KEY=sk-... make demo

It runs a few turns (one with a tool call), then prints the stored history and the
token usage recorded for the conversation.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import uuid

from agents import Agent, Runner, function_tool, set_tracing_disabled
from agents.testing import ModelStep, ScriptedModel, assistant_message, function_call
from agents.usage import Usage

from agents_sessions import PostgreSQLSession, dispose_all, load_settings

QUESTIONS = [
    "Hi! I'm Ada and I'm planning a trip to Lisbon.",
    "What's the weather like there right now?",
    "Remind me: what's my name and where am I going?",
]


@function_tool
def get_weather(city: str) -> str:
    """Current weather for a city (a canned answer: this is a demo)."""
    return f"Sunny and 24°C in {city}."


def scripted_model() -> ScriptedModel:
    """Offline answers, with token usage, so the demo needs no API key."""

    def usage(prompt: int, completion: int) -> Usage:
        return Usage(
            requests=1,
            input_tokens=prompt,
            output_tokens=completion,
            total_tokens=prompt + completion,
        )

    return ScriptedModel(
        [
            ModelStep(
                output=[assistant_message("Nice to meet you, Ada! Lisbon is a great choice.")],
                usage=usage(42, 12),
            ),
            ModelStep(
                output=[function_call("get_weather", {"city": "Lisbon"}, call_id="call_weather")],
                usage=usage(80, 9),
            ),
            ModelStep(
                output=[assistant_message("It's sunny and 24°C in Lisbon right now.")],
                usage=usage(110, 14),
            ),
            ModelStep(
                output=[assistant_message("You're Ada, and you're going to Lisbon.")],
                usage=usage(150, 11),
            ),
        ]
    )


def describe(item: dict[str, object]) -> str:
    """One readable line per stored item."""
    kind = item.get("type", "message")
    if kind == "function_call":
        return f"[tool call]   {item['name']}({item['arguments']})"
    if kind == "function_call_output":
        return f"[tool result] {item['output']}"
    content = item.get("content")
    if isinstance(content, list):
        content = "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return f"[{item.get('role', kind)}] {content}"


async def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    settings = load_settings()
    print(f"Database: {settings.safe_database_url()}")

    real_model = bool(os.environ.get("OPENAI_API_KEY"))
    if not real_model:
        set_tracing_disabled(True)  # offline: nowhere to send traces
    model = "gpt-4.1-mini" if real_model else scripted_model()
    agent = Agent(
        name="Travel assistant",
        instructions="You are a concise travel assistant. Use tools when useful.",
        model=model,
        tools=[get_weather],
    )
    session = PostgreSQLSession(
        conversation_id=f"demo-{uuid.uuid4().hex[:8]}",
        user_id="ada",
        metadata={"channel": "demo", "model": "live" if real_model else "scripted"},
    )
    print(f"Conversation: {session.session_id}\n")

    for question in QUESTIONS:
        result = await Runner.run(agent, question, session=session)
        await session.record_usage(result)
        print(f"user      > {question}")
        print(f"assistant > {result.final_output}\n")

    print("Stored history:")
    for number, item in enumerate(await session.get_items(), start=1):
        print(f"  {number:2}. {describe(item)}")

    with session.store.read() as repos:
        totals = repos.usage.totals_for_conversation(session.session_id)
        conversation = repos.conversations.get(session.session_id)
    assert conversation is not None
    print(
        f"\nConversation owner: {conversation.user_id}, metadata: {conversation.metadata}"
        f"\nToken usage: {totals.requests} requests, {totals.prompt_tokens} prompt + "
        f"{totals.completion_tokens} completion = {totals.total_tokens} tokens"
    )
    dispose_all()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
