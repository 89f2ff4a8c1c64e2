"""The SDK's ``EncryptedSession`` wrapped around ``PostgreSQLSession``: encryption at rest.

``EncryptedSession`` (``agents.extensions.memory``, needs ``cryptography``) encrypts
each item into an envelope ``{"__enc__": 1, "v": 1, "kid": "hkdf-v1", "payload":
<Fernet token>}`` with a per-conversation key (HKDF of the master key, salted with the
session id) and hands the envelopes to our session. So what the database holds is
ciphertext: the envelope has no ``role`` and no ``type``, so the ``role`` column
reads ``"unknown"``, and it has no readable text, so ``content`` is empty. The
conversation row (``user_id``, ``metadata``) and ``usage_logs`` are *not* encrypted.
"""

from __future__ import annotations

from typing import Any

from agents import Agent, Runner
from agents.extensions.memory import EncryptedSession
from agents.testing import ScriptedModel, assistant_message
from cryptography.fernet import Fernet
from sqlalchemy import text

from agents_sessions import PostgreSQLSession

ENVELOPE_KEYS = ["__enc__", "v", "kid", "payload"]
SECRET_WORDS = ["Ultraviolet-Pelican", "Quasar-Marmalade", "Obsidian-Lantern"]

ITEMS: list[dict[str, Any]] = [
    {"role": "user", "content": f"my passphrase is {SECRET_WORDS[0]}"},
    {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [
            {"type": "output_text", "text": SECRET_WORDS[1], "annotations": [], "logprobs": []}
        ],
    },
    {
        "type": "function_call",
        "call_id": "call_1",
        "name": "lookup",
        "arguments": f'{{"q": "{SECRET_WORDS[2]}"}}',
        "id": "fc_1",
    },
    {"role": "user", "content": "unicode 世界 🚀, NUL \x00, big int", "n": 2**70, "f": -0.0},
]


def encrypted(session: PostgreSQLSession, key: str | None = None) -> EncryptedSession:
    """Our session behind the SDK's encryption wrapper."""
    return EncryptedSession(
        session_id=session.session_id,
        # The SDK annotates SessionABC but only uses the Session protocol, which
        # PostgreSQLSession implements structurally (as the SDK asks).
        underlying_session=session,  # type: ignore[arg-type]
        encryption_key=key or Fernet.generate_key().decode("ascii"),
        ttl=3600,
    )


def stored_rows(session: PostgreSQLSession) -> list[tuple[str, str, str]]:
    """``(role, content, item as text)`` of every row, straight from the table."""
    with session.store.read() as repos:
        rows = repos.connection.execute(
            text(
                "SELECT role, content, CAST(item AS TEXT) FROM messages "
                "WHERE conversation_id = :c ORDER BY id"
            ),
            {"c": session.session_id},
        ).all()
    return [(row[0], row[1], row[2]) for row in rows]


async def test_items_round_trip_through_the_encrypted_wrapper(
    database_url: str, conversation_id: str
) -> None:
    wrapper = encrypted(PostgreSQLSession(conversation_id, database_url=database_url))
    await wrapper.add_items(ITEMS)  # type: ignore[arg-type]

    stored = await wrapper.get_items()
    assert stored == ITEMS
    assert [list(item) for item in stored] == [list(item) for item in ITEMS]  # key order
    assert await wrapper.get_items(limit=2) == ITEMS[-2:]


async def test_the_database_holds_only_ciphertext(database_url: str, conversation_id: str) -> None:
    session = PostgreSQLSession(conversation_id, database_url=database_url)
    wrapper = encrypted(session)
    await wrapper.add_items(ITEMS)  # type: ignore[arg-type]

    rows = stored_rows(session)
    assert len(rows) == len(ITEMS)
    for role, content, document in rows:
        # The envelope has no role/type and no readable text.
        assert role == "unknown"
        assert content == ""
        for word in [*SECRET_WORDS, "passphrase", "lookup", "世界"]:
            assert word not in document
    # Our session sees (and returns) the envelopes, in order, one per item.
    envelopes = await session.get_items()
    assert [list(envelope) for envelope in envelopes] == [ENVELOPE_KEYS] * len(ITEMS)
    assert all(envelope["__enc__"] == 1 for envelope in envelopes)
    assert len({envelope["payload"] for envelope in envelopes}) == len(ITEMS)


async def test_another_key_reads_nothing_and_changes_nothing(
    database_url: str, conversation_id: str
) -> None:
    session = PostgreSQLSession(conversation_id, database_url=database_url)
    await encrypted(session).add_items(ITEMS)  # type: ignore[arg-type]

    assert await encrypted(session).get_items() == []  # a different random key
    assert len(stored_rows(session)) == len(ITEMS)


async def test_the_same_key_reads_the_history_from_a_new_session_object(
    database_url: str, conversation_id: str
) -> None:
    key = Fernet.generate_key().decode("ascii")
    first = encrypted(PostgreSQLSession(conversation_id, database_url=database_url), key)
    await first.add_items(ITEMS[:2])  # type: ignore[arg-type]

    # As after a restart: new objects, same conversation id and key.
    second = encrypted(PostgreSQLSession(conversation_id, database_url=database_url), key)
    assert await second.get_items() == ITEMS[:2]


async def test_pop_item_returns_the_newest_item_decrypted(
    database_url: str, conversation_id: str
) -> None:
    session = PostgreSQLSession(conversation_id, database_url=database_url)
    wrapper = encrypted(session)
    await wrapper.add_items(ITEMS)  # type: ignore[arg-type]

    assert await wrapper.pop_item() == ITEMS[-1]
    assert await wrapper.pop_item() == ITEMS[-2]
    assert len(stored_rows(session)) == len(ITEMS) - 2
    assert await wrapper.get_items() == ITEMS[:-2]

    await wrapper.clear_session()
    assert await wrapper.pop_item() is None
    assert stored_rows(session) == []


async def test_runner_turns_work_through_the_wrapper_and_store_ciphertext(
    database_url: str, conversation_id: str
) -> None:
    session = PostgreSQLSession(conversation_id, database_url=database_url, user_id="u-enc")
    wrapper = encrypted(session)
    model = ScriptedModel(
        [[assistant_message(f"Noted: {SECRET_WORDS[1]}")], [assistant_message("It was noted.")]]
    )
    agent = Agent(name="assistant", model=model)

    first = await Runner.run(agent, f"Remember {SECRET_WORDS[0]}", session=wrapper)
    await Runner.run(agent, "What did I ask you to remember?", session=wrapper)

    # The second model call got the first turn back, decrypted.
    assert model.last_call is not None
    replayed = str(model.last_call.input)
    assert SECRET_WORDS[0] in replayed and SECRET_WORDS[1] in replayed
    history = await wrapper.get_items()
    assert len(history) == 4
    assert history[0] == {"role": "user", "content": f"Remember {SECRET_WORDS[0]}"}

    rows = stored_rows(session)
    assert len(rows) == 4
    assert all(role == "unknown" and content == "" for role, content, _ in rows)
    assert not any(word in document for _, _, document in rows for word in SECRET_WORDS)

    # Our extra methods stay reachable through the wrapper (it forwards attributes),
    # and what they store is not encrypted: usage numbers and the conversation owner.
    # The Runner's context reached our session through the wrapper, so the run's
    # request was recorded as it happened; recording explicitly adds nothing.
    assert await wrapper.record_usage(first, model="scripted") == 0
    with session.store.read() as repos:
        record = repos.conversations.get(conversation_id)
        usage = repos.usage.totals_for_conversation(conversation_id)
    assert record is not None and record.user_id == "u-enc"
    assert usage.requests >= len(first.raw_responses)
