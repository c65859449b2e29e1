"""Assets: metadata, lineage, cache keys, what data and models tell, and the routing helpers."""

from __future__ import annotations

import gc
import pickle
import typing
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any, Protocol

import numpy as np
import pandas as pd
import pytest

from flowyml import Asset, AssetMetadata, Dataset, FeatureSet, Metrics, Model, Pipeline, step
from flowyml._assets import (
    asset_class,
    asset_type_for,
    input_assets,
    output_asset_types,
    resolved_annotations,
    restore,
    return_asset_type,
    runtime_classes,
    unwrap_input,
    wrap_output,
)
from flowyml._hashing import hash_value
from flowyml.errors import AssetError, OutputError


def _third_party(module: str, name: str, **attrs: Any) -> type:
    """A class that looks, by its module, like one from a library this suite does not install."""
    return type(name, (), {"__module__": module, **attrs})


class _Row(typing.TypedDict):
    x: int


def _train_and_score(raw: Dataset, hidden: NotDefinedAnywhere) -> tuple[Model, Metrics]:  # type: ignore[name-defined]  # noqa: F821
    return Model(1), Metrics(a=1)


class TestAssetMetadata:
    def test_identity_fields(self) -> None:
        """Metadata holds the type name, the name, a default version, an id and an aware timestamp."""
        meta = Dataset.create(data=[1, 2, 3], name="raw").metadata
        assert (meta.asset_type, meta.name, meta.version) == ("Dataset", "raw", "v1.0.0")
        assert isinstance(meta.created_at, datetime) and meta.created_at.tzinfo is not None
        assert len(meta.asset_id) == 32

    def test_reads_as_its_properties(self) -> None:
        """Indexing, get, iteration and == with a dict all see the properties."""
        meta = Dataset.create([1, 2], name="raw", source="s3").metadata
        assert meta["source"] == "s3" and meta.get("missing", 0) == 0
        assert list(meta) == ["source"] and "source" in meta and len(meta) == 1
        assert meta == {"source": "s3"}

    def test_dict_round_trip(self) -> None:
        """to_dict is JSON-friendly and from_dict restores an equal metadata."""
        parent = Dataset([1])
        meta = Dataset.create([1, 2], name="raw", parent=parent, tags={"env": "prod"}, rows=2).metadata
        d = meta.to_dict()
        assert isinstance(d["created_at"], str) and d["parent_ids"] == [parent.asset_id]
        assert AssetMetadata.from_dict(d) == meta


class TestAsset:
    def test_create_files_properties_and_tags(self) -> None:
        """create() merges properties= and extra keywords; tags= stay tags."""
        asset = Dataset.create(data=[1], name="d", properties={"size": 3}, tags={"env": "test"}, fmt="csv")
        assert asset.metadata.properties == {"size": 3, "fmt": "csv"}
        assert asset.tags == {"env": "test"} and asset.properties is asset.metadata.properties

    def test_metadata_keyword_is_merged_into_properties(self) -> None:
        """The metadata= keyword of older code lands in properties."""
        assert Dataset([1, 2], metadata={"label": "y"}).metadata["label"] == "y"

    def test_positional_model_as_the_seed_writes_it(self) -> None:
        """Model(obj, name=...) wraps the object."""
        obj = object()
        model = Model(obj, name="my_classifier")
        assert (model.data, model.name, model.metadata.asset_type) == (obj, "my_classifier", "Model")

    def test_version_label(self) -> None:
        """A given version is kept; the default starts with v."""
        assert Dataset.create([1], version="v2.5.0").version == "v2.5.0"
        assert Dataset([1]).version.startswith("v")

    def test_ids_are_unique_and_equality_is_identity(self) -> None:
        """Two assets of equal content are distinct assets; a pickled copy is the same one."""
        a, b = Dataset([1], name="x"), Dataset([1], name="x")
        assert a.asset_id != b.asset_id and a != b
        copy = pickle.loads(pickle.dumps(a))
        assert copy == a and hash(copy) == hash(a) and copy is not a

    def test_non_mapping_tags_are_an_asset_error(self) -> None:
        """tags= must be a mapping; the message names the option."""
        with pytest.raises(AssetError, match="tags="):
            Dataset([1], tags=["prod"])  # type: ignore[arg-type]

    def test_repr_names_kind_name_and_data_type(self) -> None:
        """repr shows what the asset is without printing its data."""
        assert repr(Dataset([1], name="d")) == "Dataset(name='d', version='v1.0.0', data=list)"

    def test_asset_class_and_restore(self) -> None:
        """A catalogue can rebuild an asset of the recorded kind with the recorded metadata."""
        original = Model({"w": 1}, name="m", framework="custom")
        cls = asset_class(original.metadata.asset_type)
        assert cls is Model and asset_class("NoSuchAsset") is None
        back = restore(cls, original.data, AssetMetadata.from_dict(original.metadata.to_dict()))
        assert isinstance(back, Model) and back == original and back.framework == "custom"


class TestLineage:
    def test_parent_and_children(self) -> None:
        """A child lists its parent, the parent lists its children, parent_ids hold the ids."""
        parent = Dataset.create(data=[1, 2, 3], name="parent")
        c1 = Dataset.create(data=[2], name="c1", parent=parent)
        c2 = Model.create(data={}, name="c2", parents=[parent])
        assert c1.parents == [parent] and parent.children == [c1, c2]
        assert c1.metadata.parent_ids == [parent.asset_id]

    def test_ancestors_nearest_first(self) -> None:
        """get_all_ancestors walks the whole chain, nearest first, each asset once."""
        root = Dataset([1], name="root")
        left, right = Dataset([2], parent=root), Dataset([3], parent=root)
        leaf = Model({}, parents=[left, right])
        assert leaf.get_all_ancestors() == [left, right, root]
        assert root.get_all_descendants() == [left, right, leaf]

    def test_children_do_not_keep_assets_alive(self) -> None:
        """A parent holds its children weakly."""
        parent = Dataset([1])
        child = Dataset([2], parent=parent)
        assert parent.children == [child]
        del child
        gc.collect()
        assert parent.children == []

    def test_lineage_cannot_loop(self) -> None:
        """An asset cannot become a parent of its own ancestor, nor of itself."""
        a = Dataset([1])
        b = Dataset([2], parent=a)
        with pytest.raises(AssetError, match="cannot loop"):
            a.add_parent(b)
        with pytest.raises(AssetError):
            a.add_parent(a)

    def test_parent_must_be_an_asset(self) -> None:
        """A plain value as parent is an AssetError that says how to wrap it."""
        with pytest.raises(AssetError, match="wrap it first"):
            Dataset([1], parent=[1, 2])  # type: ignore[arg-type]

    def test_adding_a_parent_twice_is_a_no_op(self) -> None:
        """add_parent is idempotent."""
        p = Dataset([1])
        c = Dataset([2], parent=p)
        c.add_parent(p)
        assert c.parents == [p] and p.children == [c] and c.metadata.parent_ids == [p.asset_id]

    def test_pickle_keeps_parent_ids_not_live_links(self) -> None:
        """A pickled copy carries parent_ids but no parent objects (their data stays behind)."""
        parent = Dataset(list(range(1000)))
        child = pickle.loads(pickle.dumps(Dataset([1], parent=parent)))
        assert child.parents == [] and child.metadata.parent_ids == [parent.asset_id]


class TestCacheKey:
    def test_equal_content_gives_equal_keys(self) -> None:
        """Id, creation time and lineage never enter the key."""
        a = Dataset(pd.DataFrame({"x": [1, 2]}), name="d", tags={"t": "1"})
        b = Dataset(pd.DataFrame({"x": [1, 2]}), name="d", tags={"t": "1"}, parent=Dataset([9]))
        assert a.asset_id != b.asset_id
        assert hash_value(a) == hash_value(b)

    @pytest.mark.parametrize(
        "other",
        [
            Dataset([1, 2], name="other"),
            Dataset([1, 3], name="d"),
            Dataset([1, 2], name="d", version="v2"),
            Dataset([1, 2], name="d", properties={"k": 1}),
            Dataset([1, 2], name="d", tags={"k": "1"}),
            Model([1, 2], name="d"),
        ],
    )
    def test_content_changes_change_the_key(self, other: Asset) -> None:
        """Kind, name, version, data, properties and tags are each part of the key."""
        assert hash_value(Dataset([1, 2], name="d")) != hash_value(other)

    def test_fresh_equal_asset_hits_the_cache_next_run(self) -> None:
        """A step fed an equal asset built anew each run is served from the cache."""
        calls: list[int] = []

        @step(outputs=["n"], cache="input_hash")
        def count(ds: Dataset) -> int:
            calls.append(1)
            return int(ds.num_samples or 0)

        p = Pipeline("cache_assets").add_step(count)
        first = p.run(context={"ds": Dataset(pd.DataFrame({"x": [1, 2, 3]}), name="d")})
        second = p.run(context={"ds": Dataset(pd.DataFrame({"x": [1, 2, 3]}), name="d")})
        assert (first["n"], second["n"], len(calls)) == (3, 3, 1)
        assert second.step_results["count"].cached


class TestDataset:
    def test_dataframe_describes_itself(self) -> None:
        """Shape, columns, dtypes, rows and size come from the frame's metadata."""
        df = pd.DataFrame({"a": [1, 2, 3], "b": [0.5, 1.5, 2.5]})
        ds = Dataset(df, name="df")
        assert ds.shape == [3, 2] and ds.columns == ["a", "b"] and ds.num_samples == 3
        assert ds.dtypes == {"a": "int64", "b": "float64"}
        assert ds.size_bytes == int(df.memory_usage(index=True, deep=False).sum())

    def test_series(self) -> None:
        """A Series records its dtype and name."""
        ds = Dataset(pd.Series([1.0, 2.0], name="y"))
        assert ds.properties["dtype"] == "float64" and ds.columns == ["y"] and ds.num_samples == 2

    def test_numpy_array(self) -> None:
        """An array records its shape, dtype and bytes."""
        ds = Dataset(np.zeros((4, 3), dtype=np.float32))
        assert ds.shape == [4, 3] and ds.properties["dtype"] == "float32" and ds.size_bytes == 48
        assert ds.num_samples == 4

    def test_structured_array_lists_its_fields(self) -> None:
        """A structured array's fields read as columns."""
        arr = np.zeros(2, dtype=[("x", "i4"), ("y", "f8")])
        ds = Dataset(arr)
        assert ds.columns == ["x", "y"] and ds.dtypes == {"x": "int32", "y": "float64"}

    def test_list_of_records(self) -> None:
        """Records give columns and types from the first one."""
        ds = Dataset([{"id": 1, "name": "a"}, {"id": 2, "name": "b"}])
        assert ds.columns == ["id", "name"] and ds.dtypes == {"id": "int", "name": "str"}
        assert ds.num_samples == 2

    def test_list_of_rows(self) -> None:
        """Rows as sequences give a two-dimensional shape."""
        assert Dataset([[1, 2, 3], [4, 5, 6]]).shape == [2, 3]

    def test_other_data_describes_nothing(self) -> None:
        """A path string, a dict or a list of scalars adds no properties."""
        for data in ("/data/x.csv", {"k": "v"}, [1, 2, 3], []):
            assert Dataset(data).properties == {}

    def test_given_values_win(self) -> None:
        """A property the caller gives is never overwritten by the description."""
        ds = Dataset.create(data=pd.DataFrame({"a": [1, 2, 3]}), rows=3, num_samples=10, columns=["A"])
        assert ds.num_samples == 10 and ds.columns == ["A"] and ds.properties["rows"] == 3

    def test_samples_property_and_size(self) -> None:
        """num_samples reads 'samples' too; size is the caller's own."""
        ds = Dataset(name="p", data="data", properties={"samples": 10000, "size": "1GB"})
        assert ds.num_samples == 10000 and ds.size == "1GB"

    def test_location_and_schema(self) -> None:
        """location= and schema= are stored as properties."""
        ds = Dataset("s3://b/k", location="s3://b/k", schema={"a": "int"})
        assert ds.properties == {"location": "s3://b/k", "schema": "{'a': 'int'}"}

    def test_description_does_not_import_pandas(self) -> None:
        """An object that merely sits in a module named like pandas is not trusted blindly."""
        fake = _third_party("pandas.core.frame", "DataFrame")()
        assert Dataset(fake).properties == {}


class TestFeatureSet:
    def test_names_from_columns(self) -> None:
        """Feature names and count default to the frame's columns."""
        fs = FeatureSet(pd.DataFrame({"f1": [1], "f2": [2]}))
        assert fs.feature_names == ["f1", "f2"] and fs.num_features == 2 and fs.num_samples == 1

    def test_explicit_names_and_create(self) -> None:
        """create() takes feature_names and num_samples as FlowyML writes them."""
        fs = FeatureSet.create(
            name="eng", data=[[1, 2, 3], [4, 5, 6]], feature_names=["a", "b", "c"], num_samples=2
        )
        assert fs.num_features == 3 and fs.num_samples == 2 and isinstance(fs, Dataset)

    def test_count_from_array_shape(self) -> None:
        """An unnamed matrix counts its second dimension."""
        fs = FeatureSet(np.ones((5, 7)), transformations=["scale"], source_dataset="raw")
        assert (fs.num_features, fs.feature_names, fs.transformations) == (7, [], ["scale"])
        assert fs.source_dataset == "raw" and fs.metadata.asset_type == "FeatureSet"


class TestModel:
    @pytest.mark.parametrize(
        ("module", "framework"),
        [
            ("sklearn.linear_model._base", "scikit-learn"),
            ("torch.nn.modules.module", "pytorch"),
            ("xgboost.sklearn", "xgboost"),
            ("lightgbm.sklearn", "lightgbm"),
            ("keras.src.models.model", "keras"),
            ("tensorflow.python.module", "tensorflow"),
        ],
    )
    def test_framework_from_the_class_module(self, module: str, framework: str) -> None:
        """The framework is read from the module of the object's class."""
        assert Model(_third_party(module, "Estimator")()).framework == framework

    def test_framework_from_a_base_class(self) -> None:
        """A user's subclass defined anywhere is recognised by its framework base."""
        base = _third_party("torch.nn.modules.module", "Module", parameters=lambda self: [])
        net = type("Net", (base,), {})
        assert net.__module__ == __name__
        assert Model(net()).framework == "pytorch"

    def test_unknown_objects_have_no_framework(self) -> None:
        """A dict or a plain object records no framework."""
        assert Model({"weights": [1]}).framework is None
        assert "framework" not in Model(object()).properties

    def test_given_framework_wins(self) -> None:
        """framework= (or create's framework keyword) is kept as given."""
        estimator = _third_party("sklearn.tree", "Tree")()
        assert Model(estimator, framework="custom").framework == "custom"
        assert Model.create(data={}, framework="pytorch").properties["framework"] == "pytorch"

    def test_parameter_count_torch_like(self) -> None:
        """PyTorch-like models sum numel() over parameters()."""
        tensor = _third_party("torch", "Tensor", numel=lambda self: self.n)

        def make(n: int) -> object:
            t = tensor()
            t.n = n  # type: ignore[attr-defined]
            return t

        module = _third_party("torch.nn", "Module", parameters=lambda self: [make(6), make(3)])
        assert Model(module()).num_parameters == 9

    def test_parameter_count_keras_and_sklearn(self) -> None:
        """Keras asks count_params(); a fitted linear model counts coef_ and intercept_."""
        keras_model = _third_party("keras.models", "Model", count_params=lambda self: 42)()
        assert Model(keras_model).get_parameters_count() == 42
        linear = _third_party("sklearn.linear_model", "LinearRegression")()
        linear.coef_ = np.zeros(4)  # type: ignore[attr-defined]
        linear.intercept_ = 0.0  # type: ignore[attr-defined]
        assert Model(linear).num_parameters == 5

    def test_a_model_that_cannot_count_has_no_count(self) -> None:
        """A failing count (an unbuilt model) is no count, not an error."""

        def fail(self: object) -> int:
            raise ValueError("model not built")

        assert Model(_third_party("keras.models", "Model", count_params=fail)()).num_parameters is None
        assert Model(_third_party("sklearn.tree", "Tree")()).num_parameters is None

    def test_keyword_form_and_architecture(self) -> None:
        """Model(name=..., data=..., framework=..., architecture=...) as FlowyML writes it."""
        m = Model(name="m", data="bytes", framework="pytorch", architecture="resnet50")
        assert (
            (m.framework, m.architecture)
            == ("pytorch", "resnet50")
            == (m.properties["framework"], m.architecture)
        )


class TestMetrics:
    def test_values_from_keywords_dict_and_create(self) -> None:
        """Keywords, a dict, and create(metrics=...) all give the same values."""
        a = Metrics(accuracy=0.9, loss=0.1)
        b = Metrics({"accuracy": 0.9, "loss": 0.1})
        c = Metrics.create(name="m", metrics={"accuracy": 0.9}, loss=0.1)
        assert a.data == b.data == c.data == {"accuracy": 0.9, "loss": 0.1}

    def test_values_are_mirrored_into_properties(self) -> None:
        """Metric values also appear in metadata.properties, next to metadata= entries."""
        m = Metrics.create(name="m", accuracy=0.95, metadata={"stage": "prod"}, tags={"src": "x"})
        assert m.metadata.properties == {"stage": "prod", "accuracy": 0.95}
        assert m.metadata.get("stage") == "prod" and m.tags == {"src": "x"}

    def test_numpy_scalars_become_plain_numbers(self) -> None:
        """numpy floats, ints, bools and 0-d arrays are converted."""
        m = Metrics(f=np.float64(0.5), i=np.int64(3), b=np.bool_(True), z=np.array(2.5))
        assert m.data == {"f": 0.5, "i": 3, "b": True, "z": 2.5}
        assert [type(v) for v in m.values()] == [float, int, bool, float]

    @pytest.mark.parametrize("bad", ["2h", [0.1, 0.2], 1 + 2j, np.array([1.0, 2.0]), None])
    def test_non_numbers_are_asset_errors(self, bad: object) -> None:
        """A value that is not one real number is refused with the metric's name and the fix."""
        with pytest.raises(AssetError, match=r"metric 'x' .*properties="):
            Metrics(x=bad)

    def test_non_mapping_data_is_an_asset_error(self) -> None:
        """Metrics(0.9) says how to name the value."""
        with pytest.raises(AssetError, match=r"accuracy=0\.9"):
            Metrics(0.9)  # type: ignore[arg-type]

    def test_mapping_reads(self) -> None:
        """Metrics read like a dict of their values, and are truthy even when empty."""
        m = Metrics(accuracy=0.9)
        assert m["accuracy"] == m.get_metric("accuracy") == m.get("accuracy") == m.metrics["accuracy"]
        assert m.get_metric("nope", -1) == -1 and "accuracy" in m and len(m) == 1
        assert dict(m) == {"accuracy": 0.9} and list(m.items()) == [("accuracy", 0.9)]
        assert bool(Metrics())

    def test_add_metric(self) -> None:
        """add_metric checks the value and updates data and properties."""
        m = Metrics()
        m.add_metric("f1", np.float32(0.5))
        assert m.get_all_metrics() == {"f1": 0.5} and m.properties["f1"] == 0.5
        with pytest.raises(AssetError):
            m.add_metric("bad", "x")


class TestRuntimeClasses:
    @pytest.mark.parametrize(
        ("annotation", "expected"),
        [
            (int, (int,)),
            (int | None, (int, type(None))),
            (typing.Optional[str], (str, type(None))),  # noqa: UP045
            (list[int], (list,)),
            (Sequence[int], (Sequence,)),
            (Annotated[float, "unit"], (float,)),
            (None, (type(None),)),
        ],
    )
    def test_checkable(self, annotation: object, expected: tuple[type, ...]) -> None:
        """Classes, unions, generics (by origin) and Annotated are checkable."""
        assert runtime_classes(annotation) == expected

    def test_typeddict_checks_as_dict(self) -> None:
        """A TypedDict is checked as the dict it is at run time."""
        assert runtime_classes(_Row) == (dict,)

    def test_uncheckable_are_skipped(self) -> None:
        """Any, strings, TypeVars, Protocols, Literals and unions holding them give None."""

        class Proto(Protocol):
            def run(self) -> None: ...

        t = typing.TypeVar("t")
        for annotation in (Any, "pd.DataFrame", t, Proto, typing.Literal[1], int | t):
            assert runtime_classes(annotation) is None


class TestRouting:
    def test_asset_type_for(self) -> None:
        """One asset kind (optionally with None) routes; anything else does not."""
        assert asset_type_for(Model) is Model and asset_type_for(Dataset | None) is Dataset
        for annotation in (int, Model | dict, Model | Dataset, Any, "Model"):
            assert asset_type_for(annotation) is None

    def test_return_asset_type_resolves_strings(self) -> None:
        """String annotations (this module uses future annotations) are resolved; unresolvable ones skipped."""

        def train() -> Model:
            return Model(1)

        def broken() -> NotDefinedAnywhere:  # type: ignore[name-defined]  # noqa: F821
            return None

        def plain() -> int:
            return 1

        assert return_asset_type(train) is Model
        assert return_asset_type(broken) is None and return_asset_type(plain) is None

    def test_resolved_annotations_leave_out_what_does_not_resolve(self) -> None:
        """Resolvable string annotations are resolved; an unknown name is dropped, not guessed."""
        hints = resolved_annotations(_train_and_score)
        assert hints == {"raw": Dataset, "return": tuple[Model, Metrics]}

    def test_output_asset_types(self) -> None:
        """One output takes the return annotation; several take a tuple's members by position."""
        assert output_asset_types(_train_and_score, ["model", "metrics"]) == {
            "model": Model,
            "metrics": Metrics,
        }
        assert output_asset_types(_train_and_score, ["a", "b", "c"]) == {}
        assert output_asset_types(_train_and_score, ["both"]) == {}

        def one() -> Dataset | None:
            return None

        def mixed() -> tuple[Model, int]:
            return Model(1), 2

        assert output_asset_types(one, ["d"]) == {"d": Dataset}
        assert output_asset_types(mixed, ["m", "n"]) == {"m": Model}

    def test_wrap_plain_value(self) -> None:
        """A plain value is wrapped, named after the output, with the input assets as parents."""
        raw = Dataset([1, 2], name="raw")
        model = wrap_output({"w": 1}, Model, name="clf", step_name="train", parents=[raw])
        assert isinstance(model, Model) and model.name == "clf" and model.parents == [raw]
        assert raw.children == [model]

    def test_wrap_keeps_an_asset_and_its_name(self) -> None:
        """An asset of the annotated kind is kept; it gets the output's name only if it has none."""
        named, unnamed = Model(1, name="mine"), Model(2)
        assert wrap_output(named, Model, name="out", step_name="s") is named and named.name == "mine"
        assert wrap_output(unnamed, Model, name="out", step_name="s").name == "out"

    def test_wrap_subclass_counts_as_the_kind(self) -> None:
        """A FeatureSet satisfies -> Dataset."""
        fs = FeatureSet([[1]])
        assert wrap_output(fs, Dataset, name="f", step_name="s") is fs

    def test_wrong_kind_is_an_output_error(self) -> None:
        """-> Model returning a Dataset names the step, both kinds and the fix."""
        with pytest.raises(
            OutputError, match=r"'train' is annotated to return Model but returned Dataset"
        ) as exc:
            wrap_output(Dataset([1]), Model, name="m", step_name="train")
        assert exc.value.step_name == "train"

    def test_unholdable_value_is_an_output_error(self) -> None:
        """-> Metrics returning text is an OutputError caused by the AssetError."""
        with pytest.raises(OutputError, match="cannot be one") as exc:
            wrap_output({"acc": "high"}, Metrics, name="m", step_name="evaluate")
        assert isinstance(exc.value.__cause__, AssetError)

    def test_returning_an_input_adds_no_loop(self) -> None:
        """A step passing its input through, or returning an ancestor of an input, links nothing new."""
        root = Dataset([1], name="root")
        child = Dataset([2], parent=root)
        assert wrap_output(child, Dataset, name="o", step_name="s", parents=[child]).parents == [root]
        assert wrap_output(root, Dataset, name="o", step_name="s", parents=[child]).parents == []

    def test_input_assets(self) -> None:
        """Assets among arguments, one level into containers, each once, in order."""
        a, b, c = Dataset([1]), Model(2), Metrics(x=1)
        assert input_assets([a, 3, [b, a], {"k": c}, "text", (), {}]) == [a, b, c]

    def test_input_assets_skip_containers_of_plain_values(self) -> None:
        """Only containers that start with an asset are looked into."""
        hidden = Dataset([1])
        assert input_assets([[1, hidden], {"k": 1, "j": hidden}]) == []

    def test_unwrap_input(self) -> None:
        """An asset reaches a parameter annotated with its data's type as that data."""
        df = pd.DataFrame({"x": [1]})
        ds = Dataset(df)
        assert unwrap_input(ds, pd.DataFrame) is df
        assert unwrap_input(ds, pd.DataFrame | None) is df
        assert unwrap_input(Metrics(a=1), dict) == {"a": 1}

    def test_unwrap_leaves_the_rest_alone(self) -> None:
        """Accepted assets, plain values, unannotated or unchecked parameters and mismatches pass unchanged."""
        ds = Dataset([1])
        for annotation in (Dataset, Asset, object, Any, "pd.DataFrame", pd.DataFrame):
            assert unwrap_input(ds, annotation) is ds
        assert unwrap_input([1], pd.DataFrame) == [1]

    def test_assets_cross_a_pipeline_intact(self) -> None:
        """An asset returned by one step reaches the next with its metadata and lineage."""

        @step(outputs=["raw"])
        def load() -> Dataset:
            return Dataset(pd.DataFrame({"x": [1, 2]}), name="raw")

        @step(outputs=["model"])
        def train(raw: Dataset) -> Model:
            return Model({"mean": float(raw.data["x"].mean())}, name="clf", parent=raw)

        result = Pipeline("assets_lineage").add_step(load).add_step(train).run()
        model, raw = result["model"], result["raw"]
        assert model.parents == [raw] and raw.num_samples == 2 and model.data == {"mean": 1.5}
