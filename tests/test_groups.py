"""Execution groups: a chain of grouped steps runs in one worker, each step still on its own record.

A grouped chain is one ``run`` call on its executor; the tests count those calls on a real
executor subclass, since thread and process pools reuse idle workers and so "same thread" or
"same PID" alone would also hold for steps run one by one.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from flowyml import Pipeline, StepStatus, step
from flowyml._executors._base import Executor
from flowyml._executors._local import ThreadExecutor
from flowyml._executors._process import ProcessExecutor

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
