"""Bugs found in the third review around remote values, fallbacks and gates, with their tests."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flowyml import DaskExecutor, If, Pipeline, StepStatus, on_failure, step
from flowyml._store import Store

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """One single-threaded Dask worker process for the module."""
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0"
    ) as cluster:
        yield cluster


@pytest.mark.dask
class TestDaskCaching:
    async def test_consumer_reruns_when_its_remote_input_changes(self, cluster: Any, tmp_path: Path) -> None:
        """A cached Dask consumer's key follows its input's value, not the producer's key."""
        data = tmp_path / "data.txt"
        data.write_text("abc")
        dask = DaskExecutor(cluster.scheduler_address)

        @step(outputs=["raw"], executor=dask)
        def load(path: str) -> str:
            with open(path) as f:
                return f.read()

        @step(outputs=["n"], executor=dask)
        def count(raw: str) -> int:
            return len(raw)

        p = Pipeline("stale", context={"path": str(data)}).add_step(load).add_step(count)
        try:
            assert (await p.arun())["n"] == 3
            data.write_text("abcdefgh")
            async with await Store.open() as store:
                await store.clear_cache("load")
            second = await p.arun()
        finally:
            await dask.aclose()
        assert second["n"] == 8
        assert not second.step_results["count"].cached

    async def test_callable_key_sees_real_values(self, cluster: Any) -> None:
        """A cache= function of a Dask step receives the input's value, not a stand-in."""
        dask = DaskExecutor(cluster.scheduler_address)

        @step(outputs=["word"], executor=dask)
        def word() -> str:
            return "Hello"

        @step(outputs=["shout"], executor=dask, cache=lambda word: word.upper())
        def shout(word: str) -> str:
            return word.upper() + "!"

        try:
            result = await Pipeline("keyfn").add_step(word).add_step(shout).arun()
        finally:
            await dask.aclose()
        assert result["shout"] == "HELLO!", result.summary()

    async def test_async_step_with_fallback_runs_on_dask(self, cluster: Any) -> None:
        """An async Dask step under @on_failure returns its fallback instead of failing."""
        dask = DaskExecutor(cluster.scheduler_address)

        @step(outputs=["v"], executor=dask)
        @on_failure(lambda: -1)
        async def flaky() -> int:
            raise ConnectionError("down")

        try:
            result = await Pipeline("afb", enable_cache=False).add_step(flaky).arun()
        finally:
            await dask.aclose()
        assert result["v"] == -1, result.summary()

    async def test_if_condition_reads_values_not_futures(self, cluster: Any) -> None:
        """An If reading an uncached Dask step's output compares values."""
        dask = DaskExecutor(cluster.scheduler_address)

        @step(outputs=["score"], executor=dask)
        def score() -> float:
            return 0.5

        @step(outputs=["done"])
        def retrain() -> str:
            return "retrain"

        @step(outputs=["shipped"])
        def ship() -> str:
            return "ship"

        p = Pipeline("dask-if", enable_cache=False).add_step(score)
        p.add_control_flow(
            If(lambda ctx: ctx.steps["score"].outputs["score"] > 0.9, then_step=ship, else_step=retrain)
        )
        try:
            result = await p.arun()
        finally:
            await dask.aclose()
        assert result["done"] == "retrain", result.summary()

    async def test_output_that_cannot_come_back_fails_its_step(self, cluster: Any) -> None:
        """A Dask result that cannot be sent to the driver fails its step; run() does not raise."""
        dask = DaskExecutor(cluster.scheduler_address)

        @step(outputs=["lock"], executor=dask, cache=False)
        def make_lock() -> Any:
            return threading.Lock()

        try:
            result = await Pipeline("nolock").add_step(make_lock).arun()
        finally:
            await dask.aclose()
        assert not result.success
        assert result.step_results["make_lock"].status is StepStatus.FAILED


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
