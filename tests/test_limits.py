"""flowyml.Limit: concurrency slots and a token bucket, on one loop, several loops, and virtual time."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from holders import Holders

import flowyml
from flowyml import ConfigError, Limit
from flowyml._limits import parse_rate
from flowyml.testing import limiter_clock


@pytest.mark.parametrize(
    ("text", "per_second"),
    [("50/s", 50.0), ("600/min", 10.0), ("3600/h", 1.0), ("0.5/s", 0.5), (" 2 / s ", 2.0)],
)
def test_rate_strings(text: str, per_second: float) -> None:
    assert parse_rate(text) == pytest.approx(per_second)


@pytest.mark.parametrize("bad", ["50", "50/sec", "50/day", "/s", "fast", "0/s", 50, None])
def test_bad_rate_is_a_config_error_naming_the_option(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"rate_limit=.*(/s|/min|/h|above zero)"):
        parse_rate(bad, "rate_limit")


def test_limit_needs_something_to_limit() -> None:
    with pytest.raises(ConfigError, match="concurrency=N"):
        Limit()
    with pytest.raises(ConfigError, match="concurrency=0"):
        Limit(concurrency=0)
    with pytest.raises(ConfigError, match="rate"):
        Limit(rate="lots")
    assert repr(Limit(3, "5/s", name="api")) == "Limit(name='api', concurrency=3, rate='5/s')"


async def test_concurrency_is_never_exceeded_and_is_reached() -> None:
    limit = Limit(concurrency=3)
    holders = Holders()

    async def call() -> None:
        async with limit.hold():
            holders.enter()
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            holders.leave()

    async with asyncio.TaskGroup() as tg:
        for _ in range(50):
            tg.create_task(call())
    assert holders.most == 3
    assert limit.in_flight == 0


async def test_cancelled_waiters_leave_no_slot_held() -> None:
    limit = Limit(concurrency=1)
    await limit.acquire()
    waiters = [asyncio.create_task(limit.acquire()) for _ in range(5)]
    await asyncio.sleep(0)
    limit.release()  # hands the slot to the first waiter, which is cancelled before it runs
    for w in waiters:
        w.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert limit.in_flight == 0
    await asyncio.wait_for(limit.acquire(), 1)
    assert limit.in_flight == 1


def test_one_limit_shared_by_two_event_loops_in_two_threads() -> None:
    limit = Limit(concurrency=2)
    holders = Holders()

    async def calls() -> None:
        async def call() -> None:
            async with limit.hold():
                holders.enter()
                await asyncio.sleep(0.001)
                holders.leave()

        async with asyncio.TaskGroup() as tg:
            for _ in range(30):
                tg.create_task(call())

    threads = [threading.Thread(target=asyncio.run, args=(calls(),)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert holders.most == 2
    assert limit.in_flight == 0


def within_one_token(times: list[float], per_second: float) -> bool:
    """Over every window [times[i], times[j]], at most rate * width + 1 calls started."""
    times = sorted(times)
    return all(
        j - i + 1 <= per_second * (times[j] - times[i]) + 1 + 1e-9
        for i in range(len(times))
        for j in range(i, len(times))
    )


async def test_rate_is_respected_within_one_token_on_virtual_time() -> None:
    limit = Limit(rate="50/s")
    with limiter_clock() as clock:
        starts: list[float] = []

        async def call() -> None:
            async with limit.hold():
                starts.append(clock.now())

        async with asyncio.TaskGroup() as tg:
            for _ in range(200):
                tg.create_task(call())
    assert len(starts) == 200
    assert within_one_token(starts, 50.0)
    assert clock.now() == pytest.approx(199 / 50)
    assert len(clock.waits) == 199


async def test_a_token_bucket_refills_while_time_passes() -> None:
    limit = Limit(rate="2/s")
    with limiter_clock() as clock:
        await limit.acquire()
        clock.advance(10.0)
        await limit.acquire()  # a token has been waiting: no wait
        assert clock.waits == []
        await limit.acquire()
        assert clock.waits == [pytest.approx(0.5)]


def test_the_checker_notices_a_burst() -> None:
    assert not within_one_token([0.0, 0.0, 0.0], 50.0)
    assert within_one_token([0.0, 0.02, 0.04], 50.0)


async def test_rate_waits_on_the_loop_in_real_time() -> None:
    limit = Limit(rate="20/s")
    t0 = time.monotonic()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    task = asyncio.create_task(ticker())
    for _ in range(3):
        await limit.acquire()
    task.cancel()
    assert time.monotonic() - t0 >= 2 / 20 - 0.005  # two waits of 1/20 s each
    assert ticks >= 2  # the loop kept running while the limiter waited


def test_limit_is_public() -> None:
    assert flowyml.Limit is Limit
    assert "Limit" in flowyml.__all__ and "ItemFailed" in flowyml.__all__
