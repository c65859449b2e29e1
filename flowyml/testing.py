"""Helpers for testing code that uses flowyml: no real waiting between retries."""

from __future__ import annotations

__all__ = ("no_sleep",)

import contextlib
from collections.abc import Iterator

from flowyml import _retry


@contextlib.contextmanager
def no_sleep() -> Iterator[list[float]]:
    """Make flowyml's waits between retries instant, and record the requested delays.

    Yields the list the delays are appended to, in the order they were requested (from any
    thread or task). The clock flowyml uses for ``max_time`` still advances by each skipped
    delay, so time budgets behave as if the waits had happened. Affects the whole process
    while active; nesting is allowed (the innermost list records).
    """
    delays: list[float] = []
    previous = _retry._switch.recorder
    _retry._switch.recorder = delays
    try:
        yield delays
    finally:
        _retry._switch.recorder = previous
