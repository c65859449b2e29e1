"""The event channel: bounded, coalescing, counting what it drops; RunFinished always kept."""

from __future__ import annotations

import asyncio

import pytest

from flowyml import PipelineResult, StepResult, StepStatus
from flowyml._dispatch import Channel, Dispatcher
from flowyml.events import (
    Event,
    ItemsProgress,
    RunFinished,
    RunStarted,
    StepFinished,
    StepRetrying,
    StepStarted,
)


def _started(step: str) -> StepStarted:
    return StepStarted("r", "p", 0.0, step)


def _finished(step: str) -> StepFinished:
    return StepFinished("r", "p", 0.0, step, StepResult(step, StepStatus.SUCCEEDED))


def _items(step: str, done: int) -> ItemsProgress:
    return ItemsProgress("r", "p", 0.0, step, done, 0, 10)


def _run_finished() -> RunFinished:
    result = PipelineResult("r", "p", "completed", {}, {}, 0.0, 0.0)
    return RunFinished("r", "p", 0.0, result)


async def _drain(channel: Channel) -> list[Event]:
    out: list[Event] = []
    while len(channel):
        out.append(await channel.get())
    return out


class TestChannel:
    async def test_below_the_bound_everything_is_kept_in_order(self) -> None:
        """Nothing is coalesced while there is room."""
        channel = Channel(bound=10)
        events: list[Event] = [_started("a"), _items("a", 1), _items("a", 2), _finished("a")]
        for e in events:
            channel.put(e)
        assert await _drain(channel) == events and channel.dropped == 0

    async def test_a_finish_takes_the_place_of_its_own_start(self) -> None:
        """At the bound, a step's finish cancels its queued start; order of the rest is kept."""
        channel = Channel(bound=3)
        for e in (_started("a"), _started("b"), _started("c")):
            channel.put(e)
        channel.put(_finished("b"))
        got = await _drain(channel)
        assert [(type(e).__name__, e.step) for e in got] == [  # type: ignore[union-attr]
            ("StepStarted", "a"),
            ("StepStarted", "c"),
            ("StepFinished", "b"),
        ]
        assert channel.dropped == 1

    async def test_a_finish_makes_room_by_dropping_the_oldest_minor_event(self) -> None:
        """Without its own start queued, a finish cancels the oldest start, retry or item count."""
        channel = Channel(bound=2)
        channel.put(StepRetrying("r", "p", 0.0, "x", 1, 0.1, ValueError()))
        channel.put(_started("y"))
        channel.put(_finished("z"))
        got = await _drain(channel)
        assert [type(e) for e in got] == [StepStarted, StepFinished]
        assert channel.dropped == 1

    async def test_item_counts_coalesce_and_minor_events_drop_at_the_bound(self) -> None:
        """A newer item count replaces the queued one; a start with no room is dropped."""
        channel = Channel(bound=2)
        done = _finished("a")
        channel.put(done)
        channel.put(_items("m", 1))
        channel.put(_items("m", 2))
        channel.put(_started("b"))
        got = await _drain(channel)
        assert got == [done, _items("m", 2)]
        assert channel.dropped == 2

    async def test_finishes_drop_only_when_nothing_else_can_give_way(self) -> None:
        """A queue full of finishes drops the next finish, but never RunFinished."""
        channel = Channel(bound=1)
        channel.put(_finished("a"))
        channel.put(_finished("b"))
        channel.put(_run_finished())
        got = await _drain(channel)
        assert [type(e) for e in got] == [StepFinished, RunFinished]
        assert channel.dropped == 1

    async def test_get_waits_for_the_next_event(self) -> None:
        """A consumer waiting on an empty channel wakes when an event arrives."""
        channel = Channel()
        getter = asyncio.ensure_future(channel.get())
        await asyncio.sleep(0)
        assert not getter.done()
        channel.put(_started("a"))
        assert await getter == _started("a")

    async def test_fail_wakes_the_consumer_with_the_error(self) -> None:
        """After fail(), queued events are still delivered, then get() raises the error."""
        channel = Channel()
        channel.put(_started("a"))
        channel.fail(RuntimeError("producer died"))
        assert await channel.get() == _started("a")
        with pytest.raises(RuntimeError, match="producer died"):
            await channel.get()


class TestDispatcher:
    async def test_finish_waits_until_async_listeners_had_everything(self) -> None:
        """finish() returns only after the coroutine listener awaited the last event."""
        seen: list[Event] = []

        async def slow(event: Event) -> None:
            await asyncio.sleep(0.001)
            seen.append(event)

        dispatcher = Dispatcher([slow], run_id="r")
        dispatcher.start()
        dispatcher.emit(RunStarted("r", "p", 0.0, 1))
        dispatcher.emit(_started("a"))
        await dispatcher.finish(_run_finished())
        assert [type(e) for e in seen] == [RunStarted, StepStarted, RunFinished]
