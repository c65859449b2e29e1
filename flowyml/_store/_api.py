"""The store: a cache index and lineage record in SQLite, written by one background task.

How a write travels: ``put`` is a plain (non-async) call that does the caller-side work at once
(pickling, so later mutation cannot change what is cached) and adds the entry to a list. Nothing
is queued one by one: ``put``, ``put_key_parts``, ``record_run``, ``record_step`` and the engine's
``record_fate`` add to lists (the first of a batch queues a wake-up on an :class:`asyncio.Queue`,
which also carries flushes, drops and calls), and the writer takes the whole lists with each batch. One writer task per store drains
whatever is queued (lineage alone may wait up to 20 ms for more, see ``_LINGER_SECONDS``), writes
the artifact files of the batch, fsyncs them, then builds every index and lineage row of the batch
and commits them in ONE ``BEGIN IMMEDIATE`` transaction, in ONE call on the connection's thread.
A transaction commits whole or not at all; a writer cancelled mid-batch (its loop shutting down)
processes the batch again and every queued job, then closes. :meth:`Store.aclose` drains the queue
before closing. A run waits for its own records with :meth:`Store.settle`.

Why so: the per-step cost of recording is paid on the event loop, so the hot path only appends a
tuple; building a frozen record, queueing it and awaiting ~10 thread hops per batch cost ~20 us a
step. Lineage rows are packed per batch (``_packed``), because the drain at the end of a run is on
the run's wall clock and a SQLite row per step, output and consumed input cost more than the run.

How a read travels: when a run starts, :meth:`Store.preload` reads, in one call on the
connection's thread, what the run may need: the index rows of the most recent
:data:`PRELOAD_PER_STEP` entries of each of its steps -- what an unchanged rerun hits -- not every
entry ever cached (inline values are up to 64 KiB each, so loading them all made a run's time and
memory grow with the whole cache), and the keys (keys only, up to a bound) of all their entries.
It reads the entries' rows and their outputs' rows apart and joins them in Python, each table in
one pass when the run's steps own most of it, else through its indexes, and returns them as the
run's :class:`CacheView`. A look-up checks the entries put and not yet
committed (the store's memory), then the view: a preloaded entry costs a dict access and no
thread hop, and a key the view knows the index lacks is a miss without a query -- a chain of
misses used to wait, step by step, for a query queued behind the previous put's commit. Other
keys ask the database (misses arriving together share one query). An entry another process
commits after the view was read is at worst computed again. Committed entries leave memory (the
store lives as long as the process), and what a view loaded goes with its run.
:meth:`Store.load` checks the xxh3-128 of every artifact against the index BEFORE unpickling it;
a mismatch is quarantined and reported as a miss.

Durability: cache entries are committed at once (they do not linger like lineage), in batches of
whatever was put meanwhile; one transaction per batch, so a killed run loses at most the entries
not yet committed, and a committed entry is whole (its artifact files were fsynced first). A
batch of many entries is saved first, packed, in a transaction of its own, then indexed (see
``_staged``): a run waits for its entries to be saved (``settle``), not for their index nor for
its lineage.
"""

from __future__ import annotations

__all__ = (
    "INLINE_LIMIT",
    "KNOWN_KEYS_BASE",
    "KNOWN_KEYS_PER_STEP",
    "PRELOAD_PER_STEP",
    "CacheView",
    "StepFate",
    "StepShape",
    "Store",
    "resolve_root",
)

import asyncio
import contextlib
import itertools
import json
import os
import pickle
import socket
import sqlite3
import time
import warnings
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import aiosqlite
import cloudpickle
import xxhash

from flowyml._errors import CacheCorruptionWarning, StoreError, StoreWarning, UncachedStepWarning

from . import _db, _packed, _staged
from ._artifacts import ORPHAN_GRACE_SECONDS, ArtifactFiles, BadHashError, make_private_dir, process_gone
from ._packed import StepFate, StepShape
from ._records import (
    RUN_STATES,
    CachedOutput,
    CacheEntry,
    CacheStats,
    Lineage,
    LineageNode,
    RunDetail,
    RunRecord,
    StepCacheStats,
    StepRecord,
    VerifyProblem,
    VerifyReport,
)
from ._safety import is_hash

#: Pickled values up to this many bytes live inline in SQLite; larger ones are artifact files.
INLINE_LIMIT: Final = 64 * 1024
#: :meth:`Store.preload` loads this many of the most recent entries of each step (an unchanged
#: rerun hits the latest; the one before covers toggling between two inputs).
PRELOAD_PER_STEP: Final = 2
#: :meth:`Store.preload` also reads the keys of the run's steps (keys only) when there are at most
#: ``KNOWN_KEYS_BASE + KNOWN_KEYS_PER_STEP * steps`` of them; past that, each miss asks the database.
KNOWN_KEYS_BASE: Final = 100_000
KNOWN_KEYS_PER_STEP: Final = 8
#: The writer commits at most this many jobs per transaction.
_MAX_BATCH: Final = 10_000
#: A batch of at least this many rows hands the page cache it grew back to the system.
_SHRINK_ROWS: Final = 5_000
#: A batch with at least this many cache entries saves them packed in a transaction of their own
#: first (see ``_staged``), so the runs waiting for them go on before they are indexed and before
#: the lineage is written.
_SPLIT_ENTRIES: Final = 1_000
#: Saved entries are indexed this many a transaction (see ``Store._index``).
_INDEX_CHUNK: Final = 16_384
#: At most this many step runs go in one packed ``step_records`` row.
_MAX_PART: Final = 10_000
#: A batch of at least this many step runs and fewer than ``_SMALL_CACHE_KEYS`` keyed rows (cache
#: entries, drops, key components) commits with a page cache of ``_SMALL_CACHE_KIB``: its lineage
#: is a few long appended rows, and SQLite spills their dirty pages to the WAL (uncommitted frames,
#: ignored after a crash) instead of holding them all (15 MB at the end of a 100k-step run).
_SMALL_CACHE_STEPS: Final = 5_000
_SMALL_CACHE_KEYS: Final = 1_000
_SMALL_CACHE_KIB: Final = 2_048
#: Packed rows the lineage of one output reads by its outputs before it reads the whole run.
_TARGETED_READS: Final = 256
#: How long the writer holds lineage records nobody waits for yet (a run's "running" row, step
#: records) before committing them, so that they go in the same transaction as what comes next --
#: typically the run's end, which it waits for: one commit per short run instead of two. Cache
#: entries, a flush, a close or a call commit at once (a crash must lose as little as possible).
_LINGER_SECONDS: Final = 0.02
#: The writer wakes at most this many runs waiting for a commit per loop iteration.
_WAKE_CHUNK: Final = 16
_HOME_ENV: Final = "FLOWYML_HOME"
#: The write errors a store remembers for runs to report (older ones are only counted).
_ERROR_LOG: Final = 100
_HOST: Final = socket.gethostname()

_hexdigest = xxhash.xxh3_128_hexdigest


def resolve_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The store directory: ``cache_dir``, else ``$FLOWYML_HOME``, else ``./.flowyml``."""
    if cache_dir is not None and os.fspath(cache_dir) != "":
        chosen = Path(cache_dir)
    elif os.environ.get(_HOME_ENV):
        chosen = Path(os.environ[_HOME_ENV])
    else:
        chosen = Path.cwd() / ".flowyml"
    return chosen.expanduser().absolute()


# -- jobs for the writer ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Drop:
    key: str
    created_at: float


@dataclass(slots=True)
class _Call:
    """Run ``fn`` on the writer's connection between batches (used by clear_cache)."""

    fn: Callable[[aiosqlite.Connection], Awaitable[Any]]
    future: asyncio.Future[Any]


@dataclass(slots=True)
class _Flush:
    future: asyncio.Future[None]


@dataclass(slots=True)
class _Stop:
    pass


class _Wake:
    """Queued when records start piling up (they are not queued one by one): ``_WAKE`` for
    lineage, which may linger, ``_WAKE_NOW`` for cache entries, which commit at once."""


_WAKE: Final = _Wake()
_WAKE_NOW: Final = _Wake()

_Job = _Drop | RunRecord | _Call | _Flush | _Stop | _Wake


def _lingers(job: _Job) -> bool:
    """True for jobs the writer may hold up to ``_LINGER_SECONDS`` for more (lineage only)."""
    return job is _WAKE or isinstance(job, RunRecord)


#: A cache entry as the store holds it (put and not committed yet, or loaded into a view): flat and
#: of atoms only, so that the collector stops tracking it once it has seen it -- as objects, the
#: 100,000 entries of a run were 300,000 tracked objects, and every collection during the run
#: grew with them. ``key, step_name, run_id, duration, created_at``, then ``name, artifact_hash,
#: size, type_name, pickled bytes (or None: read the file)`` for each output. :func:`_entry_of`
#: makes the :class:`CacheEntry` a look-up returns, when it is asked for.
_Flat = tuple[Any, ...]
_HEAD: Final = 5
_OUT: Final = 5


def _entry_of(flat: _Flat) -> CacheEntry:
    """The record of a flat entry (see :data:`_Flat`)."""
    outputs = tuple(CachedOutput(*flat[i : i + _OUT]) for i in range(_HEAD, len(flat), _OUT))
    return CacheEntry(flat[0], flat[1], flat[3], flat[4], outputs, flat[2])


#: Steps waiting for the writer, flat, four items a step (no tuple per step for the GC to count):
#: ``run_id, fate, artifact hashes, shape`` from record_fate, ``None, record, None, None`` from
#: record_step.
_Pending = list[Any]


@dataclass(slots=True)
class _Batch:
    """The rows of one transaction, grouped by table."""

    drops: list[_Drop] = field(default_factory=list)
    puts: list[_Flat] = field(default_factory=list)
    #: The puts with an output too big to live inline: their files are written before the rows.
    files: list[_Flat] = field(default_factory=list)
    runs: dict[str, RunRecord] = field(default_factory=dict)
    steps: _Pending = field(default_factory=list)
    #: Key components, flat, four items a key: ``key, step name, created_at, parts``.
    parts: list[Any] = field(default_factory=list)
    #: ``Store._put_count`` when the puts were taken: every put up to it is in this batch or before.
    upto: int = 0

    def __bool__(self) -> bool:
        return bool(self.drops or self.puts or self.runs or self.steps or self.parts)


#: One encoder for every key's components: ``json.dumps`` with options makes a new one per call.
_encode_parts: Final = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode
_quote_ascii: Final = json.encoder.encode_basestring_ascii


def _dumps_parts(parts: Mapping[str, str]) -> str:
    """The components as a JSON object, keys sorted, exactly as :data:`_encode_parts` writes them.

    Joined by hand from the C string quoter: the encoder's per-call set-up was 2 us of the
    writer's ~7 us a put (100,000 puts: 0.2 s on the run's wall clock).
    """
    try:
        return (
            "{" + ",".join([_quote_ascii(k) + ":" + _quote_ascii(v) for k, v in sorted(parts.items())]) + "}"
        )
    except TypeError:  # a component that is not text: the encoder says what it makes of it
        return _encode_parts(parts if isinstance(parts, dict) else dict(parts))


def _loads_parts(text: str) -> dict[str, str]:
    """Components as stored; a damaged row reads as none (the reason then says "first run")."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return {}
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items()}


#: Types whose pickle is the same from ``pickle`` and ``cloudpickle`` (cloudpickle only differs
#: for what it pickles by value: functions, classes, modules) -- pickle skips making a Pickler
#: object, 0.3 us instead of 5 us for a small value. Containers are checked only when small: for
#: a large one the check would cost more than the Pickler saves.
_PLAIN_SCALARS: Final = frozenset({type(None), bool, int, float, complex, str, bytes})
_PLAIN_DEPTH: Final = 3
_PLAIN_ITEMS: Final = 32


def _plain(value: object, depth: int = _PLAIN_DEPTH) -> bool:
    """True for builtin scalars and small lists, tuples and dicts of them, ``depth`` levels deep."""
    kind = type(value)
    if kind in _PLAIN_SCALARS:
        return True
    if depth == 0 or kind not in (list, tuple, dict) or not isinstance(value, list | tuple | dict):
        return False
    if len(value) > _PLAIN_ITEMS:
        return False
    if isinstance(value, dict):
        return all(_plain(k, 0) and _plain(v, depth - 1) for k, v in value.items())
    return all(_plain(v, depth - 1) for v in value)


def _pickle(value: object) -> bytes:
    """The pickle of ``value`` that is cached: cloudpickle's, byte for byte."""
    if _plain(value):
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    data: bytes = cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return data


#: The pickle, digest and type name of the outputs too common to pickle each time (steps run for
#: their effect return None). Keyed by value, reached only for None and the two booleans.
_CONSTANTS: Final[dict[object, tuple[bytes, str, str]]] = {
    value: (data, xxhash.xxh3_128_hexdigest(data), type(value).__qualname__)
    for value in (None, True, False)
    for data in (pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL),)
}


class _Process:
    """This process's id, kept by a fork hook: the hot path asks it of every put, and
    ``os.getpid()`` is a system call each time."""

    pid = os.getpid()

    @classmethod
    def forked(cls) -> None:
        cls.pid = os.getpid()


_process = _Process
os.register_at_fork(after_in_child=_Process.forked)


def _type_name(value: object) -> str:
    cls = type(value)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


#: An entry's row, then its outputs' (one row an output, NULLs when it has none), and whether the
#: values are of the types their columns hold: checked by SQLite, not per value in Python.
_ENTRY_QUERY = """
SELECT e.key, e.step_name, e.run_id, e.duration_seconds, e.created_at, e.outputs,
       o.output_name, o.artifact_hash, o.size, o.type_name, o.inline,
       typeof(e.duration_seconds) IN ('real', 'integer') AND typeof(e.created_at) IN ('real', 'integer'),
       typeof(o.output_name) = 'text' AND typeof(o.artifact_hash) = 'text' AND typeof(o.size) = 'integer'
       AND typeof(o.type_name) = 'text' AND typeof(o.inline) IN ('blob', 'null')
FROM cache_entries AS e LEFT JOIN cache_outputs AS o ON o.key = e.key
WHERE {where}
ORDER BY e.key, o.position
"""


#: :meth:`Store.preload` reads a table in one pass when the run's steps own most of it: when it
#: holds at most this many entries per step (per entry the run loads, for the outputs). A pass
#: costs about a third of a B-tree probe per entry; past that, rows are read through the indexes.
_SCAN_SHARE: Final = 2

#: The head of each entry and each output (as in :data:`_ENTRY_QUERY`), read apart and joined in
#: Python: a joined read probed ``cache_outputs`` once per entry, and checking the types of the
#: values in SQL (``typeof``) cost more than checking them in Python.
_HEADS: Final = "SELECT key, step_name, run_id, duration_seconds, created_at, outputs FROM cache_entries"
_HEADS_OF_STEPS: Final = (
    "SELECT e.key, e.step_name, e.run_id, e.duration_seconds, e.created_at, e.outputs "
    "FROM json_each(?1) AS n JOIN cache_entries AS e ON e.step_name = n.value"
)
_OUTPUTS: Final = (
    "SELECT key, position, output_name, artifact_hash, size, type_name, inline FROM cache_outputs"
)
#: A SQL function true for the keys a preload chose, registered for one read (no key list to parse).
_CHOSEN: Final = "flowyml_chosen"
_OUTPUTS_OF_CHOSEN: Final = f"{_OUTPUTS} WHERE {_CHOSEN}(key)"
_OUTPUTS_OF_KEYS: Final = f"{_OUTPUTS} WHERE key IN (SELECT value FROM json_each(?1))"

_NUMBER: Final = (float, int)


def _recency(head: Sequence[Any]) -> tuple[Any, ...]:
    """How recent an entry is (the newest sorts first with ``reverse``): by creation time, then
    key; a creation time of the wrong type counts as newest, so that the row is read and dropped."""
    return (0, head[4], str(head[0])) if head[4].__class__ in _NUMBER else (1, 0.0, str(head[0]))


def _position(row: Sequence[Any]) -> Any:
    return row[1]


def _read_view(
    db: sqlite3.Connection, names: set[str], per_step: int, limit: int
) -> tuple[dict[str, _Flat], dict[str, tuple[str, float, str]], set[str] | None]:
    """What :meth:`Store.preload` reads, on the connection's thread: the ``per_step`` most recent
    entries of each step (flat), the broken ones among them (see :func:`_entries_from_rows`), and
    the other keys of those steps (None: more than ``limit`` keys in all)."""
    (total,) = db.execute("SELECT COUNT(*) FROM cache_entries").fetchone()
    scan = total <= _SCAN_SHARE * len(names)
    unread = set(names)  # steps no head of which was read yet
    chosen: dict[str, Any] = {}  # key -> head (see _join)
    more: list[Sequence[Any]] = []  # the heads of steps read before
    for head in db.execute(_HEADS) if scan else db.execute(_HEADS_OF_STEPS, (json.dumps(list(names)),)):
        step_name = head[1]
        if step_name in unread:
            unread.discard(step_name)
            chosen[head[0]] = head
        elif not scan or step_name in names:
            more.append(head)
    count = len(chosen) + len(more)
    others: list[Sequence[Any]] = []
    if per_step <= 0:
        others, chosen = [*chosen.values(), *more], {}
    elif more:  # steps with several entries keep their ``per_step`` newest
        groups: dict[str, list[Sequence[Any]]] = {}
        for head in more:
            groups.setdefault(head[1], []).append(head)
        for head in [h for h in chosen.values() if h[1] in groups]:  # the first head read of each
            groups[head[1]].append(head)
            del chosen[head[0]]
        for group in groups.values():
            group.sort(key=_recency, reverse=True)
            for head in group[:per_step]:
                chosen[head[0]] = head
            others += group[per_step:]
    known = {head[0] for head in others} if count <= limit else None
    if not chosen:
        return {}, {}, known
    filtered = len(chosen) < total and total <= _SCAN_SHARE * len(chosen)
    if len(chosen) == total:  # every entry of the index: every output row
        rows: Iterable[Sequence[Any]] = db.execute(_OUTPUTS)
    elif filtered:
        db.create_function(_CHOSEN, 1, chosen.__contains__, deterministic=True)
        rows = db.execute(_OUTPUTS_OF_CHOSEN)
    else:
        rows = db.execute(_OUTPUTS_OF_KEYS, (json.dumps(list(chosen)),))
    try:
        broken = _join(chosen, rows)
    finally:
        if filtered:
            db.create_function(_CHOSEN, 1, None)
    return chosen, broken, known


def _join(chosen: dict[str, Any], rows: Iterable[Sequence[Any]]) -> dict[str, tuple[str, float, str]]:
    """Make each head in ``chosen`` (key -> head) its flat entry, in place, from these output
    rows; the broken entries leave it, and are returned with why.

    In place, because the slot a head is found in is the one its entry goes in (a second dict
    of a million entries cost a random insert each). A head has six items, a flat entry
    ``_HEAD + _OUT * outputs``: never six.
    """
    several: dict[str, list[Sequence[Any]]] = {}  # the rows of entries not made on the way
    made = 0
    number, text = _NUMBER, str
    for row in rows:
        key = row[0]
        head = chosen.get(key)
        if head is None:
            continue
        if len(head) != 6:  # a second row of an entry made from one: made again below
            several[key] = [(key, -1, *head[_HEAD:])]
            chosen[key] = head = (*head[:_HEAD], 1)
            made -= 1
        elif (  # the common entry, one output inline, checked and made here
            head[5] == 1
            and head[3].__class__ in number
            and head[4].__class__ in number
            and row[2].__class__ is text
            and row[3].__class__ is text
            and row[4].__class__ is int
            and row[5].__class__ is text
            and row[6].__class__ is bytes
            and not (several and key in several)
        ):
            chosen[key] = (
                key,
                head[1],
                head[2],
                float(head[3]),
                head[4],
                row[2],
                row[3],
                row[4],
                row[5],
                row[6],
            )
            made += 1
            continue
        several.setdefault(key, []).append(row)
    broken: dict[str, tuple[str, float, str]] = {}
    if made == len(chosen):
        return broken
    for key, head in chosen.items():
        if len(head) != 6:
            continue
        parts = sorted(several.get(key, ()), key=_position)
        why = _broken(head, parts)
        if why is not None:
            broken[key] = (str(head[1]), head[4], why)
        else:
            chosen[key] = (
                key,
                head[1],
                head[2],
                float(head[3]),
                head[4],
                *(v for o in parts for v in o[2:7]),
            )
    for key in broken:
        del chosen[key]
    return broken


def _broken(head: Sequence[Any], outputs: Sequence[Sequence[Any]]) -> str | None:
    """Why an entry read by :func:`_read_view` cannot be served (its output rows in order), or None."""
    for o in outputs:
        if not (
            o[2].__class__ is str
            and o[3].__class__ is str
            and o[4].__class__ is int
            and o[5].__class__ is str
            and (o[6] is None or o[6].__class__ is bytes)
        ):
            return f"output row {o[2]!r} has values of the wrong type"
    expected = head[5]
    if (
        head[3].__class__ not in _NUMBER
        or head[4].__class__ not in _NUMBER
        or (expected is not None and expected.__class__ is not int)
    ):
        return "its row has values of the wrong type"
    if expected is not None and expected != len(outputs):
        return f"{expected - len(outputs)} of its {expected} output rows are missing"
    return None


def _entries_from_rows(
    rows: Iterable[sqlite3.Row | tuple[Any, ...]],
) -> tuple[dict[str, _Flat], dict[str, tuple[str, float, str]]]:
    """The entries of these rows of :data:`_ENTRY_QUERY` (in its order), and the broken ones:
    ``{key: (step, created_at, why)}``.

    An entry is broken when it has fewer output rows than it was written with (a dropped table,
    a damaged page) or a row of the wrong types: it is a miss, dropped and recomputed.
    """
    entries: dict[str, _Flat] = {}
    broken: dict[str, tuple[str, float, str]] = {}
    head: Sequence[Any] = ()
    outputs: list[Any] = []  # flat: five items an output

    def finish() -> None:
        key, step_name, run_id, duration, created_at, expected = head[:6]
        if key in broken:
            return
        if not head[11]:
            broken[key] = (str(step_name), created_at, "its row has values of the wrong type")
        elif expected is not None and expected * _OUT != len(outputs):
            missing = f"{expected - len(outputs) // _OUT} of its {expected} output rows are missing"
            broken[key] = (str(step_name), created_at, missing)
        else:
            entries[key] = (key, step_name, run_id, float(duration), created_at, *outputs)

    for row in rows:
        if not head or row[0] != head[0]:
            if head:
                finish()
            head, outputs = row, []
        if row[6] is not None:
            if row[12]:
                outputs += row[6:11]
            else:
                broken[row[0]] = (str(row[1]), row[4], f"output row {row[6]!r} has values of the wrong type")
    if head:
        finish()
    return entries, broken


def _unpack_part(packed: object, times: object) -> list[_packed.Unpacked]:
    """The rows of one packed ``step_records`` row, its columns' types and lengths checked."""
    if not isinstance(packed, str) or not isinstance(times, bytes):
        raise TypeError("its columns hold values of the wrong type")
    if len(times) % 24:
        raise ValueError(f"its times blob has {len(times)} bytes, not a multiple of 24")
    rows = _packed.unpack(packed, times)
    for row, *_ in rows:
        if not isinstance(row, list) or len(row) < 4 or not isinstance(row[0], str):
            raise TypeError("a step row is not an array starting with the step's name")
        if not isinstance(row[3], dict):
            raise TypeError("outputs are not a mapping of names to hashes")
    return rows


def _checked_record(run_id: str, unpacked: _packed.Unpacked) -> StepRecord:
    """The record of one unpacked row, after checking the types of what readers rely on.

    Raises:
        ValueError, TypeError: the row is damaged.
    """
    record = _packed.record(run_id, unpacked)
    if not (isinstance(record.step_name, str) and isinstance(record.status, str)):
        raise TypeError("a step name or status is not text")
    outputs = record.outputs
    if not isinstance(outputs, dict) or not all(
        isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in outputs.items()
    ):
        raise TypeError("outputs are not a mapping of names to hashes")
    if not isinstance(record.attempts, int):
        raise TypeError("attempts is not a number")
    return record


class _LazyRecords(Mapping[str, StepRecord]):
    """The step records of the packed rows read so far, each made (and checked) when first asked for.

    Reading one output of a 100,000-step run parses the row holding it (a single JSON parse) and
    makes records only for the steps its lineage reaches, not for the 10,000 steps of the row.
    """

    def __init__(self, run_id: str) -> None:
        self._run_id = run_id
        self._rows: dict[str, tuple[int, _packed.Unpacked]] = {}
        self._made: dict[str, StepRecord] = {}
        self.producers: dict[str, str] = {}
        """Output name -> the first step whose record names it."""

    def add(self, row_id: int, rows: list[_packed.Unpacked]) -> None:
        for unpacked in rows:
            name = unpacked[0][0]
            held = self._rows.get(name)
            if held is None or held[0] < row_id:  # the last record of a step wins
                self._rows[name] = (row_id, unpacked)
                self._made.pop(name, None)
                for output in unpacked[0][3]:
                    self.producers.setdefault(output, name)

    def __getitem__(self, name: str) -> StepRecord:
        made = self._made.get(name)
        if made is None:
            made = self._made[name] = _checked_record(self._run_id, self._rows[name][1])
        return made

    def __contains__(self, name: object) -> bool:
        return name in self._rows

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)


_RUN_COLUMNS = (
    "run_id, pipeline_name, status, started_at, ended_at, duration_seconds, time_saved_seconds, error_message"
)
_RUN_READ = _RUN_COLUMNS + ", pid, host"

_RUN_TYPES: Final[tuple[Any, ...]] = (
    str,
    str,
    str,
    float,
    (float, type(None)),
    (float, type(None)),
    float,
    (str, type(None)),
)


def _process_gone(pid: object, host: object) -> bool:
    """True when the process ``pid`` on ``host`` is known not to be running (only on this host)."""
    return isinstance(pid, int) and host == _HOST and process_gone(pid)


def _run_from_row(row: Sequence[Any]) -> RunRecord:
    """A run from its row; a run still ``running`` whose process is gone is ``interrupted``.

    Raises:
        ValueError: the row is damaged (a value of the wrong type).
    """
    values = list(row[:8])
    for i in (3, 4, 5, 6):
        if isinstance(values[i], int) and not isinstance(values[i], bool):
            values[i] = float(values[i])
    for value, kind in zip(values, _RUN_TYPES, strict=True):
        if not isinstance(value, kind):
            raise ValueError(f"run {values[0]!r}: {value!r} is not of the type its column holds")
    if values[2] == "running" and len(row) > 8 and _process_gone(row[8], row[9]):
        values[2] = "interrupted"
    return RunRecord(*values)


_UPSERT_RUN = (
    f"INSERT INTO runs ({_RUN_READ}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (run_id) DO UPDATE SET pipeline_name = excluded.pipeline_name, "
    "status = excluded.status, started_at = excluded.started_at, ended_at = excluded.ended_at, "
    "duration_seconds = excluded.duration_seconds, time_saved_seconds = excluded.time_saved_seconds, "
    "error_message = excluded.error_message, pid = excluded.pid, host = excluded.host"
)


class _PartRows:
    """The ``step_records`` rows of a batch's steps, made one part at a time as SQLite takes them.

    Built all at once, the rows of 100,000 steps (each step's row text, then each part's joined
    columns) were the peak of a run's memory. Iterating again (a retry after a locked database)
    makes the same rows again from the same steps. ``count`` is the number of rows made so far.
    """

    __slots__ = ("_steps", "count")

    def __init__(self, steps: _Pending) -> None:
        self._steps = steps
        self.count = 0

    def __bool__(self) -> bool:
        return bool(self._steps)

    def __iter__(self) -> Iterator[tuple[str, str, bytes, str, str | None]]:
        self.count = 0
        parts: dict[str, _packed.Part] = {}
        pending = iter(self._steps)
        for run_id, fate, hashes, shape in zip(pending, pending, pending, pending, strict=True):
            record_id = fate.run_id if run_id is None else run_id
            part = parts.get(record_id)
            if part is None or len(part) >= _MAX_PART:
                if part is not None:
                    # The part's rows go before SQLite takes their text: one copy of it alive.
                    columns = part.columns()
                    part = parts[record_id] = _packed.Part()
                    self.count += 1
                    yield (record_id, *columns)
                    del columns
                else:
                    part = parts[record_id] = _packed.Part()
            if run_id is None:
                part.add_record(fate)
            else:
                part.add_fate(fate, hashes, shape)
        for record_id in list(parts):
            columns = parts.pop(record_id).columns()
            self.count += 1
            yield (record_id, *columns)
            del columns


class _Lazy:
    """Rows made by ``make`` as SQLite takes them, again at each iteration (a retry after a locked
    database); ``count`` is the number of rows (at most that many, for the artifacts: equal ones
    are written once), ``bool`` whether there may be any."""

    __slots__ = ("_make", "count")

    def __init__(self, make: Callable[[], Iterator[tuple[Any, ...]]], count: int) -> None:
        self._make = make
        self.count = count

    def __bool__(self) -> bool:
        return self.count > 0

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return self._make()


_at_key: Final = itemgetter(0)
_at_step_name: Final = itemgetter(1)
_at_run_id: Final = itemgetter(2)
_at_duration: Final = itemgetter(3)
_at_created_at: Final = itemgetter(4)
_at_output_name: Final = itemgetter(_HEAD)
_at_digest: Final = itemgetter(_HEAD + 1)
_at_size: Final = itemgetter(_HEAD + 2)
_at_type_name: Final = itemgetter(_HEAD + 3)
_at_data: Final = itemgetter(_HEAD + 4)


class _BatchRows:
    """The rows of one batch and the transaction writing them; runs on the connection's thread."""

    def __init__(self, batch: _Batch) -> None:
        self._batch = batch
        self._built: list[tuple[str, Sequence[tuple[Any, ...]] | _PartRows | _Lazy]] | None = None
        #: The ``staged_entries`` rows this batch's transaction deletes (it indexes their entries).
        self.staged: list[int] = []

    def release(self) -> None:
        """Drop the batch and its rows (the transaction is over)."""
        self._batch = _Batch()
        self._built = None

    def _build(self) -> list[tuple[str, Sequence[tuple[Any, ...]] | _PartRows | _Lazy]]:
        batch = self._batch
        now = time.time()
        # The last put of each key (two of one key made the batch fail on cache_outputs' primary
        # key, losing all of it), in key order: random keys inserted in order touch each B-tree
        # page once (a third less SQLite time for 100,000 puts into an empty store).
        puts = sorted(dict(zip(map(_at_key, batch.puts), batch.puts, strict=True)).values(), key=_at_key)
        # The components of a key put in this batch go in its entry's row; the others (no entry:
        # the step failed, or its outputs were not cached) in cache_key_parts.
        flat = iter(batch.parts)
        components = {
            key: (step_name, created_at, parts)
            for key, step_name, created_at, parts in zip(flat, flat, flat, flat, strict=True)
        }

        def encoded(key: str) -> str | None:
            held = components.get(key)
            return None if held is None else _dumps_parts(held[2])

        # The rows of the puts are made as SQLite takes them (a retry makes them again): a list of
        # each was ~40 MB alive at once for 100,000 puts, on top of the puts themselves. When every
        # put has one inline output (the common case), they are zipped from the puts by C
        # iterators: a Python generator per table was a third of the commit's time.
        single = (
            bool(puts)
            and min(map(len, puts)) == max(map(len, puts)) == _HEAD + _OUT
            and max(map(_at_size, puts)) <= INLINE_LIMIT
        )
        outputs = sum(map(len, puts)) // _OUT - len(puts) if puts else 0

        def artifact_rows() -> Iterator[tuple[Any, ...]]:
            # One row per distinct artifact: equal values (None, small numbers, flags) are common,
            # and a row per output was an index probe per put that found the artifact there already.
            if single:
                # The first put of each artifact names its producer, as put (not in key order).
                given = batch.puts
                first = dict(zip(map(_at_digest, reversed(given)), reversed(given), strict=True)).values()
                return zip(
                    map(_at_digest, first),
                    map(_at_size, first),
                    map(_at_type_name, first),
                    map(_at_run_id, first),
                    map(_at_step_name, first),
                    itertools.repeat(now),
                    strict=False,
                )
            return artifacts_of_any()

        def artifacts_of_any() -> Iterator[tuple[Any, ...]]:
            seen: set[str] = set()
            for e in batch.puts:
                for at in range(_HEAD, len(e), _OUT):
                    digest = e[at + 1]
                    if digest not in seen:
                        seen.add(digest)
                        yield (digest, e[at + 2], e[at + 3], e[2], e[1], now)

        def delete_rows() -> Iterator[tuple[Any, ...]]:
            return zip(map(_at_key, puts))

        def entry_rows() -> Iterator[tuple[Any, ...]]:
            return zip(
                map(_at_key, puts),
                map(_at_step_name, puts),
                map(_at_run_id, puts),
                map(_at_duration, puts),
                map(_at_created_at, puts),
                map(len, puts),
                map(encoded, map(_at_key, puts)),
                strict=True,
            )

        def output_rows() -> Iterator[tuple[Any, ...]]:
            if single:
                return zip(
                    map(_at_key, puts),
                    itertools.repeat(0),
                    map(_at_output_name, puts),
                    map(_at_digest, puts),
                    map(_at_size, puts),
                    map(_at_type_name, puts),
                    map(_at_data, puts),
                    strict=False,
                )
            return outputs_of_any()

        def outputs_of_any() -> Iterator[tuple[Any, ...]]:
            for e in puts:
                key = e[0]
                for position, at in enumerate(range(_HEAD, len(e), _OUT)):
                    name, digest, size, type_name, data = e[at : at + _OUT]
                    yield (
                        key,
                        position,
                        name,
                        digest,
                        size,
                        type_name,
                        data if size <= INLINE_LIMIT else None,
                    )

        put_keys = {e[0] for e in puts} if components else set()
        key_parts = sum(1 for key in components if key not in put_keys)

        def key_part_rows() -> Iterator[tuple[Any, ...]]:
            for key, (step_name, created_at, parts) in components.items():
                if key not in put_keys:
                    yield (key, step_name, created_at, _dumps_parts(parts))

        part_rows = _PartRows(batch.steps)
        drop_rows = [(d.key, d.created_at) for d in batch.drops]
        return [
            # A dropped entry's key keeps its components: the next miss still says what changed.
            (
                "INSERT OR IGNORE INTO cache_key_parts (key, step_name, created_at, parts) "
                "SELECT key, step_name, created_at, parts FROM cache_entries "
                "WHERE key = ? AND created_at = ? AND parts IS NOT NULL",
                drop_rows,
            ),
            (
                "DELETE FROM cache_outputs WHERE key = ?1 AND EXISTS "
                "(SELECT 1 FROM cache_entries WHERE key = ?1 AND created_at = ?2)",
                drop_rows,
            ),
            ("DELETE FROM cache_entries WHERE key = ? AND created_at = ?", drop_rows),
            (
                "INSERT INTO artifacts (hash, size, type_name, producer_run_id, producer_step, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (hash) DO NOTHING",
                _Lazy(artifact_rows, len(puts)),
            ),
            ("DELETE FROM cache_outputs WHERE key = ?", _Lazy(delete_rows, len(puts))),
            (
                "INSERT INTO cache_entries (key, step_name, run_id, duration_seconds, created_at, outputs, parts) "
                f"VALUES (?, ?, ?, ?, ?, (? - {_HEAD}) / {_OUT}, ?) ON CONFLICT (key) DO UPDATE SET step_name = excluded.step_name, "
                "run_id = excluded.run_id, duration_seconds = excluded.duration_seconds, "
                "created_at = excluded.created_at, outputs = excluded.outputs, "
                "parts = COALESCE(excluded.parts, cache_entries.parts)",
                _Lazy(entry_rows, len(puts)),
            ),
            (
                "INSERT INTO cache_outputs (key, position, output_name, artifact_hash, size, type_name, inline) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                _Lazy(output_rows, outputs),
            ),
            (_UPSERT_RUN, [_run_row(r) for r in batch.runs.values()]),
            (
                "INSERT INTO step_records (run_id, steps, times, outputs, hits) VALUES (?, ?, ?, ?, ?)",
                part_rows,
            ),
            (
                "INSERT OR REPLACE INTO cache_key_parts (key, step_name, created_at, parts) VALUES (?, ?, ?, ?)",
                _Lazy(key_part_rows, key_parts),
            ),
            ("DELETE FROM staged_entries WHERE id = ?", [(row_id,) for row_id in self.staged]),
        ]

    def commit(self, db: sqlite3.Connection) -> None:
        """Write the batch in one ``BEGIN IMMEDIATE`` transaction, or nothing of it."""
        batch = self._batch
        keyed = len(batch.puts) + len(batch.drops) + len(batch.parts) // 4
        small = len(batch.steps) // 4 >= _SMALL_CACHE_STEPS and keyed < _SMALL_CACHE_KEYS
        if small:
            db.execute(f"PRAGMA cache_size = -{_SMALL_CACHE_KIB}")
        try:
            with _db.immediate(db):
                self.write(db)
        finally:
            if small:
                with contextlib.suppress(sqlite3.Error):
                    db.execute(f"PRAGMA cache_size = -{_db.CACHE_KIB}")
        assert self._built is not None
        written = sum(
            rows.count if isinstance(rows, _PartRows | _Lazy) else len(rows) for _, rows in self._built
        )
        if written >= _SHRINK_ROWS:
            # A large batch grew the page cache (up to _db.CACHE_KIB): hand it back, so a
            # process-long store does not keep it after the run.
            with contextlib.suppress(sqlite3.Error):
                db.execute("PRAGMA shrink_memory")

    def write(self, db: sqlite3.Connection) -> None:
        """Run the batch's statements in the transaction the caller began."""
        if self._built is None:
            self._built = self._build()  # once: a retry after a locked database reuses the rows
        for statement, rows in self._built:
            if rows:
                db.executemany(statement, rows)


def _merge_staged(db: sqlite3.Connection, files: ArtifactFiles) -> list[str]:
    """Index the staged entries of processes that are gone (killed between saving and indexing
    them); returns the rows found damaged (dropped: a cache entry lost is a miss).

    An entry the index already holds as recent or more is not replaced, and one whose artifact
    file is gone (collected meanwhile) is left out: what is indexed is whole.
    """
    heads = db.execute("SELECT id, pid, host FROM staged_entries").fetchall()
    gone = [row_id for row_id, pid, host in heads if _process_gone(pid, host)]
    if not gone:
        return []
    with _db.immediate(db):
        puts: list[_Flat] = []
        parts: list[Any] = []
        taken: list[int] = []
        damaged: list[str] = []
        for row_id in gone:
            row = db.execute("SELECT entries FROM staged_entries WHERE id = ?", (row_id,)).fetchone()
            if row is None:
                continue  # another store merged it meanwhile
            taken.append(row_id)
            unpacked = _staged.unpack(row[0])
            if unpacked is None:
                damaged.append(f"staged_entries row {row_id}: not packed cache entries (dropped)")
                continue
            puts += unpacked[0]
            parts += unpacked[1]
        latest: dict[str, _Flat] = {}
        for put in puts:  # of one key saved twice (two gone processes), the newer
            held = latest.get(put[0])
            if held is None or held[4] <= put[4]:
                latest[put[0]] = put
        puts = list(latest.values())
        newer = dict(
            db.execute(
                "SELECT key, created_at FROM cache_entries WHERE key IN (SELECT value FROM json_each(?))",
                (json.dumps([put[0] for put in puts]),),
            ).fetchall()
        )

        def whole(put: _Flat) -> bool:
            if newer.get(put[0], -1.0) >= put[4]:
                return False
            return all(
                put[at + 2] <= INLINE_LIMIT or (is_hash(put[at + 1]) and files.path(put[at + 1]).is_file())
                for at in range(_HEAD, len(put), _OUT)
            )

        kept = [put for put in puts if whole(put)]
        # Only the components of the entries indexed: others may be older than what it holds.
        made = {put[0]: put[4] for put in kept}
        kept_parts: list[Any] = []
        flat = iter(parts)
        for item in zip(flat, flat, flat, flat, strict=True):
            if made.get(item[0]) == item[2]:
                kept_parts += item
        rows = _BatchRows(_Batch(puts=kept, parts=kept_parts))
        rows.staged = taken
        rows.write(db)
    return damaged


class _Unindexed(Exception):
    """A batch's cache entries were saved (staged) and indexing them failed: ``left`` is what is
    not indexed yet, ``staged`` the rows that hold it."""

    def __init__(self, staged: list[int], cause: BaseException, left: _Batch) -> None:
        super().__init__(str(cause))
        self.staged = staged
        self.cause = cause
        self.left = left


def _chunks(batch: _Batch, size: int) -> list[_Batch]:
    """``batch``'s puts in batches of ``size``, each with the components of its keys; the first
    has the drops (queued before the puts), the last the components of keys put in none."""
    if len(batch.puts) <= size:
        return [batch]
    chunks = [_Batch(puts=batch.puts[at : at + size]) for at in range(0, len(batch.puts), size)]
    chunks[0].drops = batch.drops
    where = {put[0]: at for at, chunk in enumerate(chunks) for put in chunk.puts}
    flat = iter(batch.parts)
    for item in zip(flat, flat, flat, flat, strict=True):
        chunks[where.get(item[0], -1)].parts += item
    return chunks


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def _shrink_memory(conn: aiosqlite.Connection) -> None:
    with contextlib.suppress(sqlite3.Error, ValueError):
        await _db.on_thread(conn, lambda db: db.execute("PRAGMA shrink_memory"))


def _run_row(r: RunRecord) -> tuple[Any, ...]:
    return (
        r.run_id,
        r.pipeline_name,
        r.status,
        r.started_at,
        r.ended_at,
        r.duration_seconds,
        r.time_saved_seconds,
        r.error_message,
        os.getpid(),
        _HOST,
    )


class CacheView:
    """What one run read of the cache index when it began; made by :meth:`Store.preload`.

    ``entries`` holds the most recent entries of the run's steps (what an unchanged rerun hits)
    and the entries its look-ups found since, by key, flat (see ``_Flat``: no object per entry
    until it is looked up). ``keys`` holds every other key the index had for those steps, plus
    the keys this process committed since (None: too many to hold, so every miss asks the
    database). A key in neither is a miss without a query (an entry dropped from ``entries`` as
    corrupt or cleared is then a miss, as it should be): an entry another process
    committed after the read is at worst computed again, as a cache may. The view lives as long
    as the run that holds it, so what it loaded is freed with the run.
    """

    __slots__ = ("__weakref__", "entries", "keys")

    def __init__(self, entries: dict[str, _Flat], keys: set[str] | None) -> None:
        self.entries = entries
        self.keys = keys


class Store:
    """The cache and lineage store of one directory. Create it with ``await Store.open(root)``.

    One store object belongs to one event loop and one process. Writes are queued and committed in
    the background; call :meth:`flush` to wait for them and :meth:`aclose` (or ``async with``) to
    finish. Pipelines share one store per directory (see ``_registry``).

    ``read_only`` is True for a store this process may not write (a directory 0o500 with files
    0o400): look-ups and loads work, every write is left out.
    """

    root: Path
    read_only: bool

    def __init__(
        self,
        root: Path,
        conn: aiosqlite.Connection,
        files: ArtifactFiles,
        *,
        read_only: bool = False,
        recover: bool = False,
    ) -> None:
        """Private: use :meth:`open` (``recover``: index what killed processes left saved first)."""
        self.root = root
        self._db_path = root / _db.DB_NAME
        self.read_only = read_only
        self.pid = _process.pid
        self._conn = conn
        self._files = files
        self._error_log: deque[tuple[int, StoreError]] = deque(maxlen=_ERROR_LOG)
        self._error_count = 0
        #: Rows found damaged while reading (for the command line to report), cleared by the reader.
        self.damaged: list[str] = []
        #: Write transactions committed so far (batches; each holds the records of every run queued).
        self.commits = 0
        self._release_task: asyncio.Task[None] | None = None
        #: Called once with the store when it has closed (the registry forgets it then).
        self.on_release: Callable[[Store], None] | None = None
        #: Entries put and not committed yet (kept after a failed commit: their values are right).
        #: Committed entries leave it: a run reads them through its :class:`CacheView`.
        self._memory: dict[str, _Flat] = {}
        self._unsaved: set[str] = set()  # keys put and not yet committed
        self._views: weakref.WeakSet[CacheView] = weakref.WeakSet()
        # Entries found corrupt whose index rows are not deleted yet: never serve them again.
        self._dropped: dict[str, float] = {}
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._waiting: dict[str, asyncio.Future[_Flat | None]] = {}
        self._fetcher: asyncio.Task[None] | None = None
        self._closed = False  # no more writes accepted
        self._released = False  # connection closed and threads joined (or being)
        self._errors: list[BaseException] = []
        self._steps: _Pending = []
        self._puts: list[_Flat] = []  # put, not yet taken by the writer
        self._file_puts: list[_Flat] = []  # those of them with an output for a file
        self._parts: list[Any] = []  # key components, flat (see _Batch.parts)
        self._taken: _Batch | None = None  # the batch being committed (kept for a cancelled writer)
        self._held: list[_Job] = []  # jobs the writer took and has not handed to _process yet
        # Runs recorded and not yet taken by the writer (the latest record of each), and whether a
        # wake-up is queued for them and the steps: one per batch, not one per record.
        self._runs: dict[str, RunRecord] = {}
        self._awake = False
        self._awake_now = False
        # Puts made so far, and the count the last committed batch of puts covered: a run waits
        # for its entries (settle) until the second reaches what the first was when it ended.
        self._put_count = 0
        self._committed_upto = 0
        self._entry_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._checkpoint_due = False  # committed since the WAL was last checkpointed
        #: Batches whose entries were saved and whose index transaction failed, with their rows.
        self._unindexed: list[tuple[list[int], _Batch]] = []
        self._recover = recover and not read_only
        self._writer = asyncio.get_running_loop().create_task(self._run_writer(), name="flowyml-store-writer")
        self._writer.add_done_callback(self._on_writer_done)

    # -- lifecycle ---------------------------------------------------------------------------------

    @classmethod
    async def open(cls, root: str | os.PathLike[str] | None = None, *, create: bool = True) -> Store:
        """Open the store at ``root`` (see :func:`resolve_root`), creating it unless ``create=False``.

        ``create=False`` is for readers (the command line): the store must exist with this
        flowyml's schema, and opening writes nothing -- so it never waits for another process's
        write lock. Writes made through such a store (``clear_cache``) still work.

        Raises:
            StoreError: the store does not exist (or is not up to date) and ``create`` is False,
                the write lock needed to create or migrate it stayed held by another process past
                ``_db.LOCK_DEADLINE_SECONDS``, or it cannot be used.
        """
        path = resolve_root(root)
        from ._registry import settle_shared

        await settle_shared(path)  # what this process's runs recorded is there for this reader
        files = ArtifactFiles(path)
        _db.check_files(path)  # before anything is created, read or cleaned
        if not create:
            # Touches nothing: no folder made, no temporary file cleaned, no schema written.
            if not (path / _db.DB_NAME).is_file():
                raise StoreError(f"no flowyml store at {path}")
        elif not path.is_dir() or _db.writable(path):
            try:
                if not path.is_dir():
                    make_private_dir(path)
                files.prepare()
                _db.check_files(path)  # what prepare made, or found made meanwhile
            except OSError as exc:
                raise StoreError(f"cannot create the flowyml store at {path}: {exc}") from exc
        try:
            conn, read_only = await _db.connect(path, create=create)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the flowyml store at {path}: {exc}") from exc
        if read_only and create:
            warnings.warn(
                StoreWarning(
                    f"the flowyml store at {path} is read-only for you: cache hits are served from it, "
                    "but nothing new is cached or recorded."
                ),
                stacklevel=2,
            )
        return cls(path, conn, files, read_only=read_only, recover=create)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` has started."""
        return self._closed

    async def aclose(self) -> None:
        """Commit everything queued, close the database and join every thread the store started.

        Raises:
            StoreError: some queued writes could not be committed (they are lost).
        """
        if self._released:
            task = self._release_task
            if task is not None and not task.done():
                await asyncio.wait([task])
            return
        self._released = True
        self._closed = True
        if self.pid != os.getpid():
            return  # a forked child: the connection is the parent's; never touch it
        if not self._writer.done():
            self._queue.put_nowait(_Stop())
            try:
                await asyncio.shield(self._writer)
            except asyncio.CancelledError:
                if not self._writer.done():
                    # Cancelled while draining: finish closing once the writer is done.
                    self._writer.add_done_callback(lambda _: asyncio.ensure_future(self._release()))
                    raise
        await self._release()
        self._raise_errors()

    def abandon(self) -> None:
        """Stop the store without its event loop (at interpreter exit, the loop gone): close the files.

        Queued writes are lost (runs wait for theirs, so only records of runs that never returned
        are); the database stays consistent (WAL).
        """
        if self._released or self.pid != os.getpid():
            return
        self._released = self._closed = True
        with contextlib.suppress(Exception):
            raw = self._conn._conn
            raw.close()
        self._files.shutdown()
        self._released_hook()

    def _released_hook(self) -> None:
        hook, self.on_release = self.on_release, None
        if hook is not None:
            hook(self)

    async def _release(self) -> None:
        for task in (self._fetcher,):
            if task is not None:
                with contextlib.suppress(BaseException):
                    await task
        try:
            await _db.close(self._conn)
        finally:
            self._files.shutdown()
            self._released_hook()

    def _raise_errors(self) -> None:
        if self._errors:
            first = self._errors[0]
            count = len(self._errors)
            self._errors.clear()
            raise StoreError(
                f"{count} write batch(es) to the flowyml store at {self.root} failed; "
                f"their cache entries and records are lost: {first!r}"
            ) from first

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the flowyml store at {self.root} is closed")
        if self.pid != _process.pid:
            self._closed = True
            raise StoreError(
                f"the flowyml store at {self.root} was opened by process {self.pid}; a forked process "
                "opens its own (a run there does so by itself)"
            )

    def _log_error(self, exc: BaseException) -> None:
        """Remember a write or read failure for :meth:`flush` / :meth:`aclose` and for :meth:`settle`."""
        self._errors.append(exc)
        self._error_count += 1
        error = exc if isinstance(exc, StoreError) else StoreError(f"{self.root}: {exc!r}")
        if error is not exc:
            error.__cause__ = exc
        self._error_log.append((self._error_count, error))

    def error_mark(self) -> int:
        """A mark for :meth:`settle`: errors logged after it are the ones a run reports."""
        return self._error_count

    async def settle(self, mark: int, *, wait: bool = True) -> tuple[StoreError, ...]:
        """Wait for what is queued to commit; the write errors logged since ``mark``.

        This is how a run ends with a shared store: it reports what could not be written instead
        of raising, so a run's results are never lost to the store. With ``wait`` it waits for
        every record (committed with those of every other run queued meanwhile, in one
        transaction). Otherwise it waits only while cache entries are waiting to be written (a
        put that fails is reported on the run that made it): the writer then commits them in a
        transaction of their own -- many of them saved packed, indexed after (see ``_staged``) --
        and lets the run go before it commits the lineage queued with them. Lineage alone is
        not waited for: the writer commits it within ``_LINGER_SECONDS``, together with the
        next runs' -- waiting for a commit per run cost a short run several times its own time.
        Errors reported here are not raised again by :meth:`flush` or :meth:`aclose`.
        """
        if not self._closed and self.pid == os.getpid():
            future: asyncio.Future[None] | None = None
            if wait:
                future = asyncio.get_running_loop().create_future()
                self._queue.put_nowait(_Flush(future))
            elif self._committed_upto < self._put_count:
                future = asyncio.get_running_loop().create_future()
                self._entry_waiters.append((self._put_count, future))
                self._wake_now()
            if future is not None:
                with contextlib.suppress(StoreError):
                    await future
        found = tuple(error for count, error in self._error_log if count > mark)
        reported = {id(error.__cause__) for error in found} | {id(error) for error in found}
        self._errors[:] = [exc for exc in self._errors if id(exc) not in reported]
        return found

    # -- the hot path: look-ups, loads, puts ---------------------------------------------------------

    async def preload(self, step_names: Iterable[str], *, per_step: int = PRELOAD_PER_STEP) -> CacheView:
        """What a run of these steps needs of the index, in one call on the connection's thread.

        The ``per_step`` most recent entries (with inline values) of each step -- what an
        unchanged rerun hits, the same however many entries the steps have -- and the keys of
        all their entries, so that a key the index lacks is a miss without a query. Pass the view
        to :meth:`lookup`; it is freed with the run that holds it.
        """
        self._check_open()
        names = set(step_names)  # not sorted: 0.7 s for a million names, and no read needs an order
        view = CacheView({}, set())
        if not names:
            return view
        limit = KNOWN_KEYS_BASE + KNOWN_KEYS_PER_STEP * len(names)
        try:
            entries, broken, others = await _db.on_thread(
                self._conn, lambda db: _read_view(db, names, per_step, limit)
            )
        except sqlite3.DatabaseError as exc:
            # Damaged pages or the like: no preloaded hits, each look-up asks (and may miss).
            self._log_error(
                StoreError(f"reading the cache index of the flowyml store at {self.root} failed: {exc}")
            )
            view.keys = None
            return view
        self._drop_broken(broken)
        dropped = self._dropped
        if dropped:
            entries = {k: e for k, e in entries.items() if dropped.get(k) != e[4]}
        view.entries = entries
        # The keys of loaded entries are in ``entries`` already: a rerun's set stays small.
        view.keys = others
        self._views.add(view)
        return view

    def _drop_broken(self, broken: Mapping[str, tuple[str, float, str]]) -> None:
        """Entries with missing or damaged output rows: a miss, dropped so the step runs again."""
        for key, (step_name, created_at, why) in broken.items():
            if self._dropped.get(key) == created_at:
                continue
            self._forget(key)
            if not self._closed and not self.read_only:
                self._dropped[key] = created_at
                self._queue.put_nowait(_Drop(key, created_at))
            warnings.warn(
                CacheCorruptionWarning(
                    f"cache entry {key} of step {step_name!r} in the flowyml store at {self.root}: {why}; "
                    "the entry was dropped and the step will run again."
                ),
                stacklevel=4,
            )

    async def lookup(
        self, key: str, *, query: bool = True, view: CacheView | None = None
    ) -> CacheEntry | None:
        """The cache entry of ``key``, or None.

        Served from memory when the entry was put and not committed yet, or from ``view`` (see
        :meth:`preload`) when it was preloaded or found before; a key the view knows the index
        lacks is a miss at once. Otherwise, unless ``query`` is False, asks the database once
        (misses arriving together share one query).
        """
        flat = self._memory.get(key)
        if flat is not None:
            return _entry_of(flat)
        if view is not None:
            flat = view.entries.get(key)
            if flat is not None:
                return _entry_of(flat)
            if view.keys is not None and key not in view.keys:
                return None
        if not query:
            return None
        self._check_open()
        future = self._waiting.get(key)
        if future is None:
            future = self._waiting[key] = asyncio.get_running_loop().create_future()
            if self._fetcher is None:
                self._fetcher = asyncio.get_running_loop().create_task(self._fetch_waiting())
        # Shielded: one cancelled caller must not cancel the answer others wait for.
        flat = await asyncio.shield(future)
        if flat is None:
            return None
        if view is not None and key not in self._memory:
            view.entries[key] = flat
        return _entry_of(flat)

    def absent(self, key: str, view: CacheView | None) -> bool:
        """True when ``key`` is known to have no entry without asking the database: not held in
        memory, and ``view`` knows the index lacks it (what :meth:`lookup` answers at once)."""
        return (
            view is not None
            and view.keys is not None
            and key not in view.keys
            and key not in self._memory
            and key not in view.entries
        )

    def inline_hit(
        self, key: str, view: CacheView | None
    ) -> tuple[dict[str, Any], float, dict[str, str]] | None:
        """A hit served at once from an entry held in memory or ``view`` whose outputs are all
        inline: its outputs by name, the duration that made them and their artifact hashes.

        Every blob's length and xxh3-128 are checked before it is unpickled, as :meth:`load`
        checks them; no record object is made. None when the entry is not held here, has an
        output in a file, or anything about it is wrong: then :meth:`lookup` and :meth:`load`
        decide (and report a corrupt entry), so this path never hides one.
        """
        flat = self._memory.get(key)
        if flat is None:
            if view is None:
                return None
            flat = view.entries.get(key)
            if flat is None:
                return None
        if len(flat) == _HEAD + _OUT:  # one output: no loop, no slices
            data = flat[9]
            if data is None or len(data) != flat[7] or _hexdigest(data) != flat[6]:
                return None
            try:
                value = cloudpickle.loads(data)
            except Exception:
                return None
            return {flat[5]: value}, flat[3], {flat[5]: flat[6]}
        values: dict[str, Any] = {}
        hashes: dict[str, str] = {}
        for i in range(_HEAD, len(flat), _OUT):
            name, digest, size, _type, data = flat[i : i + _OUT]
            if data is None or len(data) != size or _hexdigest(data) != digest:
                return None
            try:
                values[name] = cloudpickle.loads(data)
            except Exception:
                return None
            hashes[name] = digest
        return values, flat[3], hashes

    def _forget(self, key: str) -> None:
        """Serve ``key`` from neither memory nor any view (it was found corrupt or removed)."""
        self._memory.pop(key, None)
        for view in self._views:
            view.entries.pop(key, None)

    async def _fetch_waiting(self) -> None:
        try:
            await asyncio.sleep(0)  # let look-ups started in the same loop iteration join this query
            while self._waiting:
                batch, self._waiting = self._waiting, {}
                try:
                    rows = await self._conn.execute_fetchall(
                        _ENTRY_QUERY.format(where="e.key IN (SELECT value FROM json_each(?))"),
                        (json.dumps(list(batch)),),
                    )
                    found, broken = _entries_from_rows(rows)
                except sqlite3.DatabaseError as exc:
                    # A look-up that cannot be answered is a miss: the step runs, the run goes on.
                    self._log_error(
                        StoreError(f"a cache look-up in the flowyml store at {self.root} failed: {exc}")
                    )
                    found, broken = {}, {}
                except BaseException as exc:
                    for future in batch.values():
                        if not future.done():
                            future.set_exception(StoreError(f"cache look-up failed: {exc!r}"))
                    raise
                self._drop_broken(broken)
                for key, future in batch.items():
                    flat = self._memory.get(key) or found.get(key)
                    if flat is not None and self._dropped.get(key) == flat[4]:
                        flat = None
                    if not future.done():
                        future.set_result(flat)
        except Exception:
            pass  # already delivered to the waiting look-ups
        finally:
            self._fetcher = None
            if self._waiting and not self._closed:
                self._fetcher = asyncio.get_running_loop().create_task(self._fetch_waiting())

    async def load(self, entry: CacheEntry) -> dict[str, Any] | None:
        """The outputs of ``entry`` by name, or None when any of them cannot be read back intact.

        Every artifact's length and xxh3-128 are checked before it is unpickled. A missing, truncated
        or altered artifact (file or inline blob) is moved to ``quarantine/`` when it is a file, its
        index entry is dropped, and a :class:`CacheCorruptionWarning` names the step, key and file.
        """
        values: dict[str, Any] = {}
        for out in entry.outputs:
            data = out.inline
            if data is None:
                try:
                    data = await self._files.read(out.artifact_hash)
                except BadHashError:
                    self._report_corrupt(
                        entry, out, "is not a valid artifact hash (a corrupt row)", quarantine=False
                    )
                    return None
                except OSError as exc:
                    self._report_corrupt(entry, out, f"cannot be read ({exc})", quarantine=False)
                    return None
                if data is None:
                    self._report_corrupt(entry, out, "is missing", quarantine=False)
                    return None
            if len(data) != out.size or _hexdigest(data) != out.artifact_hash:
                self._report_corrupt(entry, out, "does not match its hash", quarantine=out.inline is None)
                return None
            try:
                values[out.name] = cloudpickle.loads(data)
            except Exception as exc:
                self._report_corrupt(entry, out, f"cannot be unpickled ({exc!r})", quarantine=False)
                return None
        return values

    def _report_corrupt(
        self, entry: CacheEntry, out: CachedOutput, problem: str, *, quarantine: bool
    ) -> None:
        if out.inline is None and not is_hash(out.artifact_hash):
            where = f"index row naming {out.artifact_hash!r}"
        elif out.inline is None:
            where = f"artifact file {self._files.path(out.artifact_hash)}"
            if quarantine and not self.read_only:
                moved = self._files.quarantine(out.artifact_hash)
                if moved is not None:
                    where += f" (moved to {moved})"
        else:
            where = f"inline artifact {out.artifact_hash}"
        flat = self._memory.get(entry.key)
        if flat is not None and flat[4] == entry.created_at:
            del self._memory[entry.key]
        for view in self._views:
            held = view.entries.get(entry.key)
            if held is not None and held[4] == entry.created_at:
                del view.entries[entry.key]
        if not self._closed and not self.read_only:
            self._dropped[entry.key] = entry.created_at
            self._queue.put_nowait(_Drop(entry.key, entry.created_at))
        warnings.warn(
            CacheCorruptionWarning(
                f"cache entry {entry.key} of step {entry.step_name!r}: output {out.name!r} in {where} "
                f"{problem}; the entry was dropped and the step will run again."
            ),
            stacklevel=3,
        )

    def put(
        self,
        *,
        key: str,
        step_name: str,
        run_id: str,
        outputs: dict[str, Any],
        duration: float,
        parts: Mapping[str, str] | None = None,
    ) -> dict[str, str] | None:
        """Cache the outputs of a successful step under ``key``, without waiting for the write.

        The outputs are pickled now, so what is cached cannot change afterwards. They are committed
        all together or not at all. An output that cannot be pickled warns
        (:class:`UncachedStepWarning`) and nothing is cached. Returns the artifact hash of each output,
        or None when nothing was cached. ``parts`` are the key's components (see
        :meth:`put_key_parts`), written in the entry's row; not when nothing was cached.

        Raises:
            StoreError: the store is closed.
        """
        self._check_open()
        if self.read_only:
            return None
        flat: list[Any] = [key, step_name, run_id, float(duration), time.time()]
        hashes: dict[str, str] = {}
        files = False
        for name, value in outputs.items():
            constant = _CONSTANTS.get(value) if value is None or value.__class__ is bool else None
            if constant is not None:
                data, digest, type_name = constant
                hashes[name] = digest
                flat += (name, digest, len(data), type_name, data)
                continue
            try:
                data = _pickle(value)
            except Exception as exc:
                warnings.warn(
                    UncachedStepWarning(
                        f"step {step_name!r} was not cached: its output {name!r} "
                        f"({_type_name(value)}) cannot be pickled: {exc!r}"
                    ),
                    stacklevel=2,
                )
                return None
            digest = hashes[name] = _hexdigest(data)
            size = len(data)
            flat += (name, digest, size, _type_name(value), data)
            files = files or size > INLINE_LIMIT
        entry = tuple(flat)
        self._put_count += 1
        self._memory[key] = entry
        self._unsaved.add(key)
        self._puts.append(entry)
        if files:
            self._file_puts.append(entry)
        if parts is not None:
            self._parts += (key, step_name, flat[4], parts)
        if not self._awake_now:
            self._wake_now()
        return hashes

    def _wake_now(self) -> None:
        """Have the writer commit what is listed without lingering (cache entries, key parts)."""
        if not self._awake_now:
            self._awake_now = self._awake = True
            self._queue.put_nowait(_WAKE_NOW)

    def record_run(self, run: RunRecord) -> None:
        """Queue an insert-or-update of a run (at its start with status "running", and at its end).

        Raises:
            ValueError: ``run.status`` is not one of :data:`RUN_STATES`.
        """
        self._check_open()
        if run.status not in RUN_STATES:
            raise ValueError(f"run status {run.status!r} is not one of {sorted(RUN_STATES)}")
        if not self.read_only:
            if not self._awake:
                self._awake = True
                self._queue.put_nowait(_WAKE)
            self._runs[run.run_id] = run

    def record_step(self, step: StepRecord) -> None:
        """Queue an insert-or-update of a step run, with the artifacts it produced and consumed."""
        self._check_open()
        if self.read_only:
            return
        if not self._awake:
            self._awake = True
            self._queue.put_nowait(_WAKE)
        self._steps += (None, step, None, None)

    def record_fate(
        self,
        run_id: str,
        fate: StepFate,
        hashes: Mapping[str, str] | None,
        shape: StepShape,
    ) -> None:
        """:meth:`record_step` for the engine's hot path: the writer builds the record.

        ``fate`` is read when its batch commits (within the run), so it must not change after
        this call; a step that failed goes through :meth:`record_step`, so that no user code
        (an exception's ``__str__``) ever runs on the writer's thread. ``hashes`` maps output
        names to artifact hashes when the outputs are cached; ``shape`` names the step, its
        outputs and the ``(producer step, output name)`` of each parameter another step fills.
        """
        if self._closed or self.read_only:
            self._check_open()
            return
        steps = self._steps
        if not self._awake:
            self._awake = True
            self._queue.put_nowait(_WAKE)
        steps += (run_id, fate, hashes, shape)

    async def flush(self) -> None:
        """Wait until everything queued so far is committed.

        Raises:
            StoreError: a write batch failed since the last flush (its rows are lost).
        """
        self._check_open()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Flush(future))
        await future
        self._raise_errors()

    # -- the writer --------------------------------------------------------------------------------

    def _drain_into(self, jobs: list[_Job]) -> bool:
        """Move what is queued into ``jobs`` (up to the batch limit); True if it must commit now."""
        urgent = False
        while len(jobs) < _MAX_BATCH:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            jobs.append(job)
            urgent = urgent or not _lingers(job)
        return urgent or len(jobs) >= _MAX_BATCH

    async def _recover_staged(self) -> None:
        """Index the entries killed processes saved and did not index (see ``_staged``)."""
        try:
            damaged = await _db.retry_locked(
                lambda: _db.on_thread(self._conn, lambda db: _merge_staged(db, self._files)),
                where=self._db_path,
            )
        except (sqlite3.Error, StoreError) as exc:
            self._log_error(
                StoreError(
                    f"indexing the saved cache entries of the flowyml store at {self.root} failed: {exc}"
                )
            )
            return
        self.damaged.extend(damaged)

    async def _run_writer(self) -> None:
        stop = False
        try:
            if self._recover:
                await self._recover_staged()
            while not stop:
                self._held = jobs = [await self._queue.get()]
                urgent = self._drain_into(jobs) or not _lingers(jobs[0])
                if not urgent:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(_LINGER_SECONDS):
                            while not urgent:
                                jobs.append(await self._queue.get())
                                urgent = self._drain_into(jobs) or not _lingers(jobs[-1])
                # In this task, not a task of its own (a loop turn per batch): cancelled meanwhile,
                # the batch stays held and is processed again below. That is safe: a transaction
                # commits whole or not at all, and every row is an upsert or, for packed step
                # records, read back with the last record of a step winning.
                stop = await self._process(jobs)
                self._held = []
        except asyncio.CancelledError:
            if self._released:
                raise
            # The loop is shutting down (the end of ``asyncio.run``) with the store still open: a
            # shared store is closed this way. Commit what is queued, close, then end as cancelled.
            self._released = self._closed = True
            jobs, self._held = self._held, []
            if self._taken is not None:  # its commit may not have happened: take it again
                taken, self._taken = self._taken, None
                self._puts[:0] = taken.puts
                self._file_puts[:0] = taken.files
                self._parts[:0] = taken.parts
                self._steps[:0] = taken.steps
                self._runs = {**taken.runs, **self._runs}
            while True:
                try:
                    jobs.append(self._queue.get_nowait())
                except asyncio.QueueEmpty:
                    break
            with contextlib.suppress(BaseException):
                await self._process(jobs)
            self._release_task = asyncio.ensure_future(self._release())
            await asyncio.wait([self._release_task])
            raise

    def _on_writer_done(self, task: asyncio.Task[None]) -> None:
        """If the writer ended early (the loop cancelled it), fail whoever still waits on it."""
        reason = StoreError(f"the writer of the flowyml store at {self.root} stopped; the store is closed")
        self._closed = True
        waiters, self._entry_waiters = self._entry_waiters, []
        for _, future in waiters:
            if not future.done():
                future.set_exception(reason)
        while True:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            if isinstance(job, _Flush | _Call) and not job.future.done():
                job.future.set_exception(reason)

    async def _process(self, jobs: list[_Job]) -> bool:
        """Commit one drained batch; returns True when the batch asked the writer to stop."""
        batch = _Batch()
        flushes: list[_Flush] = []
        stop = False
        for job in jobs:
            if isinstance(job, RunRecord):
                batch.runs[job.run_id] = job
            elif isinstance(job, _Drop):
                batch.drops.append(job)
            elif isinstance(job, _Flush):
                flushes.append(job)
            elif isinstance(job, _Call):
                if job.future.done():
                    continue  # done before the writer was interrupted (see _run_writer)
                await self._commit_listed(batch)
                batch = _Batch()
                self._checkpoint_due = True
                try:
                    job.future.set_result(await job.fn(self._conn))
                except Exception as exc:
                    job.future.set_exception(exc)
            elif isinstance(job, _Stop):
                stop = True
        await self._commit_listed(batch)
        await self._wake(f.future for f in flushes)
        if self._checkpoint_due and not stop:  # closing checkpoints by itself
            # After the runs waiting for this batch were woken: copying the batch's pages from
            # the WAL into the database is not on their clock (see _db.checkpoint).
            self._checkpoint_due = False
            with contextlib.suppress(sqlite3.Error, ValueError):
                await _db.on_thread(self._conn, _db.checkpoint)
        return stop

    async def _commit_listed(self, batch: _Batch) -> None:
        """Commit ``batch`` with everything listed so far.

        Runs wait for their cache entries, not their lineage (see settle). Many entries are saved
        on their own first (see ``_staged``): the runs waiting for them go on while the writer
        indexes them, then commits the lineage. Cancelled meanwhile, the writer processes the
        held jobs again: entries not saved yet are taken back (self._taken), saved ones are
        indexed again (self._unindexed); the steps are still listed.
        """
        unindexed, self._unindexed = self._unindexed, []
        for staged, saved in unindexed:  # failing again, they are listed again
            await self._commit_safely(saved, staged=staged)
        if len(self._puts) < _SPLIT_ENTRIES:
            await self._commit_safely(self._take_steps(batch))
            return
        await self._commit_safely(self._take_entries(_Batch(drops=batch.drops)), stage=True)
        batch.drops = []
        # Entries put meanwhile are not held back behind this lineage: their own wake-up is queued.
        await self._commit_safely(self._take_steps(batch, entries=False))

    async def _entries_saved(self, batch: _Batch) -> None:
        """A batch's entries are saved (committed, staged or not): the runs waiting for them go
        on, a few at a time, before the writer does anything more."""
        if batch.upto > self._committed_upto:
            self._committed_upto = batch.upto
            ready = self._ready_entry_waiters()
            if ready:
                await self._wake(ready)
                # The woken runs go on first: what follows (indexing staged entries, or the
                # housekeeping of 100,000 entries: ~0.2 s of the loop) is not what they waited for.
                # Until it is done, memory still serves the entries it holds.
                await asyncio.sleep(0)

    async def _wake(self, futures: Iterable[asyncio.Future[None]]) -> None:
        """Resolve the flushes a commit was waited for."""
        for i, future in enumerate(f for f in futures if not f.done()):
            future.set_result(None)
            if i % _WAKE_CHUNK == _WAKE_CHUNK - 1:
                # Each woken run finishes its run on the loop; 200 of them in one loop iteration
                # kept every other task waiting ~10 ms. A few at a time, with a yield in between.
                await asyncio.sleep(0)

    def _take_steps(self, batch: _Batch, *, entries: bool = True) -> _Batch:
        """Move every run and step listed so far, and unless ``entries`` is False every cache
        entry and key, into ``batch`` (they commit with the jobs queued before)."""
        self._awake = False
        if self._steps:
            batch.steps, self._steps = self._steps, []
        if self._runs:
            batch.runs.update(self._runs)
            self._runs = {}
        return self._take_entries(batch) if entries else batch

    def _take_entries(self, batch: _Batch) -> _Batch:
        """Move every cache entry and key listed so far into ``batch``."""
        self._awake_now = False
        if self._puts:
            batch.upto = self._put_count
            batch.puts, self._puts = self._puts, []
            if self._file_puts:
                batch.files, self._file_puts = self._file_puts, []
        if self._parts:
            batch.parts, self._parts = self._parts, []
        return batch

    async def _commit_safely(self, batch: _Batch, *, stage: bool = False, staged: Sequence[int] = ()) -> None:
        if not batch:
            return
        self._taken = batch
        committed = False
        try:
            await self._commit(batch, stage=stage, staged=staged)
            committed = True
        except _Unindexed as exc:
            # Saved, so nothing is lost: the next batch indexes them again (or, this process
            # gone, the next store opened for writing). Memory serves them meanwhile.
            self._unindexed.append((exc.staged, exc.left))
            error = StoreError(
                f"indexing {len(exc.left.puts)} cache entries in the flowyml store at {self.root} failed "
                f"(they are saved, and indexed at its next write): {exc.cause}"
            )
            error.__cause__ = exc.cause
            self._log_error(error)
        except Exception as exc:
            # The values stay served from memory (they are right); only their persistence is lost.
            what = []
            if batch.puts:
                what.append(f"{len(batch.puts)} cache entries")
            if batch.runs or batch.steps:
                what.append("lineage records")
            error = StoreError(
                f"writing to the flowyml store at {self.root} failed, so {' and '.join(what) or 'a batch'} "
                f"were not stored: {exc}"
            )
            error.__cause__ = exc
            self._log_error(error)
        self._taken = None  # not when cancelled: the writer's cancel handler takes the batch again
        await self._entries_saved(batch)
        if committed and batch.puts and not stage:  # staged: indexed and released in chunks
            self._committed(batch)

    def _ready_entry_waiters(self) -> list[asyncio.Future[None]]:
        """The runs whose cache entries are all committed (or failed, and reported), taken from
        those waiting."""
        ready = [future for upto, future in self._entry_waiters if upto <= self._committed_upto]
        if ready:
            self._entry_waiters = [(u, f) for u, f in self._entry_waiters if u > self._committed_upto]
        return ready

    async def _commit(self, batch: _Batch, *, stage: bool = False, staged: Sequence[int] = ()) -> None:
        """Commit ``batch``; with ``stage``, save its entries first (see ``_staged``); ``staged``
        are rows already saved that its transaction replaces.

        Raises:
            _Unindexed: the entries were saved, and indexing them failed.
        """
        # 1. Artifact files first, durably: an index row may only name a file that is in place.
        #    A put whose file cannot be written (disk full, ...) is left out; the rest still commits.
        failed: set[int] = set()
        filed = {id(put) for put in batch.files}  # their big outputs are not saved packed again
        for put in batch.files:
            try:
                for at in range(_HEAD, len(put), _OUT):
                    if put[at + 2] > INLINE_LIMIT:
                        await self._files.write(put[at + 1], put[at + 4])
            except OSError as exc:
                error = StoreError(
                    f"the output of step {put[1]!r} could not be written to the flowyml "
                    f"store at {self.root}, so it is not cached: {exc}"
                )
                error.__cause__ = exc
                self._log_error(error)
                failed.add(id(put))
        if failed:
            batch.puts = [put for put in batch.puts if id(put) not in failed]
        if batch.files:
            batch.files = []
            await self._files.sync_dir()
        # 2. Every row of the batch in one IMMEDIATE transaction, built and run in ONE call on the
        #    connection's thread: no thread hop per statement, and the loop stays free meanwhile.
        #    A locked database rolls back and the whole call is retried.
        if stage:
            saved = await _db.retry_locked(
                lambda: _db.on_thread(
                    self._conn,
                    lambda db: _staged.stage(
                        db, _staged.pack(batch.puts, batch.parts, filed, INLINE_LIMIT), _process.pid, _HOST
                    ),
                ),
                where=self._db_path,
            )
            # Saved: a writer cancelled from now on indexes them again (_commit_listed), it does
            # not save them again.
            pending = (saved, batch)
            self._unindexed.append(pending)
            self._taken = None
            try:
                await self._entries_saved(batch)
                await self._index(batch, saved)
            except asyncio.CancelledError:
                raise  # still listed: the cancelled writer indexes them before it closes
            except BaseException:
                self._unindexed = [u for u in self._unindexed if u is not pending]
                raise
            self._unindexed = [u for u in self._unindexed if u is not pending]
            return
        try:
            await self._write(batch, staged)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if staged:
                raise _Unindexed(list(staged), exc, batch) from exc
            raise

    async def _index(self, batch: _Batch, staged: list[int]) -> None:
        """Index saved entries, :data:`_INDEX_CHUNK` a transaction, each in its own call on the
        connection's thread: a read queued meanwhile (the next run's preload) waits for one
        transaction, not for 100,000 entries. The last one deletes the ``staged`` rows.

        Raises:
            _Unindexed: a transaction failed; it holds what is left to index.
        """
        chunks = _chunks(batch, _INDEX_CHUNK)
        for at, chunk in enumerate(chunks):
            last = at == len(chunks) - 1
            try:
                await self._write(chunk, staged if last else ())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                left = _Batch(drops=chunk.drops, puts=[p for c in chunks[at:] for p in c.puts])
                left.parts = [item for c in chunks[at:] for item in c.parts]
                raise _Unindexed(staged, exc, left) from exc
            self._committed(chunk)

    async def _write(self, batch: _Batch, staged: Sequence[int]) -> None:
        """Commit the rows of ``batch`` in one transaction (replacing the ``staged`` rows)."""
        rows = _BatchRows(batch)
        rows.staged = list(staged)
        try:
            await _db.retry_locked(lambda: _db.on_thread(self._conn, rows.commit), where=self._db_path)
        except asyncio.CancelledError:
            raise  # the connection's thread may still be committing these rows: they stay theirs
        except BaseException:
            rows.release()
            raise
        # The connection's thread holds its last call until the next one: without this, the
        # batch (every step result of a run) stayed alive after the run, until the next write.
        rows.release()
        batch.steps = []
        self.commits += 1
        self._checkpoint_due = True
        for drop in batch.drops:
            if self._dropped.get(drop.key) == drop.created_at:
                del self._dropped[drop.key]

    def _committed(self, batch: _Batch) -> None:
        """Committed: the index serves these entries now, so memory stops holding them (and their
        pickled bytes) -- a process-long store would otherwise keep every value it ever cached.
        Each live view learns the keys, so a look-up through it asks the database for them."""
        keys = [put[0] for put in batch.puts]
        self._unsaved.difference_update(keys)
        memory = self._memory
        for put in batch.puts:
            if memory.get(put[0]) is put:  # not a newer entry put under the same key
                del memory[put[0]]
        if not memory and not self._unsaved:
            # Emptied, a dict or set keeps the table it grew to (100,000 puts: ~9 MB): start afresh.
            self._memory, self._unsaved = {}, set()
        for view in list(self._views):
            if view.entries:
                for key in keys:
                    view.entries.pop(key, None)  # an older entry under this key, replaced
            if view.keys is not None:
                view.keys.update(keys)

    async def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error, ValueError):
            if self._conn.in_transaction:
                await self._conn.execute("ROLLBACK")

    def hand_back_pages(self) -> None:
        """After a large run: once what is queued is committed, SQLite hands back its page cache.

        A run's preload read and lineage batches fill it (up to ``_db.CACHE_KIB``) with pages the
        next run need not find there; the writer shrinks it after large cache batches only, and a
        process-long store kept the rest (0.6 KiB a step after a 20,000-step rerun). Not awaited.
        """
        if self._closed or self.read_only:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.add_done_callback(_retrieved)  # nobody awaits it: a stopped writer's error is not news
        self._queue.put_nowait(_Call(_shrink_memory, done))

    async def _call(self, fn: Callable[[aiosqlite.Connection], Awaitable[Any]]) -> Any:
        """Run ``fn`` on the writer, after everything queued before it is committed."""
        self._check_open()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Call(fn, future))
        return await future

    # -- key components ----------------------------------------------------------------------------

    def put_key_parts(self, key: str, step_name: str, parts: Mapping[str, str]) -> None:
        """Queue the components of ``key`` (component name -> short digest) for the writer.

        Written for every key that missed, so a later miss can say which component changed: in
        the key's cache entry when it is put in the same batch (``put(parts=...)`` always is),
        else in a row of their own. ``parts`` must not change. Dropped when the store is closed
        or read-only: an explanation never fails a run.
        """
        if self._closed or self.read_only:
            return
        self._parts += (key, step_name, time.time(), parts)
        self._wake_now()

    async def latest_key_parts(self, step_names: Iterable[str]) -> dict[str, tuple[str, str]]:
        """The most recent key of each of these steps with its components as stored (a JSON
        object of component name -> digest), in one query; decoded by the caller, when needed."""
        self._check_open()
        names = list(step_names)  # as given: a name twice in the IN list is harmless, no read needs an order
        if not names:
            return {}
        # Probing the step index once per name costs as much on an empty store as on a full one
        # (a million names: 1.6 s); when the names are not far fewer than the rows, scanning the
        # rows against the names is cheaper (0.015 s empty; 100,000 rows and names: 0.42 s
        # against 0.80 s), and the other way round for a few names in a big store (1,000 names
        # among 1,000,000 rows: 0.04 s against 0.57 s). The rows are counted up to 4 a name.
        limit = 4 * len(names)
        counted = await self._conn.execute_fetchall(
            "SELECT (SELECT count(*) FROM (SELECT 1 FROM cache_key_parts LIMIT ?1)) "
            "+ (SELECT count(*) FROM (SELECT 1 FROM cache_entries LIMIT ?1))",
            (limit,),
        )
        by = "+step_name" if next(iter(counted))[0] < limit else "step_name"  # "+": not by the index
        rows = await self._conn.execute_fetchall(
            "SELECT step_name, key, parts FROM ("
            "  SELECT step_name, key, parts, ROW_NUMBER() OVER "
            "    (PARTITION BY step_name ORDER BY created_at DESC, key DESC) AS n FROM ("
            "    SELECT step_name, key, parts, created_at FROM cache_key_parts"
            f"    WHERE {by} IN (SELECT value FROM json_each(?1))"
            "    UNION ALL SELECT step_name, key, parts, created_at FROM cache_entries"
            f"    WHERE {by} IN (SELECT value FROM json_each(?1)) AND parts IS NOT NULL)"
            ") WHERE n = 1",
            (json.dumps(names),),
        )
        return {row[0]: (row[1], row[2]) for row in rows}

    async def key_parts(self, keys: Iterable[str]) -> dict[str, dict[str, str]]:
        """The components of each of these keys that has them recorded."""
        self._check_open()
        rows = await self._conn.execute_fetchall(
            "SELECT key, parts FROM cache_key_parts WHERE key IN (SELECT value FROM json_each(?1)) "
            "UNION ALL SELECT key, parts FROM cache_entries "
            "WHERE key IN (SELECT value FROM json_each(?1)) AND parts IS NOT NULL",
            (json.dumps(sorted(set(keys))),),
        )
        return {row[0]: _loads_parts(row[1]) for row in rows}

    async def previous_step(self, run_id: str, step_name: str, *, within: int = 50) -> StepRecord | None:
        """The record of ``step_name`` in the latest of the ``within`` runs of the same pipeline
        that started before ``run_id`` and ran it; None if there is none."""
        self._check_open()
        rows = await self._conn.execute_fetchall(
            "SELECT r.run_id FROM runs AS r JOIN runs AS this ON this.run_id = ? "
            "WHERE r.pipeline_name = this.pipeline_name AND r.started_at < this.started_at "
            "ORDER BY r.started_at DESC LIMIT ?",
            (run_id, within),
        )
        for (earlier,) in rows:
            for record in await self._steps_of(earlier):
                if record.step_name == step_name and record.status != "skipped":
                    return record
        return None

    # -- the read API ------------------------------------------------------------------------------

    async def runs(self, limit: int = 20) -> list[RunRecord]:
        """The most recent runs, newest first."""
        self._check_open()
        rows = await self._conn.execute_fetchall(
            f"SELECT {_RUN_READ} FROM runs ORDER BY started_at DESC LIMIT ?", (limit,)
        )
        return [run for run in map(self._run_or_none, rows) if run is not None]

    def _run_or_none(self, row: Sequence[Any]) -> RunRecord | None:
        """The run of ``row``, or None (noted in :attr:`damaged`) when the row is damaged."""
        try:
            return _run_from_row(row)
        except (ValueError, TypeError, IndexError) as exc:
            self.damaged.append(f"table runs, run_id {row[0]!r}: {exc}")
            return None

    async def match_run_ids(self, prefix: str, limit: int = 10) -> list[str]:
        """Run ids equal to ``prefix`` (alone, if there is one) or starting with it."""
        self._check_open()
        exact = await self._conn.execute_fetchall("SELECT run_id FROM runs WHERE run_id = ?", (prefix,))
        if exact:
            return [prefix]
        pattern = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = await self._conn.execute_fetchall(
            "SELECT run_id FROM runs WHERE run_id LIKE ? ESCAPE '\\' ORDER BY started_at DESC LIMIT ?",
            (pattern, limit),
        )
        return [row[0] for row in rows]

    async def get_run(self, run_id: str) -> RunDetail | None:
        """The run with this id (or unique id prefix) and its step runs; None if there is no such run."""
        matches = await self.match_run_ids(run_id, limit=2)
        if len(matches) != 1:
            return None
        rows = await self._conn.execute_fetchall(
            f"SELECT {_RUN_READ} FROM runs WHERE run_id = ?", (matches[0],)
        )
        run = self._run_or_none(next(iter(rows)))
        if run is None:
            return None
        return RunDetail(run, tuple(await self._steps_of(run.run_id)))

    async def _steps_of(self, run_id: str) -> list[StepRecord]:
        """The step runs of ``run_id`` in the order they started, unstarted (skipped) ones last."""
        rows = await self._conn.execute_fetchall(
            "SELECT id, steps, times FROM step_records WHERE run_id = ? ORDER BY id", (run_id,)
        )
        latest: dict[str, StepRecord] = {}
        for row_id, packed, times in rows:
            try:
                made = [_checked_record(run_id, unpacked) for unpacked in _unpack_part(packed, times)]
            except Exception as exc:  # any damage: reported, the other rows still read
                self.damaged.append(f"table step_records, id {row_id} (run {run_id!r}): {exc}")
                continue
            for record in made:
                latest[record.step_name] = record  # an upsert keeps its place, with its last content
        steps = list(latest.values())
        order = {s.step_name: i for i, s in enumerate(steps)}
        return sorted(steps, key=lambda s: (s.started_at is None, s.started_at or 0.0, order[s.step_name]))

    async def lineage(self, output_name: str, run_id: str | None = None) -> Lineage | None:
        """Where ``output_name`` came from in run ``run_id`` (default: the latest run that made it).

        Returns the step run that produced it and, recursively, the producers of what that step
        consumed; None when no recorded run produced that output.
        """
        self._check_open()
        conn = self._conn
        candidates: list[str]
        if run_id is None:
            # Newest first; the substring search finds the parts naming the output (see _packed).
            candidates = [
                row[0]
                for row in await conn.execute_fetchall(
                    "SELECT p.run_id FROM step_records AS p LEFT JOIN runs AS r ON r.run_id = p.run_id "
                    "WHERE instr(p.outputs, ?) > 0 GROUP BY p.run_id "
                    "ORDER BY MAX(r.started_at) IS NULL, MAX(r.started_at) DESC, MAX(p.id) DESC",
                    (_packed.search_text([output_name]),),
                )
            ]
        else:
            matches = await self.match_run_ids(run_id, limit=2)
            if len(matches) != 1:
                return None
            candidates = matches
        for the_run in candidates:
            found = await self._lineage_steps(the_run, output_name)
            if found is not None:
                steps, root = found
                break
        else:
            return None
        ancestry = _ancestry(steps, root)
        hashes = sorted({h for name in ancestry for h in steps[name].outputs.values() if h is not None})
        artifacts: dict[str, tuple[str | None, int | None, str | None]] = {}
        for row in await conn.execute_fetchall(
            "SELECT hash, type_name, size, producer_run_id FROM artifacts "
            "WHERE hash IN (SELECT value FROM json_each(?))",
            (json.dumps(hashes),),
        ):
            if isinstance(row[1], str) and isinstance(row[2], int) and isinstance(row[3], str | None):
                artifacts[row[0]] = (row[1], row[2], row[3])
            else:
                self.damaged.append(f"table artifacts, hash {row[0]!r}: values of the wrong type")
        return Lineage(output_name, the_run, _lineage_tree(the_run, steps, artifacts, root, output_name))

    async def _lineage_steps(self, run_id: str, output_name: str) -> tuple[dict[str, StepRecord], str] | None:
        """The records of ``run_id`` that the lineage of ``output_name`` needs, and its producer.

        Only the packed rows that hold the outputs the walk reaches are decoded (found by the
        ``outputs`` column, see ``_packed``), so one output of a 100,000-step run reads one row,
        not the run. After :data:`_TARGETED_READS` such reads (a long ancestry), or when an
        input's producer is not where its output is, the whole run is decoded, as before.
        """
        records = _LazyRecords(run_id)
        decoded: set[int] = set()
        reads = 0
        damage_seen = len(self.damaged)

        async def read(output: str) -> bool:
            nonlocal reads
            reads += 1
            if reads > _TARGETED_READS:
                return False
            rows = await self._conn.execute_fetchall(
                "SELECT id, steps, times FROM step_records WHERE run_id = ? AND instr(outputs, ?) > 0 "
                "ORDER BY id",
                (run_id, _packed.search_text([output])),
            )
            for row_id, packed, times in rows:
                if row_id in decoded:
                    continue
                decoded.add(row_id)
                try:
                    records.add(row_id, _unpack_part(packed, times))
                except Exception as exc:  # any damage: reported, the other rows still read
                    self.damaged.append(f"table step_records, id {row_id} (run {run_id!r}): {exc}")
            return True

        try:
            if await self._targeted_walk(read, records, output_name):
                root = records.producers.get(output_name)
                if root is not None:
                    return {name: records[name] for name in _ancestry(records, root)}, root
        except (TypeError, ValueError, LookupError, AttributeError):
            pass  # a damaged record: the whole run is read below, which reports it
        # The whole run, as it could always be read: every record, upserts applied across rows.
        del self.damaged[damage_seen:]  # read again below, reported once
        whole = {r.step_name: r for r in await self._steps_of(run_id)}
        root = next((r.step_name for r in whole.values() if output_name in r.outputs), None)
        return None if root is None else (whole, root)

    @staticmethod
    async def _targeted_walk(
        read: Callable[[str], Awaitable[bool]], records: _LazyRecords, output_name: str
    ) -> bool:
        """Read the rows of ``output_name``'s ancestry; False when the walk must read the whole run."""
        if not await read(output_name):
            return False
        root = records.producers.get(output_name)
        if root is None:
            return False
        pending = [root]
        seen = {root}
        while pending:
            for producer, output in records[pending.pop()].inputs.values():
                if producer in seen:
                    continue
                if producer not in records and not (await read(output) and producer in records):
                    return False
                seen.add(producer)
                pending.append(producer)
        return True

    async def cache_stats(self) -> CacheStats:
        """Entries, bytes, per-step counts, cache hits recorded and the time they saved."""
        self._check_open()
        conn = self._conn
        (entries,) = next(iter(await conn.execute_fetchall("SELECT COUNT(*) FROM cache_entries")))
        (artifacts, inline_bytes) = next(
            iter(
                await conn.execute_fetchall(
                    "SELECT COUNT(DISTINCT artifact_hash), COALESCE(SUM(LENGTH(inline)), 0) FROM cache_outputs"
                )
            )
        )
        (file_bytes,) = next(
            iter(
                await conn.execute_fetchall(
                    "SELECT COALESCE(SUM(size), 0) FROM (SELECT MAX(size) AS size FROM cache_outputs "
                    "WHERE inline IS NULL GROUP BY artifact_hash)"
                )
            )
        )
        per_step: dict[str, list[Any]] = {}
        for name, count, size in await conn.execute_fetchall(
            "SELECT e.step_name, COUNT(DISTINCT e.key), COALESCE(SUM(o.size), 0) FROM cache_entries AS e "
            "LEFT JOIN cache_outputs AS o ON o.key = e.key GROUP BY e.step_name"
        ):
            per_step[name] = [count, size, 0, 0.0]
        for (row_id,) in await conn.execute_fetchall(
            "SELECT id FROM step_records WHERE hits IS NOT NULL AND "
            "(NOT json_valid(hits) OR json_type(hits) != 'object')"
        ):
            self.damaged.append(f"table step_records, id {row_id}: its cache hits are not a JSON object")
        for name, hits, saved in await conn.execute_fetchall(
            "SELECT h.key, SUM(json_extract(h.value, '$[0]')), SUM(json_extract(h.value, '$[1]')) "
            "FROM step_records AS p, json_each(p.hits) AS h WHERE p.hits IS NOT NULL AND json_valid(p.hits) "
            "AND json_type(p.hits) = 'object' AND json_type(h.value) = 'array' GROUP BY h.key"
        ):
            per_step.setdefault(str(name), [0, 0, 0, 0.0])[2:] = [hits or 0, saved or 0.0]
        steps = tuple(StepCacheStats(name, *values) for name, values in sorted(per_step.items()))
        return CacheStats(
            entries=entries,
            artifacts=artifacts,
            inline_bytes=inline_bytes,
            file_bytes=file_bytes,
            hits=sum(s.hits for s in steps),
            time_saved_seconds=sum(s.time_saved_seconds for s in steps),
            steps=steps,
        )

    async def cached_steps(self) -> list[str]:
        """The names of the steps that have cache entries, sorted."""
        self._check_open()
        rows = await self._conn.execute_fetchall("SELECT DISTINCT step_name FROM cache_entries ORDER BY 1")
        return [row[0] for row in rows]

    async def clear_cache(self, step_name: str | None = None) -> int:
        """Remove the cache entries of ``step_name`` (default: all); returns how many were removed.

        Artifact files no longer named by any entry are deleted. Lineage records stay. Entries
        killed processes saved and never indexed (``_staged``) are cleared too.
        """
        self._refuse_read_only("clear its cache")
        where = "" if step_name is None else " WHERE step_name = ?"
        params: tuple[str, ...] = () if step_name is None else (step_name,)

        async def clear(conn: aiosqlite.Connection) -> tuple[int, set[str]]:
            async def transaction() -> tuple[int, set[str]]:
                await conn.execute("BEGIN IMMEDIATE")
                try:
                    keys = f"SELECT key FROM cache_entries{where}"
                    hashes = {
                        row[0]
                        for row in await conn.execute_fetchall(
                            f"SELECT DISTINCT artifact_hash FROM cache_outputs WHERE inline IS NULL "
                            f"AND key IN ({keys})",
                            params,
                        )
                    }
                    await conn.execute(f"DELETE FROM cache_outputs WHERE key IN ({keys})", params)
                    # The keys keep their components: the next miss still says what changed.
                    parts_where = " WHERE parts IS NOT NULL" + (
                        "" if step_name is None else " AND step_name = ?"
                    )
                    await conn.execute(
                        "INSERT OR IGNORE INTO cache_key_parts (key, step_name, created_at, parts) "
                        f"SELECT key, step_name, created_at, parts FROM cache_entries{parts_where}",
                        params,
                    )
                    cursor = await conn.execute(f"DELETE FROM cache_entries{where}", params)
                    removed = cursor.rowcount
                    still_used = {
                        row[0]
                        for row in await conn.execute_fetchall(
                            "SELECT DISTINCT artifact_hash FROM cache_outputs WHERE artifact_hash IN "
                            "(SELECT value FROM json_each(?))",
                            (json.dumps(sorted(hashes)),),
                        )
                    }
                    await conn.execute("COMMIT")
                except BaseException:
                    await self._rollback()
                    raise
                return removed, hashes - still_used

            # What killed processes saved and never indexed is indexed first, then cleared with
            # the rest: indexed later, it would come back (see _staged).
            await _db.retry_locked(
                lambda: _db.on_thread(conn, lambda db: _merge_staged(db, self._files)), where=self._db_path
            )
            return await _db.retry_locked(transaction, where=self._db_path)

        removed, unused = await self._call(clear)
        for held in (self._memory, *(view.entries for view in self._views)):
            for key in [k for k, e in held.items() if step_name is None or e[1] == step_name]:
                del held[key]
        self._files.remove(unused)
        await self.gc()
        return int(removed)

    def _refuse_read_only(self, what: str) -> None:
        self._check_open()
        if self.read_only:
            raise StoreError(
                f"cannot {what}: the flowyml store at {self.root} is read-only for you (its directory or "
                "database is not writable); reading it works"
            )

    async def _named_hashes(self) -> set[str]:
        rows = await self._conn.execute_fetchall("SELECT DISTINCT artifact_hash FROM cache_outputs")
        return {row[0] for row in rows if isinstance(row[0], str)}

    async def gc(self, *, grace: float = ORPHAN_GRACE_SECONDS) -> tuple[int, int]:
        """Remove artifact files no index row names (older than ``grace`` s) and stale temporary files.

        Orphans are what a crash between an artifact's rename and its row's commit leaves. Only files
        named like a hash are considered; a younger orphan may be another process's write in flight.
        Returns ``(files removed, bytes freed)``.
        """
        self._refuse_read_only("collect its garbage")

        async def collect(conn: aiosqlite.Connection) -> tuple[int, int]:
            named = await self._named_hashes()
            files = self._files
            loop = asyncio.get_running_loop()

            def sweep() -> tuple[int, int]:
                count = freed = 0
                for path in files.orphans(named, grace=grace):
                    try:
                        size = path.stat().st_size
                        path.unlink()
                    except FileNotFoundError:
                        continue
                    count += 1
                    freed += size
                return count + files.clean_tmp(), freed

            return await loop.run_in_executor(files.executor, sweep)

        result: tuple[int, int] = await self._call(collect)
        return result

    async def verify(self) -> VerifyReport:
        """Run SQLite's integrity check and re-hash every artifact; read-only.

        Problems are listed, not repaired: a bad artifact is still detected and set aside by
        :meth:`load` the next time a run needs it.
        """
        self._check_open()
        await self.flush()
        conn = self._conn
        checks = [row[0] for row in await conn.execute_fetchall("PRAGMA integrity_check")]
        integrity = "ok" if checks == ["ok"] else "; ".join(str(c) for c in checks)
        rows = list(
            await conn.execute_fetchall(
                "SELECT o.key, e.step_name, o.output_name, o.artifact_hash, o.size, o.inline "
                "FROM cache_outputs AS o JOIN cache_entries AS e ON e.key = o.key ORDER BY e.step_name, o.key"
            )
        )
        (entries,) = next(iter(await conn.execute_fetchall("SELECT COUNT(*) FROM cache_entries")))
        files = self._files

        def check() -> tuple[int, list[VerifyProblem]]:
            problems: list[VerifyProblem] = []
            hashed: dict[str, str | None] = {}  # file hash -> problem kind (None when fine)
            for key, step, name, digest, size, inline in rows:
                path: str | None = None
                kind: str | None
                if not is_hash(digest):
                    problems.append(
                        VerifyProblem(
                            "row",
                            f"index row names artifact {digest!r}, which is not a hash: a corrupt row, "
                            "never followed",
                            key,
                            step,
                            name,
                            None,
                            None,
                        )
                    )
                    continue
                if inline is not None:
                    blob = bytes(inline) if isinstance(inline, bytes | bytearray | memoryview) else b""
                    kind = None if len(blob) == size and _hexdigest(blob) == digest else "hash"
                else:
                    path = str(files.path(digest))
                    if digest not in hashed:
                        data: bytes | None
                        try:
                            data = files.path(digest).read_bytes()
                        except FileNotFoundError:
                            data = None
                        if data is None:
                            hashed[digest] = "missing"
                        elif len(data) != size:
                            hashed[digest] = "size"
                        else:
                            hashed[digest] = None if _hexdigest(data) == digest else "hash"
                    kind = hashed[digest]
                if kind is not None:
                    detail = {
                        "missing": "artifact file is missing",
                        "size": f"artifact has the wrong size (expected {size} bytes)",
                        "hash": "artifact does not match its hash",
                    }[kind]
                    problems.append(VerifyProblem(kind, detail, key, step, name, digest, path))
            for orphan in files.orphans(named):
                problems.append(
                    VerifyProblem(
                        "orphan",
                        "artifact file named by no index row (left by a crash); `flowyml cache gc` removes it",
                        artifact_hash=orphan.name,
                        path=str(orphan),
                    )
                )
            return len({r[3] for r in rows}), problems

        named = {r[3] for r in rows if isinstance(r[3], str)}
        checked, problems = await asyncio.get_running_loop().run_in_executor(files.executor, check)
        if integrity != "ok":
            problems.insert(0, VerifyProblem("integrity", integrity))
        return VerifyReport(integrity, entries, checked, tuple(problems))


def _ancestry(steps: Mapping[str, StepRecord], root: str) -> set[str]:
    """The names of ``root`` and every step it read from, transitively (those with records)."""
    seen = {root}
    pending = [root]
    while pending:
        for producer, _ in steps[pending.pop()].inputs.values():
            if producer not in seen and producer in steps:
                seen.add(producer)
                pending.append(producer)
    return seen


def _lineage_tree(
    run_id: str,
    steps: Mapping[str, StepRecord],
    artifacts: Mapping[str, tuple[str | None, int | None, str | None]],
    root: str,
    output_name: str,
) -> LineageNode:
    """The lineage tree of ``output_name`` made by ``root``, built without recursion.

    A chain of 100,000 steps is as deep as the tree; a producer read by several consumers is
    one node they share. A step reached again along its own path (records that loop) is shown
    without its inputs.
    """

    def make(step_name: str, output: str, inputs: tuple[tuple[str, LineageNode], ...]) -> LineageNode:
        step = steps.get(step_name)
        digest = step.outputs.get(output) if step is not None else None
        type_name, size, origin = artifacts.get(digest, (None, None, None)) if digest else (None, None, None)
        return LineageNode(
            run_id=run_id,
            step_name=step_name,
            status=step.status if step is not None else "unknown",
            cached=step.cached if step is not None else False,
            output_name=output,
            artifact_hash=digest,
            type_name=type_name,
            size=size,
            origin_run_id=origin,
            started_at=step.started_at if step is not None else None,
            duration_seconds=step.duration_seconds if step is not None else None,
            inputs=inputs,
        )

    built: dict[tuple[str, str], LineageNode] = {}
    on_path: set[str] = set()
    stack: list[tuple[str, str, bool]] = [(root, output_name, False)]
    while stack:
        step_name, output, children_done = stack.pop()
        step = steps.get(step_name)
        if children_done:
            on_path.discard(step_name)
            assert step is not None
            inputs = tuple(
                (param, built.get((producer, out)) or make(producer, out, ()))
                for param, (producer, out) in step.inputs.items()
            )
            built[step_name, output] = make(step_name, output, inputs)
        elif (step_name, output) in built or step_name in on_path:
            continue
        elif step is None or not step.inputs:
            built[step_name, output] = make(step_name, output, ())
        else:
            on_path.add(step_name)
            stack.append((step_name, output, True))
            stack.extend((producer, out, False) for producer, out in reversed(step.inputs.values()))
    return built[root, output_name]
