"""Execution groups: a chain of plain-function steps run back to back in one worker.

Steps sharing an ``execution_group`` that form a chain — each one's inputs come from the steps
before it in the chain (the first may read anything) — are sent to their executor as one call.
Inside the worker (one thread, or one process) each step's outputs are handed to the next in
memory, never through the event loop or the pickler; what comes back is every step's own
outcome, so each is still recorded, cached and reported on its own.

What changes inside a group, and why:

- a step with a ``timeout`` is never grouped (the plan leaves it out of chains): its limit could
  not be enforced on its own in a worker shared with the other members;
- retries happen inside the worker through :class:`~flowyml._retry.RetryRun`, with the same
  policy, clock and back-off as anywhere else (a blocking sleep there), and a failure carries
  ``.attempts``;
- the cache is consulted for the first member only; if it hits, the others run one by one as
  ordinary steps, each with its own cache look-up.

Async steps are never grouped: they already run back to back on the loop without a hop.
"""

from __future__ import annotations

import inspect
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ._conditions import conditions_hold
from ._errors import InputTypeError, StepError
from ._results import StepStatus, split_outputs
from ._retry import RetryConfig, RetryRun
from ._typed import produce, receive
from ._types import Typing

__all__ = ("Member", "Outcome", "coroutine_returned", "run_chain")

# An argument: ("v", value) known before the chain starts, or ("s", slot) made inside it.
Arg = tuple[str, Any]


@dataclass(frozen=True, slots=True)
class Member:
    """What the worker needs to run one step of a chain."""

    name: str
    body: Callable[..., Any]
    positional: tuple[Arg, ...]
    keyword: tuple[tuple[str, Arg], ...]
    output_names: tuple[str, ...]
    output_slots: tuple[int, ...]
    conditions: tuple[tuple[Callable[..., Any], bool], ...]
    retry: RetryConfig | None
    typing: Typing | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """One member's fate, sent back from the worker."""

    status: StepStatus
    outputs: dict[str, Any]
    error: BaseException | None = None
    traceback: str | None = None
    attempts: int = 0
    start_time: float | None = None
    duration_seconds: float = 0.0
    skip_reason: str | None = None


def run_chain(members: Sequence[Member]) -> list[Outcome]:
    """Run the members in order in this worker; stop at the first that does not succeed."""
    local: dict[int, Any] = {}
    outcomes: list[Outcome] = []
    for m in members:
        if outcomes and outcomes[-1].status is not StepStatus.SUCCEEDED:
            outcomes.append(
                Outcome(
                    StepStatus.SKIPPED,
                    {},
                    skip_reason=f"upstream step {members[len(outcomes) - 1].name!r} did not produce its outputs",
                )
            )
            continue
        args = [local[x] if kind == "s" else x for kind, x in m.positional]
        kwargs = {k: (local[x] if kind == "s" else x) for k, (kind, x) in m.keyword}
        parents: list[Any] = []
        if m.typing is not None:
            try:
                args, kwargs, parents = receive(m.name, m.typing, args, kwargs)
            except InputTypeError as exc:
                tb = "".join(traceback.format_exception(exc))
                outcomes.append(Outcome(StepStatus.FAILED, {}, error=exc, traceback=tb))
                continue
        if m.conditions and not conditions_hold(m.conditions, args, kwargs):
            outcomes.append(Outcome(StepStatus.SKIPPED, {}, skip_reason="its condition was false"))
            continue
        outcomes.append(_attempts(m, args, kwargs, local, parents))
    return outcomes


def _attempts(
    m: Member, args: list[Any], kwargs: dict[str, Any], local: dict[int, Any], parents: list[Any]
) -> Outcome:
    start = time.time()
    t0 = time.perf_counter()
    retry = RetryRun(m.retry) if m.retry is not None else None

    def attempt() -> dict[str, Any]:
        ret = m.body(*args, **kwargs)
        if inspect.iscoroutine(ret):
            raise coroutine_returned(m.name, ret)
        if m.typing is not None and m.typing.wraps:
            ret = produce(m.name, m.output_names, m.typing, ret, parents)
        return split_outputs(m.name, m.output_names, ret)

    try:
        outputs = attempt() if retry is None else retry.call(attempt, (), {})
    except Exception as exc:
        return Outcome(
            StepStatus.FAILED,
            {},
            error=exc,
            traceback="".join(traceback.format_exception(exc)),
            attempts=1 if retry is None else retry.attempt,
            start_time=start,
            duration_seconds=time.perf_counter() - t0,
        )
    for slot, name in zip(m.output_slots, m.output_names, strict=True):
        local[slot] = outputs[name]
    return Outcome(
        StepStatus.SUCCEEDED,
        outputs,
        attempts=1 if retry is None else retry.attempt,
        start_time=start,
        duration_seconds=time.perf_counter() - t0,
    )


def coroutine_returned(step_name: str, value: Any) -> StepError:
    """The error for a plain function that returned a coroutine: it was never awaited."""
    close = getattr(value, "close", None)
    if close is not None:
        close()  # no "never awaited" warning on top of the error
    return StepError(
        f"step {step_name!r} is a plain function that returned a coroutine, which flowyml will not "
        "await; declare it with `async def` so it runs on the event loop",
        step_name=step_name,
    )
