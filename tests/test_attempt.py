"""How retries, timeouts, circuit breakers and conditions compose around one step in a run."""

from __future__ import annotations

import asyncio

from flowyml import CircuitBreaker, Pipeline, StepStatus, context, retry, step, when
from flowyml.errors import CircuitOpenError, StepTimeoutError


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
