"""The two executors every run has: the event loop itself, and a bounded thread pool."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .._errors import StepTimeoutError
from ._base import Executor

__all__ = ("AsyncExecutor", "ThreadExecutor")

logger = logging.getLogger("flowyml")


class AsyncExecutor(Executor):
    """Awaits ``async def`` steps on the running loop; a timeout cancels the step at once."""

    name = "async"

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
    """Runs plain functions in a pool of at most ``max_threads`` threads.

    A thread cannot be killed: on a timeout or a cancellation the run stops waiting at once and
    the step fails (or is cancelled); the thread finishes on its own and its late result is
    discarded. :attr:`abandoned` counts such threads, and the pool is then shut down without
    waiting for them.
    """

    name = "thread"

    def __init__(self, max_threads: int = 40) -> None:
        self.max_threads = max_threads
        self.abandoned = 0
        self._pool: ThreadPoolExecutor | None = None

    def _get_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.max_threads, thread_name_prefix="flowyml-step")
        return self._pool

    async def run(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        *,
        timeout: float | None,
        step_name: str,
    ) -> Any:
        ctx = contextvars.copy_context()
        call = functools.partial(ctx.run, fn, *args, **kwargs)
        cfuture = self._get_pool().submit(call)
        future = asyncio.wrap_future(cfuture)
        if timeout is None:
            try:
                return await future
            except asyncio.CancelledError:
                self._abandon(cfuture, step_name)
                raise
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(future)
        except TimeoutError:
            if future.done() and not future.cancelled() and future.exception() is not None:
                raise
            self._abandon(cfuture, step_name)
            raise StepTimeoutError(step_name, timeout, executor=self.name) from None
        except asyncio.CancelledError:
            self._abandon(cfuture, step_name)
            raise

    def _abandon(self, cfuture: Future[Any], step_name: str) -> None:
        if cfuture.cancel():
            return
        self.abandoned += 1

        def late(f: Future[Any]) -> None:
            logger.warning(
                "thread step %r finished after it was abandoned; its result was discarded", step_name
            )

        cfuture.add_done_callback(late)

    async def aclose(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=self.abandoned == 0, cancel_futures=True)
            self._pool = None
