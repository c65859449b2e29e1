"""Bugs found in review, each with the test that would have caught it."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from flowyml import Pipeline, StepStatus, context, on_failure, retry, step
from flowyml.errors import ConfigError

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


class TestFallbacksAreNotCached:
    def test_fallback_value_is_passed_on_but_not_cached(self, no_sleep: list[float]) -> None:
        """A fallback stands in for one run only: the next run calls the function again."""
        api_up = {"value": False}

        @step(outputs=["data"])
        @retry(max_attempts=2)
        @on_failure(lambda: {"status": "unavailable"})
        def fetch() -> dict[str, str]:
            if not api_up["value"]:
                raise ConnectionError("down")
            return {"status": "ok"}

        p = Pipeline("fallback").add_step(fetch)
        first = p.run()
        assert first["data"] == {"status": "unavailable"}
        assert first.step_results["fetch"].used_fallback
        api_up["value"] = True
        second = p.run()
        assert second["data"] == {"status": "ok"}
        assert not second.step_results["fetch"].cached


class TestOutputsInTheKey:
    def test_swapping_output_names_is_a_miss(self) -> None:
        """Changing a step's outputs= changes its key: no stale or crashing hit."""

        def build(names: list[str]) -> Pipeline:
            @step(name="split", outputs=names)
            def split() -> tuple[list[int], list[int]]:
                return [1, 2, 3], [9]

            return Pipeline("outputs").add_step(split)

        build(["train", "test"]).run()
        swapped = build(["test", "train"]).run()
        assert not swapped.step_results["split"].cached
        assert swapped["test"] == [1, 2, 3]
        renamed = build(["train", "holdout"]).run()
        assert renamed.success and renamed["holdout"] == [9]


class TestCleanup:
    def test_bad_executor_is_rejected_before_the_store_opens(self) -> None:
        """run(executor="process") is a ConfigError and leaves no store thread behind."""
        before = threading.active_count()
        with pytest.raises(ConfigError, match="executor"):
            Pipeline("bad").add_step(step(lambda: 1)).run(executor="process")  # type: ignore[arg-type]
        assert threading.active_count() == before


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


class TestSharedCapacity:
    async def test_concurrent_runs_of_one_pipeline_share_its_capacity(self) -> None:
        """Two concurrent runs of one pipeline never hold its single GPU at the same time."""
        holders = 0
        peak = 0

        @step(outputs=["x"], resources={"gpu": 1}, cache=False)
        async def use_gpu() -> int:
            nonlocal holders, peak
            holders += 1
            peak = max(peak, holders)
            await asyncio.sleep(0.02)
            holders -= 1
            return 1

        p = Pipeline("gpu", resources={"gpu": 1}).add_step(use_gpu)
        await asyncio.gather(p.arun(), p.arun(), p.arun())
        assert peak == 1


class TestSecondReview:
    async def test_breaker_call_settles_a_returned_coroutine(self) -> None:
        """breaker.call(lambda: coro()) counts the coroutine's failure, not an instant success."""
        from flowyml import CircuitBreaker

        breaker = CircuitBreaker(failure_threshold=2, recovery_timeout=60)

        async def flaky() -> None:
            raise ConnectionError("down")

        for _ in range(2):
            with pytest.raises(ConnectionError):
                await breaker.call(lambda: flaky())
        assert breaker.state == "open"

    async def test_parallel_map_runs_an_async_callable_object(self) -> None:
        """An object with an async __call__ is awaited, not returned as coroutines."""
        from flowyml import parallel_map

        class Double:
            async def __call__(self, x: int) -> int:
                await asyncio.sleep(0)
                return 2 * x

        assert await parallel_map(Double(), [1, 2, 3], num_workers=2) == [2, 4, 6]

    def test_parallel_map_refuses_a_function_returning_coroutines(self) -> None:
        """A plain function that returns coroutines is a ConfigError, not a list of coroutines."""
        from flowyml import parallel_map

        async def f(x: int) -> int:
            return x

        with pytest.raises(ConfigError, match="async def"):
            parallel_map(lambda x: f(x), [1, 2])

    def test_asset_metadata_is_part_of_the_key(self) -> None:
        """Two datasets differing only in metadata never share a cache entry."""
        from flowyml import Dataset

        @step(outputs=["label"])
        def label_of(ds: Dataset) -> str:
            return str(ds.metadata["label"])

        p = Pipeline("meta").add_step(label_of)
        assert p.run(context={"ds": Dataset([1, 2], metadata={"label": "y"})})["label"] == "y"
        assert p.run(context={"ds": Dataset([1, 2], metadata={"label": "target"})})["label"] == "target"

    async def test_single_flight_hands_out_copies(self) -> None:
        """Runs that share a computed key get equal values, never the same live object."""

        @step(outputs=["rows"])
        async def rows() -> list[int]:
            await asyncio.sleep(0.02)
            return [1, 2, 3]

        p = Pipeline("copies").add_step(rows)
        a, b = await asyncio.gather(p.arun(), p.arun())
        assert a["rows"] == b["rows"]
        assert a["rows"] is not b["rows"]

    def test_fingerprint_error_is_raised_before_any_step_runs(self) -> None:
        """An unhashable closure value is reported up front, naming the step and the fixes."""
        from flowyml.errors import UnhashableInputError

        lock = threading.Lock()
        ran: list[str] = []

        @step(outputs=["first"], cache=False)
        def first() -> int:
            ran.append("first")
            return 1

        @step(outputs=["x"])
        def uses_lock(first: int) -> int:
            with lock:
                return first

        with pytest.raises(UnhashableInputError) as info:
            Pipeline("fp").add_step(first).add_step(uses_lock).run()
        assert ran == []
        assert info.value.step_name == "uses_lock"
        assert "input_hash" in str(info.value) and "..." not in str(info.value)

    def test_fingerprint_warn_policy_runs_uncached(self) -> None:
        """With on_unhashable='warn' the same step runs, uncached, after a warning."""
        from flowyml import CachePolicy
        from flowyml.errors import UncachedStepWarning

        lock = threading.Lock()

        @step(outputs=["x"], cache=CachePolicy("code_hash", on_unhashable="warn"))
        def uses_lock() -> int:
            with lock:
                return 1

        with pytest.warns(UncachedStepWarning, match="uses_lock"):
            result = Pipeline("fpw").add_step(uses_lock).run()
        assert result["x"] == 1

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


class _Grumpy:
    def __flowyml_hash__(self) -> object:
        raise ValueError("no hash for you")


GRUMPY_GLOBAL = _Grumpy()


def _fallback_value() -> int:
    return -1


@on_failure(_fallback_value)
def _always_down() -> int:
    raise ConnectionError("down")


class TestThirdReview:
    def test_process_step_with_fallback(self) -> None:
        """A process step under @on_failure ships to its worker and returns the fallback."""
        s = step(name="down", outputs=["v"], executor="process")(_always_down)
        result = Pipeline("pfb").add_step(s).run()
        assert result["v"] == -1, result.summary()
        assert result.step_results["down"].used_fallback

    def test_global_whose_hash_raises_is_environment(self) -> None:
        """A global the step reads whose __flowyml_hash__ raises is skipped, not a step failure."""

        @step(outputs=["x"])
        def reads_global() -> str:
            return type(GRUMPY_GLOBAL).__name__

        assert Pipeline("grumpy").add_step(reads_global).run()["x"] == "_Grumpy"


class TestNewcomerPass:
    async def test_cached_group_head_is_recorded_once(self, tmp_path: Any) -> None:
        """A group whose head is a cache hit records each step once, the head with its artifact."""
        from flowyml._store import Store

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


class TestMissingOutputs:
    def test_missing_output_names_its_step_and_why(self) -> None:
        """result[name] for an output a failed step never produced says which step and why."""

        @step(outputs=["inv"])
        def invert(x: float) -> float:
            return 1 / x

        result = Pipeline("inv", context=context(x=0)).add_step(invert).run()
        with pytest.raises(KeyError, match=r"'invert' failed \(ZeroDivisionError"):
            result["inv"]
