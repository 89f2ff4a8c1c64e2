"""Checks on caller-supplied identifiers and arguments, run before any I/O."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from .errors import InvalidArgumentError, InvalidConversationIdError, ItemTypeError
from .models import MAX_ID_LENGTH

# A JSON \\u0000 escape that is not itself an escaped backslash followed by "u0000".
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def validate_identifier(value: object, *, name: str = "conversation_id") -> str:
    """Return ``value`` if it is a usable conversation or user id, else raise.

    Ids are caller-chosen strings (UUIDs, ``"user-123-conv"``, external ids...): 1 to
    255 characters, not only whitespace, without NUL or other control characters.
    They are always bound as parameters, so SQL metacharacters are inert.

    Raises:
        InvalidConversationIdError: naming ``name`` (a ``ValueError``); a non-string
            also raises it, as the id is unusable rather than mistyped data.
    """
    if not isinstance(value, str):
        raise InvalidConversationIdError(f"{name} must be a str, got {type(value).__name__}")
    if not value or value.isspace():
        raise InvalidConversationIdError(f"{name} must not be empty or only whitespace")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidConversationIdError(
            f"{name} is {len(value)} characters long; the limit is {MAX_ID_LENGTH}"
        )
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in value):
        raise InvalidConversationIdError(f"{name} must not contain NUL or other control characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidConversationIdError(f"{name} must be valid Unicode text") from None
    return value


def validate_limit(limit: object, *, name: str = "limit") -> int | None:
    """Return ``limit`` if it is ``None`` or a non-negative int, else raise."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise InvalidArgumentError(f"{name} must be an int or None, got {type(limit).__name__}")
    if limit < 0:
        raise InvalidArgumentError(f"{name} must be >= 0, got {limit}")
    return limit


def validate_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Check conversation metadata can be stored (as JSONB on PostgreSQL) and return a copy.

    Raises:
        ItemTypeError: not a mapping, or not JSON-serializable.
        InvalidArgumentError: holds a NUL character (``jsonb`` rejects it) or a
            non-finite number.
    """
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise ItemTypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    try:
        document = json.dumps(dict(metadata), ensure_ascii=False, allow_nan=False)
    except TypeError as exc:
        raise ItemTypeError(f"metadata is not JSON-serializable: {exc}") from exc
    except ValueError as exc:
        raise InvalidArgumentError(f"metadata cannot be stored as JSON: {exc}") from exc
    if _NUL_ESCAPE.search(document):
        raise InvalidArgumentError("metadata must not contain NUL characters")
    return dict(metadata)
