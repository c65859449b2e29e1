"""Retry policy: backoff as a pure function, the policy as a frozen value, and ``retry()``.

The module is layered so that everything that decides is pure and everything that waits is
in one place:

- :meth:`ExponentialBackoff.delay` -- the wait after a failed attempt; arithmetic only.
- :class:`RetryConfig` -- the whole policy as a value; :meth:`RetryConfig.should_retry` and
  :meth:`RetryConfig.stop_reason` are pure functions of (exception, attempt, elapsed).
- :class:`RetryRun` -- one call's bookkeeping (attempt number, start time) and flowyml's only
  retry loop, used by :func:`retry`, the engine's attempts and execution groups alike.
- :func:`_sleep`, :func:`_asleep`, :func:`_now` -- the only places flowyml waits between
  attempts and reads the time for ``max_time``. :func:`flowyml.testing.no_sleep` turns the
  waits into instant, recorded ones on a clock that still advances, so tests never sleep.

Cancellation (``asyncio.CancelledError``), ``KeyboardInterrupt`` and ``SystemExit`` are never
retried, wrapped or annotated: the wrappers only ever catch ``Exception``.
"""

from __future__ import annotations

__all__ = (
    "ExponentialBackoff",
    "Retry",
    "RetryConfig",
    "RetryRun",
    "as_retry_config",
    "retry",
)

import asyncio
import contextlib
import math
import random
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar, cast

from flowyml._errors import CircuitOpenError, ConfigError
from flowyml._layers import layer, over_step

P = ParamSpec("P")
R = TypeVar("R")

ExceptionTypes = type[BaseException] | tuple[type[BaseException], ...]


# --------------------------------------------------------------------------- validation helpers


def _seconds(value: object, option: str) -> float:
    """Return ``value`` as float seconds, or raise ConfigError naming ``option``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{option} must be a finite number of seconds >= 0, got {value!r}")
    return float(value)


def _positive_int(value: object, option: str, *, hint: str = "") -> int:
    """Return ``value`` if it is an int >= 1 (not a bool), else raise ConfigError naming ``option``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{option} must be an int >= 1, got {value!r}{hint}")
    return value


def exception_types(value: object, option: str) -> tuple[type[Exception], ...]:
    """Normalize one exception class or a tuple of them; only ``Exception`` subclasses are allowed.

    ``BaseException`` subclasses that are not ``Exception`` (cancellation, ``KeyboardInterrupt``,
    ``SystemExit``) are refused: flowyml never catches them, so listing them would be a lie.
    Shared by retry, fallback and circuit breaker options.
    """
    items = value if isinstance(value, tuple) else (value,)
    for item in items:
        if not (isinstance(item, type) and issubclass(item, Exception)):
            raise ConfigError(
                f"{option} must be an Exception subclass or a tuple of them, got {value!r} "
                "(cancellation, KeyboardInterrupt and SystemExit are never caught)"
            )
    return cast(tuple[type[Exception], ...], items)


def _check_attempt(attempt: int) -> None:
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise ValueError(f"attempt numbers start at 1, got {attempt!r}")


# --------------------------------------------------------------------------- backoff


@dataclass(frozen=True, slots=True)
class ExponentialBackoff:
    """How long to wait after a failed attempt: exponential growth, capped, with equal jitter.

    After failed attempt ``n`` (1-based) the base delay is
    ``d = min(max_delay, initial * multiplier ** (n - 1))``. Without jitter the wait is ``d``.
    With jitter ("equal jitter") the wait is ``d/2 + d/2 * U`` with ``U`` uniform in ``[0, 1)``,
    so it always lies in ``[d/2, d]``: retries from many callers spread out, yet never wait less
    than half or more than the un-jittered delay. A zero delay stays zero with jitter.

    Args:
        initial: the delay after the first failed attempt, in seconds (>= 0).
        multiplier: growth factor per attempt (>= 1; 1 gives a constant delay).
        max_delay: cap on every delay, in seconds (>= 0).
        jitter: randomize each delay inside ``[d/2, d]``.
    """

    initial: float = 0.1
    multiplier: float = 2.0
    max_delay: float = 10.0
    jitter: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "initial", _seconds(self.initial, "initial"))
        object.__setattr__(self, "max_delay", _seconds(self.max_delay, "max_delay"))
        multiplier = self.multiplier
        if (
            isinstance(multiplier, bool)
            or not isinstance(multiplier, int | float)
            or not math.isfinite(multiplier)
            or multiplier < 1
        ):
            raise ConfigError(
                f"multiplier (the backoff growth factor) must be a finite number >= 1, got {multiplier!r}"
            )
        object.__setattr__(self, "multiplier", float(multiplier))
        if not isinstance(self.jitter, bool):
            raise ConfigError(f"jitter must be True or False, got {self.jitter!r}")

    def base_delay(self, attempt: int) -> float:
        """The un-jittered delay after failed attempt ``attempt``: the upper bound of :meth:`delay`."""
        _check_attempt(attempt)
        if self.initial == 0.0 or self.max_delay == 0.0:
            return 0.0
        try:
            raw = self.initial * self.multiplier ** (attempt - 1)
        except OverflowError:  # huge attempt numbers: the cap applies long before
            return self.max_delay
        return min(self.max_delay, raw)  # raw may be inf after the multiplication; min caps it

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """The wait after failed attempt ``attempt`` (1-based); ``rand()`` must return a value in [0, 1)."""
        base = self.base_delay(attempt)
        if not self.jitter or base == 0.0:
            return base
        u = min(max(rand(), 0.0), 1.0)  # a misbehaving rand cannot push the delay out of bounds
        return base / 2 + base / 2 * u


_DEFAULT_BACKOFF = ExponentialBackoff()


# --------------------------------------------------------------------------- policy value


@dataclass(frozen=True, slots=True, init=False)
class RetryConfig:
    """A retry policy as a value: what to retry, how often, and how long to wait in between.

    Args:
        max_attempts: how many calls in total, the first included (>= 1; 1 means no retry).
        backoff: an :class:`ExponentialBackoff`, or a float taken as its ``multiplier`` (other
            settings at their defaults: first wait 0.1 s, capped at 10 s, with jitter).
        on: the exception types that are retried.
        not_on: exception types never retried, even when they match ``on``.
        max_time: a budget in seconds from the start of the first attempt: no retry is started
            if the time elapsed plus the longest possible next wait would exceed it. It does not
            interrupt a running attempt (that is what a step's ``timeout`` is for).
    """

    max_attempts: int
    backoff: ExponentialBackoff
    on: tuple[type[Exception], ...]
    not_on: tuple[type[Exception], ...]
    max_time: float | None

    def __init__(
        self,
        max_attempts: int = 3,
        backoff: ExponentialBackoff | float = _DEFAULT_BACKOFF,
        on: ExceptionTypes = (Exception,),
        not_on: ExceptionTypes = (),
        max_time: float | None = None,
    ) -> None:
        hint = " (use @retry() with parentheses)" if callable(max_attempts) else ""
        object.__setattr__(self, "max_attempts", _positive_int(max_attempts, "max_attempts", hint=hint))
        if not isinstance(backoff, ExponentialBackoff):
            if isinstance(backoff, bool) or not isinstance(backoff, int | float):
                raise ConfigError(
                    f"backoff must be a float multiplier (>= 1) or an ExponentialBackoff, got {backoff!r}"
                )
            backoff = ExponentialBackoff(multiplier=backoff)
        object.__setattr__(self, "backoff", backoff)
        object.__setattr__(self, "on", exception_types(on, "on"))
        object.__setattr__(self, "not_on", exception_types(not_on, "not_on"))
        if max_time is not None:
            max_time = _seconds(max_time, "max_time")
        object.__setattr__(self, "max_time", max_time)

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """The wait after failed attempt ``attempt`` (see :meth:`ExponentialBackoff.delay`)."""
        return self.backoff.delay(attempt, rand)

    def stop_reason(self, exc: BaseException, attempt: int, elapsed: float) -> str | None:
        """Why attempt ``attempt`` failing with ``exc`` after ``elapsed`` seconds ends the call.

        Returns ``None`` when another attempt should follow. Pure: no clock, no state.
        """
        _check_attempt(attempt)
        if not isinstance(exc, Exception):
            return f"{type(exc).__name__} is never retried"
        if isinstance(exc, CircuitOpenError):
            return "an open circuit breaker fails fast"
        if not isinstance(exc, self.on):
            return f"{type(exc).__name__} is not in on={_names(self.on)}"
        if self.not_on and isinstance(exc, self.not_on):
            return f"{type(exc).__name__} is in not_on={_names(self.not_on)}"
        if attempt >= self.max_attempts:
            return f"max_attempts={self.max_attempts} reached"
        if self.max_time is not None and elapsed + self.backoff.base_delay(attempt) > self.max_time:
            return f"max_time={self.max_time:g}s would be exceeded"
        return None

    def should_retry(self, exc: BaseException, attempt: int, elapsed: float) -> bool:
        """Whether attempt ``attempt`` failing with ``exc`` after ``elapsed`` seconds is retried."""
        return self.stop_reason(exc, attempt, elapsed) is None


def _names(types: tuple[type[BaseException], ...]) -> str:
    return "(" + ", ".join(t.__name__ for t in types) + ("," if len(types) == 1 else "") + ")"


# --------------------------------------------------------------------------- sleeping and time


class _SleepSwitch:
    """Module state behind :func:`flowyml.testing.no_sleep`.

    While ``recorder`` is a list, waits are skipped, appended to it, and added to ``skipped`` so
    that :func:`_now` still sees time pass (``max_time`` keeps working in tests). ``skipped``
    only grows, so :func:`_now` stays monotonic after the switch is turned off.
    """

    __slots__ = ("lock", "recorder", "skipped")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.recorder: list[float] | None = None
        self.skipped = 0.0

    def skip(self, seconds: float) -> bool:
        """Record ``seconds`` instead of sleeping if the switch is on; return whether it was."""
        recorder = self.recorder
        if recorder is None:
            return False
        with self.lock:
            recorder.append(seconds)
            self.skipped += seconds
        return True


_switch = _SleepSwitch()


def _now() -> float:
    """Monotonic seconds, advanced by every wait the no-sleep switch skipped."""
    return time.monotonic() + _switch.skipped


def _sleep(seconds: float) -> None:
    """Block the current thread between attempts (instant under ``no_sleep()``)."""
    if not _switch.skip(seconds):
        time.sleep(seconds)


async def _asleep(seconds: float) -> None:
    """Wait between attempts without blocking the event loop (instant under ``no_sleep()``)."""
    if _switch.skip(seconds):
        await asyncio.sleep(0)  # still a cancellation point, still lets other tasks run
    else:
        await asyncio.sleep(seconds)


# --------------------------------------------------------------------------- one call's bookkeeping


class RetryRun:
    """One call under a :class:`RetryConfig`: the attempt number, the start time, and the loop.

    This is flowyml's only retry loop. The decorator :func:`retry` (sync and async), a step's
    attempts on the event loop (:mod:`flowyml._attempt`) and the members of an execution group
    in their worker (:mod:`flowyml._groups`) all call :meth:`call` or :meth:`acall`, so every
    retry reads the same clock (:func:`_now`, advanced by ``no_sleep()``), waits through
    :func:`_sleep` / :func:`_asleep`, and leaves ``.attempts`` and a note on the exception it
    gives up on. :meth:`failed` is where the decision to retry is taken; ``on_retry(attempt,
    delay, error)``, when given, hears of each failed attempt that will be retried, before the wait.
    ``errors`` keeps the exceptions of those retried attempts, in order (the shared empty tuple
    while the first attempt has not failed).
    """

    __slots__ = ("_clock", "_on_retry", "_rand", "attempt", "config", "errors", "started")

    def __init__(
        self,
        config: RetryConfig,
        *,
        clock: Callable[[], float] = _now,
        rand: Callable[[], float] = random.random,
        on_retry: Callable[[int, float, BaseException], None] | None = None,
    ) -> None:
        self.config = config
        self.attempt = 1
        self.errors: tuple[BaseException, ...] = ()
        self._on_retry = on_retry
        self._clock = clock
        self._rand = rand
        self.started = clock()

    def failed(self, exc: BaseException) -> float | None:
        """Record that the current attempt raised ``exc``.

        Returns the wait before the next attempt (and counts that attempt), or ``None`` when the
        call should give up -- then ``exc.attempts`` is set to the number of attempts made and,
        if there was more than one, a note says why the retries stopped.
        """
        reason = self.config.stop_reason(exc, self.attempt, self._clock() - self.started)
        if reason is None:
            delay = self.config.delay(self.attempt, self._rand)
            self.errors = (*self.errors, exc)
            if self._on_retry is not None:
                self._on_retry(self.attempt, delay, exc)
            self.attempt += 1
            return delay
        if isinstance(exc, Exception):
            # Exceptions may refuse new attributes (a strict __setattr__, C types); the exception
            # itself matters more than the annotation, so such refusals are ignored.
            with contextlib.suppress(AttributeError, TypeError):
                exc.attempts = self.attempt  # type: ignore[attr-defined]
            if self.attempt > 1:
                with contextlib.suppress(AttributeError, TypeError):
                    exc.add_note(f"flowyml retry: gave up after {self.attempt} attempts ({reason})")
        return None

    def call(self, func: Callable[..., R], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> R:
        """Call ``func`` until it returns or the policy gives up; waits block this thread."""
        while True:
            try:
                return func(*args, **kwargs)
            except Exception as exc:
                delay = self.failed(exc)
                if delay is None:
                    raise
            _sleep(delay)

    async def acall(
        self, func: Callable[..., Awaitable[R]], args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> R:
        """Await ``func`` until it returns or the policy gives up; waits let the loop run."""
        while True:
            try:
                return await func(*args, **kwargs)
            except Exception as exc:
                delay = self.failed(exc)
                if delay is None:
                    raise
            await _asleep(delay)


# --------------------------------------------------------------------------- decorator


class Retry:
    """A retry decorator holding its policy as ``.config``; made by :func:`retry`.

    The wrapper it returns keeps the wrapped function's name, signature and ``__wrapped__``, is
    an ``async def`` when the function is one, and carries ``__flowyml_retry__`` (the config) so
    the engine can run the attempt loop itself, with a timeout per attempt, by calling
    ``__wrapped__``.
    """

    __slots__ = ("config",)

    def __init__(self, config: RetryConfig) -> None:
        self.config = config

    def __repr__(self) -> str:
        return f"Retry({self.config!r})"

    def __call__(self, func: Callable[P, R]) -> Callable[P, R]:
        if not callable(func):
            raise ConfigError(f"retry(...) decorates a function, got {func!r}")
        stepped = over_step(func, self)
        if stepped is not None:
            return cast(Callable[P, R], stepped)
        config = self.config
        afunc = cast(Callable[..., Awaitable[Any]], func)

        def call(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
            return RetryRun(config).call(func, args, kwargs)

        async def acall(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
            return await RetryRun(config).acall(afunc, args, kwargs)

        return layer(func, call, acall, retry=config)


def retry(
    max_attempts: int = 3,
    backoff: float | ExponentialBackoff = 2.0,
    *,
    on: ExceptionTypes = (Exception,),
    not_on: ExceptionTypes = (),
    max_delay: float = 10.0,
    jitter: bool = True,
    max_time: float | None = None,
    initial: float = 0.1,
) -> Retry:
    """Retry a sync or async function when it raises one of ``on``.

    ``max_attempts`` counts every call, the first included. Waits follow
    :class:`ExponentialBackoff` (``initial * backoff ** (n - 1)`` seconds after failed attempt
    ``n``, capped at ``max_delay``, in ``[d/2, d]`` with jitter); async functions wait with
    ``asyncio.sleep`` so the event loop keeps running. When the attempts run out, the last
    exception is raised unchanged, with ``.attempts`` set and a note. An open circuit breaker
    (:class:`CircuitOpenError`) and cancellation are never retried.

    ``backoff`` may also be a complete :class:`ExponentialBackoff`; then ``initial``,
    ``max_delay`` and ``jitter`` must be left at their defaults.

    Raises:
        ConfigError: an option is out of range; the message names it and its valid values.
    """
    if isinstance(backoff, ExponentialBackoff):
        if (initial, max_delay, jitter) != (0.1, 10.0, True):
            raise ConfigError(
                "retry(): give initial=, max_delay= and jitter= either to ExponentialBackoff(...) "
                "passed as backoff=, or to retry() with a float backoff=, not both"
            )
        policy = backoff
    else:
        if isinstance(backoff, bool) or not isinstance(backoff, int | float):
            raise ConfigError(
                f"backoff must be a float multiplier (>= 1) or an ExponentialBackoff, got {backoff!r}"
            )
        policy = ExponentialBackoff(initial=initial, multiplier=backoff, max_delay=max_delay, jitter=jitter)
    return Retry(RetryConfig(max_attempts, policy, on, not_on, max_time))


def as_retry_config(value: int | RetryConfig | Retry | None, *, option: str = "retry") -> RetryConfig | None:
    """Normalize a step's ``retry=`` option to a :class:`RetryConfig`, or ``None`` for no retries.

    An int ``N`` is the number of retries after the first attempt: ``RetryConfig(max_attempts=N + 1)``
    with the default backoff (0.1 s, doubling, capped at 10 s, with jitter); 0 and ``None`` mean
    no retries.

    Raises:
        ConfigError: ``value`` is negative, a bool, a float or another type.
    """
    if value is None:
        return None
    if isinstance(value, RetryConfig):
        return value
    if isinstance(value, Retry):
        return value.config
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return RetryConfig(max_attempts=value + 1) if value else None
    raise ConfigError(
        f"{option}= must be an int >= 0 (retries after the first attempt), a RetryConfig or "
        f"retry(...), got {value!r}"
    )
