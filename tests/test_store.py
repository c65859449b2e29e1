"""The cache and lineage store, used directly: round trips, corruption, permissions, records, lineage."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import pickle
import sqlite3
import stat
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
import xxhash

from flowyml._errors import CacheCorruptionWarning, StoreError, UncachedStepWarning
from flowyml._store import (
    INLINE_LIMIT,
    PRELOAD_PER_STEP,
    CacheEntry,
    CacheView,
    RunRecord,
    StepRecord,
    StepShape,
    Store,
    _api,
    _db,
    _staged,
    resolve_root,
)
from flowyml._store._db import DB_NAME, SCHEMA_VERSION


def big(tag: int = 0) -> bytes:
    """A value whose pickle is too large to live inline."""
    return bytes([tag % 256]) * (INLINE_LIMIT + 100)


def put(
    store: Store, key: str = "k", step: str = "s", run_id: str = "run-1", **outputs: Any
) -> dict[str, str] | None:
    return store.put(key=key, step_name=step, run_id=run_id, outputs=outputs or {"out": 1}, duration=2.5)


async def reload(root: Path, key: str) -> tuple[Store, CacheEntry | None]:
    """A fresh store (nothing in memory) and what it finds for ``key``."""
    fresh = await Store.open(root)
    return fresh, await fresh.lookup(key)


def sql(root: Path, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement on the store's database with plain sqlite3 and commit."""
    conn = sqlite3.connect(root / DB_NAME)
    try:
        rows = conn.execute(statement, params).fetchall()
        conn.commit()
        return rows
    finally:
        conn.close()


@contextlib.contextmanager
def write_lock(root: Path) -> Iterator[None]:
    """Another connection holding the store's write lock (BEGIN IMMEDIATE) meanwhile."""
    holder = sqlite3.connect(root / DB_NAME, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        yield
    finally:
        if holder.in_transaction:
            holder.execute("ROLLBACK")
        holder.close()


def artifact_path(root: Path, entry: CacheEntry, name: str = "out") -> Path:
    (out,) = (o for o in entry.outputs if o.name == name)
    return root / "artifacts" / out.artifact_hash


@pytest.fixture
def umask_zero() -> Iterator[None]:
    """The most permissive umask, so only explicit modes can make files private."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


class TestResolveRoot:
    def test_explicit_dir_wins(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """cache_dir beats $FLOWYML_HOME."""
        monkeypatch.setenv("FLOWYML_HOME", str(tmp_path / "env"))
        assert resolve_root(tmp_path / "mine") == tmp_path / "mine"

    def test_environment_variable(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """$FLOWYML_HOME is used when no cache_dir is given."""
        monkeypatch.setenv("FLOWYML_HOME", str(tmp_path / "env"))
        assert resolve_root() == tmp_path / "env"

    def test_default_is_dot_flowyml_in_cwd(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without either, the store is ./.flowyml."""
        monkeypatch.delenv("FLOWYML_HOME", raising=False)
        monkeypatch.chdir(tmp_path)
        assert resolve_root() == tmp_path / ".flowyml"


class TestRoundTrip:
    async def test_inline_value(self, store: Store) -> None:
        """A small value comes back equal, stored inline."""
        put(store, out={"a": [1, 2]})
        await store.flush()
        entry = await store.lookup("k")
        assert entry is not None
        assert entry.outputs[0].inline is not None
        assert await store.load(entry) == {"out": {"a": [1, 2]}}

    async def test_file_value(self, store: Store, root: Path) -> None:
        """A large value is written to a file named by its hash, and comes back equal."""
        hashes = put(store, out=big())
        await store.flush()
        assert hashes is not None
        assert (root / "artifacts" / hashes["out"]).is_file()
        entry = await store.lookup("k")
        assert entry is not None
        assert await store.load(entry) == {"out": big()}

    async def test_survives_reopen(self, store: Store, root: Path) -> None:
        """A committed entry is found by a new store on the same directory."""
        put(store, small=1, large=big())
        await store.aclose()
        fresh, entry = await reload(root, "k")
        async with fresh:
            assert entry is not None
            assert entry.duration_seconds == 2.5
            assert await fresh.load(entry) == {"small": 1, "large": big()}

    async def test_value_is_snapshotted_at_put(self, store: Store) -> None:
        """Mutating an output after put does not change what is cached."""
        value = [1, 2]
        put(store, out=value)
        value.append(3)
        await store.flush()
        entry = await store.lookup("k")
        assert entry is not None
        assert await store.load(entry) == {"out": [1, 2]}

    async def test_miss(self, store: Store) -> None:
        """An unknown key is None."""
        assert await store.lookup("nope") is None

    async def test_several_outputs_keep_names_and_order(self, store: Store) -> None:
        """Every output of a step comes back under its name."""
        put(store, a=1, b="two", c=big(3))
        await store.flush()
        entry = await store.lookup("k")
        assert entry is not None
        assert [o.name for o in entry.outputs] == ["a", "b", "c"]
        assert await store.load(entry) == {"a": 1, "b": "two", "c": big(3)}

    async def test_put_is_visible_before_commit(self, store: Store) -> None:
        """A just-put entry (even a large one) is served from memory before the writer runs."""
        put(store, out=big(7))
        entry = await store.lookup("k", query=False)
        assert entry is not None
        assert await store.load(entry) == {"out": big(7)}
        await store.flush()

    def test_plain_values_pickle_as_cloudpickle_does(self) -> None:
        """Builtin values take pickle's shorter path; the bytes (so the artifact hashes, which
        identify downstream inputs) are cloudpickle's, and other values still go to cloudpickle."""

        class Mine(dict[str, int]):
            pass

        plain: list[Any] = [None, True, 3, 2**80, 1.5, 2j, "é", b"\x00" * 70_000, (1, "a"), [1, [2, [3]]]]
        plain += [{"a": [1, 2], "b": {"c": b"x"}}, {1: 2}]
        for value in plain:
            assert _api._plain(value), value
            assert _api._pickle(value) == cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        local = 5
        for value in [Mine(a=1), [[[[1]]]], {(1, 2): 3}, lambda: local, {1, 2}, list(range(1000))]:
            assert not _api._plain(value), value
            assert _api._pickle(value) == cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)

    async def test_unpicklable_output_is_not_cached(self, store: Store) -> None:
        """An output cloudpickle cannot pickle warns, caches nothing and raises nothing."""
        with pytest.warns(UncachedStepWarning, match="'s'.*'bad'"):
            result = put(store, good=1, bad=threading.Lock())
        assert result is None
        await store.flush()
        assert await store.lookup("k") is None


async def trace(store: Store, callback: Callable[[str], object] | None) -> None:
    """Set the trace hook of the store's connection on the connection's own thread: set from the
    loop while that thread runs a statement (the writer's checkpoint after a batch), SQLite's
    mutex waits for the statement, whose trace call waits for the loop thread's GIL."""
    await _db.on_thread(store._conn, lambda db: db.set_trace_callback(callback))


@contextlib.asynccontextmanager
async def statements(store: Store) -> AsyncIterator[list[str]]:
    """Every SQL statement the store's connection runs meanwhile, as SQLite's trace hook sees them."""
    seen: list[str] = []
    await trace(store, seen.append)
    try:
        yield seen
    finally:
        await trace(store, None)


@contextlib.asynccontextmanager
async def reopened(store: Store, root: Path, steps: list[str]) -> AsyncIterator[tuple[Store, CacheView]]:
    """``store`` closed and opened again, with a fresh run's view of ``steps``."""
    await store.aclose()
    async with await Store.open(root) as fresh:
        yield fresh, await fresh.preload(steps)


def reads(seen: list[str]) -> list[str]:
    """The statements that read the cache index."""
    return [s for s in seen if s.lstrip().upper().startswith("SELECT") and "cache_entries" in s]


class TestHotPath:
    @pytest.fixture(autouse=True, params=["one pass", "by index"])
    def read_path(self, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
        """Each test with preload reading the index in one pass over each table, and through its indexes."""
        monkeypatch.setattr(_api, "_SCAN_SHARE", 10**9 if request.param == "one pass" else 0)

    async def test_preload_serves_without_query(self, store: Store, root: Path) -> None:
        """After preload, look-up and load through the view do not touch the database."""
        put(store, key="k1", step="s", out=1)
        async with reopened(store, root, ["s"]) as (fresh, view):
            async with statements(fresh) as seen:
                entry = await fresh.lookup("k1", view=view)
                assert entry is not None
                assert await fresh.load(entry) == {"out": 1}
            assert seen == []

    async def test_inline_hit_serves_a_preloaded_entry(self, store: Store, root: Path) -> None:
        """A preloaded inline entry is served as outputs, duration and hashes, without a query."""
        hashes = put(store, key="k1", step="s", out=[1, 2], other="x")
        await store.aclose()
        async with await Store.open(root) as fresh:
            view = await fresh.preload(["s"])
            async with statements(fresh) as seen:
                assert fresh.inline_hit("k1", view) == ({"out": [1, 2], "other": "x"}, 2.5, hashes)
                assert fresh.inline_hit("k2", view) is None
                assert fresh.inline_hit("k1", None) is None  # neither in memory nor in a view
            assert seen == []

    async def test_inline_hit_serves_an_uncommitted_put(self, store: Store) -> None:
        """An entry put and not committed yet is served from memory."""
        hashes = put(store, key="k1", out=3)
        assert store.inline_hit("k1", None) == ({"out": 3}, 2.5, hashes)

    async def test_inline_hit_leaves_files_and_corruption_to_load(self, store: Store, root: Path) -> None:
        """An output in a file, or a changed blob, is not served: look-up and load decide, and
        the corrupt entry is reported and dropped by them."""
        put(store, key="big", step="s", out=big())
        put(store, key="k1", step="s", out="hello")
        await store.aclose()
        sql(root, "UPDATE cache_outputs SET inline = ? WHERE key = 'k1'", (b"\x80\x05K\x07.",))
        async with await Store.open(root) as fresh:
            view = await fresh.preload(["s"])
            assert fresh.inline_hit("big", view) is None
            entry = await fresh.lookup("big", view=view)
            assert entry is not None and await fresh.load(entry) == {"out": big()}
            assert fresh.inline_hit("k1", view) is None  # nothing reported here
            entry = await fresh.lookup("k1", view=view)
            assert entry is not None
            with pytest.warns(CacheCorruptionWarning, match="inline"):
                assert await fresh.load(entry) is None
            assert fresh.inline_hit("k1", view) is None
            assert await fresh.lookup("k1", view=view) is None

    async def test_a_key_the_index_lacks_misses_without_a_query(self, store: Store, root: Path) -> None:
        """The view knows every key of its steps: any other key is a miss, no query, no wait."""
        put(store, key="k1", step="s", out=1)
        async with reopened(store, root, ["s"]) as (fresh, view):
            async with statements(fresh) as seen:
                found = [await fresh.lookup(f"new-{i}", view=view) for i in range(50)]
            assert found == [None] * 50
            assert seen == []
            async with statements(fresh) as seen:
                assert await fresh.lookup("new-0") is None  # without the view: asks
            assert len(reads(seen)) == 1

    async def test_an_older_entry_is_found_by_one_query(self, store: Store, root: Path) -> None:
        """A key the index holds but preload did not load (not among the newest) costs one query."""
        for i in range(PRELOAD_PER_STEP + 2):
            put(store, key=f"k{i}", step="s", out=i)
        await store.aclose()
        for i in range(PRELOAD_PER_STEP + 2):
            sql(root, "UPDATE cache_entries SET created_at = ? WHERE key = ?", (1000.0 + i, f"k{i}"))
        async with await Store.open(root) as fresh:
            view = await fresh.preload(["s"])
            async with statements(fresh) as seen:
                oldest = await fresh.lookup("k0", view=view)
                assert oldest is not None and await fresh.load(oldest) == {"out": 0}
                again = await fresh.lookup("k0", view=view)  # the view keeps what it found
            assert again == oldest
            assert len(reads(seen)) == 1

    async def test_too_many_keys_fall_back_to_queries(
        self, store: Store, root: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Past the bound, preload holds no key set, and each miss asks the database (and finds)."""
        for i in range(5):
            put(store, key=f"k{i}", step="s", out=i)
        await store.aclose()
        monkeypatch.setattr(_api, "KNOWN_KEYS_BASE", 3)
        monkeypatch.setattr(_api, "KNOWN_KEYS_PER_STEP", 0)
        async with await Store.open(root) as fresh:
            view = await fresh.preload(["s"], per_step=1)
            assert view.keys is None
            async with statements(fresh) as seen:
                assert await fresh.lookup("nope", view=view) is None
                entry = await fresh.lookup("k0", view=view)
            assert entry is not None and await fresh.load(entry) == {"out": 0}
            assert len(reads(seen)) == 2

    async def test_an_entry_another_store_committed_later_is_computed_again(
        self, store: Store, root: Path
    ) -> None:
        """A key committed by another connection after the view was read is a miss (a cache may
        compute again); caching it again replaces the row, and every reader then finds it."""
        put(store, key="k0", step="s", out=0)
        await store.flush()
        view = await store.preload(["s"])
        async with await Store.open(root) as other:
            put(other, key="late", step="s", out="theirs")
            await other.flush()
        assert await store.lookup("late", view=view) is None  # known miss: recomputed
        put(store, key="late", step="s", out="ours")
        await store.flush()
        entry = await store.lookup("late", view=view)
        assert entry is not None and await store.load(entry) == {"out": "ours"}
        assert sql(root, "SELECT COUNT(*) FROM cache_entries WHERE key = 'late'") == [(1,)]
        async with await Store.open(root) as reader:
            found = await reader.lookup("late")
            assert found is not None and await reader.load(found) == {"out": "ours"}

    async def test_committed_entries_leave_memory(self, store: Store, root: Path) -> None:
        """Once committed, an entry and its pickled bytes are no longer held by the store; a view
        read before the put learns its key and finds it in the database."""
        view = await store.preload(["s"])
        put(store, key="k1", step="s", out=big(1))
        put(store, key="k2", step="s", out=2)
        assert set(store._memory) == {"k1", "k2"}
        await store.flush()
        assert store._memory == {}
        assert view.keys is not None and {"k1", "k2"} <= view.keys
        entry = await store.lookup("k1", view=view)
        assert entry is not None and await store.load(entry) == {"out": big(1)}
        assert entry.outputs[0].inline is None  # read from its file, not held

    async def test_a_failed_commit_keeps_serving_from_memory(self, store: Store, root: Path) -> None:
        """When the commit fails, the entry stays in memory: its values are right."""
        sql(root, "CREATE TRIGGER boom BEFORE INSERT ON cache_entries BEGIN SELECT RAISE(ABORT, 'boom'); END")
        put(store, key="k1", step="s", out=1)
        with pytest.raises(StoreError, match="boom"):
            await store.flush()
        entry = await store.lookup("k1", query=False)
        assert entry is not None and await store.load(entry) == {"out": 1}

    async def test_a_preloaded_entry_found_corrupt_is_not_served_again(
        self, store: Store, root: Path
    ) -> None:
        """Once load finds a preloaded entry damaged, the view no longer has it: a miss, no query."""
        put(store, key="k1", step="s", out=big(1))
        await store.flush()
        view = await store.preload(["s"])
        entry = await store.lookup("k1", view=view)
        assert entry is not None
        artifact_path(root, entry).write_bytes(b"damaged")
        with pytest.warns(CacheCorruptionWarning):
            assert await store.load(entry) is None
        async with statements(store) as seen:
            assert await store.lookup("k1", view=view) is None
        assert reads(seen) == []
        await store.flush()
        assert sql(root, "SELECT COUNT(*) FROM cache_entries") == [(0,)]

    async def test_a_view_is_freed_with_its_run(self, store: Store) -> None:
        """The store does not keep a view alive: what it loaded goes with the run holding it."""
        put(store, key="k1", step="s", out=1)
        await store.flush()
        view = await store.preload(["s"])
        assert "k1" in view.entries and len(store._views) == 1
        del view
        gc.collect()
        assert len(store._views) == 0

    async def test_preload_only_loads_named_steps(self, store: Store, root: Path) -> None:
        """Entries of steps not preloaded are not in the view."""
        put(store, key="k1", step="s", out=1)
        put(store, key="k2", step="t", out=2)
        async with reopened(store, root, ["s"]) as (fresh, view):
            assert await fresh.lookup("k1", query=False, view=view) is not None
            assert await fresh.lookup("k2", query=False, view=view) is None
            assert set(view.entries) == {"k1"}

    async def test_preload_loads_only_the_most_recent_entries_of_a_step(
        self, store: Store, root: Path
    ) -> None:
        """A step with many entries preloads at most PRELOAD_PER_STEP of them, the newest; the
        older ones are still found by a look-up."""
        keys = [f"k{i:02d}" for i in range(12)]
        for i, key in enumerate(keys):
            put(store, key=key, step="s", out=bytes([i]) * 1000)
        put(store, key="other", step="t", out=1)
        await store.aclose()
        for i, key in enumerate(keys):  # distinct creation times, k11 the newest
            sql(root, "UPDATE cache_entries SET created_at = ? WHERE key = ?", (1000.0 + i, key))
        async with await Store.open(root) as fresh:
            view = await fresh.preload(["s", "t"])
            in_memory = [k for k in keys if await fresh.lookup(k, query=False, view=view) is not None]
            assert in_memory == keys[-PRELOAD_PER_STEP:]
            assert await fresh.lookup("other", query=False, view=view) is not None
            oldest = await fresh.lookup(keys[0], view=view)  # one query
            assert oldest is not None
            assert await fresh.load(oldest) == {"out": bytes([0]) * 1000}

    async def test_preload_size_does_not_grow_with_the_cache(self, store: Store, root: Path) -> None:
        """However many entries each step has, preload loads at most PRELOAD_PER_STEP per step."""
        for step_name in ("a", "b", "c"):
            for i in range(2 * PRELOAD_PER_STEP + 3):
                put(store, key=f"{step_name}{i}", step=step_name, out=i)
        async with reopened(store, root, ["a", "b", "c"]) as (fresh, view):
            assert len(view.entries) == 3 * PRELOAD_PER_STEP
            assert view.keys is not None and len(view.keys) == 3 * (PRELOAD_PER_STEP + 3)  # the others
            assert len((await fresh.preload(["a"], per_step=1)).entries) == 1
            assert fresh._memory == {}

    async def test_preload_keeps_each_entrys_outputs_in_order(self, store: Store, root: Path) -> None:
        """Output rows read out of their order (here stored last to first) come back in it."""
        put(store, key="k1", step="s", a=1, b=2, c=3)
        put(store, key="k2", step="t", out=4)
        await store.aclose()
        sql(root, "UPDATE cache_outputs SET position = position + 10 WHERE key = 'k1'")
        sql(root, "UPDATE cache_outputs SET position = 12 - position WHERE key = 'k1'")
        async with await Store.open(root) as fresh:
            view = await fresh.preload(["s", "t"])
            entry = await fresh.lookup("k1", query=False, view=view)
            assert entry is not None and [o.name for o in entry.outputs] == ["c", "b", "a"]
            assert await fresh.load(entry) == {"a": 1, "b": 2, "c": 3}
            found = fresh.inline_hit("k2", view)
            assert found is not None and found[0] == {"out": 4}

    @pytest.mark.parametrize(
        ("damage", "why"),
        [
            ("UPDATE cache_entries SET duration_seconds = 'long' WHERE key = 'k1'", "its row has values"),
            ("UPDATE cache_entries SET created_at = 'yesterday' WHERE key = 'k1'", "its row has values"),
            ("UPDATE cache_entries SET outputs = 'one' WHERE key = 'k1'", "its row has values"),
            ("UPDATE cache_outputs SET size = 'big' WHERE key = 'k1'", "output row 'out' has values"),
            ("UPDATE cache_outputs SET inline = 'text' WHERE key = 'k1'", "output row 'out' has values"),
            ("DELETE FROM cache_outputs WHERE key = 'k1'", "1 of its 1 output rows are missing"),
            (
                "INSERT INTO cache_outputs SELECT key, 1, 'out2', artifact_hash, size, type_name, inline "
                "FROM cache_outputs WHERE key = 'k1'",
                "-1 of its 1 output rows are missing",
            ),
        ],
    )
    async def test_preload_drops_a_damaged_entry(
        self, store: Store, root: Path, damage: str, why: str
    ) -> None:
        """A row of the wrong types or the wrong number of output rows: a miss, dropped, named."""
        put(store, key="k1", step="s", out=1)
        put(store, key="k2", step="t", out=2)
        await store.aclose()
        sql(root, damage)
        async with await Store.open(root) as fresh:
            with pytest.warns(CacheCorruptionWarning, match=why):
                view = await fresh.preload(["s", "t"])
            assert set(view.entries) == {"k2"}
            assert await fresh.lookup("k1", view=view) is None
            await fresh.flush()
        assert sql(root, "SELECT key FROM cache_entries") == [("k2",)]

    async def test_concurrent_misses_share_one_query(self, store: Store) -> None:
        """Look-ups that miss memory together are answered by one query."""
        put(store, key="k1", out=1)
        await store.flush()
        store._memory.clear()
        calls = 0
        real = store._conn.execute_fetchall

        async def counting(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            return await real(*args, **kwargs)

        store._conn.execute_fetchall = counting  # type: ignore[method-assign,assignment]
        found = await asyncio.gather(*(store.lookup(k) for k in ["k1", "x", "y", "k1"]))
        del store._conn.execute_fetchall
        assert calls == 1
        assert [e is not None for e in found] == [True, False, False, True]


class TestAllOrNothing:
    async def test_failed_transaction_caches_no_output(self, store: Store, root: Path) -> None:
        """When one output row cannot be written, none of the step's outputs is cached."""
        sql(
            root,
            "CREATE TRIGGER boom BEFORE INSERT ON cache_outputs WHEN NEW.output_name = 'b' "
            "BEGIN SELECT RAISE(ABORT, 'boom'); END",
        )
        put(store, a=1, b=2)
        with pytest.raises(StoreError, match="boom"):
            await store.flush()
        assert sql(root, "SELECT COUNT(*) FROM cache_entries") == [(0,)]
        assert sql(root, "SELECT COUNT(*) FROM cache_outputs") == [(0,)]

    async def test_one_corrupt_output_misses_the_whole_entry(self, store: Store, root: Path) -> None:
        """A step with one bad artifact among several is a miss as a whole."""
        put(store, a=1, b=big())
        await store.flush()
        entry = await store.lookup("k")
        assert entry is not None
        artifact_path(root, entry, "b").unlink()
        with pytest.warns(CacheCorruptionWarning):
            assert await store.load(entry) is None


class TestCorruption:
    async def stored(self, store: Store, root: Path) -> tuple[CacheEntry, Path]:
        put(store, out=big())
        await store.flush()
        entry = await store.lookup("k")
        assert entry is not None
        return entry, artifact_path(root, entry)

    async def test_truncated_file_is_a_miss(self, store: Store, root: Path) -> None:
        """A truncated artifact is not unpickled: the load is a miss."""
        entry, path = await self.stored(store, root)
        path.write_bytes(path.read_bytes()[:100])
        with pytest.warns(CacheCorruptionWarning, match="does not match its hash"):
            assert await store.load(entry) is None

    async def test_flipped_byte_is_a_miss(self, store: Store, root: Path) -> None:
        """An artifact with one byte changed is a miss."""
        entry, path = await self.stored(store, root)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        with pytest.warns(CacheCorruptionWarning):
            assert await store.load(entry) is None

    async def test_missing_file_is_a_miss(self, store: Store, root: Path) -> None:
        """A deleted artifact is a miss."""
        entry, path = await self.stored(store, root)
        path.unlink()
        with pytest.warns(CacheCorruptionWarning, match="is missing"):
            assert await store.load(entry) is None

    async def test_warning_names_step_key_and_file(self, store: Store, root: Path) -> None:
        """The warning says which step, which key and which file."""
        entry, path = await self.stored(store, root)
        path.write_bytes(b"junk")
        with pytest.warns(CacheCorruptionWarning) as caught:
            await store.load(entry)
        message = str(caught[0].message)
        assert "'s'" in message
        assert entry.key in message
        assert str(path) in message

    async def test_bad_file_is_quarantined(self, store: Store, root: Path) -> None:
        """The bad file is moved to quarantine/, not deleted and not left in place."""
        entry, path = await self.stored(store, root)
        path.write_bytes(b"junk")
        with pytest.warns(CacheCorruptionWarning):
            await store.load(entry)
        assert not path.exists()
        (moved,) = (root / "quarantine").iterdir()
        assert moved.read_bytes() == b"junk"

    async def test_index_row_is_dropped(self, store: Store, root: Path) -> None:
        """After a corrupt load the key is a miss, in this store and in a fresh one."""
        entry, path = await self.stored(store, root)
        path.unlink()
        with pytest.warns(CacheCorruptionWarning):
            await store.load(entry)
        assert await store.lookup("k") is None
        await store.aclose()
        fresh, again = await reload(root, "k")
        await fresh.aclose()
        assert again is None

    async def test_fresh_put_works_again(self, store: Store, root: Path) -> None:
        """After a corruption, putting the same value again caches it intact."""
        entry, path = await self.stored(store, root)
        path.write_bytes(b"junk")
        with pytest.warns(CacheCorruptionWarning):
            await store.load(entry)
        put(store, out=big())
        await store.aclose()
        fresh, again = await reload(root, "k")
        async with fresh:
            assert again is not None
            assert await fresh.load(again) == {"out": big()}

    async def test_corrupt_inline_blob_is_a_miss(self, store: Store, root: Path) -> None:
        """A changed inline blob is never unpickled, and its entry is dropped."""
        put(store, out="hello")
        await store.aclose()
        sql(root, "UPDATE cache_outputs SET inline = ? WHERE key = 'k'", (b"\x80\x05K\x07.",))
        fresh, entry = await reload(root, "k")
        async with fresh:
            assert entry is not None
            with pytest.warns(CacheCorruptionWarning, match="inline"):
                assert await fresh.load(entry) is None
            assert await fresh.lookup("k") is None

    async def test_drop_spares_a_newer_entry(self, store: Store) -> None:
        """Dropping a corrupt entry does not remove a newer entry put under the same key."""
        put(store, out=big(1))
        await store.flush()
        old = await store.lookup("k")
        assert old is not None
        put(store, out=2)  # a newer entry (other content) replaces it before the drop commits
        await store.flush()
        (Path(store.root) / "artifacts" / old.outputs[0].artifact_hash).unlink()
        with pytest.warns(CacheCorruptionWarning):
            await store.load(old)
        await store.flush()
        store._memory.clear()
        entry = await store.lookup("k")
        assert entry is not None
        assert await store.load(entry) == {"out": 2}


class TestPermissions:
    async def test_directories_are_owner_only(self, root: Path, umask_zero: None) -> None:
        """The store, artifacts and quarantine directories are 0o700 whatever the umask."""
        async with await Store.open(root):
            pass
        for path in (root, root / "artifacts", root / "quarantine"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o700, path

    async def test_files_are_owner_only(self, root: Path, umask_zero: None) -> None:
        """The database, its WAL files and artifact files are 0o600 whatever the umask."""
        async with await Store.open(root) as store:
            put(store, out=big())
            await store.flush()
            files = [p for p in root.rglob("*") if p.is_file()]
            assert {p.name for p in files} >= {DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm"}
            assert any(p.parent.name == "artifacts" for p in files)
            for path in files:
                assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


class TestLifecycle:
    async def test_the_page_cache_is_large_and_handed_back_after_a_big_batch(self, store: Store) -> None:
        """The connection may cache CACHE_KIB of pages (a big batch inserts random keys into
        several B-trees); a batch of _SHRINK_ROWS rows or more ends by handing them back."""
        rows = await store._conn.execute_fetchall("PRAGMA cache_size")
        assert list(rows) == [(-_db.CACHE_KIB,)]
        seen: list[str] = []
        await trace(store, seen.append)
        for i in range(_api._SHRINK_ROWS):
            put(store, key=f"k{i}", out=i)
        await store.flush()
        put(store, key="one more", out=0)
        await store.flush()
        await trace(store, None)
        assert seen.count("PRAGMA shrink_memory") == 1

    async def test_none_and_booleans_are_stored_as_their_pickles(self, store: Store, root: Path) -> None:
        """The outputs put without pickling them each time (None, True, False) read back as
        themselves, under the hash of their pickle, with their type's name."""
        hashes = store.put(
            key="k", step_name="s", run_id="r", outputs={"a": None, "b": True, "c": False, "d": 1}, duration=1
        )
        assert hashes is not None
        for name, value in (("a", None), ("b", True), ("c", False), ("d", 1)):
            assert hashes[name] == xxhash.xxh3_128_hexdigest(cloudpickle.dumps(value, protocol=5))
        await store.flush()
        fresh, entry = await reload(root, "k")
        async with fresh:
            assert entry is not None
            assert [o.type_name for o in entry.outputs] == ["NoneType", "bool", "bool", "int"]
            loaded = await fresh.load(entry)
            assert loaded == {"a": None, "b": True, "c": False, "d": 1}
            assert loaded is not None and loaded["b"] is True and loaded["d"] is not True

    async def test_settle_waits_for_an_entry_put_again_while_its_key_committed(
        self, store: Store, root: Path
    ) -> None:
        """A key put again while its first put commits is not committed with it: a run that then
        settles still waits for its own put, and finds it in the index afterwards."""
        put(store, key="k", out=1)
        for _ in range(10_000):
            if store._taken is not None:
                break
            await asyncio.sleep(0)
        assert store._taken is not None
        put(store, key="k", out=2)  # another run's put of the same key
        for _ in range(10_000):
            if "k" not in store._unsaved:  # the first commit's housekeeping is done
                break
            await asyncio.sleep(0)
        mark = store.error_mark()
        assert await store.settle(mark, wait=False) == ()
        value = sql(root, "SELECT inline FROM cache_outputs WHERE key = 'k'")
        assert [pickle.loads(v) for (v,) in value] == [2]

    async def test_an_artifact_put_twice_in_a_batch_names_its_first_producer(
        self, store: Store, root: Path
    ) -> None:
        """Of two puts of one value in one batch, the first put (not the first key) is recorded
        as the artifact's producer."""
        store.put(key="b-key", step_name="first", run_id="run-1", outputs={"x": 42}, duration=1)
        store.put(key="a-key", step_name="second", run_id="run-2", outputs={"x": 42}, duration=1)
        await store.flush()
        assert sql(root, "SELECT producer_run_id, producer_step FROM artifacts") == [("run-1", "first")]

    async def test_two_puts_of_one_key_in_one_batch_keep_the_later(self, store: Store, root: Path) -> None:
        """The same key put twice before a commit (a mapped step's equal items) stores the later
        put, and the rest of the batch with it."""
        put(store, key="k", out=1)
        put(store, key="other", out=3)
        put(store, key="k", out=2)
        await store.flush()
        fresh, entry = await reload(root, "k")
        async with fresh:
            assert entry is not None and await fresh.load(entry) == {"out": 2}
            assert await fresh.lookup("other") is not None

    async def test_many_entries_commit_before_the_lineage_queued_with_them(
        self, store: Store, root: Path
    ) -> None:
        """A run waits for its cache entries, not its lineage, nor for their index: a batch of
        many entries and step records saves the entries in a transaction of their own first,
        and ``settle`` without ``wait`` returns once they are saved. They are indexed next, then
        the lineage commits, and nothing stays staged."""
        mark = store.error_mark()
        commits = store.commits
        store.record_run(run_record())
        for i in range(_api._SPLIT_ENTRIES):
            put(store, key=f"k{i}", step=f"s{i}", out=i)
            store.record_step(StepRecord("run-1", f"s{i}", "succeeded", started_at=float(i)))
        assert await store.settle(mark, wait=False) == ()
        saved = [_staged.unpack(data) for (data,) in sql(root, "SELECT entries FROM staged_entries")]
        keys = {put[0] for unpacked in saved if unpacked is not None for put in unpacked[0]}
        assert keys == {f"k{i}" for i in range(_api._SPLIT_ENTRIES)}
        assert sql(root, "SELECT COUNT(*) FROM step_records") == [(0,)]
        await store.flush()
        assert sql(root, "SELECT COUNT(*) FROM cache_entries") == [(_api._SPLIT_ENTRIES,)]
        assert sql(root, "SELECT COUNT(*) FROM staged_entries") == [(0,)]
        assert store.commits == commits + 2
        async with await Store.open(root) as fresh:
            detail = await fresh.get_run("run-1")
        assert detail is not None and len(detail.steps) == _api._SPLIT_ENTRIES

    async def test_entries_put_while_entries_commit_first_are_not_held_behind_the_lineage(
        self, store: Store, root: Path
    ) -> None:
        """An entry put while the writer commits a batch's entries ahead of its lineage commits
        after that lineage in a transaction of its own, not in the lineage's."""
        commits = store.commits
        store.record_run(run_record())
        for i in range(_api._SPLIT_ENTRIES):
            put(store, key=f"k{i}", step=f"s{i}", out=i)
            store.record_step(StepRecord("run-1", f"s{i}", "succeeded", started_at=float(i)))
        for _ in range(10_000):
            if store._taken is not None:  # the writer is committing the entries
                break
            await asyncio.sleep(0)
        assert store._taken is not None and store._taken.puts and not store._taken.steps
        put(store, key="late", out=1)
        await store.flush()
        assert store.commits == commits + 3
        assert sql(root, "SELECT COUNT(*) FROM cache_entries") == [(_api._SPLIT_ENTRIES + 1,)]

    async def test_a_batch_makes_the_same_rows_each_time_it_commits(self, tmp_path: Path) -> None:
        """A batch's rows are made as SQLite takes them; a second commit of the same batch (a
        retry after a locked database) writes the same rows again."""
        tables = ("artifacts", "cache_entries", "cache_outputs", "cache_key_parts", "step_records", "runs")
        async with await Store.open(tmp_path / "a") as first, await Store.open(tmp_path / "b") as second:
            first.record_run(run_record())
            for i in range(30):
                put(first, key=f"k{i}", step=f"s{i}", out=i % 7, flag=i % 2 == 0)
                first.put_key_parts(f"k{i}", f"s{i}", {"code": f"c{i}", "inputs": "i"})
                first.record_step(
                    StepRecord("run-1", f"s{i}", "succeeded", started_at=float(i), outputs={"out": None})
                )
            first.put_key_parts("failed", "f", {"code": "c"})
            rows = _api._BatchRows(first._take_steps(_api._Batch()))
            await _db.on_thread(first._conn, rows.commit)
            await _db.on_thread(second._conn, rows.commit)
            rows.release()
        for table in tables:
            assert sql(tmp_path / "a", f"SELECT * FROM {table}") == sql(
                tmp_path / "b", f"SELECT * FROM {table}"
            )
            assert sql(tmp_path / "a", f"SELECT count(*) FROM {table}") != [(0,)], table

    async def test_a_big_lineage_batch_commits_with_a_small_page_cache(self, store: Store) -> None:
        """A batch of many step runs and few keyed rows (lineage only) commits with a page cache of
        _SMALL_CACHE_KIB, then the connection's cache is CACHE_KIB again; all its steps are read back."""
        seen: list[str] = []
        await trace(store, seen.append)
        store.record_run(run_record())
        n = _api._SMALL_CACHE_STEPS
        for i in range(n):
            store.record_step(
                StepRecord("run-1", f"s{i}", "succeeded", started_at=float(i), outputs={"v": None})
            )
        await store.flush()
        put(store, out=1)  # a small batch keeps the large cache
        await store.flush()
        await trace(store, None)
        small = f"PRAGMA cache_size = -{_api._SMALL_CACHE_KIB}"
        assert seen.count(small) == 1
        assert seen.index(small) < seen.index("BEGIN IMMEDIATE")
        assert seen[seen.index(small) :].count(f"PRAGMA cache_size = -{_db.CACHE_KIB}") == 1
        assert list(await store._conn.execute_fetchall("PRAGMA cache_size")) == [(-_db.CACHE_KIB,)]
        detail = await store.get_run("run-1")
        assert detail is not None
        assert [s.step_name for s in detail.steps] == [f"s{i}" for i in range(n)]

    async def test_the_wal_is_checkpointed_after_a_batch_not_inside_its_commit(self, store: Store) -> None:
        """The writing connection does not checkpoint in its commits; the writer does after each batch."""
        assert list(await store._conn.execute_fetchall("PRAGMA wal_autocheckpoint")) == [(0,)]
        seen: list[str] = []
        await trace(store, seen.append)
        put(store, out=1)
        await store.flush()
        await store.flush()  # the writer takes it after the first batch's checkpoint
        await trace(store, None)
        assert seen.count("PRAGMA wal_checkpoint(PASSIVE)") == 1
        assert seen.index("PRAGMA wal_checkpoint(PASSIVE)") > seen.index("COMMIT")

    async def test_no_thread_left_after_close(self, root: Path) -> None:
        """aclose joins aiosqlite's thread and the file threads."""
        before = set(threading.enumerate())
        store = await Store.open(root)
        put(store, out=big())
        await store.flush()
        entry = await store.lookup("k")
        assert entry is not None
        await store.load(entry)
        await store.aclose()
        assert set(threading.enumerate()) <= before

    async def test_close_commits_what_was_queued(self, root: Path) -> None:
        """aclose drains the queue: nothing put before it is lost."""
        store = await Store.open(root)
        for i in range(100):
            put(store, key=f"k{i}", out=i)
        await store.aclose()
        assert sql(root, "SELECT COUNT(*) FROM cache_entries") == [(100,)]

    async def test_cancelled_flush_does_not_lose_writes(self, store: Store, root: Path) -> None:
        """Cancelling a task waiting on flush leaves the write to complete."""
        put(store, out=1)
        waiter = asyncio.ensure_future(store.flush())
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await store.flush()
        assert sql(root, "SELECT COUNT(*) FROM cache_entries") == [(1,)]

    async def test_failed_file_write_loses_only_its_entry(self, store: Store, root: Path) -> None:
        """An artifact that cannot be written (disk full) is reported; the rest of the batch commits."""
        real = store._files.write

        async def full_disk(artifact_hash: str, data: bytes) -> None:
            bad = await store.lookup("bad", query=False)
            if bad is not None and data == bad.outputs[0].inline:
                raise OSError(28, "No space left on device")
            await real(artifact_hash, data)

        store._files.write = full_disk  # type: ignore[method-assign]
        put(store, key="bad", out=big(1))
        put(store, key="good", out=big(2))
        store.record_run(run_record())
        with pytest.raises(StoreError, match="No space left"):
            await store.flush()
        assert sql(root, "SELECT key FROM cache_entries") == [("good",)]
        assert sql(root, "SELECT COUNT(*) FROM runs") == [(1,)]

    async def test_cancelling_the_writer_mid_batch_still_commits_it(self, store: Store, root: Path) -> None:
        """A batch being committed when the writer is cancelled commits whole before the store closes."""
        for i in range(500):
            put(store, key=f"k{i}", out=i)
        while not store._held:  # the writer has taken the batch and is committing it
            await asyncio.sleep(0)
        store._writer.cancel()
        await store.aclose()
        assert sql(root, "SELECT COUNT(*) FROM cache_entries") == [(500,)]
        assert sql(root, "PRAGMA integrity_check") == [("ok",)]

    async def test_cancelling_the_writer_while_it_writes_files_still_commits(
        self, store: Store, root: Path
    ) -> None:
        """Cancelled while writing a batch's artifact files (before its transaction), the writer
        takes the batch again: every entry commits, each naming an intact file."""
        for i in range(20):
            put(store, key=f"k{i}", out=big(i))
        while not store._held:
            await asyncio.sleep(0)
        assert store._taken is not None and len(store._taken.puts) == 20  # writing its files now
        store._writer.cancel()  # as the end of asyncio.run does
        await asyncio.wait([store._writer])
        await store.aclose()
        assert sql(root, "SELECT COUNT(*) FROM cache_entries") == [(20,)]
        async with await Store.open(root) as fresh:
            for i in range(20):
                entry = await fresh.lookup(f"k{i}")
                assert entry is not None and await fresh.load(entry) == {"out": big(i)}

    async def test_flush_fails_when_the_writer_is_gone(self, store: Store) -> None:
        """If the writer task is cancelled (loop shutdown), waiting on it fails instead of hanging."""
        store._writer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await store._writer
        with pytest.raises(StoreError):
            await store.flush()

    async def test_closed_store_refuses_writes(self, store: Store) -> None:
        """put after aclose is a StoreError, not a silent loss."""
        await store.aclose()
        with pytest.raises(StoreError, match="closed"):
            put(store)

    async def test_open_without_create_needs_a_store(self, root: Path) -> None:
        """create=False on an empty directory is a StoreError and creates nothing."""
        with pytest.raises(StoreError, match="no flowyml store"):
            await Store.open(root, create=False)
        assert not root.exists()

    async def test_newer_schema_is_refused(self, root: Path) -> None:
        """A store written by a newer flowyml is not used."""
        async with await Store.open(root):
            pass
        sql(root, "UPDATE meta SET value = ? WHERE name = 'schema_version'", (str(SCHEMA_VERSION + 1),))
        with pytest.raises(StoreError, match="newer"):
            await Store.open(root)

    async def test_open_reads_the_schema_without_the_write_lock(
        self, root: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Opening an up-to-date store (create or not) succeeds while another holds BEGIN IMMEDIATE."""
        async with await Store.open(root):
            pass
        monkeypatch.setattr(_db, "LOCK_DEADLINE_SECONDS", 2.0)  # needing the lock would fail the test
        with write_lock(root):
            for create in (True, False):
                async with await Store.open(root, create=create) as store:
                    assert await store.runs() == []

    async def test_open_without_create_writes_nothing(self, root: Path) -> None:
        """create=False makes no folders and cleans no temporary files."""
        async with await Store.open(root):
            pass
        (root / "quarantine").rmdir()
        stale = root / "artifacts" / ".tmp" / "old"
        stale.write_bytes(b"x")
        os.utime(stale, (0, 0))
        async with await Store.open(root, create=False) as store:
            assert await store.cache_stats()
        assert not (root / "quarantine").exists()
        assert stale.exists()

    async def test_open_without_create_refuses_an_older_schema(self, root: Path) -> None:
        """create=False does not migrate: an older store is a StoreError saying how to upgrade it."""
        async with await Store.open(root):
            pass
        sql(root, "UPDATE meta SET value = '1' WHERE name = 'schema_version'")
        with pytest.raises(StoreError, match="older"):
            await Store.open(root, create=False)
        assert sql(root, "SELECT value FROM meta WHERE name = 'schema_version'") == [("1",)]
        async with await Store.open(root):  # a writer upgrades it
            pass
        async with await Store.open(root, create=False):
            pass

    async def test_writer_gives_up_on_a_held_lock(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A write that cannot get the lock within the deadline is a StoreError naming the lock."""
        monkeypatch.setattr(_db, "LOCK_DEADLINE_SECONDS", 0.3)
        async with await Store.open(root) as store:
            with write_lock(root):
                put(store)
                with pytest.raises(StoreError, match=r"another process holds the write lock.*gave up"):
                    await store.flush()
                with pytest.raises(StoreError, match="another process holds the write lock"):
                    await store.clear_cache()
            put(store, key="k2")  # once the lock is free, writing works again
            await store.flush()
        assert sql(root, "SELECT key FROM cache_entries") == [("k2",)]

    async def test_schema_creation_gives_up_on_a_held_lock(
        self, root: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Creating the schema while another connection holds the write lock fails after the deadline."""
        monkeypatch.setattr(_db, "LOCK_DEADLINE_SECONDS", 0.3)
        root.mkdir()
        with write_lock(root), pytest.raises(StoreError, match="holds the write lock"):
            await Store.open(root)
        async with await Store.open(root):
            pass

    async def test_uses_wal(self, store: Store, root: Path) -> None:
        """The database is in WAL mode."""
        assert sql(root, "PRAGMA journal_mode") == [("wal",)]


def run_record(run_id: str = "run-1", status: str = "running", **kw: Any) -> RunRecord:
    return RunRecord(
        run_id=run_id, pipeline_name="p", status=status, started_at=kw.pop("started_at", 100.0), **kw
    )


class TestRecords:
    async def test_run_is_upserted(self, store: Store) -> None:
        """Recording a run at start and at end leaves one row with the final state."""
        store.record_run(run_record())
        store.record_run(run_record(status="completed", ended_at=103.0, duration_seconds=3.0))
        await store.flush()
        assert await store.runs() == [run_record(status="completed", ended_at=103.0, duration_seconds=3.0)]

    async def test_runs_newest_first_with_limit(self, store: Store) -> None:
        """runs() lists the newest runs first, at most ``limit``."""
        for i in range(5):
            store.record_run(run_record(f"r{i}", started_at=100.0 + i))
        await store.flush()
        assert [r.run_id for r in await store.runs(limit=3)] == ["r4", "r3", "r2"]

    async def test_step_round_trip(self, store: Store) -> None:
        """A step record reads back equal, outputs and inputs included."""
        store.record_run(run_record())
        step = StepRecord(
            run_id="run-1",
            step_name="train",
            status="failed",
            attempts=3,
            started_at=101.0,
            ended_at=102.0,
            duration_seconds=1.0,
            cache_key="abc",
            error_type="ValueError",
            error_message="bad",
            traceback="Traceback...",
            outputs={"model": None},
            inputs={"data": ("load", "data")},
        )
        store.record_step(step)
        await store.flush()
        detail = await store.get_run("run-1")
        assert detail is not None
        assert detail.steps == (step,)

    async def test_steps_in_start_order(self, store: Store) -> None:
        """A run's steps come back in the order they started, unstarted (skipped) ones last."""
        store.record_run(run_record())
        store.record_step(StepRecord("run-1", "c", "skipped"))
        store.record_step(StepRecord("run-1", "b", "succeeded", started_at=102.0))
        store.record_step(StepRecord("run-1", "a", "succeeded", started_at=101.0))
        await store.flush()
        detail = await store.get_run("run-1")
        assert detail is not None
        assert [s.step_name for s in detail.steps] == ["a", "b", "c"]

    async def test_get_run_by_unique_prefix(self, store: Store) -> None:
        """A unique prefix finds the run; an ambiguous or unknown one is None."""
        store.record_run(run_record("abc1"))
        store.record_run(run_record("abd2"))
        await store.flush()
        found = await store.get_run("abc")
        assert found is not None
        assert found.run.run_id == "abc1"
        assert await store.get_run("ab") is None
        assert await store.get_run("zzz") is None


class TestLineage:
    async def chain(
        self, store: Store, run_id: str = "run-1", cached: bool = False, started_at: float = 100.0
    ) -> None:
        """load -> clean -> train, with load's output cached."""
        store.record_run(run_record(run_id, started_at=started_at))
        hashes = None if cached else put(store, key="load-key", step="load", run_id=run_id, data=[1, 2, 3])
        if hashes is None:
            entry = await store.lookup("load-key")
            assert entry is not None
            hashes = {o.name: o.artifact_hash for o in entry.outputs}
        store.record_step(
            StepRecord(
                run_id,
                "load",
                "cached" if cached else "succeeded",
                started_at=1,
                cached=cached,
                outputs={"data": hashes["data"]},
            )
        )
        store.record_step(
            StepRecord(
                run_id,
                "clean",
                "succeeded",
                started_at=2,
                outputs={"clean": None},
                inputs={"raw": ("load", "data")},
            )
        )
        store.record_step(
            StepRecord(
                run_id,
                "train",
                "succeeded",
                started_at=3,
                outputs={"model": None},
                inputs={"clean": ("clean", "clean")},
            )
        )
        await store.flush()

    async def test_producers_recursively(self, store: Store) -> None:
        """The lineage of an output names its producer and, recursively, its inputs' producers."""
        await self.chain(store)
        lineage = await store.lineage("model")
        assert lineage is not None
        assert lineage.root.step_name == "train"
        ((param, clean),) = lineage.root.inputs
        assert (param, clean.step_name, clean.output_name) == ("clean", "clean", "clean")
        ((param, load),) = clean.inputs
        assert (param, load.step_name, load.output_name) == ("raw", "load", "data")
        assert load.type_name == "list"
        assert load.inputs == ()

    async def test_cached_producer_names_its_origin_run(self, store: Store) -> None:
        """A cache hit's lineage points back at the run that computed the value."""
        await self.chain(store, "run-0", started_at=50.0)
        await self.chain(store, "run-1", cached=True)
        lineage = await store.lineage("data")
        assert lineage is not None
        assert lineage.run_id == "run-1"
        assert lineage.root.cached
        assert lineage.root.origin_run_id == "run-0"

    async def test_lineage_of_a_given_run(self, store: Store) -> None:
        """run_id picks an older run's lineage instead of the latest."""
        await self.chain(store, "run-0", started_at=50.0)
        await self.chain(store, "run-1", cached=True)
        older = await store.lineage("data", run_id="run-0")
        assert older is not None
        assert older.run_id == "run-0"

    async def test_unknown_output_is_none(self, store: Store) -> None:
        """An output no run produced has no lineage."""
        await self.chain(store)
        assert await store.lineage("nope") is None

    async def test_consumed_artifact_is_recorded(self, store: Store) -> None:
        """The lineage of a consumer names the artifact it read."""
        await self.chain(store)
        lineage = await store.lineage("clean")
        entry = await store.lookup("load-key")
        assert lineage is not None
        assert entry is not None
        ((_, load),) = lineage.root.inputs
        assert load.artifact_hash == entry.outputs[0].artifact_hash

    async def test_latest_run_that_made_the_output(self, store: Store) -> None:
        """Without run_id, lineage looks at the newest run that produced the output, not just any."""
        await self.chain(store, "run-0", started_at=50.0)
        store.record_run(run_record("run-2", started_at=200.0))
        store.record_step(StepRecord("run-2", "other", "succeeded", started_at=201.0, outputs={"x": None}))
        await store.flush()
        lineage = await store.lineage("model")
        assert lineage is not None
        assert lineage.run_id == "run-0"
        newest = await store.lineage("x")
        assert newest is not None
        assert newest.run_id == "run-2"

    @pytest.mark.slow
    async def test_lineage_through_a_100000_deep_chain(self, store: Store) -> None:
        """A chain far deeper than the interpreter's recursion limit has its whole lineage."""
        n = 100_000
        store.record_run(run_record("deep"))
        store.record_step(StepRecord("deep", "s0", "succeeded", started_at=1.0, outputs={"v0": None}))
        for i in range(1, n):
            store.record_step(
                StepRecord(
                    "deep",
                    f"s{i}",
                    "succeeded",
                    started_at=1.0 + i,
                    outputs={f"v{i}": None},
                    inputs={"x": (f"s{i - 1}", f"v{i - 1}")},
                )
            )
        await store.flush()
        lineage = await store.lineage(f"v{n - 1}")
        assert lineage is not None
        node, names = lineage.root, []
        while True:
            names.append(node.step_name)
            if not node.inputs:
                break
            ((_, node),) = node.inputs
        assert names == [f"s{i}" for i in reversed(range(n))]

    async def test_a_shared_producer_is_one_node(self, store: Store) -> None:
        """A diamond (two consumers of one producer) shows that producer under both, as one node."""
        store.record_run(run_record("d"))
        store.record_step(StepRecord("d", "top", "succeeded", outputs={"t": None}))
        for side in ("left", "right"):
            store.record_step(
                StepRecord("d", side, "succeeded", outputs={side: None}, inputs={"t": ("top", "t")})
            )
        both = {"a": ("left", "left"), "b": ("right", "right")}
        store.record_step(StepRecord("d", "join", "succeeded", outputs={"j": None}, inputs=both))
        await store.flush()
        lineage = await store.lineage("j")
        assert lineage is not None
        (_, left), (_, right) = lineage.root.inputs
        assert (left.step_name, right.step_name) == ("left", "right")
        assert left.inputs[0][1] is right.inputs[0][1]
        assert left.inputs[0][1].step_name == "top"

    async def test_one_output_reads_only_the_rows_of_its_ancestry(self, store: Store, root: Path) -> None:
        """The lineage of one output decodes the packed rows its ancestry is in, not the whole run:
        a damaged row of the same run holding other steps is neither read nor reported."""
        store.record_run(run_record("wide"))
        store.record_step(StepRecord("wide", "a", "succeeded", outputs={"a": None}))
        await store.flush()
        store.record_step(StepRecord("wide", "b", "succeeded", outputs={"b": None}, inputs={"x": ("a", "a")}))
        await store.flush()
        store.record_step(StepRecord("wide", "c", "succeeded", outputs={"c": None}))
        await store.flush()
        sql(root, "UPDATE step_records SET steps = '[[\"c\", ' WHERE instr(outputs, ?) > 0", ("\nc\n",))
        lineage = await store.lineage("b", run_id="wide")
        assert lineage is not None
        assert [lineage.root.step_name, lineage.root.inputs[0][1].step_name] == ["b", "a"]
        assert store.damaged == []
        full = await store.get_run("wide")
        assert full is not None
        assert sorted(s.step_name for s in full.steps) == ["a", "b"]
        assert len(store.damaged) == 1

    async def test_one_output_makes_records_only_for_its_ancestry(self, store: Store, root: Path) -> None:
        """Within one packed row, only the steps an output's lineage reaches are made into records:
        a damaged record of another step in that row is not read; a damaged one in the ancestry
        sends the read to the whole run, which reports it."""
        store.record_run(run_record("row"))
        store.record_step(StepRecord("row", "a", "succeeded", outputs={"a": None}))
        store.record_step(StepRecord("row", "b", "succeeded", outputs={"b": None}, inputs={"x": ("a", "a")}))
        store.record_step(StepRecord("row", "c", "succeeded", outputs={"c": None}))
        await store.flush()
        assert sql(root, "SELECT COUNT(*) FROM step_records WHERE run_id = 'row'") == [(1,)]
        damage = 'replace(steps, \'["c","succeeded",0\', \'["c","succeeded","x"\')'
        sql(root, f"UPDATE step_records SET steps = {damage}")
        lineage = await store.lineage("b", run_id="row")
        assert lineage is not None
        assert [lineage.root.step_name, lineage.root.inputs[0][1].step_name] == ["b", "a"]
        assert store.damaged == []
        assert await store.lineage("c", run_id="row") is None
        assert len(store.damaged) == 1
        assert "attempts is not a number" in store.damaged[0]

    async def test_a_producer_recorded_elsewhere_is_found_in_the_whole_run(self, store: Store) -> None:
        """An input whose producer's record does not hold that output still shows the producer."""
        store.record_run(run_record("odd"))
        store.record_step(StepRecord("odd", "p", "failed", outputs={}))
        await store.flush()
        store.record_step(
            StepRecord("odd", "q", "succeeded", outputs={"q": None}, inputs={"x": ("p", "gone")})
        )
        await store.flush()
        lineage = await store.lineage("q")
        assert lineage is not None
        ((_, p),) = lineage.root.inputs
        assert (p.step_name, p.status, p.output_name) == ("p", "failed", "gone")


@dataclass
class Fate:
    """What the engine hands ``record_fate``: the fields of a StepResult the store reads."""

    status: str = "succeeded"
    outputs: dict[str, object] = field(default_factory=lambda: {"out": 1})
    attempts: int = 1
    start_time: float | None = 10.0
    end_time: float | None = 10.5
    duration_seconds: float = 0.5
    cache_key: str | None = None
    time_saved_seconds: float = 0.0
    traceback: str | None = None
    cache_reason: str | None = None


SHAPE = StepShape("s", ["out"], None)


class TestRecordFate:
    async def test_reads_back_as_a_step_record(self, store: Store) -> None:
        """A fate recorded on the hot path reads back as the equal StepRecord."""
        store.record_run(run_record())
        store.record_fate(
            "run-1", Fate(cache_key="k"), {"out": "h1"}, StepShape("s", ["out"], {"x": ("p", "o")})
        )
        await store.flush()
        detail = await store.get_run("run-1")
        assert detail is not None
        assert detail.steps == (
            StepRecord(
                "run-1",
                "s",
                "succeeded",
                1,
                10.0,
                10.5,
                0.5,
                cache_key="k",
                outputs={"out": "h1"},
                inputs={"x": ("p", "o")},
            ),
        )

    async def test_cache_reasons_read_back(self, store: Store) -> None:
        """Each reason reads back, whether written or implied by its row (hit, caching off for the run)."""
        store.record_run(run_record())
        fates = {
            "miss": Fate(cache_key="k1", cache_reason="input 'data' changed"),
            "hit": Fate(status="cached", cache_key="k2", cache_reason="cache hit"),
            "off": Fate(cache_reason="caching is off for this run"),
            "step-off": Fate(cache_reason="caching is off for this step (cache=False)"),
            "skipped": Fate(status="skipped", start_time=None, end_time=None, duration_seconds=0.0),
            "unknown": Fate(cache_key="k3"),
        }
        for name, fate in fates.items():
            store.record_fate("run-1", fate, None, StepShape(name, ["out"], None))
        store.record_step(StepRecord("run-1", "recorded", "succeeded", cache_reason="first run of this step"))
        await store.flush()
        detail = await store.get_run("run-1")
        assert detail is not None
        assert {s.step_name: s.cache_reason for s in detail.steps} == {
            **{name: fate.cache_reason for name, fate in fates.items()},
            "recorded": "first run of this step",
        }

    async def test_key_parts_latest_per_step_and_by_key(self, store: Store) -> None:
        """Key components are written by the writer; the latest per step and any by key read back."""
        store.put_key_parts("k1", "train", {"input:data": "aa", "code": "c1"})
        await store.flush()
        store.put_key_parts("k2", "train", {"input:data": "bb", "code": "c1"})
        store.put_key_parts("k3", "load", {"param:n": "01"})
        await store.flush()
        latest = await store.latest_key_parts(["train", "load", "absent"])
        assert {step: (key, json.loads(parts)) for step, (key, parts) in latest.items()} == {
            "train": ("k2", {"input:data": "bb", "code": "c1"}),
            "load": ("k3", {"param:n": "01"}),
        }
        assert await store.key_parts(["k1", "nope"]) == {"k1": {"input:data": "aa", "code": "c1"}}

    async def test_latest_key_parts_of_a_few_steps_among_many_rows(self, store: Store) -> None:
        """Read by the step index when the rows far outnumber the names, by a scan otherwise:
        the same rows either way."""
        for i in range(40):
            store.put(key=f"e{i}", step_name=f"s{i % 10}", run_id="r", outputs={"o": i}, duration=1.0,
                      parts={"code": f"e{i}"})  # fmt: skip
        await store.flush()
        for i in range(40):
            store.put_key_parts(f"k{i}", f"s{i % 10}", {"code": f"c{i}"})
            await store.flush()  # one batch each: the latest of a step is the last one written
        few = await store.latest_key_parts(["s3", "absent"])  # 80 rows, 2 names: by the index
        every = await store.latest_key_parts([f"s{i}" for i in range(30)])  # 30 names: a scan
        assert few == {"s3": ("k33", '{"code":"c33"}')}
        assert len(every) == 10 and every["s3"] == few["s3"]

    async def test_key_parts_put_with_their_entry_live_in_its_row(self, store: Store, root: Path) -> None:
        """Components put with an entry go in its row (no cache_key_parts row), and read back as
        any other; an entry replaced without components keeps the ones it had."""
        store.put(
            key="k1", step_name="train", run_id="r", outputs={"out": 1}, duration=1.0, parts={"code": "c1"}
        )
        store.put_key_parts("k2", "train", {"code": "c2"})  # a miss whose step failed: no entry
        await store.flush()
        assert sql(root, "SELECT key FROM cache_key_parts") == [("k2",)]
        assert sql(root, "SELECT parts FROM cache_entries WHERE key = 'k1'") == [('{"code":"c1"}',)]
        assert await store.key_parts(["k1", "k2"]) == {"k1": {"code": "c1"}, "k2": {"code": "c2"}}
        latest = await store.latest_key_parts(["train"])
        assert latest["train"][0] == "k2"
        store.put(key="k1", step_name="train", run_id="r", outputs={"out": 2}, duration=1.0)
        await store.flush()
        assert (await store.latest_key_parts(["train"]))["train"] == ("k1", '{"code":"c1"}')

    async def test_key_parts_outlive_their_entry(self, store: Store, root: Path) -> None:
        """A cleared or dropped entry's components stay: the next miss still says what changed."""
        for key, step in (("k1", "a"), ("k2", "b")):
            store.put(
                key=key, step_name=step, run_id="r", outputs={"out": 1}, duration=1.0, parts={"code": key}
            )
        await store.flush()
        assert await store.clear_cache("a") == 1
        entry = await store.lookup("k2")
        assert entry is not None
        sql(root, "UPDATE cache_outputs SET inline = X'00' WHERE key = 'k2'")
        fresh, entry = await reload(root, "k2")
        async with fresh:
            assert entry is not None
            with pytest.warns(CacheCorruptionWarning):
                assert await fresh.load(entry) is None
        assert sql(root, "SELECT COUNT(*) FROM cache_entries") == [(0,)]
        assert await store.key_parts(["k1", "k2"]) == {"k1": {"code": "k1"}, "k2": {"code": "k2"}}
        assert {step: key for step, (key, _) in (await store.latest_key_parts(["a", "b"])).items()} == {
            "a": "k1",
            "b": "k2",
        }

    async def test_every_field_reads_back_beside_long_and_short_inputs(self, store: Store) -> None:
        """Each field a row keeps or leaves off reads back, whether the step's inputs are a short
        text inside its row or a fan-in's long one (a piece of the part's text of its own)."""
        many = {f"*xs[{i}]": (f"producer-{i}", f"out-{i}") for i in range(500)}
        fates = {
            "plain": Fate(cache_reason="caching is off for this run"),
            "hit": Fate(status="cached", cache_key="k", cache_reason="cache hit", time_saved_seconds=2.0),
            "unkeyed-hit": Fate(status="cached", cache_reason="cache hit"),
            "keyed": Fate(cache_key="k", cache_reason=None),
            "late": Fate(end_time=99.0, cache_reason="caching is off for this run"),
            "failed": Fate(
                status="failed",
                outputs={},
                traceback="Traceback: boom",
                cache_reason="caching is off for this run",
            ),
            "reason": Fate(cache_reason="input 'x' changed", cache_key="k"),
            "two": Fate(outputs={"b": 1, "a": 2}, cache_reason="caching is off for this run"),
        }
        store.record_run(run_record())
        for inputs in (many, {"x": ("p", "o")}):
            for name, fate in fates.items():
                shape = StepShape(f"{name}-{len(inputs)}", ["a", "b"] if name == "two" else ["out"], inputs)
                store.record_fate("run-1", fate, {"a": "h1"} if name == "two" else None, shape)
        await store.flush()
        detail = await store.get_run("run-1")
        assert detail is not None
        steps = {s.step_name: s for s in detail.steps}
        for inputs in (many, {"x": ("p", "o")}):
            for name, fate in fates.items():
                got = steps[f"{name}-{len(inputs)}"]
                assert got.inputs == inputs
                assert (got.status, got.cached, got.cache_key, got.ended_at, got.traceback) == (
                    fate.status,
                    fate.status == "cached",
                    fate.cache_key,
                    fate.end_time,
                    fate.traceback,
                )
                assert got.cache_reason == fate.cache_reason
                assert got.outputs == (
                    {"b": None, "a": "h1"} if name == "two" else dict.fromkeys(fate.outputs)
                )

    async def test_cache_hits_count_in_stats(self, store: Store) -> None:
        """A cached fate counts as a hit with the time it saved."""
        for run in ("r1", "r2"):
            store.record_fate(run, Fate(status="cached", time_saved_seconds=1.5), None, SHAPE)
        await store.flush()
        stats = await store.cache_stats()
        assert (stats.hits, stats.time_saved_seconds) == (2, 3.0)

    async def test_last_record_of_a_step_wins(self, store: Store) -> None:
        """Recording a step again updates it in place (an upsert), across batches."""
        store.record_fate("run-1", Fate(status="running"), None, SHAPE)
        store.record_step(StepRecord("run-1", "t", "succeeded", started_at=11.0))
        await store.flush()
        store.record_fate("run-1", Fate(), None, SHAPE)
        await store.flush()
        detail = await store._steps_of("run-1")
        assert [(s.step_name, s.status) for s in detail] == [("s", "succeeded"), ("t", "succeeded")]

    async def test_a_committed_fate_is_not_kept_alive(self, store: Store) -> None:
        """Once committed, the store holds no reference to a recorded fate (a run's step results
        were kept alive until the store's next write, through the connection thread's last call)."""
        store.record_run(run_record())
        fate = Fate()
        gone = weakref.ref(fate)
        store.record_fate("run-1", fate, None, SHAPE)
        await store.flush()
        del fate
        gc.collect()
        assert gone() is None

    async def test_closed_store_refuses_fates(self, store: Store) -> None:
        """record_fate after aclose is a StoreError."""
        await store.aclose()
        with pytest.raises(StoreError, match="closed"):
            store.record_fate("run-1", Fate(), None, SHAPE)


SCHEMA_1_LINEAGE = """
CREATE TABLE step_runs (
    run_id TEXT NOT NULL, step_name TEXT NOT NULL, status TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    started_at REAL, ended_at REAL, duration_seconds REAL, cached INTEGER NOT NULL DEFAULT 0, cache_key TEXT,
    time_saved_seconds REAL NOT NULL DEFAULT 0, error_type TEXT, error_message TEXT, traceback TEXT,
    seq INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (run_id, step_name)) WITHOUT ROWID;
CREATE TABLE step_outputs (
    run_id TEXT NOT NULL, step_name TEXT NOT NULL, output_name TEXT NOT NULL, artifact_hash TEXT,
    PRIMARY KEY (run_id, step_name, output_name)) WITHOUT ROWID;
CREATE TABLE consumed (
    run_id TEXT NOT NULL, step_name TEXT NOT NULL, parameter TEXT NOT NULL, producer_step TEXT NOT NULL,
    output_name TEXT NOT NULL, artifact_hash TEXT, PRIMARY KEY (run_id, step_name, parameter)) WITHOUT ROWID;
INSERT INTO step_runs VALUES ('run-1', 'load', 'cached', 0, 1.0, 2.0, 1.0, 1, 'k', 4.0, NULL, NULL, NULL, 1);
INSERT INTO step_runs VALUES ('run-1', 'train', 'failed', 2, 3.0, 4.0, 1.0, 0, NULL, 0, 'E', 'bad', 'tb', 2);
INSERT INTO step_outputs VALUES ('run-1', 'load', 'data', 'h1');
INSERT INTO step_outputs VALUES ('run-1', 'train', 'model', NULL);
INSERT INTO consumed VALUES ('run-1', 'train', 'data', 'load', 'data', 'h1');
UPDATE meta SET value = '1' WHERE name = 'schema_version';
DROP TABLE step_records;
"""


class TestSchemaUpgrade:
    async def test_schema_1_lineage_is_packed(self, root: Path) -> None:
        """A store written with one row per step (schema 1) opens with its lineage intact."""
        async with await Store.open(root) as store:
            store.record_run(run_record())
        conn = sqlite3.connect(root / DB_NAME)
        conn.executescript(SCHEMA_1_LINEAGE)
        conn.close()
        async with await Store.open(root) as store:
            detail = await store.get_run("run-1")
            assert detail is not None
            assert detail.steps == (
                StepRecord(
                    "run-1", "load", "cached", 0, 1.0, 2.0, 1.0, True, "k", 4.0, outputs={"data": "h1"}
                ),
                StepRecord(
                    "run-1",
                    "train",
                    "failed",
                    2,
                    3.0,
                    4.0,
                    1.0,
                    False,
                    None,
                    0.0,
                    "E",
                    "bad",
                    "tb",
                    outputs={"model": None},
                    inputs={"data": ("load", "data")},
                ),
            )
            assert (await store.cache_stats()).hits == 1
        tables = {row[0] for row in sql(root, "SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert not tables & {"step_runs", "step_outputs", "consumed"}
        assert sql(root, "SELECT value FROM meta WHERE name = 'schema_version'") == [(str(SCHEMA_VERSION),)]


SCHEMA_3_PARTS = """
DROP INDEX cache_entries_step_time;
CREATE INDEX cache_entries_step ON cache_entries (step_name);
ALTER TABLE cache_entries DROP COLUMN parts;
INSERT INTO cache_key_parts VALUES ('k', 'train', 5.0, '{"code":"c0"}');
UPDATE meta SET value = '3' WHERE name = 'schema_version';
"""


class TestSchema3:
    async def test_schema_3_key_parts_and_entries_still_read(self, root: Path) -> None:
        """A store of schema 3 (every key's components in cache_key_parts, entries indexed by step)
        opens upgraded: its entries hit, its components still explain, the old index is gone."""
        async with await Store.open(root) as store:
            put(store, key="k", step="train", out=7)
        conn = sqlite3.connect(root / DB_NAME)
        conn.executescript(SCHEMA_3_PARTS)
        conn.close()
        async with await Store.open(root) as store:
            view = await store.preload(["train"])
            entry = await store.lookup("k", view=view)
            assert entry is not None and await store.load(entry) == {"out": 7}
            assert await store.latest_key_parts(["train"]) == {"train": ("k", '{"code":"c0"}')}
        indexes = {row[0] for row in sql(root, "SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "cache_entries_step_time" in indexes and "cache_entries_step" not in indexes
        assert sql(root, "SELECT value FROM meta WHERE name = 'schema_version'") == [(str(SCHEMA_VERSION),)]


class TestCacheAdmin:
    async def test_stats(self, store: Store) -> None:
        """Stats count entries, bytes, hits and time saved per step."""
        put(store, key="k1", step="a", out=big())
        put(store, key="k2", step="b", out=1)
        store.record_step(StepRecord("run-1", "a", "cached", cached=True, time_saved_seconds=2.5))
        await store.flush()
        stats = await store.cache_stats()
        assert stats.entries == 2
        assert stats.file_bytes > INLINE_LIMIT
        assert stats.inline_bytes > 0
        assert (stats.hits, stats.time_saved_seconds) == (1, 2.5)
        assert [(s.step_name, s.entries, s.hits) for s in stats.steps] == [("a", 1, 1), ("b", 1, 0)]

    async def test_clear_one_step(self, store: Store, root: Path) -> None:
        """Clearing one step removes its entries and files, and nothing else."""
        put(store, key="k1", step="a", out=big(1))
        put(store, key="k2", step="b", out=big(2))
        await store.flush()
        assert await store.clear_cache("a") == 1
        assert await store.lookup("k1") is None
        assert await store.lookup("k2") is not None
        assert len([p for p in (root / "artifacts").iterdir() if p.is_file()]) == 1

    async def test_clear_all(self, store: Store, root: Path) -> None:
        """Clearing everything empties the index and the artifact folder."""
        put(store, key="k1", step="a", out=big(1))
        put(store, key="k2", step="b", out=1)
        assert await store.clear_cache() == 2
        assert await store.lookup("k1") is None
        assert [p for p in (root / "artifacts").iterdir() if p.is_file()] == []

    async def test_clear_keeps_shared_artifact(self, store: Store, root: Path) -> None:
        """A file still named by another step's entry survives clearing one step."""
        put(store, key="k1", step="a", out=big(1))
        put(store, key="k2", step="b", out=big(1))
        await store.clear_cache("a")
        entry = await store.lookup("k2")
        assert entry is not None
        assert await store.load(entry) == {"out": big(1)}

    async def test_verify_ok(self, store: Store) -> None:
        """An intact store verifies clean."""
        put(store, key="k1", out=big())
        put(store, key="k2", out=1)
        report = await store.verify()
        assert report.ok
        assert (report.integrity, report.entries_checked, report.artifacts_checked) == ("ok", 2, 2)

    async def test_verify_lists_bad_artifacts(self, store: Store, root: Path) -> None:
        """verify lists a flipped file and a deleted one, and leaves them in place."""
        put(store, key="k1", step="a", out=big(1))
        put(store, key="k2", step="b", out=big(2))
        await store.flush()
        e1, e2 = await store.lookup("k1"), await store.lookup("k2")
        assert e1 is not None
        assert e2 is not None
        artifact_path(root, e1).write_bytes(b"x" * e1.outputs[0].size)
        artifact_path(root, e2).unlink()
        report = await store.verify()
        assert not report.ok
        assert sorted((p.step_name, p.kind) for p in report.problems) == [("a", "hash"), ("b", "missing")]
        assert artifact_path(root, e1).exists()


def test_step_shape_encodes_its_inputs_as_json_would() -> None:
    inputs = {"x": ("p", "o"), 'q"uote\\': ("naïve\n", "tab\t"), "*args[0]": ("a", "b")}
    shape = StepShape("s", ["out"], inputs)
    assert shape.quoted_inputs == json.dumps(
        {k: list(v) for k, v in inputs.items()}, ensure_ascii=False, separators=(",", ":")
    )
    assert json.loads(StepShape("s", ["out"], None).quoted_inputs) == {}


def test_step_shapes_without_inputs_share_their_encoding() -> None:
    """A plan keeps a shape per node; the inputs of every node without any are one string."""
    assert StepShape("a", ["x"], None).quoted_inputs is StepShape("b", ["y"], {}).quoted_inputs


def _sqlite_memory_used() -> int:
    """Bytes SQLite holds in this process (all connections), from the library Python links."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("sqlite3")
    if name is None:
        pytest.skip("no shared SQLite library to ask")
    lib = ctypes.CDLL(name)
    lib.sqlite3_memory_used.restype = ctypes.c_int64
    used: int = lib.sqlite3_memory_used()
    return used


class TestPageCacheAfterLargeWork:
    """A process-long store hands back the page cache a large read or lineage batch filled."""

    @staticmethod
    def _pipeline(root: Path, n: int, *, cache: bool) -> Any:
        from flowyml import Pipeline, step

        async def noop() -> None:
            return None

        p = Pipeline("pages", enable_cache=cache, lineage=True, cache_dir=root)
        for i in range(n):
            p.add_step(step(name=f"s{i}", outputs=[f"r{i}"])(noop))
        return p

    @pytest.mark.slow
    async def test_pages_a_preload_read_are_handed_back(self, tmp_path: Path) -> None:
        from flowyml import open_store

        p = self._pipeline(tmp_path, 6000, cache=True)
        await p.arun()
        store = await open_store(tmp_path)
        await store.flush()
        before = _sqlite_memory_used()
        view = await store.preload(f"s{i}" for i in range(6000))
        assert len(view.entries) == 6000
        store.hand_back_pages()
        await store.flush()
        assert _sqlite_memory_used() - before < 256 * 1024

    @pytest.mark.slow
    @pytest.mark.parametrize("cache", [True, False], ids=["rerun", "lineage"])
    async def test_a_large_run_keeps_no_pages(self, tmp_path: Path, cache: bool) -> None:
        from flowyml import open_store

        p = self._pipeline(tmp_path, 6000, cache=cache)
        await p.arun()  # the store is open, its schema read, the cache filled
        store = await open_store(tmp_path)
        await store.flush()
        before = _sqlite_memory_used()
        result = await p.arun()
        assert all(r.cached for r in result.step_results.values()) == cache
        await store.flush()
        assert _sqlite_memory_used() - before < 256 * 1024
