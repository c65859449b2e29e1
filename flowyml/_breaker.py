"""A circuit breaker: stop calling something that keeps failing, and probe it again later.

States, on an injected monotonic clock::

    CLOSED --(failure_threshold consecutive failures)--> OPEN
    OPEN --(recovery_timeout elapsed)--> HALF_OPEN        (checked lazily, on the next use)
    HALF_OPEN --(a trial call succeeds)--> CLOSED
    HALF_OPEN --(a trial call fails)--> OPEN              (the recovery timer restarts)

While OPEN every call fails at once with :class:`CircuitOpenError` without running. In HALF_OPEN
at most ``half_open_max_calls`` trial calls run at a time; other callers are refused the same way.

Outcomes: a return is a success; an exception in ``expected_exceptions`` is a failure; any other
exception is neutral (it says nothing about the protected service) and cancellation,
``KeyboardInterrupt`` and ``SystemExit`` are neutral too -- a neutral trial frees its slot.

Each trial call holds a ticket naming the half-open round it belongs to, so the outcome of a
call that started in an earlier state cannot close or reopen the breaker later. The lock guards
state changes only; it is never held while the protected function runs, so a closed breaker
adds no serialization.
"""

from __future__ import annotations

__all__ = ("CircuitBreaker", "CircuitState", "CircuitStats")

import enum
import inspect
import math
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, ParamSpec, TypeVar, cast

from flowyml._errors import CircuitOpenError, ConfigError
from flowyml._layers import layer, over_step
from flowyml._retry import ExceptionTypes, exception_types

P = ParamSpec("P")
R = TypeVar("R")

# Tickets: ``None`` for a call admitted while closed; the half-open round number (>= 1) for a
# trial call; ``_PUBLIC`` for outcomes reported through record_success()/record_failure().
_Ticket = int | None
_PUBLIC: Final = -1


class CircuitState(enum.StrEnum):
    """The state of a :class:`CircuitBreaker`."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class CircuitStats:
    """A consistent snapshot of a :class:`CircuitBreaker`, taken under its lock."""

    name: str | None
    state: CircuitState
    failure_count: int
    """Consecutive failures counted while closed."""
    failure_threshold: int
    recovery_timeout: float
    retry_after: float
    """Seconds until an open breaker lets a trial call through; 0 unless open."""
    trial_calls_in_flight: int
    calls: int
    """Calls let through (closed or as trials)."""
    successes: int
    failures: int
    rejected: int
    """Calls refused with CircuitOpenError."""
    times_opened: int


class CircuitBreaker:
    """Fail fast while a dependency is failing; usable as a decorator or via :meth:`call`.

    Args:
        failure_threshold: consecutive failures that open the breaker (int >= 1).
        recovery_timeout: seconds an open breaker waits before letting trial calls through (>= 0).
        half_open_max_calls: trial calls allowed at once while half-open (int >= 1).
        expected_exceptions: the exception types counted as failures.
        name: shown in errors and stats; defaults to the name of the function being called.
        clock: monotonic seconds; inject a fake one in tests.

    One breaker may protect many functions, steps, threads and tasks at once: they share its
    state. Thread-safe and safe to use from several event loops.
    """

    def __init__(
        self,
        failure_threshold: int = 5,
        recovery_timeout: float = 60.0,
        half_open_max_calls: int = 1,
        expected_exceptions: ExceptionTypes = (Exception,),
        *,
        name: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for option, value in (
            ("failure_threshold", failure_threshold),
            ("half_open_max_calls", half_open_max_calls),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"CircuitBreaker {option} must be an int >= 1, got {value!r}")
        if (
            isinstance(recovery_timeout, bool)
            or not isinstance(recovery_timeout, int | float)
            or not math.isfinite(recovery_timeout)
            or recovery_timeout < 0
        ):
            raise ConfigError(
                f"CircuitBreaker recovery_timeout must be a finite number of seconds >= 0, "
                f"got {recovery_timeout!r}"
            )
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"CircuitBreaker name must be a str or None, got {name!r}")
        if not callable(clock):
            raise ConfigError(f"CircuitBreaker clock must be a callable returning seconds, got {clock!r}")
        self.failure_threshold = failure_threshold
        self.recovery_timeout = float(recovery_timeout)
        self.half_open_max_calls = half_open_max_calls
        self.expected_exceptions = exception_types(expected_exceptions, "expected_exceptions")
        self.name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CircuitState.CLOSED
        self._consecutive = 0
        self._opened_at = 0.0
        self._round = 0  # half-open round number, bumped on entering half-open and on reset
        self._trials = 0
        self._calls = self._successes = self._failures = self._rejected = self._times_opened = 0

    def __repr__(self) -> str:
        return (
            f"CircuitBreaker(name={self.name!r}, state={self.state.value!r}, "
            f"failure_count={self.failure_count}/{self.failure_threshold})"
        )

    # ------------------------------------------------------------------ inspection

    @property
    def state(self) -> CircuitState:
        """The current state (an open breaker past its recovery timeout reads as half-open)."""
        with self._lock:
            self._refresh(self._clock())
            return self._state

    @property
    def failure_count(self) -> int:
        """Consecutive failures counted while closed."""
        with self._lock:
            return self._consecutive

    def stats(self) -> CircuitStats:
        """A frozen snapshot of the state and counters."""
        with self._lock:
            now = self._clock()
            self._refresh(now)
            return CircuitStats(
                name=self.name,
                state=self._state,
                failure_count=self._consecutive,
                failure_threshold=self.failure_threshold,
                recovery_timeout=self.recovery_timeout,
                retry_after=self._retry_after(now),
                trial_calls_in_flight=self._trials,
                calls=self._calls,
                successes=self._successes,
                failures=self._failures,
                rejected=self._rejected,
                times_opened=self._times_opened,
            )

    # ------------------------------------------------------------------ control

    def reset(self) -> None:
        """Close the breaker and forget consecutive failures; calls in flight no longer count as trials."""
        with self._lock:
            self._close()
            self._round += 1

    def record_failure(self, exc: BaseException | None = None) -> None:
        """Count a failure observed outside the breaker (e.g. an attempt the engine timed out).

        While closed it adds to the consecutive failures (and may open the breaker); while
        half-open it reopens the breaker; while open it changes nothing. ``exc`` is accepted for
        symmetry and future use; it is not inspected.
        """
        with self._lock:
            now = self._clock()
            self._refresh(now)
            self._on_failure(now, _PUBLIC)

    def record_success(self) -> None:
        """Count a success observed outside the breaker: reset the failure count, close a half-open one."""
        with self._lock:
            self._refresh(self._clock())
            self._on_success(_PUBLIC)

    # ------------------------------------------------------------------ calling

    def __call__(self, func: Callable[P, R]) -> Callable[P, R]:
        """Decorate a sync or async function; the wrapper carries ``__flowyml_breaker__ = self``."""
        if not callable(func):
            raise ConfigError(f"CircuitBreaker decorates a function, got {func!r}")
        stepped = over_step(func, self)
        if stepped is not None:
            return cast(Callable[P, R], stepped)
        afunc = cast(Callable[..., Awaitable[Any]], func)
        return layer(
            func, lambda a, k: self._call(func, a, k), lambda a, k: self._acall(afunc, a, k), breaker=self
        )

    def call(self, func: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Call ``func`` through the breaker; for an async ``func`` this returns a coroutine."""
        if inspect.iscoroutinefunction(func):
            return cast(R, self._acall(cast(Callable[..., Awaitable[Any]], func), args, kwargs))
        return self._call(func, args, kwargs)

    def _call(self, func: Callable[..., R], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> R:
        ticket = self._admit(func)
        try:
            result = func(*args, **kwargs)
        except BaseException as exc:
            self._settle(ticket, exc)
            raise
        if inspect.isawaitable(result):  # a lambda or partial around a coroutine function
            return cast(R, self._settle_when_done(ticket, result))
        self._settle(ticket, None)
        return result

    async def _settle_when_done(self, ticket: _Ticket, awaitable: Awaitable[Any]) -> Any:
        try:
            result = await awaitable
        except BaseException as exc:
            self._settle(ticket, exc)
            raise
        self._settle(ticket, None)
        return result

    async def _acall(
        self, func: Callable[..., Awaitable[R]], args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> R:
        ticket = self._admit(func)
        try:
            result = await func(*args, **kwargs)
        except BaseException as exc:
            self._settle(ticket, exc)
            raise
        self._settle(ticket, None)
        return result

    # ------------------------------------------------------------------ state machine (lock held)

    def _admit(self, func: Callable[..., Any]) -> _Ticket:
        """Let a call through and return its ticket, or raise CircuitOpenError."""
        with self._lock:
            now = self._clock()
            self._refresh(now)
            if self._state is CircuitState.CLOSED:
                self._calls += 1
                return None
            if self._state is CircuitState.HALF_OPEN and self._trials < self.half_open_max_calls:
                self._trials += 1
                self._calls += 1
                return self._round
            self._rejected += 1
            retry_after = self._retry_after(now)
            who = repr(self.name) if self.name else f"for {getattr(func, '__qualname__', repr(func))}"
            if self._state is CircuitState.OPEN:
                detail = (
                    f"is open after {self.failure_threshold} consecutive failures; it may let a "
                    f"trial call through in {retry_after:.3g}s"
                )
            else:
                detail = (
                    f"is half-open and its {self.half_open_max_calls} trial call(s) are still "
                    "running; it closes if they succeed"
                )
        raise CircuitOpenError(f"circuit breaker {who} {detail}", retry_after=retry_after)

    def _settle(self, ticket: _Ticket, exc: BaseException | None) -> None:
        """Record how an admitted call ended."""
        with self._lock:
            if exc is None:
                self._on_success(ticket)
            elif isinstance(exc, self.expected_exceptions):
                self._on_failure(self._clock(), ticket)
            elif ticket is not None and ticket == self._round and self._state is CircuitState.HALF_OPEN:
                self._trials -= 1  # neutral: free the trial slot

    def _refresh(self, now: float) -> None:
        if self._state is CircuitState.OPEN and now - self._opened_at >= self.recovery_timeout:
            self._state = CircuitState.HALF_OPEN
            self._round += 1
            self._trials = 0

    def _retry_after(self, now: float) -> float:
        if self._state is not CircuitState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.recovery_timeout - now)

    def _is_current_trial(self, ticket: _Ticket) -> bool:
        return self._state is CircuitState.HALF_OPEN and ticket in (_PUBLIC, self._round)

    def _on_success(self, ticket: _Ticket) -> None:
        self._successes += 1
        if self._state is CircuitState.CLOSED:
            self._consecutive = 0
        elif self._is_current_trial(ticket):
            self._close()

    def _on_failure(self, now: float, ticket: _Ticket) -> None:
        self._failures += 1
        if self._state is CircuitState.CLOSED:
            self._consecutive += 1
            if self._consecutive >= self.failure_threshold:
                self._open(now)
        elif self._is_current_trial(ticket):
            self._open(now)

    def _open(self, now: float) -> None:
        self._state = CircuitState.OPEN
        self._opened_at = now
        self._trials = 0
        self._times_opened += 1

    def _close(self) -> None:
        self._state = CircuitState.CLOSED
        self._consecutive = 0
        self._trials = 0
