"""Helpers for testing code that uses flowyml: no real waiting between retries or for rate limits,
a throwaway store, and an executor that runs steps right here and remembers every call."""

from __future__ import annotations

__all__ = ("Call", "InMemoryExecutor", "limiter_clock", "no_sleep", "temporary_store")

import asyncio
import contextlib
import inspect
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from flowyml import _limits, _retry
from flowyml._errors import StepTimeoutError
from flowyml._executors._base import Executor
from flowyml._layers import is_async_callable
from flowyml._limits import LimiterClock


@dataclass(frozen=True, slots=True)
class Call:
    """One call an :class:`InMemoryExecutor` was given."""

    step_name: str
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]


class InMemoryExecutor(Executor):
    """An executor double: runs every call on the event loop's thread and records it.

    ``pipeline.run(executor=InMemoryExecutor())`` sends every step that names no executor of its
    own here (async and plain functions alike), so a test can see which steps were called, with
    which arguments, in which order, and how many ran at once, without threads or processes.
    A plain function blocks the loop while it runs, so its ``timeout`` is checked when it
    returns; an ``async def`` one is cancelled when its ``timeout`` expires.
    """

    name: ClassVar[str] = "memory"

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.running = 0
        self.peak = 0
        """The most calls that were in flight at once."""
        self.closed = False

    @property
    def steps(self) -> list[str]:
        """The step names of every call, in the order the calls started."""
        return [c.step_name for c in self.calls]

    async def run(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        *,
        timeout: float | None,
        step_name: str,
    ) -> Any:
        self.calls.append(Call(step_name, args, dict(kwargs)))
        self.running += 1
        self.peak = max(self.peak, self.running)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            ret = fn(*args, **kwargs)
            if inspect.isawaitable(ret) and is_async_callable(fn):
                scope = asyncio.timeout(timeout)
                try:
                    async with scope:
                        ret = await ret
                except TimeoutError:
                    if timeout is None or not scope.expired():
                        raise  # the step's own TimeoutError: its failure, not a timeout
                    raise StepTimeoutError(step_name, timeout, executor=self.name) from None
            elif timeout is not None and loop.time() - started > timeout:
                raise StepTimeoutError(step_name, timeout, executor=self.name)
            return ret
        finally:
            self.running -= 1

    async def aclose(self) -> None:
        self.closed = True


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
