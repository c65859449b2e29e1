"""The asset catalogue: what runs register, versions per name, lineage, loading back, routers."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from flowyml import AssetRouter, Dataset, LocalRouter, Metrics, Model, Pipeline, step
from flowyml._catalog import Produced, children_of, entries, find, parents_of, register
from flowyml.errors import AssetError, AssetNotFoundError, ConfigError, FlowymlWarning, StoreError


@step(outputs=["raw"])
def load(rows: int) -> Dataset:
    return [{"x": i} for i in range(rows)]  # type: ignore[return-value]


@step(outputs=["features"])
def featurize(raw: list[dict[str, int]]) -> Dataset:
    return [r["x"] * 2 for r in raw]  # type: ignore[return-value]


@step(outputs=["clf", "scores"])
def train(features: Dataset) -> tuple[Model, Metrics]:
    return {"weights": sum(features.data)}, {"accuracy": 0.9}  # type: ignore[return-value]


def _pipeline(root: Path, **options: Any) -> Pipeline:
    p = Pipeline("ml", cache_dir=root, **options)
    return p.add_step(load).add_step(featurize).add_step(train)


class TestRegistration:
    def test_every_asset_output_is_registered_with_its_lineage(self, tmp_path: Path) -> None:
        result = _pipeline(tmp_path).run({"rows": 3})
        assert result.success
        found = {e.name: e for e in entries(tmp_path)}
        assert sorted(found) == ["clf", "features", "raw", "scores"]
        clf = found["clf"]
        assert (clf.version, clf.asset_type, clf.step_name, clf.output_name) == (1, "Model", "train", "clf")
        assert (clf.run_id, clf.pipeline) == (result.run_id, "ml")
        assert clf.asset_id == result["clf"].asset_id
        assert [p.name for p in parents_of(tmp_path, clf)] == ["features"]
        assert [p.name for p in parents_of(tmp_path, found["features"])] == ["raw"]
        assert [c.name for c in children_of(tmp_path, found["raw"])] == ["features"]
        assert found["scores"].metadata["properties"] == {"accuracy": 0.9}

    def test_versions_increment_across_runs(self, tmp_path: Path) -> None:
        for rows in (1, 2, 3):
            assert _pipeline(tmp_path).run({"rows": rows}).success
        assert [e.version for e in entries(tmp_path, "clf")] == [1, 2, 3]
        latest = find(tmp_path, "clf")
        assert latest is not None and latest.version == 3

    def test_a_cached_step_registers_no_new_version(self, tmp_path: Path) -> None:
        """A cache hit hands back the asset it made before: the same asset, the same entry."""
        _pipeline(tmp_path).run({"rows": 2})
        again = _pipeline(tmp_path).run({"rows": 2})
        assert again.step_results["train"].cached
        assert [e.version for e in entries(tmp_path, "clf")] == [1]

    def test_lineage_false_registers_nothing(self, tmp_path: Path) -> None:
        _pipeline(tmp_path, lineage=False).run({"rows": 1})
        assert entries(tmp_path) == []

    def test_concurrent_registrations_get_distinct_versions(self, tmp_path: Path) -> None:
        _pipeline(tmp_path).run({"rows": 1})  # creates the store

        def add() -> None:
            register(tmp_path, [Produced(Model(i, name="m"), "r", "p", "s", "m") for i in range(5)])

        threads = [threading.Thread(target=add) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [e.version for e in entries(tmp_path, "m")] == list(range(1, 21))


class TestLoad:
    def test_model_load_round_trip(self, tmp_path: Path) -> None:
        _pipeline(tmp_path).run({"rows": 2})
        _pipeline(tmp_path).run({"rows": 4})
        latest = Model.load("clf", cache_dir=tmp_path)
        first = Model.load("clf", version=1, cache_dir=tmp_path)
        assert isinstance(latest, Model) and latest.data == {"weights": 12}
        assert first.data == {"weights": 2} and first.name == "clf"
        assert first.metadata.parent_ids == [find(tmp_path, "features", 1).asset_id]  # type: ignore[union-attr]

    def test_missing_name_or_version_lists_what_there_is(self, tmp_path: Path) -> None:
        _pipeline(tmp_path).run({"rows": 1})
        with pytest.raises(AssetNotFoundError, match=r"'clf' version 7; versions there are: \[1\]"):
            Model.load("clf", version=7, cache_dir=tmp_path)
        with pytest.raises(AssetNotFoundError, match="no asset 'nope'"):
            Model.load("nope", cache_dir=tmp_path)

    def test_loading_as_another_kind_is_refused(self, tmp_path: Path) -> None:
        _pipeline(tmp_path).run({"rows": 1})
        with pytest.raises(AssetError, match="is a Dataset, not a Model"):
            Model.load("raw", cache_dir=tmp_path)
        assert isinstance(Dataset.load("raw", cache_dir=tmp_path), Dataset)

    def test_an_altered_artifact_is_refused(self, tmp_path: Path) -> None:
        _pipeline(tmp_path).run({"rows": 1})
        entry = find(tmp_path, "clf")
        assert entry is not None
        path = tmp_path / "assets" / entry.location.removeprefix("local:")
        path.write_bytes(path.read_bytes() + b"x")
        with pytest.raises(StoreError, match="does not match its hash"):
            Model.load("clf", cache_dir=tmp_path)


class _Registry(AssetRouter):
    """A stand-in model registry: keeps models in a dict, by the locations it hands out."""

    scheme = "registry:"

    def __init__(self) -> None:
        self.models: dict[str, Any] = {}

    def accepts(self, asset: Any) -> bool:
        return isinstance(asset, Model)

    def save(self, asset: Any, produced: Produced, root: Path) -> str:
        location = f"registry:{produced.pipeline}/{asset.name}/{len(self.models) + 1}"
        self.models[location] = asset
        return location

    def load(self, location: str, root: Path) -> Any:
        return self.models[location]


class TestRouters:
    def test_a_custom_router_takes_the_assets_it_accepts(self, tmp_path: Path) -> None:
        registry = _Registry()
        _pipeline(tmp_path, routers=[registry]).run({"rows": 2})
        clf, raw = find(tmp_path, "clf"), find(tmp_path, "raw")
        assert clf is not None and raw is not None
        assert clf.location == "registry:ml/clf/1" and raw.location.startswith("local:")
        assert list(registry.models) == ["registry:ml/clf/1"]
        assert not (tmp_path / "assets" / clf.location).exists()
        loaded = Model.load("clf", cache_dir=tmp_path, routers=[registry])
        assert loaded is registry.models["registry:ml/clf/1"]
        with pytest.raises(StoreError, match=r"pass the router that saved it"):
            Model.load("clf", cache_dir=tmp_path)

    def test_a_failing_router_warns_and_the_run_still_succeeds(self, tmp_path: Path) -> None:
        class Broken(_Registry):
            def save(self, asset: Any, produced: Produced, root: Path) -> str:
                raise OSError("registry is down")

        with pytest.warns(FlowymlWarning, match="router Broken could not save asset 'clf'.*registry is down"):
            result = _pipeline(tmp_path, routers=[Broken()]).run({"rows": 1})
        assert result.success
        assert [type(e) for e in result.store_errors] == [StoreError]
        assert sorted(e.name for e in entries(tmp_path)) == ["features", "raw", "scores"]  # the rest

    def test_routers_must_be_routers(self) -> None:
        with pytest.raises(ConfigError, match="AssetRouter"):
            Pipeline("p", routers=[object()])  # type: ignore[list-item]

    def test_the_local_router_writes_one_file_per_content(self, tmp_path: Path) -> None:
        router = LocalRouter()
        produced = Produced(None, "r", "p", "s", "o")
        a = router.save(Model(1, name="m"), produced, tmp_path)
        assert router.load(a, tmp_path).data == 1
        files = list((tmp_path / "assets").iterdir())
        assert len(files) == 1 and oct(files[0].stat().st_mode & 0o777) == "0o600"


class TestTable:
    def test_it_is_one_additive_table_in_the_store_database(self, tmp_path: Path) -> None:
        _pipeline(tmp_path).run({"rows": 1})
        with sqlite3.connect(tmp_path / "flowyml.db") as db:
            (count,) = db.execute("SELECT COUNT(*) FROM asset_catalog").fetchone()
            (meta,) = db.execute("SELECT metadata FROM asset_catalog WHERE name = 'raw'").fetchone()
        assert count == 4 and json.loads(meta)["properties"]["num_samples"] == 1

    def test_reading_a_store_without_the_table_finds_nothing(self, tmp_path: Path) -> None:
        assert entries(tmp_path) == [] and find(tmp_path, "x") is None
        Pipeline("p", cache_dir=tmp_path).add_step(step(lambda: 1)).run()
        assert entries(tmp_path) == []


class TestUnannotatedSteps:
    def test_an_asset_returned_without_annotation_is_registered_with_its_parents(
        self, tmp_path: Path
    ) -> None:
        @step(outputs=["raw"])
        def make():  # type: ignore[no-untyped-def]
            return Dataset([1, 2], name="raw")

        @step(outputs=["fitted"])
        def fit(raw):  # type: ignore[no-untyped-def]
            return Model(sum(raw.data), name="fitted")

        result = Pipeline("p", cache_dir=tmp_path).add_step(make).add_step(fit).run()
        assert result["fitted"].parents == [result["raw"]]
        entry = find(tmp_path, "fitted")
        assert entry is not None and [p.name for p in parents_of(tmp_path, entry)] == ["raw"]
