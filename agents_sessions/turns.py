"""Turns, tool calls and per-turn usage, derived from a branch's history.

A turn number is a position: turn *N* of a branch starts at the *N*-th user message of
its history, so the numbers need no storage and stay right when items are shared by
branches, popped or replaced. These functions shape the answers exactly as the SDK's
``AdvancedSQLiteSession`` does (same keys, same value types), from rows that the
repositories read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

from .repositories.branch_views import ViewRow, sdk_timestamp

# The SDK counts these message types as tool calls (get_tool_usage).
_TOOL_CALL_TYPES = frozenset(
    {
        "tool_call",
        "function_call",
        "computer_call",
        "file_search_call",
        "web_search_call",
        "code_interpreter_call",
        "tool_search_call",
        "custom_tool_call",
        "mcp_call",
        "mcp_approval_request",
        "shell_call",
        "apply_patch_call",
    }
)
_NAMELESS_TOOL_TYPES = frozenset(
    {
        "computer_call",
        "file_search_call",
        "web_search_call",
        "code_interpreter_call",
        "shell_call",
        "apply_patch_call",
        "tool_search_call",
        "tool_search_output",
    }
)


def is_user_message(item: Any) -> bool:
    """A user message, as the SDK counts turns: a dict with ``role == "user"``."""
    return isinstance(item, dict) and item.get("role") == "user"


def message_type(item: Any) -> str:
    """``user``, ``assistant``, the item's ``type``, or ``other``."""
    if isinstance(item, dict):
        if item.get("role") == "user":
            return "user"
        if item.get("role") == "assistant":
            return "assistant"
        if item.get("type"):
            return str(item.get("type"))
    return "other"


def tool_name(item: Any) -> str | None:
    """The tool an item calls (``server.tool`` for MCP, ``namespace.name`` when namespaced)."""
    if not isinstance(item, dict):
        return None
    kind = item.get("type")
    if kind in {"mcp_call", "mcp_approval_request"} and "server_label" in item:
        server, name = item.get("server_label"), item.get("name")
        if name and server:
            return f"{server}.{name}"
        if server:
            return str(server)
        return str(name) if name else None
    if kind in _NAMELESS_TOOL_TYPES:
        return "tool_search" if kind in {"tool_search_call", "tool_search_output"} else str(kind)
    if "name" in item:
        name, namespace = item.get("name"), item.get("namespace")
        if name is None:
            return None
        name = str(name)
        namespace = str(namespace) if namespace is not None else None
        if namespace and name and namespace != name:
            return f"{namespace}.{name}"
        return name
    return None


def _preview(content: Any, max_length: int | None = None) -> str:
    text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
    if max_length is not None and len(text) > max_length:
        return text[:max_length] + "..."
    return text


def numbered(view: Sequence[ViewRow]) -> list[tuple[int, ViewRow]]:
    """Each row with its turn number (0 before the first user message)."""
    turn = 0
    result = []
    for row in view:
        if is_user_message(row.item):
            turn += 1
        result.append((turn, row))
    return result


def turn_anchors(view: Sequence[ViewRow]) -> dict[int, int]:
    """The id of each turn's user message -> its turn number."""
    return {row.id: turn for turn, row in numbered(view) if is_user_message(row.item)}


def conversation_turns(view: Sequence[ViewRow]) -> list[dict[str, Any]]:
    """``get_conversation_turns()``: one dict per user turn."""
    turns = []
    for turn, row in numbered(view):
        if not is_user_message(row.item):
            continue
        content = row.item.get("content", "")
        turns.append(
            {
                "turn": turn,
                "content": _preview(content, 100),
                "full_content": content,
                "timestamp": sdk_timestamp(row.created_at),
                "can_branch": True,
            }
        )
    return turns


def turns_matching(view: Sequence[ViewRow], search_term: str) -> list[dict[str, Any]]:
    """``find_turns_by_content()``: user turns whose text contains ``search_term``.

    Case-insensitive for ASCII letters only, as SQLite's ``LIKE`` in the SDK.
    """
    pattern = re.compile(re.escape(search_term), re.IGNORECASE | re.ASCII)
    matches = []
    for turn, row in numbered(view):
        if not is_user_message(row.item):
            continue
        content = row.item.get("content", "")
        try:
            texts = (
                [content]
                if isinstance(content, str)
                else [part.get("text", "") for part in content]
            )
        except (AttributeError, TypeError):
            continue
        if not any(isinstance(text, str) and pattern.search(text) for text in texts):
            continue
        matches.append(
            {
                "turn": turn,
                "content": _preview(content),
                "full_content": content,
                "timestamp": sdk_timestamp(row.created_at),
                "can_branch": True,
            }
        )
    return matches


def conversation_by_turns(view: Sequence[ViewRow]) -> dict[int, list[dict[str, str | None]]]:
    """``get_conversation_by_turns()``: message types and tool names, per turn."""
    turns: dict[int, list[dict[str, str | None]]] = {}
    for turn, row in numbered(view):
        turns.setdefault(turn, []).append(
            {"type": message_type(row.item), "tool_name": tool_name(row.item)}
        )
    return turns


def tool_usage(view: Sequence[ViewRow]) -> list[tuple[str, int, int]]:
    """``get_tool_usage()``: (tool name, calls, turn), by turn."""
    counts: dict[tuple[Any, int], int] = {}
    rows = numbered(view)
    searched = {
        (turn, tool_name(row.item))
        for turn, row in rows
        if message_type(row.item) == "tool_search_call"
    }
    for turn, row in rows:
        kind = message_type(row.item)
        name = tool_name(row.item)
        if kind in _TOOL_CALL_TYPES:
            if name is None and kind in {"shell_call", "apply_patch_call"}:
                name = kind
        elif not (kind == "tool_search_output" and (turn, name) not in searched):
            continue
        counts[(name, turn)] = counts.get((name, turn), 0) + 1
    ordered = sorted(counts.items(), key=lambda entry: (entry[0][1], str(entry[0][0])))
    return [(name, count, turn) for (name, turn), count in ordered]


def _add_details(total: dict[str, Any] | None, details: Any) -> dict[str, Any] | None:
    if not isinstance(details, dict):
        return total
    total = dict(total or {})
    for key, value in details.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            total[key] = total.get(key, 0) + value
        else:
            total.setdefault(key, value)
    return total


def usage_by_turn(
    rows: Iterable[Any], branch_id: str, anchors: dict[int, int]
) -> dict[int, dict[str, Any]]:
    """Usage rows of one branch summed per turn (rows whose turn left the view are skipped)."""
    turns: dict[int, dict[str, Any]] = {}
    for row in rows:
        if row.branch_id != branch_id or row.turn_message_id not in anchors:
            continue
        turn = anchors[row.turn_message_id]
        entry = turns.setdefault(
            turn,
            {
                "requests": 0,
                "input_tokens": 0,
                "output_tokens": 0,
                "total_tokens": 0,
                "input_tokens_details": None,
                "output_tokens_details": None,
            },
        )
        entry["requests"] += int(row.requests)
        entry["input_tokens"] += int(row.prompt_tokens)
        entry["output_tokens"] += int(row.completion_tokens)
        entry["total_tokens"] += int(row.total_tokens)
        entry["input_tokens_details"] = _add_details(
            entry["input_tokens_details"], row.input_tokens_details
        )
        entry["output_tokens_details"] = _add_details(
            entry["output_tokens_details"], row.output_tokens_details
        )
    return dict(sorted(turns.items()))
