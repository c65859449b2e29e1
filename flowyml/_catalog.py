"""The asset catalogue: every asset a run produced, by name and version, with its lineage.

One table, ``asset_catalog``, in the store's database, beside (and independent of) the cache
and run tables: a row per registered asset with its name, its version (1, 2, ... per name),
the run, pipeline, step and output that produced it, its metadata as JSON, the ids of its
parent assets, and where its artifact went (``location``, written by a router).

Where an asset's artifact goes is pluggable: an :class:`AssetRouter` saves it and returns a
location string, and loads it back from that string. :class:`LocalRouter` (the default)
keeps a pickled copy in the store's ``assets/`` folder, named by the hash of its bytes. A
router that sends ``Model``s to a model registry is a class a user writes (see the README).

Plain ``sqlite3`` on a thread, off the run's hot path: a run registers its assets once, when
it ends. Readers open the database read-only and write nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._errors import StoreError

__all__ = (
    "AssetEntry",
    "AssetRouter",
    "Produced",
    "LocalRouter",
    "catalog",
    "children_of",
    "entries",
    "find",
    "load_asset",
    "parents_of",
    "register",
    "resolve_root",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS asset_catalog (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    asset_id TEXT NOT NULL,
    asset_type TEXT NOT NULL,
    run_id TEXT NOT NULL,
    pipeline TEXT NOT NULL,
    step_name TEXT NOT NULL,
    output_name TEXT NOT NULL,
    created_at REAL NOT NULL,
    metadata TEXT NOT NULL,
    parent_ids TEXT NOT NULL,
    location TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE INDEX IF NOT EXISTS asset_catalog_by_id ON asset_catalog (asset_id);
"""
_COLUMNS = (
    "name, version, asset_id, asset_type, run_id, pipeline, step_name, output_name, created_at, "
    "metadata, parent_ids, location"
)
_BUSY_MS = 30_000
_LOCAL = "local:"


@dataclass(frozen=True, slots=True)
class AssetEntry:
    """One registered asset: who made it, when, what it is, and where its artifact is."""

    name: str
    version: int
    asset_id: str
    asset_type: str
    run_id: str
    pipeline: str
    step_name: str
    output_name: str
    created_at: float
    metadata: dict[str, Any]
    """``AssetMetadata.to_dict()`` as recorded: properties, tags, the asset's own version label."""
    parent_ids: tuple[str, ...]
    location: str


@dataclass(frozen=True, slots=True)
class Produced:
    """An asset a step produced in a run, to register: the object and where it came from."""

    asset: Any
    run_id: str
    pipeline: str
    step_name: str
    output_name: str


class AssetRouter:
    """Where assets' artifacts go. Subclass it to send, say, every ``Model`` to a registry.

    :meth:`accepts` says whether this router takes an asset (the first router of a pipeline
    that accepts an asset handles it; the rest go to :class:`LocalRouter`); :meth:`save`
    stores it and returns a location string, recorded in the catalogue; :meth:`load` gets
    the asset back from that location. ``scheme`` prefixes the locations it returns, so
    loading finds the router again (``"mlflow:"``, ``"s3:"``).
    """

    scheme: str = ""

    def accepts(self, asset: Any) -> bool:
        """Whether this router stores ``asset`` (default: every asset)."""
        return True

    def save(self, asset: Any, produced: Produced, root: Path) -> str:
        """Store ``asset`` and return its location (starting with :attr:`scheme`)."""
        raise NotImplementedError

    def load(self, location: str, root: Path) -> Any:
        """The asset saved at ``location``."""
        raise NotImplementedError


class LocalRouter(AssetRouter):
    """Keeps a pickled copy in the store's ``assets/`` folder, named by its bytes' xxh3-128."""

    scheme = _LOCAL

    def save(self, asset: Any, produced: Produced, root: Path) -> str:
        import cloudpickle
        import xxhash

        data = cloudpickle.dumps(asset)
        digest = xxhash.xxh3_128_hexdigest(data)
        folder = root / "assets"
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = folder / digest
        if not path.exists():
            tmp = folder / f".{digest}.{os.getpid()}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        return f"{_LOCAL}{digest}"

    def load(self, location: str, root: Path) -> Any:
        import cloudpickle
        import xxhash

        digest = location.removeprefix(_LOCAL)
        path = root / "assets" / digest
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"the artifact of this asset is missing: {path}") from None
        if xxhash.xxh3_128_hexdigest(data) != digest:
            raise StoreError(f"the artifact {path} does not match its hash; it was altered or truncated")
        return cloudpickle.loads(data)


def resolve_root(cache_dir: str | os.PathLike[str] | Path | None) -> Path:
    """The store directory, as the store resolves it (imported late: the store loads aiosqlite)."""
    from ._store import resolve_root as store_root

    return store_root(cache_dir)


def _connect(root: Path, *, write: bool) -> sqlite3.Connection | None:
    from ._store._db import DB_NAME

    path = root / DB_NAME
    if not path.is_file():
        if not write:
            return None
        raise StoreError(f"no flowyml store at {root}")
    uri = f"file:{path}?mode={'rw' if write else 'ro'}"
    conn = sqlite3.connect(uri, uri=True, timeout=_BUSY_MS / 1000, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {_BUSY_MS}")
    return conn


def register(
    cache_dir: str | os.PathLike[str] | Path | None,
    produced: Iterable[Produced],
    routers: Sequence[AssetRouter] = (),
) -> list[AssetEntry]:
    """Register each produced asset under its name with the next version; returns the new entries.

    An asset already in the catalogue (same ``asset_id``: a step served from the cache hands
    back the asset it made before) is not registered again. The artifact is saved by the
    first of ``routers`` that accepts it, else by :class:`LocalRouter`. The rows of one call
    are committed in one transaction, so concurrent runs never get the same version.

    Raises:
        StoreError: the store does not exist or cannot be written, or a router failed (the
            other assets are registered all the same; the error names the first failure).
    """
    root = resolve_root(cache_dir)
    items = list(produced)
    if not items:
        return []
    conn = _connect(root, write=True)
    assert conn is not None
    local = LocalRouter()
    failed: StoreError | None = None
    try:
        conn.executescript(_SCHEMA)
        ids = json.dumps(sorted({item.asset.asset_id for item in items}))
        known = {
            row[0]
            for row in conn.execute(
                "SELECT asset_id FROM asset_catalog WHERE asset_id IN (SELECT value FROM json_each(?))",
                (ids,),
            )
        }
        saved: list[tuple[Produced, str]] = []
        for item in items:
            asset = item.asset
            if asset.asset_id in known:
                continue
            known.add(asset.asset_id)
            router = next((r for r in routers if r.accepts(asset)), local)
            try:
                saved.append((item, router.save(asset, item, root)))
            except Exception as exc:
                failed = failed or StoreError(
                    f"router {type(router).__name__} could not save asset {asset.name!r} "
                    f"(step {item.step_name!r}): {exc!r}"
                )
        made: list[AssetEntry] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            latest: dict[str, int] = {}
            for item, location in saved:
                asset = item.asset
                name = asset.name or item.output_name
                if name not in latest:
                    row = conn.execute(
                        "SELECT COALESCE(MAX(version), 0) FROM asset_catalog WHERE name = ?", (name,)
                    ).fetchone()
                    latest[name] = int(row[0])
                latest[name] += 1
                meta = asset.metadata.to_dict()
                made.append(
                    AssetEntry(
                        name=name,
                        version=latest[name],
                        asset_id=asset.asset_id,
                        asset_type=type(asset).__name__,
                        run_id=item.run_id,
                        pipeline=item.pipeline,
                        step_name=item.step_name,
                        output_name=item.output_name,
                        created_at=time.time(),
                        metadata=meta,
                        parent_ids=tuple(meta.get("parent_ids", ())),
                        location=location,
                    )
                )
            conn.executemany(
                f"INSERT INTO asset_catalog ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                [_row(e) for e in made],
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        raise StoreError(f"cannot register assets in the store at {root}: {exc}") from exc
    finally:
        conn.close()
    if failed is not None:
        raise failed
    return made


def _row(e: AssetEntry) -> tuple[Any, ...]:
    return (
        e.name,
        e.version,
        e.asset_id,
        e.asset_type,
        e.run_id,
        e.pipeline,
        e.step_name,
        e.output_name,
        e.created_at,
        json.dumps(e.metadata, default=repr, sort_keys=True),
        json.dumps(list(e.parent_ids)),
        e.location,
    )


def _entry(row: Sequence[Any]) -> AssetEntry:
    return AssetEntry(
        name=row[0],
        version=int(row[1]),
        asset_id=row[2],
        asset_type=row[3],
        run_id=row[4],
        pipeline=row[5],
        step_name=row[6],
        output_name=row[7],
        created_at=float(row[8]),
        metadata=json.loads(row[9]),
        parent_ids=tuple(json.loads(row[10])),
        location=row[11],
    )


@contextlib.contextmanager
def _reading(cache_dir: str | os.PathLike[str] | Path | None) -> Iterator[sqlite3.Connection | None]:
    conn = _connect(resolve_root(cache_dir), write=False)
    try:
        if (
            conn is not None
            and not conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'asset_catalog'"
            ).fetchone()
        ):
            conn.close()
            conn = None
        yield conn
    finally:
        if conn is not None:
            conn.close()


def _query(
    cache_dir: str | os.PathLike[str] | Path | None, where: str, params: Sequence[Any]
) -> list[AssetEntry]:
    with _reading(cache_dir) as conn:
        if conn is None:
            return []
        rows = conn.execute(f"SELECT {_COLUMNS} FROM asset_catalog {where}", tuple(params)).fetchall()
    return [_entry(r) for r in rows]


def entries(
    cache_dir: str | os.PathLike[str] | Path | None = None, name: str | None = None
) -> list[AssetEntry]:
    """Every registered asset (or every version of ``name``), by name then version."""
    if name is None:
        return _query(cache_dir, "ORDER BY name, version", ())
    return _query(cache_dir, "WHERE name = ? ORDER BY version", (name,))


def catalog(name: str | None = None, *, cache_dir: str | os.PathLike[str] | None = None) -> list[AssetEntry]:
    """The store's asset catalogue: every registered asset (or every version of ``name``),
    by name then version. What ``flowyml assets`` prints; empty without a store."""
    return entries(cache_dir, name)


def find(
    cache_dir: str | os.PathLike[str] | Path | None, name: str, version: int | None = None
) -> AssetEntry | None:
    """The entry of ``name`` at ``version`` (default: the latest), or None."""
    if version is None:
        found = _query(cache_dir, "WHERE name = ? ORDER BY version DESC LIMIT 1", (name,))
    else:
        found = _query(cache_dir, "WHERE name = ? AND version = ?", (name, version))
    return found[0] if found else None


def parents_of(cache_dir: str | os.PathLike[str] | Path | None, entry: AssetEntry) -> list[AssetEntry]:
    """The registered assets ``entry`` was derived from, in the order it lists them."""
    if not entry.parent_ids:
        return []
    marks = ",".join("?" * len(entry.parent_ids))
    found = {e.asset_id: e for e in _query(cache_dir, f"WHERE asset_id IN ({marks})", entry.parent_ids)}
    return [found[i] for i in entry.parent_ids if i in found]


def children_of(cache_dir: str | os.PathLike[str] | Path | None, entry: AssetEntry) -> list[AssetEntry]:
    """The registered assets derived from ``entry``, oldest first."""
    pattern = f'%"{entry.asset_id}"%'
    return _query(cache_dir, "WHERE parent_ids LIKE ? ORDER BY created_at", (pattern,))


def load_asset(
    cache_dir: str | os.PathLike[str] | Path | None, entry: AssetEntry, routers: Sequence[AssetRouter] = ()
) -> Any:
    """The asset ``entry`` records, loaded by the router whose scheme starts its location.

    Raises:
        StoreError: no router given knows the location's scheme, or the artifact is damaged.
    """
    root = resolve_root(cache_dir)
    for router in (*routers, LocalRouter()):
        if router.scheme and entry.location.startswith(router.scheme):
            return router.load(entry.location, root)
    raise StoreError(
        f"asset {entry.name!r} version {entry.version} is stored at {entry.location!r}; pass the "
        "router that saved it: load(..., routers=[MyRouter()])"
    )
