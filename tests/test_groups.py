"""Execution groups: a chain of grouped steps runs in one worker, each step still on its own record.

A grouped chain is one ``run`` call on its executor; the tests count those calls on a real
executor subclass, since thread and process pools reuse idle workers and so "same thread" or
"same PID" alone would also hold for steps run one by one.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import pytest

from flowyml import Pipeline, StepStatus, context, step
from flowyml._executors._base import Executor
from flowyml._executors._local import ThreadExecutor
from flowyml._executors._process import ProcessExecutor
from flowyml._store import Store

NAMES = ("first", "second", "third")


class _Counting(Executor):
    """Counts the calls a real executor is given, then lets it run them."""

    calls = 0

    async def run(self, fn: Any, args: Any, kwargs: Any, **options: Any) -> Any:
        self.calls += 1
        return await super().run(fn, args, kwargs, **options)  # type: ignore[safe-super]


class CountingThreadExecutor(_Counting, ThreadExecutor):
    """A real thread executor that counts its calls."""


class CountingProcessExecutor(_Counting, ProcessExecutor):
    """A real process executor with a single worker that counts its calls."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)


EXECUTORS = [
    pytest.param(CountingThreadExecutor, id="thread"),
    pytest.param(CountingProcessExecutor, id="process"),
]


def _chain(executor: Executor, group: str | None = "g") -> Pipeline:
    """Three sync steps, each reading the one before, all on ``executor``."""

    @step(outputs=["a"], execution_group=group, executor=executor)
    def first() -> dict[str, Any]:
        return {"pid": os.getpid(), "n": 1}

    @step(outputs=["b"], execution_group=group, executor=executor)
    def second(a: dict[str, Any]) -> dict[str, Any]:
        return {"pid": os.getpid(), "n": a["n"] + 1}

    @step(outputs=["c"], execution_group=group, executor=executor)
    def third(b: dict[str, Any]) -> dict[str, Any]:
        return {"pid": os.getpid(), "n": b["n"] + 1}

    return Pipeline(f"group-{group}").add_step(first).add_step(second).add_step(third)


@pytest.mark.parametrize("make", EXECUTORS)
class TestGroupedChain:
    def test_chain_is_one_executor_call(self, make: Any) -> None:
        """Three grouped sync steps reach their executor as a single call."""
        executor = make()
        result = _chain(executor).run()
        assert result.success, result.summary()
        assert executor.calls == 1
        assert result["c"]["n"] == 3

    def test_ungrouped_steps_are_one_call_each(self, make: Any) -> None:
        """The same steps without a group reach the executor once each."""
        executor = make()
        result = _chain(executor, group=None).run()
        assert result.success, result.summary()
        assert executor.calls == 3

    def test_each_step_is_recorded_and_cached_on_its_own(self, make: Any) -> None:
        """Every member has its own result, and a second run takes each from the cache."""
        first = _chain(make()).run()
        assert [first.step_results[n].status for n in NAMES] == [StepStatus.SUCCEEDED] * 3
        assert [first.step_results[n].step_name for n in NAMES] == list(NAMES)
        again_executor = make()
        again = _chain(again_executor).run()
        assert [again.step_results[n].status for n in NAMES] == [StepStatus.CACHED] * 3
        assert again_executor.calls == 0


class TestProcessGroup:
    def test_members_report_the_same_worker_pid(self) -> None:
        """Every member of a process group runs in the same worker process, not this one."""
        result = _chain(CountingProcessExecutor()).run()
        assert result.success, result.summary()
        pids = {result[name]["pid"] for name in ("a", "b", "c")}
        assert len(pids) == 1
        assert pids.pop() != os.getpid()


class TestFailures:
    def test_failure_inside_the_chain_skips_the_rest(self) -> None:
        """A failing member fails alone; the members after it are skipped."""

        @step(outputs=["x"], execution_group="g")
        def ok() -> int:
            return 1

        @step(outputs=["y"], execution_group="g")
        def broken(x: int) -> int:
            raise ValueError("no")

        @step(outputs=["z"], execution_group="g")
        def never(y: int) -> int:
            return y

        p = Pipeline("fail", enable_cache=False).add_step(ok).add_step(broken).add_step(never)
        result = p.run(fail_fast=False)
        statuses = [result.step_results[n].status for n in ("ok", "broken", "never")]
        assert statuses == [StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.SKIPPED]
        assert isinstance(result.step_results["broken"].error, ValueError)


class TestRetriesInAGroup:
    """Members retry through the same loop as every step: same clock, same annotations."""

    def _flaky_chain(self, calls: list[int], retry: Any) -> Pipeline:
        @step(outputs=["x"], execution_group="g")
        def head() -> int:
            return 1

        @step(outputs=["y"], execution_group="g", retry=retry)
        def flaky(x: int) -> int:
            calls.append(x)
            raise OSError("down")

        return Pipeline("group-retry", enable_cache=False, lineage=False).add_step(head).add_step(flaky)

    def test_max_time_reads_the_no_sleep_clock(self) -> None:
        """Skipped waits still count against max_time, as they do outside a group."""
        from flowyml import RetryConfig
        from flowyml._retry import ExponentialBackoff
        from flowyml.testing import no_sleep

        calls: list[int] = []
        policy = RetryConfig(50, ExponentialBackoff(initial=1.0, multiplier=1.0, jitter=False), max_time=3.5)
        with no_sleep() as delays:
            result = self._flaky_chain(calls, policy).run()
        assert delays == [1.0, 1.0, 1.0]  # a fourth wait would end past 3.5 s
        assert len(calls) == 4
        assert result.step_results["flaky"].attempts == 4

    def test_a_failure_carries_its_attempts(self) -> None:
        from flowyml.testing import no_sleep

        calls: list[int] = []
        with no_sleep():
            result = self._flaky_chain(calls, 2).run()
        error = result.step_results["flaky"].error
        assert isinstance(error, OSError)
        assert error.attempts == 3  # type: ignore[attr-defined]
        assert any("gave up after 3 attempts" in note for note in error.__notes__)


_CHAIN_STARTED = threading.Event()


_CHAIN_RELEASE = threading.Event()


class TestGroupChainsEarlyExit:
    def test_skipped_head_skips_the_rest_of_the_chain(self) -> None:
        """When a group's first step is skipped, the others are skipped too, never run on nothing."""
        ran: list[str] = []

        @step(outputs=["a"], execution_group="g", condition=lambda: False)
        def head() -> int:
            return 1

        @step(outputs=["b"], execution_group="g")
        def middle(a: int) -> int:
            ran.append("middle")
            return a

        @step(outputs=["c"], execution_group="g")
        def last(b: int) -> int:
            ran.append("last")
            return b

        result = Pipeline("g", enable_cache=False).add_step(head).add_step(middle).add_step(last).run()
        assert ran == []
        assert [result.step_results[n].status for n in ("head", "middle", "last")] == [StepStatus.SKIPPED] * 3

    def test_head_whose_key_fails_blocks_the_rest(self) -> None:
        """A group head failing on an unhashable input fails alone; the others are skipped."""
        ran: list[str] = []

        @step(outputs=["a"], execution_group="g")
        def head(lock: Any) -> int:
            return 1

        @step(outputs=["b"], execution_group="g", cache=False)
        def middle(a: int) -> int:
            ran.append("middle")
            return a

        p = Pipeline("g", context=context(lock=threading.Lock())).add_step(head).add_step(middle)
        result = p.run(fail_fast=False)
        assert ran == []
        assert result.step_results["head"].status is StepStatus.FAILED
        assert result.step_results["middle"].status is StepStatus.SKIPPED

    async def test_cancelled_chain_settles_its_cache_claim(self) -> None:
        """Cancelling a run inside a group chain does not leave the next run waiting for ever."""
        started, release = _CHAIN_STARTED, _CHAIN_RELEASE
        started.clear()
        release.clear()

        @step(outputs=["a"], execution_group="g")
        def head() -> int:
            _CHAIN_STARTED.set()  # module globals: an Event in a closure would have no cache key
            _CHAIN_RELEASE.wait(10)
            return 1

        @step(outputs=["b"], execution_group="g")
        def tail(a: int) -> int:
            return a + 1

        p = Pipeline("claim").add_step(head).add_step(tail)
        task = asyncio.create_task(p.arun())
        await asyncio.to_thread(started.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        async with asyncio.timeout(10):
            again = await p.arun()
        assert again["b"] == 2


class TestCachedHead:
    """A chain whose head is a cache hit."""

    async def test_cached_group_head_is_recorded_once(self, tmp_path: Any) -> None:
        """A group whose head is a cache hit records each step once, the head with its artifact."""

        @step(outputs=["a"], execution_group="g")
        def s1(x: int) -> int:
            return x + 1

        @step(outputs=["b"], execution_group="g")
        def s2(a: int) -> int:
            return a * 2

        p = Pipeline("grp", context=context(x=1), cache_dir=tmp_path / "s").add_step(s1).add_step(s2)
        await p.arun()
        second = await p.arun()
        async with await Store.open(tmp_path / "s") as store:
            detail = await store.get_run(second.run_id)
        assert detail is not None
        names = [s.step_name for s in detail.steps]
        assert sorted(names) == ["s1", "s2"]
        head = next(s for s in detail.steps if s.step_name == "s1")
        assert head.cached and head.outputs["a"] is not None


def test_chain_members_say_why_they_ran() -> None:
    """Each member of a chain run as one unit gets its own cache reason."""

    @step(outputs=["a"], execution_group="g")
    def first(x: int) -> int:
        return x + 1

    @step(outputs=["b"], execution_group="g")
    def second(a: int) -> int:
        return a * 2

    p = Pipeline("reasons").add_step(first).add_step(second)
    reasons = [[r.cache_reason for r in p.run(context={"x": x})] for x in (1, 1, 2)]
    assert reasons == [
        ["first run of this step", "first run of this step"],
        ["cache hit", "cache hit"],
        ["context parameter 'x' changed", "input 'a' changed"],
    ]
