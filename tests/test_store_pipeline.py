"""The store under real pipeline runs: many processes at once, SIGKILLs, and a cancelled run.

The store tests drive ``Store`` directly; these run ``Pipeline`` end to end, so the engine's
hooks, the writer, the packed lineage and the artifact files are exercised together. Child
processes run one script (written to a file, so that its steps have source code to fingerprint
and every process makes the same keys).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

import flowyml
from flowyml import Pipeline, close_stores, step
from flowyml._errors import CacheCorruptionWarning
from flowyml._store import INLINE_LIMIT, Store, _db, shared_store
from flowyml._store._db import DB_NAME

SCRIPT = r'''
"""A pipeline of N steps: step i checks the value it got from step i-1, then makes its own."""
import asyncio, json, os, sys, time
from flowyml import Pipeline, step

root, mode, steps, wrong = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
DELAY = float(os.environ.get("STEP_DELAY", "0"))
BIG = 70_000  # above the store's inline limit: an artifact file


def value(i):
    size = BIG + i if i % 4 == 0 else (1_000 + i if i % 4 == 1 else 8)
    return {"i": i, "blob": bytes([i % 251]) * size}


def make(i):
    async def work(prev=None):
        if i and i % 10 and prev != value(i - 1):
            with open(wrong, "a") as f:
                f.write(f"step s{i} got a wrong value from s{i - 1}\n")
        if DELAY:
            time.sleep(DELAY)  # a few ms of real work, holding the loop like a CPU-bound step
            await asyncio.sleep(0)
        return value(i)

    # A chain broken every 10 steps, so that some steps have no input.
    inputs = [f"v{i - 1}"] if i % 10 else []
    return step(name=f"s{i}", inputs=inputs, outputs=[f"v{i}"])(work)


pipeline = Pipeline("shared", cache_dir=root)
for i in range(steps):
    pipeline.add_step(make(i))

if mode in ("together", "crash"):
    print("ready", flush=True)
while mode == "together" and not os.path.exists(wrong + ".go"):
    time.sleep(0.002)
result = pipeline.run()
assert result.success, result.summary()
print(json.dumps(sorted(name for name, r in result.step_results.items() if r.cached)), flush=True)
'''


def value(i: int) -> dict[str, Any]:
    """What step ``s{i}`` of SCRIPT returns."""
    size = 70_000 + i if i % 4 == 0 else (1_000 + i if i % 4 == 1 else 8)
    return {"i": i, "blob": bytes([i % 251]) * size}


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "shared_pipeline.py"
    path.write_text(SCRIPT)
    return path


def child(
    script: Path, root: Path, mode: str, steps: int, wrong: Path, *, delay: float = 0.0
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(flowyml.__file__).parent.parent),  # the flowyml under test
        "STEP_DELAY": str(delay),
    }
    return subprocess.Popen(
        [sys.executable, str(script), str(root), mode, str(steps), str(wrong)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def integrity(root: Path) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(root / DB_NAME)
    try:
        return conn.execute("PRAGMA integrity_check").fetchall()
    finally:
        conn.close()


def indexed_steps(root: Path) -> set[str]:
    """The step names the cache index holds an entry for (none while the store is being created)."""
    if not (root / DB_NAME).exists():
        return set()
    conn = sqlite3.connect(root / DB_NAME)
    try:
        return {row[0] for row in conn.execute("SELECT step_name FROM cache_entries")}
    except sqlite3.OperationalError:
        return set()
    finally:
        conn.close()


async def load_all(root: Path) -> tuple[dict[str, Any], int]:
    """Every cache entry loaded (by step name), and how many were reported corrupt and dropped."""
    loaded: dict[str, Any] = {}
    dropped = 0
    async with await Store.open(root, create=False) as store:
        for name in sorted(indexed_steps(root)):
            await store.preload([name])
        keys = [row[0] for row in await store._conn.execute_fetchall("SELECT key FROM cache_entries")]
        for key in keys:
            entry = await store.lookup(key)
            assert entry is not None
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                outputs = await store.load(entry)
            if outputs is None:
                assert any(issubclass(w.category, CacheCorruptionWarning) for w in caught)
                dropped += 1
            else:
                loaded[entry.step_name] = outputs
    return loaded, dropped


@pytest.mark.slow
async def test_eight_processes_run_one_pipeline_on_one_store(tmp_path: Path, script: Path) -> None:
    """8 processes started together: 0 errors, 0 locked, integrity ok, every entry intact."""
    root, wrong, steps = tmp_path / "store", tmp_path / "wrong", 50
    # A couple of ms per step: the runs overlap for their whole length, committing as they go.
    procs = [child(script, root, "together", steps, wrong, delay=0.002) for _ in range(8)]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"ready\n", proc.communicate()[1].decode()
        (tmp_path / "wrong.go").touch()
        outcomes = [proc.communicate(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    errors = [err.decode() for _, err in outcomes]
    assert [proc.returncode for proc in procs] == [0] * 8, errors
    assert not any("locked" in err.lower() for err in errors), errors
    assert errors == [""] * 8
    assert not wrong.exists(), wrong.read_text()

    assert integrity(root) == [("ok",)]
    loaded, dropped = await load_all(root)
    assert dropped == 0
    assert loaded == {f"s{i}": {f"v{i}": value(i)} for i in range(steps)}
    async with await Store.open(root, create=False) as store:
        report = await store.verify()
        assert report.ok, report.problems
        assert report.entries_checked == steps
        runs = await store.runs(limit=20)
        assert len(runs) == 8
        assert {r.status for r in runs} == {"completed"}
        for run in runs:
            detail = await store.get_run(run.run_id)
            assert detail is not None
            assert len(detail.steps) == steps


@pytest.mark.slow
async def test_sigkilled_runs_never_corrupt_and_committed_steps_are_reused(
    tmp_path: Path, script: Path
) -> None:
    """20 seeded SIGKILLs mid-run: integrity ok, no wrong value, the rerun reuses what committed."""
    root, wrong, steps = tmp_path / "store", tmp_path / "wrong", 30
    rng = random.Random(20261129)
    # How long a whole uninterrupted run takes on this machine now (in a store of its own), so
    # the kills land across a run however loaded the machine is; a child that finishes before
    # its kill shows that runs got shorter (more is cached), and the next kills aim by it.
    calibration = child(script, tmp_path / "calibration", "crash", steps, wrong, delay=0.008)
    assert calibration.stdout is not None
    assert calibration.stdout.readline() == b"ready\n"
    began = time.monotonic()
    calibration.communicate(timeout=120)
    span = time.monotonic() - began
    outcomes: list[tuple[int, int]] = []  # (exit code, steps in the index after it)
    for _ in range(20):
        # Drop a random third of what is cached, so every child has steps to compute, put and
        # record when the kill comes (otherwise all 30 are cached after two children).
        cached = sorted(indexed_steps(root))
        if cached:
            async with await Store.open(root, create=False) as store:
                for name in rng.sample(cached, k=len(cached) // 3):
                    await store.clear_cache(name)
        proc = child(script, root, "crash", steps, wrong, delay=0.008)
        try:
            assert proc.stdout is not None
            ready = proc.stdout.readline()
            assert ready == b"ready\n", proc.communicate()[1].decode()
            began = time.monotonic()
            time.sleep(rng.uniform(0.2, 0.9) * span)  # the store opens, then steps run and commit
        finally:
            proc.send_signal(signal.SIGKILL)
            _, err = proc.communicate()
        if proc.returncode == 0:  # it finished first: runs are shorter now, aim by this one
            span = time.monotonic() - began
        # A run that finished before the kill exits 0; every other one was killed, not crashed.
        assert proc.returncode in (0, -signal.SIGKILL), err.decode()
        outcomes.append((proc.returncode, len(indexed_steps(root))))
    assert not wrong.exists(), wrong.read_text()
    assert integrity(root) == [("ok",)]
    killed = [count for code, count in outcomes if code == -signal.SIGKILL]
    # Many children die mid-run, at varied points (kills are aimed within a run's length, so most
    # land mid-run; the bar leaves room for a machine whose load changes during the test).
    assert len(killed) >= 6, outcomes
    assert len(set(killed)) >= 3, outcomes

    committed = indexed_steps(root)
    assert committed, "no kill landed after a commit; widen the sleep range"
    loaded, dropped = await load_all(root)
    assert dropped == 0  # artifact files are durable before the index row naming them commits
    assert loaded == {name: {f"v{name[1:]}": value(int(name[1:]))} for name in committed}

    rerun = child(script, root, "rerun", steps, wrong, delay=0.008)  # DELAY is part of the key
    out, err = rerun.communicate(timeout=60)
    assert rerun.returncode == 0, err.decode()
    hits = set(json.loads(out.decode().splitlines()[-1]))
    assert hits == committed
    assert not wrong.exists(), wrong.read_text()
    assert len(indexed_steps(root)) == steps
    assert integrity(root) == [("ok",)]


@pytest.mark.slow
async def test_cancelled_run_leaves_the_store_consistent_and_closed(tmp_path: Path) -> None:
    """Cancelling arun() mid-run leaves what committed consistent; close_stores() joins every thread.

    The store stays open after the run (it is shared by every run on this loop) until close_stores().
    """
    root = tmp_path / "store"
    steps = 20

    def make(i: int) -> Any:
        async def link(prev: bytes = b"") -> bytes:
            await asyncio.sleep(0.01)
            return prev[:8] + bytes([i]) * (INLINE_LIMIT + 1 if i % 3 == 0 else 10)

        return step(name=f"c{i}", inputs=[f"x{i - 1}"] if i else [], outputs=[f"x{i}"])(link)

    pipeline = Pipeline("chain", cache_dir=root)
    for i in range(steps):
        pipeline.add_step(make(i))

    before = set(threading.enumerate())
    task = asyncio.ensure_future(pipeline.arun())
    try:
        async with asyncio.timeout(30):  # a regression fails here instead of hanging the suite
            while len(indexed_steps(root)) < 5:
                await asyncio.sleep(0.005)
    except TimeoutError:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        pytest.fail("the run committed fewer than 5 steps within 30 s")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await close_stores()
    assert set(threading.enumerate()) <= before  # the store's connection and file threads joined

    assert integrity(root) == [("ok",)]
    committed = indexed_steps(root)
    assert 5 <= len(committed) < steps
    async with await Store.open(root, create=False) as store:
        report = await store.verify()
        assert report.ok, report.problems
        (run,) = await store.runs()
        assert run.status == "cancelled"
        detail = await store.get_run(run.run_id)
        assert detail is not None
        assert {s.step_name for s in detail.steps if s.status == "succeeded"} >= committed

    result = await pipeline.arun()
    assert result.success
    assert {name for name, r in result.step_results.items() if r.cached} == committed
    await close_stores()
    assert set(threading.enumerate()) <= before


def chain_pipeline(root: Path, steps: int) -> Pipeline:
    def make(i: int) -> Any:
        async def link(prev: int = 0) -> int:
            return prev + i

        return step(name=f"c{i}", inputs=[f"x{i - 1}"] if i else [], outputs=[f"x{i}"])(link)

    pipeline = Pipeline("chain", cache_dir=root)
    for i in range(steps):
        pipeline.add_step(make(i))
    return pipeline


async def test_a_first_cached_run_asks_no_query_per_step(tmp_path: Path) -> None:
    """A chain's misses are answered by the run's view: the cache index is read when the run
    starts, not once a step (SQLite's own trace hook counts the statements)."""
    root = tmp_path / "store"
    pipeline = chain_pipeline(root, 60)
    store = await shared_store(root)
    seen: list[str] = []
    await _db.on_thread(store._conn, lambda db: db.set_trace_callback(seen.append))
    try:
        result = await pipeline.arun()
    finally:
        await _db.on_thread(store._conn, lambda db: db.set_trace_callback(None))
    assert result.success and not any(r.cached for r in result.step_results.values())
    reads = [s for s in seen if s.lstrip().upper().startswith("SELECT") and "cache_entries" in s]
    # What the reasons of misses compare to: the rows counted (which way to read them), then read.
    components = [s for s in reads if "parts IS NOT NULL" in s or "FROM cache_key_parts LIMIT" in s]
    assert len(components) == 2, components
    assert len(reads) - len(components) == 2, reads  # preload: the newest entries, and the keys
    await close_stores()


async def test_memory_is_released_after_a_run_and_a_rerun_still_hits(tmp_path: Path) -> None:
    """After a cached run the shared store holds no entry and no view; the rerun in the same
    process finds every entry through its own view."""
    root = tmp_path / "store"
    pipeline = chain_pipeline(root, 40)
    first = await pipeline.arun()
    assert first.success
    store = await shared_store(root)
    await store.flush()  # the writer lets the run go before it drops what it committed from memory
    del first
    gc.collect()
    assert store._memory == {} and store._unsaved == set()
    assert len(store._views) == 0
    rerun = await pipeline.arun()
    assert all(r.cached for r in rerun.step_results.values())
    assert rerun.outputs["x39"] == sum(range(40))
    del rerun
    gc.collect()
    assert store._memory == {} and len(store._views) == 0
    await close_stores()
