"""The scheduler: counting over units (with a fake unit runner), then the engine in real runs:
concurrency, ordering, failures, cancellation, timeouts and retries."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from flowyml import If, Pipeline, StepStatus, step
from flowyml._gates import NOT_CHOSEN
from flowyml._graph import Node, Plan, build_plan
from flowyml._results import finished
from flowyml._scheduler import Run
from flowyml._state import RunState
from flowyml.errors import EventLoopError, OutputError, StepTimeoutError


class FakeRunner:
    """A unit runner with no executor, cache or timing: each node "produces" its own name.

    It keeps the runner's contract with the scheduler (a blocked node is recorded as skipped, a
    failing one as failed) and records which units it was asked to run, in order, so the
    scheduler's counting can be checked on its own.
    """

    def __init__(
        self, state: RunState, fail: Sequence[str] = (), ungrouped: bool = False, at_once: Sequence[str] = ()
    ) -> None:
        self.state = state
        self.fail = set(fail)
        self.ungrouped = ungrouped
        self.at_once = set(at_once)
        """Nodes whose fate is known at once (as a cache hit held in memory is): ``now`` settles them."""
        self.started: list[str] = []
        self.chains: list[list[str]] = []
        self.tasks: set[asyncio.Task[Any]] = set()
        """The tasks nodes were awaited in."""

    def now(self, node: Node) -> bool | None:
        state = self.state
        if node.name not in self.at_once or state.blocked[node.id] is not None:
            return None
        self.started.append(node.name)
        for d in node.deps:
            assert state.results[d] is not None and state.results[d].success  # type: ignore[union-attr]
        outputs = state.put(node, node.name) if len(node.output_slots) == 1 else {}
        state.results[node.id] = finished(node.name, StepStatus.CACHED, outputs)
        return True

    def task(self, node: Node, then: Callable[[Node, bool], object]) -> None:
        return None

    async def node(self, node: Node) -> bool:
        state = self.state
        if state.blocked[node.id] is not None:
            state.results[node.id] = finished(
                node.name, StepStatus.SKIPPED, {}, skip_reason=state.blocked[node.id]
            )
            return False
        self.started.append(node.name)
        self.tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        for d in node.deps:  # every input exists when a node starts
            assert state.results[d] is not None and state.results[d].success  # type: ignore[union-attr]
        await asyncio.sleep(0)
        if node.name in self.fail:
            state.results[node.id] = finished(node.name, StepStatus.FAILED, {}, ValueError(node.name))
            return False
        outputs = state.put(node, node.name) if len(node.output_slots) == 1 else {}
        state.results[node.id] = finished(node.name, StepStatus.SUCCEEDED, outputs)
        return True

    async def chain(self, nodes: Sequence[Node]) -> tuple[list[tuple[Node, bool]], bool]:
        self.chains.append([n.name for n in nodes])
        if self.ungrouped:
            return [(nodes[0], await self.node(nodes[0]))], False
        return [(n, await self.node(n)) for n in nodes], True


def _steps(spec: dict[str, list[str]], **options: Any) -> list[Any]:
    """Steps named by ``spec``'s keys, each reading the outputs of the steps listed for it."""

    def make(name: str, deps: list[str]) -> Any:
        def body(*_: Any) -> str:
            return name

        return step(name=name, inputs=deps, outputs=[name], **options)(body)

    return [make(name, deps) for name, deps in spec.items()]


async def _drive(plan: Plan, *, fail_fast: bool = True, **runner: Any) -> tuple[Run, FakeRunner]:
    state = RunState(plan, {})
    fake = FakeRunner(state, **runner)
    run = Run(state, fake, fail_fast=fail_fast)
    await run.execute()
    return run, fake


DIAMOND = {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}


class TestRunCounts:
    """``Run`` driven with a fake unit runner: the counting core on its own."""

    async def test_each_node_starts_once_after_its_inputs(self) -> None:
        run, fake = await _drive(build_plan(_steps(DIAMOND)))
        assert sorted(fake.started) == ["a", "b", "c", "d"]
        assert fake.started[0] == "a" and fake.started[-1] == "d"
        assert all(r is not None and r.status is StepStatus.SUCCEEDED for r in run.results)
        assert run.state.outputs() == {"a": "a", "b": "b", "c": "c", "d": "d"}

    async def test_fail_fast_stops_and_marks_the_rest_skipped(self) -> None:
        spec = {"a": [], "b": ["a"], "c": ["b"], "other": []}
        run, fake = await _drive(build_plan(_steps(spec)), fail=["a"])
        assert run.stopped_by == "a"
        assert "c" not in fake.started
        c = run.results[run.plan.by_name["c"].id]
        assert c is not None and c.status is StepStatus.SKIPPED
        assert c.skip_reason == "the run stopped after step 'a' failed"

    async def test_without_fail_fast_dependents_are_blocked_and_others_finish(self) -> None:
        spec = {"a": [], "b": ["a"], "c": ["b"], "other": []}
        run, fake = await _drive(build_plan(_steps(spec)), fail_fast=False, fail=["a"])
        assert sorted(fake.started) == ["a", "other"]
        by = {r.step_name: r for r in run.results if r is not None}
        assert by["other"].status is StepStatus.SUCCEEDED
        assert by["b"].skip_reason == "upstream step 'a' did not produce its outputs"
        assert by["c"].skip_reason == "upstream step 'a' did not produce its outputs"  # passed on

    async def test_a_chain_is_one_unit(self) -> None:
        plan = build_plan(_steps({"a": [], "b": ["a"], "c": ["b"], "after": ["c"]}, execution_group="g"))
        assert plan.chains  # a, b, c, after form one chain
        _, fake = await _drive(plan)
        assert fake.chains == [["a", "b", "c", "after"]]
        assert fake.started == ["a", "b", "c", "after"]

    async def test_a_chain_that_did_not_run_whole_continues_node_by_node(self) -> None:
        plan = build_plan(_steps({"a": [], "b": ["a"], "c": ["b"]}, execution_group="g"))
        run, fake = await _drive(plan, ungrouped=True)
        assert fake.chains == [["a", "b", "c"]]
        assert fake.started == ["a", "b", "c"]
        assert all(r is not None and r.success for r in run.results)

    async def test_a_gate_releases_one_branch_and_blocks_the_other(self) -> None:
        ev, then_, else_ = _steps({"ev": [], "then": [], "else": []})
        gate = If(lambda ctx: ctx.steps["ev"].outputs["ev"] == "ev", then_step=then_, else_step=else_)
        run, fake = await _drive(build_plan([ev, then_, else_], [gate]))
        assert sorted(fake.started) == ["ev", "then"]
        not_chosen = run.results[run.plan.by_name["else"].id]
        assert not_chosen is not None and not_chosen.skip_reason is NOT_CHOSEN


class TestFatesKnownAtOnce:
    """Nodes the runner settles at once (cache hits held in memory) need no task and no stack."""

    async def test_a_chain_deeper_than_the_recursion_limit_runs_without_a_task(self) -> None:
        n = sys.getrecursionlimit() * 3
        spec = {"s0": [], **{f"s{i}": [f"s{i - 1}"] for i in range(1, n)}}
        run, fake = await _drive(build_plan(_steps(spec)), at_once=list(spec))
        assert fake.started == list(spec)
        assert fake.tasks == set()
        assert all(r is not None and r.status is StepStatus.CACHED for r in run.results)

    async def test_a_fan_out_settled_at_once_feeds_its_fan_in_once(self) -> None:
        spec = {**{f"r{i}": [] for i in range(50)}, "fan_in": [f"r{i}" for i in range(50)]}
        run, fake = await _drive(build_plan(_steps(spec)), at_once=list(spec))
        assert sorted(fake.started) == sorted(spec) and fake.started[-1] == "fan_in"
        assert all(r is not None and r.success for r in run.results)

    async def test_nodes_that_wait_and_nodes_known_at_once_mix(self) -> None:
        spec = {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"], "e": ["d"], "f": ["a"], "g": ["f", "e"]}
        at_once = ["a", "c", "e", "f"]
        run, fake = await _drive(build_plan(_steps(spec)), at_once=at_once)
        assert sorted(fake.started) == sorted(spec)  # each once, each after its inputs (FakeRunner checks)
        assert len(fake.tasks) == 1  # b waits in a task; d, e (at once) and g follow it there
        by = {r.step_name: r.status for r in run.results if r is not None}
        assert [n for n, s in by.items() if s is StepStatus.CACHED] == at_once
        assert run.state.outputs() == {n: n for n in spec}

    async def test_a_failure_after_nodes_known_at_once_still_stops_the_run(self) -> None:
        spec = {"a": [], "b": ["a"], "c": ["b"], "d": ["a"]}
        run, fake = await _drive(build_plan(_steps(spec)), fail=["b"], at_once=["a", "d"])
        assert run.stopped_by == "b"
        assert "c" not in fake.started
        c = run.results[run.plan.by_name["c"].id]
        assert c is not None and c.skip_reason == "the run stopped after step 'b' failed"


class InFlight:
    """Counts concurrent holders, thread-safely, and remembers the peak."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0
        self._lock = threading.Lock()

    def __enter__(self) -> InFlight:
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.now -= 1


class TestConcurrency:
    def test_fifty_async_steps_all_overlap(self) -> None:
        """50 independent async steps are all in flight at once."""
        gauge = InFlight()
        started = 0
        all_started = asyncio.Event()

        def make(i: int) -> Any:
            @step(name=f"s{i}", outputs=[f"o{i}"])
            async def s() -> int:
                nonlocal started
                with gauge:
                    started += 1
                    if started == 50:
                        all_started.set()
                    # Released only once all 50 have started; the timeout only guards against a hang.
                    await asyncio.wait_for(all_started.wait(), 10)
                return i

            return s

        p = Pipeline("fan", enable_cache=False)
        for i in range(50):
            p.add_step(make(i))
        result = p.run()
        assert result.success, result.summary()
        assert gauge.peak == 50
        assert [result[f"o{i}"] for i in range(50)] == list(range(50))

    def test_sixteen_blocking_steps_overlap_in_threads(self) -> None:
        """16 blocking sync steps run at the same time, each in its own thread."""
        barrier = threading.Barrier(16, timeout=10)
        threads: set[int] = set()
        lock = threading.Lock()

        def make(i: int) -> Any:
            @step(name=f"s{i}")
            def s() -> int:
                with lock:
                    threads.add(threading.get_ident())
                barrier.wait()  # passes only when all 16 are blocked here together
                return i

            return s

        p = Pipeline("threads", enable_cache=False)
        for i in range(16):
            p.add_step(make(i))
        result = p.run()
        assert result.success, result.summary()
        assert len(threads) == 16

    def test_max_threads_bounds_thread_steps(self) -> None:
        """max_threads=3 runs three sync steps together, and never a fourth alongside them."""
        gauge = InFlight()
        barrier = threading.Barrier(3, timeout=10)

        def make(i: int) -> Any:
            @step(name=f"s{i}")
            def s() -> None:
                with gauge:
                    barrier.wait()  # passes only when three steps are in flight together

            return s

        p = Pipeline("bounded", enable_cache=False, max_threads=3)
        for i in range(9):
            p.add_step(make(i))
        result = p.run()
        assert result.success, result.summary()
        assert gauge.peak == 3

    def test_max_concurrency_bounds_all_steps(self) -> None:
        """max_concurrency=4 runs four steps together, and never a fifth alongside them."""
        gauge = InFlight()
        barrier = asyncio.Barrier(4)

        def make(i: int) -> Any:
            @step(name=f"s{i}")
            async def s() -> None:
                with gauge:
                    # Passes only when four steps are in flight together; the timeout guards a hang.
                    await asyncio.wait_for(barrier.wait(), 10)

            return s

        p = Pipeline("limited", enable_cache=False, max_concurrency=4)
        for i in range(20):
            p.add_step(make(i))
        result = p.run()
        assert result.success, result.summary()
        assert gauge.peak == 4

    def test_step_starts_when_its_own_inputs_exist(self) -> None:
        """A consumer of a fast branch starts while a slow, unrelated branch is still running."""
        order: list[str] = []
        slow_done = asyncio.Event()

        @step(outputs=["fast"])
        async def fast() -> int:
            return 1

        @step(outputs=["after_fast"])
        async def consumer(fast: int) -> int:
            order.append("consumer")
            slow_done.set()
            return fast

        @step(outputs=["slow"])
        async def slow() -> int:
            await asyncio.wait_for(slow_done.wait(), 5)
            order.append("slow")
            return 2

        result = (
            Pipeline("nobarrier", enable_cache=False).add_step(slow).add_step(fast).add_step(consumer).run()
        )
        assert result.success
        assert order == ["consumer", "slow"]

    def test_chain_runs_in_order_and_passes_values(self) -> None:
        """A chain of steps passes each value to the next."""
        p = Pipeline("chain", enable_cache=False)
        p.add_step(step(outputs=["v0"], name="s0")(lambda: 0))
        for i in range(1, 50):
            p.add_step(step(inputs=[f"v{i - 1}"], outputs=[f"v{i}"], name=f"s{i}")(lambda x: x + 1))
        assert p.run()["v49"] == 49

    def test_thousand_way_fan_in_with_var_positional(self) -> None:
        """A fan-in of 1,000 upstream results arrives through *args in declared order."""
        p = Pipeline("fanin", enable_cache=False)
        for i in range(1000):

            async def produce(i: int = i) -> int:
                return i

            p.add_step(step(name=f"p{i}", outputs=[f"r{i}"])(produce))

        @step(inputs=[f"r{i}" for i in range(1000)], outputs=["total"])
        def total(*results: int) -> list[int]:
            return list(results)

        p.add_step(total)
        assert p.run()["total"] == list(range(1000))


class TestWhatAStepInFlightHolds:
    """100,000 sleeping steps are 100,000 of whatever one waiting step holds."""

    async def test_a_waiting_step_holds_no_coroutine_beyond_a_raw_task(self) -> None:
        """Its task runs the step's own coroutine (through one small call object): no coroutine of
        ours, no closure cell, no argument containers."""
        n = 500
        gate = asyncio.Event()
        started = [0]
        at_peak: list[Counter[str]] = []

        def census() -> Counter[str]:
            gc.collect()
            return Counter(type(o).__name__ for o in gc.get_objects())

        async def wait(*_: Any) -> None:
            started[0] += 1
            if started[0] == n:
                at_peak.append(census())
                gate.set()
            await gate.wait()

        async def floor() -> None:
            async with asyncio.TaskGroup() as tg:
                for _ in range(n):
                    tg.create_task(wait())

        p = Pipeline("in-flight", enable_cache=False, lineage=False)
        for i in range(n):
            p.add_step(step(name=f"s{i}", outputs=[f"r{i}"])(wait))
        extra: list[Counter[str]] = []
        for run in (floor, p.arun, floor, p.arun):  # the first of each warms up (a run freezes the heap)
            started[0] = 0
            gate.clear()
            before = census()
            await run()
            extra.append(at_peak.pop() - before)
        raw, ours = extra[2], extra[3]
        assert ours["coroutine"] - raw["coroutine"] <= 10
        assert ours["cell"] < n / 10 and ours["list"] < n / 10, ours
        assert sum(ours.values()) - sum(raw.values()) < 1.2 * n, ours - raw


class TestEmbedding:
    async def test_arun_keeps_the_callers_loop_ticking(self) -> None:
        """The application's own loop keeps running while a blocking step runs in a thread."""
        ticks = 0
        step_started = threading.Event()
        ticked = threading.Event()

        async def ticker() -> None:
            nonlocal ticks
            while True:
                if step_started.is_set():
                    ticks += 1
                    if ticks >= 5:
                        ticked.set()
                await asyncio.sleep(0.01)

        @step
        def blocking() -> str:
            step_started.set()
            # Returns only after the loop ticked 5 times since this step started blocking its thread.
            if not ticked.wait(10):
                raise TimeoutError("the caller's loop did not tick while the step blocked")
            return "done"

        task = asyncio.create_task(ticker())
        try:
            result = await Pipeline("embedded", enable_cache=False).add_step(blocking).arun()
        finally:
            task.cancel()
        assert result.success, result.summary()
        assert result["blocking"] == "done"

    async def test_run_inside_a_loop_points_to_arun(self) -> None:
        """run() inside a running loop raises EventLoopError mentioning arun()."""
        p = Pipeline("p").add_step(step(lambda: 1))
        with pytest.raises(EventLoopError, match="arun"):
            p.run()

    async def test_cancelling_arun_cancels_steps_and_propagates(self) -> None:
        """Cancelling the task awaiting arun() cancels running steps and re-raises."""
        started = asyncio.Event()
        cancelled = asyncio.Event()

        @step
        async def forever() -> None:
            started.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        task = asyncio.create_task(Pipeline("p", enable_cache=False).add_step(forever).arun())
        await started.wait()
        task.cancel()
        async with asyncio.timeout(10):
            with pytest.raises(asyncio.CancelledError):
                await task
        assert cancelled.is_set()

    async def test_cancelling_arun_with_a_blocking_step_returns(self) -> None:
        """Cancelling arun() while a thread step blocks does not wait for the thread."""
        release = threading.Event()
        started = threading.Event()

        @step
        def blocked() -> None:
            started.set()
            release.wait(10)

        task = asyncio.create_task(Pipeline("p", enable_cache=False).add_step(blocked).arun())
        await asyncio.to_thread(started.wait, 10)
        task.cancel()
        try:
            async with asyncio.timeout(5):
                with pytest.raises(asyncio.CancelledError):
                    await task
            assert not release.is_set()
        finally:
            release.set()


class TestFailures:
    def test_failure_does_not_raise_and_is_reported(self) -> None:
        """A failing step makes success False; its result holds the error and traceback."""

        @step(outputs=["x"])
        def boom() -> int:
            raise ValueError("bad input")

        result = Pipeline("p", enable_cache=False).add_step(boom).run()
        assert not result.success
        r = result.step_results["boom"]
        assert r.status is StepStatus.FAILED
        assert isinstance(r.error, ValueError)
        assert "bad input" in (r.traceback or "")
        assert result.state == "failed"

    @staticmethod
    def _swallowing(pipeline: Pipeline, n: int) -> Pipeline:
        """``n`` async steps that return when cancelled, each feeding a step of its own."""
        for i in range(n):

            async def slow(i=i):  # unannotated: annotations would make it a typed, layered step
                try:
                    await asyncio.sleep(30)
                except asyncio.CancelledError:
                    return i  # cleanup code that ends quietly when cancelled
                return i

            async def after(x):
                return x

            pipeline.add_step(step(slow, name=f"slow{i}", outputs=[f"o{i}"]))
            pipeline.add_step(step(after, name=f"after{i}", inputs=[f"o{i}"], outputs=[f"a{i}"]))
        return pipeline

    async def test_steps_ending_after_a_fail_fast_abort_start_nothing(self) -> None:
        """A step that swallows the abort's cancellation and returns is recorded, and no new task
        is asked of the group that is shutting down: the run's result comes back (it raised an
        ExceptionGroup of the group's RuntimeErrors)."""

        @step(outputs=["bad"])
        async def bad() -> None:
            await asyncio.sleep(0.05)
            raise ValueError("x")

        pipeline = self._swallowing(Pipeline("p", enable_cache=False, lineage=False).add_step(bad), 3)
        result = await pipeline.arun()
        assert result.state == "failed"
        assert result.step_results["bad"].status is StepStatus.FAILED
        for i in range(3):
            assert result.step_results[f"slow{i}"].status is StepStatus.SUCCEEDED
            # Run where the step's task went on (a step started before the group shut down),
            # else skipped: never failed by the group.
            after = result.step_results[f"after{i}"]
            assert after.status in (StepStatus.SUCCEEDED, StepStatus.SKIPPED)

    async def test_an_outer_cancel_with_swallowing_steps_raises_the_cancel(self) -> None:
        pipeline = self._swallowing(Pipeline("p", enable_cache=False, lineage=False), 3)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(pipeline.arun(fail_fast=False), 0.05)

    def test_fail_fast_cancels_running_and_skips_the_rest(self) -> None:
        """By default a failure cancels running steps and skips those not started."""

        @step(outputs=["a"])
        async def boom() -> int:
            await asyncio.sleep(0.01)
            raise RuntimeError("x")

        @step(outputs=["b"])
        async def long() -> int:
            await asyncio.sleep(30)
            return 1

        @step
        def after(b: int) -> int:
            return b

        result = Pipeline("p", enable_cache=False).add_step(boom).add_step(long).add_step(after).run()
        statuses = {n: r.status for n, r in result.step_results.items()}
        assert statuses == {
            "boom": StepStatus.FAILED,
            "long": StepStatus.CANCELLED,
            "after": StepStatus.SKIPPED,
        }

    def test_fail_fast_false_lets_independent_branches_finish(self) -> None:
        """With fail_fast=False independent branches finish; dependents of the failure skip."""

        @step(outputs=["a"])
        async def boom() -> int:
            raise RuntimeError("x")

        @step(outputs=["c"])
        def uses_a(a: int) -> int:
            return a

        @step(outputs=["b"])
        async def other() -> int:
            await asyncio.sleep(0.05)
            return 2

        p = Pipeline("p", enable_cache=False).add_step(boom).add_step(uses_a).add_step(other)
        result = p.run(fail_fast=False)
        assert result["b"] == 2
        assert result.step_results["uses_a"].status is StepStatus.SKIPPED
        assert "boom" in (result.step_results["uses_a"].skip_reason or "")
        assert result.failed_steps == ["boom"]

    def test_wrong_length_tuple_is_an_output_error(self) -> None:
        """Returning 3 values for 2 outputs fails the step, saying expected vs got."""

        @step(outputs=["a", "b"])
        def split() -> tuple[int, int, int]:
            return 1, 2, 3

        r = Pipeline("p", enable_cache=False).add_step(split).run().step_results["split"]
        assert isinstance(r.error, OutputError)
        assert "expected 2, got a tuple of 3" in str(r.error)

    def test_dict_return_fills_several_outputs(self) -> None:
        """A dict holding the declared output names fills them."""

        @step(outputs=["a", "b"])
        def both() -> dict[str, int]:
            return {"b": 2, "a": 1}

        result = Pipeline("p", enable_cache=False).add_step(both).run()
        assert (result["a"], result["b"]) == (1, 2)


class TestTimeoutsAndRetries:
    def test_async_timeout_cancels_the_step(self) -> None:
        """An async step past its timeout is cancelled and fails with StepTimeoutError."""
        cancelled = threading.Event()

        @step(timeout=0.05)
        async def slow() -> None:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        r = Pipeline("p", enable_cache=False).add_step(slow).run().step_results["slow"]
        assert r.status is StepStatus.TIMED_OUT
        assert isinstance(r.error, StepTimeoutError)
        assert r.error.step_name == "slow"
        assert cancelled.is_set()

    def test_thread_timeout_stops_waiting(self) -> None:
        """A blocking step past its timeout is reported at once; the thread is abandoned."""
        release = threading.Event()

        @step(timeout=0.05)
        def stuck() -> None:
            release.wait(10)

        try:
            r = Pipeline("p", enable_cache=False).add_step(stuck).run().step_results["stuck"]
            assert r.status is StepStatus.TIMED_OUT
            assert "thread" in str(r.error)
            assert not release.is_set()
        finally:
            release.set()

    def test_own_timeout_error_is_a_plain_failure(self) -> None:
        """A TimeoutError raised by the step itself is not mistaken for a step timeout."""

        @step(timeout=10)
        async def raises() -> None:
            raise TimeoutError("upstream API")

        r = Pipeline("p", enable_cache=False).add_step(raises).run().step_results["raises"]
        assert r.status is StepStatus.FAILED
        assert not isinstance(r.error, StepTimeoutError)

    def test_retry_reruns_until_success(self, no_sleep: list[float]) -> None:
        """retry=N retries a failing step and records the attempts."""
        calls = 0

        @step(retry=3)
        def flaky() -> str:
            nonlocal calls
            calls += 1
            if calls < 3:
                raise ConnectionError("try again")
            return "ok"

        r = Pipeline("p", enable_cache=False).add_step(flaky).run().step_results["flaky"]
        assert r.success and r.output == "ok"
        assert (r.attempts, r.retries) == (3, 2)
        assert len(no_sleep) == 2

    def test_retry_gives_up_after_n_retries(self, no_sleep: list[float]) -> None:
        """retry=2 means three attempts in all, then the step fails with the last error."""
        calls = 0

        @step(retry=2)
        async def always() -> None:
            nonlocal calls
            calls += 1
            raise ConnectionError(f"attempt {calls}")

        r = Pipeline("p", enable_cache=False).add_step(always).run().step_results["always"]
        assert calls == 3
        assert r.attempts == 3
        assert "attempt 3" in str(r.error)

    def test_each_attempt_has_its_own_timeout(self, no_sleep: list[float]) -> None:
        """A timed-out attempt is retried with a fresh timeout."""
        calls = 0

        @step(retry=1, timeout=0.05)
        async def slow_then_fast() -> str:
            nonlocal calls
            calls += 1
            if calls == 1:
                await asyncio.sleep(30)
            return "ok"

        r = Pipeline("p", enable_cache=False).add_step(slow_then_fast).run().step_results["slow_then_fast"]
        assert r.success and r.attempts == 2


class TestDebug:
    def test_debug_prints_step_inputs_and_traceback(self, capsys: pytest.CaptureFixture[str]) -> None:
        """debug=True reports the failing step, its input types and sizes and the traceback."""

        @step(outputs=["data"])
        def load() -> list[int]:
            return [1, 2, 3]

        @step
        def explode(data: list[int]) -> None:
            raise KeyError("missing column")

        result = Pipeline("p", enable_cache=False).add_step(load).add_step(explode).run(debug=True)
        err = capsys.readouterr().err
        assert not result.success
        assert "'explode'" in err and "data = list(len=3) [1, 2, 3]" in err
        assert "KeyError" in err and "Traceback" in err


def _crash() -> None:

    os._exit(7)


class TestProcessSteps:
    def test_process_step_runs_in_another_pid(self) -> None:
        """executor="process" runs the function in a worker process, closures included."""

        offset = 5

        @step(outputs=["where"], executor="process")
        def where() -> tuple[int, int]:
            return os.getpid(), offset

        result = Pipeline("proc", enable_cache=False).add_step(where).run()
        pid, value = result["where"]
        assert pid != os.getpid() and value == 5

    def test_crashed_worker_fails_only_its_step(self) -> None:
        """A worker that dies fails its own step with WorkerCrashedError; the next process step runs."""

        from flowyml.errors import WorkerCrashedError

        crash = step(name="crash", outputs=["x"], executor="process")(_crash)

        @step(outputs=["pid"], executor="process")
        def fine() -> int:
            return os.getpid()

        result = (
            Pipeline("crash", enable_cache=False, max_processes=1)
            .add_step(crash)
            .add_step(fine)
            .run(fail_fast=False)
        )
        err = result.step_results["crash"].error
        assert isinstance(err, WorkerCrashedError) and err.exit_code == 7
        assert result["pid"] != os.getpid()


class TestFailFastQueue:
    def test_steps_waiting_for_a_slot_are_skipped_not_cancelled(self) -> None:
        """With fail_fast, steps still queued on max_concurrency never started: they are skipped."""

        @step(outputs=["boom"])
        async def boom() -> None:
            raise RuntimeError("x")

        def waiter(i: int) -> Any:
            @step(name=f"w{i}", outputs=[f"w{i}"])
            async def w() -> None:
                await asyncio.sleep(30)

            return w

        p = Pipeline("queue", enable_cache=False, max_concurrency=1).add_step(boom)
        for i in range(3):
            p.add_step(waiter(i))
        result = p.run()
        statuses = {n: r.status for n, r in result.step_results.items()}
        assert statuses["boom"] is StepStatus.FAILED
        waiting = [r for n, r in result.step_results.items() if n != "boom"]
        never_started = [r for r in waiting if r.status is StepStatus.SKIPPED]
        running = [r for r in waiting if r.status is StepStatus.CANCELLED]
        assert len(never_started) >= 2 and len(running) <= 1  # one slot: at most one got to run
        assert all(r.start_time is None for r in never_started)
        assert all(r.start_time is not None for r in running)
