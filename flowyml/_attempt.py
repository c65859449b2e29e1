"""One step's attempts: retry with backoff around a timed call on the step's executor.

The order of layers is fixed: the scheduler checks conditions and the cache first; here each
attempt gets its own timeout, a failure is retried as the step's policy allows, and a timed-out
attempt counts as a failure for any circuit breaker wrapped around the step's function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from ._errors import StepTimeoutError
from ._executors._base import Executor
from ._fallback import watch_fallbacks
from ._graph import Node
from ._otel import Tracing
from ._results import StepResult
from ._retry import RetryRun, _asleep

__all__ = ("run_attempts",)


async def run_attempts(
    node: Node,
    executor: Executor,
    args: list[Any],
    kwargs: dict[str, Any],
    res: StepResult,
    *,
    keep_remote: bool = False,
    on_retry: Callable[[str, int, float, BaseException], None] | None = None,
    tracing: Tracing | None = None,
) -> Any:
    """Call the step's body until it succeeds or its retry policy gives up; record attempts on ``res``.

    ``on_retry(step, attempt, delay, error)`` hears of each failed attempt that will be retried;
    with ``tracing``, each attempt is a span that is current wherever the body runs.
    """
    step = node.step
    retry = RetryRun(step.retry) if step.retry is not None else None
    extra = {"keep_remote": True} if keep_remote else {}
    body = step.body
    if step.uses_fallback:
        body = watch_fallbacks(body)
    while True:
        res.attempts = retry.attempt if retry is not None else 1
        try:
            if tracing is None:
                ret = await executor.run(
                    body, tuple(args), kwargs, timeout=step.timeout, step_name=node.name, **extra
                )
            else:
                carry = not executor.shares_context and not step.is_async
                with tracing.attempt(node.name, res.attempts, executor.name, body, carry=carry) as fn:
                    ret = await executor.run(
                        fn, tuple(args), kwargs, timeout=step.timeout, step_name=node.name, **extra
                    )
            if step.uses_fallback:
                ret, used = ret
                res.fallback_reasons = tuple(used)
            return ret
        except Exception as exc:
            if isinstance(exc, StepTimeoutError):
                for breaker in _breakers(step.body):
                    breaker.record_failure(exc)
            delay = retry.failed(exc) if retry is not None else None
            if delay is None:
                raise
            if on_retry is not None:
                on_retry(node.name, res.attempts, delay, exc)
            await _asleep(delay)


def _breakers(func: Callable[..., Any]) -> Iterator[Any]:
    while func is not None:
        breaker = getattr(func, "__flowyml_breaker__", None)
        if breaker is not None:
            yield breaker
        func = getattr(func, "__wrapped__", None)  # type: ignore[assignment]
