"""Agent items in and out of the database: validation, lossless encoding, readable columns.

Every item is checked and serialized *before* any SQL runs, so a bad item in a
call means nothing of that call is written.

An item is stored three ways in one ``messages`` row:

* ``item`` -- the JSON document, the authoritative copy. It is compact JSON with
  non-ASCII text kept as UTF-8; only an item holding a lone surrogate (which no
  UTF-8 column can store raw) is written with ``\\u`` escapes instead. Either way
  ``json.loads`` gives back a value equal to the original.
* ``role`` -- the item's ``role`` (``user``, ``assistant``, ...), or its ``type``
  (``function_call``, ``reasoning``, ...) when it has none.
* ``content`` -- the item's human-readable text, for SQL analytics and search.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import InvalidItemError, ItemTooLargeError, ItemTypeError


@dataclass(frozen=True, slots=True)
class EncodedItem:
    """One item ready to insert: its derived columns and its JSON document."""

    role: str
    content: str
    document: str


#: Deepest nesting of lists/objects accepted in an item. Python's JSON parser
#: recurses once per level and runs deep inside the driver's result fetching, so
#: an item much deeper than this could be written but never read back.
MAX_NESTING_DEPTH = 512


def _exactness_problem(item: Any) -> tuple[str, bool] | None:
    """Find a value that JSON would store but not give back equal (or not read back).

    Returns ``(description, is_type_problem)`` or ``None``. Iterative, so deeply
    nested items do not hit the recursion limit here.
    """
    stack: list[tuple[Any, str, int]] = [(item, "", 0)]
    # Containers already checked, with the depth they were checked at: a shared
    # sub-object is walked again only when reached by a deeper path (its depth is
    # what the limit is about), so the walk is bounded by objects x depth limit, and
    # a cycle ends at the depth limit.
    seen: dict[int, int] = {}
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str) or value is None or isinstance(value, bool | int):
            continue
        if isinstance(value, float):
            if not math.isfinite(value):
                return f"{path or 'the item'} is {value!r}, which JSON cannot represent", False
            continue
        if isinstance(value, dict | list):
            if depth >= MAX_NESTING_DEPTH:
                if _is_circular(item):
                    # json.dumps reports it, with its own error chained.
                    return None
                return f"the item is nested too deeply (over {MAX_NESTING_DEPTH} levels)", False
            if seen.get(id(value), -1) >= depth:
                continue
            seen[id(value)] = depth
        if isinstance(value, dict):
            for key, child in value.items():
                if not isinstance(key, str):
                    return (
                        f"{path or 'the item'} has a non-string key {key!r} "
                        "(JSON would turn it into a string)",
                        True,
                    )
                stack.append((child, f"{path}[{key!r}]", depth + 1))
            continue
        if isinstance(value, list):
            stack.extend(
                (child, f"{path}[{index}]", depth + 1) for index, child in enumerate(value)
            )
            continue
        kind = type(value).__name__
        return (
            f"{path or 'the item'} is a {kind}, which is not JSON "
            "(dict, list, str, number, bool, None)",
            True,
        )
    return None


def _plainly_exact(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` is made only of JSON's own types, which JSON gives back equal.

    The common case, and what the SDK produces: exact ``dict`` (string keys),
    ``list``, ``str``, ``int``, ``bool``, ``None`` and finite ``float``, nested less
    than :data:`MAX_NESTING_DEPTH` deep. Checked without building the paths and the
    bookkeeping :func:`_exactness_problem` needs to *describe* a problem; anything
    else (a subclass, a tuple, NaN, a cycle...) answers ``False``, and that walk
    decides.
    """
    kind = type(value)
    if kind is dict:
        if depth >= MAX_NESTING_DEPTH:
            return False
        for key, child in value.items():
            if type(key) is not str:
                return False
            child_kind = type(child)
            if child_kind is str or child_kind is int or child_kind is bool or child is None:
                continue
            if not _plainly_exact(child, depth + 1):
                return False
        return True
    if kind is list:
        if depth >= MAX_NESTING_DEPTH:
            return False
        for child in value:
            child_kind = type(child)
            if child_kind is str or child_kind is int or child_kind is bool or child is None:
                continue
            if not _plainly_exact(child, depth + 1):
                return False
        return True
    if kind is str or kind is int or kind is bool or value is None:
        return True
    if kind is float:
        return math.isfinite(value)
    return False


def _is_circular(item: Any) -> bool:
    try:
        json.dumps(item, default=str)
    except ValueError as exc:
        return "circular" in str(exc).lower()
    except (TypeError, RecursionError):
        return False
    return False


_SURROGATE_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")

# Made once: json.dumps() with options builds a new encoder on every call.
_COMPACT_UTF8 = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def encode_document(item: Any, *, where: str) -> str:
    """Serialize ``item`` to JSON text that parses back to an equal value.

    Raises:
        ItemTypeError: a value has a type JSON cannot hold exactly (bytes, datetime,
            tuple, a non-string key, ...).
        InvalidItemError: a value JSON cannot represent (NaN, infinity, a cycle,
            nesting deeper than the serializer can follow).
    """
    try:
        plain = _plainly_exact(item)
    except RecursionError:  # the caller's stack was already deep: the iterative walk
        plain = False
    problem = None if plain else _exactness_problem(item)
    if problem is not None:
        message, is_type_problem = problem
        error = ItemTypeError if is_type_problem else InvalidItemError
        raise error(f"{where}: {message}; nothing was written")
    try:
        document = _COMPACT_UTF8.encode(item)
    except RecursionError:
        raise InvalidItemError(
            f"{where} is nested too deeply to serialize; nothing was written"
        ) from None
    except (TypeError, ValueError) as exc:
        error = ItemTypeError if isinstance(exc, TypeError) else InvalidItemError
        raise error(f"{where} cannot be stored as JSON: {exc}; nothing was written") from exc
    if document.isascii():
        return document
    try:
        document.encode("utf-8")
        return document
    except UnicodeEncodeError:
        pass
    # A surrogate pair written as two code points ("\\ud83d\\ude00") would be
    # escaped exactly like the one character it encodes, and come back as that
    # character: not equal. Refused rather than changed.
    pair = _SURROGATE_PAIR.search(document)
    if pair is not None:
        codes = " ".join(f"U+{ord(c):04X}" for c in pair.group())
        raise InvalidItemError(
            f"{where} holds a surrogate pair written as two code points ({codes}); "
            "JSON would read it back as one character, so it cannot come back "
            "equal. Join it first (text.encode('utf-16', 'surrogatepass')"
            ".decode('utf-16')); nothing was written"
        )
    # A lone surrogate: valid in a Python str, impossible in UTF-8; see utf8_safe_json.
    return json.dumps(item, ensure_ascii=True, separators=(",", ":"), allow_nan=False)


def utf8_safe_json(rendered: str, value: Any, **dumps_options: Any) -> str:
    """``rendered`` (``json.dumps(value, ensure_ascii=False, ...)``), or its ASCII form
    when it holds a lone surrogate.

    A lone surrogate is valid in a Python str and in JSON's ``\\u`` escapes, but
    impossible in UTF-8: the escaped form then stores or prints it, and
    ``json.loads`` restores the same code point. Everything else stays readable.
    """
    if rendered.isascii():
        return rendered
    try:
        rendered.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, ensure_ascii=True, **dumps_options)
    return rendered


def _text_of_parts(parts: Sequence[Any]) -> str:
    texts: list[str] = []
    for part in parts:
        if isinstance(part, Mapping):
            for key in ("text", "refusal", "transcript"):
                value = part.get(key)
                if isinstance(value, str):
                    texts.append(value)
                    break
        elif isinstance(part, str):
            texts.append(part)
    return "\n".join(texts)


def readable_text(item: Mapping[str, Any]) -> str:
    """The human-readable text of an item: message text, tool call, tool output, summary."""
    content = item.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return _text_of_parts(content)
    kind = item.get("type")
    if kind == "function_call":
        return f"{item.get('name', '')}({item.get('arguments', '')})"
    if kind in ("function_call_output", "custom_tool_call_output", "computer_call_output"):
        output = item.get("output")
        if isinstance(output, str):
            return output
        if isinstance(output, list):
            return _text_of_parts(output)
        return "" if output is None else json.dumps(output, ensure_ascii=False, default=str)
    if kind == "reasoning":
        summary = item.get("summary")
        return _text_of_parts(summary) if isinstance(summary, list) else ""
    return ""


def _column_safe(text: str) -> str:
    # PostgreSQL `text` rejects NUL and cannot hold lone surrogates. These columns
    # are derived and readable, so scrub them; the `item` document keeps the truth.
    if "\x00" in text:
        text = text.replace("\x00", "")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def item_role(item: Mapping[str, Any]) -> str:
    """The item's ``role``, else its ``type``, else ``"unknown"``."""
    for key in ("role", "type"):
        value = item.get(key)
        if isinstance(value, str) and value:
            return _column_safe(value)
    return "unknown"


def _check_size(document: str, *, where: str, max_item_bytes: int) -> None:
    # len(str) bounds the UTF-8 size from below (and from above by 4x), so the
    # exact byte count is computed only for documents near the limit.
    if len(document) * 4 <= max_item_bytes:
        return
    size = len(document.encode("utf-8"))
    if size > max_item_bytes:
        raise ItemTooLargeError(
            f"{where} is {size:,} bytes as JSON, over the limit of {max_item_bytes:,} "
            "(max_item_bytes, AGENTS_SESSIONS_MAX_ITEM_BYTES); nothing was written"
        )


def encode_items(items: Sequence[Any], *, max_item_bytes: int | None = None) -> list[EncodedItem]:
    """Validate and encode every item of one ``add_items`` call.

    Args:
        items: The items, a list of dicts.
        max_item_bytes: Largest accepted JSON document per item, in UTF-8 bytes;
            ``None`` for no limit.

    Raises:
        ItemTypeError: ``items`` is not a list, or an item is not a mapping or holds
            a value JSON cannot store exactly.
        ItemTooLargeError: an item's JSON is larger than ``max_item_bytes``.
        InvalidItemError: an item holds a value JSON cannot represent.
    """
    if isinstance(items, str | bytes | Mapping) or not isinstance(items, Sequence):
        raise ItemTypeError(f"items must be a list of dicts, got {type(items).__name__}")
    encoded: list[EncodedItem] = []
    for index, item in enumerate(items):
        if type(item) is not dict and not isinstance(item, Mapping):
            raise ItemTypeError(
                f"items[{index}] must be a dict, got {type(item).__name__}; nothing was written"
            )
        document = encode_document(item, where=f"items[{index}]")
        if max_item_bytes is not None and len(document) * 4 > max_item_bytes:
            _check_size(document, where=f"items[{index}]", max_item_bytes=max_item_bytes)
        encoded.append(
            EncodedItem(
                role=item_role(item),
                content=_column_safe(readable_text(item)),
                document=document,
            )
        )
    return encoded
