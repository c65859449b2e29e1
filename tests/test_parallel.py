"""Tests for flowyml._parallel: parallel_map on threads, processes and the event loop."""

from __future__ import annotations

import asyncio
import inspect
import threading

import pytest

from flowyml._errors import ConfigError
from flowyml._parallel import parallel_map


class InFlight:
    """Counts concurrent calls and remembers the peak (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = self.peak = 0
        self.started: list[int] = []

    def enter(self, item: int) -> None:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
            self.started.append(item)

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


class TestThreadBackend:
    def test_results_in_input_order(self) -> None:
        """Results come back in input order even when later items finish first."""
        gate = threading.Barrier(4)

        def func(x: int) -> int:
            gate.wait(timeout=10)  # all four run together, so completion order is arbitrary
            return x * x

        assert parallel_map(func, [3, 1, 4, 2], num_workers=4) == [9, 1, 16, 4]

    def test_accepts_any_iterable(self) -> None:
        """Generators are fine; an empty input gives an empty list."""
        assert parallel_map(str, (i for i in range(3))) == ["0", "1", "2"]
        assert parallel_map(str, []) == []

    def test_concurrency_is_bounded_by_num_workers(self) -> None:
        """Exactly num_workers calls run at once: never more, and the barrier proves as many."""
        counter = InFlight()
        gate = threading.Barrier(3)

        def func(x: int) -> int:
            counter.enter(x)
            try:
                gate.wait(timeout=10)  # breaks (and fails the test) unless three run together
                return x
            finally:
                counter.leave()

        assert parallel_map(func, range(12), num_workers=3) == list(range(12))
        assert counter.peak == 3

    def test_error_names_the_index_and_cancels_the_rest(self) -> None:
        """The first exception is raised as is, noted with its index; queued items never start."""
        counter = InFlight()
        noted = threading.Event()

        class Noted(ValueError):
            """Tells the blocked items when parallel_map, after cancelling the queue, notes it."""

            def add_note(self, note: str) -> None:
                super().add_note(note)
                noted.set()

        error = Noted("bad item")

        def func(x: int) -> int:
            counter.enter(x)
            counter.leave()
            if x == 1:
                raise error
            noted.wait(10)  # every other item holds its worker until the failure has been handled
            return x

        with pytest.raises(ValueError) as info:
            parallel_map(func, range(200), num_workers=2)
        assert info.value is error
        assert info.value.__notes__ == ["parallel_map: item 1 failed"]
        # Items 0 and 1, and item 2 if the failed worker took it before the queue was cancelled.
        assert set(counter.started) <= {0, 1, 2}

    def test_runs_in_worker_threads(self) -> None:
        """The thread backend does not run items on the calling thread."""
        caller = threading.get_ident()
        idents = parallel_map(lambda _: threading.get_ident(), range(4), num_workers=2)
        assert caller not in idents


class TestProcessBackend:
    @pytest.mark.slow
    def test_lambda_and_closure(self) -> None:
        """Lambdas and closures are shipped with cloudpickle; results keep their order."""
        factor = 7
        assert parallel_map(lambda x: x * factor, range(6), num_workers=2, backend="process") == [
            0,
            7,
            14,
            21,
            28,
            35,
        ]

    @pytest.mark.slow
    def test_error_names_the_index(self) -> None:
        """An exception raised in a worker process comes back with the item's index noted."""

        def func(x: int) -> int:
            if x == 3:
                raise KeyError(x)
            return x

        with pytest.raises(KeyError) as info:
            parallel_map(func, range(5), num_workers=2, backend="process")
        assert "parallel_map: item 3 failed" in info.value.__notes__


class TestAsyncForm:
    def test_returns_a_coroutine(self) -> None:
        """An async func makes parallel_map return an awaitable instead of running."""

        async def func(x: int) -> int:
            return x

        coro = parallel_map(func, [1])
        assert inspect.iscoroutine(coro)
        coro.close()

    async def test_results_in_input_order(self) -> None:
        """Awaited results come back in input order."""

        async def func(x: int) -> int:
            for _ in range(10 - x):  # later items finish first
                await asyncio.sleep(0)
            return x * 10

        assert await parallel_map(func, range(10), num_workers=10) == [x * 10 for x in range(10)]

    async def test_empty_input(self) -> None:
        """No items, no calls, an empty list."""

        async def func(x: int) -> int:
            raise AssertionError

        assert await parallel_map(func, []) == []

    async def test_concurrency_is_bounded_by_num_workers(self) -> None:
        """At most num_workers coroutines run at once, and that many do."""
        counter = InFlight()
        gate = asyncio.Barrier(4)

        async def func(x: int) -> int:
            counter.enter(x)
            try:
                # Passes only when four calls run together; the timeout only guards against a hang.
                await asyncio.wait_for(gate.wait(), 10)
                return x
            finally:
                counter.leave()

        assert await parallel_map(func, range(48), num_workers=4) == list(range(48))
        assert counter.peak == 4

    async def test_error_names_the_index_and_cancels_the_rest(self) -> None:
        """The first failure is raised with its index; in-flight calls are cancelled, queued never start."""
        started: list[int] = []
        cancelled: list[int] = []

        async def func(x: int) -> int:
            started.append(x)
            if x == 1:
                await asyncio.sleep(0)
                raise ValueError(x)
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(x)
                raise
            return x

        with pytest.raises(ValueError) as info:
            await parallel_map(func, range(100), num_workers=3)
        assert info.value.__notes__ == ["parallel_map: item 1 failed"]
        assert started == [0, 1, 2]  # the failed worker takes no new item
        assert sorted(cancelled) == [0, 2]

    async def test_cancelling_the_caller_cancels_every_call(self) -> None:
        """Cancelling the awaiting task cancels the calls in flight and waits for them."""
        cancelled: list[int] = []
        started = asyncio.Event()

        async def func(x: int) -> int:
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(x)
                raise
            return x

        task = asyncio.create_task(parallel_map(func, range(10), num_workers=3))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sorted(cancelled) == [0, 1, 2]

    async def test_process_backend_is_refused(self) -> None:
        """backend='process' with an async function is a ConfigError."""

        async def func(x: int) -> int:
            return x

        with pytest.raises(ConfigError, match="backend"):
            parallel_map(func, [1], backend="process")


class TestValidation:
    @pytest.mark.parametrize("num_workers", [0, -1, True, 2.0, "4"])
    def test_num_workers(self, num_workers: object) -> None:
        """num_workers must be an int >= 1."""
        with pytest.raises(ConfigError, match="num_workers"):
            parallel_map(str, [1], num_workers=num_workers)  # type: ignore[call-overload]

    def test_backend(self) -> None:
        """backend must be 'thread' or 'process'."""
        with pytest.raises(ConfigError, match="'thread' or 'process'"):
            parallel_map(str, [1], backend="dask")  # type: ignore[call-overload]


class TestAsyncCallables:
    """What parallel_map awaits and what it refuses."""

    async def test_parallel_map_runs_an_async_callable_object(self) -> None:
        """An object with an async __call__ is awaited, not returned as coroutines."""
        from flowyml import parallel_map

        class Double:
            async def __call__(self, x: int) -> int:
                await asyncio.sleep(0)
                return 2 * x

        assert await parallel_map(Double(), [1, 2, 3], num_workers=2) == [2, 4, 6]

    def test_parallel_map_refuses_a_function_returning_coroutines(self) -> None:
        """A plain function that returns coroutines is a ConfigError, not a list of coroutines."""
        from flowyml import parallel_map

        async def f(x: int) -> int:
            return x

        with pytest.raises(ConfigError, match="async def"):
            parallel_map(lambda x: f(x), [1, 2])
