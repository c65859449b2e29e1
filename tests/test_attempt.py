"""How retries, timeouts, circuit breakers and conditions compose around one step in a run."""

from __future__ import annotations

import asyncio

import pytest

from flowyml import CircuitBreaker, Pipeline, StepStatus, context, retry, step, when
from flowyml._attempt import UnitRunner
from flowyml._executors._local import AsyncExecutor
from flowyml._state import RunState
from flowyml.errors import CircuitOpenError, OutputError, StepTimeoutError


class TestLiftedRetry:
    def test_retry_decorator_is_run_by_the_engine(self, no_sleep: list[float]) -> None:
        """@step @retry(max_attempts=3): the engine makes the attempts and records them."""
        calls = 0

        @step
        @retry(max_attempts=3, backoff=2.0, jitter=False)
        def flaky() -> str:
            nonlocal calls
            calls += 1
            if calls < 3:
                raise ConnectionError("again")
            return "ok"

        r = Pipeline("p", enable_cache=False).add_step(flaky).run().step_results["flaky"]
        assert r.output == "ok" and r.attempts == 3
        assert no_sleep == [0.1, 0.2]

    def test_retry_and_condition_both_lift(self, no_sleep: list[float]) -> None:
        """@retry over @when: the condition still skips, and retries still happen."""

        @step
        @retry(max_attempts=2)
        @when(lambda n: n > 0)
        def positive(n: int) -> int:
            raise ValueError("boom")

        skipped = Pipeline("p", context=context(n=0), enable_cache=False).add_step(positive).run()
        assert skipped.step_results["positive"].status is StepStatus.SKIPPED
        failed = Pipeline("p", context=context(n=1), enable_cache=False).add_step(positive).run()
        assert failed.step_results["positive"].attempts == 2

    def test_attempts_visible_on_the_error(self, no_sleep: list[float]) -> None:
        """The final error carries how many attempts were made."""

        @step(retry=2)
        def always() -> None:
            raise ConnectionError("down")

        r = Pipeline("p", enable_cache=False).add_step(always).run().step_results["always"]
        assert r.error is not None and getattr(r.error, "attempts", None) == 3


class TestBreakerInRuns:
    def test_open_breaker_fails_fast_without_retrying(self, no_sleep: list[float]) -> None:
        """An open breaker fails the step at once; its retries are not used."""
        breaker = CircuitBreaker(failure_threshold=1, recovery_timeout=60)
        calls = 0

        @step(retry=5)
        @breaker
        def guarded() -> None:
            nonlocal calls
            calls += 1
            raise ConnectionError("down")

        first = Pipeline("p", enable_cache=False).add_step(guarded).run().step_results["guarded"]
        assert calls == 1  # first failure opens it; the retry meets an open breaker
        assert isinstance(first.error, CircuitOpenError)
        assert first.attempts == 2

    def test_timed_out_attempt_counts_as_a_breaker_failure(self) -> None:
        """A timeout is a failure for the breaker around the step's function."""
        breaker = CircuitBreaker(failure_threshold=1, recovery_timeout=60)

        @step(timeout=0.02)
        @breaker
        async def slow() -> None:
            await asyncio.sleep(30)

        r = Pipeline("p", enable_cache=False).add_step(slow).run().step_results["slow"]
        assert isinstance(r.error, StepTimeoutError)
        assert breaker.state == "open"

    def test_one_breaker_protects_many_steps(self) -> None:
        """A breaker shared by steps opens for all of them once it trips."""
        breaker = CircuitBreaker(failure_threshold=2, recovery_timeout=60)

        def make(i: int):  # type: ignore[no-untyped-def]
            @step(name=f"call{i}", outputs=[f"r{i}"])
            @breaker
            def call() -> None:
                raise ConnectionError("down")

            return call

        p = Pipeline("p", enable_cache=False, max_concurrency=1)
        for i in range(5):
            p.add_step(make(i))
        result = p.run(fail_fast=False)
        errors = [type(result.step_results[f"call{i}"].error).__name__ for i in range(5)]
        assert errors.count("ConnectionError") == 2
        assert errors.count("CircuitOpenError") == 3


class TestBareAsyncSteps:
    """An async step with nothing around its call runs as its task's own coroutine, recorded at its end."""

    def test_a_failure_is_a_fate_not_an_abort_of_the_others(self) -> None:
        """Without fail_fast, one failing step among many sleeping ones fails alone, with its traceback."""

        def make(i: int):  # type: ignore[no-untyped-def]
            @step(name=f"s{i}", outputs=[f"r{i}"])
            async def wait() -> int:
                await asyncio.sleep(0.01)
                if i == 7:
                    raise LookupError("seven")
                return i

            return wait

        p = Pipeline("p", enable_cache=False)
        for i in range(20):
            p.add_step(make(i))
        result = p.run(fail_fast=False)
        assert result.failed_steps == ["s7"]
        failed = result.step_results["s7"]
        assert isinstance(failed.error, LookupError)
        assert 'raise LookupError("seven")' in (failed.traceback or "")
        assert [result[f"r{i}"] for i in range(20) if i != 7] == [i for i in range(20) if i != 7]

    def test_a_result_times_the_body_from_its_first_step(self) -> None:
        """Start, end and duration are the body's own, one attempt, not the time it waited for a turn."""

        @step(outputs=["a", "b"])
        async def pair() -> tuple[int, int]:
            await asyncio.sleep(0.02)
            return 1, 2

        result = Pipeline("p", enable_cache=False).add_step(pair).run()
        r = result.step_results["pair"]
        assert (result["a"], result["b"], r.attempts) == (1, 2, 1)
        assert r.start_time is not None and r.end_time is not None
        assert r.end_time == r.start_time + r.duration_seconds
        assert r.duration_seconds >= 0.015

    def test_outputs_that_do_not_match_fail_the_step(self) -> None:
        """The split of the returned value is part of the step: a wrong shape fails it, not the run."""

        @step(outputs=["a", "b"])
        async def three() -> tuple[int, int, int]:
            return 1, 2, 3

        @step(outputs=["c"])
        async def other() -> int:
            await asyncio.sleep(0.01)
            return 3

        result = Pipeline("p", enable_cache=False).add_step(three).add_step(other).run(fail_fast=False)
        assert isinstance(result.step_results["three"].error, OutputError)
        assert result["c"] == 3

    async def test_a_call_awaited_to_its_end_cannot_be_resumed(self) -> None:
        """The runner's call of a bare step, awaited where a chain goes on, gives its fate once."""

        @step(outputs=["a"])
        async def one() -> int:
            return 1

        plan = Pipeline("p", enable_cache=False).add_step(one).plan()
        state = RunState(plan, {})
        runner = UnitRunner(state, [AsyncExecutor()])
        call = runner.node(plan.nodes[0])
        assert await call is True
        assert state.values == [1] and state.results[0].status is StepStatus.SUCCEEDED  # type: ignore[union-attr]
        with pytest.raises(RuntimeError, match="'one' has ended"):
            call.send(None)
        call.close()  # closing an ended call is a no-op, as for a coroutine
