"""The asset base: a value with a name, a version label, metadata and lineage."""

from __future__ import annotations

import os
import uuid
import weakref
from collections.abc import Callable, ItemsView, Iterable, Iterator, KeysView, Mapping, Sequence, ValuesView
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Self, TypedDict

from .._errors import AssetError, AssetNotFoundError

if TYPE_CHECKING:
    from .._catalog import AssetRouter

__all__ = ("DEFAULT_VERSION", "Asset", "AssetMetadata", "AssetOptions", "asset_class", "restore")

DEFAULT_VERSION = "v1.0.0"


def _now() -> datetime:
    return datetime.now(UTC)


def _new_id() -> str:
    return uuid.uuid4().hex


@dataclass(eq=False, slots=True)
class AssetMetadata:
    """What an asset is, apart from its data.

    Attributes are the asset's identity (``asset_id``, ``name``, ``version``, ``asset_type``,
    ``created_at``, ``parent_ids``) and what describes it (``properties``, ``tags``). It also
    reads as the mapping of its ``properties`` (``metadata["rows"]``, ``metadata.get("source")``,
    ``metadata == {"source": "s3"}``), which is what ``Asset.metadata`` was before it carried
    identity, so code written against either keeps working.
    """

    asset_type: str
    name: str | None = None
    version: str = DEFAULT_VERSION
    asset_id: str = field(default_factory=_new_id)
    created_at: datetime = field(default_factory=_now)
    parent_ids: list[str] = field(default_factory=list)
    properties: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.properties[key]

    def get(self, key: str, default: Any = None) -> Any:
        """A property's value, or ``default``."""
        return self.properties.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self.properties

    def __iter__(self) -> Iterator[str]:
        return iter(self.properties)

    def __len__(self) -> int:
        return len(self.properties)

    def keys(self) -> KeysView[str]:
        """The property names."""
        return self.properties.keys()

    def values(self) -> ValuesView[Any]:
        """The property values."""
        return self.properties.values()

    def items(self) -> ItemsView[str, Any]:
        """The properties as ``(name, value)`` pairs."""
        return self.properties.items()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AssetMetadata):
            return self.to_dict() == other.to_dict()
        if isinstance(other, Mapping):
            return self.properties == dict(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (``created_at`` as ISO 8601), as a catalogue stores it."""
        return {
            "asset_id": self.asset_id,
            "name": self.name,
            "version": self.version,
            "asset_type": self.asset_type,
            "created_at": self.created_at.isoformat(),
            "parent_ids": list(self.parent_ids),
            "properties": dict(self.properties),
            "tags": dict(self.tags),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AssetMetadata:
        """The inverse of :meth:`to_dict`."""
        return cls(
            asset_type=d["asset_type"],
            name=d.get("name"),
            version=d.get("version") or DEFAULT_VERSION,
            asset_id=d["asset_id"],
            created_at=datetime.fromisoformat(d["created_at"]),
            parent_ids=list(d.get("parent_ids", ())),
            properties=dict(d.get("properties", {})),
            tags=dict(d.get("tags", {})),
        )


class AssetOptions(TypedDict, total=False):
    """The keyword options every asset constructor takes (see :class:`Asset`)."""

    name: str | None
    version: str | None
    parent: Asset | None
    parents: Iterable[Asset]
    tags: Mapping[str, Any] | None
    properties: Mapping[str, Any] | None
    metadata: Mapping[str, Any] | None


class Asset:
    """A value with a name, metadata and lineage, passed between steps like any other output.

    ``Model(trained, name="clf")`` wraps an object; ``Dataset.create(data=df, name="raw",
    source="s3")`` does the same and files extra keywords under ``metadata.properties``.

    Args:
        data: the wrapped object.
        name: the asset's name; a step returning an unnamed asset names it after its output.
        version: a free-form label (default ``"v1.0.0"``).
        parent, parents: the assets this one was derived from. Each parent lists this asset
            among its ``children``.
        tags: short labels, ``{"env": "prod"}``.
        properties: descriptive values; subclasses add what they read from ``data`` (a
            dataset's shape, a model's framework), never overriding a value given here.
        metadata: merged into ``properties`` (the keyword older code and FlowyML use).

    Identity: two assets are equal when they are the same asset (same ``asset_id``), which a
    pickled or cached copy keeps. The cache key of an asset is its content instead: class,
    name, version, data, properties and tags; never its id, creation time or lineage, so equal
    content run after run gives the same key.

    Lineage: ``parents`` are held strongly and ``children`` weakly, so a long-lived input does
    not keep every asset ever derived from it alive. The links are live objects of this
    process; a pickled copy (a cache entry, a value sent to a worker process) keeps only
    ``metadata.parent_ids``.
    """

    __slots__ = ("__weakref__", "_children", "data", "metadata", "parents")

    data: Any
    metadata: AssetMetadata
    parents: list[Asset]

    def __init__(
        self,
        data: Any = None,
        *,
        name: str | None = None,
        version: str | None = None,
        parent: Asset | None = None,
        parents: Iterable[Asset] = (),
        tags: Mapping[str, Any] | None = None,
        properties: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        for option, value in (("tags", tags), ("properties", properties), ("metadata", metadata)):
            if value is not None and not isinstance(value, Mapping):
                raise AssetError(
                    f"{type(self).__name__}({option}=...) takes a dict of name to value, got a "
                    f"{type(value).__name__}; e.g. {option}={{'env': 'prod'}}."
                )
        self.data = data
        self.metadata = AssetMetadata(
            asset_type=type(self).__name__,
            name=name,
            version=version or DEFAULT_VERSION,
            properties={**(properties or {}), **(metadata or {})},
            tags=dict(tags or {}),
        )
        self.parents = []
        self._children: list[weakref.ref[Asset]] = []
        for p in (*(() if parent is None else (parent,)), *parents):
            self.add_parent(p)
        self._describe()

    def _describe(self) -> None:
        """Add to ``properties`` what the data tells (a hook for subclasses; the base adds nothing)."""

    @classmethod
    def create(
        cls,
        data: Any = None,
        *,
        name: str | None = None,
        version: str | None = None,
        parent: Asset | None = None,
        parents: Iterable[Asset] = (),
        tags: Mapping[str, Any] | None = None,
        properties: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        **extra: Any,
    ) -> Self:
        """Build an asset; extra keyword arguments are stored as properties."""
        return cls(
            data,
            name=name,
            version=version,
            parent=parent,
            parents=parents,
            tags=tags,
            properties={**(properties or {}), **extra},
            metadata=metadata,
        )

    # Identity, mirrored from the metadata so there is one source of truth.

    @property
    def name(self) -> str | None:
        """The asset's name (``metadata.name``)."""
        return self.metadata.name

    @name.setter
    def name(self, value: str | None) -> None:
        self.metadata.name = value

    @property
    def version(self) -> str:
        """The asset's version label (``metadata.version``)."""
        return self.metadata.version

    @version.setter
    def version(self, value: str) -> None:
        self.metadata.version = value

    @property
    def asset_id(self) -> str:
        """A unique id, kept by copies, pickles and cache entries of this asset."""
        return self.metadata.asset_id

    @property
    def properties(self) -> dict[str, Any]:
        """``metadata.properties``, mutable."""
        return self.metadata.properties

    @property
    def tags(self) -> dict[str, Any]:
        """``metadata.tags``, mutable."""
        return self.metadata.tags

    def add_property(self, key: str, value: Any) -> None:
        """Set one property."""
        self.metadata.properties[key] = value

    def add_tag(self, key: str, value: Any) -> None:
        """Set one tag."""
        self.metadata.tags[key] = value

    # Lineage.

    @property
    def children(self) -> list[Asset]:
        """The live assets derived from this one, oldest first."""
        alive = [(ref, child) for ref in self._children if (child := ref()) is not None]
        self._children = [ref for ref, _ in alive]
        return [child for _, child in alive]

    def add_parent(self, parent: Asset) -> None:
        """Record that this asset was derived from ``parent``; adding one twice is a no-op.

        Raises:
            AssetError: ``parent`` is not an asset, is this asset, or descends from it.
        """
        if not isinstance(parent, Asset):
            raise AssetError(
                f"the parent of asset {self.name!r} must be an asset (Dataset, Model, ...), got a "
                f"{type(parent).__name__}; wrap it first, e.g. parent=Dataset(value)."
            )
        if parent is self or self in parent.get_all_ancestors():
            raise AssetError(
                f"asset {parent.name!r} cannot be a parent of {self.name!r}: it is that asset or "
                "derives from it, and lineage cannot loop."
            )
        if any(p is parent for p in self.parents):
            return
        self.parents.append(parent)
        self.metadata.parent_ids.append(parent.asset_id)
        parent._children.append(weakref.ref(self))

    def get_all_ancestors(self) -> list[Asset]:
        """Every asset this one derives from, nearest first, each once."""
        return _walk(self, lambda a: a.parents)

    def get_all_descendants(self) -> list[Asset]:
        """Every live asset derived from this one, nearest first, each once."""
        return _walk(self, lambda a: a.children)

    def to_dict(self) -> dict[str, Any]:
        """The metadata as a JSON-friendly dict, with the ids of live children."""
        return {**self.metadata.to_dict(), "child_ids": [c.asset_id for c in self.children]}

    @classmethod
    def load(
        cls,
        name: str,
        version: int | None = None,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        routers: Sequence[AssetRouter] = (),
    ) -> Self:
        """The asset a run registered as ``name`` in the store's catalogue: the latest version,
        or ``version`` (1, 2, ...). ``routers`` are needed for assets a custom router saved.

        Raises:
            AssetNotFoundError: no such name or version (the message lists the versions there are).
            AssetError: the asset is of another kind (``Model.load`` of a ``Dataset``).
            StoreError: its artifact is missing or damaged, or no router given can read it.
        """
        from .._catalog import entries, find, load_asset

        entry = find(cache_dir, name, version)
        if entry is None:
            have = [e.version for e in entries(cache_dir, name)]
            which = f"{name!r}" if version is None else f"{name!r} version {version}"
            there = f"; versions there are: {have}" if have else "; `flowyml assets` lists what there is"
            raise AssetNotFoundError(f"the asset catalogue has no asset {which}{there}")
        asset = load_asset(cache_dir, entry, routers)
        if not isinstance(asset, cls):
            raise AssetError(
                f"asset {name!r} version {entry.version} is a {type(asset).__name__}, not a {cls.__name__}; "
                f"load it with {type(asset).__name__}.load(...) or Asset.load(...)"
            )
        return asset

    # Hashing, equality, pickling.

    def __flowyml_hash__(self) -> object:
        meta = self.metadata
        return (meta.name, meta.version, self.data, meta.properties, meta.tags)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Asset):
            return NotImplemented
        return self.metadata.asset_id == other.metadata.asset_id

    def __hash__(self) -> int:
        return hash(self.metadata.asset_id)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, version={self.version!r}, "
            f"data={type(self.data).__name__})"
        )

    def __getstate__(self) -> tuple[Any, AssetMetadata]:
        return (self.data, self.metadata)

    def __setstate__(self, state: tuple[Any, AssetMetadata]) -> None:
        self.data, self.metadata = state
        self.parents = []
        self._children = []


def _walk(start: Asset, step: Callable[[Asset], Iterable[Asset]]) -> list[Asset]:
    seen = {id(start)}
    out: list[Asset] = []
    frontier = [start]
    while frontier:
        nxt: list[Asset] = []
        for asset in frontier:
            for other in step(asset):
                if id(other) not in seen:
                    seen.add(id(other))
                    out.append(other)
                    nxt.append(other)
        frontier = nxt
    return out


def restore(cls: type[Asset], data: Any, metadata: AssetMetadata) -> Asset:
    """An asset of ``cls`` with exactly this data and metadata, without describing the data again.

    For a store that loads an asset back from its catalogue: the id, creation time and
    properties are those recorded, not new ones.
    """
    asset = cls.__new__(cls)
    asset.__setstate__((data, metadata))
    return asset


def asset_class(asset_type: str) -> type[Asset] | None:
    """The loaded asset class whose name is ``asset_type`` (``"Model"``), or None."""
    pending: list[type[Asset]] = [Asset]
    while pending:
        cls = pending.pop()
        if cls.__name__ == asset_type:
            return cls
        pending.extend(cls.__subclasses__())
    return None
