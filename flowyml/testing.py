"""Helpers for testing code that uses flowyml: no real waiting between retries or for rate limits, a throwaway store."""

from __future__ import annotations

__all__ = ("limiter_clock", "no_sleep", "temporary_store")

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from flowyml import _limits, _retry
from flowyml._limits import LimiterClock


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


@contextlib.contextmanager
def limiter_clock(start: float = 0.0) -> Iterator[LimiterClock]:
    """Run every rate limit (``rate_limit=``, ``Limit(rate=...)``) on a virtual clock.

    Waiting for a token is instant and moves the clock to the moment the token would have
    come, so a step that reads ``clock.now()`` when it starts sees exactly when the limiter let
    it in. Yields the clock: ``now()``, ``advance(seconds)`` and ``waits`` (every wait skipped).
    Affects the whole process while active; concurrency limits still wait for real holders.
    """
    clock = LimiterClock(start)
    previous = _limits._clock.virtual
    _limits._clock.virtual = clock
    try:
        yield clock
    finally:
        _limits._clock.virtual = previous


@contextlib.contextmanager
def temporary_store() -> Iterator[Path]:
    """Point flowyml's default store (``$FLOWYML_HOME``) at a fresh directory, removed afterwards.

    Pipelines created without ``cache_dir=`` cache and record there, so tests neither see nor
    leave entries in ``./.flowyml``. Yields the store's path. Sets the environment variable for
    the whole process while active, and restores its previous value.
    """
    previous = os.environ.get("FLOWYML_HOME")
    with tempfile.TemporaryDirectory(prefix="flowyml-test-") as tmp:
        root = Path(tmp) / ".flowyml"
        os.environ["FLOWYML_HOME"] = str(root)
        try:
            yield root
        finally:
            if previous is None:
                os.environ.pop("FLOWYML_HOME", None)
            else:
                os.environ["FLOWYML_HOME"] = previous
