"""The run's DAG drawn as SVG at report time, laid out by grandalf's Sugiyama (layered) layout.

A layered layout (ranks, crossing reduction, coordinate assignment, edge routing around dummy
nodes) is what grandalf already implements in pure Python, so the report needs no browser-side
layout code and no system binary. grandalf is the optional ``report`` extra; without it, or
beyond :data:`DAG_LIMIT` steps (a picture nobody can read, and seconds of layout), the report
says why the drawing is absent and everything else still works.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ("DAG_LIMIT", "dag_svg")

DAG_LIMIT = 1000
_CHAR_W = 7.0
_LINE_H = 15.0
_PAD = 10.0
_GAP = 40.0
_LABEL_CHARS = 32


class _Box:
    """What grandalf needs of a vertex's drawing: its size, and where it puts it."""

    def __init__(self, w: float, h: float) -> None:
        self.w, self.h = w, h
        self.xy: tuple[float, float] = (0.0, 0.0)


class _Path:
    """What grandalf needs of an edge's drawing: a place to put the route it computes."""

    def __init__(self) -> None:
        self.points: list[tuple[float, float]] = []

    def setpath(self, points: Sequence[Sequence[float]]) -> None:
        self.points = [(float(p[0]), float(p[1])) for p in points]


def _clip(text: str) -> str:
    return text if len(text) <= _LABEL_CHARS else text[: _LABEL_CHARS - 1] + "…"


def dag_svg(
    graph: Mapping[str, Any],
    statuses: Mapping[str, str],
    details: Mapping[str, str],
    groups: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """An ``<svg>`` of ``graph`` (``{"nodes", "edges", "gates"}`` from the report data), or a note why not.

    ``statuses`` colours each node (a CSS class ``st-<status>``); ``details`` is a node's second
    line (executor and cache policy); each of ``groups`` (execution group: its steps) is drawn
    as a labelled box around its steps.
    """
    names: list[str] = list(graph["nodes"])
    gates: list[Mapping[str, Any]] = list(graph.get("gates", ()))
    if len(names) > DAG_LIMIT:
        return (
            f'<p class="note" id="dag-note">The DAG has {len(names):,} steps, more than the {DAG_LIMIT:,} '
            "drawn in a report; the timeline and the table below show every step.</p>"
        )
    try:
        from grandalf.graphs import Edge, Graph, Vertex
        from grandalf.layouts import SugiyamaLayout
    except ImportError:
        return (
            '<p class="note" id="dag-note">The DAG is drawn when the optional layout library is installed: '
            "<code>pip install 'flowyml[report]'</code>.</p>"
        )

    vertices: dict[str, Any] = {}
    labels: dict[str, tuple[str, str]] = {}
    for name in names:
        label = (_clip(name), _clip(details.get(name, "")))
        labels[name] = label
        v = Vertex(("step", name))
        v.view = _Box(max(len(label[0]), len(label[1]), 6) * _CHAR_W + 2 * _PAD, 2 * _LINE_H + _PAD)
        vertices[name] = v
    gate_vertices = []
    for gate in gates:
        text = _clip(str(gate["name"]))
        v = Vertex(("gate", text))
        v.view = _Box(len(text) * _CHAR_W + 4 * _PAD, 2 * _LINE_H + _PAD)
        gate_vertices.append(v)
    edges: list[tuple[Any, str, bool, str]] = []
    for e in graph["edges"]:
        if e["from"] in vertices and e["to"] in vertices:
            edge = Edge(vertices[e["from"]], vertices[e["to"]])
            edges.append((edge, ", ".join(e["outputs"]), False, ""))
    for v, gate in zip(gate_vertices, gates, strict=True):
        for branch in ("then", "else"):
            for target in gate.get(branch, ()):
                if target in vertices:
                    edges.append((Edge(v, vertices[target]), branch, True, branch))
    for edge, *_ in edges:
        edge.view = _Path()
    every = [*vertices.values(), *gate_vertices]
    g = Graph(every, [e[0] for e in edges])

    x_offset = 0.0
    height = 0.0
    singles = []
    for component in g.C:
        if len(component.sV) == 1 and not component.sE:
            singles.append(next(iter(component.sV)))
            continue
        layout = SugiyamaLayout(component)
        layout.init_all()
        layout.draw(N=1)
        for e in component.sE:
            if not e.view.points:
                e.view.setpath([e.v[0].view.xy, e.v[1].view.xy])
        min_x = min(v.view.xy[0] - v.view.w / 2 for v in component.sV)
        min_y = min(v.view.xy[1] - v.view.h / 2 for v in component.sV)
        max_x = max(v.view.xy[0] + v.view.w / 2 for v in component.sV)
        max_y = max(v.view.xy[1] + v.view.h / 2 for v in component.sV)
        dx, dy = x_offset - min_x + _PAD, _PAD - min_y
        for v in component.sV:
            v.view.xy = (v.view.xy[0] + dx, v.view.xy[1] + dy)
        for e in component.sE:
            e.view.points = [(x + dx, y + dy) for x, y in e.view.points]
        x_offset += max_x - min_x + _GAP
        height = max(height, max_y - min_y)
    for v in singles:  # steps with no edges: a row of their own below the rest
        y = height + _GAP + v.view.h / 2 if height else _PAD + v.view.h / 2
        v.view.xy = (x_offset + v.view.w / 2 + _PAD, y)
        x_offset += v.view.w + _PAD
    width = max((v.view.xy[0] + v.view.w / 2 for v in every), default=0.0) + _PAD
    total_h = max((v.view.xy[1] + v.view.h / 2 for v in every), default=0.0) + _PAD

    parts = [
        f'<svg id="dag-svg" xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{total_h:.0f}" '
        f'viewBox="0 0 {width:.0f} {total_h:.0f}" role="img" aria-label="pipeline DAG">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" class="arrowhead"/></marker></defs>',
    ]
    for edge, edge_label, dashed, _branch in edges:
        points = edge.view.points
        if len(points) < 2:
            continue
        # Start and end on the boxes' borders rather than their centres.
        src, dst = edge.v[0].view, edge.v[1].view
        (x0, y0), (x1, y1) = src.xy, dst.xy
        points = [(x0, y0 + src.h / 2), *points[1:-1], (x1, y1 - dst.h / 2)]
        d = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        cls = "edge gate-edge" if dashed else "edge"
        parts.append(f'<polyline class="{cls}" points="{d}" marker-end="url(#arrow)"/>')
        if edge_label:
            mx, my = (
                points[len(points) // 2]
                if len(points) > 2
                else ((x0 + x1) / 2, (points[0][1] + points[-1][1]) / 2)
            )
            parts.append(
                f'<text class="edge-label" x="{mx + 4:.1f}" y="{my:.1f}">{html.escape(_clip(edge_label))}</text>'
            )
    behind: list[str] = []  # group boxes go under the edges and nodes
    for group, members in (groups or {}).items():
        boxes = [vertices[m].view for m in members if m in vertices]
        if not boxes:
            continue
        left = min(b.xy[0] - b.w / 2 for b in boxes) - _PAD / 2
        top = min(b.xy[1] - b.h / 2 for b in boxes) - _LINE_H - _PAD / 2
        right = max(b.xy[0] + b.w / 2 for b in boxes) + _PAD / 2
        bottom = max(b.xy[1] + b.h / 2 for b in boxes) + _PAD / 2
        behind.append(
            f'<g class="group" data-group="{html.escape(group)}"><rect x="{left:.1f}" y="{top:.1f}" '
            f'width="{right - left:.1f}" height="{bottom - top:.1f}" rx="6"/>'
            f'<text x="{left + 6:.1f}" y="{top + 12:.1f}">group: {html.escape(_clip(group))}</text></g>'
        )
    parts[2:2] = behind
    for name, v in vertices.items():
        x, y = v.view.xy
        w, h = v.view.w, v.view.h
        status = statuses.get(name, "not_run")
        first, second = labels[name]
        parts.append(
            f'<g class="node st-{html.escape(status)}" data-step="{html.escape(name)}" tabindex="0">'
            f"<title>{html.escape(name)}: {html.escape(status)}</title>"
            f'<rect x="{x - w / 2:.1f}" y="{y - h / 2:.1f}" width="{w:.1f}" height="{h:.1f}" rx="5"/>'
            f'<text x="{x:.1f}" y="{y - 2:.1f}" class="name">{html.escape(first)}</text>'
            f'<text x="{x:.1f}" y="{y + _LINE_H - 2:.1f}" class="detail">{html.escape(second)}</text></g>'
        )
    for v in gate_vertices:
        x, y = v.view.xy
        w, h = v.view.w, v.view.h
        pts = (
            f"{x:.1f},{y - h / 2:.1f} {x + w / 2:.1f},{y:.1f} {x:.1f},{y + h / 2:.1f} {x - w / 2:.1f},{y:.1f}"
        )
        parts.append(
            f'<g class="gate"><polygon points="{pts}"/>'
            f'<text x="{x:.1f}" y="{y + 4:.1f}" class="name">{html.escape(v.data[1])}</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)
