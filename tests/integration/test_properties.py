"""Property-based tests: any JSON item round-trips exactly; anything else is refused whole.

Hypothesis generates items on both backends. For every JSON-able item (string keys,
lists, any code point including NUL and lone surrogates, long strings, ints beyond
64 bits, finite floats including ``-0.0``, bools, ``None``, nesting up to
:data:`~agents_sessions.items.MAX_NESTING_DEPTH`) ``add_items`` then ``get_items``
gives back an *identical* value: equal, same key order, same type of every value
(an int stays an int, ``1.0`` stays a float, ``True`` stays a bool). For anything
else -- NaN, infinities, bytes, datetimes, sets, tuples, custom objects, non-string
keys, cycles, deeper nesting -- the call raises ``ItemTypeError`` (a ``TypeError``)
or ``InvalidItemError`` (a ``ValueError``) naming the item, and reading the
conversation afterwards shows that nothing of the batch was written.

Profiles: examples are random locally and derandomized when ``CI`` is set, so a CI
failure reproduces. ``deadline=None``: database round trips vary and timings are
not what these tests are about.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import math
import operator
import os
import re
import sys
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents_sessions import InvalidItemError, ItemTypeError, PostgreSQLSession, get_store
from agents_sessions.items import MAX_NESTING_DEPTH, encode_document
from agents_sessions.settings import Settings

_T = TypeVar("_T")

_CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes", "on"}

settings.register_profile(
    "agents_sessions_properties",
    max_examples=50,
    deadline=None,
    # The database URL fixtures are function-scoped only because `backend` is
    # parametrized; their value is the same shared database for every example, and
    # each example uses a fresh conversation id, so reusing them across examples is
    # exactly what we want. (The autouse settings-isolation fixture is function-scoped
    # too and equally harmless to share.)
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    # No example database: it would be written under whatever directory a test
    # chdirs to. A failure prints the falsifying example (and CI is derandomized).
    database=None,
    print_blob=True,
)
settings.register_profile(
    "agents_sessions_properties_ci",
    parent=settings.get_profile("agents_sessions_properties"),
    derandomize=True,
)
PROFILE = settings.get_profile(
    "agents_sessions_properties_ci" if _CI else "agents_sessions_properties"
)


def run(coroutine: Coroutine[Any, Any, _T]) -> _T:
    """Run one example's async calls (hypothesis drives plain functions)."""
    return asyncio.run(coroutine)


def new_session(database_url: str) -> PostgreSQLSession:
    return PostgreSQLSession(f"prop-{uuid.uuid4()}", database_url=database_url)


def assert_nothing_written(session: PostgreSQLSession) -> None:
    """Read the conversation back: no items, and not even a conversation row."""
    assert run(session.get_items()) == []
    with session.store.read() as repos:
        assert repos.messages.count(session.session_id) == 0
        assert repos.conversations.get(session.session_id) is None


def assert_identical(actual: Any, expected: Any, path: str = "item") -> None:
    """Equal, same key order, and the same type everywhere (``1.0`` is not ``1``)."""
    assert type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}"
    if isinstance(expected, dict):
        assert list(actual) == list(expected), f"{path}: keys or key order differ"
        for key, value in expected.items():
            assert_identical(actual[key], value, f"{path}[{key!r}]")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), f"{path}: lengths differ"
        for index, (got, want) in enumerate(zip(actual, expected, strict=True)):
            assert_identical(got, want, f"{path}[{index}]")
    elif isinstance(expected, float):
        # repr is exact for floats and tells -0.0 from 0.0.
        assert repr(actual) == repr(expected), f"{path}: {actual!r} != {expected!r}"
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


# ---------------------------------------------------------------------- strategies

# Code points hypothesis rarely picks on its own, but agent items do carry: NUL,
# lone surrogates (valid in a Python str, impossible in UTF-8), non-BMP characters,
# JSON's own metacharacters, and separators JavaScript treats as line ends.
_SPECIAL_CHARACTERS = [
    "\x00",
    "\x1f",
    "\x7f",
    "\ud800",
    "\udbff",
    "\udc00",
    "\udfff",
    "\U0001f680",
    "\U0010ffff",
    "\u2028",
    "\ufeff",
    '"',
    "\\",
    "/",
]
CHARACTERS = st.one_of(
    st.characters(exclude_categories=()),  # every code point, surrogates included
    st.sampled_from(_SPECIAL_CHARACTERS),
)
# A high surrogate followed by a low one is a surrogate pair written as two code
# points: JSON cannot keep it apart, so items holding one are refused (see
# test_items.py). A dot between them keeps the properties on every other text.
_HIGH_BEFORE_LOW = re.compile("([\ud800-\udbff])(?=[\udc00-\udfff])")


def _split_surrogate_pairs(text: str) -> str:
    return _HIGH_BEFORE_LOW.sub("\\1.", text)


SHORT_TEXT = st.text(CHARACTERS, max_size=24).map(_split_surrogate_pairs)
LONG_TEXT = st.builds(
    operator.mul, st.text(CHARACTERS, min_size=1, max_size=4), st.integers(1_000, 150_000)
).map(_split_surrogate_pairs)
TEXT = st.one_of(SHORT_TEXT, SHORT_TEXT, SHORT_TEXT, LONG_TEXT)

_MAX_DIGITS = sys.get_int_max_str_digits() or 10_000
INTEGERS = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.sampled_from(
        [
            0,
            -1,
            2**31,
            2**53 + 1,  # not representable as a double: must not go through one
            2**63 - 1,
            2**63,
            -(2**63),
            -(2**63) - 1,
            2**64,
            10 ** (_MAX_DIGITS - 1),  # the most digits this interpreter prints
        ]
    ),
)
FLOATS = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([-0.0, 0.0, 1.0, 5e-324, 1.7976931348623157e308, 0.1, 1e16, -2.5]),
)
SCALARS = st.one_of(st.none(), st.booleans(), INTEGERS, FLOATS, TEXT)

# Keys the package reads to fill the role/content columns, so their odd values
# exercise that code too.
_SPECIAL_KEYS = ["role", "type", "content", "output", "summary", "name", "arguments", "text"]
KEYS = st.one_of(st.sampled_from(_SPECIAL_KEYS), SHORT_TEXT)
_ITEM_KINDS = [
    "message",
    "function_call",
    "function_call_output",
    "custom_tool_call_output",
    "computer_call_output",
    "reasoning",
    "user",
    "assistant",
]

JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(KEYS, children, max_size=5),
        # content / output / summary parts
        st.lists(st.fixed_dictionaries({"type": st.just("output_text"), "text": TEXT}), max_size=3),
    ),
    max_leaves=25,
)
_MAX_ITEM_BYTES: int = Settings.model_fields["max_item_bytes"].default


def _fits_the_item_limit(item: dict[str, Any]) -> bool:
    # 25 leaves of up to 600,000 characters (NUL is 6 bytes as JSON) can outgrow the
    # default max_item_bytes; refusing those is test_bad_input's business, not these tests'.
    return len(encode_document(item, where="item").encode("utf-8")) <= _MAX_ITEM_BYTES


ITEMS: st.SearchStrategy[dict[str, Any]] = st.dictionaries(
    KEYS, st.one_of(st.sampled_from(_ITEM_KINDS), JSON_VALUES), max_size=8
).filter(_fits_the_item_limit)


# ------------------------------------------------------------------ round trips


@PROFILE
@given(items=st.lists(ITEMS, min_size=1, max_size=4))
def test_any_json_item_round_trips_identically(
    database_url: str, items: list[dict[str, Any]]
) -> None:
    session = new_session(database_url)
    run(session.add_items(items))

    stored = run(session.get_items())
    assert stored == items
    assert_identical(stored, items)
    assert_identical(run(session.get_items(limit=1)), items[-1:])
    # pop reads through DELETE ... RETURNING: the same decoding path must hold.
    assert_identical(run(session.pop_item()), items[-1])


@PROFILE
@given(text=TEXT, key=SHORT_TEXT)
def test_any_string_round_trips_as_value_and_as_key(database_url: str, text: str, key: str) -> None:
    item = {"role": "user", "content": text, key: [text, {key: text}]}
    session = new_session(database_url)
    run(session.add_items([item]))

    [stored] = run(session.get_items())
    assert_identical(stored, item)
    with session.store.read() as repos:
        [record] = repos.messages.records(session.session_id)
    # The readable column is derived and scrubbed (text columns refuse NUL and lone
    # surrogates); the item document keeps the exact value.
    assert "\x00" not in record.content
    record.content.encode("utf-8")  # valid Unicode, whatever the item held
    assert_identical(record.item, item)


@PROFILE
@given(numbers=st.lists(st.one_of(st.booleans(), INTEGERS, FLOATS), min_size=1, max_size=20))
def test_numbers_keep_their_value_and_their_type(database_url: str, numbers: list[Any]) -> None:
    item = {"role": "user", "content": "numbers", "values": numbers}
    session = new_session(database_url)
    run(session.add_items([item]))

    [stored] = run(session.get_items())
    assert_identical(stored, item)
    for value in stored["values"]:
        if isinstance(value, float):
            assert math.isfinite(value)


@PROFILE
@given(
    batches=st.lists(
        st.lists(
            st.fixed_dictionaries({"role": st.just("user"), "content": SHORT_TEXT}), max_size=4
        ),
        min_size=1,
        max_size=5,
    ),
    limit=st.integers(min_value=0, max_value=25),
)
def test_history_is_every_batch_in_order_and_limits_take_the_tail(
    database_url: str, batches: list[list[dict[str, Any]]], limit: int
) -> None:
    session = new_session(database_url)
    for batch in batches:
        run(session.add_items(batch))
    history = [item for batch in batches for item in batch]

    assert run(session.get_items()) == history
    assert run(session.get_items(limit=limit)) == (history[-limit:] if limit else [])
    popped = [run(session.pop_item()) for _ in range(len(history) + 1)]
    assert popped == [*reversed(history), None]


def _nested(depth: int, shape: list[bool]) -> dict[str, Any]:
    """An item whose deepest value sits inside ``depth`` containers, item included.

    ``shape`` picks a dict (True) or a list (False) for each level below the item.
    """
    value: Any = None
    for level in range(depth - 1):
        value = {"k": value} if shape[level % len(shape)] else [value]
    return {"role": "user", "content": "deep", "data": value}


@settings(PROFILE, max_examples=25)
@given(
    depth=st.one_of(
        st.integers(min_value=1, max_value=MAX_NESTING_DEPTH),
        st.sampled_from([MAX_NESTING_DEPTH - 1, MAX_NESTING_DEPTH]),
    ),
    shape=st.lists(st.booleans(), min_size=1, max_size=8),
)
def test_nesting_up_to_the_limit_round_trips(
    database_url: str, depth: int, shape: list[bool]
) -> None:
    item = _nested(depth, shape)
    session = new_session(database_url)
    run(session.add_items([item]))

    assert run(session.get_items()) == [item]
    assert run(session.pop_item()) == item


@settings(PROFILE, max_examples=25)
@given(
    depth=st.one_of(
        st.integers(min_value=MAX_NESTING_DEPTH + 1, max_value=4 * MAX_NESTING_DEPTH),
        st.just(MAX_NESTING_DEPTH + 1),
        st.just(20_000),  # far beyond what Python's JSON encoder can recurse into
    ),
    shape=st.lists(st.booleans(), min_size=1, max_size=8),
)
def test_nesting_beyond_the_limit_is_refused_and_writes_nothing(
    database_url: str, depth: int, shape: list[bool]
) -> None:
    session = new_session(database_url)
    good = {"role": "user", "content": "fine"}

    with pytest.raises(InvalidItemError, match=r"items\[1\].*nested too deeply"):
        run(session.add_items([good, _nested(depth, shape), good]))
    assert_nothing_written(session)


# ------------------------------------------------------------------ refusals

BadFactory = Callable[[dict[str, Any]], Any]


class _Custom:
    """A user object: JSON cannot hold it."""


def _cycle_to(host: dict[str, Any]) -> Any:
    return [host]  # placed inside `host`: host -> [...] -> host


def _self_cycle(_host: dict[str, Any]) -> Any:
    loop: list[Any] = []
    loop.append(loop)
    return loop


def _too_deep(_host: dict[str, Any]) -> Any:
    value: list[Any] = []
    for _ in range(MAX_NESTING_DEPTH + 1):
        value = [value]
    return value


# (name, factory of the bad value given the item it goes into, error, message fragment)
BAD_VALUES: list[tuple[str, BadFactory, type[Exception], str]] = [
    ("nan", lambda _: float("nan"), InvalidItemError, "nan"),
    ("infinity", lambda _: float("inf"), InvalidItemError, "inf"),
    ("-infinity", lambda _: float("-inf"), InvalidItemError, "inf"),
    ("bytes", lambda _: b"raw", ItemTypeError, "bytes"),
    ("bytearray", lambda _: bytearray(b"raw"), ItemTypeError, "bytearray"),
    (
        "datetime",
        lambda _: dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc),
        ItemTypeError,
        "datetime",
    ),
    ("date", lambda _: dt.date(2024, 1, 1), ItemTypeError, "date"),
    ("decimal", lambda _: decimal.Decimal("1.10"), ItemTypeError, "Decimal"),
    ("set", lambda _: {1, 2}, ItemTypeError, "set"),
    ("frozenset", lambda _: frozenset({"a"}), ItemTypeError, "frozenset"),
    ("tuple", lambda _: (1, 2), ItemTypeError, "tuple"),
    ("complex", lambda _: 1j, ItemTypeError, "complex"),
    ("custom object", lambda _: _Custom(), ItemTypeError, "_Custom"),
    ("int key", lambda _: {1: "one"}, ItemTypeError, "non-string key"),
    ("None key", lambda _: {None: "none"}, ItemTypeError, "non-string key"),
    ("float key", lambda _: {1.5: "x"}, ItemTypeError, "non-string key"),
    ("bool key", lambda _: {True: "x"}, ItemTypeError, "non-string key"),
    ("tuple key", lambda _: {(1, 2): "x"}, ItemTypeError, "non-string key"),
    ("bytes key", lambda _: {b"k": "x"}, ItemTypeError, "non-string key"),
    ("cycle to the item", _cycle_to, InvalidItemError, "ircular"),
    ("self cycle", _self_cycle, InvalidItemError, "ircular"),
    ("too deep", _too_deep, InvalidItemError, "nested too deeply"),
    # More digits than this interpreter will print (sys.get_int_max_str_digits).
    ("huge int", lambda _: 10**_MAX_DIGITS, InvalidItemError, "digits"),
]


def _containers(value: Any) -> list[dict[str, Any] | list[Any]]:
    found: list[dict[str, Any] | list[Any]] = []
    stack = [value]
    while stack:
        current = stack.pop()
        if isinstance(current, dict):
            found.append(current)
            stack.extend(current.values())
        elif isinstance(current, list):
            found.append(current)
            stack.extend(current)
    return found


@st.composite
def items_with_a_bad_value(draw: st.DrawFn) -> tuple[dict[str, Any], type[Exception], str]:
    """A generated item with one bad value planted at a random place inside it."""
    item = draw(ITEMS)
    _name, factory, error, fragment = draw(st.sampled_from(BAD_VALUES))
    target = draw(st.sampled_from(_containers(item)))
    bad = factory(item)
    if isinstance(target, dict):
        target[draw(SHORT_TEXT)] = bad
    else:
        target.insert(draw(st.integers(0, len(target))), bad)
    return item, error, fragment


@PROFILE
@given(
    before=st.lists(ITEMS, max_size=3),
    bad=items_with_a_bad_value(),
    after=st.lists(ITEMS, max_size=3),
)
def test_a_bad_value_anywhere_refuses_the_whole_batch(
    database_url: str,
    before: list[dict[str, Any]],
    bad: tuple[dict[str, Any], type[Exception], str],
    after: list[dict[str, Any]],
) -> None:
    item, error, fragment = bad
    session = new_session(database_url)

    with pytest.raises(error) as info:
        run(session.add_items([*before, item, *after]))
    message = str(info.value)
    assert f"items[{len(before)}]" in message
    assert fragment.lower() in message.lower()
    assert "nothing was written" in message
    # Both families stay catchable as the standard types they promise.
    assert isinstance(info.value, ValueError)
    if error is ItemTypeError:
        assert isinstance(info.value, TypeError)
    assert_nothing_written(session)


NOT_A_DICT = st.one_of(
    st.none(), st.booleans(), INTEGERS, FLOATS, SHORT_TEXT, st.lists(SCALARS, max_size=3)
)


@PROFILE
@given(
    before=st.lists(ITEMS, max_size=3),
    not_an_item=NOT_A_DICT,
    after=st.lists(ITEMS, max_size=3),
)
def test_an_item_that_is_not_a_dict_refuses_the_whole_batch(
    database_url: str,
    before: list[dict[str, Any]],
    not_an_item: Any,
    after: list[dict[str, Any]],
) -> None:
    session = new_session(database_url)

    with pytest.raises(ItemTypeError, match=rf"items\[{len(before)}\] must be a dict"):
        run(session.add_items([*before, not_an_item, *after]))
    assert_nothing_written(session)


# ------------------------------------------------------------------ shared sub-objects


def _wrapped(levels: int, inner: Any) -> Any:
    value = inner
    for _ in range(levels):
        value = [value]
    return value


async def test_a_sub_object_shared_by_two_keys_comes_back_as_two_equal_copies(
    database_url: str, conversation_id: str
) -> None:
    shared = {"text": "same", "parts": [1, 2.0, None]}
    item = {"role": "user", "content": "x", "a": shared, "b": [shared, shared]}
    session = PostgreSQLSession(conversation_id, database_url=database_url)
    await session.add_items([item])

    [stored] = await session.get_items()
    assert_identical(stored, item)
    stored["a"]["text"] = "changed"
    assert stored["b"][0]["text"] == "same"  # copies, not one aliased object


async def test_nesting_is_measured_along_every_path_to_a_shared_sub_object(
    database_url: str, conversation_id: str
) -> None:
    # `leaf` (256 levels) is first met near the top (key "a"), then again at the
    # bottom of a 306-level chain (key "b"): along that second path the item is
    # nested deeper than the limit, and must be refused like any other deep item
    # (a validator that checks each shared object once, at its first depth, lets
    # it through).
    leaf = _wrapped(MAX_NESTING_DEPTH // 2, [])
    item = {"b": _wrapped(MAX_NESTING_DEPTH // 2 + 50, leaf), "a": leaf}
    session = PostgreSQLSession(conversation_id, database_url=database_url)

    with pytest.raises(InvalidItemError, match="nested too deeply"):
        await session.add_items([item])
    assert await session.get_items() == []
    with get_store(database_url).read() as repos:
        assert repos.conversations.get(conversation_id) is None
