"""``Pipeline``: planning once, running with given executors, refusing what cannot run up front."""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from flowyml import Pipeline, StepStatus, step
from flowyml.errors import ConfigError
from flowyml.testing import InMemoryExecutor


class TestCleanup:
    def test_bad_executor_is_rejected_before_the_store_opens(self) -> None:
        """run(executor="process") is a ConfigError and leaves no store thread behind."""
        before = threading.active_count()
        with pytest.raises(ConfigError, match="executor"):
            Pipeline("bad").add_step(step(lambda: 1)).run(executor="process")  # type: ignore[arg-type]
        assert threading.active_count() == before


class TestWorkerImport:
    """A script started again by a process worker."""

    @pytest.mark.slow
    def test_script_without_main_guard_gets_a_clear_error(self, tmp_path: Any) -> None:
        """A process step in a script without a __main__ guard: the worker refuses, no phantom run."""
        import subprocess
        import sys

        script = tmp_path / "noguard.py"
        script.write_text(
            "from flowyml import Pipeline, step\n"
            "@step(outputs=['x'], executor='process')\n"
            "def work():\n    return 1\n"
            "result = Pipeline('noguard').add_step(work).run()\n"
            "print('STATE', result.state)\n"
        )
        env = {**__import__("os").environ, "FLOWYML_HOME": str(tmp_path / ".flowyml")}
        proc = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
        )
        assert "STATE failed" in proc.stdout
        assert "__main__" in proc.stderr
        runs = subprocess.run(
            [sys.executable, "-m", "flowyml._cli", "--dir", str(tmp_path / ".flowyml"), "runs"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert runs.stdout.count("noguard") == 1


@pytest.mark.slow
def test_guarded_script_runs_pipelines_in_spawned_workers(tmp_path: Path) -> None:
    """A guarded script's function that runs a pipeline inside a spawn worker is not refused."""
    script = tmp_path / "spawned.py"
    script.write_text(
        textwrap.dedent(
            """
            import multiprocessing
            from flowyml import Pipeline, step

            def job(_):
                p = Pipeline("inner", lineage=False, enable_cache=False)
                p.add_step(step(outputs=["x"], name="x")(lambda: 41))
                return p.run()["x"] + 1

            if __name__ == "__main__":
                with multiprocessing.get_context("spawn").Pool(1) as pool:
                    print("RESULT", pool.map(job, [0]))
            """
        )
    )
    env = {**os.environ, "FLOWYML_HOME": str(tmp_path / ".flowyml")}
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert "RESULT [42]" in proc.stdout, proc.stderr


class TestWithAnInMemoryExecutor:
    """``flowyml.testing.InMemoryExecutor`` as the run's executor: every call seen, in order."""

    def _pipeline(self) -> Pipeline:
        @step(outputs=["a"])
        def first() -> int:
            return 1

        @step(outputs=["b"])
        async def second(a: int) -> int:
            return a + 1

        return Pipeline("mem", enable_cache=False, lineage=False).add_step(first).add_step(second)

    def test_every_step_goes_to_the_given_executor(self) -> None:
        executor = InMemoryExecutor()
        result = self._pipeline().run(executor=executor)
        assert result["b"] == 2
        assert executor.steps == ["first", "second"]
        assert executor.calls[1].args == (1,)
        assert executor.closed  # run() closes what it was given: its loop ends with it

    async def test_arun_leaves_the_executor_open(self) -> None:
        executor = InMemoryExecutor()
        await self._pipeline().arun(executor=executor)
        assert not executor.closed and executor.peak == 1

    def test_a_timeout_is_enforced(self) -> None:
        @step(outputs=["x"], timeout=0.05)
        async def slow() -> int:
            await asyncio.sleep(5)
            return 1

        executor = InMemoryExecutor()
        result = Pipeline("slow", enable_cache=False, lineage=False).add_step(slow).run(executor=executor)
        assert result.step_results["slow"].status is StepStatus.TIMED_OUT

    @pytest.mark.parametrize("timeout", [None, 5.0])
    def test_a_timeout_error_of_the_step_itself_is_its_failure(self, timeout: float | None) -> None:
        """A step that raises TimeoutError (its own network call) fails with it; it did not time out."""

        @step(outputs=["x"], timeout=timeout)
        async def upstream() -> int:
            raise TimeoutError("the upstream API did not answer")

        executor = InMemoryExecutor()
        run = Pipeline("own", enable_cache=False, lineage=False).add_step(upstream).run(executor=executor)
        res = run.step_results["upstream"]
        assert res.status is StepStatus.FAILED
        assert type(res.error) is TimeoutError and "did not answer" in str(res.error)


class TestPlan:
    def test_the_plan_is_built_once_and_holds_what_runs_need(self) -> None:
        @step(outputs=["x"], resources={"gpu": 1})
        async def train() -> int:
            return 1

        p = Pipeline("plan", resources={"gpu": 2}).add_step(train)
        plan = p.plan()
        assert p.plan() is plan
        assert plan.requests == ((("gpu", 1.0),),)
        assert plan.direct == (True,)
        assert plan.shapes[0].name == "train"

    @pytest.mark.slow
    def test_a_hundred_thousand_steps_plan_and_run(self) -> None:
        """100,000 async steps and a fan-in of all of them: planned and run, every value in place."""
        n = 100_000

        async def one() -> int:
            return 1

        async def total(*values: int) -> int:
            return sum(values)

        p = Pipeline("wide", enable_cache=False, lineage=False)
        for i in range(n):
            p.add_step(step(name=f"s{i}", outputs=[f"r{i}"])(one))
        p.add_step(step(name="total", inputs=[f"r{i}" for i in range(n)], outputs=["sum"])(total))
        plan = p.plan()
        assert len(plan.nodes) == n + 1 and plan.roots == tuple(range(n))
        assert plan.nodes[n].deps == tuple(range(n)) and plan.chains == {}
        result = p.run()
        assert result.success and result["sum"] == n


class TestManyRunsAtOnce:
    """Runs started together share the event loop with everything else on it."""

    async def test_runs_started_together_take_turns(self) -> None:
        """1,000 arun() from one gather start over several loop iterations, in order, all correct.

        Started in one iteration, every other task waited for all of their setups; a task that
        counts iterations sees the runs' steps begin across several of them.
        """
        iteration = 0
        seen: list[int] = []

        async def tick() -> None:
            nonlocal iteration
            while True:
                await asyncio.sleep(0)
                iteration += 1

        @step(outputs=["y"])
        async def double(x: int) -> int:
            seen.append(iteration)
            return 2 * x

        p = Pipeline("many", enable_cache=False, lineage=False).add_step(double)
        ticker = asyncio.create_task(tick())
        try:
            results = await asyncio.gather(*(p.arun({"x": i}) for i in range(1000)))
        finally:
            ticker.cancel()
        assert [r["y"] for r in results] == [2 * i for i in range(1000)]
        assert seen == sorted(seen)  # started in the order they were called
        assert seen[-1] - seen[0] >= 2

    async def test_a_cancelled_waiting_run_lets_the_others_start(self) -> None:
        """Runs cancelled while they wait for their turn do not hold up the runs behind them."""

        @step(outputs=["y"])
        async def double(x: int) -> int:
            return 2 * x

        p = Pipeline("cancelled", enable_cache=False, lineage=False).add_step(double)
        tasks = [asyncio.create_task(p.arun({"x": i})) for i in range(1000)]
        await asyncio.sleep(0)  # the first runs started; most wait for their turn
        for t in tasks[100:900]:
            t.cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        kept = [d for d in done if not isinstance(d, BaseException)]
        assert sum(isinstance(d, asyncio.CancelledError) for d in done) >= 700
        assert all(r["y"] == 2 * r.params["x"] for r in kept)
        assert len(kept) >= 200


def test_the_heap_at_the_first_run_is_frozen_once(tmp_path: Path) -> None:
    """The first run in a process freezes what exists (full collections skip it); not when GC is off."""
    code = textwrap.dedent(
        """
        import gc, sys
        from flowyml import Pipeline, step
        if sys.argv[1] == "off":
            gc.disable()
        p = Pipeline("freeze", enable_cache=False, lineage=False).add_step(step(outputs=["y"])(lambda: 1))
        assert gc.get_freeze_count() == 0
        p.run()
        frozen = gc.get_freeze_count()
        p.run()
        print(frozen, gc.get_freeze_count())
        """
    )
    # Frozen objects can still be freed; frozen again, the count would grow.
    for mode, check in (("on", lambda a, b: a > 1000 and b <= a), ("off", lambda a, b: a == b == 0)):
        out = subprocess.run(
            [sys.executable, "-c", code, mode], capture_output=True, text=True, check=True, cwd=tmp_path
        ).stdout.split()
        assert check(int(out[0]), int(out[1])), (mode, out)


class TestWhatAPlanKeeps:
    """What a plan keeps for its runs (key layouts) is made before its first step.

    Made step by step during a run, those long-lived entries were spread between the run's
    short-lived objects and kept every allocator arena the run touched resident after it.
    Lineage shapes keep no encoding at all: the store's writer quotes them as it packs a run.
    """

    def test_layouts_are_made_before_the_first_step(self) -> None:
        seen: list[bool] = []
        p = Pipeline("kept", enable_cache=True, lineage=True)

        @step(outputs=["a"], cache=False)  # its closure (the pipeline) has no fingerprint
        def first() -> int:
            seen.append(p._keys.nodes[-1] is not None)
            return 1

        p.add_step(first)
        p.add_step(step(inputs=["a"], outputs=["b"])(lambda a: a + 1))
        p.add_step(step(inputs=["b"], outputs=["c"])(lambda b: b + 1))
        assert p.run()["c"] == 3
        assert seen == [True]

    def test_a_lineage_only_run_lays_out_no_keys_and_shapes_hold_no_text(self) -> None:
        p = Pipeline("shapes", enable_cache=False, lineage=True)
        p.add_step(step(name="one", outputs=["a"])(lambda: 1))
        p.add_step(step(name="two", inputs=["a"], outputs=["b"])(lambda a: 1))
        p.run()
        assert p._keys is None
        shape = p.plan().shapes[-1]
        assert [getattr(shape, name) for name in shape.__slots__] == [
            {"a": ("one", "a")},
            "two",
            ("b",),
        ]

    def test_adding_a_step_lets_the_old_plan_and_its_caches_go(self) -> None:
        p = Pipeline("replan", enable_cache=True, lineage=True)
        p.add_step(step(outputs=["a"])(lambda: 1))
        p.run()
        plan = p.plan()
        p.add_step(step(inputs=["a"], outputs=["b"])(lambda a: a + 1))
        gc.collect()
        assert sys.getrefcount(plan) == 2  # this name and the call's argument: nothing else holds it
