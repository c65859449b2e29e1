"""Tests for flowyml._retry: backoff arithmetic, the policy value, the retry decorator, no_sleep."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import random
import statistics
import sys

import pytest

from flowyml import _retry
from flowyml._errors import CircuitOpenError, ConfigError
from flowyml._retry import ExponentialBackoff, Retry, RetryConfig, RetryRun, as_retry_config, retry
from flowyml.testing import no_sleep


class Flaky:
    """A callable that fails ``failures`` times with ``exc`` and then returns ``"ok"``."""

    def __init__(self, failures: int = sys.maxsize, exc: type[BaseException] = ValueError) -> None:
        self.failures = failures
        self.exc = exc
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc(f"failure {self.calls}")
        return "ok"


class TestExponentialBackoff:
    def test_formula_without_jitter(self) -> None:
        """Delays are initial * multiplier ** (n - 1), capped at max_delay."""
        backoff = ExponentialBackoff(initial=0.5, multiplier=3.0, max_delay=100.0, jitter=False)
        assert [backoff.delay(n) for n in range(1, 8)] == [0.5, 1.5, 4.5, 13.5, 40.5, 100.0, 100.0]

    def test_defaults(self) -> None:
        """The default policy waits 0.1 s, doubling, capped at 10 s."""
        backoff = ExponentialBackoff()
        assert [backoff.base_delay(n) for n in (1, 2, 3, 8, 9)] == [0.1, 0.2, 0.4, 10.0, 10.0]
        assert backoff.jitter is True

    @pytest.mark.parametrize("attempt", [1_100, 10**6, sys.maxsize])
    def test_huge_attempt_numbers_do_not_overflow(self, attempt: int) -> None:
        """Attempt numbers far beyond float range give max_delay, not OverflowError."""
        assert ExponentialBackoff(jitter=False).delay(attempt) == 10.0

    def test_multiplier_one_is_constant(self) -> None:
        """multiplier=1 gives the same delay after every attempt."""
        backoff = ExponentialBackoff(initial=0.3, multiplier=1, jitter=False)
        assert {backoff.delay(n) for n in range(1, 50)} == {0.3}

    def test_jitter_stays_within_documented_bounds(self) -> None:
        """With jitter every delay lies in [d/2, d], even for rand() at its extremes."""
        backoff = ExponentialBackoff(initial=1.0, multiplier=2.0, max_delay=30.0)
        for attempt in range(1, 10):
            d = backoff.base_delay(attempt)
            assert backoff.delay(attempt, rand=lambda: 0.0) == d / 2
            assert backoff.delay(attempt, rand=lambda: 1.0) == d
            assert d / 2 <= backoff.delay(attempt, rand=lambda: 7.0) <= d

    def test_jitter_varies_the_delays(self) -> None:
        """1,000 jittered delays stay within bounds and have a coefficient of variation above 0.05."""
        backoff = ExponentialBackoff(initial=0.2, multiplier=2.0, max_delay=10.0)
        rng = random.Random(1234)
        samples = [backoff.delay(4, rand=rng.random) for _ in range(1000)]
        d = backoff.base_delay(4)
        assert all(d / 2 <= s <= d for s in samples)
        assert statistics.pstdev(samples) / statistics.fmean(samples) > 0.05

    def test_zero_delay_with_jitter_is_zero(self) -> None:
        """A zero base delay stays exactly zero with jitter on."""
        assert ExponentialBackoff(initial=0.0).delay(5) == 0.0
        assert ExponentialBackoff(initial=1.0, max_delay=0.0).delay(5) == 0.0

    def test_attempt_numbers_start_at_one(self) -> None:
        """Attempt 0 is a programming error."""
        with pytest.raises(ValueError, match="start at 1"):
            ExponentialBackoff().delay(0)

    @pytest.mark.parametrize(
        ("kwargs", "option"),
        [
            ({"initial": -0.1}, "initial"),
            ({"initial": float("nan")}, "initial"),
            ({"max_delay": -1}, "max_delay"),
            ({"max_delay": float("inf")}, "max_delay"),
            ({"multiplier": 0.5}, "multiplier"),
            ({"multiplier": True}, "multiplier"),
            ({"initial": "1"}, "initial"),
            ({"jitter": 1}, "jitter"),
        ],
    )
    def test_invalid_options_name_the_option(self, kwargs: dict[str, object], option: str) -> None:
        """Out-of-range settings raise ConfigError naming the option."""
        with pytest.raises(ConfigError, match=option):
            ExponentialBackoff(**kwargs)  # type: ignore[arg-type]

    def test_is_frozen(self) -> None:
        """The policy is an immutable value."""
        with pytest.raises(dataclasses.FrozenInstanceError):
            ExponentialBackoff().initial = 1.0  # type: ignore[misc]


class TestRetryConfig:
    def test_float_backoff_is_the_multiplier(self) -> None:
        """backoff=3.0 becomes ExponentialBackoff(multiplier=3.0) with the other defaults."""
        assert RetryConfig(backoff=3.0).backoff == ExponentialBackoff(multiplier=3.0)

    def test_single_exception_type_becomes_a_tuple(self) -> None:
        """on=OSError is accepted and stored as a tuple."""
        assert RetryConfig(on=OSError, not_on=KeyError).on == (OSError,)

    def test_replace_keeps_validation(self) -> None:
        """dataclasses.replace goes through the same normalization."""
        config = dataclasses.replace(RetryConfig(), backoff=4.0)
        assert config.backoff.multiplier == 4.0
        with pytest.raises(ConfigError, match="max_attempts"):
            dataclasses.replace(config, max_attempts=0)

    @pytest.mark.parametrize(
        ("kwargs", "option"),
        [
            ({"max_attempts": 0}, "max_attempts"),
            ({"max_attempts": True}, "max_attempts"),
            ({"max_attempts": 2.0}, "max_attempts"),
            ({"backoff": "fast"}, "backoff"),
            ({"backoff": 0.5}, "multiplier"),
            ({"on": (KeyboardInterrupt,)}, "on"),
            ({"on": ("ValueError",)}, "on"),
            ({"not_on": asyncio.CancelledError}, "not_on"),
            ({"max_time": -1}, "max_time"),
        ],
    )
    def test_invalid_options_name_the_option(self, kwargs: dict[str, object], option: str) -> None:
        """Bad settings raise ConfigError naming the option."""
        with pytest.raises(ConfigError, match=option):
            RetryConfig(**kwargs)  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        "exc", [KeyboardInterrupt(), SystemExit(1), asyncio.CancelledError(), GeneratorExit()]
    )
    def test_base_exceptions_are_never_retried(self, exc: BaseException) -> None:
        """Cancellation, KeyboardInterrupt and SystemExit are never retried."""
        assert not RetryConfig(max_attempts=10).should_retry(exc, 1, 0.0)

    def test_open_circuit_is_never_retried(self) -> None:
        """An open breaker fails fast, even when on= would match it."""
        config = RetryConfig(max_attempts=10, on=(CircuitOpenError, RuntimeError))
        assert not config.should_retry(CircuitOpenError("open"), 1, 0.0)

    def test_only_on_types_are_retried(self) -> None:
        """An exception outside on= is not retried."""
        config = RetryConfig(on=(OSError,))
        assert config.should_retry(ConnectionError(), 1, 0.0)
        assert not config.should_retry(ValueError(), 1, 0.0)

    def test_not_on_wins_over_on(self) -> None:
        """An exception in not_on is not retried even though on= matches it."""
        config = RetryConfig(on=(LookupError,), not_on=(KeyError,))
        assert config.should_retry(IndexError(), 1, 0.0)
        assert not config.should_retry(KeyError(), 1, 0.0)

    def test_not_past_max_attempts(self) -> None:
        """Attempt max_attempts is the last one."""
        config = RetryConfig(max_attempts=3)
        assert [config.should_retry(ValueError(), n, 0.0) for n in (1, 2, 3, 4)] == [True, True, False, False]

    def test_not_when_the_next_wait_would_pass_max_time(self) -> None:
        """A retry is refused when elapsed plus the longest next wait exceeds max_time."""
        config = RetryConfig(max_attempts=10, backoff=ExponentialBackoff(initial=1.0), max_time=5.0)
        assert config.should_retry(ValueError(), 2, 3.0)  # waits at most 2 s: 5.0 is allowed
        assert not config.should_retry(ValueError(), 2, 3.5)
        assert not config.should_retry(ValueError(), 1, 6.0)

    def test_stop_reason_explains(self) -> None:
        """stop_reason names the rule that ended the call."""
        config = RetryConfig(on=(OSError,))
        assert config.stop_reason(ValueError(), 1, 0.0) == "ValueError is not in on=(OSError,)"
        assert config.stop_reason(OSError(), 1, 0.0) is None

    def test_delay_delegates_to_backoff(self) -> None:
        """RetryConfig.delay is the backoff's delay."""
        config = RetryConfig(backoff=ExponentialBackoff(initial=2.0, jitter=False))
        assert config.delay(3) == 8.0


class TestAsRetryConfig:
    def test_int_counts_retries_after_the_first_attempt(self) -> None:
        """retry=3 means four attempts with the default backoff."""
        assert as_retry_config(3) == RetryConfig(max_attempts=4, backoff=ExponentialBackoff())

    @pytest.mark.parametrize("value", [0, None])
    def test_zero_and_none_mean_no_retries(self, value: int | None) -> None:
        """retry=0 and retry=None give no policy."""
        assert as_retry_config(value) is None

    def test_policy_objects_pass_through(self) -> None:
        """A RetryConfig is returned as is, a Retry gives its config."""
        config = RetryConfig(max_attempts=7)
        assert as_retry_config(config) is config
        assert as_retry_config(Retry(config)) is config

    @pytest.mark.parametrize("value", [-1, True, False, 2.0, "3", [3]])
    def test_invalid_values_name_the_option(self, value: object) -> None:
        """Negative numbers, bools, floats and other types raise ConfigError naming the option."""
        with pytest.raises(ConfigError, match=r"^retry= must be an int >= 0"):
            as_retry_config(value)  # type: ignore[arg-type]

    def test_option_name_is_configurable(self) -> None:
        """The caller decides which option the message names."""
        with pytest.raises(ConfigError, match=r"^my_step\.retry="):
            as_retry_config(-2, option="my_step.retry")


class TestRetryDecorator:
    def test_always_failing_calls_exactly_max_attempts(self) -> None:
        """max_attempts=4 calls an always-failing function 4 times, then raises."""
        func = Flaky()
        with no_sleep(), pytest.raises(ValueError, match="failure 4"):
            retry(max_attempts=4)(func)()
        assert func.calls == 4

    async def test_async_always_failing_calls_exactly_max_attempts(self) -> None:
        """The async wrapper counts attempts the same way."""
        calls = 0

        async def func() -> None:
            nonlocal calls
            calls += 1
            raise ValueError(calls)

        with no_sleep(), pytest.raises(ValueError, match="4"):
            await retry(max_attempts=4)(func)()
        assert calls == 4

    def test_returns_the_first_success(self) -> None:
        """A function that recovers returns its value and stops retrying."""
        func = Flaky(failures=2)
        with no_sleep() as delays:
            assert retry(max_attempts=5)(func)() == "ok"
        assert func.calls == 3
        assert len(delays) == 2

    def test_delays_follow_the_formula_exactly(self) -> None:
        """With jitter off the recorded waits are initial * backoff ** (n - 1), capped."""
        decorated = retry(max_attempts=5, backoff=3.0, initial=0.25, max_delay=5.0, jitter=False)(Flaky())
        with no_sleep() as delays, pytest.raises(ValueError):
            decorated()
        assert delays == [0.25, 0.75, 2.25, 5.0]

    def test_jittered_waits_vary_within_bounds(self) -> None:
        """1,000 waits recorded from real retries lie in [d/2, d] with a CV above 0.05."""
        decorated = retry(max_attempts=2, initial=1.0, jitter=True)(Flaky())
        with no_sleep() as delays:
            for _ in range(1000):
                with pytest.raises(ValueError):
                    decorated()
        assert len(delays) == 1000
        assert all(0.5 <= d <= 1.0 for d in delays)
        assert statistics.pstdev(delays) / statistics.fmean(delays) > 0.05

    def test_only_on_exceptions_are_retried(self) -> None:
        """An exception outside on= propagates after one call."""
        func = Flaky(exc=ValueError)
        with no_sleep() as delays, pytest.raises(ValueError):
            retry(max_attempts=5, on=(OSError,))(func)()
        assert (func.calls, delays) == (1, [])

    def test_on_exceptions_are_retried(self) -> None:
        """Subclasses of an on= type are retried."""
        func = Flaky(failures=2, exc=ConnectionError)
        with no_sleep():
            assert retry(max_attempts=5, on=OSError)(func)() == "ok"
        assert func.calls == 3

    def test_not_on_exceptions_are_not_retried(self) -> None:
        """An exception in not_on propagates after one call."""
        func = Flaky(exc=KeyError)
        with no_sleep(), pytest.raises(KeyError):
            retry(max_attempts=5, not_on=(KeyError,))(func)()
        assert func.calls == 1

    def test_keyboard_interrupt_is_never_retried(self) -> None:
        """KeyboardInterrupt goes straight through, untouched."""
        func = Flaky(exc=KeyboardInterrupt)
        with no_sleep(), pytest.raises(KeyboardInterrupt) as info:
            retry(max_attempts=5, on=Exception)(func)()
        assert func.calls == 1
        assert not hasattr(info.value, "attempts")

    async def test_cancelled_error_is_never_retried(self) -> None:
        """A CancelledError raised by the function propagates after one call."""
        calls = 0

        async def func() -> None:
            nonlocal calls
            calls += 1
            raise asyncio.CancelledError

        with no_sleep(), pytest.raises(asyncio.CancelledError):
            await retry(max_attempts=5)(func)()
        assert calls == 1

    async def test_cancelling_during_the_wait_stops_retrying(self) -> None:
        """Cancelling a task while it waits between attempts ends it; nothing runs again."""
        calls = 0
        first_call = asyncio.Event()

        @retry(max_attempts=5, initial=60.0)
        async def func() -> None:
            nonlocal calls
            calls += 1
            first_call.set()
            raise ValueError

        task = asyncio.create_task(func())
        await first_call.wait()
        await asyncio.sleep(0)  # let the wrapper reach its backoff wait
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert calls == 1

    def test_open_circuit_is_not_retried(self) -> None:
        """CircuitOpenError propagates after one call."""
        func = Flaky(exc=CircuitOpenError)
        with no_sleep(), pytest.raises(CircuitOpenError):
            retry(max_attempts=5)(func)()
        assert func.calls == 1

    def test_last_exception_is_raised_unchanged_with_attempts(self) -> None:
        """The very exception object of the last attempt is raised, with .attempts and a note."""
        errors: list[ValueError] = []

        def func() -> None:
            errors.append(ValueError(len(errors)))
            raise errors[-1]

        with no_sleep(), pytest.raises(ValueError) as info:
            retry(max_attempts=3)(func)()
        assert info.value is errors[-1]
        assert info.value.attempts == 3  # type: ignore[attr-defined]
        assert info.value.__notes__ == ["flowyml retry: gave up after 3 attempts (max_attempts=3 reached)"]
        assert info.value.__context__ is None  # earlier attempts are not chained in

    def test_exception_refusing_attributes_still_propagates(self) -> None:
        """An exception whose __setattr__ refuses .attempts is re-raised as is."""

        class Stubborn(Exception):
            def __setattr__(self, name: str, value: object) -> None:
                raise AttributeError(name)

        func = Flaky(exc=Stubborn)
        with no_sleep(), pytest.raises(Stubborn) as info:
            retry(max_attempts=2)(func)()
        assert not hasattr(info.value, "attempts")

    def test_max_time_is_respected(self) -> None:
        """No retry starts whose wait would run past max_time on the (skipped-sleep) clock."""
        func = Flaky()
        decorated = retry(max_attempts=10, initial=1.0, backoff=2.0, jitter=False, max_time=5.0)(func)
        with no_sleep() as delays, pytest.raises(ValueError) as info:
            decorated()
        assert delays == [1.0, 2.0]  # 1 + 2 = 3 s elapsed; waiting 4 more would pass 5 s
        assert func.calls == 3
        assert "max_time=5s" in info.value.__notes__[0]

    def test_sync_wrapper_keeps_metadata(self) -> None:
        """The wrapper keeps name, signature and __wrapped__, and carries the config."""

        def fetch(url: str, *, timeout: float = 1.0) -> str:
            """Fetch."""
            return url

        policy = retry(max_attempts=2)
        wrapped = policy(fetch)
        assert wrapped.__name__ == "fetch"
        assert wrapped.__doc__ == "Fetch."
        assert wrapped.__wrapped__ is fetch  # type: ignore[attr-defined]
        assert inspect.signature(wrapped) == inspect.signature(fetch)
        assert wrapped.__flowyml_retry__ is policy.config  # type: ignore[attr-defined]
        assert not inspect.iscoroutinefunction(wrapped)

    def test_wrapper_carries_only_its_own_marker(self) -> None:
        """Markers of inner layers are not copied up; they stay reachable through __wrapped__."""

        def inner() -> None: ...

        inner.__flowyml_breaker__ = "breaker"  # type: ignore[attr-defined]
        inner.__flowyml_condition__ = "condition"  # type: ignore[attr-defined]
        wrapped = retry()(inner)
        assert [k for k in vars(wrapped) if k.startswith("__flowyml_")] == ["__flowyml_retry__"]
        assert wrapped.__wrapped__.__flowyml_breaker__ == "breaker"  # type: ignore[attr-defined]

    def test_async_wrapper_is_a_coroutine_function(self) -> None:
        """Decorating an async def gives an async def."""

        async def fetch() -> int:
            return 1

        wrapped = retry()(fetch)
        assert inspect.iscoroutinefunction(wrapped)
        assert wrapped.__wrapped__ is fetch  # type: ignore[attr-defined]

    def test_config_reflects_the_arguments(self) -> None:
        """retry(...).config holds the same settings as a RetryConfig."""
        policy = retry(5, 3.0, on=OSError, not_on=FileNotFoundError, max_delay=2.0, jitter=False, max_time=9)
        assert policy.config == RetryConfig(
            max_attempts=5,
            backoff=ExponentialBackoff(initial=0.1, multiplier=3.0, max_delay=2.0, jitter=False),
            on=(OSError,),
            not_on=(FileNotFoundError,),
            max_time=9.0,
        )

    def test_accepts_an_exponential_backoff(self) -> None:
        """backoff= may be a whole ExponentialBackoff."""
        backoff = ExponentialBackoff(initial=1.0, jitter=False)
        assert retry(backoff=backoff).config.backoff is backoff

    def test_backoff_settings_given_twice_are_refused(self) -> None:
        """An ExponentialBackoff together with max_delay= is ambiguous."""
        with pytest.raises(ConfigError, match="not both"):
            retry(backoff=ExponentialBackoff(), max_delay=1.0)

    def test_bare_decorator_explains_the_fix(self) -> None:
        """@retry without parentheses raises a ConfigError pointing at the fix."""
        with pytest.raises(ConfigError, match="parentheses"):
            retry(lambda: None)  # type: ignore[arg-type]

    def test_nested_retries_multiply(self) -> None:
        """Two retry layers compose: the outer retries the whole inner loop."""
        func = Flaky()
        with no_sleep(), pytest.raises(ValueError) as info:
            retry(max_attempts=2)(retry(max_attempts=3)(func))()
        assert func.calls == 6
        assert info.value.attempts == 2  # type: ignore[attr-defined]

    @pytest.mark.slow
    def test_sync_wrapper_really_sleeps(self) -> None:
        """Without no_sleep the sync wrapper waits with time.sleep and then succeeds."""
        func = Flaky(failures=1)
        assert retry(max_attempts=2, initial=0.01, jitter=False)(func)() == "ok"

    @pytest.mark.slow
    async def test_async_wait_does_not_block_the_loop(self) -> None:
        """While an async function waits to retry, other tasks on the loop run."""
        order: list[str] = []
        func_calls = 0

        @retry(max_attempts=2, initial=0.05, jitter=False)
        async def func() -> str:
            nonlocal func_calls
            func_calls += 1
            if func_calls == 1:
                raise ValueError
            order.append("retried")
            return "ok"

        async def other() -> None:
            await asyncio.sleep(0)
            order.append("other")

        await asyncio.gather(func(), other())
        assert order == ["other", "retried"]


class TestRetryRun:
    def test_counts_attempts_and_gives_delays(self) -> None:
        """failed() returns each wait and moves to the next attempt, then None."""
        run = RetryRun(RetryConfig(3, ExponentialBackoff(jitter=False)), clock=lambda: 0.0)
        assert run.failed(ValueError()) == 0.1
        assert run.failed(ValueError()) == 0.2
        exc = ValueError()
        assert run.failed(exc) is None
        assert run.attempt == 3
        assert exc.attempts == 3  # type: ignore[attr-defined]

    def test_uses_the_injected_clock_for_max_time(self) -> None:
        """Elapsed time comes from the injected clock."""
        now = [0.0]
        run = RetryRun(RetryConfig(10, ExponentialBackoff(jitter=False), max_time=1.0), clock=lambda: now[0])
        assert run.failed(ValueError()) == 0.1
        now[0] = 0.95
        assert run.failed(ValueError()) is None

    def test_first_attempt_failure_gets_no_note(self) -> None:
        """An exception that was never retried carries attempts=1 and no note."""
        exc = ValueError()
        assert RetryRun(RetryConfig(on=OSError)).failed(exc) is None
        assert exc.attempts == 1  # type: ignore[attr-defined]
        assert not hasattr(exc, "__notes__")


class TestNoSleep:
    def test_records_and_restores(self) -> None:
        """no_sleep records requested waits and switches itself off on exit."""
        assert _retry._switch.recorder is None
        with no_sleep() as delays:
            _retry._sleep(3.0)
        assert delays == [3.0]
        assert _retry._switch.recorder is None

    def test_innermost_recorder_wins(self) -> None:
        """Nested no_sleep blocks record into the innermost list."""
        with no_sleep() as outer:
            with no_sleep() as inner:
                _retry._sleep(1.0)
            _retry._sleep(2.0)
        assert (outer, inner) == ([2.0], [1.0])

    async def test_async_sleep_is_skipped(self) -> None:
        """_asleep records instead of waiting."""
        with no_sleep() as delays:
            await _retry._asleep(3600.0)
        assert delays == [3600.0]

    def test_clock_advances_by_skipped_time(self) -> None:
        """flowyml's retry clock moves forward by every skipped wait."""
        before = _retry._now()
        with no_sleep():
            _retry._sleep(1000.0)
        assert _retry._now() - before >= 1000.0
