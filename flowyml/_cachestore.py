"""``CacheStore``: the cache of one store directory, read and written by key, synchronously.

The engine talks to :class:`~flowyml.Store` asynchronously from inside a run. This is the
small blocking face FlowyML users know (``Pipeline.cache_store``, ``CacheStore(dir)``): it
opens the store for each call on a private thread with its own event loop, so it works from a
script, a notebook cell or a running loop alike, and it holds nothing open between calls.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from ._store import Store, resolve_root
from ._store._artifacts import make_private_dir

__all__ = ("CacheStore",)

_T = TypeVar("_T")
_ONE_VALUE = "value"


class CacheStore:
    """The cache entries of the store at ``cache_dir`` (default: ``$FLOWYML_HOME`` or ``./.flowyml``).

    ``get(key)`` returns a cached value or None; ``set_value(key, value, step_name, code_hash)``
    caches one. An entry the engine wrote holds a step's outputs: ``get`` returns the value of
    one output, or a dict of several, as ``result["step_name"]`` does. The directory is created
    when the object is.
    """

    def __init__(self, cache_dir: str | os.PathLike[str] | None = None) -> None:
        self.root: Path = resolve_root(cache_dir)
        make_private_dir(self.root)

    def get(self, key: str) -> Any:
        """The value cached under ``key``, or None (also when its files are damaged)."""

        async def read(store: Store) -> Any:
            entry = await store.lookup(key)
            if entry is None:
                return None
            values = await store.load(entry)
            if values is None:
                return None
            if len(values) == 1:
                return next(iter(values.values()))
            return values

        return self._call(read)

    def set_value(self, key: str, value: Any, step_name: str, code_hash: str = "") -> None:
        """Cache ``value`` under ``key`` for ``step_name``; ``code_hash`` is FlowyML's, kept for
        its call form (our keys already include the code)."""

        async def write(store: Store) -> None:
            store.put(key=key, step_name=step_name, run_id="", outputs={_ONE_VALUE: value}, duration=0.0)
            await store.flush()

        self._call(write)

    def _call(self, job: Callable[[Store], Awaitable[_T]]) -> _T:
        async def main() -> _T:
            store = await Store.open(self.root)
            try:
                return await job(store)
            finally:
                await store.aclose()

        box: list[Any] = []

        def run() -> None:
            try:
                box.append((True, asyncio.run(main())))
            except BaseException as exc:
                box.append((False, exc))

        worker = threading.Thread(target=run, name="flowyml-cache-store")
        worker.start()
        worker.join()
        ok, value = box[0]
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"CacheStore({str(self.root)!r})"
