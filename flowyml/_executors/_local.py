"""The two executors every run has: the event loop itself, and a bounded thread pool."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import anyio.to_thread

from .._errors import StepTimeoutError
from ._base import Executor

__all__ = ("AsyncExecutor", "LocalExecutor", "ThreadExecutor")

logger = logging.getLogger("flowyml.executor")


class AsyncExecutor(Executor):
    """Awaits ``async def`` steps on the running loop; a timeout cancels the step at once."""

    name = "async"
    shares_context = True

    async def run(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        *,
        timeout: float | None,
        step_name: str,
    ) -> Any:
        if timeout is None:
            return await fn(*args, **kwargs)
        scope = asyncio.timeout(timeout)
        try:
            async with scope:
                return await fn(*args, **kwargs)
        except TimeoutError:
            if scope.expired():
                raise StepTimeoutError(step_name, timeout, executor=self.name) from None
            raise


class ThreadExecutor(Executor):
    """Runs plain functions in worker threads, at most ``max_threads`` at once (anyio's thread pool).

    A thread cannot be killed: on a timeout or a cancellation the run stops waiting at once and
    the step fails (or is cancelled); the thread finishes on its own and its late result is
    discarded and logged. :attr:`abandoned` counts such threads.
    """

    name = "thread"
    shares_context = True  # anyio starts each thread call in a copy of the task's context

    def __init__(self, max_threads: int = 40) -> None:
        self.max_threads = max_threads
        self.abandoned = 0
        self._limiter = anyio.CapacityLimiter(max_threads)

    async def run(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        *,
        timeout: float | None,
        step_name: str,
    ) -> Any:
        state = _Call(fn, args, kwargs, step_name)
        deadline = math.inf if timeout is None else anyio.current_time() + timeout
        with anyio.CancelScope(deadline=deadline):
            try:
                return await anyio.to_thread.run_sync(state, abandon_on_cancel=True, limiter=self._limiter)
            except BaseException:
                if not state.finished:
                    state.abandoned = True
                    self.abandoned += 1
                raise
        # Reached only when the deadline cancelled the wait (the scope swallowed its own cancellation).
        raise StepTimeoutError(step_name, timeout or 0.0, executor=self.name)


class _Call:
    """A thread step's call, which notices when nobody waits for its result any more."""

    __slots__ = ("abandoned", "args", "finished", "fn", "kwargs", "step_name")

    def __init__(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any], step_name: str
    ) -> None:
        self.fn, self.args, self.kwargs, self.step_name = fn, args, kwargs, step_name
        self.finished = False
        self.abandoned = False

    def __call__(self) -> Any:
        try:
            return self.fn(*self.args, **self.kwargs)
        finally:
            self.finished = True
            if self.abandoned:
                logger.warning(
                    "thread step %r finished after it was abandoned; its result was discarded", self.step_name
                )


class LocalExecutor(Executor):
    """Runs every step in this process, as a run does by default: ``async def`` steps on the
    loop, plain functions in a bounded thread pool.

    ``pipeline.run(executor=LocalExecutor())`` is the same as no executor, except that steps
    that name no executor go through this object (FlowyML's default executor, by its name).
    """

    name = "local"

    def __init__(self, max_threads: int = 40) -> None:
        self._loop = AsyncExecutor()
        self._threads = ThreadExecutor(max_threads)

    async def run(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        *,
        timeout: float | None,
        step_name: str,
    ) -> Any:
        where: Executor = self._loop if _is_async(fn) else self._threads
        return await where.run(fn, args, kwargs, timeout=timeout, step_name=step_name)


def _is_async(fn: Any) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(type(fn), "__call__", None)  # noqa: B004 - a callable object's method
    return call is not None and not inspect.isroutine(fn) and inspect.iscoroutinefunction(call)
