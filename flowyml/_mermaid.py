"""A pipeline's plan as a Mermaid flowchart, optionally coloured by a run's step statuses.

Steps are nodes labelled with their name, executor and cache policy; an edge carries the names
of the outputs it passes; context parameters are input nodes; an ``If`` is a diamond with
``then``/``else`` edges to its branch steps; an execution group is a subgraph; a mapped step is a
subroutine box that says what it maps over, a stream source (a generator step) a stadium. Every
piece of user text goes through :func:`escape`, so names with quotes, brackets or any unicode
still parse.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ._graph import CONTEXT, MISSING, SLOT, Node, Plan

__all__ = ("STATUS_COLOURS", "cache_label", "escape", "executor_label", "to_mermaid")

#: Fill and stroke of each step status, shared with the HTML report.
STATUS_COLOURS: Mapping[str, tuple[str, str]] = {
    "succeeded": ("#d1f2d6", "#2f8f46"),
    "cached": ("#d6e6fb", "#2f6bbf"),
    "failed": ("#f9d4d2", "#c0392b"),
    "timed_out": ("#fbe2c8", "#c46a12"),
    "cancelled": ("#e6e1ee", "#6c5a8a"),
    "skipped": ("#ececec", "#8a8a8a"),
    "pending": ("#ffffff", "#555555"),
}

# Characters kept as they are inside a quoted Mermaid label; everything else that is not a
# letter or digit becomes an entity code (``#34;``), which Mermaid decodes when drawing.
_PLAIN = frozenset(" _-.,:/()+=*@!?'~^$%")


def escape(text: str) -> str:
    """``text`` made safe for a double-quoted Mermaid label (quotes, brackets, ``#``, ``;``...)."""
    return "".join(c if c.isalnum() or c in _PLAIN else f"#{ord(c)};" for c in text)


def executor_label(node: Node) -> str:
    """How the step runs: its executor's name, or the default for its kind of function."""
    ex = node.step.executor
    if ex is None:
        return "async" if node.step.is_async else "thread"
    if isinstance(ex, str):
        return ex
    return type(ex).__name__


def cache_label(node: Node) -> str:
    """The step's cache policy in a few words."""
    cache: Any = node.step.cache
    if cache is False:
        return "no cache"
    if isinstance(cache, str):
        return cache
    strategy = getattr(cache, "strategy", None)
    if isinstance(strategy, str):
        return strategy
    return "custom key"


def to_mermaid(
    plan: Plan,
    statuses: Mapping[str, Any] | None = None,
    *,
    params: Iterable[str] = (),
    direction: str = "TD",
) -> str:
    """The Mermaid ``flowchart`` text of ``plan``.

    Args:
        plan: the validated plan (``pipeline.plan()``).
        statuses: step name to status (a :class:`~flowyml.StepStatus` or its value); steps get
            the status's class and colour. Steps missing from it (an unchosen branch) stay plain.
        params: context names the pipeline provides; parameters bound to one of these, or
            bound to the context with no default, are drawn as input nodes.
        direction: ``TD`` (top down) or ``LR`` (left to right).
    """
    provided = set(params)
    lines = [f"flowchart {direction}"]
    groups: dict[str, list[Node]] = {}
    loose: list[Node] = []
    for node in plan.nodes:
        group = node.step.execution_group
        (groups.setdefault(group, []) if group is not None else loose).append(node)
    for node in loose:
        lines.append(f"    {_node(node)}")
    for i, (group, members) in enumerate(groups.items()):
        lines.append(f'    subgraph grp{i}["group: {escape(group)}"]')
        lines.extend(f"        {_node(node)}" for node in members)
        lines.append("    end")

    context_ids: dict[str, str] = {}
    context_edges: list[str] = []
    for node in plan.nodes:
        for label, src in node.sources():
            if src.kind != CONTEXT or (src.default is not MISSING and src.name not in provided):
                continue
            pid = context_ids.get(src.name)
            if pid is None:
                pid = context_ids[src.name] = f"ctx{len(context_ids)}"
                lines.append(f'    {pid}[/"{escape(src.name)}"/]')
            arrow = f'-. "{escape(label)}" .->' if label != src.name else "-.->"
            context_edges.append(f"    {pid} {arrow} s{node.id}")
    lines.extend(context_edges)

    producer_of = {slot: node.id for node in plan.nodes for slot in node.output_slots}
    for node in plan.nodes:
        carried: dict[int, list[str]] = {}
        for _label, src in node.sources():
            if src.kind == SLOT:
                producer = producer_of[src.slot]
                names = carried.setdefault(producer, [])
                if plan.slot_names[src.slot] not in names:
                    names.append(plan.slot_names[src.slot])
        for producer, names in carried.items():
            lines.append(f'    s{producer} -->|"{escape(", ".join(names))}"| s{node.id}')

    for i, gate in enumerate(plan.gates):
        lines.append(f'    gate{i}{{"{escape(gate.name)}"}}')
        lines.extend(f"    gate{i} -. then .-> s{t}" for t in gate.then_ids)
        lines.extend(f"    gate{i} -. else .-> s{e}" for e in gate.else_ids)
        lines.append(f"    class gate{i} gate")

    lines.append("    classDef param fill:#fff8dc,stroke:#b8860b")
    lines.append("    classDef gate fill:#fdf2ff,stroke:#8e44ad")
    if context_ids:
        lines.append(f"    class {','.join(context_ids.values())} param")
    if statuses:
        by_status: dict[str, list[str]] = {}
        for node in plan.nodes:
            status = statuses.get(node.name)
            if status is not None:
                by_status.setdefault(str(getattr(status, "value", status)), []).append(f"s{node.id}")
        for status, ids in by_status.items():
            fill, stroke = STATUS_COLOURS.get(status, STATUS_COLOURS["pending"])
            lines.append(f"    classDef {status} fill:{fill},stroke:{stroke}")
            lines.append(f"    class {','.join(ids)} {status}")
    return "\n".join(lines) + "\n"


def _node(node: Node) -> str:
    # A mapped step is a subroutine box saying what it maps over; a stream source is a stadium.
    step = node.step
    label = f"{escape(node.name)}<br/>{escape(executor_label(node))} · {escape(cache_label(node))}"
    if step.map_over:
        return f's{node.id}[["{label}<br/>map over {escape(", ".join(step.map_over))}"]]'
    if step.stream:
        return f's{node.id}(["{label}<br/>stream source"])'
    return f's{node.id}["{label}"]'
