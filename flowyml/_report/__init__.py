"""Run reports: a run as data (``to_dict``), as a self-contained HTML page, and as a short summary.

- ``_result`` :class:`PipelineResult`, the frozen outcome of one run
- ``_data``  a live result or the store's records as one JSON-able shape
- ``_dag``   the DAG as SVG, laid out by a layered-layout library at report time
- ``_html``  the page: templates in ``templates/`` filled with the data, nothing fetched
"""

from __future__ import annotations

from ._data import SCHEMA, records_to_dict, result_to_dict
from ._html import render_html, write_report
from ._result import PipelineResult

__all__ = (
    "SCHEMA",
    "PipelineResult",
    "records_to_dict",
    "render_html",
    "result_mermaid",
    "result_to_dict",
    "summary",
    "write_report",
)

_OK = ("succeeded", "cached")


def result_mermaid(result: PipelineResult) -> str:
    """The Mermaid flowchart of the run's plan, each step coloured by its status."""
    from .._errors import ConfigError
    from .._mermaid import to_mermaid

    plan = getattr(result, "plan", None)
    if plan is None:
        raise ConfigError(
            f"result of run {result.run_id!r} carries no plan to draw; use the pipeline's to_mermaid()"
        )
    statuses = {name: r.status for name, r in result.step_results.items()}
    return to_mermaid(plan, statuses, params=getattr(result, "params", None) or ())


def summary(result: PipelineResult, *, all_steps: bool = False) -> str:
    """Counts by status first, then the steps that did not succeed (every step with ``all_steps``).

    A 2,000-step run that went well is three lines, not two thousand.
    """
    counts: dict[str, int] = {}
    for r in result.step_results.values():
        counts[r.status.value] = counts.get(r.status.value, 0) + 1
    lines = [
        f"run {result.run_id} of {result.pipeline_name!r}: {result.state} in {result.duration_seconds:.3f}s"
    ]
    order = sorted(counts.items(), key=lambda kv: (kv[0] not in _OK, -kv[1], kv[0]))
    lines.append("  " + ", ".join(f"{n} {status}" for status, n in order) if counts else "  no steps")
    saved = result.time_saved_seconds
    if saved:
        lines.append(f"  time saved by the cache: {saved:.3f}s")
    shown = [
        r
        for r in result.step_results.values()
        if all_steps or r.status.value not in _OK or any(k not in _OK for k in r.item_counts)
    ]
    for r in shown:
        extra = f"  {type(r.error).__name__}: {r.error}" if r.error is not None else ""
        if not extra and r.skip_reason:
            extra = f"  ({r.skip_reason})"
        if r.items is not None:  # a mapped step: its items by status
            extra = "  items: " + ", ".join(f"{n} {k}" for k, n in r.item_counts.items()) + extra
        lines.append(f"  {r.step_name:<30} {r.status.value:<10} {r.duration_seconds:8.3f}s{extra}")
    hidden = len(result.step_results) - len(shown)
    if hidden and shown:
        lines.append(f"  ({hidden} succeeded or cached steps not listed; summary(all=True) lists every step)")
    return "\n".join(lines)
