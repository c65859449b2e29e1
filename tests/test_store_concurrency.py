"""Several processes writing one store at once: no errors, no lost or wrong entries."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import flowyml
from flowyml._store import Store

PROCESSES = 8
ENTRIES = 50

# One worker: open the store, wait for the common start signal, then run a 50-step "pipeline"
# whose entries (small and large) are the same in every process, recording its run and steps.
WORKER = r"""
import asyncio, os, sys, time
from flowyml._store import RunRecord, StepRecord, Store

root, worker, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]

def value(i):
    return {"i": i, "blob": bytes([i]) * (70_000 if i % 5 == 0 else 16)}

async def main():
    async with await Store.open(root) as store:
        print("ready", flush=True)
        while not os.path.exists(go):
            await asyncio.sleep(0.002)
        run_id = f"run-{worker}"
        store.record_run(RunRecord(run_id, "fifty", "running", time.time()))
        for i in range(ENTRIES):
            started = time.time()
            hashes = store.put(key=f"key-{i}", step_name=f"step{i}", run_id=run_id, outputs={"out": value(i)}, duration=0.01)
            inputs = {"x": (f"step{i - 1}", "out")} if i else {}
            store.record_step(StepRecord(run_id, f"step{i}", "succeeded", 1, started, time.time(), 0.01,
                                         cache_key=f"key-{i}", outputs=hashes, inputs=inputs))
            if i % 7 == 0:
                await store.flush()
        store.record_run(RunRecord(run_id, "fifty", "completed", time.time(), time.time(), 0.1))

ENTRIES = int(sys.argv[4])
asyncio.run(main())
"""


def expected(i: int) -> dict[str, object]:
    return {"i": i, "blob": bytes([i]) * (70_000 if i % 5 == 0 else 16)}


@pytest.mark.slow
async def test_eight_processes_share_one_store(tmp_path: Path) -> None:
    """8 processes started together: 0 errors, integrity ok, every entry loads and matches its hash."""
    root = tmp_path / "store"
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(Path(flowyml.__file__).parent.parent)}  # the flowyml under test
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(root), str(n), str(go), str(ENTRIES)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for n in range(PROCESSES)
    ]
    try:
        for proc in workers:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"ready\n"
        go.touch()
        outcomes = [proc.communicate(timeout=120) for proc in workers]
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    errors = [err.decode() for _, err in outcomes]
    assert [proc.returncode for proc in workers] == [0] * PROCESSES, errors
    assert not any("locked" in err for err in errors), errors
    assert errors == [""] * PROCESSES

    async with await Store.open(root) as store:
        report = await store.verify()
        assert report.integrity == "ok"
        assert report.ok, report.problems
        assert report.entries_checked == ENTRIES
        for i in range(ENTRIES):
            entry = await store.lookup(f"key-{i}")
            assert entry is not None, i
            assert await store.load(entry) == {"out": expected(i)}
        runs = await store.runs(limit=100)
        assert sorted(r.run_id for r in runs) == sorted(f"run-{n}" for n in range(PROCESSES))
        assert {r.status for r in runs} == {"completed"}
        for run in runs:
            detail = await store.get_run(run.run_id)
            assert detail is not None
            assert len(detail.steps) == ENTRIES


async def test_two_stores_in_one_process_see_each_others_commits(tmp_path: Path) -> None:
    """A commit by one store is found by another store's look-up (the miss goes to the database)."""
    root = tmp_path / "store"
    async with await Store.open(root) as first, await Store.open(root) as second:
        assert await second.lookup("k") is None
        first.put(key="k", step_name="s", run_id="r", outputs={"out": 1}, duration=0.1)
        await first.flush()
        entry = await second.lookup("k")
        assert entry is not None
        assert await second.load(entry) == {"out": 1}
