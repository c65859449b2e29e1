"""CacheStore: the store's cache by key, synchronously, as Pipeline.cache_store hands it out."""

from __future__ import annotations

import asyncio
from pathlib import Path

from flowyml import CacheStore, Pipeline, step


class TestCacheStore:
    def test_creating_it_creates_the_folder(self, tmp_path: Path) -> None:
        CacheStore(tmp_path / "cache")
        assert (tmp_path / "cache").is_dir()

    def test_set_then_get_in_a_new_object(self, tmp_path: Path) -> None:
        CacheStore(tmp_path).set_value("k", {"result": [1, 2, 3]}, "make", "code123")
        assert CacheStore(tmp_path).get("k") == {"result": [1, 2, 3]}
        assert CacheStore(tmp_path).get("missing") is None

    def test_reads_what_a_run_cached(self, tmp_path: Path) -> None:
        """An engine entry reads as the step's value (one output) or its outputs by name."""

        @step(outputs=["a", "b"])
        def two() -> tuple[int, int]:
            return 1, 2

        p = Pipeline("p", cache_dir=tmp_path).add_step(two)
        key = p.run().step_results["two"].cache_key
        assert key is not None
        store = p.cache_store
        assert store is not None and store.get(key) == {"a": 1, "b": 2}

    def test_works_inside_a_running_loop(self, tmp_path: Path) -> None:
        async def main() -> object:
            store = CacheStore(tmp_path)
            store.set_value("k", 7, "s")
            return store.get("k")

        assert asyncio.run(main()) == 7


class TestPipelineFolders:
    def test_cache_store_is_none_without_caching(self, tmp_path: Path) -> None:
        assert Pipeline("p", cache_dir=tmp_path, enable_cache=False).cache_store is None
        store = Pipeline("p", cache_dir=tmp_path).cache_store
        assert store is not None and store.root == tmp_path.absolute()

    def test_runs_dir_is_a_folder_in_the_store(self, tmp_path: Path) -> None:
        runs = Pipeline("p", cache_dir=tmp_path).runs_dir
        assert runs == tmp_path.absolute() / "runs" and runs.is_dir()
