"""The report as one self-contained HTML file: data, styles, script and the DAG's SVG inline.

The page loads nothing: no CDN, no fonts, no server. The templates beside this module are
filled by plain string replacement, so what ships is exactly what is in ``templates/``.
"""

from __future__ import annotations

import html
import json
import os
import re
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from ._dag import dag_svg

__all__ = ("render_html", "write_report")


@cache
def _template(name: str) -> str:
    return resources.files(__package__).joinpath("templates", name).read_text(encoding="utf-8")


_EMPTY: tuple[Any, ...] = (None, [], {}, False, "")
_DROPPED = frozenset({"started_at", "ended_at"})  # the page uses offsets from the run's start


def _compact(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` without what the page can do without: empty fields, absolute times, the edges.

    A 10,000-step report is mostly step records, so this halves the file; the script fills
    the defaults back in.
    """
    steps = [
        {
            k: round(v, 6) if isinstance(v, float) else v
            for k, v in s.items()
            if k not in _DROPPED and not any(v is e or v == e for e in _EMPTY if type(v) is type(e))
        }
        for s in data["steps"]
    ]
    graph = data["graph"]  # drawn already, as SVG; the page needs only what was not run
    return {**data, "steps": steps, "graph": {"not_run": graph["not_run"], "gates": graph["gates"]}}


def _embed(data: Any) -> str:
    # JSON inside <script>: no "<" may appear, or "</script>" in a step name would end the block.
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False, default=str).replace("<", "\\u003c")


def render_html(data: dict[str, Any]) -> str:
    """The report page of ``data`` (from ``result.to_dict()`` or the store's records)."""
    statuses = {s["name"]: s["status"] for s in data["steps"]}
    details = {
        s["name"]: " · ".join(x for x in (s.get("executor"), s.get("cache_policy")) if x)
        for s in data["steps"]
    }
    groups: dict[str, list[str]] = {}
    for s in data["steps"]:
        if s.get("group"):
            groups.setdefault(s["group"], []).append(s["name"])
    dag = dag_svg(data["graph"], statuses, details, groups)
    parts = {
        "__TITLE__": html.escape(f"flowyml run {data['run_id']} of {data['pipeline']}"),
        "__CSS__": _template("report.css"),
        "__DAG__": dag,
        "__DATA__": _embed(_compact(data)),
        "__JS__": _template("report.js"),
    }
    # One pass over the template: a name written into the page (a step called "__DATA__") is
    # never taken for a marker.
    return _MARKER.sub(lambda m: parts[m.group(0)], _template("report.html"))


_MARKER = re.compile(r"__(?:TITLE|CSS|DAG|DATA|JS)__")


def write_report(data: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the report page of ``data`` to ``path`` (parent folders are created); returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render_html(data), encoding="utf-8")
    return target
