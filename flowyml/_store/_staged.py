"""Cache entries saved in bulk ahead of the index: what a run waits for when it puts many.

A run with caching on waits until its cache entries are durable (``Store.settle``), not until a
look-up could find them through the index. At 100,000 entries the index rows (random keys into
five B-trees, and each key's components as JSON) took 1.5-2.4 s to insert, all of it after the
run's last step and on its wall clock. So the writer first commits a batch of at least
``_SPLIT_ENTRIES`` puts (see ``_api``) as a few packed rows appended to ``staged_entries`` --
about 0.1 s for 100,000 -- lets the runs waiting for them go on, then merges them into the index
in transactions of ``_INDEX_CHUNK``, the last of which deletes the packed rows. Until the merge, this process serves the
entries from memory; another process sees them once they are merged (a miss meanwhile computes
the step again, as for any entry committed after its look-up).

A process killed between the two transactions leaves its packed rows: the next store opened
for writing merges those whose process is gone (``Store`` does it first thing). Packing is
pickle restricted to builtin atoms, tuples, lists and dicts: unpacking a row never imports or
calls anything, and a row that is not exactly what :func:`pack` makes reads as damaged.
"""

from __future__ import annotations

import io
import pickle
import sqlite3
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from typing import Any, Final

from ._db import immediate

__all__ = ("CHUNK", "pack", "stage", "unpack")

#: Puts per packed row: a row of 100,000 None outputs was 24 MB, held twice while SQLite copied it.
CHUNK: Final = 8_192
_HEAD: Final = 5
_OUT: Final = 5


def _dumps(value: object) -> bytes:
    """Pickle ``value`` without a memo (one pass, no dict of every object seen: 3x faster for a
    chunk of flat tuples). What is packed holds no cycles."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.fast = True
    pickler.dump(value)
    return buffer.getvalue()


def pack(
    puts: Sequence[tuple[Any, ...]], parts: Sequence[Any], filed: Collection[int], inline_limit: int
) -> Iterator[bytes]:
    """The packed rows of a batch's puts (flat, see ``_api._Flat``) and key components (flat, four
    items a key), :data:`CHUNK` puts a row, made one at a time. The outputs bigger than
    ``inline_limit`` of the puts in ``filed`` (by ``id``) are in their files already: their bytes
    are left out."""
    for start in range(0, max(len(puts), len(parts) // 4), CHUNK):
        chunk = puts[start : start + CHUNK]
        if filed:
            chunk = [_filed(put, inline_limit) if id(put) in filed else put for put in chunk]
        yield _dumps((list(chunk), list(parts[start * 4 : (start + CHUNK) * 4])))


def _filed(put: tuple[Any, ...], inline_limit: int) -> tuple[Any, ...]:
    flat = list(put)
    for at in range(_HEAD, len(flat), _OUT):
        if flat[at + 2] > inline_limit:
            flat[at + 4] = None
    return tuple(flat)


def stage(db: sqlite3.Connection, rows: Iterable[bytes], pid: int, host: str) -> list[int]:
    """Commit the packed ``rows`` in one ``BEGIN IMMEDIATE`` transaction; their ids."""
    now = time.time()
    ids: list[int] = []
    with immediate(db):
        for data in rows:
            cursor = db.execute(
                "INSERT INTO staged_entries (pid, host, created_at, entries) VALUES (?, ?, ?, ?)",
                (pid, host, now, data),
            )
            del data
            ids.append(int(cursor.lastrowid or 0))
    return ids


class _AtomsOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"a staged row names {module}.{name}")


def _is_put(put: object) -> bool:
    if not isinstance(put, tuple) or len(put) < _HEAD + _OUT or (len(put) - _HEAD) % _OUT:
        return False
    key, step_name, run_id, duration, created_at = put[:_HEAD]
    if not (isinstance(key, str) and isinstance(step_name, str) and isinstance(run_id, str | None)):
        return False
    if not (isinstance(duration, float) and isinstance(created_at, float)):
        return False
    for at in range(_HEAD, len(put), _OUT):
        name, digest, size, type_name, data = put[at : at + _OUT]
        if not (isinstance(name, str) and isinstance(digest, str) and isinstance(type_name, str)):
            return False
        if not (isinstance(size, int) and isinstance(data, bytes | None)):
            return False
    return True


def _are_parts(parts: object) -> bool:
    if not isinstance(parts, list) or len(parts) % 4:
        return False
    for at in range(0, len(parts), 4):
        key, step_name, created_at, components = parts[at : at + 4]
        if not (isinstance(key, str) and isinstance(step_name, str) and isinstance(created_at, float)):
            return False
        if not isinstance(components, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in components.items()
        ):
            return False
    return True


def unpack(data: object) -> tuple[list[tuple[Any, ...]], list[Any]] | None:
    """The puts and key components of a packed row, or None when it is not one :func:`pack` made."""
    if not isinstance(data, bytes):
        return None
    try:
        value = _AtomsOnly(io.BytesIO(data)).load()
    except Exception:
        return None
    if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], list)):
        return None
    puts, parts = value
    if not all(map(_is_put, puts)) or not _are_parts(parts):
        return None
    return puts, parts
