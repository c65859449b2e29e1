"""Mapped steps and stream sources: options, order, zip, streaming, items' own layers, limits."""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from holders import Holders

from flowyml import (
    CircuitBreaker,
    ConfigError,
    ItemFailed,
    Limit,
    Pipeline,
    PipelineResult,
    Step,
    StepStatus,
    Store,
    retry,
    step,
)
from flowyml.errors import StepTimeoutError
from flowyml.testing import limiter_clock, no_sleep
from tests.test_limits import within_one_token


async def fetch(url: str) -> str:
    return url.upper()


def test_map_over_is_normalised_and_kept() -> None:
    s = step(inputs=["urls"], outputs=["pages"], map_over="urls")(fetch)
    assert s.map_over == ("urls",)
    assert s.map_errors == "raise"
    assert s.stream is None
    plain = step(inputs=["urls"], outputs=["pages"])(fetch)
    assert plain.map_over == ()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"inputs": ["urls"], "map_over": "url"},
            r"step 'fetch': map_over='url' is not one of its inputs \['urls'\]",
        ),
        ({"map_over": "link"}, r"map_over='link' is not one of its parameters \['url'\]"),
        ({"inputs": ["urls"], "map_over": ["urls", "urls"]}, "lists 'urls' twice"),
        ({"inputs": ["urls"], "map_over": "urls", "execution_group": "g"}, "execution_group="),
        ({"inputs": ["urls"], "concurrency": 0}, r"step 'fetch': concurrency=0 must be an int >= 1"),
        ({"inputs": ["urls"], "concurrency": True}, "concurrency=True"),
        ({"inputs": ["urls"], "rate_limit": "50/sec"}, r"step 'fetch': rate_limit='50/sec' is not a rate"),
        ({"inputs": ["urls"], "rate_limit": 50}, "rate_limit=50"),
        ({"inputs": ["urls"], "limit": 20}, "step 'fetch': limit= takes a flowyml.Limit"),
        ({"inputs": ["urls"], "max_pending": 10}, "step 'fetch': max_pending= .* has no map_over="),
        ({"inputs": ["urls"], "map_over": "urls", "max_pending": 0}, "max_pending=0 must be an int >= 1"),
        ({"inputs": ["urls"], "map_errors": "collect"}, "map_errors='collect' .* no map_over="),
        ({"inputs": ["urls"], "map_over": "urls", "map_errors": "ignore"}, "map_errors='ignore' is unknown"),
    ],
)
def test_bad_mapping_options_name_the_step_and_option(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        step(**options)(fetch)


def test_limits_are_accepted_on_unmapped_steps_too() -> None:
    shared = Limit(concurrency=20, rate="50/s")
    s = step(inputs=["urls"], concurrency=4, rate_limit="10/s", limit=shared)(fetch)
    assert (s.concurrency, s.rate_limit, s.limit) == (4, "10/s", shared)


def numbers() -> Iterator[int]:
    yield from range(3)


async def anumbers() -> AsyncIterator[int]:
    for i in range(3):
        yield i


def test_generator_functions_are_stream_sources() -> None:
    assert step(outputs=["n"])(numbers).stream == "sync"
    assert step(outputs=["n"])(anumbers).stream == "async"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"outputs": ["a", "b"]}, "at most one output"),
        ({"outputs": ["n"], "retry": 2}, "cannot be retried"),
        ({"outputs": ["n"], "execution_group": "g"}, "execution_group"),
        ({"outputs": ["n"], "executor": "process"}, "drop executor="),
    ],
)
def test_stream_sources_reject_what_they_cannot_do(options: dict[str, Any], message: str) -> None:
    with pytest.raises(
        ConfigError, match=f"step 'numbers' is a generator function, a stream source, so it .*{message}"
    ):
        step(**options)(numbers)


def test_item_failed_is_falsy_and_says_what_failed() -> None:
    marker = ItemFailed("fetch", 3, TimeoutError("slow"))
    assert not marker
    assert repr(marker) == "ItemFailed('fetch', index=3, error=TimeoutError: slow)"


# ---------------------------------------------------------------------------- running mapped steps


def pipeline(*steps: Step, **options: Any) -> Pipeline:
    p = Pipeline(
        "map",
        enable_cache=options.pop("enable_cache", False),
        lineage=options.pop("lineage", False),
        **options,
    )
    for s in steps:
        p.add_step(s)
    return p


def source(name: str, value: Any) -> Step:
    return step(name=f"make_{name}", outputs=[name])(lambda: value)


class TestMapping:
    def test_output_keeps_input_order_and_a_plain_consumer_gets_the_whole_list(self) -> None:
        @step(inputs=["xs"], outputs=["ys"], map_over="xs")
        async def slow_first(x: int) -> int:
            await asyncio.sleep(0.001 * (10 - x))  # later items finish first
            return x * 10

        @step(inputs=["ys"], outputs=["total"])
        def total(ys: list[int]) -> list[int]:
            return ys

        result = pipeline(source("xs", list(range(10))), slow_first, total).run()
        assert result.success, result.summary()
        assert result["ys"] == [x * 10 for x in range(10)]
        assert result["total"] == result["ys"]
        mapped = result.step_results["slow_first"]
        assert mapped.item_counts == {"succeeded": 10}
        assert [item.index for item in mapped.items] == list(range(10))
        assert [item.output for item in mapped.items] == result["ys"]

    def test_two_inputs_are_zipped(self) -> None:
        @step(inputs=["a", "b"], outputs=["pairs"], map_over=["a", "b"])
        def pair(a: int, b: str, sep: str = "-") -> str:
            return f"{a}{sep}{b}"

        result = pipeline(source("a", [1, 2, 3]), source("b", ["x", "y", "z"]), pair).run()
        assert result["pairs"] == ["1-x", "2-y", "3-z"]

    def test_unequal_lengths_fail_the_step_naming_both(self) -> None:
        @step(inputs=["a", "b"], outputs=["pairs"], map_over=["a", "b"])
        def pair(a: int, b: int) -> int:
            return a + b

        result = pipeline(source("a", [1, 2, 3]), source("b", [1, 2, 3, 4, 5]), pair).run()
        res = result.step_results["pair"]
        assert res.status is StepStatus.FAILED
        assert "'a' has 3 items and 'b' has 5" in str(res.error)

    def test_an_unmapped_input_is_passed_whole_to_every_item(self) -> None:
        @step(inputs=["xs", "offset"], outputs=["ys"], map_over="xs")
        def shift(x: int, offset: int) -> int:
            return x + offset

        result = pipeline(source("xs", [1, 2]), source("offset", 100), shift).run()
        assert result["ys"] == [101, 102]

    def test_map_over_a_context_value(self) -> None:
        @step(outputs=["ys"], map_over="xs")
        def square(xs: int) -> int:
            return xs * xs

        assert pipeline(square).run(context={"xs": [1, 2, 3]})["ys"] == [1, 4, 9]

    def test_mapped_stage_feeds_the_next_with_no_barrier(self) -> None:
        """Item 0 of stage two finishes before the last item of stage one starts."""
        events: list[str] = []

        @step(inputs=["xs"], outputs=["ys"], map_over="xs", concurrency=2)
        async def one(x: int) -> int:
            events.append(f"one start {x}")
            await asyncio.sleep(0.002)
            return x

        @step(inputs=["ys"], outputs=["zs"], map_over="ys")
        async def two(y: int) -> int:
            events.append(f"two end {y}")
            return y

        result = pipeline(source("xs", list(range(20))), one, two).run()
        assert result["zs"] == list(range(20))
        assert events.index("two end 0") < events.index("one start 19")

    def test_async_generator_feeds_a_mapped_step_while_it_is_still_yielding(self) -> None:
        events: list[str] = []

        @step(outputs=["xs"])
        async def numbers() -> AsyncIterator[int]:
            for i in range(5):
                events.append(f"yield {i}")
                yield i
                await asyncio.sleep(0.001)
            events.append("generator done")

        @step(inputs=["xs"], outputs=["ys"], map_over="xs")
        async def consume(x: int) -> int:
            events.append(f"consume {x}")
            return x + 1

        @step(inputs=["xs"], outputs=["seen"])
        def whole(xs: list[int]) -> list[int]:
            return xs

        result = pipeline(numbers, consume, whole).run()
        assert result.success, result.summary()
        assert result["ys"] == [1, 2, 3, 4, 5]
        assert result["seen"] == [0, 1, 2, 3, 4]
        assert events.index("consume 0") < events.index("generator done")

    def test_a_plain_generator_is_a_stream_too(self) -> None:
        @step(outputs=["xs"])
        def numbers() -> Iterator[int]:
            yield from range(4)

        @step(inputs=["xs"], outputs=["ys"], map_over="xs")
        def double(x: int) -> int:
            return 2 * x

        assert pipeline(numbers, double).run()["ys"] == [0, 2, 4, 6]

    @pytest.mark.slow
    def test_a_generator_never_runs_more_than_max_pending_ahead(self) -> None:
        produced = 0
        finished = 0
        worst = 0

        @step(outputs=["xs"])
        async def numbers() -> AsyncIterator[int]:
            nonlocal produced, worst
            for i in range(100_000):
                produced += 1
                worst = max(worst, produced - finished)
                yield i

        @step(inputs=["xs"], outputs=["ys"], map_over="xs", concurrency=10, max_pending=50)
        async def slow(x: int) -> None:
            nonlocal finished
            await asyncio.sleep(0)
            finished += 1

        result = pipeline(numbers, slow).run()
        assert result.success, result.summary()
        assert len(result["ys"]) == 100_000
        assert 10 <= worst <= 50

    def test_items_retry_and_time_out_on_their_own(self) -> None:
        tries: collections.Counter[int] = collections.Counter()

        @step(inputs=["xs"], outputs=["ys"], map_over="xs", retry=3, timeout=0.05, map_errors="collect")
        async def flaky(x: int) -> int:
            tries[x] += 1
            if x == 4:
                await asyncio.sleep(10)
            if tries[x] <= x % 3:
                raise ConnectionError(f"item {x}, try {tries[x]}")
            return x

        with no_sleep():
            result = pipeline(source("xs", list(range(6))), flaky).run()
        res = result.step_results["flaky"]
        assert res.status is StepStatus.SUCCEEDED
        assert [item.attempts for item in res.items] == [1, 2, 3, 1, 4, 3]
        assert res.items[4].status is StepStatus.TIMED_OUT
        assert isinstance(res.items[4].error, StepTimeoutError)
        assert res.item_counts == {"succeeded": 5, "timed_out": 1}
        assert [i.index for i in res.failed_items] == [4]
        assert isinstance(result["ys"][4], ItemFailed) and result["ys"][4].index == 4

    def test_first_failed_item_fails_the_step_and_cancels_the_others(self) -> None:
        @step(inputs=["xs"], outputs=["ys"], map_over="xs")
        async def boom(x: int) -> int:
            if x == 0:
                raise ValueError("bad item")
            await asyncio.sleep(10)
            return x

        @step(inputs=["ys"], outputs=["after"])
        def after(ys: list[int]) -> int:
            return len(ys)

        result = pipeline(source("xs", list(range(5))), boom, after).run()
        res = result.step_results["boom"]
        assert res.status is StepStatus.FAILED
        assert isinstance(res.error, ValueError)
        assert "item 0 of mapped step 'boom'" in "".join(res.error.__notes__)
        assert res.item_counts == {"failed": 1, "cancelled": 4}
        assert result.step_results["after"].status is StepStatus.SKIPPED

    def test_collect_lets_every_item_finish_and_marks_failures(self) -> None:
        @step(inputs=["xs"], outputs=["ys"], map_over="xs", map_errors="collect")
        def invert(x: int) -> float:
            return 1 / x

        @step(inputs=["ys"], outputs=["zs"], map_over="ys")
        def negate(y: float) -> float:
            return -y

        result = pipeline(source("xs", [1, 0, 2, 0]), invert, negate).run()
        assert result.success, result.summary()
        ys, zs = result["ys"], result["zs"]
        assert ys[0] == 1.0 and ys[2] == 0.5
        assert [type(y) for y in ys] == [float, ItemFailed, float, ItemFailed]
        assert isinstance(ys[1].error, ZeroDivisionError)
        assert zs[1] is ys[1]  # a consumer passes the marker on
        assert result.step_results["invert"].item_counts == {"succeeded": 2, "failed": 2}
        assert result.step_results["negate"].item_counts == {"succeeded": 2, "skipped": 2}


class TestLimits:
    def test_concurrency_of_a_mapped_step_is_never_exceeded(self) -> None:
        holders = Holders()

        @step(inputs=["xs"], outputs=["ys"], map_over="xs", concurrency=3)
        async def held(x: int) -> int:
            holders.enter()
            await asyncio.sleep(0.001)
            holders.leave()
            return x

        assert pipeline(source("xs", list(range(30))), held).run().success
        assert holders.most == 3

    def test_one_limit_shared_by_two_steps_and_two_concurrent_runs(self) -> None:
        api = Limit(concurrency=2, name="api")
        holders = Holders()

        async def call(x: int) -> int:
            holders.enter()
            await asyncio.sleep(0.001)
            holders.leave()
            return x

        first = step(name="first", inputs=["xs"], outputs=["ys"], map_over="xs", limit=api)(call)
        second = step(name="second", inputs=["xs"], outputs=["zs"], map_over="xs", limit=api)(call)
        p = pipeline(source("xs", list(range(20))), first, second)

        async def twice() -> list[PipelineResult]:
            return list(await asyncio.gather(p.arun(), p.arun()))

        assert all(r.success for r in asyncio.run(twice()))
        assert holders.most == 2

    def test_a_shared_limit_holds_across_runs_in_two_threads(self) -> None:
        api = Limit(concurrency=2)
        holders = Holders()

        @step(inputs=["xs"], outputs=["ys"], map_over="xs", limit=api)
        def blocking(x: int) -> int:
            holders.enter()
            time.sleep(0.002)
            holders.leave()
            return x

        p = pipeline(source("xs", list(range(12))), blocking)
        results: list[PipelineResult] = []
        threads = [threading.Thread(target=lambda: results.append(p.run())) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [r.success for r in results] == [True, True]
        assert holders.most == 2

    def test_concurrency_counts_calls_of_unmapped_steps(self) -> None:
        one_at_a_time = Limit(concurrency=1)
        holders = Holders()

        def make(i: int) -> Step:
            async def call() -> int:
                holders.enter()
                await asyncio.sleep(0.002)
                holders.leave()
                return i

            return step(name=f"call{i}", outputs=[f"r{i}"], limit=one_at_a_time)(call)

        assert pipeline(*(make(i) for i in range(5))).run().success
        assert holders.most == 1

    def test_rate_limit_is_respected_within_one_token(self) -> None:
        with limiter_clock() as clock:
            starts: list[float] = []

            @step(inputs=["xs"], outputs=["ys"], map_over="xs", rate_limit="50/s")
            async def call(x: int) -> int:
                starts.append(clock.now())
                return x

            assert pipeline(source("xs", list(range(120))), call).run().success
        assert len(starts) == 120
        assert within_one_token(starts, 50.0)
        assert max(starts) == pytest.approx(119 / 50)

    @pytest.mark.slow
    def test_an_item_timeout_starts_once_it_holds_its_slot(self) -> None:
        """A step holds the one shared slot for 0.8 s; items with a 0.5 s timeout wait for it, and none times out."""
        slot = Limit(concurrency=1)

        @step(outputs=["done"], limit=slot)
        async def hog() -> bool:
            await asyncio.sleep(0.8)
            return True

        @step(inputs=["xs"], outputs=["ys"], map_over="xs", limit=slot, timeout=0.5)
        async def quick(x: int) -> int:
            await asyncio.sleep(0.01)
            return x

        result = pipeline(source("xs", list(range(5))), hog, quick).run()
        assert result.success, result.summary()
        assert result["ys"] == list(range(5))
        items = result.step_results["quick"].items
        assert items is not None and all(i.status is StepStatus.SUCCEEDED for i in items)

    def test_breaker_open_items_are_retried_after_recovery(self) -> None:
        calls = 0
        breaker = CircuitBreaker(failure_threshold=3, recovery_timeout=0.05)

        @step(
            inputs=["xs"],
            outputs=["ys"],
            map_over="xs",
            concurrency=4,
            retry=retry(max_attempts=4, initial=0.001),
        )
        @breaker
        async def call(x: int) -> int:
            nonlocal calls
            calls += 1
            down = calls <= 3
            await asyncio.sleep(0.001)
            if down:
                raise ConnectionError("service down")
            return x

        result = pipeline(source("xs", list(range(20))), call).run()
        assert result.success, result.summary()
        assert result["ys"] == list(range(20))
        stats = breaker.stats()
        assert stats.times_opened == 1
        assert stats.rejected >= 1  # items were refused while it was open, and retried after


FAILING: set[int] = set()
CALLS: list[int] = []


@step(inputs=["xs"], outputs=["ys"], map_over="xs", cache="input_hash", map_errors="collect")
def square(x: int) -> int:
    CALLS.append(x)
    if x in FAILING:
        raise RuntimeError(f"item {x} failed")
    return x * x


class TestItemsInTheStore:
    def test_rerun_after_a_partial_failure_recomputes_only_the_failed_items(self, tmp_path: Path) -> None:
        p = pipeline(
            source("xs", list(range(10))), square, enable_cache=True, lineage=True, cache_dir=tmp_path
        )
        FAILING.clear()
        FAILING.update({3, 7})
        CALLS.clear()
        first = p.run()
        assert sorted(CALLS) == list(range(10))
        assert first.step_results["square"].item_counts == {"succeeded": 8, "failed": 2}
        FAILING.clear()
        CALLS.clear()
        second = p.run()
        assert sorted(CALLS) == [3, 7]
        assert second["ys"] == [x * x for x in range(10)]
        items = second.step_results["square"].items
        assert items is not None
        assert [i.index for i in items if i.status is StepStatus.SUCCEEDED] == [3, 7]
        assert sum(1 for i in items if i.status is StepStatus.CACHED) == 8
        assert second.step_results["square"].cache_reason == "8 of 10 items from the cache"
        assert all(i.cache_key for i in items)
        CALLS.clear()
        third = p.run(context={})
        assert CALLS == []
        assert third.step_results["square"].status is StepStatus.CACHED

    def test_a_reordered_list_still_hits_every_item(self, tmp_path: Path) -> None:
        FAILING.clear()
        p = pipeline(source("xs", [1, 2, 3]), square, enable_cache=True, lineage=False, cache_dir=tmp_path)
        p.run()
        CALLS.clear()
        q = pipeline(source("xs", [3, 1, 2, 4]), square, enable_cache=True, lineage=False, cache_dir=tmp_path)
        assert q.run()["ys"] == [9, 1, 4, 16]
        assert CALLS == [4]

    def test_each_item_has_a_lineage_record_with_its_index(self, tmp_path: Path) -> None:
        FAILING.clear()
        FAILING.add(6)
        p = pipeline(source("xs", [5, 6, 7]), square, enable_cache=False, lineage=True, cache_dir=tmp_path)
        result = p.run()
        FAILING.clear()

        async def read() -> Any:
            store = await Store.open(tmp_path)
            try:
                return await store.get_run(result.run_id)
            finally:
                await store.aclose()

        detail = asyncio.run(read())
        by_name = {s.step_name: s for s in detail.steps}
        assert {"square[0]", "square[1]", "square[2]", "square", "make_xs"} <= set(by_name)
        assert by_name["square[0]"].status == "succeeded"
        assert by_name["square[1]"].status == "failed"
        assert by_name["square[1]"].error_type == "RuntimeError"
        assert by_name["square[2]"].inputs == {"x": ("make_xs", "xs")}


def _process_square(x: int) -> int:
    return x * x


class TestShapes:
    def test_a_consumer_that_also_needs_the_whole_stream_does_not_stall_it(self) -> None:
        """`scale` maps over the stream and also reads `count`, made from the whole stream."""

        @step(outputs=["xs"])
        async def numbers() -> AsyncIterator[int]:
            for i in range(200):
                yield i

        @step(inputs=["xs"], outputs=["count"])
        def count(xs: list[int]) -> int:
            return len(xs)

        @step(inputs=["xs", "count"], outputs=["ys"], map_over="xs", max_pending=5)
        def scale(x: int, count: int) -> float:
            return x / count

        p = pipeline(numbers, count, scale)
        assert (0, 2) in p.plan().unpaced
        result = p.run()
        assert result.success, result.summary()
        assert result["ys"][100] == 0.5

    def test_without_fail_fast_a_failed_producer_skips_its_mapped_consumer(self) -> None:
        @step(inputs=["xs"], outputs=["ys"], map_over="xs")
        def fail_on_two(x: int) -> int:
            if x == 2:
                raise ValueError("two")
            return x

        @step(inputs=["ys"], outputs=["zs"], map_over="ys")
        def passthrough(y: int) -> int:
            return y

        @step(outputs=["other"])
        def other() -> str:
            return "done"

        result = pipeline(source("xs", [0, 1, 2, 3]), fail_on_two, passthrough, other).run(fail_fast=False)
        assert result.step_results["fail_on_two"].status is StepStatus.FAILED
        consumer = result.step_results["passthrough"]
        assert consumer.status is StepStatus.SKIPPED
        assert consumer.skip_reason == "upstream step 'fail_on_two' did not produce its outputs"
        assert result["other"] == "done"

    @pytest.mark.slow
    def test_items_run_in_worker_processes(self) -> None:
        mapped = step(inputs=["xs"], outputs=["ys"], map_over="xs", executor="process")(_process_square)
        result = pipeline(source("xs", [1, 2, 3]), mapped, max_processes=2).run()
        assert result["ys"] == [1, 4, 9]

    def test_max_concurrency_of_the_pipeline_counts_items(self) -> None:
        holders = Holders()

        @step(inputs=["xs"], outputs=["ys"], map_over="xs")
        async def held(x: int) -> int:
            holders.enter()
            await asyncio.sleep(0.001)
            holders.leave()
            return x

        assert pipeline(source("xs", list(range(10))), held, max_concurrency=2).run().success
        assert holders.most == 2


class TestProgressHook:
    def test_item_progress_is_called_once_per_item_with_done_failed_total(self) -> None:
        """The call site an ItemsProgress event hooks into: a RunHooks subclass sees every item."""
        from flowyml._attempt import RunHooks, UnitRunner
        from flowyml._executors._local import AsyncExecutor
        from flowyml._scheduler import Run
        from flowyml._state import RunState

        seen: list[tuple[str, int, int, int | None]] = []

        class Progress(RunHooks):
            def item_progress(self, node: Any, done: int, failed: int, total: int | None) -> None:
                seen.append((node.name, done, failed, total))

        @step(inputs=["xs"], outputs=["ys"], map_over="xs", map_errors="collect")
        async def half(x: int) -> float:
            if x == 2:
                raise ValueError("two")
            return x / 2

        @step(outputs=["xs"])
        async def xs() -> list[int]:
            return [1, 2, 3]

        plan = pipeline(xs, half).plan()
        executor = AsyncExecutor()

        async def run() -> None:
            state = RunState(plan, {})
            runner = UnitRunner(state, [executor] * len(plan.nodes), hooks=Progress())
            await Run(state, runner).execute()

        asyncio.run(run())
        assert [s[1] for s in seen] == [1, 2, 3]
        assert seen[-1] == ("half", 3, 1, 3)


def test_a_decorator_above_a_mapped_step_keeps_its_mapping() -> None:
    """@retry written above @step(map_over=...) gives the same mapped step, limits included."""
    shared = Limit(concurrency=3)

    @retry(max_attempts=2)
    @step(inputs=["xs"], outputs=["ys"], map_over="xs", concurrency=2, rate_limit="5/s", limit=shared,
          max_pending=7, map_errors="collect")  # fmt: skip
    async def fetch(x: int) -> int:
        return x

    assert isinstance(fetch, Step)
    assert (fetch.map_over, fetch.concurrency, fetch.rate_limit, fetch.limit) == (("xs",), 2, "5/s", shared)
    assert (fetch.max_pending, fetch.map_errors, fetch.retry_policy is not None) == (7, "collect", True)
