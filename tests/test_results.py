"""What a run reports: StepResult and PipelineResult, built once and frozen."""

from __future__ import annotations

import dataclasses

import pytest

from flowyml import Pipeline, PipelineResult, StepResult, StepStatus, context, step
from flowyml._results import finished


class TestMissingOutputs:
    def test_missing_output_names_its_step_and_why(self) -> None:
        """result[name] for an output a failed step never produced says which step and why."""

        @step(outputs=["inv"])
        def invert(x: float) -> float:
            return 1 / x

        result = Pipeline("inv", context=context(x=0)).add_step(invert).run()
        with pytest.raises(KeyError, match=r"'invert' failed \(ZeroDivisionError"):
            result["inv"]


class TestFrozen:
    def test_step_result_cannot_be_changed(self) -> None:
        res = StepResult("s", StepStatus.SUCCEEDED, {"x": 1})
        with pytest.raises(dataclasses.FrozenInstanceError):
            res.status = StepStatus.FAILED  # type: ignore[misc]

    def test_the_engine_build_is_the_same_frozen_class(self) -> None:
        """``finished`` (the engine's fast build) gives what the constructor gives."""
        fast = finished("s", StepStatus.SUCCEEDED, {"x": 1}, attempts=2, start_time=1.0, end_time=3.0)
        slow = StepResult("s", StepStatus.SUCCEEDED, {"x": 1}, attempts=2, start_time=1.0, end_time=3.0)
        assert type(fast) is StepResult
        assert dataclasses.asdict(fast) == dataclasses.asdict(slow)
        with pytest.raises(dataclasses.FrozenInstanceError):
            fast.attempts = 3  # type: ignore[misc]

    def test_results_of_a_run_are_frozen(self) -> None:
        @step(outputs=["x"])
        def one() -> int:
            return 1

        result = Pipeline("frozen", enable_cache=False, lineage=False).add_step(one).run()
        with pytest.raises(dataclasses.FrozenInstanceError):
            result.state = "failed"  # type: ignore[misc]
        with pytest.raises(dataclasses.FrozenInstanceError):
            result.step_results["one"].outputs = {}  # type: ignore[misc]


class TestReading:
    def test_properties_follow_the_status(self) -> None:
        ok = StepResult("a", StepStatus.CACHED, {"x": 1}, attempts=0)
        assert ok.success and ok.cached and not ok.skipped and ok.output == 1
        retried = StepResult("b", StepStatus.FAILED, attempts=3, error=ValueError("no"))
        assert not retried.success and retried.retries == 2
        assert "error=ValueError" in repr(retried)

    def test_pipeline_result_reads_outputs_then_steps(self) -> None:
        steps = {"make": StepResult("make", StepStatus.SUCCEEDED, {"x": 1})}
        result = PipelineResult("r", "p", "completed", {"x": 1}, steps, 0.0, 2.0, {"x": "make"})
        assert result["x"] == 1 and result["make"] == 1
        assert result.success and result.duration_seconds == 2.0
        with pytest.raises(KeyError, match="neither an output nor a step"):
            result["nothing"]

    def test_a_step_name_reads_its_value_or_its_outputs_by_name(self) -> None:
        """FlowyML's ``result["step"]``: the value of its one output, a dict of several."""
        steps = {
            "one": StepResult("one", StepStatus.CACHED, {"x": 1}),
            "two": StepResult("two", StepStatus.SUCCEEDED, {"a": 1, "b": 2}),
            "bad": StepResult("bad", StepStatus.FAILED, {}, ValueError("nope")),
        }
        outputs = {"x": 1, "a": 1, "b": 2}
        producers = {"x": "one", "a": "two", "b": "two", "y": "bad"}
        result = PipelineResult("r", "p", "failed", outputs, steps, 0.0, 1.0, producers)
        assert result["one"] == 1 and result["two"] == {"a": 1, "b": 2}
        with pytest.raises(KeyError, match=r"step 'bad' failed \(ValueError: nope\)"):
            result["bad"]

    def test_an_output_name_wins_over_a_step_of_the_same_name(self) -> None:
        steps = {
            "x": StepResult("x", StepStatus.SUCCEEDED, {"y": 2}),
            "make": StepResult("make", StepStatus.SUCCEEDED, {"x": 1}),
        }
        result = PipelineResult(
            "r", "p", "completed", {"x": 1, "y": 2}, steps, 0.0, 1.0, {"x": "make", "y": "x"}
        )
        assert result["x"] == 1


class TestItems:
    def test_a_mapped_step_reports_its_items(self) -> None:
        """item_counts, failed_items, items and the summary line of a mapped step with a failure."""
        from flowyml import ItemResult

        @step(outputs=["xs"])
        def xs() -> list[int]:
            return [1, 0, 2]

        @step(inputs=["xs"], outputs=["ys"], map_over="xs", map_errors="collect")
        def invert(x: int) -> float:
            return 1 / x

        result = Pipeline("items", enable_cache=False, lineage=False).add_step(xs).add_step(invert).run()
        res = result.step_results["invert"]
        assert res.item_counts == {"succeeded": 2, "failed": 1}
        assert [(i.index, type(i.error)) for i in res.failed_items] == [(1, ZeroDivisionError)]
        assert res.items is not None and len(res.items) == 3
        assert isinstance(res.items[-1], ItemResult) and res.items[-1].output == 0.5
        assert [i.success for i in res.items[0:3]] == [True, False, True]
        assert "items: 2 succeeded, 1 failed" in result.summary()
        assert result.step_results["xs"].items is None and result.step_results["xs"].item_counts == {}
