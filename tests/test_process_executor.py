"""ProcessExecutor: steps in worker processes that crashes, timeouts and cancellation cannot break."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import cloudpickle
import psutil
import pytest

from flowyml._errors import (
    ConfigError,
    SerializationError,
    StepTimeoutError,
    WorkerCrashedError,
)
from flowyml._executors._process import ProcessExecutor, RemoteTraceback

# Ship this module's functions by value, so workers need not import the tests package (which
# depends on pytest's import mode).
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture
async def executor() -> AsyncIterator[ProcessExecutor]:
    """A two-worker executor, closed after the test."""
    pool = ProcessExecutor(max_workers=2)
    try:
        yield pool
    finally:
        await pool.aclose()


@pytest.fixture
async def single() -> AsyncIterator[ProcessExecutor]:
    """A one-worker executor, so consecutive calls land on the same worker while it lives."""
    pool = ProcessExecutor(max_workers=1)
    try:
        yield pool
    finally:
        await pool.aclose()


async def call(
    pool: ProcessExecutor,
    fn: Callable[..., Any],
    *args: Any,
    timeout: float | None = None,
    step: str = "step",
    **kwargs: Any,
) -> Any:
    """``pool.run`` with the engine's calling convention spelled shortly."""
    return await pool.run(fn, args, kwargs, timeout=timeout, step_name=step)


def wait_for_file(path: Path, limit: float = 30.0) -> None:
    """In a worker: block until ``path`` exists (a rendezvous with another step)."""
    deadline = time.monotonic() + limit
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.005)


async def await_file(path: Path, limit: float = 30.0) -> None:
    """In the test: wait without blocking the loop until ``path`` exists."""
    deadline = time.monotonic() + limit
    while not path.exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    assert path.exists()


def mark_then_sleep(marker: Path, seconds: float) -> None:
    """Say "I am running" with a file holding our PID, then sleep.

    Written aside and renamed, so a reader that sees the file never reads it half-written.
    """
    partial = marker.with_name(marker.name + ".partial")
    partial.write_text(str(os.getpid()))
    partial.replace(marker)
    time.sleep(seconds)


def wait_until_gone(pid: int) -> None:
    """Block until process ``pid`` no longer exists (it was killed and reaped)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(pid).wait(timeout=10)


def descendants() -> set[int]:
    """PIDs of every process below this one (workers are grandchildren, via the forkserver)."""
    return {child.pid for child in psutil.Process().children(recursive=True)}


def service_pids() -> set[int]:
    """The forkserver and resource tracker: per-interpreter helpers, not workers."""
    pids = {
        getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None),
        getattr(multiprocessing.resource_tracker._resource_tracker, "_pid", None),
    }
    return {pid for pid in pids if pid is not None}


class StepFailed(Exception):
    """A domain error a step raises on purpose."""


class Unpicklable(Exception):
    """An exception carrying a lock, which no pickler can ship."""

    def __init__(self) -> None:
        super().__init__("holds a lock")
        self.lock = threading.Lock()


def fail_deep() -> None:
    """Raise from a nested frame, so the remote traceback has something to show."""
    _inner_failure()


def _inner_failure() -> None:
    raise StepFailed("bad input 42")


class TestRun:
    async def test_runs_in_another_process(self, executor: ProcessExecutor) -> None:
        """The body runs in a worker process, not in the test's."""
        assert await call(executor, os.getpid) != os.getpid()

    async def test_passes_args_and_kwargs(self, executor: ProcessExecutor) -> None:
        """Positional and keyword arguments reach the function."""
        assert await call(executor, divmod, 17, 5) == (3, 2)
        assert await call(executor, int, "ff", base=16) == 255

    async def test_lambda_runs(self, executor: ProcessExecutor) -> None:
        """A lambda is shipped by value and runs."""
        assert await call(executor, lambda x: x * 2, 21) == 42

    async def test_closure_runs(self, executor: ProcessExecutor) -> None:
        """A closure's captured values travel with it."""
        offset = 100

        def add(x: int) -> int:
            return x + offset

        assert await call(executor, add, 1) == 101

    async def test_large_values_cross_intact(self, executor: ProcessExecutor) -> None:
        """Megabytes of arguments and results go through the socket whole, both ways."""
        blob = os.urandom(8 * 1024 * 1024)
        assert await call(executor, lambda data: data[::-1], blob) == blob[::-1]

    async def test_worker_is_reused(self, single: ProcessExecutor) -> None:
        """Consecutive calls reuse one live worker instead of starting a process each."""
        first = await call(single, os.getpid)
        assert await call(single, os.getpid) == first
        assert single.worker_pids() == (first,)

    async def test_worker_ignores_sigint(self, single: ProcessExecutor) -> None:
        """A SIGINT (Ctrl-C reaches the whole process group) does not interrupt a worker."""

        def interrupt_self() -> str:
            os.kill(os.getpid(), signal.SIGINT)
            return "still running"

        assert await call(single, interrupt_self) == "still running"

    def test_rejects_zero_workers(self) -> None:
        """max_workers below 1 is a ConfigError naming the option."""
        with pytest.raises(ConfigError, match="max_workers"):
            ProcessExecutor(max_workers=0)


class TestRemoteExceptions:
    async def test_exception_type_preserved(self, executor: ProcessExecutor) -> None:
        """An exception from the step comes back as its own type and message."""
        with pytest.raises(StepFailed, match="bad input 42"):
            await call(executor, fail_deep)

    async def test_remote_traceback_attached(self, executor: ProcessExecutor) -> None:
        """The worker's traceback is the exception's cause, naming the frame that raised."""
        with pytest.raises(StepFailed) as info:
            await call(executor, fail_deep)
        cause = info.value.__cause__
        assert isinstance(cause, RemoteTraceback)
        assert "_inner_failure" in cause.text
        assert "StepFailed: bad input 42" in cause.text

    async def test_unpicklable_exception_becomes_remote_step_error(self, executor: ProcessExecutor) -> None:
        """An exception that cannot be pickled arrives as a RemoteStepError with its repr and traceback."""
        from flowyml.errors import RemoteStepError

        def raise_unpicklable() -> None:
            raise Unpicklable

        with pytest.raises(RemoteStepError, match=r"step 'odd' raised Unpicklable\('holds a lock'\)") as info:
            await call(executor, raise_unpicklable, step="odd")
        assert info.value.step_name == "odd"
        assert isinstance(info.value.__cause__, RemoteTraceback)
        assert "raise_unpicklable" in info.value.__cause__.text

    async def test_worker_survives_step_exception(self, single: ProcessExecutor) -> None:
        """A step raising does not cost its worker."""
        pid = await call(single, os.getpid)
        with pytest.raises(ZeroDivisionError):
            await call(single, lambda: 1 / 0)
        assert await call(single, os.getpid) == pid


def _crash_exit() -> None:
    os._exit(3)


def _crash_segfault() -> None:
    ctypes.string_at(0)


def _crash_sigkill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class TestCrashes:
    @pytest.mark.parametrize(
        ("crash", "exit_code"),
        [(_crash_exit, 3), (_crash_segfault, -signal.SIGSEGV), (_crash_sigkill, -signal.SIGKILL)],
        ids=["os._exit", "segfault", "sigkill"],
    )
    async def test_crash_fails_only_its_step(
        self, executor: ProcessExecutor, tmp_path: Path, crash: Callable[[], None], exit_code: int
    ) -> None:
        """A dying worker fails its own step with the exit code; a concurrent step still succeeds."""
        dying = tmp_path / "dying"

        def crashing_step() -> None:
            dying.write_text(str(os.getpid()))
            crash()

        def bystander() -> str:
            wait_for_file(dying)
            time.sleep(0.05)  # stay busy while the other worker dies
            return "fine"

        crashed: BaseException | None
        survived: BaseException | str
        crashed, survived = await asyncio.gather(
            call(executor, crashing_step, step="crasher"),
            call(executor, bystander, step="bystander"),
            return_exceptions=True,
        )
        assert survived == "fine"
        assert isinstance(crashed, WorkerCrashedError)
        assert crashed.exit_code == exit_code
        assert crashed.step_name == "crasher"
        assert "'crasher'" in str(crashed)
        assert f"exit code {exit_code}" in str(crashed)

    async def test_next_step_runs_in_new_pid(self, single: ProcessExecutor, tmp_path: Path) -> None:
        """After a crash the pool replaces the worker and later steps run in a new process."""
        dying = tmp_path / "dying"

        def crashing_step() -> None:
            dying.write_text(str(os.getpid()))
            os._exit(3)

        with pytest.raises(WorkerCrashedError):
            await call(single, crashing_step)
        crashed_pid = int(dying.read_text())
        new_pid = await call(single, os.getpid)
        assert new_pid != crashed_pid
        assert single.worker_pids() == (new_pid,)

    async def test_sys_exit_is_a_crash(self, single: ProcessExecutor) -> None:
        """sys.exit() in a step ends its worker, reported as a crash with that exit code."""
        with pytest.raises(WorkerCrashedError) as info:
            await call(single, sys.exit, 7)
        assert info.value.exit_code == 7


class TestTimeout:
    async def test_timeout_raises_step_timeout_error(self, single: ProcessExecutor) -> None:
        """A step past its timeout raises StepTimeoutError naming the step and the executor."""
        with pytest.raises(StepTimeoutError) as info:
            await call(single, time.sleep, 60, timeout=0.2, step="slow")
        assert info.value.step_name == "slow"
        assert info.value.timeout == 0.2
        assert info.value.executor == "process"

    async def test_timed_out_worker_is_gone(self, single: ProcessExecutor) -> None:
        """The worker of a timed-out step is killed and reaped before the error is raised."""
        pid = await call(single, os.getpid)
        with pytest.raises(StepTimeoutError):
            await call(single, time.sleep, 60, timeout=0.2)
        assert not psutil.pid_exists(pid)
        assert pid not in single.worker_pids()

    async def test_step_after_timeout_runs_in_new_worker(self, single: ProcessExecutor) -> None:
        """The pool replaces a timed-out worker."""
        pid = await call(single, os.getpid)
        with pytest.raises(StepTimeoutError):
            await call(single, time.sleep, 60, timeout=0.2)
        assert await call(single, os.getpid) != pid

    async def test_fast_step_within_timeout_succeeds(self, single: ProcessExecutor) -> None:
        """A timeout that is not reached changes nothing."""
        assert await call(single, sum, [1, 2, 3], timeout=30) == 6


class TestCancellation:
    async def test_cancellation_propagates(self, single: ProcessExecutor, tmp_path: Path) -> None:
        """Cancelling the awaiting task raises CancelledError, unwrapped."""
        marker = tmp_path / "running"
        task = asyncio.create_task(call(single, mark_then_sleep, marker, 60))
        await await_file(marker)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    async def test_cancellation_kills_worker(self, single: ProcessExecutor, tmp_path: Path) -> None:
        """The worker of a cancelled step is killed, and the next step gets a new one."""
        marker = tmp_path / "running"
        task = asyncio.create_task(call(single, mark_then_sleep, marker, 60))
        await await_file(marker)
        pid = int(marker.read_text())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        wait_until_gone(pid)
        assert not psutil.pid_exists(pid)
        assert await call(single, os.getpid) != pid

    async def test_cancel_while_worker_starts(self, tmp_path: Path) -> None:
        """A call cancelled while its worker starts raises CancelledError; aclose still reaps it."""
        before = descendants()
        pool = ProcessExecutor(max_workers=1)
        task = asyncio.create_task(call(pool, os.getpid))
        for _ in range(3):  # into the wait for the starting process
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await pool.aclose()
        assert descendants() - before - service_pids() == set()

    async def test_cancel_while_queued_spares_running_worker(
        self, single: ProcessExecutor, tmp_path: Path
    ) -> None:
        """Cancelling a call still waiting for a slot leaves the busy worker and its step alone."""
        marker = tmp_path / "running"
        release = tmp_path / "release"

        def hold() -> int:
            marker.write_text("")
            wait_for_file(release)
            return os.getpid()

        running = asyncio.create_task(call(single, hold))
        await await_file(marker)
        queued = asyncio.create_task(call(single, os.getpid))
        for _ in range(5):  # let it reach the slot queue
            await asyncio.sleep(0)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        release.write_text("")
        pid = await running
        assert single.worker_pids() == (pid,)


class TestSerialization:
    async def test_unpicklable_argument_named(self, executor: ProcessExecutor) -> None:
        """An argument that cannot be pickled is a SerializationError naming the step and parameter."""

        def train(data: list[int], model: object) -> int:
            return len(data)

        with pytest.raises(SerializationError, match=r"step 'train': argument 'model'") as info:
            await call(executor, train, [1], threading.Lock(), step="train")
        assert info.value.step_name == "train"
        assert "cannot pickle" in str(info.value)

    async def test_unpicklable_keyword_argument_named(self, executor: ProcessExecutor) -> None:
        """A keyword argument that cannot be pickled is named too."""

        def train(model: object = None) -> None:
            return None

        with pytest.raises(SerializationError, match=r"argument 'model'"):
            await call(executor, train, model=threading.Lock())

    async def test_unpicklable_function_named(self, executor: ProcessExecutor) -> None:
        """A function whose closure cannot be pickled is reported as "the function"."""
        lock = threading.Lock()

        def locked() -> bool:
            return lock.locked()

        with pytest.raises(SerializationError, match="the function"):
            await call(executor, locked)

    async def test_unpicklable_result_named(self, executor: ProcessExecutor) -> None:
        """A result that cannot be pickled is a SerializationError naming the step and "the result"."""
        with pytest.raises(SerializationError, match=r"step 'make': the result") as info:
            await call(executor, threading.Lock, step="make")
        assert info.value.step_name == "make"

    async def test_worker_usable_after_unpicklable_result(self, single: ProcessExecutor) -> None:
        """The worker that could not send its result keeps serving."""
        pid = await call(single, os.getpid)
        with pytest.raises(SerializationError):
            await call(single, threading.Lock)
        assert await call(single, os.getpid) == pid


class TestShutdown:
    async def test_no_child_left_after_aclose(self, tmp_path: Path) -> None:
        """After aclose no worker is alive; only multiprocessing's shared helpers may remain."""
        before = descendants()
        pool = ProcessExecutor(max_workers=2)
        marker = tmp_path / "running"
        pids = await asyncio.gather(call(pool, os.getpid), call(pool, os.getpid))
        busy = asyncio.create_task(call(pool, mark_then_sleep, marker, 60))
        await await_file(marker)
        await pool.aclose()
        with pytest.raises(WorkerCrashedError, match="executor was closed"):
            await busy
        assert descendants() - before - service_pids() == set()
        assert not any(psutil.pid_exists(pid) for pid in pids)
        assert pool.worker_pids() == ()

    async def test_run_after_aclose_refused(self) -> None:
        """A closed executor refuses new calls."""
        pool = ProcessExecutor(max_workers=1)
        await pool.aclose()
        with pytest.raises(RuntimeError, match="closed"):
            await call(pool, os.getpid)


def _interval(seconds: float) -> tuple[int, int, int]:
    """Run for ``seconds`` and report (pid, start, end) on the system-wide monotonic clock."""
    start = time.monotonic_ns()
    time.sleep(seconds)
    return os.getpid(), start, time.monotonic_ns()


class TestConcurrency:
    @pytest.mark.slow
    async def test_max_workers_bounds_concurrency(self) -> None:
        """With max_workers=2, six steps use two processes and never more than two run at once."""
        pool = ProcessExecutor(max_workers=2)
        try:
            spans = await asyncio.gather(*(call(pool, _interval, 0.2) for _ in range(6)))
        finally:
            await pool.aclose()
        events = sorted([(start, 1) for _, start, _ in spans] + [(end, -1) for _, _, end in spans])
        running = peak = 0
        for _, change in events:
            running += change
            peak = max(peak, running)
        assert peak == 2
        assert len({pid for pid, _, _ in spans}) == 2
