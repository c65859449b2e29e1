"""The ``flowyml`` loggers and what a run writes to them.

The library installs no handler but a :class:`logging.NullHandler` on ``flowyml``: where records
go is the application's choice. Children per concern:

- ``flowyml.run``       INFO run start and a one-line summary; INFO each retry; WARNING each
                        failed or timed-out step with its error; DEBUG each step start and finish.
- ``flowyml.events``    ERROR a listener that raised and was detached.
- ``flowyml.executor``  WARNING a thread that finished after its step was abandoned.
- ``flowyml.store``     reserved for the cache and lineage store, which reports its problems
                        as warnings (``UncachedStepWarning``) today.

Every record about a run carries ``run_id`` and ``step`` (None for run-level records) as
``extra`` fields, so a handler or formatter can filter or show them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from ._results import StepStatus

if TYPE_CHECKING:
    from ._otel import Tracing
    from ._results import StepResult

__all__ = ("Watcher", "run_finished", "run_log", "run_started", "step_failed", "step_retrying")

logging.getLogger("flowyml").addHandler(logging.NullHandler())
run_log = logging.getLogger("flowyml.run")


class Watcher(Protocol):
    """What the runner tells whoever watches the run (:class:`flowyml._watch.Watch`), if anyone."""

    tracing: Tracing | None

    def started(self, step: str) -> None: ...

    def finished(self, res: StepResult, cache_reason: str | None = None) -> None: ...

    def retrying(self, step: str, attempt: int, delay: float, error: BaseException) -> None: ...

    def items(self, step: str, done: int, failed: int, total: int | None) -> None: ...


def run_started(run_id: str, pipeline: str, steps: int) -> None:
    if run_log.isEnabledFor(logging.INFO):
        run_log.info(
            "run %s of %r started: %d steps", run_id, pipeline, steps, extra={"run_id": run_id, "step": None}
        )


def run_finished(run_id: str, summary: Callable[[], str]) -> None:
    """INFO the run's one-line summary, made by ``summary()`` only when the record is wanted."""
    if run_log.isEnabledFor(logging.INFO):
        run_log.info("%s", summary(), extra={"run_id": run_id, "step": None})


def step_retrying(run_id: str, step: str, attempt: int, delay: float, error: BaseException) -> None:
    if run_log.isEnabledFor(logging.INFO):
        run_log.info(
            "step %r attempt %d failed with %s: %s; retrying in %.3gs",
            step,
            attempt,
            type(error).__name__,
            error,
            delay,
            extra={"run_id": run_id, "step": step},
        )


def step_failed(run_id: str, res: StepResult) -> None:
    """WARNING for a step that failed or timed out; call once, when its fate is decided."""
    if run_log.isEnabledFor(logging.WARNING):
        error = res.error
        what = f"{type(error).__name__}: {error}" if error is not None else "no error recorded"
        attempts = f" after {res.attempts} attempts" if res.attempts > 1 else ""
        run_log.warning(
            "step %r %s%s: %s",
            res.step_name,
            "timed out" if res.status is StepStatus.TIMED_OUT else "failed",
            attempts,
            what,
            extra={"run_id": run_id, "step": res.step_name},
        )
