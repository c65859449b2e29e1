"""A writer SIGKILLed at random moments never leaves a corrupt database or a wrong cached value."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

import flowyml
from flowyml._errors import CacheCorruptionWarning
from flowyml._store import Store
from flowyml._store._db import DB_NAME

KILLS = 20

# The child walks the keys from 0: a key already cached must load back exactly its value (else it
# appends to the WRONG file, which the parent checks); a missing one is computed and put. Flushes at
# random points make kills land between, inside and after commits and artifact-file writes.
CHILD = r"""
import asyncio, os, random, sys, time
from flowyml._store import RunRecord, StepRecord, Store

root, wrong_file, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])

def value(i):
    return {"i": i, "blob": i.to_bytes(4, "big") * (20_000 if i % 3 == 0 else 4)}

async def main():
    rng = random.Random(seed)
    async with await Store.open(root) as store:
        run_id = f"run-{seed}"
        store.record_run(RunRecord(run_id, "crash", "running", time.time()))
        await store.preload(["work"])
        print("ready", flush=True)
        for i in range(100_000):
            key = f"key-{i}"
            entry = await store.lookup(key)
            if entry is not None:
                if await store.load(entry) != {"out": value(i)}:
                    with open(wrong_file, "a") as f:
                        f.write(f"{key}\n")
                store.record_step(StepRecord(run_id, f"work-{i}", "cached", cached=True, cache_key=key))
                continue
            hashes = store.put(key=key, step_name="work", run_id=run_id, outputs={"out": value(i)}, duration=0.01)
            store.record_step(StepRecord(run_id, f"work-{i}", "succeeded", 1, time.time(), time.time(), 0.01,
                                         cache_key=key, outputs=hashes))
            if rng.random() < 0.3:
                await store.flush()

asyncio.run(main())
"""


def expected(i: int) -> dict[str, object]:
    return {"out": {"i": i, "blob": i.to_bytes(4, "big") * (20_000 if i % 3 == 0 else 4)}}


@pytest.mark.slow
async def test_sigkill_never_corrupts(tmp_path: Path) -> None:
    """20 seeded SIGKILLs: integrity ok, every entry loads intact, committed entries are reused."""
    root = tmp_path / "store"
    wrong = tmp_path / "wrong"
    env = {**os.environ, "PYTHONPATH": str(Path(flowyml.__file__).parent.parent)}  # the flowyml under test
    rng = random.Random(20260529)
    for kill in range(KILLS):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(root), str(wrong), str(kill)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        try:
            assert child.stdout is not None
            ready = child.stdout.readline()
            assert ready == b"ready\n", child.communicate()[1].decode()
            time.sleep(rng.uniform(0.0, 0.25))
        finally:
            child.send_signal(signal.SIGKILL)
            _, err = child.communicate()
        assert child.returncode == -signal.SIGKILL, err.decode()

    assert not wrong.exists(), wrong.read_text()
    conn = sqlite3.connect(root / DB_NAME)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        keys = [row[0] for row in conn.execute("SELECT key FROM cache_entries")]
    finally:
        conn.close()
    assert keys, "no kill happened after a commit; raise the sleep range"

    async with await Store.open(root) as store:
        await store.preload(["work"])
        intact = corrupt = 0
        for key in keys:
            entry = await store.lookup(key)
            assert entry is not None
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                loaded = await store.load(entry)
            if loaded is None:
                assert any(issubclass(w.category, CacheCorruptionWarning) for w in caught)
                corrupt += 1
            else:
                assert loaded == expected(int(key.removeprefix("key-")))
                intact += 1
        # Artifacts are fsynced and renamed into place before their index row commits, so a kill
        # can lose uncommitted work but never leave a committed entry unreadable.
        assert (intact, corrupt) == (len(keys), 0)
        # The committed prefix is reused: every key below the highest committed one that a child
        # reached is a hit (children walk the keys in order and resume at the first miss).
        highest = max(int(k.removeprefix("key-")) for k in keys)
        for i in range(highest + 1):
            assert await store.lookup(f"key-{i}") is not None, i
        report = await store.verify()
        assert report.ok, report.problems
