"""Run events: their order and contents, listeners plain and async, drops, detaching, stream()."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path

import pytest

from flowyml import Pipeline, StepStatus, retry, step, when
from flowyml.errors import ConfigError, MissingInputError
from flowyml.events import (
    Event,
    ItemsProgress,
    RunFinished,
    RunStarted,
    StepFinished,
    StepRetrying,
    StepStarted,
)


def _kinds(events: list[Event], name: str) -> list[str]:
    return [type(e).__name__ for e in events if getattr(e, "step", None) == name]


def _mixed_pipeline(tmp_path: Path, calls: dict[str, int]) -> Pipeline:
    """load (cacheable) -> flaky (fails once, retried) -> gated (condition false) and broken -> after."""

    @step(outputs=["x"])
    def load() -> int:
        return 1

    @step(inputs=["x"], outputs=["y"], cache=False)
    @retry(max_attempts=3, initial=0.25, jitter=False)
    def flaky(x: int) -> int:
        calls["flaky"] += 1
        if calls["flaky"] % 2:
            raise ValueError("first attempt fails")
        return x + 1

    @step(inputs=["y"], outputs=["z"], cache=False)
    @when(lambda y: y < 0)
    def gated(y: int) -> int:
        return y

    @step(inputs=["y"], outputs=["w"], cache=False)
    def broken(y: int) -> int:
        raise RuntimeError("broken on purpose")

    @step(inputs=["w"], outputs=["v"], cache=False)
    def after(w: int) -> int:
        return w

    p = Pipeline("mixed", cache_dir=tmp_path / "store")
    for s in (load, flaky, gated, broken, after):
        p.add_step(s)
    return p


class TestSequence:
    def test_retry_cache_hit_skip_and_failure(self, tmp_path: Path, no_sleep: list[float]) -> None:
        """Each step's events in order; RunStarted first, RunFinished last, one StepFinished each."""
        calls = {"flaky": 0}
        p = _mixed_pipeline(tmp_path, calls)
        p.run(fail_fast=False)  # fills the cache for `load`
        no_sleep.clear()
        events: list[Event] = []
        result = p.run(fail_fast=False, on_event=events.append)

        assert isinstance(events[0], RunStarted) and events[0].steps == 5
        assert isinstance(events[-1], RunFinished) and events[-1].result is result
        assert events[-1].dropped == 0
        assert _kinds(events, "load") == ["StepStarted", "StepFinished"]
        assert _kinds(events, "flaky") == ["StepStarted", "StepRetrying", "StepFinished"]
        assert _kinds(events, "gated") == ["StepFinished"]
        assert _kinds(events, "broken") == ["StepStarted", "StepFinished"]
        assert _kinds(events, "after") == ["StepFinished"]

        finished = {e.step: e for e in events if isinstance(e, StepFinished)}
        assert finished["load"].status is StepStatus.CACHED and finished["load"].cached
        assert finished["load"].cache_reason == result.step_results["load"].cache_reason == "cache hit"
        assert finished["flaky"].cache_reason == result.step_results["flaky"].cache_reason is not None
        assert finished["flaky"].status is StepStatus.SUCCEEDED and finished["flaky"].attempts == 2
        assert not finished["flaky"].cached
        assert finished["gated"].status is StepStatus.SKIPPED and finished["gated"].attempts == 0
        assert finished["broken"].status is StepStatus.FAILED and finished["broken"].attempts == 1
        assert finished["after"].status is StepStatus.SKIPPED
        for name, event in finished.items():
            assert event.duration == result.step_results[name].duration_seconds

        (retrying,) = [e for e in events if isinstance(e, StepRetrying)]
        assert (retrying.attempt, retrying.delay) == (1, 0.25)
        assert isinstance(retrying.error, ValueError)
        assert no_sleep == [0.25]

        position = {id(e): i for i, e in enumerate(events)}
        load_done, flaky_start = (
            finished["load"],
            next(e for e in events if isinstance(e, StepStarted) and e.step == "flaky"),
        )
        assert position[id(load_done)] < position[id(flaky_start)]
        times = [e.time for e in events]
        assert times == sorted(times)
        assert {e.run_id for e in events} == {result.run_id}
        assert {e.pipeline for e in events} == {"mixed"}

    def test_events_are_frozen(self, tmp_path: Path) -> None:
        """Events are values: assigning to a field raises."""
        events: list[Event] = []
        p = Pipeline("frozen", cache_dir=tmp_path)
        p.add_step(step(outputs=["a"])(lambda: 1))
        p.run(on_event=events.append)
        with pytest.raises(dataclasses.FrozenInstanceError):
            events[1].step = "other"  # type: ignore[misc, union-attr]

    def test_fail_fast_reports_never_started_steps_as_finished(self, tmp_path: Path) -> None:
        """A fail-fast run still gives every step exactly one StepFinished, after RunStarted."""

        @step(outputs=["a"])
        def first() -> int:
            raise RuntimeError("stop")

        p = Pipeline("ff", cache_dir=tmp_path)
        p.add_step(first)
        for i in range(3):
            p.add_step(step(name=f"down{i}", inputs=["a"], outputs=[f"d{i}"])(lambda a: a))
        events: list[Event] = []
        result = p.run(on_event=events.append)
        assert not result.success
        names = [e.step for e in events if isinstance(e, StepFinished)]
        assert sorted(names) == ["down0", "down1", "down2", "first"]
        assert isinstance(events[-1], RunFinished)

    def test_grouped_steps_each_start_and_finish(self, tmp_path: Path) -> None:
        """Members of an execution group run as one call, yet each gets its own start and finish."""
        p = Pipeline("grouped", cache_dir=tmp_path)
        p.add_step(step(name="head", outputs=["a"], execution_group="g")(lambda: 1))
        p.add_step(step(name="tail", inputs=["a"], outputs=["b"], execution_group="g")(lambda a: a + 1))
        events: list[Event] = []
        p.run(on_event=events.append)
        assert _kinds(events, "head") == _kinds(events, "tail") == ["StepStarted", "StepFinished"]
        finished = [e for e in events if isinstance(e, StepFinished)]
        assert [e.status for e in finished] == [StepStatus.SUCCEEDED, StepStatus.SUCCEEDED]

    def test_a_mapped_step_reports_its_items(self, tmp_path: Path) -> None:
        """One start and one finish for the mapped step; an ItemsProgress per settled item, in between."""

        @step(outputs=["xs"])
        async def numbers() -> list[int]:
            return [1, 2, 3]

        @step(inputs=["xs"], outputs=["ys"], map_over="xs", map_errors="collect")
        async def half(x: int) -> float:
            if x == 2:
                raise ValueError("two")
            return x / 2

        p = Pipeline("mapped", cache_dir=tmp_path)
        p.add_step(numbers).add_step(half)
        events: list[Event] = []
        p.run(on_event=events.append)
        kinds = _kinds(events, "half")
        assert kinds == ["StepStarted", "ItemsProgress", "ItemsProgress", "ItemsProgress", "StepFinished"]
        items = [e for e in events if isinstance(e, ItemsProgress)]
        assert [(e.done, e.total) for e in items] == [(1, 3), (2, 3), (3, 3)]
        assert items[-1].failed == 1


class TestListeners:
    def test_async_listener_sees_what_a_sync_one_sees(self, tmp_path: Path) -> None:
        """A coroutine listener gets every event, in order, before run() returns."""
        seen: list[Event] = []

        async def listener(event: Event) -> None:
            await asyncio.sleep(0)
            seen.append(event)

        p = Pipeline("async-listener", cache_dir=tmp_path)
        p.add_step(step(outputs=["a"])(lambda: 1))
        p.add_step(step(inputs=["a"], outputs=["b"])(lambda a: a + 1))
        result = p.run(on_event=listener)
        assert [type(e).__name__ for e in seen] == [
            "RunStarted",
            "StepStarted",
            "StepFinished",
            "StepStarted",
            "StepFinished",
            "RunFinished",
        ]
        assert seen[-1].result is result  # type: ignore[union-attr]

    async def test_arun_takes_a_listener_object(self, tmp_path: Path) -> None:
        """An object with an async __call__ counts as a coroutine listener."""

        class Collect:
            def __init__(self) -> None:
                self.events: list[Event] = []

            async def __call__(self, event: Event) -> None:
                self.events.append(event)

        collect = Collect()
        p = Pipeline("object-listener", cache_dir=tmp_path)
        p.add_step(step(outputs=["a"])(lambda: 1))
        await p.arun(on_event=collect)
        assert isinstance(collect.events[-1], RunFinished)

    def test_slow_async_listener_never_delays_a_step(self, tmp_path: Path) -> None:
        """Steps run back to back while the listener sleeps; it still gets everything before run() returns."""
        starts: list[float] = []
        slept = 0.0

        async def stamp(v: int) -> int:
            starts.append(time.monotonic())
            return v + 1

        async def slow(event: Event) -> None:
            nonlocal slept
            t0 = time.monotonic()
            await asyncio.sleep(0.02)
            slept += time.monotonic() - t0

        p = Pipeline("slow-listener", enable_cache=False, lineage=False)
        p.add_step(step(name="s0", outputs=["v0"])(lambda: 0))
        for i in range(1, 21):
            p.add_step(step(name=f"s{i}", inputs=[f"v{i - 1}"], outputs=[f"v{i}"])(stamp))
        received: list[Event] = []

        async def slow_and_record(event: Event) -> None:
            await slow(event)
            received.append(event)

        result = p.run(on_event=slow_and_record)
        assert result.success
        assert len(received) == 2 + 2 * 21 and isinstance(received[-1], RunFinished)
        # Had the listener held the steps back, the chain would span at least the listener's sleeps.
        assert starts[-1] - starts[0] < slept / 4

    @pytest.mark.slow
    def test_a_listener_that_falls_far_behind_loses_events_counted(self) -> None:
        """Beyond the queue's bound, starts give way to finishes; RunFinished.dropped counts the loss."""
        n = 6000
        received: list[Event] = []
        gate = asyncio.Event()

        async def stuck_at_first(event: Event) -> None:
            if not received:
                await gate.wait()
            received.append(event)

        async def noop() -> None:
            return None

        async def release(*_: None) -> None:
            gate.set()

        p = Pipeline("flood", enable_cache=False, lineage=False)
        for i in range(n):
            p.add_step(step(name=f"s{i}", outputs=[f"r{i}"])(noop))
        p.add_step(step(name="release", inputs=[f"r{i}" for i in range(n)], outputs=["done"])(release))
        result = p.run(on_event=stuck_at_first)
        assert result.success
        finished = [e for e in received if isinstance(e, StepFinished)]
        last = received[-1]
        assert isinstance(last, RunFinished)
        assert last.dropped > 0
        assert len(received) + last.dropped == 2 + 2 * (n + 1)
        assert len(finished) == n + 1 == len({e.step for e in finished})

    def test_raising_sync_listener_is_logged_once_and_detached(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The run succeeds; the listener saw events up to the one it raised on, then nothing."""
        seen: list[Event] = []

        def fragile(event: Event) -> None:
            seen.append(event)
            if isinstance(event, StepStarted):
                raise KeyError("listener bug")

        p = Pipeline("fragile", cache_dir=tmp_path)
        p.add_step(step(outputs=["a"])(lambda: 1))
        p.add_step(step(inputs=["a"], outputs=["b"])(lambda a: a))
        with caplog.at_level(logging.ERROR, logger="flowyml.events"):
            result = p.run(on_event=fragile)
        assert result.success
        assert [type(e) for e in seen] == [RunStarted, StepStarted]
        (record,) = [r for r in caplog.records if r.name == "flowyml.events"]
        assert "detached" in record.getMessage() and record.exc_info is not None
        assert record.run_id == result.run_id  # type: ignore[attr-defined]

    def test_raising_async_listener_is_detached(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A coroutine listener that raises is detached the same way; the run is unaffected."""
        seen: list[Event] = []

        async def fragile(event: Event) -> None:
            seen.append(event)
            raise ValueError("async listener bug")

        p = Pipeline("fragile-async", cache_dir=tmp_path)
        p.add_step(step(outputs=["a"])(lambda: 1))
        with caplog.at_level(logging.ERROR, logger="flowyml.events"):
            assert p.run(on_event=fragile).success
        assert len(seen) == 1
        assert len([r for r in caplog.records if r.name == "flowyml.events"]) == 1

    def test_on_event_must_be_callable(self, tmp_path: Path) -> None:
        """A non-callable on_event is refused before any step runs, naming the option."""
        ran: list[int] = []
        p = Pipeline("bad-listener", cache_dir=tmp_path)
        p.add_step(step(outputs=["a"])(lambda: ran.append(1)))
        with pytest.raises(ConfigError, match="on_event"):
            p.run(on_event=[])  # type: ignore[arg-type]
        assert ran == []


class TestCancellation:
    async def test_a_cancelled_run_still_tells_a_plain_listener_how_it_ended(self, tmp_path: Path) -> None:
        """Cancelling arun(): every step gets its StepFinished and RunFinished (state cancelled) comes last."""
        entered = asyncio.Event()

        async def hangs() -> int:
            entered.set()
            await asyncio.Event().wait()
            return 1

        p = Pipeline("cancelled", enable_cache=False, lineage=False)
        p.add_step(step(outputs=["a"])(hangs))
        p.add_step(step(inputs=["a"], outputs=["b"])(lambda a: a))
        events: list[Event] = []
        task = asyncio.ensure_future(p.arun(on_event=events.append))
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        last = events[-1]
        assert isinstance(last, RunFinished) and last.result.state == "cancelled"
        finished = {e.step: e.status for e in events if isinstance(e, StepFinished)}
        assert finished == {"hangs": StepStatus.CANCELLED, "<lambda>": StepStatus.SKIPPED}


class TestStream:
    async def test_stream_yields_every_event_and_ends_with_run_finished(self, tmp_path: Path) -> None:
        """Iterating a stream gives the run's events; RunFinished is last and holds the result."""
        p = Pipeline("streamed", {"k": 2}, cache_dir=tmp_path)
        p.add_step(step(inputs=["k"], outputs=["a"])(lambda k: k * 2))
        events: list[Event] = []
        async with p.stream(context={"k": 5}) as stream:
            async for event in stream:
                events.append(event)
        last = events[-1]
        assert isinstance(last, RunFinished) and last.result["a"] == 10
        assert [type(e) for e in events] == [RunStarted, StepStarted, StepFinished, RunFinished]

    async def test_leaving_the_block_early_cancels_the_run(self, tmp_path: Path) -> None:
        """Breaking out of the iteration cancels the running step and stops the run."""
        cancelled = asyncio.Event()
        entered = asyncio.Event()
        never = asyncio.Event()

        async def waits() -> int:
            entered.set()
            try:
                await never.wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return 1

        p = Pipeline("abandoned", cache_dir=tmp_path)
        p.add_step(step(outputs=["a"])(waits))
        p.add_step(step(inputs=["a"], outputs=["b"])(lambda a: a))
        async with p.stream() as stream:
            async for event in stream:
                if isinstance(event, StepStarted):
                    await entered.wait()
                    break
        assert cancelled.is_set()
        running = [t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "Pipeline.arun"]  # type: ignore[union-attr]
        assert running == []

    async def test_up_front_errors_raise_on_entering(self, tmp_path: Path) -> None:
        """A context value nobody provides is reported when the block is entered."""
        p = Pipeline("needs-context", cache_dir=tmp_path)
        p.add_step(step(inputs=["missing"], outputs=["a"])(lambda missing: missing))
        with pytest.raises(MissingInputError):
            async with p.stream():
                pass

    async def test_a_step_error_does_not_end_the_stream_early(self, tmp_path: Path) -> None:
        """A failing step is an event like any other; the stream still ends with RunFinished."""

        def fails() -> int:
            raise RuntimeError("nope")

        p = Pipeline("failing-stream", cache_dir=tmp_path)
        p.add_step(step(outputs=["a"])(fails))
        async with p.stream() as stream:
            events = [e async for e in stream]
        assert isinstance(events[-1], RunFinished) and not events[-1].result.success
        failed = [e for e in events if isinstance(e, StepFinished)]
        assert failed[0].status is StepStatus.FAILED


class TestItemsProgress:
    def test_items_progress_is_a_frozen_value(self) -> None:
        """ItemsProgress carries done / failed / total for one step (emitted by mapped steps)."""
        event = ItemsProgress("r", "p", 1.0, "each", done=3, failed=1, total=10)
        assert (event.done, event.failed, event.total) == (3, 1, 10)
        with pytest.raises(dataclasses.FrozenInstanceError):
            event.done = 4  # type: ignore[misc]
