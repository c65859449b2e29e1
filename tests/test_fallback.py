"""Tests for flowyml._fallback, and for the seed page's stack of resilience decorators."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import pytest

from flowyml import Pipeline, step
from flowyml._breaker import CircuitBreaker, CircuitState
from flowyml._errors import CircuitOpenError, ConfigError
from flowyml._fallback import FallbackHandler, on_failure
from flowyml._retry import retry
from flowyml.testing import no_sleep


def fallback_data() -> dict[str, str]:
    return {"status": "unavailable"}


def broken() -> dict[str, str]:
    raise ConnectionError("down")


class TestOnFailure:
    def test_zero_argument_fallback(self) -> None:
        """A fallback taking no arguments supplies the value when the function raises."""
        assert on_failure(fallback_data)(broken)() == {"status": "unavailable"}

    def test_fallback_receives_the_exception(self) -> None:
        """A fallback taking one argument is given the exception."""
        seen: list[BaseException] = []

        def fallback(exc: BaseException) -> dict[str, str]:
            seen.append(exc)
            return {"error": str(exc)}

        assert on_failure(fallback)(broken)() == {"error": "down"}
        assert isinstance(seen[0], ConnectionError)

    def test_optional_parameter_receives_the_exception(self) -> None:
        """A fallback whose one parameter has a default still gets the exception."""
        assert on_failure(lambda exc=None: type(exc).__name__)(broken)() == "ConnectionError"

    def test_success_skips_the_fallback(self) -> None:
        """When the function returns, its value is used and the fallback is not called."""
        calls: list[int] = []
        assert on_failure(lambda: calls.append(1))(lambda: 5)() == 5
        assert calls == []

    def test_non_matching_exceptions_propagate(self) -> None:
        """An exception outside on= is not caught."""
        with pytest.raises(ConnectionError):
            on_failure(fallback_data, on=(KeyError,))(broken)()

    def test_keyboard_interrupt_propagates(self) -> None:
        """BaseExceptions that are not Exceptions are never caught."""

        def interrupted() -> None:
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            on_failure(fallback_data)(interrupted)()

    def test_fallback_errors_chain_to_the_original(self) -> None:
        """If the fallback itself raises, the original exception is its context."""

        def bad_fallback() -> None:
            raise RuntimeError("fallback broke")

        with pytest.raises(RuntimeError) as info:
            on_failure(bad_fallback)(broken)()
        assert isinstance(info.value.__context__, ConnectionError)

    async def test_async_function_with_async_fallback(self) -> None:
        """An async fallback is awaited."""

        async def fetch() -> str:
            raise ConnectionError

        async def fallback(exc: Exception) -> str:
            await asyncio.sleep(0)
            return f"cached after {type(exc).__name__}"

        wrapped = on_failure(fallback)(fetch)
        assert inspect.iscoroutinefunction(wrapped)
        assert await wrapped() == "cached after ConnectionError"

    async def test_async_function_with_sync_fallback(self) -> None:
        """A plain fallback works for an async function."""

        async def fetch() -> dict[str, str]:
            raise ConnectionError

        assert await on_failure(fallback_data)(fetch)() == {"status": "unavailable"}

    async def test_cancellation_propagates(self) -> None:
        """CancelledError raised by the function is never replaced by the fallback."""

        async def cancelled() -> None:
            raise asyncio.CancelledError

        with pytest.raises(asyncio.CancelledError):
            await on_failure(fallback_data)(cancelled)()

    def test_async_fallback_for_sync_function_is_refused(self) -> None:
        """A sync function cannot await an async fallback: ConfigError at decoration."""

        async def fallback() -> None: ...

        with pytest.raises(ConfigError, match="async"):
            on_failure(fallback)(broken)

    def test_fallback_with_two_required_parameters_is_refused(self) -> None:
        """A fallback that can be called neither bare nor with the exception is a ConfigError."""
        with pytest.raises(ConfigError, match="no arguments or one"):
            on_failure(lambda a, b: None)

    def test_non_callable_fallback_is_refused(self) -> None:
        """on_failure needs a callable."""
        with pytest.raises(ConfigError, match="callable"):
            on_failure({"status": "unavailable"})  # type: ignore[arg-type]

    def test_base_exception_types_are_refused(self) -> None:
        """on=(BaseException,) would promise catching cancellation: ConfigError."""
        with pytest.raises(ConfigError, match="on"):
            on_failure(fallback_data, on=(BaseException,))

    def test_builtin_without_signature_is_called_bare(self) -> None:
        """A callable with no inspectable signature is called with no arguments."""
        assert on_failure(dict)(broken)() == {}

    def test_wrapper_keeps_metadata_and_drops_retry_marker(self) -> None:
        """The wrapper keeps __wrapped__ and does not claim an inner retry as its own."""
        inner = retry()(broken)
        wrapped = on_failure(fallback_data)(inner)
        assert wrapped.__wrapped__ is inner  # type: ignore[attr-defined]
        assert wrapped.__name__ == "broken"
        assert not hasattr(wrapped, "__flowyml_retry__")
        assert isinstance(wrapped.__flowyml_fallback__, FallbackHandler)  # type: ignore[attr-defined]


class TestFallbackHandler:
    def test_as_decorator(self) -> None:
        """A FallbackHandler decorates like on_failure."""
        handler = FallbackHandler(fallback_data, fallback_on=(ConnectionError,))
        assert handler(broken)() == {"status": "unavailable"}

    def test_call(self) -> None:
        """handler.call(func, *args) runs func with the fallback in place."""
        handler = FallbackHandler(lambda exc: f"missing {exc}", fallback_on=KeyError)
        assert handler.call({"a": 1}.__getitem__, "a") == 1
        assert handler.call({"a": 1}.__getitem__, "b") == "missing 'b'"

    async def test_call_with_async_function(self) -> None:
        """handler.call(async_func) returns an awaitable."""

        async def fetch(x: int) -> int:
            raise ValueError(x)

        handler = FallbackHandler(lambda exc: -exc.args[0])
        coro = handler.call(fetch, 3)
        assert inspect.iscoroutine(coro)
        assert await coro == -3

    def test_non_matching_exceptions_propagate(self) -> None:
        """fallback_on limits what is caught."""
        with pytest.raises(ConnectionError):
            FallbackHandler(fallback_data, fallback_on=ValueError).call(broken)

    def test_repr_names_the_fallback(self) -> None:
        """repr shows the fallback and the exception types."""
        assert (
            repr(FallbackHandler(fallback_data)) == "FallbackHandler(fallback_data, fallback_on=(Exception))"
        )


class TestSeedStack:
    """``@retry(max_attempts=3, backoff=2.0) @on_failure(fallback_data) @CircuitBreaker(...)``."""

    def test_sync_stack_returns_the_fallback(self) -> None:
        """The seed's stack returns the fallback; the breaker counts every real failure."""
        calls = 0
        breaker = CircuitBreaker(failure_threshold=5)

        @retry(max_attempts=3, backoff=2.0)
        @on_failure(fallback_data)
        @breaker
        def fetch_data() -> dict[str, Any]:
            nonlocal calls
            calls += 1
            raise ConnectionError("external API down")

        with no_sleep() as delays:
            results = [fetch_data() for _ in range(7)]
        assert results == [{"status": "unavailable"}] * 7
        assert calls == 5  # the breaker opened after five failures; the fallback covers the rest
        assert breaker.state is CircuitState.OPEN
        assert delays == []  # on_failure handles every error, so retry has nothing to retry
        assert fetch_data.__flowyml_retry__.max_attempts == 3  # type: ignore[attr-defined]
        assert not hasattr(fetch_data, "__flowyml_breaker__")  # only the breaker's own layer has it

    async def test_async_stack_returns_the_fallback(self) -> None:
        """The same stack on an async function returns the fallback too."""
        calls = 0
        breaker = CircuitBreaker(failure_threshold=5)

        @retry(max_attempts=3, backoff=2.0)
        @on_failure(fallback_data)
        @breaker
        async def fetch_data() -> dict[str, Any]:
            nonlocal calls
            calls += 1
            raise ConnectionError("external API down")

        assert inspect.iscoroutinefunction(fetch_data)
        with no_sleep():
            results = [await fetch_data() for _ in range(7)]
        assert results == [{"status": "unavailable"}] * 7
        assert calls == 5
        assert breaker.state is CircuitState.OPEN

    def test_fallback_sees_the_open_circuit(self) -> None:
        """Once open, the fallback receives the CircuitOpenError."""
        seen: list[type[BaseException]] = []
        breaker = CircuitBreaker(failure_threshold=1)

        @on_failure(lambda exc: seen.append(type(exc)))
        @breaker
        def fetch_data() -> None:
            raise ConnectionError

        fetch_data()
        fetch_data()
        assert seen == [ConnectionError, CircuitOpenError]

    def test_retry_outside_the_breaker_stops_when_it_opens(self) -> None:
        """Without a fallback in between, retry gives up at once on an open breaker."""
        calls = 0

        @retry(max_attempts=10)
        @CircuitBreaker(failure_threshold=3)
        def fetch_data() -> None:
            nonlocal calls
            calls += 1
            raise ConnectionError

        with no_sleep() as delays, pytest.raises(CircuitOpenError) as info:
            fetch_data()
        assert calls == 3
        assert len(delays) == 3
        assert info.value.attempts == 4  # type: ignore[attr-defined]


class TestFallbacksAreNotCached:
    def test_fallback_value_is_passed_on_but_not_cached(self, no_sleep: list[float]) -> None:
        """A fallback stands in for one run only: the next run calls the function again."""
        api_up = {"value": False}

        @step(outputs=["data"])
        @retry(max_attempts=2)
        @on_failure(lambda: {"status": "unavailable"})
        def fetch() -> dict[str, str]:
            if not api_up["value"]:
                raise ConnectionError("down")
            return {"status": "ok"}

        p = Pipeline("fallback").add_step(fetch)
        first = p.run()
        assert first["data"] == {"status": "unavailable"}
        assert first.step_results["fetch"].used_fallback
        api_up["value"] = True
        second = p.run()
        assert second["data"] == {"status": "ok"}
        assert not second.step_results["fetch"].cached


def _fallback_value() -> int:
    return -1


@on_failure(_fallback_value)
def _always_down() -> int:
    raise ConnectionError("down")


class TestProcessFallback:
    """A fallback wrapped around a process step."""

    def test_process_step_with_fallback(self) -> None:
        """A process step under @on_failure ships to its worker and returns the fallback."""
        s = step(name="down", outputs=["v"], executor="process")(_always_down)
        result = Pipeline("pfb").add_step(s).run()
        assert result["v"] == -1, result.summary()
        assert result.step_results["down"].used_fallback
