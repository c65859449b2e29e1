"""One step's attempts: retry with backoff around a timed call on the step's executor.

The order of layers is fixed: the scheduler checks conditions and the cache first; here each
attempt gets its own timeout, a failure is retried as the step's policy allows, and a timed-out
attempt counts as a failure for any circuit breaker wrapped around the step's function.
"""

from __future__ import annotations

from typing import Any

from ._errors import StepTimeoutError
from ._executors._base import Executor
from ._fallback import watch_fallbacks
from ._graph import Node
from ._results import StepResult
from ._retry import RetryRun

__all__ = ("run_attempts",)


async def run_attempts(
    node: Node,
    executor: Executor,
    args: list[Any],
    kwargs: dict[str, Any],
    res: StepResult,
    *,
    keep_remote: bool = False,
) -> Any:
    """Call the step's body until it succeeds or its retry policy gives up; record attempts on ``res``."""
    step = node.step
    extra = {"keep_remote": True} if keep_remote else {}
    body = watch_fallbacks(step.body) if step.uses_fallback else step.body
    positional = tuple(args)

    async def attempt() -> Any:
        try:
            return await executor.run(
                body, positional, kwargs, timeout=step.timeout, step_name=node.name, **extra
            )
        except StepTimeoutError as exc:
            for breaker in step.breakers:
                breaker.record_failure(exc)
            raise

    if step.retry is None:
        res.attempts = 1
        ret = await attempt()
    else:
        retry = RetryRun(step.retry)
        try:
            ret = await retry.acall(attempt, (), {})
        finally:
            res.attempts = retry.attempt
    if step.uses_fallback:
        ret, used = ret
        res.fallback_reasons = tuple(used)
    return ret
