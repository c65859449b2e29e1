"""LocalExecutor: every step in this process, async ones on the loop, plain ones in threads."""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import os
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from holders import Holders

from flowyml import LocalExecutor, Pipeline, StepStatus, step
from flowyml._executors._local import ThreadExecutor
from flowyml.errors import ConfigError, StepTimeoutError

_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("_VAR", default="unset")


class TestLocalExecutor:
    def test_async_steps_on_the_loop_plain_ones_in_threads(self) -> None:
        main = threading.get_ident()

        @step(outputs=["where_async"])
        async def on_loop() -> int:
            await asyncio.sleep(0)
            return threading.get_ident()

        @step(outputs=["where_sync"])
        def in_thread() -> int:
            return threading.get_ident()

        p = Pipeline("p", enable_cache=False, lineage=False).add_step(on_loop).add_step(in_thread)
        result = p.run(executor=LocalExecutor(max_threads=2))
        assert result["where_async"] == main and result["where_sync"] != main

    def test_timeouts_are_enforced(self) -> None:
        @step(timeout=0.05)
        async def slow() -> None:
            await asyncio.sleep(5)

        result = Pipeline("p", enable_cache=False, lineage=False).add_step(slow).run(executor=LocalExecutor())
        res = result.step_results["slow"]
        assert res.status is StepStatus.TIMED_OUT and isinstance(res.error, StepTimeoutError)


def _others() -> set[threading.Thread]:
    return set(threading.enumerate())


async def _left(expected: set[threading.Thread]) -> None:
    """Wait until the threads alive are among ``expected`` (idle workers leaving); fail after 10 s."""
    async with asyncio.timeout(10):
        while not _others() <= expected:
            await asyncio.sleep(0.01)


class TestThreadExecutor:
    """The thread pool under plain steps: real threads, each guarantee on its own."""

    def test_bound_holds_over_a_thousand_steps(self) -> None:
        holders = Holders()
        idents: set[int] = set()

        def make(i: int) -> Any:
            @step(name=f"s{i}", outputs=[f"r{i}"])
            def s() -> int:
                holders.enter()
                try:
                    idents.add(threading.get_ident())
                    time.sleep(0.0002)
                finally:
                    holders.leave()
                return i

            return s

        p = Pipeline("bounded", enable_cache=False, lineage=False, max_threads=4)
        for i in range(1000):
            p.add_step(make(i))
        result = p.run()
        assert result.success, result.summary()
        assert [result[f"r{i}"] for i in range(1000)] == list(range(1000))
        assert 1 <= holders.most <= 4
        assert 1 <= len(idents) <= 4

    async def test_a_timeout_abandons_the_thread_frees_its_slot_and_logs_the_late_result(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        release = threading.Event()
        executor = ThreadExecutor(1)

        def stuck() -> str:
            release.wait(10)
            return "late"

        try:
            with pytest.raises(
                StepTimeoutError, match=r"'stuck' timed out after 0\.05s in the thread executor"
            ):
                await executor.run(stuck, (), {}, timeout=0.05, step_name="stuck")
            assert executor.abandoned == 1
            # Its one slot went to the next call, which runs while the first thread is still stuck.
            assert await executor.run(lambda: "next", (), {}, timeout=5, step_name="next") == "next"
            assert not release.is_set()
            with caplog.at_level(logging.WARNING, logger="flowyml.executor"):
                release.set()
                for _ in range(200):
                    if "finished after it was abandoned" in caplog.text:
                        break
                    await asyncio.sleep(0.01)
            assert "'stuck' finished after it was abandoned; its result was discarded" in caplog.text
        finally:
            release.set()
            await executor.aclose()
        assert executor.abandoned == 1

    def test_a_timed_out_step_in_a_run(self) -> None:
        release = threading.Event()

        @step(timeout=0.05)
        def stuck() -> None:
            release.wait(10)

        @step(outputs=["after"])
        def other() -> str:
            return "ran"

        p = Pipeline("p", enable_cache=False, lineage=False, max_threads=1).add_step(stuck).add_step(other)
        try:
            result = p.run(fail_fast=False)
        finally:
            release.set()
        assert result.step_results["stuck"].status is StepStatus.TIMED_OUT
        assert result["after"] == "ran"

    async def test_cancelling_stops_waiting_and_never_starts_a_queued_call(self) -> None:
        release = threading.Event()
        started: list[str] = []
        executor = ThreadExecutor(1)

        def body(name: str) -> None:
            started.append(name)
            release.wait(10)

        first = asyncio.ensure_future(executor.run(body, ("first",), {}, timeout=None, step_name="first"))
        second = asyncio.ensure_future(executor.run(body, ("second",), {}, timeout=None, step_name="second"))
        try:
            while not started:
                await asyncio.sleep(0.005)
            second.cancel()  # queued behind the one thread
            with pytest.raises(asyncio.CancelledError):
                await second
            assert executor.abandoned == 0  # it held no thread
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            assert executor.abandoned == 1
            # A new thread takes the next call; the cancelled one ahead of it in the queue is skipped.
            assert await executor.run(lambda: "third", (), {}, timeout=5, step_name="third") == "third"
        finally:
            release.set()
            await executor.aclose()
        assert started == ["first"]

    async def test_a_thread_whose_call_was_abandoned_retires_after_it(self) -> None:
        """Its place went to a new thread: back from the late call, it takes no other one."""
        executor = ThreadExecutor(1)
        release_a, release_b = threading.Event(), threading.Event()
        holders = Holders()

        def held(until: threading.Event | None) -> None:
            holders.enter()
            try:
                if until is not None:
                    until.wait(10)
            finally:
                holders.leave()

        try:
            with pytest.raises(StepTimeoutError):
                await executor.run(release_a.wait, (10,), {}, timeout=0.05, step_name="a")
            b = asyncio.ensure_future(executor.run(held, (release_b,), {}, timeout=None, step_name="b"))
            while holders.now == 0:
                await asyncio.sleep(0.005)
            release_a.set()
            await asyncio.sleep(0.05)  # a's thread is back from its call
            c = asyncio.ensure_future(executor.run(held, (None,), {}, timeout=None, step_name="c"))
            await asyncio.sleep(0.05)
            assert not c.done()  # b holds the one slot
            release_b.set()
            await asyncio.gather(b, c)
            assert holders.most == 1
        finally:
            release_a.set()
            release_b.set()
            await executor.aclose()

    async def test_the_call_sees_the_awaiting_tasks_context_and_keeps_its_own_changes(self) -> None:
        executor = ThreadExecutor(2)

        def read_and_set() -> str:
            seen = _VAR.get()
            _VAR.set("set in the thread")
            return seen

        _VAR.set("from the task")
        try:
            assert await executor.run(read_and_set, (), {}, timeout=None, step_name="s") == "from the task"
            assert _VAR.get() == "from the task"
        finally:
            await executor.aclose()

    def test_a_step_error_keeps_its_type_and_traceback(self) -> None:
        @step
        def broken() -> None:
            raise ValueError("bad row 3")

        @step
        def stops() -> None:
            raise StopIteration

        p = Pipeline("p", enable_cache=False, lineage=False).add_step(broken).add_step(stops)
        result = p.run(fail_fast=False)
        res = result.step_results["broken"]
        assert isinstance(res.error, ValueError) and str(res.error) == "bad row 3"
        assert res.traceback is not None and "in broken" in res.traceback
        assert isinstance(result.step_results["stops"].error, RuntimeError)

    def test_threads_are_named_kept_warm_between_runs_and_stopped_by_run(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The runs of one loop share warm workers, stopped when the loop shuts down, and at once
        by ``run()``, which owns its loop."""
        monkeypatch.setattr(ThreadExecutor, "IDLE_SECONDS", 0.3)
        used: set[threading.Thread] = set()

        def make(i: int) -> Any:
            @step(name=f"s{i}")
            def s() -> None:
                used.add(threading.current_thread())
                time.sleep(0.01)

            return s

        p = Pipeline("p", enable_cache=False, lineage=False, max_threads=3)
        for i in range(6):
            p.add_step(make(i))

        async def main() -> None:
            for _ in range(2):
                assert (await p.arun()).success

        before = _others()
        asyncio.run(main())
        assert 1 <= len(used) <= 3  # the second run found the first run's threads
        assert all(t.name.startswith("flowyml-thread_") for t in used)
        assert _others() <= before  # the loop's shutdown stopped them
        used.clear()
        for _ in range(2):
            assert p.run().success
            assert _others() <= before  # not after an idle wait: when run() ends
        assert used

    async def test_concurrent_runs_share_the_workers_until_the_last_ends(self) -> None:
        started, go_on = threading.Event(), threading.Event()
        calls = itertools.count()

        @step(outputs=["n"])
        def s() -> int:
            n = next(calls)
            if n == 0:
                started.set()
                go_on.wait(10)
            return n

        p = Pipeline("p", enable_cache=False, lineage=False)
        p.add_step(s)
        before = _others()
        first = asyncio.ensure_future(p.arun())
        try:
            while not started.is_set():
                await asyncio.sleep(0.005)
            async with asyncio.timeout(5):  # ending must not wait for the first run's thread
                assert (await p.arun())["n"] == 1
            assert not first.done()
        finally:
            go_on.set()
        assert (await first)["n"] == 0
        assert all(t.name.startswith("flowyml-thread_") for t in _others() - before)  # idle, warm

    def test_several_loops_at_once_each_with_its_own_threads(self) -> None:
        holders = Holders()

        def make(i: int) -> Any:
            @step(name=f"s{i}")
            def s() -> None:
                holders.enter()
                time.sleep(0.005)
                holders.leave()

            return s

        p = Pipeline("shared", enable_cache=False, lineage=False, max_threads=2)
        for i in range(20):
            p.add_step(make(i))
        executor = LocalExecutor(max_threads=2)
        before = _others()
        outcomes: list[bool] = []

        def in_its_own_loop(given: LocalExecutor | None) -> None:
            outcomes.append(p.run(executor=given).success)

        threads = [
            threading.Thread(target=in_its_own_loop, args=(g,)) for g in (None, None, executor, executor)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert outcomes == [True] * 4
        assert holders.most <= 8  # two per loop
        assert _others() <= before

    async def test_a_pool_used_without_a_run_stops_when_idle(self) -> None:
        class Brief(ThreadExecutor):
            IDLE_SECONDS = 0.05

        executor = Brief(2)
        before = _others()
        assert await executor.run(threading.current_thread, (), {}, timeout=None, step_name="s") not in before
        for _ in range(200):
            if _others() <= before:
                break
            await asyncio.sleep(0.01)
        assert _others() <= before
        assert await executor.run(lambda: 2, (), {}, timeout=None, step_name="again") == 2  # starts anew
        await executor.aclose()
        assert _others() <= before

    @pytest.mark.parametrize("bad", [0, -1, 2.5, True])
    def test_a_bound_below_one_thread_is_refused(self, bad: Any) -> None:
        with pytest.raises(ConfigError, match=r"max_threads=.*1 or more"):
            LocalExecutor(max_threads=bad)


class TestThreadExecutorRaces:
    """Abandonment, wake-ups, idling and closing meeting each other; each ordering forced with events."""

    def test_a_late_result_after_the_run_ended_is_still_logged(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """``run()`` closes its loop while the timed-out call still runs: the warning must not need it."""
        release = threading.Event()
        ran_in: list[threading.Thread] = []

        @step(timeout=0.05)
        def stuck() -> None:
            ran_in.append(threading.current_thread())
            release.wait(10)

        p = Pipeline("p", enable_cache=False, lineage=False, max_threads=1).add_step(stuck)
        with caplog.at_level(logging.WARNING, logger="flowyml.executor"):
            try:
                result = p.run()
            finally:
                release.set()
            ran_in[0].join(10)
        assert result.step_results["stuck"].status is StepStatus.TIMED_OUT
        assert "'stuck' finished after it was abandoned; its result was discarded" in caplog.text

    @pytest.mark.parametrize("how", ["timeout", "cancel"])
    async def test_calls_abandoned_together_start_no_thread_for_the_queued_ones(self, how: str) -> None:
        """Two threads run, 30 calls wait; all are given up at once (a run failing, timers due together).

        The replacement for an abandoned running call must not start a queued call that is being
        abandoned in the same breath: that started one stuck thread per queued call.
        """
        gate = threading.Event()
        started: list[int] = []
        both = threading.Barrier(3)

        def body(i: int) -> None:
            started.append(i)
            if len(started) <= 2:
                both.wait(10)
            gate.wait(10)

        executor = ThreadExecutor(2)
        before = _others()
        timeout = 0.05 if how == "timeout" else None
        tasks = [
            asyncio.ensure_future(executor.run(body, (i,), {}, timeout=timeout, step_name=f"s{i}"))
            for i in range(32)
        ]
        try:
            await asyncio.sleep(0)  # every task has submitted its call
            both.wait(10)  # on the loop's thread: the two are running
            if how == "timeout":
                time.sleep(0.1)  # still on it: every timer is due when the loop next looks
            else:
                for t in tasks:
                    t.cancel()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            wanted = StepTimeoutError if how == "timeout" else asyncio.CancelledError
            assert all(isinstance(o, wanted) for o in outcomes)
            assert len(started) == 2 and executor.abandoned == 2
            assert len(_others() - before) == 2  # the two stuck ones, no thread per queued call
        finally:
            gate.set()
            await executor.aclose()

    async def test_closing_returns_once_the_running_call_is_abandoned(self) -> None:
        """``aclose()`` waits for running calls, but not for one given up while it waits."""
        gate, started = threading.Event(), threading.Event()

        def body() -> None:
            started.set()
            gate.wait(10)

        executor = ThreadExecutor(1)
        call = asyncio.ensure_future(executor.run(body, (), {}, timeout=None, step_name="s"))
        try:
            while not started.is_set():
                await asyncio.sleep(0.005)
            closing = asyncio.ensure_future(executor.aclose())
            await asyncio.sleep(0)
            assert not closing.done()  # the call runs, nobody gave it up
            call.cancel()
            await asyncio.wait_for(closing, 5)  # a guard against a hang; it ends at once
            assert not gate.is_set() and executor.abandoned == 1
        finally:
            gate.set()

    async def test_closing_lets_running_and_queued_calls_finish_and_hands_them_back(self) -> None:
        gate = threading.Event()
        executor = ThreadExecutor(1)
        before = _others()
        calls = [
            asyncio.ensure_future(executor.run(gate.wait, (10,), {}, timeout=None, step_name=f"s{i}"))
            for i in range(3)
        ]
        await asyncio.sleep(0)
        closing = asyncio.ensure_future(executor.aclose())
        await asyncio.sleep(0)
        assert not closing.done()
        gate.set()
        await closing
        assert [c.result() for c in calls] == [True] * 3
        assert _others() <= before

    async def test_every_call_finishing_at_once_is_handed_back(self) -> None:
        """Eight calls end together, over and over: one wake for many, none left behind."""
        executor = ThreadExecutor(8)
        together = threading.Barrier(8)
        try:
            for round_ in range(50):
                calls = [
                    executor.run(lambda i=i: (together.wait(10), i)[1], (), {}, timeout=None, step_name="s")
                    for i in range(8)
                ]
                assert await asyncio.wait_for(asyncio.gather(*calls), 10) == list(range(8)), round_
        finally:
            await executor.aclose()

    async def test_a_call_submitted_as_an_idle_worker_leaves_still_runs(self) -> None:
        """With no idle time at all every worker leaves after each call, racing the next submit."""

        class Restless(ThreadExecutor):
            IDLE_SECONDS = 0.0

        executor = Restless(2)
        before = _others()
        try:
            for i in range(200):
                assert (
                    await asyncio.wait_for(executor.run(int, (i,), {}, timeout=None, step_name="s"), 10) == i
                )
            burst = [executor.run(int, (i,), {}, timeout=None, step_name="s") for i in range(50)]
            assert await asyncio.wait_for(asyncio.gather(*burst), 10) == list(range(50))
        finally:
            await executor.aclose()
        assert _others() <= before

    async def test_abandoned_running_calls_do_not_count_against_the_bound_and_others_do(self) -> None:
        """max_threads=2: one call stuck and timed out, the next two run, a fourth waits for a slot."""
        stuck, gate = threading.Event(), threading.Event()
        holders = Holders()
        running = threading.Semaphore(0)

        def held() -> None:
            holders.enter()
            running.release()
            try:
                gate.wait(10)
            finally:
                holders.leave()

        executor = ThreadExecutor(2)
        before = _others()
        try:
            first = asyncio.ensure_future(executor.run(stuck.wait, (10,), {}, timeout=None, step_name="a"))
            await asyncio.sleep(0)
            others = [
                asyncio.ensure_future(executor.run(held, (), {}, timeout=None, step_name=f"b{i}"))
                for i in range(3)
            ]
            await asyncio.sleep(0)  # all three submitted
            assert running.acquire(timeout=10)  # b0 has the second thread
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            await asyncio.sleep(0)  # the replacement for a's thread starts
            assert running.acquire(timeout=10)  # b1 runs on it
            assert len(_others() - before) == 3  # a's (still running), b0's, b1's: b2 has none
            assert holders.now == 2
            gate.set()
            await asyncio.gather(*others)
            assert holders.most == 2
        finally:
            stuck.set()
            gate.set()
            await executor.aclose()


class TestThreadExecutorLifecycle:
    """What is left after a run ends badly, a loop closes holding a pool, or the process forks."""

    @pytest.mark.parametrize("raised", ["KeyboardInterrupt", "SystemExit"])
    def test_keyboardinterrupt_or_systemexit_raised_in_a_step_reaches_the_caller(self, raised: str) -> None:
        """As under anyio: not a step failure but the run's end (asyncio lets them out of the loop).

        No hang and no thread left (anyio's worker could keep the process from exiting). In a
        process of its own: the exception crosses asyncio's internals on its way out.
        """
        script = f"""
import threading
from flowyml import Pipeline, step

@step
def quits() -> None:
    raise {raised}()

try:
    Pipeline("p", enable_cache=False, lineage=False).add_step(quits).run()
except BaseException as exc:
    print(type(exc).__name__, [t.name for t in threading.enumerate()])
"""
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stdout.strip()) == (0, f"{raised} ['MainThread']")

    async def test_no_thread_is_left_after_a_failed_or_cancelled_run_but_the_stuck_one(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Once idle, the workers of an ``arun()`` loop leave; a cancelled call's thread stays in it."""
        monkeypatch.setattr(ThreadExecutor, "IDLE_SECONDS", 0.05)
        gate, started = threading.Event(), threading.Event()
        ran_in: list[threading.Thread] = []

        @step
        def blocks() -> None:
            ran_in.append(threading.current_thread())
            started.set()
            gate.wait(10)

        @step
        def fails() -> None:
            raise ValueError("no")

        before = _others()
        failed = Pipeline("f", enable_cache=False, lineage=False, max_threads=2).add_step(fails)
        assert not (await failed.arun()).success
        await _left(before)
        run = asyncio.ensure_future(Pipeline("c", enable_cache=False, lineage=False).add_step(blocks).arun())
        try:
            while not started.is_set():
                await asyncio.sleep(0.005)
            run.cancel()
            with pytest.raises(asyncio.CancelledError):
                await run
            await _left(before | {ran_in[0]})  # the abandoned call's thread, still in it
            assert ran_in[0].is_alive()
        finally:
            gate.set()
        ran_in[0].join(10)
        assert _others() <= before

    def test_a_loop_closed_while_a_pool_is_held_exits_the_process_cleanly(self) -> None:
        """Daemon workers, one still in a call, when asyncio.run ends without release: no noise at exit."""
        script = """
import asyncio, logging, threading
from flowyml._executors._local import ThreadExecutor

logging.basicConfig(format="%(message)s")

class Brief(ThreadExecutor):
    IDLE_SECONDS = 0.01

gate, started = threading.Event(), threading.Event()
kept, brief = ThreadExecutor(2), Brief(2)
kept_threads = set()

def late():
    started.set()
    gate.wait(10)

async def main():
    for ex in (kept, brief):
        ex.hold()
    kept_threads.add(await kept.run(threading.current_thread, (), {}, timeout=None, step_name="s"))
    asyncio.ensure_future(brief.run(late, (), {}, timeout=None, step_name="late"))
    while not started.is_set():
        await asyncio.sleep(0.001)

asyncio.run(main())  # cancels "late": abandoned, its thread still in the call
gate.set()  # it ends after its loop closed, and leaves
for t in threading.enumerate():
    if t is not threading.current_thread() and t not in kept_threads:
        t.join(10)
print("ok")  # kept's worker is still waiting for work as the interpreter exits
"""
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        late = "thread step 'late' finished after it was abandoned; its result was discarded\n"
        assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "ok", late)

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
    @pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
    def test_a_process_forked_while_the_pool_runs_can_run_steps_on_the_same_executor(self) -> None:
        """The engine forks nothing itself (process steps go through forkserver); user code may.

        A child forked by a step while another step holds a thread of the same executor gets a
        pool of its own for its own loop: it never waits on the parent's workers, which it lacks.
        """
        executor = LocalExecutor(max_threads=2)
        busy, forked = threading.Event(), threading.Event()

        @step(outputs=["x"])
        def inner() -> int:
            return 7

        child_pipeline = Pipeline("child", enable_cache=False, lineage=False).add_step(inner)

        @step
        def holds_a_thread() -> None:
            busy.set()
            forked.wait(10)

        @step(outputs=["code"])
        def forks() -> int:
            busy.wait(10)
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    code = 0 if child_pipeline.run(executor=executor)["x"] == 7 else 2
                finally:
                    os._exit(code)  # the child never returns into the parent's run
            forked.set()
            for _ in range(3000):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    return os.waitstatus_to_exitcode(status)
                time.sleep(0.01)
            os.kill(pid, 9)
            return -1

        p = Pipeline("parent", enable_cache=False, lineage=False).add_step(holds_a_thread).add_step(forks)
        assert p.run(executor=executor)["code"] == 0
