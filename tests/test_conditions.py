"""Conditions: when/unless skip a step and its consumers; If runs only the chosen branch."""

from __future__ import annotations

import asyncio

import pytest

from flowyml import (
    ControlContext,
    If,
    Metrics,
    Model,
    Pipeline,
    StepStatus,
    context,
    step,
    unless,
    when,
)
from flowyml.errors import ConfigError


class TestWhenUnless:
    def test_false_condition_skips_step_and_consumers(self) -> None:
        """A false when() skips the step, and steps needing its output are skipped, not failed."""

        @step(outputs=["big"])
        @when(lambda n: n > 100)
        def only_big(n: int) -> int:
            return n

        @step(outputs=["report"])
        def report(big: int) -> str:
            return f"big={big}"

        result = Pipeline("p", context=context(n=5)).add_step(only_big).add_step(report).run()
        assert result.success
        assert result.step_results["only_big"].status is StepStatus.SKIPPED
        assert result.step_results["report"].status is StepStatus.SKIPPED
        assert "big" not in result.outputs

    def test_predicate_gets_as_many_arguments_as_it_takes(self) -> None:
        """A two-argument predicate sees the first two resolved arguments."""

        @step
        @when(lambda a, b: a < b)
        def ordered(a: int, b: int, c: int) -> int:
            return a + b + c

        assert Pipeline("p", context=context(a=1, b=2, c=3)).add_step(ordered).run()["ordered"] == 6
        skipped = Pipeline("p", context=context(a=3, b=2, c=3)).add_step(ordered).run()
        assert skipped.step_results["ordered"].skipped

    def test_unless_on_async_step(self) -> None:
        """unless() works on async steps and skips when the predicate holds."""

        @step
        @unless(lambda x: x is None)
        async def maybe(x: object) -> str:
            await asyncio.sleep(0)
            return "ran"

        assert Pipeline("p", context=context(x=1)).add_step(maybe).run()["maybe"] == "ran"
        assert Pipeline("p", context=context(x=None)).add_step(maybe).run().step_results["maybe"].skipped

    def test_condition_option(self) -> None:
        """step(condition=...) behaves like @when."""

        @step(condition=lambda flag: flag)
        def gated(flag: bool) -> str:
            return "on"

        assert Pipeline("p", context=context(flag=False)).add_step(gated).run().step_results["gated"].skipped

    def test_called_directly_returns_none_when_false(self) -> None:
        """Outside a pipeline a when()-wrapped function returns None when its predicate is false."""

        @when(lambda x: x > 0)
        def positive(x: int) -> int:
            return x

        assert (positive(3), positive(-1)) == (3, None)

    def test_non_callable_predicate_is_a_config_error(self) -> None:
        """when() refuses a predicate that is not callable."""
        with pytest.raises(ConfigError):
            when(True)  # type: ignore[arg-type]


def _pipeline(accuracy: float) -> Pipeline:
    @step(outputs=["metrics"])
    async def evaluate() -> Metrics:
        await asyncio.sleep(0.01)
        return Metrics(accuracy=accuracy)

    @step(outputs=["deployed"])
    def deploy() -> str:
        return "deployed"

    @step(outputs=["retrained"])
    def retrain() -> str:
        return "retrained"

    p = Pipeline("branching", context=context(threshold=0.9)).add_step(evaluate)
    return p.add_control_flow(
        If(
            condition=lambda ctx: (
                ctx.steps["evaluate"].outputs["metrics"]["accuracy"] > ctx.params["threshold"]
            ),
            then_step=deploy,
            else_step=retrain,
        )
    )


class TestIf:
    def test_then_branch(self) -> None:
        """A true condition runs only then_step; else_step is absent from the results."""
        result = _pipeline(0.95).run()
        assert result.success
        assert result["deployed"] == "deployed"
        assert "retrain" not in result.step_results

    def test_else_branch(self) -> None:
        """A false condition runs only else_step."""
        result = _pipeline(0.5).run()
        assert result["retrained"] == "retrained"
        assert "deploy" not in result.step_results

    def test_metric_keys_read_directly(self) -> None:
        """Metrics' values are also readable straight from outputs."""

        @step(outputs=["metrics"])
        def evaluate() -> Metrics:
            return Metrics(accuracy=0.99)

        @step
        def ship() -> str:
            return "shipped"

        p = Pipeline("p").add_step(evaluate)
        p.add_control_flow(
            If(condition=lambda ctx: ctx.steps["evaluate"].outputs["accuracy"] > 0.9, then_step=ship)
        )
        assert p.run()["ship"] == "shipped"

    def test_assets_reach_the_condition_as_assets(self) -> None:
        """A condition reads an asset's attributes; a Metrics' values also by key from outputs."""

        @step(outputs=["model", "metrics"])
        def train() -> tuple[Model, Metrics]:
            return Model({"w": 1}, name="clf", framework="custom"), Metrics(accuracy=0.97)

        @step
        def ship() -> str:
            return "shipped"

        def good(ctx: ControlContext) -> bool:
            outputs = ctx.steps["train"].outputs
            return bool(
                outputs["model"].framework == "custom"
                and outputs["metrics"].get_metric("accuracy") > 0.9
                and outputs["accuracy"] == 0.97
            )

        p = Pipeline("p", enable_cache=False).add_step(train)
        p.add_control_flow(If(condition=good, then_step=ship))
        assert p.run()["ship"] == "shipped"

    def test_fluent_then_else(self) -> None:
        """FlowyML's form: If(condition=...).then(step).else_(step)."""

        @step(outputs=["score"])
        def evaluate() -> float:
            return 0.5

        @step
        def approve() -> str:
            return "approved"

        @step
        def reject() -> str:
            return "rejected"

        flow = (
            If(condition=lambda ctx: ctx.steps["evaluate"].outputs["score"] > 0.9).then(approve).else_(reject)
        )
        assert flow.name == "If(approve, reject)"
        result = Pipeline("p", enable_cache=False).add_step(evaluate).add_control_flow(flow).run()
        assert result["reject"] == "rejected" and "approve" not in result.step_results

    def test_an_if_without_a_then_step_is_rejected_when_added(self) -> None:
        with pytest.raises(ConfigError, match=r"\.then\(step\)"):
            Pipeline("p").add_control_flow(If(condition=lambda ctx: True))

    def test_ctx_result_step_results_is_the_steps_view(self) -> None:
        @step(outputs=["value"])
        def compute() -> int:
            return 42

        @step
        def high() -> str:
            return "high"

        cond = If(lambda ctx: ctx.result.step_results["compute"].outputs["value"] > 40, then_step=high)
        assert (
            Pipeline("p", enable_cache=False).add_step(compute).add_control_flow(cond).run()["high"] == "high"
        )

    def test_condition_waits_for_what_it_reads(self) -> None:
        """The condition is evaluated after the step it reads, not before."""
        seen: list[str] = []

        @step(outputs=["n"])
        async def slow() -> int:
            await asyncio.sleep(0.05)
            seen.append("slow")
            return 7

        @step
        def branch() -> str:
            seen.append("branch")
            return "ok"

        def condition(ctx: object) -> bool:
            value = ctx.steps["slow"].outputs["n"]  # type: ignore[attr-defined]
            seen.append("condition")
            return bool(value == 7)

        p = Pipeline("p").add_step(slow).add_control_flow(If(condition=condition, then_step=branch))
        assert p.run()["branch"] == "ok"
        assert seen == ["slow", "condition", "branch"]

    def test_condition_error_fails_the_run(self) -> None:
        """A condition that raises fails both branches with its error: the run is not a success."""

        @step
        def a() -> int:
            return 1

        @step
        def b() -> int:
            return 2

        p = Pipeline("p").add_control_flow(If(condition=lambda ctx: 1 / 0, then_step=a, else_step=b))
        result = p.run(fail_fast=False)
        assert not result.success
        assert isinstance(result.step_results["a"].error, ZeroDivisionError)
        assert isinstance(result.step_results["b"].error, ZeroDivisionError)

    def test_condition_that_can_never_be_decided_fails(self) -> None:
        """A condition reading its own branch step fails the branches instead of passing silently."""

        @step(outputs=["x"])
        def branch() -> int:
            return 1

        p = Pipeline("p").add_control_flow(
            If(condition=lambda ctx: ctx.steps["branch"].outputs["x"] > 0, then_step=branch)
        )
        result = p.run()
        assert not result.success
        assert "never finished" in str(result.step_results["branch"].error)

    def test_same_step_in_both_branches_is_rejected(self) -> None:
        """If(then_step=s, else_step=s) is a ConfigError."""

        @step
        def s() -> int:
            return 1

        with pytest.raises(ConfigError, match="'s'"):
            If(condition=lambda ctx: True, then_step=s, else_step=s)

    def test_async_predicate_is_rejected(self) -> None:
        """when() refuses an async predicate: it could never be awaited before the step."""

        async def pred(x: int) -> bool:
            return True

        with pytest.raises(ConfigError, match="async"):
            when(pred)


class TestUnchosenBranch:
    """What follows a branch that did not run."""

    def test_consumer_of_an_unchosen_branch_is_reported_skipped(self) -> None:
        """A step after the branch that did not run shows as skipped, with the reason."""
        from flowyml import If

        @step(outputs=["acc"])
        def ev() -> float:
            return 0.5

        @step(outputs=["d"])
        def dep() -> str:
            return "deployed"

        @step(outputs=["r"])
        def ret() -> str:
            return "retrained"

        @step(outputs=["note"])
        def after(d: str) -> str:
            return d

        p = Pipeline("ifc").add_step(ev)
        p.add_control_flow(
            If(condition=lambda ctx: ctx.steps["ev"].outputs["acc"] > 0.9, then_step=dep, else_step=ret)
        )
        p.add_step(after)
        result = p.run()
        assert result.success
        assert "dep" not in result.step_results
        assert result.step_results["after"].status is StepStatus.SKIPPED
        assert "'dep'" in (result.step_results["after"].skip_reason or "")


class TestGates:
    async def test_cancelled_run_skips_undecided_branches(self) -> None:
        """Cancelling a run while an If waits reports its branches skipped, not failed."""
        started = asyncio.Event()

        @step(outputs=["m"], cache=False)
        async def evaluate() -> float:
            started.set()
            await asyncio.sleep(30)
            return 1.0

        @step(outputs=["d"])
        def deploy() -> str:
            return "d"

        p = Pipeline("cancel-if", lineage=False).add_step(evaluate)
        p.add_control_flow(If(lambda ctx: ctx.steps["evaluate"].outputs["m"] > 0, then_step=deploy))
        from flowyml._scheduler import Run

        seen: list[Run] = []
        original = Run.execute

        async def spy(self: Run) -> None:
            seen.append(self)
            await original(self)

        Run.execute = spy  # type: ignore[method-assign]
        try:
            task = asyncio.create_task(p.arun())
            await started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            Run.execute = original  # type: ignore[method-assign]
        deploy_result = seen[0].results[seen[0].plan.by_name["deploy"].id]
        assert deploy_result is not None and deploy_result.status is StepStatus.SKIPPED
