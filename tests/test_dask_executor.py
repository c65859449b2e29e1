"""DaskExecutor against a real LocalCluster with worker processes.

One cluster (two single-threaded worker processes) is started for the module by a sync fixture;
each test connects its own executor to it by address, on the test's own event loop. The tests that
start a cluster of their own or close a sync client (about a second each) are marked ``slow``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, ClassVar

import psutil
import pytest

from flowyml import Dataset, If, Model, Pipeline, StepStatus, on_failure, step
from flowyml._store import Store
from flowyml.errors import ConfigError, EventLoopError, InputTypeError, SerializationError, StepTimeoutError

distributed = pytest.importorskip("distributed")

from flowyml._executors._dask import DaskExecutor  # noqa: E402 - after the importorskip

pytestmark = pytest.mark.dask


class StepBoom(Exception):
    """A user-defined error, to check that its type survives the trip from the worker."""


def add_one(x: int) -> int:
    return x + 1


def wait_for_event(name: str) -> bool:
    """Block the worker until the cluster-wide event ``name`` is set (or 30 s pass)."""
    return bool(distributed.Event(name).wait(timeout=30))


def describe(x: Any) -> tuple[str, Any, int]:
    """What the worker received: its type name, the value, and the worker's PID."""
    return type(x).__name__, x, os.getpid()


def boom(message: str) -> None:
    raise StepBoom(message)


def scheduler_keys(dask_scheduler: Any) -> list[str]:
    """Every key the scheduler still knows (run on the scheduler with ``run_on_scheduler``)."""
    return [str(k) for k in dask_scheduler.tasks]


async def wait_until_forgotten(client: Any, prefix: str, within: float = 5.0) -> None:
    """Fail unless the scheduler forgets every key starting with ``prefix`` within ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        keys = [k for k in await client.run_on_scheduler(scheduler_keys) if k.startswith(prefix)]
        if not keys:
            return
        assert time.monotonic() < deadline, f"the scheduler still holds {keys}"
        await asyncio.sleep(0.05)


def worker_children(before: set[int]) -> list[psutil.Process]:
    """Child processes started since ``before``, except multiprocessing's shared resource tracker."""
    found = []
    for child in psutil.Process().children(recursive=True):
        if child.pid in before:
            continue
        try:
            if "resource_tracker" in " ".join(child.cmdline()):
                continue
        except psutil.NoSuchProcess:
            continue
        found.append(child)
    return found


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """Two single-threaded worker processes shared by the module; the scheduler runs in-process."""
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address="127.0.0.1:0",
    ) as cluster:
        yield cluster


@pytest.fixture
async def executor(cluster: Any) -> AsyncIterator[DaskExecutor]:
    """An executor connected by address to the module's cluster, closed after the test."""
    ex = DaskExecutor(cluster.scheduler_address)
    yield ex
    await ex.aclose()


class TestRun:
    async def test_runs_in_a_worker_process(self, executor: DaskExecutor) -> None:
        """The body runs in a worker process, not in the test's."""
        pid = await executor.run(os.getpid, (), {}, timeout=None, step_name="pid")
        assert pid != os.getpid()
        assert pid in {p.pid for p in psutil.Process().children(recursive=True)}

    async def test_closure_and_lambda(self, executor: DaskExecutor) -> None:
        """Closures and lambdas are shipped by value."""
        offset = 10
        assert await executor.run(lambda x: x + offset, (5,), {}, timeout=None, step_name="lam") == 15

    async def test_keyword_arguments(self, executor: DaskExecutor) -> None:
        """Keyword arguments reach the function, even ones named like Client.submit options."""

        def f(a: int, *, key: str, workers: int, priority: int = 0) -> tuple[int, str, int, int]:
            return a, key, workers, priority

        got = await executor.run(f, (1,), {"key": "k", "workers": 3}, timeout=None, step_name="kw")
        assert got == (1, "k", 3, 0)

    async def test_async_function(self, executor: DaskExecutor) -> None:
        """An ``async def`` body is awaited on the worker."""

        async def f(x: int) -> int:
            await asyncio.sleep(0)
            return x * 2

        assert await executor.run(f, (21,), {}, timeout=None, step_name="coro") == 42

    async def test_exception_type_preserved(self, executor: DaskExecutor) -> None:
        """The task's exception comes back as the same type with its message."""
        with pytest.raises(StepBoom, match="bad input"):
            await executor.run(boom, ("bad input",), {}, timeout=None, step_name="boom")

    async def test_builtin_type_error_is_not_a_serialization_error(self, executor: DaskExecutor) -> None:
        """A TypeError raised by the body stays a plain TypeError."""
        with pytest.raises(TypeError) as info:
            await executor.run(add_one, ("text",), {}, timeout=None, step_name="typo")
        assert not isinstance(info.value, SerializationError)

    async def test_key_starts_with_step_name(self, executor: DaskExecutor) -> None:
        """The task key names the step, so the dashboard shows it."""
        fut = await executor.run(add_one, (1,), {}, timeout=None, step_name="named", keep_remote=True)
        assert str(fut.key).startswith("named-")


class TestRemoteValues:
    async def test_futures_stay_remote_between_steps(self, executor: DaskExecutor) -> None:
        """keep_remote returns a finished future; passed on, the next task gets the concrete value."""
        fut = await executor.run(add_one, (41,), {}, timeout=None, step_name="up", keep_remote=True)
        assert executor.is_remote(fut)
        assert fut.status == "finished"
        name, value, pid = await executor.run(describe, (fut,), {}, timeout=None, step_name="down")
        assert (name, value) == ("int", 42)
        assert pid != os.getpid()
        assert await executor.fetch(fut) == 42

    async def test_futures_nested_in_containers(self, executor: DaskExecutor) -> None:
        """Futures inside lists and dict keyword arguments are resolved on the worker too."""
        a = await executor.run(add_one, (1,), {}, timeout=None, step_name="a", keep_remote=True)
        b = await executor.run(add_one, (2,), {}, timeout=None, step_name="b", keep_remote=True)

        def total(xs: list[int], *, extra: dict[str, int]) -> int:
            return sum(xs) + extra["b"]

        got = await executor.run(total, ([a, b],), {"extra": {"b": b}}, timeout=None, step_name="sum")
        assert got == 2 + 3 + 3

    async def test_keep_remote_raises_task_error(self, executor: DaskExecutor) -> None:
        """With keep_remote, a failed task raises its exception instead of returning a future."""
        with pytest.raises(StepBoom):
            await executor.run(boom, ("x",), {}, timeout=None, step_name="rb", keep_remote=True)

    async def test_is_remote_and_fetch_of_plain_values(self, executor: DaskExecutor) -> None:
        """Plain values are not remote, and fetch returns them as they are."""
        assert not executor.is_remote(42)
        assert await executor.fetch([1, 2]) == [1, 2]


class TestSerialization:
    async def test_unpicklable_argument(self, executor: DaskExecutor) -> None:
        """An argument that cannot be pickled gives SerializationError naming step and argument."""
        with pytest.raises(SerializationError, match=r"'lockstep'.*argument 1 \(lock") as info:
            await executor.run(describe, (threading.Lock(),), {}, timeout=None, step_name="lockstep")
        assert info.value.step_name == "lockstep"

    async def test_unpicklable_result(self, executor: DaskExecutor) -> None:
        """A result that cannot be sent back gives SerializationError naming the step."""
        with pytest.raises(SerializationError, match=r"'lockmaker'.*result"):
            await executor.run(threading.Lock, (), {}, timeout=None, step_name="lockmaker")


class TestTimeoutAndCancellation:
    async def test_timeout_raises_and_frees_the_future(self, executor: DaskExecutor) -> None:
        """A timeout raises StepTimeoutError while the task still runs; the scheduler forgets it."""
        release = distributed.Event(f"release-{uuid.uuid4().hex}")
        try:
            # The task can only end once the event is set, which happens after run() raised;
            # the 10 s guard only turns a run() that waits for its task into a failure, not a hang.
            async with asyncio.timeout(10):
                with pytest.raises(StepTimeoutError) as info:
                    await executor.run(wait_for_event, (release.name,), {}, timeout=0.3, step_name="sleepy")
        finally:
            await distributed.Event(release.name, client=executor.client).set()
        assert info.value.step_name == "sleepy"
        assert info.value.executor == "dask"
        client: Any = executor.client
        assert not [k for k in client.futures if str(k).startswith("sleepy-")]
        await wait_until_forgotten(client, "sleepy-")

    async def test_cancellation_propagates_and_frees_the_future(self, executor: DaskExecutor) -> None:
        """Cancelling the awaiting task raises CancelledError and releases the running Dask task."""
        task = asyncio.create_task(executor.run(time.sleep, (1.5,), {}, timeout=None, step_name="napper"))
        await asyncio.sleep(0.4)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until_forgotten(executor.client, "napper-")

    async def test_cancelled_before_connecting_leaves_nothing_open(self, cluster: Any) -> None:
        """A step cancelled while the client connects does not leak it: aclose closes it."""
        ex = DaskExecutor(cluster.scheduler_address)
        task = asyncio.create_task(ex.run(add_one, (1,), {}, timeout=None, step_name="early"))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await ex.aclose()
        assert ex.client is None


class TestConnections:
    @pytest.mark.slow
    async def test_existing_sync_client(self, cluster: Any) -> None:
        """A sync client is not used on the loop: the executor connects to its scheduler, and
        closing the executor leaves the user's client open."""
        with distributed.Client(cluster, set_as_default=False) as user_client:
            ex = DaskExecutor(user_client)
            assert await ex.run(add_one, (1,), {}, timeout=None, step_name="s") == 2
            ours: Any = ex.client
            assert ours is not user_client
            assert ours.scheduler.address == user_client.scheduler.address
            await ex.aclose()
            assert user_client.status == "running"
            assert user_client.submit(add_one, 2).result() == 3

    async def test_existing_async_client(self, cluster: Any) -> None:
        """An async client on this loop is used as it is and left open."""
        async with distributed.Client(
            cluster.scheduler_address, asynchronous=True, set_as_default=False
        ) as user_client:
            assert user_client is not None
            kept: Any = user_client
            ex = DaskExecutor(user_client)
            assert await ex.run(add_one, (1,), {}, timeout=None, step_name="a") == 2
            assert ex.client is user_client
            await ex.aclose()
            assert kept.status == "running"

    async def test_reusable_after_aclose(self, executor: DaskExecutor) -> None:
        """After aclose, the next run connects again."""
        assert await executor.run(add_one, (1,), {}, timeout=None, step_name="r1") == 2
        await executor.aclose()
        assert executor.client is None
        assert await executor.run(add_one, (2,), {}, timeout=None, step_name="r2") == 3

    def test_other_event_loop_is_refused(self, cluster: Any) -> None:
        """Using the executor on a second loop without aclose on the first is a clear error."""
        ex = DaskExecutor(cluster.scheduler_address)

        async def use() -> Any:
            return await ex.run(add_one, (1,), {}, timeout=None, step_name="l")

        async def use_then_close() -> None:
            await use()
            await ex.aclose()

        loop = asyncio.new_event_loop()
        try:
            assert loop.run_until_complete(use()) == 2
            with pytest.raises(EventLoopError, match="another event loop"):
                asyncio.run(use())
            loop.run_until_complete(ex.aclose())
        finally:
            loop.close()
        asyncio.run(use_then_close())

    @pytest.mark.slow
    async def test_own_local_cluster_leaves_no_process(self) -> None:
        """An executor-started LocalCluster runs steps in worker processes, all gone after aclose."""
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        async with DaskExecutor(n_workers=1, processes=True) as ex:
            pid = await ex.run(os.getpid, (), {}, timeout=None, step_name="own")
            assert pid != os.getpid()
            assert worker_children(before)
        assert ex.client is None
        deadline = time.monotonic() + 5
        while worker_children(before) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert worker_children(before) == []
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


class TestConfiguration:
    def test_cluster_options_need_no_address(self) -> None:
        """Cluster options with an address are refused: they would be silently ignored."""
        with pytest.raises(ConfigError, match="n_workers"):
            DaskExecutor("tcp://127.0.0.1:8786", n_workers=2)

    def test_bad_address_type(self) -> None:
        """Something that is neither an address nor a Client is refused."""
        with pytest.raises(ConfigError, match="scheduler address"):
            DaskExecutor(8786)  # type: ignore[arg-type]

    def test_bad_worker_count(self) -> None:
        """n_workers must be a positive integer."""
        with pytest.raises(ConfigError, match="n_workers=0"):
            DaskExecutor(n_workers=0)

    def test_missing_dask_is_a_config_error(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without Dask installed, building the executor says how to install it."""
        monkeypatch.setitem(sys.modules, "distributed", None)
        with pytest.raises(ConfigError, match=r'pip install "flowyml\[dask\]"'):
            DaskExecutor()

    def test_repr(self) -> None:
        """The repr says where steps run."""
        assert repr(DaskExecutor("tcp://h:1")) == "DaskExecutor('tcp://h:1')"
        assert "LocalCluster(n_workers=2" in repr(DaskExecutor(n_workers=2))

    def test_import_flowyml_does_not_import_dask(self) -> None:
        """Dask stays an optional extra: importing flowyml and this module loads none of it."""
        code = (
            "import sys, flowyml, flowyml._executors._dask\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'dask', 'distributed'})\n"
            "assert not bad, bad\n"
        )
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


class CountingDask(DaskExecutor):
    """A real DaskExecutor that counts fetches to the driver and notes what each step was handed."""

    fetches = 0
    handed: ClassVar[dict[str, list[str]]] = {}

    async def run(self, fn: Any, args: Any, kwargs: Any, **options: Any) -> Any:
        type(self).handed[options["step_name"]] = [type(a).__name__ for a in args]
        return await super().run(fn, args, kwargs, **options)

    async def fetch(self, value: Any, *, step_name: str | None = None) -> Any:
        if self.is_remote(value):
            type(self).fetches += 1
        return await super().fetch(value, step_name=step_name)


class TestPipeline:
    async def test_chain_keeps_values_on_the_cluster(self, cluster: Any) -> None:
        """Between two uncached Dask steps the value moves worker to worker, never via the driver."""
        from flowyml import Pipeline, step

        dask = CountingDask(cluster.scheduler_address)
        CountingDask.fetches = 0

        @step(outputs=["numbers"], executor=dask)
        def make() -> list[int]:
            return list(range(1000))

        @step(outputs=["seen"], executor=dask)
        def consume(numbers: list[int]) -> tuple[str, int]:
            return type(numbers).__name__, sum(numbers)

        p = Pipeline("dask-chain", enable_cache=False).add_step(make).add_step(consume)
        try:
            result = await p.arun()
        finally:
            await dask.aclose()
        assert result.success, result.summary()
        assert result["seen"] == ("list", sum(range(1000)))
        assert result["numbers"] == list(range(1000))
        assert CountingDask.fetches == 2  # only the two final outputs, for the PipelineResult

    async def test_a_routed_return_is_wrapped_and_checked_around_a_dask_step(self, cluster: Any) -> None:
        """``-> Dataset`` / ``-> Model`` on Dask: wrapped in the driver, derived from the inputs."""
        dask = CountingDask(cluster.scheduler_address)

        @step(outputs=["rows"], executor=dask)
        def rows() -> Dataset:
            return [1, 2, 3]  # type: ignore[return-value]

        @step(outputs=["fitted"], executor=dask)
        def fit(rows: list[int]) -> Model:
            return {"n": len(rows)}  # type: ignore[return-value]

        @step(outputs=["bad"], executor=dask)
        def bad(fitted: Model, rows: str) -> None:
            return None

        p = Pipeline("dask-typed", enable_cache=False, validate_types=False)
        p.add_step(rows).add_step(fit)
        q = Pipeline("dask-typed-bad", enable_cache=False).add_step(rows).add_step(fit).add_step(bad)
        try:
            result = await p.arun()
            failed = await q.arun()
        finally:
            await dask.aclose()
        assert result.success, result.summary()
        fitted = result["fitted"]
        assert isinstance(fitted, Model) and fitted.data == {"n": 3}
        assert [a.name for a in fitted.parents] == ["rows"]
        res = failed.step_results["bad"]
        assert res.status is StepStatus.FAILED and isinstance(res.error, InputTypeError)

    async def test_cached_chain_still_moves_data_worker_to_worker(self, cluster: Any) -> None:
        """With caching on, the next Dask step is handed the future; the driver fetches once per output."""
        from flowyml import Pipeline, step

        dask = CountingDask(cluster.scheduler_address)
        CountingDask.fetches = 0
        CountingDask.handed = {}

        @step(outputs=["numbers"], executor=dask)
        def make_cached() -> list[int]:
            return list(range(1000))

        @step(outputs=["total"], executor=dask)
        def total_cached(numbers: list[int]) -> int:
            return sum(numbers)

        p = Pipeline("dask-cached").add_step(make_cached).add_step(total_cached)
        try:
            first = await p.arun()
            again = await p.arun()
        finally:
            await dask.aclose()
        assert first["total"] == again["total"] == sum(range(1000))
        assert CountingDask.handed["total_cached"] == ["Future"]
        assert CountingDask.fetches == 2  # one copy of each output, for the driver-side cache
        assert again.step_results["total_cached"].cached

    async def test_run_level_executor_with_driver_consumer(self, cluster: Any) -> None:
        """run(executor=...) sends steps to Dask; a driver-side step (own executor) gets the value."""
        from flowyml import Pipeline, step

        @step(outputs=["pid"])
        def where() -> int:
            return os.getpid()

        @step(outputs=["check"], executor="thread")
        def local(pid: int) -> tuple[int, int]:
            return pid, os.getpid()

        dask = DaskExecutor(cluster.scheduler_address)
        try:
            result = await Pipeline("dask-run").add_step(where).add_step(local).arun(executor=dask)
        finally:
            await dask.aclose()
        assert result.success, result.summary()
        remote_pid, driver_pid = result["check"]
        assert driver_pid == os.getpid() != remote_pid

    def test_blocking_run_closes_the_executor(self, cluster: Any) -> None:
        """pipeline.run(executor=...) closes the executor with its loop, and can run again."""
        from flowyml import Pipeline, step

        dask = DaskExecutor(cluster.scheduler_address)
        p = Pipeline("dask-twice", enable_cache=False).add_step(step(outputs=["v"], name="v")(lambda: 41))
        assert p.run(executor=dask)["v"] == 41
        assert dask.client is None
        assert p.run(executor=dask)["v"] == 41


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
