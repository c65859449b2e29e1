"""Large pipelines on one machine: build, plan, run, memory and store reads as N grows.

Each figure is measured in a subprocess of its own (one workload, one N, one store mode), and
every run time is a ratio to a raw ``asyncio.TaskGroup`` floor awaiting the same coroutines in
the same process, right before and after the timed run (the median of the floors is used).

    S1  N no-op async steps and one ``*args`` fan-in
    S2  a chain of N no-op async steps, each consuming the previous output
    S3  N async steps each sleeping 10 ms and one fan-in

Modes: ``off`` (no cache, no lineage), ``lineage`` (lineage recorded, no cache), ``cache``
(caching and lineage on, the first run on a fresh store) and ``rerun`` (the same pipeline run
again on that store: every step a cache hit); ``plan`` only builds and plans. Build (making the step definitions and adding
them) and plan (``Pipeline.plan()``) are timed apart, per step. Peak RSS is the process's high
water mark during the run and the commit of its records (reset before it through
``/proc/self/clear_refs``) above the RSS before it, per step; ``kept`` is what is still resident
after the run, the commit of its records and a collection, and
``trimmed`` the same after glibc's ``malloc_trim(0)`` (freed memory the C allocator still holds
for reuse, not live objects; absent where there is no glibc).

    T   2,000 sync steps sleeping 5 ms at 8, 32 and 128 threads vs a ``ThreadPoolExecutor`` of
        the same size running the same calls from the loop
    R1  ``flowyml lineage`` of one output of an S1 run with lineage (a leaf step's output),
        the command's wall time in a subprocess of its own (Python start included, and the
        time of ``flowyml --help`` beside it, so the difference is the read itself)
    R2  ``Store.lineage`` through an S2 chain of N (in-process; reports an error if it raises)

Targets (issue 15): plan <= 5 us a step, build <= 10 us a step; lineage <= 2x the floor; cache
first run <= 3x the lineage figure; rerun <= 20 us a step; peak <= 2 KiB a step with lineage;
threads <= 1.15x; R1 < 0.2 s at 1M.

Run: ``.venv/bin/python benchmarks/bench_scale.py [--n 10000,100000] [--only S1,S2,S3,T,R1,R2]
[--modes off,lineage,cache,rerun] [--json out.json]`` (``--n 1000000`` for a million).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from flowyml import Pipeline, open_store, step


async def noop(*_: Any) -> Any:
    return None


async def sleep10(*_: Any) -> None:
    await asyncio.sleep(0.01)


def block5(*_: Any) -> None:
    time.sleep(0.005)


# --- pipelines -------------------------------------------------------------------------------


def fan_in(name: str, n: int, body: Callable[..., Any], **options: Any) -> Pipeline:
    p = Pipeline(name, **options)
    for i in range(n):
        p.add_step(step(name=f"s{i}", outputs=[f"r{i}"])(body))
    p.add_step(step(name="fan_in", inputs=[f"r{i}" for i in range(n)], outputs=["total"])(noop))
    return p


def chain(name: str, n: int, **options: Any) -> Pipeline:
    p = Pipeline(name, **options)
    p.add_step(step(name="s0", outputs=["v0"])(noop))
    for i in range(1, n):
        p.add_step(step(name=f"s{i}", inputs=[f"v{i - 1}"], outputs=[f"v{i}"])(noop))
    return p


def make(workload: str, n: int, **options: Any) -> Pipeline:
    if workload == "S1":
        return fan_in("s1", n, noop, **options)
    if workload == "S2":
        return chain("s2", n, **options)
    return fan_in("s3", n, sleep10, **options)


# --- floors ----------------------------------------------------------------------------------


async def fan_in_floor(n: int, body: Callable[..., Awaitable[Any]]) -> None:
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(body()) for _ in range(n)]
    await noop(*[t.result() for t in tasks])


async def chain_floor(n: int) -> None:
    v = None
    async with asyncio.TaskGroup() as tg:
        for _ in range(n):
            v = await tg.create_task(noop(v))


def floor_of(workload: str, n: int) -> Callable[[], Awaitable[None]]:
    if workload == "S1":
        return lambda: fan_in_floor(n, noop)
    if workload == "S2":
        return lambda: chain_floor(n)
    return lambda: fan_in_floor(n, sleep10)


# --- memory ----------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --- one measurement, in its own process -----------------------------------------------------


def _malloc_trim() -> bool:
    """Hand the C allocator's free memory back to the system (glibc only); False where unavailable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


async def timed(fn: Callable[[], Awaitable[Any]]) -> float:
    gc.collect()
    t0 = time.perf_counter()
    await fn()
    return time.perf_counter() - t0


async def child_steps(workload: str, n: int, mode: str) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="flowyml-scale-"))
    try:
        options = {
            "enable_cache": mode in ("cache", "rerun"),
            "lineage": mode != "off",
            "cache_dir": tmp,
        }
        t0 = time.perf_counter()
        pipeline = make(workload, n, **options)
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        pipeline.plan()
        plan = time.perf_counter() - t0
        steps = n + (0 if workload == "S2" else 1)
        if mode == "plan":
            return {
                "workload": workload,
                "n": n,
                "mode": mode,
                "build_us_per_step": build / steps * 1e6,
                "plan_us_per_step": plan / steps * 1e6,
                "plan_s": plan,
            }
        floor = floor_of(workload, n)
        await floor()  # warm-up of the floor's own path
        if mode == "rerun":
            first = await pipeline.arun()
            assert first.success, first.summary()
        floors = [await timed(floor)]
        gc.collect()
        before = _status_kib("VmRSS")
        exact_peak = _reset_peak()
        t0 = time.perf_counter()
        result = await pipeline.arun()
        ours = time.perf_counter() - t0
        if mode != "off":
            # arun() returns before its lineage is committed (the shared writer finishes it): the
            # peak and what is kept are read once the run's records are in, not halfway through.
            await (await open_store(tmp)).flush()
        peak = _status_kib("VmHWM")
        assert result.success, result.summary()
        if mode == "rerun":
            assert all(r.status == "cached" for r in result.step_results.values()), "not all cached"
        del result
        floors.append(await timed(floor))
        gc.collect()
        after = _status_kib("VmRSS")
        trimmed = _status_kib("VmRSS") if _malloc_trim() else None
        base = statistics.median(floors)
        return {
            "workload": workload,
            "n": n,
            "mode": mode,
            "build_us_per_step": build / steps * 1e6,
            "plan_us_per_step": plan / steps * 1e6,
            "plan_s": plan,
            "run_s": ours,
            "floor_s": base,
            "run_us_per_step": ours / steps * 1e6,
            "ratio": ours / base,
            "peak_kib_per_step": (peak - before) / steps if exact_peak else None,
            "kept_kib_per_step": (after - before) / steps,
            "trimmed_kib_per_step": None if trimmed is None else (trimmed - before) / steps,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def child_threads(threads: int, n: int = 2000) -> dict[str, Any]:
    p = Pipeline(f"t{threads}", enable_cache=False, lineage=False, max_threads=threads)
    for i in range(n):
        p.add_step(step(name=f"s{i}", outputs=[f"r{i}"])(block5))
    loop = asyncio.get_running_loop()

    async def floor() -> None:
        with ThreadPoolExecutor(threads) as pool:
            async with asyncio.TaskGroup() as tg:
                for _ in range(n):
                    tg.create_task(one(pool))

    async def one(pool: ThreadPoolExecutor) -> None:
        await loop.run_in_executor(pool, block5)

    await p.arun()
    ours: list[float] = []
    base: list[float] = []
    for i in range(3):
        pair: list[tuple[list[float], Callable[[], Awaitable[Any]]]] = [(ours, p.arun), (base, floor)]
        if i % 2:
            pair.reverse()
        for into, fn in pair:
            into.append(await timed(fn))
    o, b = statistics.median(ours), statistics.median(base)
    return {"workload": "T", "threads": threads, "run_s": o, "floor_s": b, "ratio": o / b}


async def child_lineage_cli(n: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="flowyml-scale-"))
    try:
        result = await make("S1", n, enable_cache=False, lineage=True, cache_dir=tmp).arun()
        assert result.success, result.summary()
        del result
        from flowyml._store import close_stores

        await close_stores()
        base = [sys.executable, "-m", "flowyml", "--dir", str(tmp)]
        times: dict[str, float] = {}
        for label, args in (("help", ["--help"]), ("lineage", ["lineage", f"r{n // 2}"])):
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                done = subprocess.run([*base, *args], capture_output=True, text=True)
                best = min(best, time.perf_counter() - t0)
                assert done.returncode == 0, done.stderr
            times[label] = best
        return {
            "workload": "R1",
            "n": n,
            "lineage_cli_s": times["lineage"],
            "python_start_s": times["help"],
            "read_s": times["lineage"] - times["help"],
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def child_deep_lineage(n: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="flowyml-scale-"))
    try:
        result = await make("S2", n, enable_cache=False, lineage=True, cache_dir=tmp).arun()
        assert result.success, result.summary()
        run_id = result.run_id
        del result
        from flowyml._store import Store, close_stores

        await close_stores()
        async with await Store.open(tmp, create=False) as store:
            t0 = time.perf_counter()
            try:
                lineage = await store.lineage(f"v{n - 1}", run_id)
            except RecursionError as exc:
                return {"workload": "R2", "n": n, "error": f"RecursionError: {exc}"}
            took = time.perf_counter() - t0
            depth, node = 0, lineage.root if lineage else None
            while node is not None:
                depth += 1
                node = node.inputs[0][1] if node.inputs else None
        return {"workload": "R2", "n": n, "lineage_s": took, "depth": depth}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def child(argv: list[str]) -> dict[str, Any]:
    kind, *rest = argv
    if kind == "steps":
        return asyncio.run(child_steps(rest[0], int(rest[1]), rest[2]))
    if kind == "threads":
        return asyncio.run(child_threads(int(rest[0])))
    if kind == "R1":
        return asyncio.run(child_lineage_cli(int(rest[0])))
    return asyncio.run(child_deep_lineage(int(rest[0])))


def spawn(*args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=os.environ
    )
    if done.returncode != 0:
        return {"args": args, "error": done.stderr.strip().splitlines()[-1:]}
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def show(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r.get('workload', r.get('args'))} {r.get('n', '')}: ERROR {r['error']}"
    w = r["workload"]
    if w == "T":
        return f"T   {r['threads']:>4} threads  {r['run_s']:.3f} s vs {r['floor_s']:.3f} s  {r['ratio']:.2f}x"
    if w == "R1":
        return (
            f"R1  n={r['n']:>8}  lineage CLI {r['lineage_cli_s']:.3f} s (python start "
            f"{r['python_start_s']:.3f} s, read {r['read_s']:.3f} s)"
        )
    if w == "R2":
        return (
            f"R2  n={r['n']:>8}  Store.lineage through the chain {r['lineage_s']:.3f} s, depth {r['depth']}"
        )
    if r["mode"] == "plan":
        return (
            f"{w}  n={r['n']:>8} plan     build {r['build_us_per_step']:6.1f} us/step  "
            f"plan {r['plan_us_per_step']:7.1f} us/step ({r['plan_s']:.2f} s)"
        )
    peak = "?" if r["peak_kib_per_step"] is None else f"{r['peak_kib_per_step']:.2f}"
    return (
        f"{w}  n={r['n']:>8} {r['mode']:<8} build {r['build_us_per_step']:6.1f} us/step  "
        f"plan {r['plan_us_per_step']:7.1f} us/step ({r['plan_s']:.2f} s)  run {r['run_s']:7.3f} s "
        f"{r['run_us_per_step']:6.1f} us/step  floor {r['floor_s']:.3f} s  {r['ratio']:5.2f}x  "
        f"peak {peak} KiB/step  kept {r['kept_kib_per_step']:.2f} KiB/step"
        + (f" (trimmed {r['trimmed_kib_per_step']:.2f})" if r.get("trimmed_kib_per_step") is not None else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="10000,100000", help="comma-separated step counts")
    parser.add_argument("--only", default="S1,S2,S3,T,R1,R2")
    parser.add_argument("--modes", default="off,lineage,cache,rerun")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    sizes = [int(x) for x in args.n.split(",")]
    only = args.only.split(",")
    results: list[dict[str, Any]] = []

    def keep(r: dict[str, Any]) -> None:
        results.append(r)
        print(show(r), flush=True)

    for n in sizes:
        for w in ("S1", "S2", "S3"):
            if w in only:
                for mode in args.modes.split(","):
                    keep(spawn("steps", w, str(n), mode))
    if "T" in only:
        for threads in (8, 32, 128):
            keep(spawn("threads", str(threads)))
    for n in sizes:
        for w in ("R1", "R2"):
            if w in only:
                keep(spawn(w, str(n)))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
