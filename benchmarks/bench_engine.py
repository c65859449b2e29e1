"""Engine overhead against the raw-asyncio floor, measured side by side in one process.

Each workload runs on flowyml and on a bare ``asyncio.TaskGroup`` awaiting the same coroutines
(or the same blocking calls in a same-sized thread pool), alternating, several times; the
median of each is reported with the ratio. Absolute times drift on a shared machine; ratios
taken in the same run are what we compare against the targets.

    W1  one source, 1,000 async steps sleeping 10 ms, one fan-in        target <= 2x
    W2  a chain of 500 no-op async steps (per-step cost vs per-task)    target <= 3x
    W3  5,000 independent no-op async steps and one fan-in (per step)   target <= 3x
    W4  200 sync steps sleeping 50 ms on 32 threads                      target <= 1.1x
    W5  4 CPU-bound steps of ~0.5 s in the process pool (2 workers)      target <= 1.15x
        (both sides start and stop their pool inside the timed run)

Watching W3 (issue 12), each against the same floor; the targets are relative to plain W3:

    W3-watch  W3 plain, with a no-op on_event listener (W3-noop, target: at most 1.5 us/step
              more) and with the flowyml logger at INFO to its NullHandler (W3-log, target:
              within 3% of W3), the three and the floor interleaved in one loop

Run: ``python benchmarks/bench_engine.py [--repeat N] [--only W1,W3-watch] [--json out.json] [--cpu]``

"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

from flowyml import Pipeline, step


async def noop(*_: Any) -> Any:
    return None


async def sleep10(*_: Any) -> None:
    await asyncio.sleep(0.01)


def block50(*_: Any) -> None:
    time.sleep(0.05)


def burn(iterations: int) -> int:
    """Pure-Python CPU work for W5."""
    total = 0
    for i in range(iterations):
        total += i * i % 7
    return total


_ITERATIONS: list[int] = []


def burn_iterations() -> int:
    """Iterations that make :func:`burn` take about 0.5 s here (measured once)."""
    if not _ITERATIONS:
        n = 200_000
        t0 = time.perf_counter()
        burn(n)
        _ITERATIONS.append(int(n * 0.5 / (time.perf_counter() - t0)))
    return _ITERATIONS[0]


# --- flowyml pipelines -----------------------------------------------------------------------


def w1_pipeline(n: int = 1000) -> Pipeline:
    p = Pipeline("w1", enable_cache=False, lineage=False)
    p.add_step(step(name="source", outputs=["src"])(noop))
    for i in range(n):
        p.add_step(step(name=f"io{i}", inputs=["src"], outputs=[f"r{i}"])(sleep10))
    p.add_step(step(name="fan_in", inputs=[f"r{i}" for i in range(n)], outputs=["total"])(noop))
    return p


def w2_pipeline(n: int = 500) -> Pipeline:
    p = Pipeline("w2", enable_cache=False, lineage=False)
    p.add_step(step(name="s0", outputs=["v0"])(noop))
    for i in range(1, n):
        p.add_step(step(name=f"s{i}", inputs=[f"v{i - 1}"], outputs=[f"v{i}"])(noop))
    return p


def w3_pipeline(n: int = 5000) -> Pipeline:
    p = Pipeline("w3", enable_cache=False, lineage=False)
    for i in range(n):
        p.add_step(step(name=f"s{i}", outputs=[f"r{i}"])(noop))
    p.add_step(step(name="fan_in", inputs=[f"r{i}" for i in range(n)], outputs=["total"])(noop))
    return p


def w4_pipeline(n: int = 200) -> Pipeline:
    p = Pipeline("w4", enable_cache=False, lineage=False, max_threads=32)
    for i in range(n):
        p.add_step(step(name=f"s{i}", outputs=[f"r{i}"])(block50))
    return p


def w5_pipeline(n: int = 4) -> Pipeline:
    p = Pipeline(
        "w5", enable_cache=False, lineage=False, max_processes=2, context={"iterations": burn_iterations()}
    )
    for i in range(n):
        p.add_step(step(name=f"cpu{i}", outputs=[f"r{i}"], executor="process")(burn))
    return p


# --- the raw-asyncio floor -------------------------------------------------------------------


async def w1_floor(n: int = 1000) -> None:
    src = await noop()
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(sleep10(src)) for _ in range(n)]
    await noop(*[t.result() for t in tasks])


async def w2_floor(n: int = 500) -> None:
    v = None
    async with asyncio.TaskGroup() as tg:
        for _ in range(n):
            v = await tg.create_task(noop(v))


async def w3_floor(n: int = 5000) -> None:
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(noop()) for _ in range(n)]
    await noop(*[t.result() for t in tasks])


async def w4_floor(n: int = 200) -> None:
    loop = asyncio.get_running_loop()

    async def one(pool: ThreadPoolExecutor) -> None:
        await loop.run_in_executor(pool, block50)

    with ThreadPoolExecutor(32) as pool:
        async with asyncio.TaskGroup() as tg:
            for _ in range(n):
                tg.create_task(one(pool))


async def w5_floor(n: int = 4) -> None:
    loop = asyncio.get_running_loop()
    iterations = burn_iterations()
    with ProcessPoolExecutor(2) as pool:
        await asyncio.gather(*(loop.run_in_executor(pool, burn, iterations) for _ in range(n)))


# --- measuring -------------------------------------------------------------------------------


CLOCK: list[Callable[[], float]] = [time.perf_counter]
"""What ``timed`` reads: wall time, or this process's CPU time with ``--cpu``."""


async def timed(fn: Callable[[], Awaitable[Any]]) -> float:
    gc.collect()  # untimed: a full collection must not land at random on one side
    clock = CLOCK[0]
    t0 = clock()
    await fn()
    return clock() - t0


def _ignore(event: object) -> None:
    return None


WORKLOADS: dict[str, tuple[Callable[[], Pipeline], Callable[[], Awaitable[None]], int, str, float]] = {
    # name: (pipeline, floor, steps for per-step figures, how to compare, target)
    "W1": (w1_pipeline, w1_floor, 1002, "total", 2.0),
    "W2": (w2_pipeline, w2_floor, 500, "per-step", 3.0),
    "W3": (w3_pipeline, w3_floor, 5001, "per-step", 3.0),
    "W4": (w4_pipeline, w4_floor, 200, "total", 1.1),
    "W5": (w5_pipeline, w5_floor, 4, "total", 1.15),
}


async def measure(name: str, repeat: int) -> dict[str, Any]:
    make, floor, steps, mode, target = WORKLOADS[name]
    pipeline = make()
    result = await pipeline.arun()  # warm-up; also builds and caches the plan
    assert result.success, result.summary()
    await floor()
    ours: list[float] = []
    base: list[float] = []
    for i in range(repeat):
        pair: list[tuple[str, Callable[[], Awaitable[Any]]]] = [("ours", pipeline.arun), ("floor", floor)]
        if i % 2:
            pair.reverse()
        for label, fn in pair:
            (ours if label == "ours" else base).append(await timed(fn))
    o, b = statistics.median(ours), statistics.median(base)
    ratio = o / b
    return {
        "workload": name,
        "flowyml_s": o,
        "floor_s": b,
        "flowyml_us_per_step": o / steps * 1e6,
        "floor_us_per_task": b / steps * 1e6,
        "ratio": ratio,
        "target": target,
        "compare": mode,
        "ok": ratio <= target,
    }


async def measure_watched(repeat: int) -> list[dict[str, Any]]:
    """W3 plain, with a no-op listener, and with INFO logging, interleaved with the floor.

    The four runs rotate within each repetition, so a change in the machine's load hits all of
    them alike; each is reported as a ratio to the floor, and the listener's cost per step is
    the difference of ratios times the floor's time per task.
    """
    pipeline = w3_pipeline()
    log = logging.getLogger("flowyml")

    async def plain() -> None:
        await pipeline.arun()

    async def noop_listener() -> None:
        await pipeline.arun(on_event=_ignore)

    async def info_logging() -> None:
        level, log.level = log.level, logging.INFO
        try:
            await pipeline.arun()
        finally:
            log.setLevel(level)

    runs: dict[str, Callable[[], Awaitable[Any]]] = {
        "floor": w3_floor,
        "W3": plain,
        "W3-noop": noop_listener,
        "W3-log": info_logging,
    }
    for fn in runs.values():
        await fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for i in range(repeat):
        for name in order[i % 4 :] + order[: i % 4]:
            times[name].append(await timed(runs[name]))
    floor = statistics.median(times["floor"])
    steps = 5001
    rows = []
    for name in ("W3", "W3-noop", "W3-log"):
        o = statistics.median(times[name])
        rows.append(
            {
                "workload": name,
                "flowyml_s": o,
                "floor_s": floor,
                "flowyml_us_per_step": o / steps * 1e6,
                "floor_us_per_task": floor / steps * 1e6,
                "ratio": o / floor,
                "target": 3.0,
                "compare": "per-step",
                "ok": o / floor <= 3.0,
            }
        )
    return rows


def import_time(samples: int = 5) -> float:
    """Median seconds for ``import flowyml`` in a fresh interpreter (target: under 150 ms)."""
    code = "import time; t = time.perf_counter(); import flowyml; print(time.perf_counter() - t)"
    runs = [float(subprocess.check_output([sys.executable, "-c", code], text=True)) for _ in range(samples)]
    return statistics.median(runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--only", default="W1,W2,W3,W4,W5,W3-watch")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="time with this process's CPU time instead of wall time: steady on a loaded machine, "
        "and meaningful only for workloads that run on the loop (W2, W3, W3-watch)",
    )
    args = parser.parse_args(argv)
    if args.cpu:
        CLOCK[0] = time.process_time
    rows = []
    print(f"{'':7} {'flowyml':>10} {'floor':>10} {'us/step':>9} {'us/task':>9} {'ratio':>7} {'target':>7}")
    for name in args.only.split(","):
        name = name.strip()
        found = (
            asyncio.run(measure_watched(args.repeat))
            if name == "W3-watch"
            else [asyncio.run(measure(name, args.repeat))]
        )
        rows += found
        for row in found:
            print(
                f"{row['workload']:7} {row['flowyml_s'] * 1e3:8.1f}ms {row['floor_s'] * 1e3:8.1f}ms "
                f"{row['flowyml_us_per_step']:9.1f} {row['floor_us_per_task']:9.1f} "
                f"{row['ratio']:6.2f}x {row['target']:6.2f}x {'ok' if row['ok'] else 'MISS'}"
            )
        if name == "W3-watch":
            plain, noop, info = found
            extra = (noop["ratio"] - plain["ratio"]) * plain["floor_us_per_task"]
            print(f"  no-op listener: {extra:+.2f} us/step over W3 (target <= +1.5)")
            print(f"  INFO logging:   {info['ratio'] / plain['ratio']:.3f}x of W3's ratio (target <= 1.03x)")
    took = import_time()
    print(f"import flowyml: {took * 1e3:.1f} ms (target < 150 ms) {'ok' if took < 0.150 else 'MISS'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
