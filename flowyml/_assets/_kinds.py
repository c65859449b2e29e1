"""The asset kinds: Dataset, FeatureSet, Model, Metrics; each describes its data on creation."""

from __future__ import annotations

from collections.abc import ItemsView, Iterable, Iterator, KeysView, Mapping, ValuesView
from typing import Any, Self, Unpack

from .._errors import AssetError
from ._base import Asset, AssetOptions
from ._extract import count_parameters, describe_data, detect_framework, plain_number

__all__ = ("Dataset", "FeatureSet", "Metrics", "Model")


def _with_properties(options: AssetOptions, **given: Any) -> AssetOptions:
    """``options`` with the non-None ``given`` values merged into its properties."""
    extra = {k: v for k, v in given.items() if v is not None}
    if extra:
        options["properties"] = {**(options.get("properties") or {}), **extra}
    return options


class Dataset(Asset):
    """A dataset: ``Dataset(df, name="raw_data")``.

    A pandas or polars ``DataFrame``, a numpy array or a list of records describes itself in
    ``properties``: ``shape``, ``columns``, ``dtypes`` (or ``dtype``), ``num_samples`` and
    ``size_bytes``, read from metadata only, never from a pass over the values. Values given
    by the caller win. ``location`` and ``schema`` are stored as properties too.
    """

    __slots__ = ()

    def __init__(
        self,
        data: Any = None,
        *,
        location: str | None = None,
        schema: Any = None,
        **options: Unpack[AssetOptions],
    ) -> None:
        schema_text = None if schema is None else str(schema)
        super().__init__(data, **_with_properties(options, location=location, schema=schema_text))

    def _describe(self) -> None:
        props = self.metadata.properties
        for key, value in describe_data(self.data).items():
            props.setdefault(key, value)

    @property
    def num_samples(self) -> int | None:
        """Rows or samples: the ``samples`` or ``num_samples`` property (given or read from data)."""
        props = self.metadata.properties
        value = props.get("samples", props.get("num_samples"))
        return None if value is None else int(value)

    @property
    def size(self) -> Any:
        """The ``size`` property as the caller gave it (``"1GB"``), or None; see ``size_bytes``."""
        return self.metadata.properties.get("size")

    @property
    def size_bytes(self) -> int | None:
        """Memory the data takes, when it could be read cheaply."""
        value = self.metadata.properties.get("size_bytes")
        return None if value is None else int(value)

    @property
    def shape(self) -> list[int] | None:
        """The data's shape, when it has one."""
        return self.metadata.properties.get("shape")

    @property
    def columns(self) -> list[str] | None:
        """Column names of a table or of records."""
        return self.metadata.properties.get("columns")

    @property
    def dtypes(self) -> dict[str, str] | None:
        """Column name -> type name, for tables and records."""
        return self.metadata.properties.get("dtypes")


class FeatureSet(Dataset):
    """Engineered features ready for training: ``FeatureSet(matrix, feature_names=[...])``.

    ``feature_names`` default to the data's columns, ``num_features`` to their count (or the
    second dimension of an array or of rows); ``transformations`` and ``source_dataset`` say
    how the features were made.
    """

    __slots__ = ()

    def __init__(
        self,
        data: Any = None,
        *,
        feature_names: Iterable[str] | None = None,
        transformations: Iterable[str] | None = None,
        source_dataset: str | None = None,
        location: str | None = None,
        schema: Any = None,
        **options: Unpack[AssetOptions],
    ) -> None:
        options = _with_properties(
            options,
            feature_names=None if feature_names is None else list(feature_names),
            transformations=None if transformations is None else list(transformations),
            source_dataset=source_dataset,
        )
        super().__init__(data, location=location, schema=schema, **options)

    def _describe(self) -> None:
        super()._describe()
        props = self.metadata.properties
        names = props.get("feature_names") or props.get("columns")
        if names:
            props.setdefault("feature_names", list(names))
            props.setdefault("num_features", len(names))
        shape = props.get("shape")
        if shape and len(shape) >= 2:
            props.setdefault("num_features", int(shape[1]))

    @property
    def feature_names(self) -> list[str]:
        """The features' names, possibly empty."""
        return list(self.metadata.properties.get("feature_names") or [])

    @property
    def num_features(self) -> int:
        """How many features there are (0 when unknown)."""
        return int(self.metadata.properties.get("num_features") or 0)

    @property
    def transformations(self) -> list[str]:
        """The transformations that produced the features, in order."""
        return list(self.metadata.properties.get("transformations") or [])

    @property
    def source_dataset(self) -> str | None:
        """The name of the dataset the features were made from."""
        return self.metadata.properties.get("source_dataset")


class Model(Asset):
    """A trained model: ``Model(trained_obj, name="my_classifier")``.

    The ``framework`` property is detected from the object's class (``"pytorch"``,
    ``"scikit-learn"``, ``"xgboost"``, ...) without importing any framework, and
    ``num_parameters`` is counted where the framework says so cheaply. Given values win:
    ``Model(obj, framework="tensorflow", architecture="resnet50")``.
    """

    __slots__ = ()

    def __init__(
        self,
        data: Any = None,
        *,
        framework: str | None = None,
        architecture: str | None = None,
        **options: Unpack[AssetOptions],
    ) -> None:
        super().__init__(data, **_with_properties(options, framework=framework, architecture=architecture))

    def _describe(self) -> None:
        props = self.metadata.properties
        if "framework" not in props and (framework := detect_framework(self.data)) is not None:
            props["framework"] = framework
        if "num_parameters" not in props and (count := count_parameters(self.data)) is not None:
            props["num_parameters"] = count

    @property
    def framework(self) -> str | None:
        """The model's framework, given or detected."""
        return self.metadata.properties.get("framework")

    @property
    def architecture(self) -> str | None:
        """The architecture the caller named, if any."""
        return self.metadata.properties.get("architecture")

    @property
    def num_parameters(self) -> int | None:
        """The parameter count, given (``num_parameters``, ``params`` or ``parameters``) or counted."""
        props = self.metadata.properties
        for key in ("num_parameters", "params", "parameters"):
            if props.get(key) is not None:
                return int(props[key])
        return None

    def get_parameters_count(self) -> int | None:
        """FlowyML's name for :attr:`num_parameters`."""
        return self.num_parameters


class Metrics(Asset):
    """Named numbers: ``Metrics(accuracy=0.9, f1=0.8)`` or ``Metrics({"accuracy": 0.9})``.

    Values are plain Python numbers: numpy and torch scalars are converted, anything else is
    an :class:`~flowyml.errors.AssetError` (keep it in ``properties=``). Read them as
    ``m["accuracy"]``, ``m.get_metric("accuracy")``, ``m.data`` or ``m.metrics``; they are
    also mirrored into ``metadata.properties``. ``dict(m)`` gives a plain copy.
    """

    __slots__ = ()

    data: dict[str, int | float | bool]

    def __init__(
        self,
        data: Mapping[str, Any] | None = None,
        *,
        name: str | None = None,
        version: str | None = None,
        parent: Asset | None = None,
        parents: Iterable[Asset] = (),
        tags: Mapping[str, Any] | None = None,
        properties: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        **values: Any,
    ) -> None:
        if data is not None and not isinstance(data, Mapping):
            raise AssetError(
                f"Metrics(...) takes a dict of metric name to number or keyword values, got a "
                f"{type(data).__name__}; e.g. Metrics(accuracy=0.9) or Metrics({{'accuracy': 0.9}})."
            )
        metrics = {str(k): plain_number(str(k), v) for k, v in {**(data or {}), **values}.items()}
        super().__init__(
            metrics,
            name=name,
            version=version,
            parent=parent,
            parents=parents,
            tags=tags,
            properties={**(properties or {}), **(metadata or {}), **metrics},
        )

    @classmethod
    def create(
        cls,
        data: Mapping[str, Any] | None = None,
        *,
        name: str | None = None,
        version: str | None = None,
        parent: Asset | None = None,
        parents: Iterable[Asset] = (),
        tags: Mapping[str, Any] | None = None,
        properties: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        **values: Any,
    ) -> Self:
        """Build metrics from ``data``, ``metrics`` and keyword values (later ones win)."""
        return cls(
            {**(data or {}), **(metrics or {})},
            name=name,
            version=version,
            parent=parent,
            parents=parents,
            tags=tags,
            properties=properties,
            metadata=metadata,
            **values,
        )

    @property
    def metrics(self) -> dict[str, int | float | bool]:
        """The metric values (the same dict as ``data``)."""
        return self.data

    def get_metric(self, name: str, default: Any = None) -> Any:
        """One metric's value, or ``default``."""
        return self.data.get(name, default)

    def get_all_metrics(self) -> dict[str, int | float | bool]:
        """A copy of every metric."""
        return dict(self.data)

    def add_metric(self, name: str, value: Any) -> None:
        """Set one metric (a plain number)."""
        number = plain_number(name, value)
        self.data[name] = number
        self.metadata.properties[name] = number

    def __getitem__(self, key: str) -> int | float | bool:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        """A metric's value, or ``default``."""
        return self.data.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self.data

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def __bool__(self) -> bool:
        return True  # an asset is always truthy, even with no metrics yet

    def keys(self) -> KeysView[str]:
        """The metric names."""
        return self.data.keys()

    def values(self) -> ValuesView[int | float | bool]:
        """The metric values."""
        return self.data.values()

    def items(self) -> ItemsView[str, int | float | bool]:
        """``(name, value)`` pairs."""
        return self.data.items()

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.data.items())
        label = f"name={self.name!r}, " if self.name else ""
        return f"Metrics({label}{inner})"
