"""Stored items as a person reads them: messages, tool calls with their outputs, reasoning.

Agent items come in many shapes (see the Responses API's input items): this module
maps each to an :class:`Entry` the transcript template shows. It never drops an
item: one of an unknown shape becomes an ``other`` entry, and every entry carries
the exact stored JSON of the items it shows (:attr:`Entry.documents`).

A tool call and its output are written as two items; when both are on the page the
output is folded into the call's entry (matched by ``call_id``), so the transcript
reads "called X with these arguments, got this back".

Images and files are never fetched or embedded: they become placeholders naming
what they were (a URL, a file id, an inline data URL's size). Everything here is
plain text; the templates escape it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .queries import StoredDocument

#: Longest text shown in a tool call's one-line summary.
SUMMARY_LENGTH = 120


@dataclass(frozen=True)
class Part:
    """One piece of an item's content.

    Attributes:
        kind: ``text``, ``refusal``, ``image``, ``file``, ``audio`` or ``other``.
        text: The text, or for a placeholder what it stands for.
    """

    kind: str
    text: str


@dataclass(frozen=True)
class RawDocument:
    """An item's stored JSON text, with its row id (the anchor the page links to)."""

    id: int
    document: str


@dataclass
class Entry:
    """One block of the transcript.

    Attributes:
        kind: ``message``, ``tool``, ``reasoning`` or ``other``.
        label: What the block is (a role, a tool name, an item type).
        role: The message's role (``user``, ``assistant``, ``system``, ...), else ``None``.
        parts: A message's content, a reasoning item's summaries.
        arguments: A tool call's arguments (pretty-printed when they are JSON).
        output: A tool call's output, once its output item was seen.
        call_id: A tool call's id, to match its output.
        status: The item's ``status`` when it has one (``completed``, ``incomplete``, ...).
        documents: The exact stored JSON of every item shown in this entry.
    """

    kind: str
    label: str
    created_at: datetime
    role: str | None = None
    parts: list[Part] = field(default_factory=list)
    arguments: str | None = None
    output: list[Part] | None = None
    call_id: str | None = None
    status: str | None = None
    documents: list[RawDocument] = field(default_factory=list)

    @property
    def summary(self) -> str:
        """A one-line preview of a tool call (its arguments, shortened)."""
        text = " ".join((self.arguments or "").split())
        return text if len(text) <= SUMMARY_LENGTH else text[: SUMMARY_LENGTH - 1] + "…"


def _pretty(value: Any) -> str:
    """A tool call's arguments or payload: JSON text re-indented, other text as it is."""
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            return value
        if not isinstance(parsed, dict | list):
            return value
        value = parsed
    return json.dumps(value, indent=2, ensure_ascii=False)


def _size(text: str) -> str:
    count = len(text.encode("utf-8", "surrogatepass"))
    return f"{count / 1024:.0f} KB" if count >= 1024 else f"{count} bytes"


def _image_placeholder(part: Mapping[str, Any]) -> Part:
    url = part.get("image_url") or part.get("url")
    if isinstance(url, Mapping):  # the chat-completions shape: {"url": ...}
        url = url.get("url")
    if isinstance(url, str) and url.startswith("data:"):
        media_type = url[5:].split(";", 1)[0] or "data"
        return Part("image", f"image ({media_type}, {_size(url)} inline)")
    if isinstance(url, str) and url:
        return Part("image", f"image at {url}")
    if part.get("file_id"):
        return Part("image", f"image file {part['file_id']}")
    return Part("image", "image")


def _file_placeholder(part: Mapping[str, Any]) -> Part:
    name = part.get("filename") or part.get("file_id") or part.get("file_url") or ""
    data = part.get("file_data")
    size = f", {_size(data)} inline" if isinstance(data, str) and data else ""
    return Part("file", f"file {name}{size}".strip())


def content_parts(content: Any) -> list[Part]:
    """A message's (or a tool output's) content as parts, images and files as placeholders."""
    if content is None:
        return []
    if isinstance(content, str):
        return [Part("text", content)]
    if not isinstance(content, Sequence):
        return [Part("other", json.dumps(content, ensure_ascii=False))]
    parts = []
    for part in content:
        if isinstance(part, str):
            parts.append(Part("text", part))
            continue
        if not isinstance(part, Mapping):
            parts.append(Part("other", json.dumps(part, ensure_ascii=False)))
            continue
        kind = str(part.get("type", ""))
        if kind in ("input_text", "output_text", "text", "summary_text", "reasoning_text"):
            parts.append(Part("text", str(part.get("text", ""))))
        elif kind == "refusal":
            parts.append(Part("refusal", str(part.get("refusal", ""))))
        elif kind in ("input_image", "image_url", "image", "computer_screenshot"):
            parts.append(_image_placeholder(part))
        elif kind in ("input_file", "file"):
            parts.append(_file_placeholder(part))
        elif kind in ("input_audio", "output_audio", "audio"):
            parts.append(Part("audio", "audio"))
        else:
            parts.append(Part("other", json.dumps(part, ensure_ascii=False)))
    return parts


def _tool_name(item: Mapping[str, Any], kind: str) -> str:
    name = item.get("name")
    if isinstance(name, str) and name:
        server = item.get("server_label")
        return f"{server}.{name}" if isinstance(server, str) and server else name
    return kind.removesuffix("_call") or kind


# Fields of a tool call that are its bookkeeping, not its arguments.
_CALL_BOOKKEEPING = {"type", "id", "call_id", "status", "name", "server_label"}


def _call_arguments(item: Mapping[str, Any]) -> str:
    for key in ("arguments", "input", "action", "code", "query"):
        if key in item:
            return _pretty(item[key])
    rest = {key: value for key, value in item.items() if key not in _CALL_BOOKKEEPING}
    return _pretty(rest) if rest else ""


def _output_parts(item: Mapping[str, Any]) -> list[Part]:
    if "output" in item:
        output = item["output"]
        if isinstance(output, str):
            return [Part("text", _pretty(output))]
        if isinstance(output, Mapping):
            if output.get("type") in ("input_image", "computer_screenshot"):
                return [_image_placeholder(output)]
            return [Part("text", _pretty(output))]
        return content_parts(output)
    if item.get("type") == "image_generation_call" and item.get("result"):
        return [Part("image", f"generated image ({_size(str(item['result']))} inline)")]
    return []


def _entry(item: Any, stored: StoredDocument) -> Entry:
    raw = [RawDocument(stored.id, stored.document)]
    if not isinstance(item, Mapping):
        return Entry("other", "item", stored.created_at, documents=raw)
    kind = str(item.get("type") or "")
    status = item.get("status") if isinstance(item.get("status"), str) else None
    role = item.get("role")
    if isinstance(role, str) and kind in ("", "message"):
        return Entry(
            "message",
            role,
            stored.created_at,
            role=role,
            parts=content_parts(item.get("content")),
            status=status,
            documents=raw,
        )
    if kind == "reasoning":
        parts = content_parts(item.get("summary"))
        if not parts and item.get("encrypted_content"):
            parts = [Part("other", "encrypted reasoning (no summary stored)")]
        return Entry("reasoning", "reasoning", stored.created_at, parts=parts, documents=raw)
    if kind.endswith("_call_output"):
        # An output whose call is not on this page: shown on its own.
        return Entry(
            "tool",
            kind.removesuffix("_call_output") + " output",
            stored.created_at,
            output=_output_parts(item),
            call_id=_text_or_none(item.get("call_id")),
            status=status,
            documents=raw,
        )
    if kind.endswith("_call") or kind in ("mcp_list_tools", "mcp_approval_request"):
        entry = Entry(
            "tool",
            _tool_name(item, kind),
            stored.created_at,
            arguments=_call_arguments(item),
            call_id=_text_or_none(item.get("call_id")),
            status=status,
            documents=raw,
        )
        produced = _output_parts(item)  # hosted tools carry their result in the call
        if produced:
            entry.output = produced
        return entry
    return Entry("other", kind or "item", stored.created_at, status=status, documents=raw)


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def transcript(documents: Iterable[StoredDocument]) -> list[Entry]:
    """The entries of a page of stored items, in history order.

    An output item (``*_call_output``) whose call is already on the page is folded
    into the call's entry instead of becoming an entry of its own.
    """
    entries: list[Entry] = []
    open_calls: dict[str, Entry] = {}
    for stored in documents:
        try:
            item = json.loads(stored.document)
        except ValueError:  # not JSON after all: show it as stored
            item = None
        kind = item.get("type") if isinstance(item, Mapping) else None
        call_id = item.get("call_id") if isinstance(item, Mapping) else None
        if isinstance(kind, str) and kind.endswith("_call_output") and call_id in open_calls:
            call = open_calls.pop(call_id)
            call.output = _output_parts(item)
            call.documents.append(RawDocument(stored.id, stored.document))
            continue
        entry = _entry(item, stored)
        if entry.kind == "tool" and entry.call_id and entry.output is None:
            open_calls[entry.call_id] = entry
        entries.append(entry)
    return entries
