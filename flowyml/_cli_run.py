"""Command-line commands that run and picture pipelines, plus JSON and filters for ``runs``.

    flowyml run FILE.py:PIPELINE | MODULE:PIPELINE [--param K=V ...] [--no-cache]
                [--fail-fast | --keep-going] [--report run.html]
    flowyml dag FILE.py:PIPELINE                 the pipeline's Mermaid flowchart
    flowyml report RUN_ID -o run.html            a recorded run's HTML report
    flowyml runs [--pipeline P] [--status S] [--limit N] [--json]
    flowyml runs show RUN_ID [--json]

``run`` exits 0 when every step succeeded (or was cached, or skipped by a condition), 1 when a
step failed, and 2 for usage and validation errors (a bad target, a bad ``--param``, a graph or
context error found before any step runs), printed as one message without a traceback.
``PIPELINE`` names a :class:`~flowyml.Pipeline` in the file or module, or a function taking no
arguments that returns one.
"""

from __future__ import annotations

__all__ = ("NO_STORE", "register")

import argparse
import asyncio
import dataclasses
import difflib
import importlib
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._errors import FlowymlError

if TYPE_CHECKING:
    from ._pipeline import Pipeline
    from ._store import Store

#: What the store-reading commands added here do when there is no store (see ``_cli``).
NO_STORE: dict[str, tuple[str, int, bool]] = {
    "report": ("no flowyml store at {root}, so no run {arg!r} to report.", 1, True),
}


#: How a recorded run can stand: still running, or how it ended (``Pipeline.arun``).
RUN_STATES = ("running", "completed", "failed", "cancelled", "interrupted")


class UsageError(Exception):
    """A mistake on the command line: printed as ``flowyml: message``, exit code 2."""


def _err(message: str) -> None:
    print(f"flowyml: {message}", file=sys.stderr)


# -- loading a pipeline ----------------------------------------------------------------------------


def load_pipeline(target: str) -> Pipeline:
    """The pipeline named by ``FILE.py:NAME`` or ``MODULE:NAME``.

    Raises:
        UsageError: the target is malformed, cannot be imported, or names no pipeline.
    """
    from ._pipeline import Pipeline

    where, sep, attr = target.rpartition(":")
    if not sep or not where or not attr:
        raise UsageError(
            f"target {target!r} must be FILE.py:PIPELINE or MODULE:PIPELINE, e.g. pipelines/train.py:pipeline"
        )
    module = _import(where)
    if not hasattr(module, attr):
        found = sorted(n for n, v in vars(module).items() if isinstance(v, Pipeline))
        hint = f"pipelines there: {', '.join(found)}" if found else "it defines no Pipeline at module level"
        raise UsageError(f"{where!r} has no attribute {attr!r}; {hint}")
    obj = getattr(module, attr)
    if not isinstance(obj, Pipeline) and callable(obj):
        try:
            obj = obj()
        except Exception as exc:  # a factory needing arguments, or failing: the user's code
            raise UsageError(
                f"calling {target!r} without arguments failed: {type(exc).__name__}: {exc}"
            ) from None
    if not isinstance(obj, Pipeline):
        raise UsageError(f"{target!r} is a {type(obj).__name__}, not a flowyml Pipeline")
    return obj


def _import(where: str) -> Any:
    path = Path(where)
    is_file = where.endswith(".py") or "/" in where or "\\" in where
    try:
        if not is_file:
            return importlib.import_module(where)
        if not path.is_file():
            raise UsageError(f"no file {where!r}")
        # Importable by its own name from its folder, as `python file.py` would make it, so
        # process workers (which get this sys.path) can import the steps' module too.
        folder = str(path.resolve().parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        name = path.stem
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise UsageError(f"cannot import {where!r} as a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    except UsageError:
        raise
    except FlowymlError as exc:
        raise UsageError(f"importing {where!r} failed: {exc}") from None
    except Exception as exc:
        raise UsageError(f"importing {where!r} failed: {type(exc).__name__}: {exc}") from None


def parse_param(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``: the value parsed as JSON when it parses, else kept as a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--param needs KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


def _check_params(pipeline: Pipeline, params: dict[str, Any]) -> None:
    """Refuse a ``--param`` no step takes (a typo would otherwise run with the default silently).

    Skipped when the pipeline has ``If`` conditions: they may read any name from ``ctx.params``.

    Raises:
        UsageError: naming the unknown parameter, close matches and the parameters there are.
    """
    from ._graph import CONTEXT

    plan = pipeline.plan()
    if plan.gates:
        return
    taken = sorted({src.name for node in plan.nodes for _, src in node.sources() if src.kind == CONTEXT})
    for key in params:
        if key not in taken:
            close = difflib.get_close_matches(key, taken, n=3)
            hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
            known = ", ".join(taken) if taken else "none"
            raise UsageError(
                f"--param {key!r} is not a parameter of any step; {hint}parameters of this pipeline: {known}"
            )


# -- commands that need no store -------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    try:
        pipeline = load_pipeline(args.target)
        if args.no_cache:
            pipeline.enable_cache = False
        if getattr(args, "dir", None):
            pipeline.cache_dir = args.dir
        params = dict(args.param or [])
        _check_params(pipeline, params)
        if args.report and Path(args.report).is_dir():
            raise UsageError(
                f"--report {args.report!r} is a directory; name a file, e.g. {args.report}/run.html"
            )
        result = pipeline.run(params or None, fail_fast=args.fail_fast, progress=args.progress or None)
    except UsageError as exc:
        _err(str(exc))
        return 2
    except FlowymlError as exc:  # graph, context and configuration errors, before any step ran
        _err(str(exc))
        return 2
    except KeyboardInterrupt:
        return 130
    print(result.summary())
    print(f"run id: {result.run_id}")
    if args.report:
        try:
            result.report(args.report)
        except OSError as exc:
            _err(f"the run is recorded, but its report could not be written to {args.report!r}: {exc}")
            return 2
        print(f"report: {args.report}")
    return 0 if result.success else 1


def _dag(args: argparse.Namespace) -> int:
    try:
        pipeline = load_pipeline(args.target)
        text = pipeline.to_mermaid()
    except UsageError as exc:
        _err(str(exc))
        return 2
    except FlowymlError as exc:
        _err(str(exc))
        return 2
    sys.stdout.write(text)
    return 0


# -- commands that read the store ------------------------------------------------------------------


async def _report_data(store: Store, run_id: str) -> dict[str, Any] | None:
    from ._report import records_to_dict

    detail = await store.get_run(run_id)
    if detail is None:
        return None
    keys = sorted({s.cache_key for s in detail.steps if s.cache_key})
    found = await asyncio.gather(*(store.lookup(k) for k in keys))
    entries = {k: e for k, e in zip(keys, found, strict=True) if e is not None}
    return records_to_dict(detail, entries)


async def _report(store: Store, args: argparse.Namespace) -> int:
    from ._cli import _resolve_run
    from ._report import write_report

    run_id = await _resolve_run(store, args.run_id)
    if run_id is None:
        return 1
    data = await _report_data(store, run_id)
    if data is None:
        _err(f"no run {args.run_id!r} in {store.root}.")
        return 1
    try:
        write_report(data, args.output)
    except OSError as exc:
        _err(f"cannot write the report of run {run_id} to {args.output!r}: {exc}")
        return 2
    print(f"report of run {run_id}: {args.output}")
    return 0


async def _runs_show(store: Store, args: argparse.Namespace) -> int:
    from ._cli import _resolve_run
    from ._cli import _runs_show as text_show

    if not args.json:
        return await text_show(store, args)
    run_id = await _resolve_run(store, args.run_id)
    if run_id is None:
        return 1
    data = await _report_data(store, run_id)
    if data is None:
        _err(f"no run {args.run_id!r} in {store.root}.")
        return 1
    print(json.dumps(data, indent=2, default=str))
    return 0


async def _runs(store: Store, args: argparse.Namespace) -> int:
    from ._cli import _runs_table

    filtered = args.pipeline is not None or args.status is not None
    runs = await store.runs(limit=sys.maxsize if filtered else args.limit)
    runs = [
        r
        for r in runs
        if (args.pipeline is None or r.pipeline_name == args.pipeline)
        and (args.status is None or r.status == args.status)
    ][: args.limit]
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in runs], indent=2))
        return 0
    if not runs:
        print("No runs recorded yet." if not filtered else "No recorded run matches those filters.")
        return 0
    print(_runs_table(runs))
    return 0


# -- wiring ----------------------------------------------------------------------------------------


def _version() -> str:
    from . import __version__

    return f"flowyml {__version__}"


def register(
    parser: argparse.ArgumentParser,
    commands: Any,
    common: argparse.ArgumentParser,
    runs: argparse.ArgumentParser,
    show: argparse.ArgumentParser,
) -> None:
    """Add ``run``, ``dag``, ``report``, ``--version`` and the ``runs`` filters to the ``flowyml`` parser.

    Commands that need no store set ``direct`` (called with the arguments); the others set
    ``handler`` like the rest of ``_cli``.
    """
    parser.add_argument("--version", action="version", version=_version())

    run = commands.add_parser(
        "run", parents=[common], help="run a pipeline: FILE.py:PIPELINE or MODULE:PIPELINE"
    )
    run.add_argument("target", metavar="TARGET", help="FILE.py:PIPELINE or MODULE:PIPELINE")
    run.add_argument(
        "--param",
        action="append",
        type=parse_param,
        metavar="KEY=VALUE",
        help="a context parameter for this run; VALUE is read as JSON when it parses, else as text",
    )
    run.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    fail = run.add_mutually_exclusive_group()
    fail.add_argument(
        "--fail-fast",
        dest="fail_fast",
        action="store_true",
        default=True,
        help="stop at the first failure (default)",
    )
    fail.add_argument(
        "--keep-going",
        dest="fail_fast",
        action="store_false",
        help="let branches not depending on a failure finish",
    )
    run.add_argument("--report", metavar="PATH", default=None, help="also write the run's HTML report there")
    run.add_argument(
        "--progress",
        action="store_true",
        help="show the run's progress on stderr (as FLOWYML_PROGRESS=1 does)",
    )
    run.set_defaults(direct=_run, name="run")

    dag = commands.add_parser("dag", parents=[common], help="print a pipeline's Mermaid flowchart")
    dag.add_argument("target", metavar="TARGET", help="FILE.py:PIPELINE or MODULE:PIPELINE")
    dag.set_defaults(direct=_dag, name="dag")

    report = commands.add_parser("report", parents=[common], help="write a recorded run's HTML report")
    report.add_argument("run_id", metavar="RUN_ID", help="a run id or a unique prefix of one")
    report.add_argument("-o", "--output", metavar="PATH", default="run.html", help="where (default run.html)")
    report.set_defaults(handler=_report, name="report")

    runs.add_argument("--pipeline", metavar="NAME", default=None, help="only runs of this pipeline")
    runs.add_argument(
        "--status",
        choices=RUN_STATES,
        default=None,
        help="only runs with this status",
    )
    runs.add_argument("--json", action="store_true", help="print JSON instead of a table")
    runs.set_defaults(handler=_runs)
    show.add_argument("--json", action="store_true", help="print the run's report data as JSON")
    show.set_defaults(handler=_runs_show)


def direct_command(args: argparse.Namespace) -> Callable[[argparse.Namespace], int] | None:
    """The store-free command the arguments select, if any."""
    found: Callable[[argparse.Namespace], int] | None = getattr(args, "direct", None)
    if found is None and getattr(args, "name", None) == "runs" and args.json:
        from ._store import resolve_root
        from ._store._db import DB_NAME

        if not (resolve_root(getattr(args, "dir", None)) / DB_NAME).is_file():
            return _no_runs_json
    return found


def _no_runs_json(args: argparse.Namespace) -> int:
    print("[]")
    return 0
