"""``parallel_map``: apply a function to many items at once, results in input order.

Three ways to run, chosen by ``func`` and ``backend``:

- plain function, ``backend="thread"``: a ``ThreadPoolExecutor`` (I/O-bound work, or code that
  releases the GIL);
- plain function, ``backend="process"``: a ``ProcessPoolExecutor``; ``func`` is shipped once per
  worker with cloudpickle, so lambdas and closures work (items and results use plain pickle);
- ``async def`` function: ``parallel_map`` returns a coroutine that runs at most
  ``num_workers`` calls at once on the running event loop.

In every form the first exception stops the map: work that has not started is cancelled (async
calls in flight are cancelled too; threads and processes cannot be interrupted, so the call
waits for the ones already running), and that exception is raised unchanged with a note naming
the item's index. Nothing started by ``parallel_map`` outlives it.
"""

from __future__ import annotations

__all__ = ("parallel_map",)

import asyncio
import concurrent.futures as cf
import contextlib
import inspect
import multiprocessing
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, Literal, TypeVar, cast, overload

import cloudpickle

from flowyml._errors import ConfigError
from flowyml._layers import is_async_callable

T = TypeVar("T")
R = TypeVar("R")

Backend = Literal["thread", "process"]
_BACKENDS = ("thread", "process")


def _note(exc: BaseException, index: int) -> BaseException:
    with contextlib.suppress(AttributeError, TypeError):  # exceptions refusing new attributes
        exc.add_note(f"parallel_map: item {index} failed")
    return exc


# --------------------------------------------------------------------------- process workers

_worker_func: Callable[[Any], Any] | None = None


def _init_worker(payload: bytes) -> None:
    """Process-pool initializer: unpickle ``func`` once per worker."""
    global _worker_func  # per-process state, set once by the pool initializer
    _worker_func = cloudpickle.loads(payload)


def _run_in_worker(item: Any) -> Any:
    assert _worker_func is not None, "parallel_map worker used without its initializer"
    return _worker_func(item)


def _mp_context() -> multiprocessing.context.BaseContext:
    """forkserver where available: forking a process that runs threads (event loop helpers,
    thread pools) can deadlock the child, and spawn pays the interpreter start per worker."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


# --------------------------------------------------------------------------- sync backends


def _map_sync(func: Callable[[T], R], items: Sequence[T], num_workers: int, backend: Backend) -> list[R]:
    workers = min(num_workers, len(items))
    pool: cf.Executor
    if backend == "process":
        pool = cf.ProcessPoolExecutor(
            max_workers=workers,
            mp_context=_mp_context(),
            initializer=_init_worker,
            initargs=(cloudpickle.dumps(func),),
        )
        call: Callable[[Any], Any] = _run_in_worker
    else:
        pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="flowyml-parallel_map")
        call = func
    try:
        futures = [pool.submit(call, item) for item in items]
        index_of = {future: i for i, future in enumerate(futures)}
        done, _ = cf.wait(futures, return_when=cf.FIRST_EXCEPTION)
        failed = sorted(index_of[f] for f in done if f.exception() is not None)
        if failed:
            for future in futures:
                future.cancel()
            raise _note(cast(BaseException, futures[failed[0]].exception()), failed[0])
        return [cast(R, future.result()) for future in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- async form


async def _map_async(
    func: Callable[[T], Coroutine[Any, Any, R]], items: Sequence[T], num_workers: int
) -> list[R]:
    if not items:
        return []
    results: list[Any] = [None] * len(items)
    pending = iter(enumerate(items))  # shared by the workers; safe, they run on one thread

    async def worker() -> None:
        for index, item in pending:
            try:
                results[index] = await func(item)
            except Exception as exc:
                _note(exc, index)
                raise

    tasks = [asyncio.create_task(worker()) for _ in range(min(num_workers, len(items)))]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:  # in task order, which is not item order; the first to fail wins
            if task in done and not task.cancelled() and task.exception() is not None:
                raise cast(BaseException, task.exception())
        return cast(list[R], results)
    finally:
        for task in tasks:
            task.cancel()
        # Wait for the cancelled calls to unwind and retrieve every outcome (no "never retrieved").
        await asyncio.gather(*tasks, return_exceptions=True)


# --------------------------------------------------------------------------- entry point


@overload
def parallel_map(  # type: ignore[overload-overlap]
    func: Callable[[T], Coroutine[Any, Any, R]],
    items: Iterable[T],
    num_workers: int = 4,
    backend: Backend = "thread",
) -> Coroutine[Any, Any, list[R]]: ...


@overload
def parallel_map(
    func: Callable[[T], R], items: Iterable[T], num_workers: int = 4, backend: Backend = "thread"
) -> list[R]: ...


def parallel_map(
    func: Callable[[T], Any], items: Iterable[T], num_workers: int = 4, backend: Backend = "thread"
) -> list[Any] | Coroutine[Any, Any, list[Any]]:
    """Call ``func(item)`` for every item, ``num_workers`` at a time; return results in input order.

    With an ``async def`` ``func`` this returns a coroutine to await inside the running loop
    (``await parallel_map(fetch, urls, num_workers=10)``); ``backend`` must then be "thread"
    (the default; async calls run on the loop either way).

    Raises:
        ConfigError: ``num_workers`` is not an int >= 1, or ``backend`` is not "thread" or "process".
        Exception: the first exception raised by ``func``, with a note naming the item's index.
    """
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ConfigError(f"parallel_map num_workers must be an int >= 1, got {num_workers!r}")
    if backend not in _BACKENDS:
        raise ConfigError(f"parallel_map backend must be 'thread' or 'process', got {backend!r}")
    if not callable(func):
        raise ConfigError(f"parallel_map func must be callable, got {func!r}")
    materialized = list(items)
    if is_async_callable(func):
        if backend != "thread":
            raise ConfigError(
                f"parallel_map backend={backend!r} cannot run an async function; async functions "
                "run on the event loop, so leave backend at its default"
            )
        return _map_async(func, materialized, num_workers)
    if not materialized:
        return []
    results = _map_sync(func, materialized, num_workers, backend)
    pending = [r for r in results if inspect.isawaitable(r)]
    if pending:
        for r in pending:
            if inspect.iscoroutine(r):
                r.close()
        raise ConfigError(
            f"parallel_map: {func!r} returned awaitables instead of values; pass an async def function "
            "(then `await parallel_map(...)`), not a plain function that returns coroutines"
        )
    return results
