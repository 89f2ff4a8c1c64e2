"""Real ``Runner`` runs, with the SDK's offline ``ScriptedModel``, on both backends."""

from __future__ import annotations

from typing import Any

from agents import Agent, RunConfig, Runner, function_tool
from agents.memory import SessionSettings
from agents.testing import ModelStep, ScriptedModel, assistant_message, function_call
from agents.usage import Usage

from agents_sessions import PostgreSQLSession


def texts_of(items: list[Any]) -> list[str]:
    """The text of each message item, in order (tool items as their type)."""
    out: list[str] = []
    for item in items:
        content = item.get("content")
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out.append("".join(part.get("text", "") for part in content))
        else:
            out.append(str(item.get("type")))
    return out


async def test_history_is_carried_across_turns(database_url: str, conversation_id: str) -> None:
    model = ScriptedModel([[assistant_message("Hi Ada!")], [assistant_message("You are Ada.")]])
    agent = Agent(name="assistant", model=model)
    session = PostgreSQLSession(conversation_id, database_url=database_url)

    first = await Runner.run(agent, "Hello, I am Ada", session=session)
    assert first.final_output == "Hi Ada!"
    second = await Runner.run(agent, "Who am I?", session=session)
    assert second.final_output == "You are Ada."

    # The second model call saw the whole first turn, read back from the database.
    assert model.last_call is not None
    assert texts_of(model.last_call.input) == [
        "Hello, I am Ada",
        "Hi Ada!",
        "Who am I?",
    ]
    stored = await session.get_items()
    assert texts_of(stored) == ["Hello, I am Ada", "Hi Ada!", "Who am I?", "You are Ada."]


async def test_tool_calls_are_stored_and_replayed(database_url: str, conversation_id: str) -> None:
    @function_tool
    def get_weather(city: str) -> str:
        """Weather for a city."""
        return f"sunny in {city}"

    model = ScriptedModel(
        [
            [function_call("get_weather", {"city": "Paris"}, call_id="call_1")],
            [assistant_message("It is sunny in Paris.")],
            [assistant_message("You asked about Paris.")],
        ]
    )
    agent = Agent(name="assistant", model=model, tools=[get_weather])
    session = PostgreSQLSession(conversation_id, database_url=database_url)

    result = await Runner.run(agent, "Weather in Paris?", session=session)
    assert result.final_output == "It is sunny in Paris."
    stored = await session.get_items()
    kinds = [item.get("type", "message") for item in stored]
    assert kinds == ["message", "function_call", "function_call_output", "message"]
    call, output = stored[1], stored[2]
    assert call["call_id"] == output["call_id"] == "call_1"
    assert output["output"] == "sunny in Paris"

    await Runner.run(agent, "What did I ask?", session=session)
    assert model.last_call is not None
    replayed = model.last_call.input
    assert [item.get("type", "message") for item in replayed] == [
        "message",
        "function_call",
        "function_call_output",
        "message",
        "message",
    ]
    assert replayed[:4] == stored


async def test_run_config_session_limit_bounds_the_history_sent(
    database_url: str, conversation_id: str
) -> None:
    model = ScriptedModel([[assistant_message(f"answer {n}")] for n in range(3)])
    agent = Agent(name="assistant", model=model)
    session = PostgreSQLSession(conversation_id, database_url=database_url)
    for n in range(2):
        await Runner.run(agent, f"question {n}", session=session)

    config = RunConfig(session_settings=SessionSettings(limit=2))
    await Runner.run(agent, "question 2", session=session, run_config=config)
    assert model.last_call is not None
    # Two items of history plus the new input; everything is still stored.
    assert texts_of(model.last_call.input) == ["question 1", "answer 1", "question 2"]
    assert len(await session.get_items()) == 6


async def test_session_settings_limit_bounds_the_history_sent(
    database_url: str, conversation_id: str
) -> None:
    model = ScriptedModel([[assistant_message("a")], [assistant_message("b")]])
    agent = Agent(name="assistant", model=model)
    session = PostgreSQLSession(
        conversation_id, database_url=database_url, session_settings=SessionSettings(limit=1)
    )
    await Runner.run(agent, "first", session=session)
    await Runner.run(agent, "second", session=session)
    assert model.last_call is not None
    assert texts_of(model.last_call.input) == ["a", "second"]


async def test_streamed_runs_store_their_items(database_url: str, conversation_id: str) -> None:
    model = ScriptedModel([[assistant_message("streamed reply")]])
    agent = Agent(name="assistant", model=model)
    session = PostgreSQLSession(conversation_id, database_url=database_url)
    result = Runner.run_streamed(agent, "stream please", session=session)
    async for _event in result.stream_events():
        pass
    assert result.final_output == "streamed reply"
    assert texts_of(await session.get_items()) == ["stream please", "streamed reply"]


def test_run_sync_works(database_url: str, conversation_id: str) -> None:
    model = ScriptedModel([[assistant_message("one")], [assistant_message("two")]])
    agent = Agent(name="assistant", model=model)
    session = PostgreSQLSession(conversation_id, database_url=database_url)
    Runner.run_sync(agent, "first", session=session)
    result = Runner.run_sync(agent, "second", session=session)
    assert result.final_output == "two"
    assert model.last_call is not None
    assert texts_of(model.last_call.input) == ["first", "one", "second"]


async def test_usage_is_recorded_per_request_automatically_and_only_once(
    database_url: str, conversation_id: str
) -> None:
    @function_tool
    def lookup(key: str) -> str:
        """Look something up."""
        return key.upper()

    model = ScriptedModel(
        [
            ModelStep(
                output=[function_call("lookup", {"key": "x"}, call_id="c1")],
                usage=Usage(requests=1, input_tokens=100, output_tokens=20, total_tokens=120),
                response_id="resp-1",
            ),
            ModelStep(
                output=[assistant_message("X")],
                usage=Usage(requests=1, input_tokens=150, output_tokens=5, total_tokens=155),
                response_id="resp-2",
            ),
        ]
    )
    agent = Agent(name="assistant", model=model, tools=[lookup])
    session = PostgreSQLSession(conversation_id, database_url=database_url, user_id="usage-user")
    result = await Runner.run(agent, "look up x", session=session)

    def totals() -> tuple[int, int, int, int]:
        with session.store.read() as repos:
            found = repos.usage.totals_for_conversation(conversation_id)
        return (found.requests, found.prompt_tokens, found.completion_tokens, found.total_tokens)

    # Recorded while the run appended its items, without a call from the application.
    assert totals() == (2, 250, 25, 275)
    # Explicit recording afterwards names the model and counts nothing twice.
    assert await session.record_usage(result, model="gpt-test") == 0
    assert await session.record_usage(result, model="gpt-test", per_request=False) == 0
    await session.store_run_usage(result)
    assert totals() == (2, 250, 25, 275)
    with session.store.read() as repos:
        conversation = repos.conversations.get(conversation_id)
        from sqlalchemy import text

        models = repos.connection.execute(
            text("SELECT DISTINCT model FROM usage_logs WHERE conversation_id = :c"),
            {"c": conversation_id},
        ).scalars()
        assert list(models) == ["gpt-test"]
    assert conversation is not None and conversation.user_id == "usage-user"


async def test_usage_model_defaults_to_the_agents_model(
    database_url: str, conversation_id: str
) -> None:
    model = ScriptedModel(
        [ModelStep(output=[assistant_message("ok")], usage=Usage(requests=1, input_tokens=3))]
    )
    agent = Agent(name="assistant", model=model)
    session = PostgreSQLSession(conversation_id, database_url=database_url)
    result = await Runner.run(agent, "hi", session=session)
    await session.record_usage(result)
    with session.store.engine.connect() as connection:
        from sqlalchemy import text

        models = connection.execute(
            text("SELECT model FROM usage_logs WHERE conversation_id = :c"), {"c": conversation_id}
        ).scalars()
        assert list(models) == ["ScriptedModel"]
