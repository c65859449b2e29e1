"""Cache entries saved in bulk ahead of the index (``_store/_staged``): packing, what a run waits
for, indexing them after a failure, and what a killed process left saved."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import flowyml
from flowyml._errors import StoreError
from flowyml._store import INLINE_LIMIT, Store, _api, _staged
from flowyml._store._db import DB_NAME
from tests.test_store import sql


def flat(key: str, *outputs: tuple[str, bytes], created_at: float = 1.0) -> tuple[Any, ...]:
    """A put as the store lists it, with outputs of these pickled bytes."""
    row: list[Any] = [key, "step", "run-1", 0.5, created_at]
    for name, data in outputs:
        row += (name, _api._hexdigest(data), len(data), "bytes", data)
    return tuple(row)


def dead_pid() -> int:
    """The id of a process that has ended."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(done.stdout)


def save(root: Path, puts: list[tuple[Any, ...]], parts: list[Any], pid: int) -> list[int]:
    """Stage ``puts`` as the process ``pid`` on this host would have, with plain sqlite3."""
    conn = sqlite3.connect(root / DB_NAME, isolation_level=None)
    try:
        return _staged.stage(conn, _staged.pack(puts, parts, set(), INLINE_LIMIT), pid, socket.gethostname())
    finally:
        conn.close()


class TestPacking:
    def test_a_packed_row_unpacks_to_what_was_put(self) -> None:
        """Puts and key components come back equal; a filed output's bytes are left out."""
        small = pickle.dumps(1)
        big = b"x" * (INLINE_LIMIT + 1)
        puts = [flat("a", ("out", small)), flat("b", ("out", small), ("blob", big))]
        parts = ["a", "step", 1.0, {"step": "d1", "x": "d2"}, "failed", "step", 2.0, {"step": "d3"}]
        (row,) = list(_staged.pack(puts, parts, {id(puts[1])}, INLINE_LIMIT))
        unpacked = _staged.unpack(row)
        assert unpacked is not None
        got, got_parts = unpacked
        assert got[0] == puts[0]
        assert got[1][:-1] == puts[1][:-1] and got[1][-1] is None
        assert got_parts == parts

    def test_many_puts_pack_into_rows_of_a_chunk(self) -> None:
        """A batch bigger than a chunk is several rows, which hold every put once, in order."""
        puts = [flat(f"k{i}", ("out", b"v")) for i in range(_staged.CHUNK * 2 + 3)]
        rows = list(_staged.pack(puts, [], set(), INLINE_LIMIT))
        assert len(rows) == 3
        keys = [put[0] for row in rows for put in (_staged.unpack(row) or ([], []))[0]]
        assert keys == [put[0] for put in puts]

    @pytest.mark.parametrize(
        "data",
        [
            b"not a pickle",
            pickle.dumps(([("k",)], [])),  # a put too short
            pickle.dumps(([flat("k", ("out", b"v"))], ["k", "s", 1.0])),  # components not of four
            pickle.dumps(([flat("k", ("out", b"v"))], ["k", "s", 1.0, {"a": 1}])),  # a digest not text
            pickle.dumps({"puts": []}),
            "text",
        ],
    )
    def test_what_pack_does_not_make_reads_as_damaged(self, data: object) -> None:
        assert _staged.unpack(data) is None

    def test_unpacking_never_imports_or_calls(self, tmp_path: Path) -> None:
        """A row naming a callable (a crafted database) is refused before anything runs."""
        marker = tmp_path / "ran"

        class Boom:
            def __reduce__(self) -> tuple[Any, ...]:
                return (os.mkdir, (str(marker),))

        assert _staged.unpack(pickle.dumps(([Boom()], []))) is None
        assert not marker.exists()


class TestSaving:
    async def test_a_run_waits_until_its_entries_are_saved_not_indexed(
        self, store: Store, root: Path
    ) -> None:
        """``settle`` returns once many puts are saved; memory serves them until they are
        indexed, then the index does, and nothing stays staged."""
        mark = store.error_mark()
        n = _api._SPLIT_ENTRIES
        for i in range(n):
            store.put(key=f"k{i}", step_name=f"s{i}", run_id="r", outputs={"v": i}, duration=0.1)
        assert await store.settle(mark, wait=False) == ()
        assert sql(root, "SELECT COUNT(*) FROM cache_entries") == [(0,)]
        entry = await store.lookup("k7", query=False)
        assert entry is not None and await store.load(entry) == {"v": 7}
        await store.flush()
        assert sql(root, "SELECT COUNT(*) FROM cache_entries") == [(n,)]
        assert sql(root, "SELECT COUNT(*) FROM staged_entries") == [(0,)]
        async with await Store.open(root) as fresh:
            entry = await fresh.lookup(f"k{n - 1}")
            assert entry is not None and await fresh.load(entry) == {"v": n - 1}

    async def test_a_big_output_is_not_saved_again_with_the_packed_entries(
        self, store: Store, root: Path
    ) -> None:
        """An output written to its own file is in the packed rows by its hash, not its bytes."""
        mark = store.error_mark()
        store.put(
            key="big", step_name="s", run_id="r", outputs={"v": b"x" * (INLINE_LIMIT * 2)}, duration=0.1
        )
        for i in range(_api._SPLIT_ENTRIES):
            store.put(key=f"k{i}", step_name="s", run_id="r", outputs={"v": i}, duration=0.1)
        assert await store.settle(mark, wait=False) == ()
        saved = [_staged.unpack(data) for (data,) in sql(root, "SELECT entries FROM staged_entries")]
        (big,) = [put for rows in saved if rows is not None for put in rows[0] if put[0] == "big"]
        assert big[-1] is None and big[-3] > INLINE_LIMIT
        await store.flush()
        entry = await store.lookup("big")
        assert entry is not None and await store.load(entry) == {"v": b"x" * (INLINE_LIMIT * 2)}

    async def test_entries_indexed_in_chunks_keep_their_key_components(
        self, store: Store, root: Path
    ) -> None:
        """Indexed a chunk a transaction, each entry keeps its components in its own row."""
        n = _api._INDEX_CHUNK + 10
        for i in range(n):
            store.put(
                key=f"k{i}",
                step_name="s",
                run_id="r",
                outputs={"v": None},
                duration=0.1,
                parts={"step": f"d{i}"},
            )
        await store.flush()
        assert sql(root, "SELECT COUNT(*) FROM cache_entries WHERE parts IS NOT NULL") == [(n,)]
        assert sql(root, "SELECT COUNT(*) FROM cache_key_parts") == [(0,)]
        assert await store.key_parts([f"k{n - 1}"]) == {f"k{n - 1}": {"step": f"d{n - 1}"}}

    async def test_a_failed_index_loses_nothing_and_is_done_at_the_next_write(
        self, store: Store, root: Path
    ) -> None:
        """Indexing that fails after the entries are saved is reported, memory serves them, and
        the next batch indexes them."""
        sql(
            root,
            "CREATE TRIGGER full BEFORE INSERT ON cache_entries BEGIN SELECT RAISE(ABORT, 'disk full'); END",
        )
        mark = store.error_mark()
        n = _api._SPLIT_ENTRIES
        for i in range(n):
            store.put(key=f"k{i}", step_name="s", run_id="r", outputs={"v": i}, duration=0.1)
        assert await store.settle(mark, wait=False) == ()  # saved: the run lost nothing
        with pytest.raises(StoreError, match=r"indexing 1000 cache entries .* failed \(they are saved"):
            await store.flush()
        assert sql(root, "SELECT COUNT(*) FROM staged_entries") != [(0,)]
        entry = await store.lookup("k3")
        assert entry is not None and await store.load(entry) == {"v": 3}
        sql(root, "DROP TRIGGER full")
        store.put(key="later", step_name="s", run_id="r", outputs={"v": -1}, duration=0.1)
        await store.flush()
        assert sql(root, "SELECT COUNT(*) FROM cache_entries") == [(n + 1,)]
        assert sql(root, "SELECT COUNT(*) FROM staged_entries") == [(0,)]


class TestRecovery:
    async def test_what_a_gone_process_saved_is_indexed_by_the_next_store(self, root: Path) -> None:
        await (await Store.open(root)).aclose()  # the schema, made
        value = pickle.dumps({"answer": 42})
        save(root, [flat("k", ("out", value))], ["k", "step", 1.0, {"step": "d"}], dead_pid())
        async with await Store.open(root) as store:
            await store.flush()
            entry = await store.lookup("k")
            assert entry is not None and await store.load(entry) == {"out": {"answer": 42}}
            assert await store.key_parts(["k"]) == {"k": {"step": "d"}}
        assert sql(root, "SELECT COUNT(*) FROM staged_entries") == [(0,)]

    async def test_a_live_process_keeps_what_it_saved(self, root: Path) -> None:
        """Rows saved by a process still running are its own to index, not another store's."""
        await (await Store.open(root)).aclose()
        save(root, [flat("k", ("out", b"v"))], [], os.getpid())
        async with await Store.open(root) as store:
            await store.flush()
        assert sql(root, "SELECT COUNT(*) FROM cache_entries") == [(0,)]
        assert sql(root, "SELECT COUNT(*) FROM staged_entries") == [(1,)]

    async def test_a_reader_writes_nothing(self, root: Path) -> None:
        """A store opened with ``create=False`` (the command line) leaves saved rows alone."""
        await (await Store.open(root)).aclose()
        save(root, [flat("k", ("out", b"v"))], [], dead_pid())
        async with await Store.open(root, create=False) as reader:
            await reader.flush()
        assert sql(root, "SELECT COUNT(*) FROM staged_entries") == [(1,)]

    async def test_a_newer_entry_and_a_missing_file_are_kept_out(self, root: Path) -> None:
        """A saved entry older than the one indexed under its key is not indexed over it, and one
        whose artifact file is gone (collected meanwhile) is not indexed at all; both rows go."""
        async with await Store.open(root) as store:
            store.put(key="newer", step_name="s", run_id="r", outputs={"v": "indexed"}, duration=0.1)
            await store.flush()
        big = b"x" * (INLINE_LIMIT + 1)
        old = flat("newer", ("v", pickle.dumps("saved")), created_at=1.0)
        lost = flat("lost", ("blob", big))
        save(root, [old, lost], [], dead_pid())
        async with await Store.open(root) as store:
            await store.flush()
            entry = await store.lookup("newer")
            assert entry is not None and await store.load(entry) == {"v": "indexed"}
            assert await store.lookup("lost") is None
        assert sql(root, "SELECT COUNT(*) FROM staged_entries") == [(0,)]

    async def test_of_one_key_saved_twice_the_newer_is_indexed_with_its_components(self, root: Path) -> None:
        """Two gone processes saved one key: the newer entry wins, whatever the rows' order, and
        the components of the older are not written anywhere."""
        await (await Store.open(root)).aclose()
        newer = flat("k", ("v", pickle.dumps("newer")), created_at=5.0)
        older = flat("k", ("v", pickle.dumps("older")), created_at=2.0)
        save(root, [newer], ["k", "step", 5.0, {"step": "new"}], dead_pid())
        save(root, [older], ["k", "step", 2.0, {"step": "old"}], dead_pid())
        async with await Store.open(root) as store:
            await store.flush()
            entry = await store.lookup("k")
            assert entry is not None and await store.load(entry) == {"v": "newer"}
            assert await store.key_parts(["k"]) == {"k": {"step": "new"}}
        assert sql(root, "SELECT COUNT(*) FROM cache_key_parts") == [(0,)]

    async def test_a_damaged_row_is_dropped_and_reported(self, root: Path) -> None:
        await (await Store.open(root)).aclose()
        sql(
            root,
            "INSERT INTO staged_entries (pid, host, created_at, entries) VALUES (?, ?, 1.0, ?)",
            (dead_pid(), socket.gethostname(), b"garbage"),
        )
        async with await Store.open(root) as store:
            await store.flush()
            assert any("not packed cache entries" in note for note in store.damaged)
        assert sql(root, "SELECT COUNT(*) FROM staged_entries") == [(0,)]


# Puts many entries, waits as a run does (until they are saved), and is killed at once: before its
# writer indexes them.
KILLED = r"""
import asyncio, os, signal, sys
from flowyml._store import Store

async def main():
    store = await Store.open(sys.argv[1])
    for i in range(int(sys.argv[2])):
        store.put(key=f"k{i}", step_name="s", run_id="r", outputs={"v": i}, duration=0.1)
    assert await store.settle(store.error_mark(), wait=False) == ()
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


async def test_a_run_killed_after_its_entries_are_saved_loses_none(root: Path) -> None:
    n = _api._SPLIT_ENTRIES * 2
    env = {**os.environ, "PYTHONPATH": str(Path(flowyml.__file__).parent.parent)}
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", KILLED, str(root), str(n)], capture_output=True, env=env
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert sql(root, "SELECT COUNT(*) FROM staged_entries") != [(0,)]
    async with await Store.open(root) as store:
        await store.flush()
        for i in (0, n // 2, n - 1):
            entry = await store.lookup(f"k{i}")
            assert entry is not None and await store.load(entry) == {"v": i}
    assert sql(root, "SELECT COUNT(*) FROM cache_entries") == [(n,)]
    assert sql(root, "PRAGMA integrity_check") == [("ok",)]


@pytest.mark.parametrize("step_name", [None, "step"])
async def test_clearing_the_cache_drops_what_a_gone_process_saved(root: Path, step_name: str | None) -> None:
    """Cleared (all of it or a step's), the cache does not get back, later, entries a killed
    process saved."""
    async with await Store.open(root, create=True) as store:
        store.put(key="indexed", step_name="step", run_id="r", outputs={"v": 1}, duration=0.1)
        await store.flush()
    async with await Store.open(root, create=False) as reader:
        save(root, [flat("saved", ("out", b"v"))], [], dead_pid())
        assert await reader.clear_cache(step_name) == 2
    assert sql(root, "SELECT COUNT(*) FROM staged_entries") == [(0,)]
    async with await Store.open(root) as store:
        await store.flush()
        assert await store.lookup("saved") is None
