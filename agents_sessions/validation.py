"""Checks on caller-supplied identifiers and arguments, run before any I/O."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from .db.tables import MAX_ID_LENGTH
from .errors import (
    InvalidArgumentError,
    InvalidConversationIdError,
    InvalidItemError,
    ItemTypeError,
)
from .items import encode_document

if TYPE_CHECKING:
    from agents.memory import SessionSettings

# A JSON \\u0000 escape that is not itself an escaped backslash followed by "u0000".
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
# Any \uD800-\uDFFF escape; ensure_ascii writes valid pairs as two escapes too, so
# only flag a high surrogate not followed by a low one, or a low one on its own.
_SURROGATE_ESCAPE = re.compile(
    r"(?<!\\)(?:\\\\)*(?:\\ud[89ab][0-9a-f]{2}(?!\\ud[c-f][0-9a-f]{2})"
    r"|(?<!\\ud[89ab][0-9a-f]{2})\\ud[c-f][0-9a-f]{2})",
    re.IGNORECASE,
)


# C0 controls (NUL included) and DEL: a regex scan is one C loop, which matters on the
# hot path (every repository call validates its ids).
_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f]")


# Unicode categories that draw nothing on their own: format characters (U+200B,
# U+2060, U+FEFF...), separators, controls, unassigned, and combining marks.
_INVISIBLE_CATEGORIES = frozenset({"Cf", "Cc", "Cn", "Co", "Cs", "Zs", "Zl", "Zp", "Mn", "Me"})


def _visible(character: str) -> bool:
    return not character.isspace() and (
        unicodedata.category(character) not in _INVISIBLE_CATEGORIES
        # Hangul fillers are letters (Lo) that draw nothing.
        and character not in "\u115f\u1160\u3164\uffa0"
    )


def validate_identifier(value: object, *, name: str = "conversation_id") -> str:
    """Return ``value`` if it is a usable conversation or user id, else raise.

    Ids are caller-chosen strings (UUIDs, ``"user-123-conv"``, external ids...): 1 to
    255 characters with at least one visible character (not only whitespace,
    zero-width or other format characters), without NUL or other control characters.
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
    if _CONTROL_CHARACTER.search(value) is not None:
        raise InvalidConversationIdError(f"{name} must not contain NUL or other control characters")
    if not value.isascii() and not any(_visible(character) for character in value):
        # Zero-width spaces, joiners, BOMs, lone combining marks: an id nobody can
        # see, read back or type again (and easy to confuse with another one).
        raise InvalidConversationIdError(
            f"{name} must contain a visible character (it holds only invisible or "
            "format characters such as U+200B)"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidConversationIdError(f"{name} must be valid Unicode text") from None
    return value


#: Largest value any 64-bit integer column or LIMIT accepts (both backends).
MAX_INT64 = 2**63 - 1
#: The largest value of an ``INTEGER`` column.
MAX_INT32 = 2**31 - 1
_BOUND_NAMES = {MAX_INT64: "2**63-1", MAX_INT32: "2**31-1"}


def validate_count(value: object, *, name: str, maximum: int = MAX_INT64) -> int:
    """Return ``value`` if it is an int from 0 to ``maximum``, else raise naming ``name``.

    ``maximum`` is the column's: 2**63-1 (``BIGINT``, the default) or 2**31-1
    (``INTEGER``: :data:`MAX_INT32`).
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value <= maximum:
        bound = _BOUND_NAMES.get(maximum, str(maximum))
        raise InvalidArgumentError(f"{name} must be between 0 and {bound}, got {value}")
    return value


def validate_int32(value: object, *, name: str) -> int:
    """Return ``value`` if it is an int an ``INTEGER`` column holds (-2**31 to 2**31-1)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"{name} must be an int, got {type(value).__name__}")
    if not -MAX_INT32 - 1 <= value <= MAX_INT32:
        raise InvalidArgumentError(f"{name} must be between -2**31 and 2**31-1, got {value}")
    return value


def validate_text(value: object, *, name: str, optional: bool = False) -> str | None:
    """Return ``value`` if it is a storable string (no NUL, valid Unicode), else raise."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{name} must be a str, got {type(value).__name__}")
    if "\x00" in value:
        raise InvalidArgumentError(f"{name} must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgumentError(f"{name} must be valid Unicode text") from None
    return value


def validate_limit(limit: object, *, name: str = "limit") -> int | None:
    """Return ``limit`` if it is ``None`` or a non-negative int, else raise.

    A limit beyond any possible history (over 2**63-1) simply means "everything".
    """
    if limit is None:
        return None
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > MAX_INT64:
        return MAX_INT64
    return validate_count(limit, name=name)


def validate_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Check conversation metadata can be stored exactly (as JSONB on PostgreSQL).

    Returns a shallow copy. The same rules as items apply (string keys, JSON types,
    finite numbers, bounded nesting), plus what ``jsonb`` rejects: NUL characters
    and lone surrogates.

    Raises:
        ItemTypeError: not a mapping, or a value JSON cannot hold exactly.
        InvalidArgumentError: a value ``jsonb`` or JSON cannot store.
    """
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise ItemTypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    try:
        document = encode_document(dict(metadata), where="metadata")
    except ItemTypeError:
        raise
    except InvalidItemError as exc:
        raise InvalidArgumentError(str(exc).replace("; nothing was written", "")) from None
    # JSON always escapes NUL, and encode_document escapes lone surrogates (and
    # only then); both show up as \u escapes in the document.
    if _NUL_ESCAPE.search(document):
        raise InvalidArgumentError("metadata must not contain NUL characters")
    if _SURROGATE_ESCAPE.search(document):
        raise InvalidArgumentError("metadata must be valid Unicode text (a lone surrogate)")
    return dict(metadata)


def validate_datetime(value: object, *, name: str) -> datetime:
    """A caller's datetime as aware UTC (naive means UTC), for comparison with stored ones.

    SQLite stores timestamps as UTC text and binds a datetime by its wall-clock
    fields, ignoring any offset, so the conversion must happen before binding.
    """
    if not isinstance(value, datetime):
        raise InvalidArgumentError(f"{name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def validate_batch_size(value: object) -> int:
    """A positive row count per batch (``batch_size`` of prune, export and import)."""
    size = validate_count(value, name="batch_size")
    if size < 1:
        raise InvalidArgumentError("batch_size must be at least 1")
    return size


def coerce_session_settings(value: Any) -> SessionSettings | None:
    """``session_settings`` as the SDK's ``SessionSettings`` (from a dict too), or ``None``."""
    if value is None:
        return None
    from agents.memory import SessionSettings  # the facade needs the SDK; the core does not

    if isinstance(value, SessionSettings):
        return value
    if isinstance(value, Mapping):
        return SessionSettings(**value)
    raise TypeError(
        f"session_settings must be a SessionSettings, a dict or None, got {type(value).__name__}"
    )
