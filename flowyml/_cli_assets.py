"""``flowyml assets``: the store's asset catalogue from the command line.

    flowyml [--dir DIR] assets                              every asset name, its latest version
    flowyml [--dir DIR] assets show NAME [--version N]      one version, its metadata and lineage

Read-only: the catalogue's database is opened read-only and nothing is created. Exit codes as
for the other commands: 0 found (or nothing to list), 1 no such asset or version, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from flowyml._catalog import AssetEntry, children_of, entries, find, parents_of

__all__ = ("add_commands", "run")


def add_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    """Add ``assets`` and ``assets show`` to the ``flowyml`` parser's sub-commands."""
    assets = commands.add_parser(
        "assets", parents=[common], help="the asset catalogue; `assets show NAME` for one"
    )
    assets.set_defaults(name="assets", assets=True)
    sub = assets.add_subparsers(dest="assets_command", metavar="show")
    show = sub.add_parser("show", parents=[common], help="one asset version with its metadata and lineage")
    show.add_argument("asset", metavar="NAME", help="an asset name")
    show.add_argument(
        "--version", type=int, default=None, metavar="N", help="that version (default: the latest)"
    )
    show.set_defaults(name="assets show", assets=True)


def run(root: Path, args: argparse.Namespace) -> int:
    """Run ``assets`` or ``assets show``; returns the exit code."""
    if args.name == "assets":
        return _list(root)
    return _show(root, args.asset, args.version)


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _list(root: Path) -> int:
    found = entries(root)
    if not found:
        print(f"no assets registered in {root}")
        return 0
    latest: dict[str, AssetEntry] = {}
    for e in found:
        latest[e.name] = e
    header = ("NAME", "VERSION", "TYPE", "STEP", "RUN", "CREATED")
    rows = [
        (e.name, str(e.version), e.asset_type, e.step_name, e.run_id[:12], _when(e.created_at))
        for e in latest.values()
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for line in (header, *rows):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    return 0


def _show(root: Path, name: str, version: int | None) -> int:
    entry = find(root, name, version)
    if entry is None:
        have = [e.version for e in entries(root, name)]
        which = name if version is None else f"{name} version {version}"
        extra = f" (versions: {', '.join(map(str, have))})" if have else ""
        print(f"flowyml: no asset {which} in the catalogue at {root}{extra}", file=sys.stderr)
        return 1
    print(f"{entry.name} v{entry.version}  {entry.asset_type}")
    print(
        f"  produced by  step {entry.step_name!r} (output {entry.output_name!r}) of pipeline {entry.pipeline!r}"
    )
    print(f"  run          {entry.run_id}")
    print(f"  created      {_when(entry.created_at)}")
    print(f"  artifact     {entry.location}")
    for label, key in (("properties", "properties"), ("tags", "tags")):
        values = entry.metadata.get(key) or {}
        if values:
            print(f"  {label}")
            for k, v in values.items():
                print(f"    {k} = {_short(v)}")
    print("  lineage")
    for line in _tree(root, entry, "    ", set()):
        print(line)
    children = children_of(root, entry)
    if children:
        print("  derived")
        for child in children:
            print(f"    {_label(child)}")
    return 0


def _label(e: AssetEntry) -> str:
    return f"{e.name} v{e.version}  {e.asset_type}  (step {e.step_name})"


def _tree(root: Path, entry: AssetEntry, indent: str, seen: set[str]) -> list[str]:
    lines = [f"{indent}{_label(entry)}"]
    seen = seen | {entry.asset_id}
    parents = [p for p in parents_of(root, entry) if p.asset_id not in seen]
    for i, parent in enumerate(parents):
        last = i == len(parents) - 1
        sub = _tree(root, parent, "", seen)
        lines.append(f"{indent}{'└── ' if last else '├── '}{sub[0]}")
        lines.extend(f"{indent}{'    ' if last else '│   '}{s}" for s in sub[1:])
    return lines


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=repr)
    return text if len(text) <= 100 else text[:97] + "..."
