"""One long-lived store per (process, directory): shared by runs, batching across them, closed on
request, at loop shutdown, and never reused by a forked child."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

import flowyml
from flowyml import Pipeline, close_stores, step
from flowyml._errors import StoreError
from flowyml._store import Store, shared_store
from flowyml._store._db import DB_NAME


def one_step(root: Path, name: str = "one") -> Pipeline:
    @step(outputs=["x"], cache=False)
    def work(n: int = 1) -> int:
        return n + 1

    return Pipeline(name, cache_dir=root, context={"n": 1}).add_step(work)


def store_threads() -> set[threading.Thread]:
    """The threads a store starts: its connection's and its file pool's."""
    return {
        t
        for t in threading.enumerate()
        if t.name.startswith("flowyml-store") or "_connection_worker_thread" in t.name
    }


def completed(root: Path) -> int:
    with sqlite3.connect(root / DB_NAME) as db:
        (n,) = db.execute("SELECT COUNT(*) FROM runs WHERE status = 'completed'").fetchone()
    return int(n)


def count(root: Path, table: str) -> int:
    with sqlite3.connect(root / DB_NAME) as db:
        (n,) = db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()
    return int(n)


async def test_pipelines_and_concurrent_runs_share_one_store(tmp_path: Path) -> None:
    """Every run on a directory uses the same Store; 100 concurrent runs commit in few transactions."""
    root = tmp_path / "store"
    first, second = one_step(root, "first"), one_step(root, "second")
    store = await shared_store(root)
    assert await shared_store(root) is store
    assert await shared_store(str(root)) is store
    results = await asyncio.gather(*(p.arun() for _ in range(50) for p in (first, second)))
    assert all(r.success and r["x"] == 2 for r in results)
    assert await shared_store(root) is store and not store.closed
    # A lineage-only run returns without waiting for its commit; the writer commits within 20 ms.
    for _ in range(400):
        if completed(root) == 100:
            break
        await asyncio.sleep(0.005)
    assert completed(root) == 100
    # The writer batched the records of many runs per transaction.
    assert count(root, "step_records") == 100
    assert store.commits < 20, store.commits
    await close_stores()
    assert store.closed
    reopened = await shared_store(root)
    assert reopened is not store
    await close_stores()


async def test_concurrent_first_use_opens_once(tmp_path: Path) -> None:
    root = tmp_path / "store"
    stores = await asyncio.gather(*(shared_store(root) for _ in range(20)))
    assert len({id(s) for s in stores}) == 1
    await close_stores()


async def test_async_with_closes_the_shared_store_and_the_next_run_reopens(tmp_path: Path) -> None:
    root = tmp_path / "store"
    before = store_threads()
    async with await shared_store(root) as store:
        assert (await one_step(root).arun()).success
    assert store.closed
    assert store_threads() <= before
    assert (await one_step(root).arun()).success
    assert (await shared_store(root)) is not store
    await flowyml.close_stores()
    assert store_threads() <= before


def test_asyncio_run_without_close_stores_commits_and_joins(tmp_path: Path) -> None:
    """An application that never calls close_stores: the loop's shutdown closes the store."""
    root = tmp_path / "store"
    before = set(threading.enumerate())

    async def app() -> list[Any]:
        return [await one_step(root).arun() for _ in range(5)]

    results = asyncio.run(app())
    assert all(r.success for r in results)
    assert set(threading.enumerate()) <= before
    assert count(root, "runs") == 5


def test_sequential_run_calls_leave_no_thread(tmp_path: Path) -> None:
    root = tmp_path / "store"
    before = set(threading.enumerate())
    for _ in range(3):
        assert one_step(root).run().success
    assert set(threading.enumerate()) <= before
    assert count(root, "runs") == 3


def _child_run(root: str, queue: Any) -> None:
    try:
        result = one_step(Path(root), "child").run()
        queue.put(("ok", result.success))
    except BaseException as exc:
        queue.put(("error", repr(exc)))


def _child_uses_parent_store(store: Store, queue: Any) -> None:
    try:
        store.record_step  # noqa: B018 - the object is there, only its use is refused
        asyncio.run(store.runs())
        queue.put(("used", None))
    except StoreError as exc:
        queue.put(("refused", str(exc)))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fork", "forkserver"])
async def test_children_never_reuse_the_parents_store(tmp_path: Path, method: str) -> None:
    """A forked or forkserver child opens its own store; the parent's keeps working."""
    root = tmp_path / "store"
    assert (await one_step(root).arun()).success
    store = await shared_store(root)
    ctx = multiprocessing.get_context(method)
    queue = ctx.Queue()
    child = ctx.Process(target=_child_run, args=(str(root), queue))
    child.start()
    outcome = await asyncio.to_thread(queue.get, True, 60)
    await asyncio.to_thread(child.join, 60)
    assert outcome == ("ok", True)
    assert child.exitcode == 0
    assert (await one_step(root).arun()).success
    assert await shared_store(root) is store
    await store.flush()
    assert count(root, "runs") == 3
    if method == "fork":
        child = ctx.Process(target=_child_uses_parent_store, args=(store, queue))
        child.start()
        outcome = await asyncio.to_thread(queue.get, True, 60)
        await asyncio.to_thread(child.join, 60)
        assert outcome[0] == "refused" and "opened by process" in outcome[1]
        assert (await one_step(root).arun()).success
    await close_stores()


async def test_store_errors_of_a_store_that_cannot_be_opened_raise(tmp_path: Path) -> None:
    """Only a store that cannot be opened raises out of arun(), before any step."""
    root = tmp_path / "store"
    root.mkdir()
    root.chmod(0o777)
    with pytest.raises(StoreError, match="0777"):
        await one_step(root).arun()
    root.chmod(0o700)
    assert (await one_step(root).arun()).success  # a failed open is not remembered
    await close_stores()


def test_stores_of_ended_loops_are_forgotten(tmp_path: Path) -> None:
    """Each run() has its own loop; the registry keeps neither its store nor its loop afterwards."""
    from flowyml._store import _registry

    for i in range(3):
        assert one_step(tmp_path / f"s{i}").run().success
    assert not any(
        store.root.parent == tmp_path for by_key in _registry._stores.values() for store in by_key.values()
    )


def test_interpreter_exit_closes_a_store_left_open(tmp_path: Path) -> None:
    """A loop that is never closed nor shut down: the store is closed at exit (WAL checkpointed)."""
    root = tmp_path / "store"
    code = textwrap.dedent(
        """
        import asyncio, sys
        from flowyml import Pipeline, step

        @step(outputs=["x"])
        def work() -> int:
            return 1

        loop = asyncio.new_event_loop()
        result = loop.run_until_complete(Pipeline("left", cache_dir=sys.argv[1]).add_step(work).arun())
        print(result.success)
        """
    )
    done = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
    assert not (root / (DB_NAME + "-wal")).exists()  # the last connection closed cleanly
    assert count(root, "runs") == 1


@pytest.mark.slow
def test_a_thread_still_running_at_exit_keeps_its_store(tmp_path: Path) -> None:
    """The main thread returns while a worker thread goes on running pipelines: exit does not
    close that thread's store under it, and every run it made is recorded."""
    root = tmp_path / "store"
    code = textwrap.dedent(
        """
        import asyncio, pathlib, sys, threading, time
        from flowyml import Pipeline, step

        @step(outputs=["y"], cache=False)
        def double(x: int) -> int:
            return 2 * x

        async def serve() -> None:
            pipeline = Pipeline("served", cache_dir=sys.argv[1]).add_step(double)
            made = 0
            while not pathlib.Path(sys.argv[3]).exists():  # runs in flight when exit begins
                assert (await pipeline.arun(context={"x": made})).success
                made += 1
                if made == 1:
                    pathlib.Path(sys.argv[2]).touch()
            for _ in range(20):
                result = await pipeline.arun(context={"x": made})
                assert result.success and not result.store_errors, result.store_errors
                made += 1
            print(made)

        threading.Thread(target=lambda: asyncio.run(serve())).start()
        while not pathlib.Path(sys.argv[2]).exists():
            time.sleep(0.01)
        # the main thread ends here: exit begins while the server thread goes on
        threading._register_atexit(lambda: pathlib.Path(sys.argv[3]).touch())
        """
    )
    args = [str(root), str(tmp_path / "serving"), str(tmp_path / "exiting")]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert count(root, "runs") == int(done.stdout)


async def test_a_cancelled_opening_does_not_fail_the_runs_waiting_for_it(tmp_path: Path) -> None:
    root = tmp_path / "store"
    first = asyncio.ensure_future(shared_store(root))
    second = asyncio.ensure_future(shared_store(root))
    await asyncio.sleep(0)  # the first is opening the store, the second waits for it
    first.cancel()
    store = await second
    assert not store.closed and await shared_store(root) is store
    with pytest.raises(asyncio.CancelledError):
        await first
    await close_stores()
