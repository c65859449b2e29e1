"""The ``flowyml`` command line: read back runs, the cache and lineage from a store directory.

    flowyml [--dir DIR] runs [--limit N]          recent runs, newest first
    flowyml [--dir DIR] runs show RUN_ID          one run's steps (a unique id prefix is enough)
    flowyml [--dir DIR] cache stats               entries, bytes, hits, time saved
    flowyml [--dir DIR] cache clear [--step NAME] drop cache entries (lineage stays)
    flowyml [--dir DIR] cache verify              integrity check + re-hash every artifact
    flowyml [--dir DIR] cache gc                  remove artifact files no entry names (crash leftovers)
    flowyml [--dir DIR] lineage OUTPUT [--run ID] which step runs an output came from
    flowyml [--dir DIR] assets [show NAME]        the asset catalogue (see flowyml._cli_assets)
    flowyml [--dir DIR] explain RUN_ID STEP       why a step ran or was cached, and what changed
    flowyml run | dag | report ...                see ``_cli_run``

Exit codes: 0 success; 1 the thing asked for does not exist or a problem was found; 2 usage error.
Without a store, listing commands say so and exit 0; commands about one run, output or step, and
``cache verify`` (there is nothing it could vouch for), exit 1.

Stores are opened with ``create=False``: nothing is created, cleaned or migrated, and reading
never waits for a pipeline that holds the store's write lock (WAL readers need no lock). A store
that is not yours or that others can write is refused, as a run refuses it; one you may only read
(0o500 / 0o400) is read.

Everything printed that comes from the store (step, output, pipeline names, messages) goes through
:func:`_safe`: control characters, escape sequences, NUL and newlines are shown escaped, never
sent to the terminal. A damaged row is reported (which table, which row) and skipped; the command
goes on with the rest and exits 1.
"""

from __future__ import annotations

__all__ = ("main",)

import argparse
import asyncio
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from flowyml import _cli_assets, _cli_run
from flowyml._cache import changed_parts, part_name
from flowyml._errors import StoreError
from flowyml._store import LineageNode, RunRecord, StepRecord, Store, resolve_root
from flowyml._store._db import DB_NAME


def _safe(value: object) -> str:
    """``value`` as text with every non-printable character escaped (``\\x1b``, ``\\n``, ``\\x00``)."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        else:
            code = ord(ch)
            out.append(
                f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
            )
    return "".join(out)


def _fmt_time(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    if not isinstance(epoch, int | float):
        return "?"  # a damaged value: shown as unknown, never a traceback
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if not isinstance(seconds, int | float) or seconds != seconds:
        return "?"
    if seconds < 1.0:
        return f"{seconds * 1000:.1f}ms"
    if seconds < 60.0:
        return f"{seconds:.2f}s"
    minutes, rest = divmod(seconds, 60.0)
    if minutes < 60:
        return f"{int(minutes)}m{rest:04.1f}s"
    hours, minutes = divmod(minutes, 60)
    return f"{int(hours)}h{int(minutes):02d}m"


def _fmt_bytes(count: int | None) -> str:
    if count is None:
        return "-"
    if not isinstance(count, int | float):
        return "?"
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover - unreachable


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    rows = [[_safe(cell) for cell in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in (header, *rows)
    ]
    return "\n".join(lines)


def _err(message: str) -> None:
    print(f"flowyml: {_safe(message)}", file=sys.stderr)


# -- commands --------------------------------------------------------------------------------------


async def _runs(store: Store, args: argparse.Namespace) -> int:
    runs = await store.runs(limit=args.limit)
    if not runs:
        print("No runs recorded yet.")
        return 0
    print(_runs_table(runs))
    return 0


def _runs_table(runs: Sequence[RunRecord]) -> str:
    rows = [
        (
            r.run_id,
            r.pipeline_name,
            r.status,
            _fmt_time(r.started_at),
            _fmt_duration(r.duration_seconds),
            _fmt_duration(r.time_saved_seconds) if r.time_saved_seconds else "-",
        )
        for r in runs
    ]
    return _table(("RUN ID", "PIPELINE", "STATUS", "STARTED", "DURATION", "TIME SAVED"), rows)


async def _resolve_run(store: Store, run_id: str) -> str | None:
    matches = await store.match_run_ids(run_id, limit=6)
    if not matches:
        _err(f"no run {run_id!r} in {store.root}. `flowyml runs` lists the recent ones.")
        return None
    if len(matches) > 1:
        shown = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
        _err(f"run id prefix {run_id!r} matches several runs ({shown}); give more characters.")
        return None
    return matches[0]


async def _runs_show(store: Store, args: argparse.Namespace) -> int:
    run_id = await _resolve_run(store, args.run_id)
    if run_id is None:
        return 1
    detail = await store.get_run(run_id)
    if detail is None:  # deleted in between
        _err(f"no run {args.run_id!r} in {store.root}.")
        return 1
    run, steps = detail.run, detail.steps
    hits = sum(1 for s in steps if s.cached)
    print(f"Run {_safe(run.run_id)}  pipeline {_safe(repr(run.pipeline_name))}  status {_safe(run.status)}")
    print(
        f"started {_fmt_time(run.started_at)}  duration {_fmt_duration(run.duration_seconds)}  "
        f"cache hits {hits}/{len(steps)}  time saved {_fmt_duration(run.time_saved_seconds or _saved(steps))}"
    )
    if run.error_message:
        print(f"error: {_safe(run.error_message)}")
    if not steps:
        print("No steps recorded.")
        return 0
    print()
    rows = [
        (
            s.step_name,
            s.status,
            str(s.attempts),
            _fmt_duration(s.duration_seconds),
            "yes" if s.cached else "no",
            _fmt_duration(s.time_saved_seconds) if s.cached else "-",
            s.cache_reason or "-",
        )
        for s in steps
    ]
    print(_table(("STEP", "STATUS", "ATTEMPTS", "DURATION", "CACHED", "TIME SAVED", "WHY"), rows))
    failures = [s for s in steps if s.error_type or s.error_message]
    for s in failures:
        print(
            f"\n{_safe(s.step_name)}: {_safe(s.error_type or 'error')}: {_safe(s.error_message or '')}".rstrip()
        )
    return 0


def _saved(steps: Sequence[StepRecord]) -> float:
    return sum(s.time_saved_seconds for s in steps if s.cached)


async def _cache_stats(store: Store, args: argparse.Namespace) -> int:
    stats = await store.cache_stats()
    print(f"store:       {_safe(store.root)}")
    print(f"entries:     {stats.entries}")
    print(
        f"size:        {_fmt_bytes(stats.bytes)} ({stats.artifacts} artifacts; "
        f"{_fmt_bytes(stats.inline_bytes)} inline, {_fmt_bytes(stats.file_bytes)} in files)"
    )
    print(f"hits:        {stats.hits}")
    print(f"time saved:  {_fmt_duration(stats.time_saved_seconds)}")
    if stats.steps:
        print()
        rows = [
            (
                s.step_name,
                str(s.entries),
                _fmt_bytes(s.bytes),
                str(s.hits),
                _fmt_duration(s.time_saved_seconds),
            )
            for s in stats.steps
        ]
        print(_table(("STEP", "ENTRIES", "SIZE", "HITS", "TIME SAVED"), rows))
    return 0


async def _cache_clear(store: Store, args: argparse.Namespace) -> int:
    removed = await store.clear_cache(args.step)
    if args.step is not None and removed == 0:
        known = await store.cached_steps()
        listing = "Steps with cache entries: " + ", ".join(known) + "." if known else "The cache is empty."
        _err(f"no cache entries of step {args.step!r} in {store.root}. {listing}")
        return 1
    what = f"of step {args.step!r} " if args.step else ""
    print(
        f"Removed {removed} cache {'entry' if removed == 1 else 'entries'} {_safe(what)}from {_safe(store.root)}."
    )
    return 0


async def _cache_gc(store: Store, args: argparse.Namespace) -> int:
    removed, freed = await store.gc()
    print(f"Removed {removed} leftover file(s) ({_fmt_bytes(freed)}) from {_safe(store.root)}.")
    return 0


async def _cache_verify(store: Store, args: argparse.Namespace) -> int:
    report = await store.verify()
    print(f"database integrity: {report.integrity}")
    print(f"checked {report.entries_checked} entries, {report.artifacts_checked} artifacts")
    if report.ok:
        print("All artifacts intact.")
        return 0
    for p in report.problems:
        if p.kind == "integrity":
            continue
        if p.kind == "orphan":
            print(f"ORPHAN  {_safe(p.path)}: {_safe(p.detail)}")
            continue
        where = p.path or "inline"
        print(
            f"BAD  step {_safe(repr(p.step_name))} output {_safe(repr(p.output_name))} key {_safe(p.key)}: "
            f"{_safe(p.detail)} ({_safe(where)})"
        )
    _err(
        f"{len(report.problems)} problem(s) found. Bad entries are set aside and recomputed when next needed."
    )
    return 1


#: Levels of a lineage tree that are indented; deeper ones (long chains) keep the last indent,
#: so that printing a 100,000-deep chain is 100,000 lines, not gigabytes of leading spaces.
_MAX_INDENT = 64


def _lineage_text(label: str, node: LineageNode) -> str:
    origin = ""
    if node.cached and node.origin_run_id and node.origin_run_id != node.run_id:
        origin = f", cached from run {node.origin_run_id}"
    elif node.cached:
        origin = ", cached"
    artifact = ""
    if node.artifact_hash:
        artifact = f"  [{node.type_name or '?'}, {_fmt_bytes(node.size)}, {node.artifact_hash[:12]}]"
    return _safe(
        f"{label} <- {node.step_name} ({node.status}, {_fmt_duration(node.duration_seconds)}{origin}){artifact}"
    )


def _lineage_lines(label: str, node: LineageNode) -> list[str]:
    """The tree of ``node`` as text lines, walked with a stack (a chain may be very deep)."""
    lines = [_lineage_text(label, node)]
    # (label, node, prefix for its line, whether it is its parent's last input, depth)
    stack: list[tuple[str, LineageNode, str, bool, int]] = []

    def push(parent: LineageNode, prefix: str, depth: int) -> None:
        last = len(parent.inputs) - 1
        for i in range(last, -1, -1):
            param, child = parent.inputs[i]
            child_label = param if param == child.output_name else f"{param}={child.output_name}"
            stack.append((child_label, child, prefix, i == last, depth))

    push(node, "", 1)
    while stack:
        child_label, child, prefix, last, depth = stack.pop()
        lines.append(f"{prefix}{'└── ' if last else '├── '}{_lineage_text(child_label, child)}")
        push(child, prefix + ("    " if last else "│   ") if depth < _MAX_INDENT else prefix, depth + 1)
    return lines


async def _lineage(store: Store, args: argparse.Namespace) -> int:
    run_id = None
    if args.run is not None:
        run_id = await _resolve_run(store, args.run)
        if run_id is None:
            return 1
    lineage = await store.lineage(args.output, run_id)
    if lineage is None:
        where = f"run {run_id}" if run_id else "any recorded run"
        _err(f"no output {args.output!r} in {where}.")
        return 1
    print(f"Lineage of {_safe(repr(lineage.output_name))} in run {_safe(lineage.run_id)}:")
    print("\n".join(_lineage_lines(lineage.output_name, lineage.root)))
    return 0


# -- explain ---------------------------------------------------------------------------------------


def _say(text: str) -> None:
    """Print a line that holds values read from the store, escaped (see :func:`_safe`)."""
    print(_safe(text))


async def _explain(store: Store, args: argparse.Namespace) -> int:
    """Why a step ran or was served from the cache, and which key components changed since its previous run."""
    run_id = await _resolve_run(store, args.run_id)
    if run_id is None:
        return 1
    detail = await store.get_run(run_id)
    step = next((s for s in detail.steps if s.step_name == args.step), None) if detail else None
    if step is None:
        names = ", ".join(s.step_name for s in detail.steps) if detail else ""
        _err(f"run {run_id} has no step {args.step!r}" + (f"; its steps: {names}." if names else "."))
        return 1
    _say(f"Step {step.step_name!r} in run {run_id}: {step.status}")
    _say(f"why: {step.cache_reason or 'not recorded'}")
    if step.cache_key is None:
        return 0
    _say(f"key: {step.cache_key}")
    before = await store.previous_step(run_id, step.step_name)
    if before is None:
        _say("No earlier run of this pipeline ran this step: nothing to compare with.")
        return 0
    label = f"run {before.run_id} ({before.status})"
    if before.cache_key is None:
        _say(f"Previous: {label}, without a cache key ({before.cache_reason or 'reason not recorded'}).")
        return 0
    if before.cache_key == step.cache_key:
        _say(f"Previous: {label}, with the same key.")
        return 0
    known = await store.key_parts([step.cache_key, before.cache_key])
    now, then = known.get(step.cache_key), known.get(before.cache_key)
    if now is None or then is None:
        _say(f"Previous: {label}, with key {before.cache_key}; the components of "
              f"{'this' if now is None else 'that'} key were not recorded.")  # fmt: skip
        return 0
    changed = changed_parts(then, now)
    _say(f"Previous: {label}, with key {before.cache_key}.")
    _say("Changed since then:" if changed else "No component differs (another key version).")
    rows = [(part_name(c), then.get(c, "(none)"), now.get(c, "(none)")) for c in changed]
    if rows:
        print(_table(("COMPONENT", "BEFORE", "NOW"), rows))
    return 0


# -- plumbing --------------------------------------------------------------------------------------

_Command = Callable[[Store, argparse.Namespace], Coroutine[Any, Any, int]]

#: What each command does when there is no store yet: (message, exit code, to stderr?).
_NO_STORE: dict[str, tuple[str, int, bool]] = {
    "runs": ("No runs recorded yet: there is no flowyml store at {root}.", 0, False),
    "runs show": ("no flowyml store at {root}, so no run {arg!r}.", 1, True),
    "cache stats": ("No flowyml store at {root}: the cache is empty.", 0, False),
    "cache clear": ("No flowyml store at {root}: nothing to clear.", 0, False),
    "cache clear --step": ("no flowyml store at {root}, so no cache entries of step {arg!r}.", 1, True),
    "cache verify": ("no flowyml store at {root}: nothing to verify.", 1, True),
    "cache gc": ("No flowyml store at {root}: nothing to collect.", 0, False),
    "lineage": ("no flowyml store at {root}, so no output {arg!r}.", 1, True),
    "explain": ("no flowyml store at {root}, so no run {arg!r}.", 1, True),
    **_cli_run.NO_STORE,
}


def _limit(text: str) -> int:
    """``--limit``: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--dir",
        default=argparse.SUPPRESS,
        metavar="DIR",
        help="the store directory (default: $FLOWYML_HOME, else ./.flowyml)",
    )
    parser = argparse.ArgumentParser(
        prog="flowyml", description="Inspect flowyml runs, cache and lineage.", parents=[common]
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    runs = commands.add_parser("runs", parents=[common], help="list recent runs; `runs show ID` for one")
    runs.add_argument("--limit", type=_limit, default=20, help="how many runs to list (default 20)")
    runs.set_defaults(handler=_runs, name="runs")
    runs_sub = runs.add_subparsers(dest="runs_command", metavar="show")
    show = runs_sub.add_parser("show", parents=[common], help="one run with its steps")
    show.add_argument("run_id", metavar="RUN_ID", help="a run id or a unique prefix of one")
    show.set_defaults(handler=_runs_show, name="runs show")

    cache = commands.add_parser("cache", parents=[common], help="cache statistics, clearing, verification")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True, metavar="{stats,clear,verify,gc}")
    stats = cache_sub.add_parser("stats", parents=[common], help="entries, bytes, hits, time saved")
    stats.set_defaults(handler=_cache_stats, name="cache stats")
    clear = cache_sub.add_parser("clear", parents=[common], help="remove cache entries")
    clear.add_argument("--step", metavar="NAME", default=None, help="only this step's entries")
    clear.set_defaults(handler=_cache_clear, name="cache clear")
    verify = cache_sub.add_parser("verify", parents=[common], help="integrity check and artifact re-hash")
    verify.set_defaults(handler=_cache_verify, name="cache verify")
    gc = cache_sub.add_parser("gc", parents=[common], help="remove files left by crashes")
    gc.set_defaults(handler=_cache_gc, name="cache gc")

    lineage = commands.add_parser("lineage", parents=[common], help="where an output came from")
    lineage.add_argument("output", metavar="OUTPUT", help="an output name")
    lineage.add_argument("--run", metavar="RUN_ID", default=None, help="that run (default: the latest)")
    lineage.set_defaults(handler=_lineage, name="lineage")

    explain = commands.add_parser(
        "explain",
        parents=[common],
        help="why a step ran or was cached, and what changed since its previous run",
    )
    explain.add_argument("run_id", metavar="RUN_ID", help="a run id or a unique prefix of one")
    explain.add_argument("step", metavar="STEP", help="a step name of that run")
    explain.set_defaults(handler=_explain, name="explain")
    _cli_run.register(parser, commands, common, runs, show)  # run, dag, report, --version, runs filters
    _cli_assets.add_commands(commands, common)
    return parser


async def _dispatch(handler: _Command, root: Path, args: argparse.Namespace) -> int:
    async with await Store.open(root, create=False) as store:
        try:
            code = await handler(store, args)
        except sqlite3.DatabaseError as exc:
            _err(f"the store database {root / DB_NAME} is damaged ({exc}); `flowyml cache verify` checks it")
            code = 1
        for note in store.damaged:
            _err(f"damaged row skipped: {note}")
        return 1 if store.damaged else code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``flowyml`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (2) and --help (0)
        return exc.code if isinstance(exc.code, int) else 2
    direct = _cli_run.direct_command(args)
    if direct is not None:  # run, dag: no store needed up front
        return direct(args)
    root = resolve_root(getattr(args, "dir", None))
    if getattr(args, "assets", False):
        return _cli_assets.run(root, args)
    name: str = args.name
    if name == "cache clear" and args.step is not None:
        name = "cache clear --step"
    if not (root / DB_NAME).is_file():
        message, code, to_stderr = _NO_STORE[name]
        arg = getattr(args, "run_id", None) or getattr(args, "output", None) or getattr(args, "step", None)
        text = message.format(root=root, arg=arg)
        if to_stderr:
            _err(text)
        else:
            print(text)
        return code
    try:
        return asyncio.run(_dispatch(args.handler, root, args))
    except StoreError as exc:
        _err(str(exc))
        return 1
    except sqlite3.Error as exc:
        _err(f"cannot read the flowyml store at {root}: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`flowyml runs | head`): stop quietly, like a tool killed by SIGPIPE.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
