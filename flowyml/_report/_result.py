"""The outcome of one run: every step's result, the outputs, and ways to present them."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._errors import StoreError
from .._results import StepResult, StepStatus

if TYPE_CHECKING:
    import os

    from .._graph import Plan

__all__ = ("PipelineResult",)

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
    plan: Plan | None = field(default=None, repr=False)
    params: Mapping[str, Any] = field(default_factory=dict, repr=False)
    """The plan that ran and the context parameters it ran with, for pictures and reports."""
    store_errors: tuple[StoreError, ...] = ()
    """What the store could not write for this run (the values are all here; they are not cached)."""

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

    def summary(self, all: bool = False) -> str:
        """Counts by status, then every step that did not succeed (every step with ``all=True``)."""
        from . import summary

        return summary(self, all_steps=all)

    def to_mermaid(self) -> str:
        """The pipeline's Mermaid flowchart with each step coloured by its status in this run."""
        from . import result_mermaid

        return result_mermaid(self)

    def to_dict(self) -> dict[str, Any]:
        """The run report as JSON-able data: totals, counts, time saved, and every step's detail."""
        from . import result_to_dict

        return result_to_dict(self)

    def report(self, path: str | os.PathLike[str]) -> None:
        """Write the run report to ``path``: one self-contained HTML file that works offline."""
        from . import write_report

        write_report(self.to_dict(), path)

    def __repr__(self) -> str:
        return (
            f"PipelineResult({self.pipeline_name!r}, {self.state}, steps={len(self.step_results)}, "
            f"{self.duration_seconds:.3f}s)"
        )
