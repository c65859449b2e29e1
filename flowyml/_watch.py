"""Everything that watches one run, behind the few calls the engine makes.

The engine holds a :class:`Watch` only when something watches: a listener, a stream, the
progress display, an OpenTelemetry provider, or ``flowyml.run`` enabled for DEBUG. Otherwise
it holds None and each of its call sites costs a None check. The records that every run
writes whether watched or not (INFO start and summary, INFO retries, WARNING failures) are
made by :mod:`flowyml._log` where those rare things happen, not here.

Engine calls, all on the event loop:

- :meth:`started` when a step begins (its cache look-up or its first attempt);
- :meth:`retrying` after a failed attempt that will be retried;
- :meth:`finished` exactly once per step, when its fate is decided (skipped ones included),
  and :meth:`unannounced` once the scheduler is done, for the fates it decided itself;
- ``tracing.attempt(...)`` around each call of a step's body, when :attr:`tracing` is set.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ._dispatch import Channel, Dispatcher
from ._log import run_log, step_failed
from ._otel import Tracing
from ._results import StepStatus
from .events import ItemsProgress, Listener, RunFinished, RunStarted, StepFinished, StepRetrying, StepStarted

if TYPE_CHECKING:
    from ._progress import Progress
    from ._report import PipelineResult
    from ._results import StepResult

__all__ = ("Watch",)

_BAD = frozenset({StepStatus.FAILED, StepStatus.TIMED_OUT})
_monotonic = time.monotonic
_new = object.__new__


def _setters(cls: type, *names: str) -> tuple[Any, ...]:
    """The slot descriptors' ``__set__`` of a frozen event class, for building one field by field.

    A generated frozen ``__init__`` looks each field up by name through ``object.__setattr__``;
    the descriptors set the same slots in about two thirds of the time, which matters on the
    two events every step emits (see ``W3-noop`` in ``benchmarks/bench_engine.py``).
    """
    return tuple(cls.__dict__[name].__set__ for name in names)


_S_RUN, _S_PIPE, _S_TIME, _S_STEP = _setters(StepStarted, "run_id", "pipeline", "time", "step")
_F_RUN, _F_PIPE, _F_TIME, _F_STEP, _F_RESULT, _F_REASON = _setters(
    StepFinished, "run_id", "pipeline", "time", "step", "result", "cache_reason"
)


class Watch:
    """The listeners, display, traces and DEBUG records of one run."""

    started: Callable[[str], None]
    """A step began (its cache look-up or its first attempt)."""
    finished: Callable[..., None]
    """``finished(res, cache_reason=None)``: a step's fate is decided; exactly once per step."""

    def __init__(
        self,
        *,
        run_id: str,
        pipeline: str,
        listeners: Sequence[Listener] = (),
        channels: Sequence[Channel] = (),
        progress: Progress | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.run_id = run_id
        self.pipeline = pipeline
        self.tracing = tracing
        self.progress = progress
        sinks = [*listeners, *([progress] if progress is not None else [])]
        self._dispatcher = Dispatcher(sinks, channels, run_id=run_id) if sinks or channels else None
        self._emit = self._dispatcher.fast_emit() if self._dispatcher is not None else None
        self._debug = run_log.isEnabledFor(logging.DEBUG)
        self._seen: list[StepResult] = []
        self.started, self.finished = self._announcers()

    async def run_started(self, steps: int) -> None:
        if self._dispatcher is not None:
            self._dispatcher.start()
        if self.progress is not None:
            await self.progress.start()
        if self._emit is not None:
            self._emit(RunStarted(self.run_id, self.pipeline, _monotonic(), steps))

    def _announcers(self) -> tuple[Callable[[str], None], Callable[..., None]]:
        """``started`` and ``finished``, as closures over what they use (the two per-step calls)."""
        emit, run_id, pipeline = self._emit, self.run_id, self.pipeline
        tracing, debug, seen = self.tracing, self._debug, self._seen.append

        def started(step: str) -> None:
            if emit is not None:
                event = _new(StepStarted)
                _S_RUN(event, run_id)
                _S_PIPE(event, pipeline)
                _S_TIME(event, _monotonic())
                _S_STEP(event, step)
                emit(event)
            if debug:
                run_log.debug("step %r started", step, extra={"run_id": run_id, "step": step})

        def finished(res: StepResult, cache_reason: str | None = None) -> None:
            seen(res)
            if emit is not None:
                event = _new(StepFinished)
                _F_RUN(event, run_id)
                _F_PIPE(event, pipeline)
                _F_TIME(event, _monotonic())
                _F_STEP(event, res.step_name)
                _F_RESULT(event, res)
                _F_REASON(event, res.cache_reason if cache_reason is None else cache_reason)
                emit(event)
            if tracing is not None and res.status is StepStatus.CACHED:
                tracing.cached(res)
            if debug:
                run_log.debug(
                    "step %r %s in %.3fs",
                    res.step_name,
                    res.status.value,
                    res.duration_seconds,
                    extra={"run_id": run_id, "step": res.step_name},
                )

        return started, finished

    def unannounced(self, results: Sequence[StepResult | None]) -> None:
        """Announce the fates the scheduler decided itself (steps a stopped run never reached)."""
        if len(self._seen) == sum(r is not None for r in results):
            return
        seen = {id(r) for r in self._seen}
        for res in results:
            if res is not None and id(res) not in seen:
                if res.status in _BAD:
                    step_failed(self.run_id, res)
                self.finished(res)

    def items(self, step: str, done: int, failed: int, total: int | None) -> None:
        """A mapped step's items: ``done`` settled, ``failed`` of them failing, of ``total`` (None: not known yet)."""
        if self._emit is not None:
            self._emit(ItemsProgress(self.run_id, self.pipeline, _monotonic(), step, done, failed, total))

    def retrying(self, step: str, attempt: int, delay: float, error: BaseException) -> None:
        if self._emit is not None:
            self._emit(StepRetrying(self.run_id, self.pipeline, _monotonic(), step, attempt, delay, error))
        if self.tracing is not None:
            self.tracing.retrying(step, attempt, delay, error)

    async def run_finished(self, result: PipelineResult) -> None:
        """Deliver :class:`RunFinished` last, wait for the listeners, end the display and the trace."""
        try:
            if self.tracing is not None:
                self.tracing.finish(result.state)
            if self._dispatcher is not None:
                dropped = self._dispatcher.dropped
                await self._dispatcher.finish(
                    RunFinished(self.run_id, self.pipeline, _monotonic(), result, dropped)
                )
        finally:
            if self.progress is not None:
                await self.progress.stop(result)

    async def run_cancelled(self, result: PipelineResult | None, error: BaseException) -> None:
        """The run ended by cancellation or an engine error: tell the plain listeners, stop the rest."""
        try:
            if self.tracing is not None:
                self.tracing.finish(result.state if result is not None else "cancelled", error)
            if self._dispatcher is not None:
                if result is not None:
                    self._dispatcher.emit(
                        RunFinished(
                            self.run_id, self.pipeline, _monotonic(), result, self._dispatcher.dropped
                        )
                    )
                self._dispatcher.cancel()
        finally:
            if self.progress is not None:
                await self.progress.stop(result)
