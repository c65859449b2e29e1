"""A run as JSON-able data: from a live :class:`~flowyml.PipelineResult`, or from the store's records.

Both sources give the same shape (``SCHEMA``), so the HTML report, ``result.to_dict()`` and
``flowyml runs show RUN_ID --json`` agree. Fields a source cannot know are ``None`` (types and
sizes of values that were never cached, a plan's executor for a run read back from the store).
Only public fields of results and records are read; nothing is written to them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .._graph import CONTEXT, MISSING, SLOT, Node, Plan
from .._mermaid import cache_label, executor_label

if TYPE_CHECKING:
    from .._results import StepResult
    from .._store import CacheEntry, RunDetail
    from ._result import PipelineResult

__all__ = ("SCHEMA", "concurrency", "records_to_dict", "result_to_dict", "type_name", "value_size")

SCHEMA = 1
_VALUE_CHARS = 200


def type_name(value: object) -> str:
    """``int`` for builtins, ``module.Class`` otherwise."""
    cls = type(value)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def value_size(value: object) -> dict[str, int | None]:
    """An in-memory size estimate: ``bytes`` (buffer size where known, else shallow) and ``len``.

    Never raises: a value whose size cannot be read gets ``None``.
    """
    return {"bytes": _bytes(value), "len": _len(value)}


def _bytes(value: object) -> int | None:
    try:
        raw = getattr(value, "nbytes", None)
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        usage = getattr(value, "memory_usage", None)
        if callable(usage) and type(value).__module__.startswith("pandas"):
            used = usage(index=True)
            return int(used.sum()) if hasattr(used, "sum") else int(used)
        return sys.getsizeof(value)
    except Exception:  # an odd object must not break the report
        return None


def _len(value: object) -> int | None:
    if not hasattr(value, "__len__"):
        return None
    try:
        return len(value)
    except Exception:
        return None


def _short(value: object) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # a broken __repr__ must not break the report
        text = f"<unrepresentable {type_name(value)}: {type(exc).__name__}>"
    return text if len(text) <= _VALUE_CHARS else text[: _VALUE_CHARS - 3] + "..."


def _jsonable(value: object) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def concurrency(steps: Sequence[Mapping[str, Any]]) -> tuple[list[list[float]], int]:
    """How many steps were running over time, as ``[[seconds from start, count], ...]``, and the peak.

    Cached steps count too: they hold a slot while their value is loaded.
    """
    events: list[tuple[float, int]] = []
    for s in steps:
        start, end = s.get("start_offset"), s.get("end_offset")
        if start is None or end is None:
            continue
        events.append((start, 1))
        events.append((max(end, start), -1))
    events.sort(key=lambda e: (e[0], e[1]))
    series: list[list[float]] = [[0.0, 0]]
    current = peak = 0
    for t, delta in events:
        current += delta
        peak = max(peak, current)
        if series[-1][0] == t:
            series[-1][1] = current
        else:
            series.append([t, current])
    return series, peak


def _totals(
    data: dict[str, Any], steps: list[dict[str, Any]], start: float, end: float | None, duration: float | None
) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for s in steps:
        counts[s["status"]] = counts.get(s["status"], 0) + 1
    cached = [s for s in steps if s["status"] == "cached"]
    unknown = [s["name"] for s in cached if s["time_saved_seconds"] is None]
    series, peak = concurrency(steps)
    mapped = [s["items"] for s in steps if s.get("items")]
    items: dict[str, Any] | None = None
    if mapped:
        by_status: dict[str, int] = {}
        for m in mapped:
            for status, n in m["counts"].items():
                by_status[status] = by_status.get(status, 0) + n
        items = {"mapped_steps": len(mapped), "total": sum(m["total"] for m in mapped), "counts": by_status}
    data.update(
        schema=SCHEMA,
        started_at=start,
        ended_at=end,
        duration_seconds=duration,
        steps_total=len(steps),
        counts=dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        time_saved={
            "seconds": sum(s["time_saved_seconds"] or 0.0 for s in cached),
            "cached_steps": len(cached),
            "unknown_steps": unknown,
            "how": "each cache hit's original run time, as recorded with its cache entry; "
            "unknown where the entry did not record one",
        },
        peak_concurrency=peak,
        items=items,
        concurrency=series,
        steps=steps,
    )
    return data


def _offsets(step: dict[str, Any], start: float) -> None:
    s, e = step["started_at"], step["ended_at"]
    step["start_offset"] = None if s is None else round(s - start, 6)
    step["end_offset"] = None if e is None else round(e - start, 6)


# -- a live result ---------------------------------------------------------------------------------


def _parameters(
    node: Node, plan: Plan, producer: Mapping[int, str], params: Mapping[str, Any], values: Mapping[str, Any]
) -> list[Any]:
    out: list[dict[str, Any]] = []
    for label, src in node.sources():
        if src.kind == SLOT:
            name = plan.slot_names[src.slot]
            entry: dict[str, Any] = {
                "parameter": label,
                "from": "step",
                "step": producer[src.slot],
                "output": name,
                "type": None,
                "size": None,
            }
            if name in values:
                entry["type"] = type_name(values[name])
                entry["size"] = value_size(values[name])
        elif src.kind == CONTEXT and src.name in params:
            value = params[src.name]
            entry = {"parameter": label, "from": "context", "name": src.name, "type": type_name(value)}
            entry["value"] = _short(value)
        else:
            default = None if src.default is MISSING else src.default
            entry = {"parameter": label, "from": "default", "type": type_name(default)}
            entry["value"] = _short(default)
        out.append(entry)
    return out


def _items(r: StepResult) -> dict[str, Any] | None:
    """A mapped step's items: how many, how many per status, and items per second of the step's
    span from start to end (items keep durations, not start times). None for any other step."""
    if r.items is None:
        return None
    total = len(r.items)
    span = r.duration_seconds
    return {
        "total": total,
        "counts": r.items.counts,
        "per_second": round(total / span, 3) if span > 0 else None,
    }


def _step_from_result(
    r: StepResult,
    node: Node | None,
    plan: Plan | None,
    producer: Mapping[int, str],
    params: Mapping[str, Any],
    values: Mapping[str, Any],
) -> dict[str, Any]:
    status = str(r.status.value)
    errors = [
        {
            "attempt": a.attempt,
            "type": type(a.error).__qualname__,
            "message": str(a.error),
            "traceback": a.traceback,
        }
        for a in r.attempt_errors
    ]
    if r.error is not None:
        errors.append(
            {
                "attempt": max(r.attempts, 1),
                "type": type(r.error).__qualname__,
                "message": str(r.error),
                "traceback": r.traceback,
            }
        )
    saved: float | None = r.time_saved_seconds if status == "cached" else 0.0
    if status == "cached" and not saved:
        saved = None
    step = node.step if node is not None else None
    return {
        "name": r.step_name,
        "status": status,
        "started_at": r.start_time,
        "ended_at": r.end_time,
        "duration_seconds": r.duration_seconds,
        "attempts": r.attempts,
        "errors": errors,
        "earlier_attempt_errors_recorded": len(r.attempt_errors) >= r.attempts - 1,
        "items": _items(r),
        "cache_key": r.cache_key,
        "cache_reason": _jsonable(getattr(r, "cache_reason", None)),
        "time_saved_seconds": saved,
        "skip_reason": r.skip_reason,
        "fallback_reasons": list(r.fallback_reasons),
        "executor": executor_label(node) if node is not None else None,
        "cache_policy": cache_label(node) if node is not None else None,
        "group": step.execution_group if step is not None else None,
        "resources": {k: _jsonable(v) for k, v in step.resources.items()} if step is not None else {},
        "tags": dict(step.tags) if step is not None else {},
        "inputs": _parameters(node, plan, producer, params, values)
        if node is not None and plan is not None
        else [],
        "outputs": [
            {"name": name, "type": type_name(v), "size": value_size(v)} for name, v in r.outputs.items()
        ],
    }


def _graph_of_plan(plan: Plan, ran: Iterable[str]) -> dict[str, Any]:
    producer = {slot: n.id for n in plan.nodes for slot in n.output_slots}
    edges = []
    for node in plan.nodes:
        carried: dict[int, list[str]] = {}
        for _label, src in node.sources():
            if src.kind == SLOT:
                names = carried.setdefault(producer[src.slot], [])
                if plan.slot_names[src.slot] not in names:
                    names.append(plan.slot_names[src.slot])
        edges += [
            {"from": plan.nodes[p].name, "to": node.name, "outputs": names} for p, names in carried.items()
        ]
    seen = set(ran)
    return {
        "nodes": [n.name for n in plan.nodes],
        "not_run": [n.name for n in plan.nodes if n.name not in seen],
        "edges": edges,
        "gates": [
            {
                "name": g.name,
                "then": [plan.nodes[i].name for i in g.then_ids],
                "else": [plan.nodes[i].name for i in g.else_ids],
            }
            for g in plan.gates
        ],
    }


def result_to_dict(result: PipelineResult) -> dict[str, Any]:
    """The report data of a live run (see the module docstring)."""
    plan = getattr(result, "plan", None)
    params: Mapping[str, Any] = getattr(result, "params", None) or {}
    values: dict[str, Any] = {}
    for r in result.step_results.values():
        values.update(r.outputs)
    producer = {slot: n.name for n in plan.nodes for slot in n.output_slots} if plan is not None else {}
    steps = []
    for r in result.step_results.values():
        node = plan.by_name.get(r.step_name) if plan is not None else None
        step = _step_from_result(r, node, plan, producer, params, values)
        _offsets(step, result.start_time)
        steps.append(step)
    data: dict[str, Any] = {
        "run_id": result.run_id,
        "pipeline": result.pipeline_name,
        "state": result.state,
        "source": "result",
        "params": {k: _short(v) for k, v in params.items()},
    }
    if plan is not None:
        data["graph"] = _graph_of_plan(plan, result.step_results)
    else:
        data["graph"] = _graph_of_inputs(steps)
    return _totals(data, steps, result.start_time, result.end_time, result.duration_seconds)


def _graph_of_inputs(steps: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    edges: dict[tuple[str, str], list[str]] = {}
    for s in steps:
        for inp in s["inputs"]:
            if inp.get("from") == "step":
                names = edges.setdefault((inp["step"], s["name"]), [])
                if inp["output"] not in names:
                    names.append(inp["output"])
    return {
        "nodes": [s["name"] for s in steps],
        "not_run": [],
        "edges": [{"from": a, "to": b, "outputs": names} for (a, b), names in edges.items()],
        "gates": [],
    }


# -- the store's records ---------------------------------------------------------------------------


def records_to_dict(detail: RunDetail, entries: Mapping[str, CacheEntry]) -> dict[str, Any]:
    """The report data of a recorded run; ``entries`` are the cache entries of its steps' keys.

    A cache entry gives the types and sizes of a step's outputs and, for a cache hit, the run
    time it saved. The plan is not recorded, so executor, cache policy and group are ``None``.
    """
    run = detail.run
    steps = []
    for rec in detail.steps:
        entry = entries.get(rec.cache_key) if rec.cache_key else None
        sizes = {o.name: o for o in entry.outputs} if entry is not None else {}
        saved: float | None = rec.time_saved_seconds if rec.cached else 0.0
        if rec.cached and not saved:
            saved = entry.duration_seconds if entry is not None and entry.duration_seconds else None
        errors = []
        if rec.error_type or rec.error_message:
            errors.append(
                {
                    "attempt": max(rec.attempts, 1),
                    "type": rec.error_type,
                    "message": rec.error_message,
                    "traceback": rec.traceback,
                }
            )
        inputs = []
        for param, (producer, output) in rec.inputs.items():
            inputs.append(
                {
                    "parameter": param,
                    "from": "step",
                    "step": producer,
                    "output": output,
                    "type": None,
                    "size": None,
                }
            )
        step: dict[str, Any] = {
            "name": rec.step_name,
            "status": rec.status,
            "started_at": rec.started_at,
            "ended_at": rec.ended_at,
            "duration_seconds": rec.duration_seconds,
            "attempts": rec.attempts,
            "errors": errors,
            "earlier_attempt_errors_recorded": False,
            "items": None,
            "cache_key": rec.cache_key,
            "cache_reason": _jsonable(getattr(rec, "cache_reason", None)),
            "time_saved_seconds": saved,
            "skip_reason": None,
            "fallback_reasons": [],
            "executor": None,
            "cache_policy": None,
            "group": None,
            "resources": {},
            "tags": {},
            "inputs": inputs,
            "outputs": [
                {
                    "name": name,
                    "type": sizes[name].type_name if name in sizes else None,
                    "size": {"bytes": sizes[name].size, "len": None} if name in sizes else None,
                    "artifact": artifact,
                }
                for name, artifact in rec.outputs.items()
            ],
        }
        _offsets(step, run.started_at)
        steps.append(step)
    by_output = {(s["name"], o["name"]): o for s in steps for o in s["outputs"]}
    for s in steps:
        for inp in s["inputs"]:
            made = by_output.get((inp["step"], inp["output"]))
            if made is not None:
                inp["type"], inp["size"] = made["type"], made["size"]
    data: dict[str, Any] = {
        "run_id": run.run_id,
        "pipeline": run.pipeline_name,
        "state": run.status,
        "source": "store",
        "params": {},
        "error_message": run.error_message,
    }
    data["graph"] = _graph_of_inputs(steps)
    return _totals(data, steps, run.started_at, run.ended_at, run.duration_seconds)
