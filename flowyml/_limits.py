"""Concurrency and rate limits: how many calls of a step (or of its items) run at once, and how often.

A :class:`Limit` holds up to two things, taken in this order before each call and given back
after it:

- a *slot* (``concurrency=N``): at most N holders at once; a waiter is handed the slot of the
  holder that leaves, first come first served;
- a *token* (``rate="50/s"``): a token bucket holding at most one token, refilled at the rate,
  so over any window of ``T`` seconds at most ``rate * T + 1`` calls start.

Waiting for either happens on the event loop (a future, or ``asyncio.sleep`` until the token's
time), never in a thread. A call's timeout starts once it holds its slot and its token.

One ``Limit`` object may be shared by many steps, pipelines and concurrent runs, on several
event loops and threads: its state sits behind a lock that is never held while anyone waits.
``@step(concurrency=5, rate_limit="10/s")`` instead makes a fresh limit for that step in each
run (:meth:`Limit.for_step`).

The clock behind the token bucket is :data:`_clock`; :func:`flowyml.testing.limiter_clock`
swaps in a virtual one whose waits are instant.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Final

from ._errors import ConfigError

__all__ = ("Limit", "LimiterClock", "acquire_all", "parse_rate", "release_all")

_UNITS: Final = {"s": 1.0, "min": 60.0, "h": 3600.0}
_RATE: Final = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*/\s*(s|min|h)\s*$")


def parse_rate(value: object, option: str = "rate") -> float:
    """Calls per second from a rate string: ``"50/s"``, ``"600/min"``, ``"1000/h"``, ``"0.5/s"``.

    Raises:
        ConfigError: ``value`` is not such a string, or its count is zero.
    """
    match = _RATE.match(value) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(
            f'{option}={value!r} is not a rate; write calls per unit of time as a string such as "50/s", '
            '"600/min" or "1000/h"'
        )
    count = float(match.group(1))
    if not count > 0:
        raise ConfigError(f"{option}={value!r} allows no calls at all; give a count above zero")
    return count / _UNITS[match.group(2)]


def _check_concurrency(value: object, option: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{option}={value!r} must be an int >= 1 (calls allowed to run at once)")
    return value


class LimiterClock:
    """A virtual clock for rate limits in tests: waiting for a token moves it forward, instantly.

    Made by :func:`flowyml.testing.limiter_clock`. ``now()`` is the virtual time in seconds;
    ``waits`` lists every wait a limiter would have made, in order; :meth:`advance` moves time on
    by hand (a token bucket refills while time passes).
    """

    __slots__ = ("_lock", "_now", "waits")

    def __init__(self, start: float = 0.0) -> None:
        self._lock = threading.Lock()
        self._now = start
        self.waits: list[float] = []

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += max(0.0, seconds)

    def _wait_until(self, deadline: float) -> None:
        with self._lock:
            if deadline > self._now:
                self.waits.append(deadline - self._now)
                self._now = deadline


class _Clock:
    """The limiters' time: real monotonic seconds, or a :class:`LimiterClock` while one is set."""

    __slots__ = ("virtual",)

    def __init__(self) -> None:
        self.virtual: LimiterClock | None = None

    def now(self) -> float:
        virtual = self.virtual
        return time.monotonic() if virtual is None else virtual.now()

    async def wait_until(self, deadline: float) -> None:
        virtual = self.virtual
        if virtual is not None:
            # No suspension: the caller goes on at the virtual instant it waited for, before any
            # other waiter can move the clock further.
            virtual._wait_until(deadline)
            return
        delay = deadline - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


_clock = _Clock()


class _Slots:
    """At most ``size`` holders; waiters are futures on their own loops, served in arrival order."""

    __slots__ = ("_lock", "_waiters", "free", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.free = size
        self._lock = threading.Lock()
        self._waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = deque()

    async def acquire(self) -> None:
        with self._lock:
            if self.free and not self._waiters:
                self.free -= 1
                return
            loop = asyncio.get_running_loop()
            waiter = (loop, loop.create_future())
            self._waiters.append(waiter)
        try:
            await waiter[1]
        except BaseException:
            with self._lock:
                try:
                    self._waiters.remove(waiter)
                    handed = False
                except ValueError:
                    handed = True  # a leaving holder already passed its slot to this waiter
            if handed:
                self.release()
            raise

    def release(self) -> None:
        with self._lock:
            if not self._waiters:
                self.free += 1
                return
            loop, future = self._waiters.popleft()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            _hand(future)
        else:
            loop.call_soon_threadsafe(_hand, future)


def _hand(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
    # A cancelled waiter gives the slot back itself (it finds it was handed one).


class _Bucket:
    """A token bucket of capacity one: call *k* may start no earlier than ``k / rate`` seconds in.

    Each taker reserves the next free instant under the lock, then waits for it; a taker
    cancelled while it waits returns its instant when no later taker has reserved one since.
    """

    __slots__ = ("_lock", "_next", "interval")

    def __init__(self, per_second: float) -> None:
        self.interval = 1.0 / per_second
        self._next = -math.inf
        self._lock = threading.Lock()

    async def take(self) -> None:
        clock = _clock
        with self._lock:
            now = clock.now()
            at = max(now, self._next)
            self._next = at + self.interval
        if at <= now:
            return
        try:
            await clock.wait_until(at)
        except BaseException:
            with self._lock:
                if self._next == at + self.interval:
                    self._next = at
            raise


class Limit:
    """How many calls may run at once and how many may start per unit of time, shared by its users.

    Args:
        concurrency: calls allowed to run at once (an int >= 1), or None for no such limit.
        rate: calls allowed to start per unit of time: ``"50/s"``, ``"600/min"``, ``"1000/h"``.
        name: shown in errors and ``repr``.

    Give one object to several steps (``@step(limit=api)``) to make them share one API key's
    quota, across pipelines and concurrent runs in the process, as one ``CircuitBreaker`` can
    guard many steps. ``in_flight`` is the number of current holders.

    Raises:
        ConfigError: neither limit is given, or one has an invalid value.
    """

    __slots__ = ("_bucket", "_slots", "concurrency", "name", "per_second", "rate")

    def __init__(
        self, concurrency: int | None = None, rate: str | None = None, *, name: str | None = None
    ) -> None:
        label = f"Limit({name!r})" if name else "Limit"
        if concurrency is None and rate is None:
            raise ConfigError(f'{label} needs concurrency=N, rate="N/s" (or /min, /h), or both')
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"{label}: name must be a str or None, got {name!r}")
        self.name = name
        self.concurrency = (
            None if concurrency is None else _check_concurrency(concurrency, f"{label} concurrency")
        )
        self.rate = rate
        self.per_second = None if rate is None else parse_rate(rate, f"{label} rate")
        self._slots = None if self.concurrency is None else _Slots(self.concurrency)
        self._bucket = None if self.per_second is None else _Bucket(self.per_second)

    @classmethod
    def for_step(cls, step_name: str, concurrency: int | None, rate: str | None) -> Limit | None:
        """The limit one run gives a step declared with ``concurrency=`` / ``rate_limit=``."""
        if concurrency is None and rate is None:
            return None
        return cls(concurrency, rate, name=step_name)

    def __repr__(self) -> str:
        parts = [f"name={self.name!r}"] if self.name else []
        if self.concurrency is not None:
            parts.append(f"concurrency={self.concurrency}")
        if self.rate is not None:
            parts.append(f"rate={self.rate!r}")
        return f"Limit({', '.join(parts)})"

    @property
    def in_flight(self) -> int:
        """Calls holding a slot now (0 without a concurrency limit)."""
        slots = self._slots
        return 0 if slots is None else slots.size - slots.free

    async def acquire(self) -> None:
        """Wait for a slot, then for a token; on cancellation nothing stays held."""
        slots = self._slots
        if slots is not None:
            await slots.acquire()
        bucket = self._bucket
        if bucket is not None:
            try:
                await bucket.take()
            except BaseException:
                if slots is not None:
                    slots.release()
                raise

    def release(self) -> None:
        """Give back the slot taken by :meth:`acquire` (a token is spent, never given back)."""
        if self._slots is not None:
            self._slots.release()

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """``async with limit.hold():`` run one call under the limit."""
        await self.acquire()
        try:
            yield
        finally:
            self.release()


async def acquire_all(limits: tuple[Limit, ...] | list[Limit]) -> None:
    """Acquire every limit in order; if one wait is cancelled or fails, give back those taken."""
    for n, limit in enumerate(limits):
        try:
            await limit.acquire()
        except BaseException:
            release_all(limits[:n])
            raise


def release_all(limits: tuple[Limit, ...] | list[Limit]) -> None:
    for limit in limits:
        limit.release()
