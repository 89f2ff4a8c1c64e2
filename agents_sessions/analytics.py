"""The seed's monitoring SQL, verbatim, and a helper that runs it.

These are the queries operators already have in their dashboards; the schema keeps
them valid (``conversations.updated_at``, ``messages.conversation_id``,
``usage_logs.model/prompt_tokens/completion_tokens``) and indexed. They are
PostgreSQL SQL (``NOW() - INTERVAL``); the repository API offers portable
equivalents (:class:`~agents_sessions.repositories.UsageRepository`).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, text

TOTAL_CONVERSATIONS = "SELECT COUNT(*) FROM conversations;"

ACTIVE_CONVERSATIONS_LAST_24_HOURS = (
    "SELECT COUNT(*) FROM conversations WHERE updated_at > NOW() - INTERVAL '24 hours';"
)

TOP_USERS_BY_MESSAGE_COUNT = """\
SELECT c.user_id, COUNT(m.id) as message_count
FROM conversations c
JOIN messages m ON c.id = m.conversation_id
GROUP BY c.user_id
ORDER BY message_count DESC
LIMIT 10;"""

TOKEN_USAGE_BY_MODEL = """\
SELECT model,
       SUM(prompt_tokens) as total_prompt_tokens,
       SUM(completion_tokens) as total_completion_tokens
FROM usage_logs
GROUP BY model;"""

SEED_QUERIES = {
    "total_conversations": TOTAL_CONVERSATIONS,
    "active_conversations_24h": ACTIVE_CONVERSATIONS_LAST_24_HOURS,
    "top_users_by_message_count": TOP_USERS_BY_MESSAGE_COUNT,
    "token_usage_by_model": TOKEN_USAGE_BY_MODEL,
}


def run_seed_queries(connection: Connection) -> dict[str, list[dict[str, Any]]]:
    """Run every seed query on a PostgreSQL connection; rows as dicts, by query name."""
    return {
        name: [dict(row._mapping) for row in connection.execute(text(sql))]
        for name, sql in SEED_QUERIES.items()
    }
