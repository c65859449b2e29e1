"""What the store costs an application that embeds pipelines: many small runs in one process.

The workload is a 1-step pipeline whose step has ``cache=False``, so what is measured is the
store's own cost per run: opening (once, shared), recording the run and its step (lineage), and
waiting for that record to commit. Each figure is measured with the store on (lineage recorded)
and off (``enable_cache=False, lineage=False``: the floor, in the same process), alternating
which side goes first, median of ``--repeat`` repetitions.

    sequential   N runs, one after another, ``await pipeline.arun()`` on one loop; cost per run
                 target: store-on <= 3x store-off
    concurrent   N runs as batches of B concurrent ``arun()`` (``asyncio.gather``); runs per second
                 target: store-on >= 1/3 of store-off
    loop lag     a ticker task sleeping 1 ms records its worst extra delay, during every phase
                 target: < 10 ms (store on; store off printed beside it, since starting 200
                 runs in one loop turn and full GC collections cost the same on both sides)
    threads      the most threads alive at once (sampled every 0.5 ms by a thread not counted)
                 target: <= max_threads + 4

The step is a plain function (it runs in a worker thread, as in a web handler calling sync code).
The store lives in a temporary directory, removed at the end.

Run: ``.venv/bin/python benchmarks/bench_embedded.py [--runs 2000] [--batch 200] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from flowyml import Pipeline, close_stores, step

MAX_THREADS = 8


def pipeline(root: Path, *, store: bool) -> Pipeline:
    @step(outputs=["y"], cache=False)
    def double(x: int) -> int:
        return 2 * x

    return Pipeline(
        "embedded",
        context={"x": 21},
        cache_dir=root,
        enable_cache=store,
        lineage=store,
        max_threads=MAX_THREADS,
    ).add_step(double)


class Ticker:
    """The worst delay of a task that sleeps 1 ms at a time: how long the loop was kept busy."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(0.001)
            self.worst = max(self.worst, loop.time() - start - 0.001)

    def start(self) -> None:
        self.worst = 0.0
        self._task = asyncio.get_running_loop().create_task(self._tick())

    async def stop(self) -> float:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        return self.worst


class ThreadPeak:
    """The most threads alive at once, not counting the sampling thread itself."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="bench-sampler", daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, threading.active_count() - 1)
            time.sleep(0.0005)

    def __enter__(self) -> ThreadPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def sequential(p: Pipeline, runs: int) -> float:
    start = time.perf_counter()
    for _ in range(runs):
        result = await p.arun()
        assert result["y"] == 42
    return (time.perf_counter() - start) / runs


async def concurrent(p: Pipeline, runs: int, batch: int) -> float:
    start = time.perf_counter()
    done = 0
    while done < runs:
        results = await asyncio.gather(*(p.arun() for _ in range(min(batch, runs - done))))
        assert all(r["y"] == 42 for r in results)
        done += len(results)
    return runs / (time.perf_counter() - start)


async def measure(what: Callable[[], Awaitable[float]], ticker: Ticker, lags: list[float]) -> float:
    gc.collect()
    ticker.start()
    value = await what()
    lags.append(await ticker.stop())
    return value


async def main_async(runs: int, batch: int, repeat: int, root: Path) -> int:
    on, off = pipeline(root, store=True), pipeline(root, store=False)
    ticker = Ticker()
    await on.arun()  # open the shared store and warm both paths up
    await off.arun()
    seq: dict[str, list[float]] = {"on": [], "off": []}
    conc: dict[str, list[float]] = {"on": [], "off": []}
    lags: dict[str, list[float]] = {"on": [], "off": []}
    conc_lags: dict[str, list[float]] = {"on": [], "off": []}
    with ThreadPeak() as threads:
        for i in range(repeat):
            order = [("on", on), ("off", off)] if i % 2 == 0 else [("off", off), ("on", on)]
            for side, p in order:
                seq[side].append(await measure(lambda p=p: sequential(p, runs), ticker, lags[side]))
            for side, p in order:
                conc[side].append(
                    await measure(lambda p=p: concurrent(p, runs, batch), ticker, conc_lags[side])
                )
        await close_stores()
    per_on, per_off = statistics.median(seq["on"]), statistics.median(seq["off"])
    tput_on, tput_off = statistics.median(conc["on"]), statistics.median(conc["off"])
    lag = max(max(lags["on"]), max(conc_lags["on"]))
    checks = [
        ("sequential cost ratio on/off", per_on / per_off, "<= 3", per_on / per_off <= 3.0),
        ("concurrent throughput ratio on/off", tput_on / tput_off, ">= 1/3", tput_on / tput_off >= 1 / 3),
        ("worst loop lag, store on (ms)", lag * 1000, "< 10", lag < 0.010),
        ("peak threads", float(threads.peak), f"<= {MAX_THREADS + 4}", threads.peak <= MAX_THREADS + 4),
    ]
    print(f"{runs} runs sequentially and as batches of {batch} concurrent arun(); median of {repeat}")
    print(f"  sequential  store on (lineage): {per_on * 1e6:9.1f} us/run   all: {_us(seq['on'])}")
    print(f"  sequential  store off:          {per_off * 1e6:9.1f} us/run   all: {_us(seq['off'])}")
    print(f"  concurrent  store on (lineage): {tput_on:9.0f} runs/s   all: {_rate(conc['on'])}")
    print(f"  concurrent  store off:          {tput_off:9.0f} runs/s   all: {_rate(conc['off'])}")
    print(
        f"  loop lag    sequential: store on {max(lags['on']) * 1000:.2f} ms, off {max(lags['off']) * 1000:.2f} ms; "
        f"concurrent: store on {max(conc_lags['on']) * 1000:.2f} ms, off {max(conc_lags['off']) * 1000:.2f} ms"
    )
    print(f"  threads     peak {threads.peak} (max_threads={MAX_THREADS})")
    failed = 0
    for name, value, target, ok in checks:
        print(f"  {name:36s} {value:8.2f}  target {target:8s} {'ok' if ok else 'MISSED'}")
        failed += not ok
    return 1 if failed else 0


def _us(values: list[float]) -> str:
    return ", ".join(f"{v * 1e6:.1f}" for v in values)


def _rate(values: list[float]) -> str:
    return ", ".join(f"{v:.0f}" for v in values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="flowyml-bench-embedded-"))
    try:
        return asyncio.run(main_async(args.runs, args.batch, args.repeat, root / "store"))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
