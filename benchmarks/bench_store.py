"""What the cache and lineage store costs a run, measured side by side in one process.

Every figure is the median of several repetitions; the sides of each comparison alternate (which
one goes first flips every repetition) so drift on a shared machine hits both alike. Absolute times
move with the machine; compare the ratios taken in the same run against the targets of issue 3.

    W3 lineage  5,000 no-op async steps + one fan-in, ``enable_cache=False``, ``lineage=True``
                vs the same with ``lineage=False``                        target <= 1.5x
                vs the raw-asyncio floor (TaskGroup), per step            target <= 4.5x
    W6          the W2 chain (500 no-op steps, each consuming the previous output) rerun with
                every step a cache hit (lineage on), per step            target < 100 us/step
    W3 cached   W3 with caching on: first run (all misses and puts, a fresh store each time)
                and a fully cached rerun, per step                        reported, no target
    CK chained  a 100 MB float64 array, given as a context parameter, passed down a chain of 10
                cached steps: the time spent making keys in one run (first run on a fresh store,
                and the all-hit rerun), per step and in all, vs hashing the array once in this
                process right before the run (median of the per-run ratios). Inputs are
                identified by their producers, so the array is hashed once a run (the first
                step's parameter)                                         target <= 1.2x

Before each timed call the heap is collected (untimed): a full collection costs ~20 ms here, and
without it each side pays at random for garbage the other side left.

The store lives in a temporary directory, removed at the end. The workload shapes and the floors
are those of ``benchmarks/bench_engine.py``.

Run: ``.venv/bin/python benchmarks/bench_store.py [--repeat N] [--only W3,W6,W3C,CK] [--json out.json]``
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from flowyml import Pipeline, step

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import noop, w2_floor, w3_floor

W3_STEPS = 5001
W6_STEPS = 500


def w3(cache_dir: Path, *, cache: bool, lineage: bool, n: int = 5000) -> Pipeline:
    """``bench_engine.w3_pipeline`` with the store switched on as asked."""
    p = Pipeline("w3", enable_cache=cache, lineage=lineage, cache_dir=cache_dir)
    for i in range(n):
        p.add_step(step(name=f"s{i}", outputs=[f"r{i}"])(noop))
    p.add_step(step(name="fan_in", inputs=[f"r{i}" for i in range(n)], outputs=["total"])(noop))
    return p


def w2(cache_dir: Path, *, cache: bool, lineage: bool, n: int = 500) -> Pipeline:
    """``bench_engine.w2_pipeline`` with the store switched on as asked."""
    p = Pipeline("w2", enable_cache=cache, lineage=lineage, cache_dir=cache_dir)
    p.add_step(step(name="s0", outputs=["v0"])(noop))
    for i in range(1, n):
        p.add_step(step(name=f"s{i}", inputs=[f"v{i - 1}"], outputs=[f"v{i}"])(noop))
    return p


async def timed(fn: Callable[[], Awaitable[Any]]) -> float:
    # Each side starts from a collected heap, so that a full collection set off by one side's
    # garbage (~20 ms next to two 5,000-step plans) is not billed to whichever side runs next.
    gc.collect()
    t0 = time.perf_counter()
    await fn()
    return time.perf_counter() - t0


async def alternate(sides: dict[str, Callable[[], Awaitable[Any]]], repeat: int) -> dict[str, float]:
    """Median seconds of each side, run in turn, the order rotating every repetition."""
    for fn in sides.values():  # warm-up (plans, imports, fingerprints)
        await fn()
    times: dict[str, list[float]] = {label: [] for label in sides}
    labels = list(sides)
    for i in range(repeat):
        order = labels[i % len(labels) :] + labels[: i % len(labels)]
        for label in order:
            times[label].append(await timed(sides[label]))
    return {label: statistics.median(t) for label, t in times.items()}


async def checked(pipeline: Pipeline, *, cached: int | None = None) -> None:
    result = await pipeline.arun()
    assert result.success, result.state
    if cached is not None:
        hits = sum(r.cached for r in result.step_results.values())
        assert hits == cached, f"{hits} cache hits, expected {cached}"


async def bench_w3(root: Path, repeat: int) -> dict[str, Any]:
    on = w3(root / "w3", cache=False, lineage=True)
    off = w3(root / "w3", cache=False, lineage=False)
    t = await alternate({"on": lambda: checked(on), "off": lambda: checked(off), "floor": w3_floor}, repeat)
    return {
        "workload": "W3 lineage",
        "on_s": t["on"],
        "off_s": t["off"],
        "floor_s": t["floor"],
        "on_us_per_step": t["on"] / W3_STEPS * 1e6,
        "off_us_per_step": t["off"] / W3_STEPS * 1e6,
        "floor_us_per_task": t["floor"] / W3_STEPS * 1e6,
        "on_vs_off": t["on"] / t["off"],
        "on_vs_floor": t["on"] / t["floor"],
        "ok": t["on"] / t["off"] <= 1.5 and t["on"] / t["floor"] <= 4.5,
    }


async def bench_w6(root: Path, repeat: int) -> dict[str, Any]:
    chain = w2(root / "w6", cache=True, lineage=True)
    await checked(chain)  # fills the cache; every later run is all hits
    t = await alternate({"hits": lambda: checked(chain, cached=W6_STEPS), "floor": w2_floor}, repeat)
    per_step = t["hits"] / W6_STEPS * 1e6
    return {
        "workload": "W6",
        "hits_s": t["hits"],
        "floor_s": t["floor"],
        "hits_us_per_step": per_step,
        "floor_us_per_task": t["floor"] / W6_STEPS * 1e6,
        "ok": per_step < 100,
    }


async def bench_w3_cached(root: Path, repeat: int) -> dict[str, Any]:
    fresh = iter(range(10**6))
    first = w3(root / "w3c-0", cache=True, lineage=True)

    async def first_run() -> None:
        # The same pipeline (its plan is built once) on a new store each time: every step is a
        # miss and a put.
        first.cache_dir = root / f"w3c-{next(fresh)}"
        await checked(first, cached=0)

    rerun = w3(root / "w3c-warm", cache=True, lineage=True)
    await checked(rerun)
    t = await alternate({"first": first_run, "rerun": lambda: checked(rerun, cached=W3_STEPS)}, repeat)
    return {
        "workload": "W3 cached",
        "first_s": t["first"],
        "rerun_s": t["rerun"],
        "first_us_per_step": t["first"] / W3_STEPS * 1e6,
        "rerun_us_per_step": t["rerun"] / W3_STEPS * 1e6,
        "ok": True,
    }


CK_STEPS = 10
CK_BYTES = 100 * 1024 * 1024


def chained(cache_dir: Path) -> Pipeline:
    """Ten cached steps, each passing the array it receives on (the first gets it as ``data``)."""
    p = Pipeline("ck", cache_dir=cache_dir)
    p.add_step(step(name="c0", inputs=["data"], outputs=["a0"])(passthrough))
    for i in range(1, CK_STEPS):
        p.add_step(step(name=f"c{i}", inputs=[f"a{i - 1}"], outputs=[f"a{i}"])(passthrough))
    return p


def passthrough(x: Any) -> Any:
    return x


class KeyClock:
    """Adds up the time the cache hooks spend making keys (and hashing inputs off the loop)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self) -> KeyClock:
        from flowyml._cache import StoreHooks

        self._saved = (StoreHooks._key, StoreHooks._hash_large_inputs)
        key, hash_large = self._saved
        clock = self

        def timed_key(hooks: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return key(hooks, *args, **kwargs)
            finally:
                clock.seconds += time.perf_counter() - t0

        async def timed_hash_large(hooks: Any, *args: Any) -> None:
            t0 = time.perf_counter()
            try:
                await hash_large(hooks, *args)
            finally:
                clock.seconds += time.perf_counter() - t0

        StoreHooks._key = timed_key  # type: ignore[method-assign]
        StoreHooks._hash_large_inputs = timed_hash_large  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        from flowyml._cache import StoreHooks

        StoreHooks._key, StoreHooks._hash_large_inputs = self._saved  # type: ignore[method-assign]


async def bench_chained(root: Path, repeat: int) -> dict[str, Any]:
    import numpy as np

    from flowyml._hashing import content_identity

    def hash_once() -> float:
        t0 = time.perf_counter()
        content_identity(array)
        return time.perf_counter() - t0

    array = np.arange(CK_BYTES // 8, dtype=np.float64)
    pipeline = chained(root / "ck-warm")
    rows: dict[str, list[float]] = {k: [] for k in ("once", "first", "rerun", "first_x", "rerun_x")}
    for i in range(max(1, min(repeat, 5))):
        # The floor is taken right before each run, so both see the same load on a shared machine.
        pipeline.cache_dir = root / f"ck-{i}"
        once = hash_once()
        with KeyClock() as clock:
            result = await pipeline.arun(context={"data": array})
        assert result.success, result.summary()
        assert not any(r.cached for r in result), result.summary()
        rows["once"].append(once)
        rows["first"].append(clock.seconds)
        rows["first_x"].append(clock.seconds / once)
        once = hash_once()
        with KeyClock() as clock:
            result = await pipeline.arun(context={"data": array})
        assert all(r.cached for r in result), result.summary()
        rows["once"].append(once)
        rows["rerun"].append(clock.seconds)
        rows["rerun_x"].append(clock.seconds / once)
        shutil.rmtree(root / f"ck-{i}", ignore_errors=True)
    m = {k: statistics.median(v) for k, v in rows.items()}
    return {
        "workload": "CK chained",
        "hash_once_s": m["once"],
        "first_key_s": m["first"],
        "rerun_key_s": m["rerun"],
        "first_key_us_per_step": m["first"] / CK_STEPS * 1e6,
        "rerun_key_us_per_step": m["rerun"] / CK_STEPS * 1e6,
        "first_vs_once": m["first_x"],
        "rerun_vs_once": m["rerun_x"],
        "ok": m["first_x"] <= 1.2 and m["rerun_x"] <= 1.2,
    }


def report(row: dict[str, Any]) -> str:
    name = row["workload"]
    if name == "CK chained":
        return (
            f"CK chained  hashing 100 MB once {row['hash_once_s'] * 1e3:6.1f} ms   keys of a run: first "
            f"{row['first_key_s'] * 1e3:6.1f} ms ({row['first_key_us_per_step']:7.0f} us/step) = "
            f"{row['first_vs_once']:.2f}x   rerun {row['rerun_key_s'] * 1e3:6.1f} ms "
            f"({row['rerun_key_us_per_step']:7.0f} us/step) = {row['rerun_vs_once']:.2f}x "
            f"(target <= 1.2x)   {'ok' if row['ok'] else 'MISS'}"
        )
    if name == "W3 lineage":
        return (
            f"W3 lineage  on {row['on_s'] * 1e3:7.1f} ms ({row['on_us_per_step']:5.1f} us/step)   "
            f"off {row['off_s'] * 1e3:7.1f} ms ({row['off_us_per_step']:5.1f} us/step)   "
            f"floor {row['floor_s'] * 1e3:6.1f} ms ({row['floor_us_per_task']:4.1f} us/task)\n"
            f"            on/off {row['on_vs_off']:.2f}x (target <= 1.5x)   "
            f"on/floor {row['on_vs_floor']:.2f}x (target <= 4.5x)   {'ok' if row['ok'] else 'MISS'}"
        )
    if name == "W6":
        return (
            f"W6          all-hit chain {row['hits_s'] * 1e3:7.1f} ms = {row['hits_us_per_step']:5.1f} us/step "
            f"(target < 100)   floor {row['floor_us_per_task']:4.1f} us/task   {'ok' if row['ok'] else 'MISS'}"
        )
    return (
        f"W3 cached   first run {row['first_s'] * 1e3:7.1f} ms ({row['first_us_per_step']:5.1f} us/step)   "
        f"cached rerun {row['rerun_s'] * 1e3:7.1f} ms ({row['rerun_us_per_step']:5.1f} us/step)"
    )


BENCHES = {"W3": bench_w3, "W6": bench_w6, "W3C": bench_w3_cached, "CK": bench_chained}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--only", default="W3,W6,W3C,CK")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="flowyml-bench-store-"))
    rows = []
    try:
        for name in args.only.split(","):
            row = asyncio.run(BENCHES[name.strip()](root, args.repeat))
            rows.append(row)
            print(report(row), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
