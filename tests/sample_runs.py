"""Real runs that the report tests and benchmarks draw: built here once, run for real."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from flowyml import If, Pipeline, PipelineResult, step
from flowyml.testing import no_sleep


def _work(i: int) -> Any:
    @step(name=f"work_{i:02d}", inputs=["base"], outputs=[f"w{i}"], resources={"cpu": 1})
    def work(base: list[int]) -> int:
        time.sleep(0.002 * (i % 5))
        return sum(base) + i

    return work


def _extra(i: int, source: str) -> Any:
    @step(name=f"extra_{i}", inputs=[source], outputs=[f"e{i}"], execution_group="post")
    def extra(value: int) -> int:
        return value + i

    return extra


def fifty_step_pipeline(store: Path, attempts: dict[str, int]) -> Pipeline:
    """51 steps, 50 of which run: 40 parallel workers, a retried step, a failure and its
    skipped consumer, an ``If`` with one branch chosen, a context parameter, an execution group."""

    @step(outputs=["base"])
    def src(size: int) -> list[int]:
        return list(range(size))

    @step(inputs=["base"], outputs=["flaky"], retry=2, cache=False)
    def flaky(base: list[int]) -> int:
        attempts["flaky"] = attempts.get("flaky", 0) + 1
        if attempts["flaky"] % 2 == 1:
            raise ConnectionError("first attempt of every run fails")
        return len(base)

    @step(inputs=["base"], outputs=["broken"], cache=False)
    def broken(base: list[int]) -> int:
        raise ValueError(f"cannot handle {len(base)} items")

    @step(inputs=["broken"], outputs=["after"])
    def after_broken(value: int) -> int:
        return value

    @step(inputs=[f"w{i}" for i in range(40)], outputs=["total"])
    def gather(*parts: int) -> int:
        return sum(parts)

    @step(inputs=["total", "flaky"], outputs=["verdict"])
    def report_big(total: int, flaky: int) -> str:
        return f"big {total} {flaky}"

    @step(inputs=["total"], outputs=["small"])
    def report_small(total: int) -> str:
        return "small"

    pipeline = Pipeline("fifty", context={"size": 10}, cache_dir=store, max_concurrency=8)
    pipeline.add_step(src).add_step(flaky).add_step(broken).add_step(after_broken)
    for i in range(40):
        pipeline.add_step(_work(i))
    pipeline.add_step(gather)
    pipeline.add_control_flow(If(lambda c: c.steps["gather"].outputs["total"] > 10, report_big, report_small))
    previous = "total"
    for i in range(4):
        pipeline.add_step(_extra(i, previous))
        previous = f"e{i}"
    return pipeline


def fifty_step_run(store: Path) -> PipelineResult:
    """The second run of :func:`fifty_step_pipeline`: cache hits, one retry, one failure."""
    attempts: dict[str, int] = {}
    pipeline = fifty_step_pipeline(store, attempts)
    with no_sleep():
        pipeline.run(fail_fast=False)
        return pipeline.run(fail_fast=False)


def wide_pipeline(n: int, store: Path | None = None, *, fail_every: int = 0) -> Pipeline:
    """One source, ``n - 2`` independent async steps and a sink: the shape of a big fan-out.

    With ``fail_every=k``, every k-th fan step raises (and is never cached), so the sink is skipped.
    """

    @step(outputs=["seed"])
    async def seed() -> int:
        return 1

    pipeline = Pipeline(
        f"wide{n}", cache_dir=store, enable_cache=store is not None, lineage=store is not None
    )
    pipeline.add_step(seed)
    names = []
    for i in range(n - 2):
        names.append(f"v{i}")
        fails = bool(fail_every) and i % fail_every == fail_every - 1

        @step(name=f"fan_{i:05d}", inputs=["seed"], outputs=[f"v{i}"], cache=not fails and "code_hash")
        async def fan(value: int, _i: int = i, _fails: bool = fails) -> int:
            if _fails:
                raise RuntimeError(f"fan step {_i} fails on purpose")
            return value + _i

        pipeline.add_step(fan)

    @step(inputs=names, outputs=["sum"])
    async def sink(*values: int) -> int:
        return sum(values)

    pipeline.add_step(sink)
    return pipeline
