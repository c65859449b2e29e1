"""What a run reports while it runs: typed events for listeners, streams and progress displays.

Pass a listener to :meth:`Pipeline.run` / :meth:`Pipeline.arun` (``on_event=fn``), or iterate
:meth:`Pipeline.stream`. Every event is a frozen value carrying the run's ``run_id``, the
pipeline's name and ``time``, a :func:`time.monotonic` reading taken when it happened; step
events also carry ``step``. In one run, the order is:

- :class:`RunStarted` first;
- per step: :class:`StepStarted` when it begins (a cache look-up counts as beginning; a step
  skipped by a condition or an upstream failure never begins), :class:`StepRetrying` after each
  failed attempt that will be retried, and exactly one :class:`StepFinished`, skipped and cached
  steps included;
- :class:`ItemsProgress` for steps that map over items, as items complete;
- :class:`RunFinished` last, always.

A plain-function listener is called on the event loop and must be quick. A coroutine-function
listener is awaited in order in one background task and never delays a step; when it falls
behind, events wait in a bounded queue, and beyond the bound they are coalesced (a step's
start is dropped when its finish arrives, an item count replaced by a newer one) or dropped:
:attr:`RunFinished.dropped` says how many it lost. A listener that raises is logged once on
the ``flowyml.events`` logger and detached; the run goes on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

from ._results import StepStatus

if TYPE_CHECKING:
    from ._report import PipelineResult
    from ._results import StepResult

__all__ = (
    "Event",
    "ItemsProgress",
    "Listener",
    "RunFinished",
    "RunStarted",
    "StepFinished",
    "StepRetrying",
    "StepStarted",
)


@dataclass(frozen=True, slots=True)
class RunStarted:
    """The run has begun: its plan is valid and its steps are about to start."""

    run_id: str
    pipeline: str
    time: float
    steps: int
    """How many steps the run will report a :class:`StepFinished` for, at most."""


@dataclass(frozen=True, slots=True)
class StepStarted:
    """A step began: its cache look-up or its first attempt is starting."""

    run_id: str
    pipeline: str
    time: float
    step: str


@dataclass(frozen=True, slots=True)
class StepRetrying:
    """Attempt number ``attempt`` of ``step`` failed with ``error``; the next starts in ``delay`` s."""

    run_id: str
    pipeline: str
    time: float
    step: str
    attempt: int
    delay: float
    error: BaseException


@dataclass(frozen=True, slots=True)
class StepFinished:
    """A step's fate is decided: ``result`` is its final :class:`~flowyml.StepResult`.

    ``status``, ``duration`` (the step's own seconds, 0 for one that never began), ``cached``,
    ``attempts`` (calls of its body, 0 when cached or skipped) and ``error`` read the result;
    ``cache_reason`` says why the cache was or was not used (the result's ``cache_reason``:
    ``"cache hit"``, ``"first run of this step"``, what changed, or why it ran uncached).
    """

    run_id: str
    pipeline: str
    time: float
    step: str
    result: StepResult
    cache_reason: str | None = None

    @property
    def status(self) -> StepStatus:
        return self.result.status

    @property
    def duration(self) -> float:
        return self.result.duration_seconds

    @property
    def cached(self) -> bool:
        """True when the outputs came from the cache."""
        return self.result.status is StepStatus.CACHED

    @property
    def attempts(self) -> int:
        return self.result.attempts

    @property
    def error(self) -> BaseException | None:
        """What the step raised, for a failed or timed-out step."""
        return self.result.error


@dataclass(frozen=True, slots=True)
class ItemsProgress:
    """A mapped step has ``done`` of ``total`` items settled, ``failed`` of them failing.

    ``total`` is None while a streamed source's length is not known yet.
    """

    run_id: str
    pipeline: str
    time: float
    step: str
    done: int
    failed: int
    total: int | None


@dataclass(frozen=True, slots=True)
class RunFinished:
    """The run is over; always the last event. ``dropped`` counts events a slow listener lost."""

    run_id: str
    pipeline: str
    time: float
    result: PipelineResult
    dropped: int = 0


Event: TypeAlias = RunStarted | StepStarted | StepRetrying | StepFinished | ItemsProgress | RunFinished
"""Any event of a run."""

Listener: TypeAlias = Callable[[Event], None] | Callable[[Event], Awaitable[None]]
"""What ``on_event=`` accepts: a plain function called on the loop, or a coroutine function."""
