"""What a run reports: one :class:`StepResult` per step and a :class:`PipelineResult` around them."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from ._errors import OutputError

__all__ = ("ExecutionResult", "PipelineResult", "StepResult", "StepStatus", "finished", "split_outputs")


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
    )
    res.__class__ = StepResult
    return cast(StepResult, res)


_PRODUCED = frozenset({StepStatus.SUCCEEDED, StepStatus.CACHED})


@dataclass(frozen=True, slots=True, eq=False)
class PipelineResult:
    """The outcome of one run. ``result["name"]`` looks up an output, then a step's output. Frozen."""

    run_id: str
    pipeline_name: str
    state: str
    outputs: dict[str, Any]
    step_results: dict[str, StepResult]
    start_time: float
    end_time: float
    producers: dict[str, str] = field(default_factory=dict)
    """The step that declares each output name, to explain an output that was not produced."""

    @property
    def success(self) -> bool:
        """True when every step succeeded, ran from the cache, or was skipped by a condition."""
        return self.state == "completed"

    @property
    def duration_seconds(self) -> float:
        return self.end_time - self.start_time

    @property
    def time_saved_seconds(self) -> float:
        """The original run time of every step served from the cache."""
        return sum(r.time_saved_seconds for r in self.step_results.values())

    @property
    def failed_steps(self) -> list[str]:
        """Names of the steps that failed or timed out."""
        bad = (StepStatus.FAILED, StepStatus.TIMED_OUT)
        return [n for n, r in self.step_results.items() if r.status in bad]

    def __getitem__(self, name: str) -> Any:
        """An output's value by its name; else a step's output by the step's name.

        A step's output is its value when it declares one output (or none), and a dict of its
        outputs by name when it declares several. ``step_results[name]`` has the step's fate.

        Raises:
            KeyError: nothing of that name, or it was not produced in this run (the message
                says which step should have made it and what became of it).
        """
        outputs = self.outputs
        if name in outputs:
            return outputs[name]
        made = self.step_results.get(name)
        if made is not None and made.status in _PRODUCED:
            values = made.outputs
            return next(iter(values.values())) if len(values) == 1 else dict(values)
        producer = self.producers.get(name, name if made is not None else None)
        if producer is not None:
            made = self.step_results.get(producer)
            what = "output" if name in self.producers else "the output of step"
            if made is None:
                why = "did not run: its If branch was not chosen"
            elif made.error is not None:
                why = f"{made.status.value} ({type(made.error).__name__}: {made.error})"
            else:
                why = f"was {made.status.value}" + (f": {made.skip_reason}" if made.skip_reason else "")
            raise KeyError(f"{what} {name!r} was not produced in this run: step {producer!r} {why}")
        raise KeyError(
            f"{name!r} is neither an output nor a step of pipeline {self.pipeline_name!r}; "
            f"outputs: {sorted(self.outputs)}"
        )

    def __contains__(self, name: object) -> bool:
        return name in self.outputs or name in self.step_results

    def __iter__(self) -> Iterator[StepResult]:
        return iter(self.step_results.values())

    def summary(self) -> str:
        """A human-readable table of every step's fate."""
        lines = [f"run {self.run_id} of {self.pipeline_name!r}: {self.state} in {self.duration_seconds:.3f}s"]
        for r in self.step_results.values():
            extra = f"  {type(r.error).__name__}: {r.error}" if r.error is not None else ""
            lines.append(f"  {r.step_name:<30} {r.status.value:<10} {r.duration_seconds:8.3f}s{extra}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"PipelineResult({self.pipeline_name!r}, {self.state}, steps={len(self.step_results)}, "
            f"{self.duration_seconds:.3f}s)"
        )


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
