"""The values the store hands out: frozen records of runs, step runs, cache entries and lineage.

They are plain frozen dataclasses so that the engine, the CLI and users can hold them without
touching the database again, and so that a record read back equals the record written.
"""

from __future__ import annotations

__all__ = (
    "RUN_STATES",
    "STATUSES",
    "STEP_STATES",
    "CacheEntry",
    "CacheStats",
    "CachedOutput",
    "Lineage",
    "LineageNode",
    "RunDetail",
    "RunRecord",
    "StepCacheStats",
    "StepRecord",
    "VerifyProblem",
    "VerifyReport",
)

from dataclasses import dataclass, field

#: Every state a run can have: what ``PipelineResult.state`` says, plus ``running`` while it runs
#: and ``interrupted`` (shown, never written) for a run still ``running`` whose process is gone.
RUN_STATES = frozenset({"running", "completed", "failed", "cancelled", "interrupted"})
#: Every status a step run can have (the values of :class:`flowyml.StepStatus` once it ended).
STEP_STATES = frozenset({"succeeded", "cached", "failed", "timed_out", "cancelled", "skipped"})
#: Every status a run or a step run can have.
STATUSES = RUN_STATES | STEP_STATES


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One pipeline run. Recorded at its start (status ``"running"``) and again at its end.

    ``status`` is one of :data:`RUN_STATES`.
    """

    run_id: str
    pipeline_name: str
    status: str
    started_at: float
    ended_at: float | None = None
    duration_seconds: float | None = None
    time_saved_seconds: float = 0.0
    error_message: str | None = None


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One step of one run: how it ended, and which artifacts it produced and consumed.

    ``outputs`` maps each output name to its artifact hash (``None`` when the value was not
    cached); ``inputs`` maps each parameter filled by another step to ``(producer step, output)``.
    """

    run_id: str
    step_name: str
    status: str
    attempts: int = 0
    started_at: float | None = None
    ended_at: float | None = None
    duration_seconds: float | None = None
    cached: bool = False
    cache_key: str | None = None
    time_saved_seconds: float = 0.0
    error_type: str | None = None
    error_message: str | None = None
    traceback: str | None = None
    outputs: dict[str, str | None] = field(default_factory=dict)
    inputs: dict[str, tuple[str, str]] = field(default_factory=dict)
    cache_reason: str | None = None


@dataclass(frozen=True, slots=True)
class RunDetail:
    """A run together with its step runs, in the order they started."""

    run: RunRecord
    steps: tuple[StepRecord, ...]


@dataclass(frozen=True, slots=True)
class CachedOutput:
    """One output of a cache entry.

    ``inline`` holds the pickled bytes when the store has them in memory (small values stored in
    SQLite, or values whose file is not written yet); ``None`` means "read the artifact file".
    """

    name: str
    artifact_hash: str
    size: int
    type_name: str
    inline: bytes | None = None


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """What the index knows about one cache key: the step, its original duration, its outputs."""

    key: str
    step_name: str
    duration_seconds: float
    created_at: float
    outputs: tuple[CachedOutput, ...]
    run_id: str | None = None


@dataclass(frozen=True, slots=True)
class StepCacheStats:
    """Cache figures of one step name."""

    step_name: str
    entries: int
    bytes: int
    hits: int
    time_saved_seconds: float


@dataclass(frozen=True, slots=True)
class CacheStats:
    """How big the cache is and what it has saved so far."""

    entries: int
    artifacts: int
    inline_bytes: int
    file_bytes: int
    hits: int
    time_saved_seconds: float
    steps: tuple[StepCacheStats, ...]

    @property
    def bytes(self) -> int:
        """Bytes held by the cache, inline and in files."""
        return self.inline_bytes + self.file_bytes


@dataclass(frozen=True, slots=True)
class VerifyProblem:
    """One thing ``verify`` found: ``kind`` is ``"integrity"``, ``"missing"``, ``"hash"``, ``"size"``, ``"row"`` or ``"orphan"``."""

    kind: str
    detail: str
    key: str | None = None
    step_name: str | None = None
    output_name: str | None = None
    artifact_hash: str | None = None
    path: str | None = None


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The result of ``Store.verify``: SQLite's integrity check plus a re-hash of every artifact."""

    integrity: str
    entries_checked: int
    artifacts_checked: int
    problems: tuple[VerifyProblem, ...]

    @property
    def ok(self) -> bool:
        """True when the database and every artifact are intact."""
        return self.integrity == "ok" and not self.problems


@dataclass(frozen=True, slots=True)
class LineageNode:
    """A step run that produced an output, with the producers of what it consumed.

    For a cache hit, ``origin_run_id`` names the run that computed the value in the first place.
    """

    run_id: str
    step_name: str
    status: str
    cached: bool
    output_name: str
    artifact_hash: str | None
    type_name: str | None
    size: int | None
    origin_run_id: str | None
    started_at: float | None
    duration_seconds: float | None
    inputs: tuple[tuple[str, LineageNode], ...] = ()


@dataclass(frozen=True, slots=True)
class Lineage:
    """Where an output of a run came from: ``root`` produced it, its inputs' producers recursively."""

    output_name: str
    run_id: str
    root: LineageNode
