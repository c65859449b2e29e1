"""Typed values a step can return: a model, a dataset, metrics, or any named asset."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self

__all__ = ("Asset", "Dataset", "Metrics", "Model")


class Asset:
    """A value with a name and metadata, passed between steps like any other output.

    ``Model(trained, name="clf")`` wraps an object; consumers receive the asset itself and read
    ``.data``. Cache keys hash an asset by its class, name, data and metadata.
    """

    __slots__ = ("data", "metadata", "name")

    def __init__(
        self, data: Any = None, *, name: str | None = None, metadata: Mapping[str, Any] | None = None
    ) -> None:
        self.data = data
        self.name = name
        self.metadata: dict[str, Any] = dict(metadata or {})

    @classmethod
    def create(
        cls,
        data: Any = None,
        *,
        name: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        **extra: Any,
    ) -> Self:
        """Build an asset; extra keyword arguments are stored as metadata."""
        return cls(data, name=name, metadata={**(metadata or {}), **extra})

    def __flowyml_hash__(self) -> object:
        return (type(self).__qualname__, self.name, self.data, self.metadata)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Asset)
        return (self.name, self.data, self.metadata) == (other.name, other.data, other.metadata)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, data={type(self.data).__name__})"

    def __getstate__(self) -> tuple[Any, str | None, dict[str, Any]]:
        return (self.data, self.name, self.metadata)

    def __setstate__(self, state: tuple[Any, str | None, dict[str, Any]]) -> None:
        self.data, self.name, self.metadata = state


class Model(Asset):
    """A trained model: ``Model(trained_obj, name="my_classifier")``."""

    __slots__ = ()


class Dataset(Asset):
    """A dataset: ``Dataset(df, name="raw_data")``."""

    __slots__ = ()


class Metrics(Asset):
    """Named numbers: ``Metrics(accuracy=0.9, f1=0.8)``; read them as ``m["accuracy"]`` or ``m.data``."""

    __slots__ = ()

    def __init__(
        self,
        data: Mapping[str, Any] | None = None,
        *,
        name: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        **values: Any,
    ) -> None:
        super().__init__({**(data or {}), **values}, name=name, metadata=metadata)

    @classmethod
    def create(
        cls,
        data: Any = None,
        *,
        name: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        **extra: Any,
    ) -> Self:
        """Build metrics; extra keyword arguments are metric values."""
        return cls(data, name=name, metadata=metadata, **extra)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        """A metric's value, or ``default``."""
        return self.data.get(key, default)

    def __repr__(self) -> str:
        return f"Metrics({', '.join(f'{k}={v!r}' for k, v in self.data.items())})"
