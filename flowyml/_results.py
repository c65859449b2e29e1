"""What a step reports: one frozen :class:`StepResult` per step, and its :class:`StepStatus`.

The run's own result, :class:`~flowyml._report.PipelineResult`, lives with what presents it.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from ._errors import OutputError

__all__ = ("ExecutionResult", "StepResult", "StepStatus", "finished", "split_outputs")


class StepStatus(enum.StrEnum):
    """The fate of one step in one run."""

    PENDING = "pending"
    SUCCEEDED = "succeeded"
    CACHED = "cached"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"


_OK = frozenset({StepStatus.SUCCEEDED, StepStatus.CACHED})


@dataclass(frozen=True, slots=True, eq=False)
class StepResult:
    """The outcome of one step: status, outputs, timing, attempts and, on failure, the error.

    Built once, by the engine, when the step's fate is known; frozen from then on.
    """

    step_name: str
    status: StepStatus = StepStatus.PENDING
    outputs: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None
    traceback: str | None = None
    attempts: int = 0
    start_time: float | None = None
    end_time: float | None = None
    duration_seconds: float = 0.0
    time_saved_seconds: float = 0.0
    cache_key: str | None = None
    skip_reason: str | None = None
    fallback_reasons: tuple[str, ...] = ()
    cache_reason: str | None = None
    """Why the step ran or was served from the cache: ``"cache hit"``, ``"first run of this
    step"``, ``"input 'data' changed"``, ``"code of helper 'clean' changed"``, ``"caching is off
    for this run"``, ``"ran uncached: parameter 'model' cannot be identified"``... None for a
    step that never reached the cache (skipped, blocked)."""

    @property
    def used_fallback(self) -> bool:
        """True when an ``on_failure`` fallback supplied the output: passed on, never cached."""
        return bool(self.fallback_reasons)

    @property
    def success(self) -> bool:
        """True when the step produced its outputs, by running or from the cache."""
        return self.status in _OK

    @property
    def cached(self) -> bool:
        """True when the outputs came from the cache."""
        return self.status is StepStatus.CACHED

    @property
    def skipped(self) -> bool:
        """True when the step never started (a false condition, or an earlier failure)."""
        return self.status is StepStatus.SKIPPED

    @property
    def retries(self) -> int:
        """Attempts after the first."""
        return max(0, self.attempts - 1)

    @property
    def output(self) -> Any:
        """The single output's value, or the dict of outputs when the step has several."""
        if len(self.outputs) == 1:
            return next(iter(self.outputs.values()))
        return self.outputs or None

    def __repr__(self) -> str:
        err = f", error={type(self.error).__name__}" if self.error is not None else ""
        return (
            f"StepResult({self.step_name!r}, {self.status.value}, "
            f"{self.duration_seconds:.3f}s, attempts={self.attempts}{err})"
        )


ExecutionResult = StepResult
"""FlowyML's name for :class:`StepResult`."""

# A mutable twin of StepResult with the same slots: the engine fills one with a plain __init__
# and turns it into a StepResult by assigning its class, several times cheaper than a frozen
# dataclass's __init__ (one object.__setattr__ call per field) on the per-step hot path.
_Builder: Any = dataclasses.make_dataclass(
    "_StepResultBuilder",
    [
        (f.name, f.type, field(default=f.default, default_factory=f.default_factory))
        for f in dataclasses.fields(StepResult)
    ],
    slots=True,
    eq=False,
)


def finished(
    step_name: str,
    status: StepStatus,
    outputs: dict[str, Any],
    error: BaseException | None = None,
    traceback: str | None = None,
    attempts: int = 0,
    start_time: float | None = None,
    end_time: float | None = None,
    duration_seconds: float = 0.0,
    time_saved_seconds: float = 0.0,
    cache_key: str | None = None,
    skip_reason: str | None = None,
    fallback_reasons: tuple[str, ...] = (),
    cache_reason: str | None = None,
) -> StepResult:
    """A frozen :class:`StepResult`, built the fast way; the same as calling the class."""
    res = _Builder(
        step_name,
        status,
        outputs,
        error,
        traceback,
        attempts,
        start_time,
        end_time,
        duration_seconds,
        time_saved_seconds,
        cache_key,
        skip_reason,
        fallback_reasons,
        cache_reason,
    )
    res.__class__ = StepResult
    return cast(StepResult, res)


def split_outputs(step_name: str, names: tuple[str, ...], ret: Any) -> dict[str, Any]:
    """A return value as ``{output name: value}``: one output takes the value as it is; several
    take a tuple or list of exactly that many values, in order, or a dict holding every name.

    Raises:
        OutputError: several outputs are declared and ``ret`` is not a tuple/list of exactly
            that length or a dict holding every name; the message says expected vs got.
    """
    if len(names) == 1:
        return {names[0]: ret}
    if isinstance(ret, Mapping):
        missing = [n for n in names if n not in ret]
        if missing:
            raise OutputError(
                f"step {step_name!r} returned a dict without output(s) {missing}; it declares outputs {list(names)}",
                step_name=step_name,
            )
        return {n: ret[n] for n in names}
    if not isinstance(ret, tuple | list) or len(ret) != len(names):
        got = f"a {type(ret).__name__} of {len(ret)}" if isinstance(ret, tuple | list) else type(ret).__name__
        raise OutputError(
            f"step {step_name!r} declares {len(names)} outputs {list(names)} and must return a tuple, "
            f"list or dict of exactly that many values; expected {len(names)}, got {got}",
            step_name=step_name,
        )
    return dict(zip(names, ret, strict=True))
