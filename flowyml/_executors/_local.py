"""The two executors every run has: the event loop itself, and a bounded thread pool."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import queue
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from .._errors import ConfigError, StepTimeoutError
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
    """Runs plain functions in worker threads, at most ``max_threads`` at once.

    Each event loop gets a pool of its own: workers start as steps need them, take calls from
    one queue and hand results back in batches (one loop wake-up for all the calls that finished
    meanwhile, not one per call). Workers stay between the runs of one loop (a run that starts
    finds them warm: starting a thread blocks the loop until the OS schedules it, which cost
    a 1,000-item mapped run a third of its time on a busy machine) and leave after
    ``IDLE_SECONDS`` without work; they stop at once when the last run holding the pool ends
    on a loop it owns (``pipeline.run()``: :meth:`hold`, ``release(stop=True)``), at
    :meth:`aclose`, or when the loop shuts down (``asyncio.run`` cancels the pool's keeper task).

    A thread cannot be killed: on a timeout or a cancellation the run stops waiting at once and
    the step fails (or is cancelled); the thread finishes on its own, its late result is
    discarded and logged, and its slot goes to the next call (a call still queued is not started
    at all). :attr:`abandoned` counts the threads left running that way.
    """

    name = "thread"
    shares_context = True  # each call runs in a copy of the awaiting task's context

    IDLE_SECONDS: ClassVar[float] = 10.0

    def __init__(self, max_threads: int = 40) -> None:
        if isinstance(max_threads, bool) or not isinstance(max_threads, int) or max_threads < 1:
            raise ConfigError(
                f"ThreadExecutor(max_threads={max_threads!r}): use a whole number of 1 or more."
            )
        self.max_threads = max_threads
        self.abandoned = 0
        self._pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Pool] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()  # runs on several loops (threads) may share this executor
        self._last: _Pool | None = None  # the pool of the loop that called last

    def _pool(self) -> _Pool:
        loop = asyncio.get_running_loop()
        pool = self._last
        if pool is not None and pool._loop_ref() is loop and not pool.closing:
            return pool
        with self._lock:
            pool = self._pools.get(loop)
            if pool is None:
                pool = self._pools[loop] = _Pool(self, loop)
            self._last = pool
        return pool

    async def run(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        *,
        timeout: float | None,
        step_name: str,
    ) -> Any:
        pool = self._pool()
        loop = pool.loop
        job = _Job(fn, args, kwargs, step_name, loop.create_future())
        pool.submit(job)
        timer = None if timeout is None else loop.call_later(timeout, pool.expire, job, timeout)
        try:
            return await job.future
        except BaseException:
            pool.abandon(job)
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def hold(self) -> _Pool:
        """Keep this loop's workers between calls until :meth:`release` (a run holds them)."""
        pool = self._pool()
        pool.holders += 1
        return pool

    async def release(self, held: _Pool, *, stop: bool = False) -> None:
        """Let go of what :meth:`hold` returned; with ``stop``, the last holder stops the workers
        and waits for them (else they leave once idle for ``IDLE_SECONDS``)."""
        held.holders -= 1
        if held.holders <= 0 and stop:
            await held.close()

    async def aclose(self) -> None:
        """Stop this loop's workers and wait for them; threads of abandoned calls finish on their own."""
        pool = self._pools.get(asyncio.get_running_loop())
        if pool is not None:
            await pool.close()

    def _forget(self, pool: _Pool) -> None:
        with self._lock:
            if self._pools.get(pool.loop) is pool:
                del self._pools[pool.loop]
            if self._last is pool:
                self._last = None


_QUEUED, _ABANDONED, _DONE = range(3)  # a call's way through a pool, as the loop sees it


class _Job:
    """One call on its way to a worker thread and back."""

    __slots__ = (
        "args", "context", "error", "finished", "fn", "future", "kwargs", "replaced", "result",
        "started", "state", "step_name",
    )  # fmt: skip

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        step_name: str,
        future: asyncio.Future[Any],
    ) -> None:
        self.fn, self.args, self.kwargs, self.step_name, self.future = fn, args, kwargs, step_name, future
        self.context = contextvars.copy_context()
        self.state = _QUEUED
        self.started = self.finished = False
        self.replaced = False  # abandoned while running: its thread retires after it, a new one took over
        self.result: Any = None
        self.error: BaseException | None = None


class _Pool:
    """One loop's worker threads for one :class:`ThreadExecutor`.

    Every call goes straight into one queue, and a worker that finishes a call takes the next
    without waiting for the loop. The bound is the number of workers: at most ``limit`` of them
    exist besides the ones *retiring* (running a call that was abandoned while it ran: that
    thread leaves after it, and a new one may take its place). The counters belong to the loop's
    thread; a call's start, end and abandonment meet under ``_lock``, so the loop and the worker
    agree on whether the worker retires.
    """

    def __init__(self, owner: ThreadExecutor, loop: asyncio.AbstractEventLoop) -> None:
        self.owner = owner
        self.limit = owner.max_threads
        self.holders = 0
        self.pending = 0  # calls someone awaits and whose result is not handed back yet
        self.workers = 0  # threads started whose leaving was not handed back yet
        self.retiring = 0
        self.closing = False
        self.jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._finished: list[_Job | tuple[threading.Thread, bool]] = []
        self._lock = threading.Lock()
        self._wake_pending = False
        self._started = 0
        self._idle: asyncio.Future[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._loop_ref = weakref.ref(loop)  # the owner holds pools by loop, weakly: not the loop alive

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop_ref()
        assert loop is not None, "a pool is used only on its own running loop"
        return loop

    # ------------------------------------------------------------------ on the loop

    def submit(self, job: _Job) -> None:
        self.pending += 1
        self.jobs.put(job)
        if self.workers - self.retiring < self.limit and self.workers - self.retiring < self.pending:
            self._spawn()

    def _spawn(self) -> None:
        if self._keeper is None and not self.closing:
            self._keeper = self.loop.create_task(self._keep(), name="flowyml-thread-pool")
        name = f"flowyml-thread_{self._started}"
        self._started += 1
        threading.Thread(target=self._work, name=name, daemon=True).start()
        self.workers += 1
        if self.closing:
            self.jobs.put(None)

    def _fill(self) -> None:
        """Start workers while calls outnumber them (a worker left idle, or one is retiring).

        Then, closing, tell :meth:`close` when only retiring workers are left.
        """
        while self.workers - self.retiring < min(self.limit, self.pending):
            self._spawn()
        if self._idle is not None and self.workers <= self.retiring and not self._idle.done():
            self._idle.set_result(None)

    def expire(self, job: _Job, timeout: float) -> None:
        """The call's timeout passed: its awaiter gets the timeout error now, the call is abandoned."""
        if not job.future.done():
            job.future.set_exception(StepTimeoutError(job.step_name, timeout, executor=self.owner.name))
            self.abandon(job)

    def abandon(self, job: _Job) -> None:
        """Nobody awaits ``job`` any more (no-op once its result was handed back).

        Not started, it never will be; running, its thread retires after it and the slot goes
        to a new thread; finished, its result is dropped when it comes back.

        The new thread starts once the loop has run what is ready now: calls given up together
        (timers due at once, a failing run cancelling its steps) are all abandoned first, so it
        does not start a queued one that is being abandoned too (that left a stuck thread per call).
        """
        if job.state != _QUEUED:
            return
        with self._lock:
            job.state = _ABANDONED
            job.replaced = job.started and not job.finished
        self.pending -= 1
        if job.replaced:
            self.owner.abandoned += 1
            self.retiring += 1
            self.loop.call_soon(self._fill)
        if job.future.done() and not job.future.cancelled():
            job.future.exception()  # retrieved: no "never retrieved" warning for a timeout nobody read

    def _hand_back(self) -> None:
        with self._lock:
            finished, self._finished = self._finished, []
            self._wake_pending = False
        left = False
        for item in finished:
            if isinstance(item, tuple):
                thread, retired = item
                self.workers -= 1
                self.retiring -= retired
                thread.join()  # it has returned from its work already
                left = True
                continue
            if item.state == _ABANDONED:  # it had finished when it was abandoned: nobody to tell
                continue
            item.state = _DONE
            self.pending -= 1
            future = item.future
            if not future.done():
                if item.error is None:
                    future.set_result(item.result)
                else:
                    future.set_exception(item.error)
        if left:
            self._fill()

    async def _keep(self) -> None:
        """Waits for the loop's shutdown (``asyncio.run`` cancels every task left), then closes."""
        try:
            await self.loop.create_future()
        except asyncio.CancelledError:
            self._keeper = None
            await self.close()
            raise

    async def close(self) -> None:
        """Stop the workers and wait until every one not running an abandoned call has left."""
        keeper, self._keeper = self._keeper, None
        if keeper is not None and keeper is not asyncio.current_task():
            keeper.cancel()
        if not self.closing:
            self.closing = True
            self.owner._forget(self)
            for _ in range(self.workers - self.retiring):
                self.jobs.put(None)
        if self.workers > self.retiring:
            if self._idle is None:
                self._idle = self.loop.create_future()
            await asyncio.shield(self._idle)

    # ------------------------------------------------------------------ in the workers

    def _work(self) -> None:
        jobs, idle, lock = self.jobs, self.owner.IDLE_SECONDS, self._lock
        retired = False
        try:
            while not retired:
                try:
                    job = jobs.get(timeout=idle)
                except queue.Empty:
                    return
                if job is None:
                    return
                with lock:
                    job.started = True
                    wanted = job.state == _QUEUED
                if not wanted:  # abandoned before it started: nobody waits for it
                    continue
                try:
                    job.result = job.context.run(job.fn, *job.args, **job.kwargs)
                except StopIteration as exc:  # a future cannot carry it
                    job.error = RuntimeError(f"step {job.step_name!r} raised StopIteration")
                    job.error.__cause__ = exc
                except BaseException as exc:
                    job.error = exc
                with lock:
                    job.finished = True
                    retired = job.replaced
                if retired:  # said here, not on the loop: a run's loop may be closed by now
                    logger.warning(
                        "thread step %r finished after it was abandoned; its result was discarded",
                        job.step_name,
                    )
                elif not self._report(job):
                    return
                del job
        finally:
            self._report((threading.current_thread(), retired))

    def _report(self, item: _Job | tuple[threading.Thread, bool]) -> bool:
        """Queue a finished call (or this leaving thread) for the loop; wake it unless a wake is pending."""
        with self._lock:
            self._finished.append(item)
            if self._wake_pending:
                return True
            self._wake_pending = True
        loop = self._loop_ref()
        if loop is None:
            return False
        try:
            loop.call_soon_threadsafe(self._hand_back)
        except RuntimeError:  # the loop closed: nobody is left to hand results to
            return False
        return True


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

    def hold(self) -> _Pool:
        """Keep the thread workers between calls until :meth:`release` (see :meth:`ThreadExecutor.hold`)."""
        return self._threads.hold()

    async def release(self, held: _Pool, *, stop: bool = False) -> None:
        await self._threads.release(held, stop=stop)

    async def aclose(self) -> None:
        await self._threads.aclose()


def _is_async(fn: Any) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(type(fn), "__call__", None)  # noqa: B004 - a callable object's method
    return call is not None and not inspect.isroutine(fn) and inspect.iscoroutinefunction(call)
