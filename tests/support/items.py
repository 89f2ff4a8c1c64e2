"""Realistic agent items for the benchmark: what a Runner turn stores.

A turn is a ~200-character user message and a ~1 KB assistant message in the
Responses format, with the typographic punctuation model output is full of (so
the non-ASCII paths of every backend's serializer are exercised, as in production).
Texts are generated once from a fixed seed: building items costs next to nothing
inside the timed loops, and every backend gets the same bytes.
"""

from __future__ import annotations

import random
from typing import Any

_WORDS = (  # noqa: SIM905 - a word list reads better as text
    "the agent tool call result user session history message model response context "
    "database conversation token stream output input search weather order invoice "
    "refund account shipping address payment status update summary plan step check "
    "we you it is are was be can will should would could have has had do does did a "
    "an of to in on for with by from at as and or but not this that these those "
).split()

# Model output is full of typographic punctuation (non-ASCII, as in production).
_PUNCTUATION = (".", ",", ",", "\u2014", "\u2019s", ":", "?")

USER_CHARS = 200
ASSISTANT_CHARS = 1000


def _text(rng: random.Random, length: int) -> str:
    words: list[str] = []
    size = 0
    while size < length:
        word = rng.choice(_WORDS)
        if rng.random() < 0.12:
            word += rng.choice(_PUNCTUATION)
        words.append(word)
        size += len(word) + 1
    text = " ".join(words)[:length]
    return text[0].upper() + text[1:]


class ItemFactory:
    """Makes user and assistant items; assistant ids are unique per factory.

    Args:
        seed: Fixes the texts, so all backends store the same content.
        id_prefix: Makes assistant ids unique across processes.
    """

    def __init__(self, seed: int = 7, id_prefix: str = "0") -> None:
        rng = random.Random(seed)
        self._user_texts = [_text(rng, USER_CHARS) for _ in range(64)]
        self._assistant_texts = [_text(rng, ASSISTANT_CHARS) for _ in range(64)]
        self._prefix = id_prefix
        self._count = 0

    def user(self) -> dict[str, Any]:
        """A user message, as ``Runner`` stores the run's input."""
        self._count += 1
        return {"role": "user", "content": self._user_texts[self._count % 64]}

    def assistant(self) -> dict[str, Any]:
        """An assistant output message in the Responses format (~1 KB)."""
        self._count += 1
        return {
            "id": f"msg_{self._prefix}{self._count:040x}",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [
                {
                    "type": "output_text",
                    "text": self._assistant_texts[self._count % 64],
                    "annotations": [],
                    "logprobs": [],
                }
            ],
        }

    def turn(self) -> list[dict[str, Any]]:
        """One turn's items: the user's message and the assistant's reply."""
        return [self.user(), self.assistant()]

    def history(self, count: int) -> list[dict[str, Any]]:
        """``count`` items alternating user/assistant (for filling conversations)."""
        return [self.user() if index % 2 == 0 else self.assistant() for index in range(count)]
