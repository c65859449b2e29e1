"""Execution groups: a chain of grouped steps runs in one worker, each step still on its own record."""

from __future__ import annotations

import os
import threading
from typing import Any

from flowyml import Pipeline, StepStatus, step


def _chain(executor: str | None, group: str | None = "g") -> Pipeline:
    @step(outputs=["a"], execution_group=group, executor=executor)
    def first() -> dict[str, Any]:
        return {"where": (os.getpid(), threading.get_ident()), "payload": list(range(10))}

    @step(outputs=["b"], execution_group=group, executor=executor)
    def second(a: dict[str, Any]) -> dict[str, Any]:
        return {
            "where": (os.getpid(), threading.get_ident()),
            "same_object": id(a["payload"]),
            "payload": a["payload"],
        }

    @step(outputs=["c"], execution_group=group, executor=executor)
    def third(b: dict[str, Any]) -> dict[str, Any]:
        return {"where": (os.getpid(), threading.get_ident()), "same_object": id(b["payload"])}

    return Pipeline(f"group-{executor}-{group}").add_step(first).add_step(second).add_step(third)


class TestThreadGroup:
    def test_chain_runs_in_one_thread(self) -> None:
        """Three grouped sync steps run in the same thread, one after the other."""
        result = _chain(None).run()
        assert result.success, result.summary()
        places = {result[name]["where"] for name in ("a", "b", "c")}
        assert len(places) == 1
        assert places.pop()[0] == os.getpid()

    def test_each_step_is_recorded_and_cached_on_its_own(self) -> None:
        """Every member has its own result, and a second run takes each from the cache."""
        p = _chain(None)
        first = p.run()
        assert [first.step_results[n].status for n in ("first", "second", "third")] == [
            StepStatus.SUCCEEDED
        ] * 3
        again = p.run()
        assert [again.step_results[n].status for n in ("first", "second", "third")] == [StepStatus.CACHED] * 3

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

        result = (
            Pipeline("fail", enable_cache=False)
            .add_step(ok)
            .add_step(broken)
            .add_step(never)
            .run(fail_fast=False)
        )
        statuses = [result.step_results[n].status for n in ("ok", "broken", "never")]
        assert statuses == [StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.SKIPPED]
        assert isinstance(result.step_results["broken"].error, ValueError)


class TestProcessGroup:
    def test_chain_runs_in_one_process_without_pickling_between_steps(self) -> None:
        """Grouped process steps share one worker PID and hand the very same object along."""
        result = _chain("process").run()
        assert result.success, result.summary()
        pids = {result[name]["where"][0] for name in ("a", "b", "c")}
        assert len(pids) == 1 and pids.pop() != os.getpid()
        assert result["b"]["same_object"] == result["c"]["same_object"]
