"""Tests for flowyml._breaker: the circuit breaker state machine, its wrappers and concurrency."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import threading
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from flowyml._breaker import CircuitBreaker, CircuitState, CircuitStats
from flowyml._errors import CircuitOpenError, ConfigError


class FakeClock:
    """A monotonic clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def ok() -> str:
    return "ok"


def fail() -> None:
    raise ConnectionError("down")


def make(threshold: int = 3, timeout: float = 60.0, **kwargs: Any) -> tuple[CircuitBreaker, FakeClock]:
    clock = FakeClock()
    return CircuitBreaker(threshold, timeout, clock=clock, **kwargs), clock


def trip(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.failure_threshold):
        with pytest.raises(ConnectionError):
            breaker.call(fail)
    assert breaker.state is CircuitState.OPEN


class TestClosedAndOpen:
    def test_starts_closed(self) -> None:
        """A new breaker is closed with no failures."""
        breaker, _ = make()
        assert (breaker.state, breaker.failure_count) == (CircuitState.CLOSED, 0)

    def test_trips_after_threshold_consecutive_failures(self) -> None:
        """failure_threshold consecutive failures open it; one fewer does not."""
        breaker, _ = make(threshold=3)
        for _ in range(2):
            with pytest.raises(ConnectionError):
                breaker.call(fail)
        assert breaker.state is CircuitState.CLOSED
        with pytest.raises(ConnectionError):
            breaker.call(fail)
        assert breaker.state is CircuitState.OPEN

    def test_success_resets_the_count(self) -> None:
        """F, F, S, F, F stays closed at threshold 3."""
        breaker, _ = make(threshold=3)
        for func in (fail, fail, ok, fail, fail):
            with contextlib.suppress(ConnectionError):
                breaker.call(func)
        assert (breaker.state, breaker.failure_count) == (CircuitState.CLOSED, 2)

    def test_open_refuses_without_calling(self) -> None:
        """While open, calls raise CircuitOpenError and the function never runs."""
        breaker, _ = make()
        trip(breaker)
        calls: list[int] = []
        with pytest.raises(CircuitOpenError):
            breaker.call(calls.append, 1)
        assert calls == []

    def test_refusal_says_when_it_may_close(self) -> None:
        """The error names the breaker and the seconds left; retry_after holds them."""
        breaker, clock = make(timeout=60.0, name="payments")
        trip(breaker)
        clock.advance(15.0)
        with pytest.raises(CircuitOpenError, match=r"'payments' is open .* in 45s") as info:
            breaker.call(ok)
        assert info.value.retry_after == 45.0

    def test_unnamed_breaker_names_the_function(self) -> None:
        """Without a name, the refusal names the protected function."""
        breaker, _ = make()
        trip(breaker)
        with pytest.raises(CircuitOpenError, match="for ok is open"):
            breaker.call(ok)

    def test_unexpected_exceptions_are_neutral(self) -> None:
        """Exceptions outside expected_exceptions neither count nor reset."""
        breaker, _ = make(threshold=2, expected_exceptions=(ConnectionError,))
        with pytest.raises(ConnectionError):
            breaker.call(fail)
        with pytest.raises(KeyError):
            breaker.call({}.__getitem__, "missing")
        assert breaker.failure_count == 1

    def test_keyboard_interrupt_is_neutral(self) -> None:
        """KeyboardInterrupt passes through and is not counted."""
        breaker, _ = make(threshold=1)

        def interrupted() -> None:
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            breaker.call(interrupted)
        assert (breaker.state, breaker.failure_count) == (CircuitState.CLOSED, 0)


class TestRecovery:
    def test_half_open_after_recovery_timeout(self) -> None:
        """After recovery_timeout on the injected clock the breaker reads half-open."""
        breaker, clock = make(timeout=60.0)
        trip(breaker)
        clock.advance(59.999)
        assert breaker.state is CircuitState.OPEN
        clock.advance(0.001)
        assert breaker.state is CircuitState.HALF_OPEN

    def test_trial_success_closes(self) -> None:
        """A successful trial call closes the breaker and clears the count."""
        breaker, clock = make()
        trip(breaker)
        clock.advance(60.0)
        assert breaker.call(ok) == "ok"
        assert (breaker.state, breaker.failure_count) == (CircuitState.CLOSED, 0)

    def test_trial_failure_reopens_with_a_fresh_timer(self) -> None:
        """A failed trial reopens the breaker for another full recovery_timeout."""
        breaker, clock = make(timeout=60.0)
        trip(breaker)
        clock.advance(100.0)
        with pytest.raises(ConnectionError):
            breaker.call(fail)
        assert breaker.state is CircuitState.OPEN
        assert breaker.stats().retry_after == 60.0

    def test_neutral_trial_frees_its_slot(self) -> None:
        """A trial ending in an unexpected exception leaves the breaker half-open for the next one."""
        breaker, clock = make(expected_exceptions=ConnectionError)
        trip(breaker)
        clock.advance(60.0)
        with pytest.raises(KeyError):
            breaker.call({}.__getitem__, "missing")
        assert breaker.state is CircuitState.HALF_OPEN
        assert breaker.call(ok) == "ok"

    def test_zero_recovery_timeout_goes_half_open_at_once(self) -> None:
        """recovery_timeout=0 allows a trial immediately."""
        breaker, _ = make(timeout=0.0)
        for _ in range(3):
            with pytest.raises(ConnectionError):
                breaker.call(fail)
        assert breaker.state is CircuitState.HALF_OPEN


class TestConcurrency:
    async def test_one_of_fifty_async_callers_runs_the_trial(self) -> None:
        """50 tasks arriving together in half-open: exactly one runs, 49 are refused."""
        breaker, clock = make()
        trip(breaker)
        clock.advance(60.0)
        release = asyncio.Event()
        ran = 0

        async def probe() -> str:
            nonlocal ran
            ran += 1
            await release.wait()
            return "ok"

        tasks = [asyncio.create_task(breaker.call(probe)) for _ in range(50)]
        while sum(t.done() for t in tasks) < 49:
            await asyncio.sleep(0)
        release.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert ran == 1
        assert results.count("ok") == 1
        assert sum(isinstance(r, CircuitOpenError) for r in results) == 49
        assert breaker.state is CircuitState.CLOSED

    def test_one_of_fifty_threads_runs_the_trial(self) -> None:
        """50 threads released together in half-open: exactly one runs, 49 are refused."""
        breaker, clock = make()
        trip(breaker)
        clock.advance(60.0)
        start = threading.Barrier(50)
        refused = threading.Semaphore(0)
        lock = threading.Lock()
        ran = 0
        outcomes: list[object] = []

        def probe() -> str:
            nonlocal ran
            with lock:
                ran += 1
            for _ in range(49):  # hold the slot until every other thread has been refused
                assert refused.acquire(timeout=10)
            return "ok"

        def caller() -> None:
            start.wait(timeout=10)
            try:
                outcome: object = breaker.call(probe)
            except CircuitOpenError as exc:
                outcome = exc
                refused.release()
            with lock:
                outcomes.append(outcome)

        threads = [threading.Thread(target=caller) for _ in range(50)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert ran == 1
        assert outcomes.count("ok") == 1
        assert sum(isinstance(o, CircuitOpenError) for o in outcomes) == 49

    async def test_half_open_max_calls_trials_run_together(self) -> None:
        """half_open_max_calls=3 lets exactly three trial calls through at once."""
        breaker, clock = make(half_open_max_calls=3)
        trip(breaker)
        clock.advance(60.0)
        release = asyncio.Event()
        ran = 0

        async def probe() -> None:
            nonlocal ran
            ran += 1
            await release.wait()

        tasks = [asyncio.create_task(breaker.call(probe)) for _ in range(20)]
        while sum(t.done() for t in tasks) < 17:
            await asyncio.sleep(0)
        assert breaker.stats().trial_calls_in_flight == 3
        release.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert ran == 3

    @pytest.mark.slow
    async def test_closed_breaker_does_not_serialize_calls(self) -> None:
        """100 concurrent 50 ms calls through a closed breaker are all in flight together."""
        breaker = CircuitBreaker()
        in_flight = peak = 0

        @breaker
        async def call() -> None:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.05)
            in_flight -= 1

        await asyncio.gather(*(call() for _ in range(100)))
        assert peak > 50
        assert breaker.stats().successes == 100

    async def test_cancellation_is_not_a_failure(self) -> None:
        """A cancelled call neither counts as a failure nor resets the count."""
        breaker, _ = make(threshold=3)
        for _ in range(2):
            with pytest.raises(ConnectionError):
                breaker.call(fail)
        started = asyncio.Event()

        async def hang() -> None:
            started.set()
            await asyncio.Event().wait()

        task = asyncio.create_task(breaker.call(hang))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (breaker.state, breaker.failure_count) == (CircuitState.CLOSED, 2)

    async def test_cancelled_trial_frees_the_slot(self) -> None:
        """A cancelled trial leaves the breaker half-open, and the next caller may try."""
        breaker, clock = make()
        trip(breaker)
        clock.advance(60.0)
        started = asyncio.Event()

        async def hang() -> None:
            started.set()
            await asyncio.Event().wait()

        task = asyncio.create_task(breaker.call(hang))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert breaker.state is CircuitState.HALF_OPEN
        assert breaker.call(ok) == "ok"

    async def test_stale_call_cannot_close_a_reopened_breaker(self) -> None:
        """A call admitted while closed that succeeds after the breaker opened changes nothing."""
        breaker, clock = make(threshold=2)
        release = asyncio.Event()

        async def slow_ok() -> str:
            await release.wait()
            return "ok"

        stale = asyncio.create_task(breaker.call(slow_ok))
        await asyncio.sleep(0)
        trip(breaker)
        clock.advance(60.0)
        assert breaker.state is CircuitState.HALF_OPEN
        release.set()
        assert await stale == "ok"
        assert breaker.state is CircuitState.HALF_OPEN


class TestDecorator:
    def test_sync_wrapper_keeps_metadata_and_carries_the_breaker(self) -> None:
        """The wrapper keeps __wrapped__ and name and has __flowyml_breaker__."""
        breaker = CircuitBreaker()
        wrapped = breaker(ok)
        assert wrapped() == "ok"
        assert wrapped.__wrapped__ is ok  # type: ignore[attr-defined]
        assert wrapped.__name__ == "ok"
        assert wrapped.__flowyml_breaker__ is breaker  # type: ignore[attr-defined]
        assert not inspect.iscoroutinefunction(wrapped)

    async def test_async_wrapper_is_async_and_trips(self) -> None:
        """An async function gets an async wrapper that counts its failures."""
        breaker = CircuitBreaker(failure_threshold=2)

        @breaker
        async def down() -> None:
            raise ConnectionError

        assert inspect.iscoroutinefunction(down)
        for _ in range(2):
            with pytest.raises(ConnectionError):
                await down()
        with pytest.raises(CircuitOpenError):
            await down()

    async def test_call_returns_a_coroutine_for_async_functions(self) -> None:
        """breaker.call(async_func) returns an awaitable that runs through the breaker."""
        breaker = CircuitBreaker()

        async def value(x: int) -> int:
            return x * 2

        coro = breaker.call(value, 21)
        assert inspect.iscoroutine(coro)
        assert await coro == 42

    def test_shared_breaker_protects_every_function(self) -> None:
        """Failures through one function open the breaker for another."""
        breaker = CircuitBreaker(failure_threshold=2)
        failing, healthy = breaker(fail), breaker(ok)
        for _ in range(2):
            with pytest.raises(ConnectionError):
                failing()
        with pytest.raises(CircuitOpenError):
            healthy()

    def test_drops_a_copied_retry_marker(self) -> None:
        """A retry marker copied from an inner wrapper does not describe the outer one."""

        def inner() -> None: ...

        inner.__flowyml_retry__ = object()  # type: ignore[attr-defined]
        assert not hasattr(CircuitBreaker()(inner), "__flowyml_retry__")


class TestControl:
    def test_record_failure_counts_and_opens(self) -> None:
        """record_failure counts like a failed call and opens at the threshold."""
        breaker, _ = make(threshold=2)
        breaker.record_failure(TimeoutError())
        assert breaker.failure_count == 1
        breaker.record_failure()
        assert breaker.state is CircuitState.OPEN

    def test_record_failure_reopens_half_open(self) -> None:
        """record_failure while half-open reopens the breaker."""
        breaker, clock = make()
        trip(breaker)
        clock.advance(60.0)
        breaker.record_failure()
        assert breaker.state is CircuitState.OPEN

    def test_record_success_closes_half_open(self) -> None:
        """record_success while half-open closes the breaker."""
        breaker, clock = make()
        trip(breaker)
        clock.advance(60.0)
        breaker.record_success()
        assert breaker.state is CircuitState.CLOSED

    def test_reset_closes(self) -> None:
        """reset() closes an open breaker and clears the count."""
        breaker, _ = make()
        trip(breaker)
        breaker.reset()
        assert (breaker.state, breaker.failure_count, breaker.call(ok)) == (CircuitState.CLOSED, 0, "ok")

    def test_stats_is_a_frozen_snapshot(self) -> None:
        """stats() counts calls, outcomes, refusals and openings."""
        breaker, _ = make(threshold=2, name="db")
        assert breaker.call(ok) == "ok"
        trip(breaker)
        with pytest.raises(CircuitOpenError):
            breaker.call(ok)
        stats = breaker.stats()
        assert stats == CircuitStats(
            name="db",
            state=CircuitState.OPEN,
            failure_count=2,
            failure_threshold=2,
            recovery_timeout=60.0,
            retry_after=60.0,
            trial_calls_in_flight=0,
            calls=3,
            successes=1,
            failures=2,
            rejected=1,
            times_opened=1,
        )
        with pytest.raises(dataclasses.FrozenInstanceError):
            stats.calls = 0  # type: ignore[misc]

    def test_state_is_a_str_enum(self) -> None:
        """States compare equal to their names."""
        assert CircuitState.HALF_OPEN == "half_open"

    @pytest.mark.parametrize(
        ("kwargs", "option"),
        [
            ({"failure_threshold": 0}, "failure_threshold"),
            ({"failure_threshold": True}, "failure_threshold"),
            ({"recovery_timeout": -1.0}, "recovery_timeout"),
            ({"recovery_timeout": float("inf")}, "recovery_timeout"),
            ({"half_open_max_calls": 0}, "half_open_max_calls"),
            ({"expected_exceptions": (BaseException,)}, "expected_exceptions"),
            ({"name": 3}, "name"),
            ({"clock": 3.0}, "clock"),
        ],
    )
    def test_invalid_options_name_the_option(self, kwargs: dict[str, Any], option: str) -> None:
        """Bad settings raise ConfigError naming the option."""
        with pytest.raises(ConfigError, match=option):
            CircuitBreaker(**kwargs)


class BreakerModel:
    """The breaker's specification for sequential use, written as plainly as possible."""

    def __init__(self, threshold: int, timeout: float) -> None:
        self.threshold, self.timeout = threshold, timeout
        self.state, self.failures, self.opened_at = "closed", 0, 0.0

    def current(self, now: float) -> str:
        if self.state == "open" and now - self.opened_at >= self.timeout:
            self.state = "half_open"
        return self.state

    def outcome(self, kind: str, now: float) -> None:
        state = self.current(now)
        if kind == "success" and state == "closed":
            self.failures = 0
        elif kind == "success" and state == "half_open":
            self.state, self.failures = "closed", 0
        elif kind == "failure" and state == "closed":
            self.failures += 1
            if self.failures >= self.threshold:
                self.state, self.opened_at = "open", now
        elif kind == "failure" and state == "half_open":
            self.state, self.opened_at = "open", now


class BreakerMachine(RuleBasedStateMachine):
    """Random sequences of calls, clock moves and control calls against :class:`BreakerModel`."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.model = BreakerModel(threshold=3, timeout=10.0)
        self.breaker = CircuitBreaker(3, 10.0, expected_exceptions=ConnectionError, clock=lambda: self.now)

    def _function(self, kind: str, ran: list[str]) -> Callable[[], str]:
        def func() -> str:
            ran.append(kind)
            if kind == "failure":
                raise ConnectionError
            if kind == "neutral":
                raise KeyError(kind)
            return kind

        return func

    @rule(kind=st.sampled_from(["success", "failure", "neutral"]))
    def call(self, kind: str) -> None:
        ran: list[str] = []
        if self.model.current(self.now) == "open":
            with pytest.raises(CircuitOpenError):
                self.breaker.call(self._function(kind, ran))
            assert ran == []
            return
        with contextlib.suppress(ConnectionError, KeyError):
            self.breaker.call(self._function(kind, ran))
        assert ran == [kind]
        self.model.outcome(kind, self.now)

    @rule(seconds=st.sampled_from([0.5, 1.0, 4.0, 9.5, 10.0, 25.0]))
    def advance(self, seconds: float) -> None:
        self.now += seconds

    @rule()
    def record_failure(self) -> None:
        self.breaker.record_failure()
        self.model.outcome("failure", self.now)

    @rule()
    def record_success(self) -> None:
        self.breaker.record_success()
        self.model.outcome("success", self.now)

    @precondition(lambda self: self.model.state != "closed")
    @rule()
    def reset(self) -> None:
        self.breaker.reset()
        self.model.state, self.model.failures = "closed", 0

    @invariant()
    def same_state(self) -> None:
        assert self.breaker.state == self.model.current(self.now)

    @invariant()
    def same_failure_count(self) -> None:
        assert self.breaker.failure_count == self.model.failures

    @invariant()
    def retry_after_counts_down(self) -> None:
        expected = self.model.opened_at + 10.0 - self.now if self.model.current(self.now) == "open" else 0.0
        assert self.breaker.stats().retry_after == expected


TestBreakerStateMachine = BreakerMachine.TestCase
TestBreakerStateMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


class TestCallWithCoroutines:
    """breaker.call with a function that returns a coroutine."""

    async def test_breaker_call_settles_a_returned_coroutine(self) -> None:
        """breaker.call(lambda: coro()) counts the coroutine's failure, not an instant success."""
        from flowyml import CircuitBreaker

        breaker = CircuitBreaker(failure_threshold=2, recovery_timeout=60)

        async def flaky() -> None:
            raise ConnectionError("down")

        for _ in range(2):
            with pytest.raises(ConnectionError):
                await breaker.call(lambda: flaky())
        assert breaker.state == "open"
