"""Idempotency keys of add_items: unique across calls, threads and forked processes."""

from __future__ import annotations

import multiprocessing
import os
import threading

import pytest

from agents_sessions.idempotency import new_append_key


def test_keys_drawn_from_many_threads_are_all_different() -> None:
    drawn: list[list[str]] = []

    def draw() -> None:
        drawn.append([new_append_key() for _ in range(2000)])

    threads = [threading.Thread(target=draw) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    keys = [key for batch in drawn for key in batch]
    assert len(set(keys)) == len(keys) == 16000
    assert all(0 < len(key) <= 40 for key in keys)


def _draw_in_child(queue: multiprocessing.Queue[list[str]]) -> None:
    queue.put([new_append_key() for _ in range(100)])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_never_repeats_its_parents_keys() -> None:
    before = new_append_key()  # the parent has drawn keys before it forks
    context = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[list[str]] = context.Queue()
    children = [context.Process(target=_draw_in_child, args=(queue,)) for _ in range(2)]
    for child in children:
        child.start()
    batches = [queue.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=60)
    parent = [before] + [new_append_key() for _ in range(100)]
    keys = parent + batches[0] + batches[1]
    assert len(set(keys)) == len(keys), "a forked child drew a key its parent or sibling drew"
