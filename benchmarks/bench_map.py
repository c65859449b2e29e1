"""Mapped steps against their raw-asyncio floors, measured side by side in one process.

Each workload runs on flowyml and on a bare ``asyncio`` floor doing the same awaits, alternating,
several times; the median of each is reported with the ratio. Absolute times drift on a shared
machine; ratios taken in the same run are what we compare against the targets.

    M1  one source of 1,000 items, a mapped async step sleeping 10 ms each, a fan-in
        floor: a TaskGroup of the 1,000 sleeps                                   target <= 1.3x
        (also Dask's client.map of the same 1,000 sleeps on a LocalCluster, for comparison)
    M2  100,000 items of a no-op mapped async step, lineage recorded per item
        floor: a TaskGroup of 100,000 no-op tasks; compared per item              target <= 3x
    M3  two mapped stages of 1,000 items, 10 ms each, at most 100 items of each stage at once
        pipelined floor: each item's two awaits in one task (two semaphores)      target <= 1.2x
        barrier floor: all of stage one, then all of stage two          flowyml well under it
        (without a concurrency limit both floors are one 20 ms round, so the limit is what
        shows the barrier)
    M4  a 1,000,000-item async generator through a mapped no-op step with concurrency=100,
        each side in a fresh interpreter: peak RSS                                 target < 300 MB

Run: ``python benchmarks/bench_map.py [--repeat N] [--only M1,M3] [--no-dask] [--json out.json]``
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from flowyml import Pipeline, step

# --- the work ---------------------------------------------------------------------------------


async def noop(x: Any = None) -> Any:
    return x


async def sleep10(x: Any) -> Any:
    await asyncio.sleep(0.01)
    return x


def sleep10_sync(x: Any) -> Any:
    time.sleep(0.01)
    return x


def total(values: list[Any]) -> int:
    return len(values)


def items(n: int) -> Callable[[], list[int]]:
    def source() -> list[int]:
        return list(range(n))

    return source


async def numbers(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i


# --- flowyml pipelines ------------------------------------------------------------------------


def m1_pipeline(n: int = 1000) -> Pipeline:
    p = Pipeline("m1", enable_cache=False, lineage=False)
    p.add_step(step(name="source", outputs=["xs"])(items(n)))
    p.add_step(step(name="io", inputs=["xs"], outputs=["ys"], map_over="xs")(sleep10))
    p.add_step(step(name="fan_in", inputs=["ys"], outputs=["total"])(total))
    return p


def m2_pipeline(n: int = 100_000, cache_dir: str | None = None) -> Pipeline:
    p = Pipeline("m2", enable_cache=False, lineage=True, cache_dir=cache_dir)
    p.add_step(step(name="source", outputs=["xs"])(items(n)))
    p.add_step(step(name="noop", inputs=["xs"], outputs=["ys"], map_over="xs")(noop))
    return p


def m3_pipeline(n: int = 1000) -> Pipeline:
    p = Pipeline("m3", enable_cache=False, lineage=False)
    p.add_step(step(name="source", outputs=["xs"])(items(n)))
    p.add_step(step(name="one", inputs=["xs"], outputs=["ys"], map_over="xs", concurrency=100)(sleep10))
    p.add_step(step(name="two", inputs=["ys"], outputs=["zs"], map_over="ys", concurrency=100)(sleep10))
    return p


def m4_pipeline(n: int = 1_000_000) -> Pipeline:
    async def source() -> AsyncIterator[int]:
        for i in range(n):
            yield i

    p = Pipeline("m4", enable_cache=False, lineage=False)
    p.add_step(step(name="source", outputs=["xs"])(source))
    p.add_step(step(name="noop", inputs=["xs"], outputs=["ys"], map_over="xs", concurrency=100)(noop))
    return p


# --- the raw-asyncio floors -------------------------------------------------------------------


async def m1_floor(n: int = 1000) -> None:
    xs = items(n)()
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(sleep10(x)) for x in xs]
    total([t.result() for t in tasks])


async def m2_floor(n: int = 100_000) -> None:
    xs = items(n)()
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(noop(x)) for x in xs]
    total([t.result() for t in tasks])


async def m3_pipelined_floor(n: int = 1000) -> None:
    one, two = asyncio.Semaphore(100), asyncio.Semaphore(100)

    async def item(x: int) -> int:
        async with one:
            y = await sleep10(x)
        async with two:
            return await sleep10(y)  # type: ignore[no-any-return]

    async with asyncio.TaskGroup() as tg:
        for x in items(n)():
            tg.create_task(item(x))


async def m3_barrier_floor(n: int = 1000) -> None:
    async def stage(xs: list[int]) -> list[int]:
        limit = asyncio.Semaphore(100)

        async def item(x: int) -> int:
            async with limit:
                return await sleep10(x)  # type: ignore[no-any-return]

        return list(await asyncio.gather(*(item(x) for x in xs)))

    await stage(await stage(items(n)()))


async def m4_floor(n: int = 1_000_000) -> int:
    """100 workers pulling from a bounded queue fed by the generator; results kept in order."""
    queue: asyncio.Queue[tuple[int, int] | None] = asyncio.Queue(maxsize=400)
    out: list[Any] = []

    async def feed() -> None:
        async for i in numbers(n):
            out.append(None)
            await queue.put((len(out) - 1, i))
        for _ in range(100):
            await queue.put(None)

    async def work() -> None:
        while (got := await queue.get()) is not None:
            index, value = got
            out[index] = await noop(value)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(feed())
        for _ in range(100):
            tg.create_task(work())
    return len(out)


# --- measuring --------------------------------------------------------------------------------


async def timed(fn: Callable[[], Awaitable[Any]]) -> float:
    gc.collect()  # untimed: a full collection must not land at random on one side
    t0 = time.perf_counter()
    await fn()
    return time.perf_counter() - t0


async def side_by_side(sides: dict[str, Callable[[], Awaitable[Any]]], repeat: int) -> dict[str, float]:
    """Median seconds of each side, run in rotating order ``repeat`` times after one warm-up each."""
    for fn in sides.values():
        await fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    order = list(sides)
    for i in range(repeat):
        rotated = order[i % len(order) :] + order[: i % len(order)]
        for name in rotated:
            times[name].append(await timed(sides[name]))
    return {name: statistics.median(ts) for name, ts in times.items()}


async def _checked(pipeline: Pipeline) -> None:
    result = await pipeline.arun()
    assert result.success, result.summary()


async def dask_m1(n: int = 1000) -> float | None:
    """Median seconds of ``client.map`` + ``gather`` of the M1 sleeps, or None without Dask."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        return None
    async with (
        LocalCluster(
            n_workers=2, threads_per_worker=100, processes=False, asynchronous=True, dashboard_address=None
        ) as cluster,
        Client(cluster, asynchronous=True) as client,
    ):

        async def once() -> None:
            futures = client.map(sleep10_sync, range(n), pure=False)
            total(await client.gather(futures))

        await once()
        return statistics.median([await timed(once) for _ in range(3)])


async def measure(name: str, repeat: int, with_dask: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if name == "M1":
        pipeline = m1_pipeline()
        t = await side_by_side({"ours": lambda: _checked(pipeline), "floor": m1_floor}, repeat)
        rows.append(_row("M1", t["ours"], t["floor"], 1000, "total", 1.3))
        if with_dask:
            d = await dask_m1()
            if d is not None:
                rows.append(_row("M1 dask client.map", d, t["floor"], 1000, "total", None))
    elif name == "M2":
        with tempfile.TemporaryDirectory() as tmp:
            pipeline = m2_pipeline(cache_dir=tmp)
            t = await side_by_side(
                {"ours": lambda: _checked(pipeline), "floor": m2_floor}, max(3, repeat // 2)
            )
        rows.append(_row("M2", t["ours"], t["floor"], 100_000, "per-item", 3.0))
    elif name == "M3":
        pipeline = m3_pipeline()
        t = await side_by_side(
            {
                "ours": lambda: _checked(pipeline),
                "pipelined": m3_pipelined_floor,
                "barrier": m3_barrier_floor,
            },
            repeat,
        )
        rows.append(_row("M3 vs pipelined", t["ours"], t["pipelined"], 1000, "total", 1.2))
        rows.append(_row("M3 vs barrier", t["ours"], t["barrier"], 1000, "total", 0.8))
    elif name == "M4":
        ours = _fresh("ours")
        floor = _fresh("floor")
        row = _row("M4", ours["seconds"], floor["seconds"], 1_000_000, "per-item", None)
        row["flowyml_peak_rss_mb"] = ours["rss_mb"]
        row["floor_peak_rss_mb"] = floor["rss_mb"]
        row["ok"] = ours["rss_mb"] < 300
        rows.append(row)
    else:
        raise SystemExit(f"unknown workload {name!r}; use M1, M2, M3, M4")
    return rows


def _row(name: str, ours: float, floor: float, n: int, mode: str, target: float | None) -> dict[str, Any]:
    ratio = ours / floor
    return {
        "workload": name,
        "flowyml_s": ours,
        "floor_s": floor,
        "us_per_item": ours / n * 1e6,
        "floor_us_per_item": floor / n * 1e6,
        "ratio": ratio,
        "target": target,
        "compare": mode,
        "ok": target is None or ratio <= target,
    }


def _fresh(side: str) -> dict[str, float]:
    """Run M4's ``side`` in a fresh interpreter; its seconds and peak RSS in MB."""
    out = subprocess.check_output([sys.executable, __file__, "--m4-side", side], text=True)
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _peak_rss_mb() -> float:
    """This process's peak resident set: VmHWM (ru_maxrss would include the parent's, kept across exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _m4_side(side: str) -> None:
    async def ours() -> None:
        result = await m4_pipeline().arun()
        assert result.success, result.summary()
        assert len(result["ys"]) == 1_000_000

    async def floor() -> None:
        assert await m4_floor() == 1_000_000

    t0 = time.perf_counter()
    asyncio.run(ours() if side == "ours" else floor())
    seconds = time.perf_counter() - t0
    rss_mb = _peak_rss_mb()
    print(json.dumps({"seconds": seconds, "rss_mb": rss_mb}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", default="M1,M2,M3,M4")
    parser.add_argument("--no-dask", action="store_true", help="skip the Dask comparison in M1")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--m4-side", choices=["ours", "floor"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.m4_side:
        _m4_side(args.m4_side)
        return 0
    rows: list[dict[str, Any]] = []
    print(f"{'':20} {'flowyml':>10} {'floor':>10} {'us/item':>9} {'floor us':>9} {'ratio':>7} {'target':>7}")
    for name in args.only.split(","):
        for row in asyncio.run(measure(name.strip(), args.repeat, not args.no_dask)):
            rows.append(row)
            target = "" if row["target"] is None else f"{row['target']:6.2f}x"
            extra = ""
            if "flowyml_peak_rss_mb" in row:
                extra = f"  peak RSS {row['flowyml_peak_rss_mb']:.0f} MB (floor {row['floor_peak_rss_mb']:.0f} MB, target < 300 MB)"
            print(
                f"{row['workload']:20} {row['flowyml_s'] * 1e3:8.1f}ms {row['floor_s'] * 1e3:8.1f}ms "
                f"{row['us_per_item']:9.2f} {row['floor_us_per_item']:9.2f} {row['ratio']:6.2f}x {target:>7} "
                f"{'ok' if row['ok'] else 'MISS'}{extra}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
