"""W5: four CPU-bound steps through ProcessExecutor vs a raw ProcessPoolExecutor, in one process.

Each call is a pure-Python loop calibrated at start to take about 0.5 s. Both sides use two
workers and are timed from creating the pool to shutting it down, so start-up and shutdown count.
The two sides alternate (which one goes first flips every repetition) to share out warm-up
effects. Target: ProcessExecutor within 1.15x of the raw pool.

The raw pool uses Python's default start method (``fork`` on Linux in 3.11), which is the fastest
to start but unsafe in the engine's threaded process; ProcessExecutor uses ``forkserver``. Its
first repetition also boots the interpreter's forkserver, a once-per-process cost that is
reported with the rest rather than hidden.

Run: ``.venv/bin/python benchmarks/bench_process.py [repetitions]`` (default 3).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import statistics
import sys
import time

from flowyml._executors._process import ProcessExecutor

CALLS = 4
WORKERS = 2
REPETITIONS = 3
TARGET_SECONDS = 0.5


def burn(iterations: int) -> int:
    """Pure-Python CPU work: no I/O, no GIL release, no C fast path."""
    total = 0
    for i in range(iterations):
        total += i * i % 7
    return total


def calibrate(target: float = TARGET_SECONDS) -> int:
    """The iteration count that makes :func:`burn` take about ``target`` seconds here."""
    iterations = 100_000
    while True:
        elapsed = _fastest_of(3, iterations)
        if elapsed > 0.1:
            return int(iterations * target / elapsed)
        iterations *= 2


def _fastest_of(trials: int, iterations: int) -> float:
    """The quickest of a few timed runs: the least disturbed by other load on the machine."""
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        burn(iterations)
        best = min(best, time.perf_counter() - start)
    return best


async def flowyml_pool(iterations: int) -> float:
    """Seconds for CALLS calls through ProcessExecutor, pool start-up and shutdown included."""
    start = time.perf_counter()
    pool = ProcessExecutor(max_workers=WORKERS)
    try:
        await asyncio.gather(
            *(pool.run(burn, (iterations,), {}, timeout=None, step_name=f"w5_{n}") for n in range(CALLS))
        )
    finally:
        await pool.aclose()
    return time.perf_counter() - start


async def raw_pool(iterations: int) -> float:
    """Seconds for CALLS calls through a raw ProcessPoolExecutor via ``loop.run_in_executor``."""
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(max_workers=WORKERS) as pool:
        await asyncio.gather(*(loop.run_in_executor(pool, burn, iterations) for _ in range(CALLS)))
    return time.perf_counter() - start


async def main(repetitions: int = REPETITIONS) -> None:
    """Calibrate, alternate the two sides ``repetitions`` times each, print figures and the ratio."""
    iterations = calibrate()
    single = _fastest_of(2, iterations)
    ideal = single * CALLS / WORKERS
    print(f"W5: {CALLS} calls of burn({iterations:,}) ~{single:.3f}s each, {WORKERS} workers")
    print(f"    ideal (no overhead): {ideal:.3f}s")
    ours: list[float] = []
    raw: list[float] = []
    for rep in range(repetitions):
        order = [("flowyml", flowyml_pool), ("raw", raw_pool)]
        if rep % 2:
            order.reverse()
        for label, side in order:
            seconds = await side(iterations)
            (ours if label == "flowyml" else raw).append(seconds)
            print(f"    rep {rep + 1} {label:8s} {seconds:.3f}s")
    ours_median, raw_median = statistics.median(ours), statistics.median(raw)
    ratio = ours_median / raw_median
    print(f"ProcessExecutor     median {ours_median:.3f}s  ({', '.join(f'{s:.3f}' for s in ours)})")
    print(f"ProcessPoolExecutor median {raw_median:.3f}s  ({', '.join(f'{s:.3f}' for s in raw)})")
    print(
        f"ratio (medians) {ratio:.3f}x; (totals) {sum(ours) / sum(raw):.3f}x; "
        f"(best runs) {min(ours) / min(raw):.3f}x; target <= 1.15x"
    )


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else REPETITIONS))
