"""DaskExecutor overhead against plain ``client.submit``, side by side on one LocalCluster.

N tiny tasks (a function returning its argument + 1) run two ways on the same asynchronous
client, alternating which goes first, several times:

    executor  N asyncio tasks, each ``await DaskExecutor.run(...)``: what the engine does per step
    raw       ``client.submit`` of the same N calls, then one ``client.gather``   target: <= 1.5x

Both sides pay the same scheduler round trips; the difference is the executor's own cost (a key,
one await per step, gathering each result on its own) plus N asyncio tasks. Absolute times drift
on a shared machine; the ratio taken in the same run is what we compare with the target.

Run: ``python benchmarks/bench_dask.py [--steps 200] [--repeat 3] [--workers 2] [--json out.json]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from typing import Any

from flowyml._executors._dask import DaskExecutor

TARGET = 1.5


def add_one(x: int) -> int:
    return x + 1


async def via_executor(executor: DaskExecutor, n: int) -> float:
    """N steps through DaskExecutor.run, started together as asyncio tasks, as the engine does."""
    start = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        tasks = [
            tg.create_task(executor.run(add_one, (i,), {}, timeout=None, step_name=f"step{i}"))
            for i in range(n)
        ]
    elapsed = time.perf_counter() - start
    assert [t.result() for t in tasks] == [i + 1 for i in range(n)]
    return elapsed


async def via_client(client: Any, n: int) -> float:
    """The same N calls with plain client.submit and one gather: the floor."""
    start = time.perf_counter()
    futures = [client.submit(add_one, i, pure=False) for i in range(n)]
    results = await client.gather(futures)
    elapsed = time.perf_counter() - start
    assert results == [i + 1 for i in range(n)]
    return elapsed


async def main(steps: int, repeat: int, workers: int) -> dict[str, Any]:
    import distributed as _distributed

    distributed: Any = _distributed  # its constructors are untyped
    async with (
        distributed.LocalCluster(
            asynchronous=True,
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address="127.0.0.1:0",
        ) as cluster,
        distributed.Client(cluster, asynchronous=True, set_as_default=False) as client,
    ):
        executor = DaskExecutor(client)  # the same client for both sides; not closed by the executor
        await via_executor(executor, steps)  # warm up: imports, connections, the function cache
        await via_client(client, steps)
        times: dict[str, list[float]] = {"executor": [], "raw": []}
        for rep in range(repeat):
            order = ("executor", "raw") if rep % 2 == 0 else ("raw", "executor")
            for side in order:
                if side == "executor":
                    t = await via_executor(executor, steps)
                else:
                    t = await via_client(client, steps)
                times[side].append(t)
                print(f"  rep {rep + 1} {side:8s} {t * 1e3:8.1f} ms  ({t / steps * 1e6:7.0f} us/step)")
        await executor.aclose()
    ex, raw = statistics.median(times["executor"]), statistics.median(times["raw"])
    ratio = ex / raw
    print(
        f"median: executor {ex * 1e3:.1f} ms ({ex / steps * 1e6:.0f} us/step), "
        f"raw client.submit {raw * 1e3:.1f} ms ({raw / steps * 1e6:.0f} us/step), "
        f"executor overhead {(ex - raw) / steps * 1e6:+.0f} us/step, "
        f"ratio {ratio:.2f}x (target <= {TARGET}x) {'OK' if ratio <= TARGET else 'OVER'}"
    )
    return {"steps": steps, "workers": workers, "times": times, "ratio": ratio, "target": TARGET}


if __name__ == "__main__":  # worker processes are spawned and re-import this module: keep the guard
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", help="write the figures to this file")
    opts = parser.parse_args()
    report = asyncio.run(main(opts.steps, opts.repeat, opts.workers))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(report, f, indent=2)
    sys.exit(0)
