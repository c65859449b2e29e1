"""The SQLite side of the store: schema, connection setup, and retrying on a locked database.

Layout of one store directory (created 0o700, every file 0o600)::

    <root>/flowyml.db          the index and lineage (WAL mode; -wal and -shm beside it)
    <root>/artifacts/<xxh3>    pickled values too big to live inline, named by their hash
    <root>/quarantine/         artifacts that failed their hash check, kept for inspection

Why these choices:
- WAL lets readers (other runs, the CLI) read while one writer commits.
- ``busy_timeout`` makes SQLite wait for a lock itself; writes begin ``IMMEDIATE`` so a writer
  takes the lock up front and never needs to upgrade (the one case the busy handler cannot
  resolve). Beyond the busy timeout :func:`retry_locked` keeps retrying with capped backoff, so
  several processes sharing a store wait for each other instead of failing -- but only up to
  :data:`LOCK_DEADLINE_SECONDS` in all: a process holding the write lock longer than that is stuck
  (or a person left a transaction open), and a :class:`StoreError` saying so beats waiting forever.
- Opening reads the schema version in a plain read transaction, which never waits for a writer in
  WAL mode; the ``IMMEDIATE`` schema transaction runs only when the schema must be created or
  migrated. ``create=False`` (the command line) never writes while opening: no file, no schema,
  no migration.
- ``synchronous=NORMAL`` in WAL mode keeps the database consistent across a process crash; a power
  loss may drop the last commits, which only turns cache hits into misses. Artifact files are
  fsynced before the index row naming them is committed, so a row never names a missing file
  because of a crash.
- Lineage is packed: one ``step_records`` row holds the step runs of one writer batch (see
  ``_packed``). Schema 1 had a row per step, output and consumed input; opening such a store
  converts it once, in the schema transaction.
- A writing connection does not checkpoint the WAL inside its commits (``wal_autocheckpoint``
  off): the store's writer checkpoints after each batch, once the runs waiting for it are woken
  (:func:`checkpoint`). Inside the commit, copying 100,000 entries' pages back into the database
  was about half of the commit, on the run's clock.
- Opening runs every pragma and the schema transaction in one call on the connection's thread
  (:func:`on_thread`), not one awaited hop per statement.
- The components of a cached key live in its ``cache_entries`` row (``parts``); only the keys
  without an entry (a step that failed, outputs that cannot be pickled, an entry dropped or
  cleared) have a ``cache_key_parts`` row. A row of each per key cost two more B-tree inserts
  a put and a third of the cache index's pages. Readers take the union. Schema 3 kept every
  key's components in ``cache_key_parts``: they stay there and are read as before.
"""

from __future__ import annotations

__all__ = (
    "BUSY_TIMEOUT_MS",
    "CACHE_KIB",
    "DB_NAME",
    "LOCK_DEADLINE_SECONDS",
    "SCHEMA_VERSION",
    "busy_timeout_ms",
    "check_files",
    "checkpoint",
    "close",
    "connect",
    "is_locked_error",
    "on_thread",
    "retry_locked",
    "retry_locked_sync",
    "writable",
)

import asyncio
import contextlib
import os
import random
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

import aiosqlite

from flowyml._errors import StoreError

from . import _packed
from ._records import StepRecord
from ._safety import check_private

DB_NAME = "flowyml.db"
SCHEMA_VERSION = 5
#: The page cache of a connection, at most (KiB; SQLite's default is 2 MiB). A batch of 100,000 cache
#: entries inserts random keys into seven B-trees: with 2 MiB most inserts missed the cache and
#: re-read their page (30 us a step in SQLite at 100,000 steps, 22 with 64 MiB). The writer hands
#: the memory back after a large batch (``PRAGMA shrink_memory``), so it is not kept between runs.
CACHE_KIB = 64 * 1024
#: How long SQLite itself waits for a lock before a statement fails with "database is locked".
BUSY_TIMEOUT_MS = 30_000
#: How long, in all, a write waits for another process to release the store's write lock before
#: giving up with a StoreError. Read when a wait starts (tests patch it).
LOCK_DEADLINE_SECONDS = 60.0

_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run_id             TEXT PRIMARY KEY,
    pipeline_name      TEXT NOT NULL,
    status             TEXT NOT NULL,
    started_at         REAL NOT NULL,
    ended_at           REAL,
    duration_seconds   REAL,
    time_saved_seconds REAL NOT NULL DEFAULT 0,
    error_message      TEXT,
    pid                INTEGER,
    host               TEXT
);
CREATE INDEX IF NOT EXISTS runs_started ON runs (started_at);
CREATE TABLE IF NOT EXISTS step_records (
    id       INTEGER PRIMARY KEY,
    run_id   TEXT NOT NULL,
    steps    TEXT NOT NULL,
    times    BLOB NOT NULL,
    outputs  TEXT NOT NULL,
    hits     TEXT
);
CREATE INDEX IF NOT EXISTS step_records_run ON step_records (run_id, id);
CREATE TABLE IF NOT EXISTS artifacts (
    hash             TEXT PRIMARY KEY,
    size             INTEGER NOT NULL,
    type_name        TEXT NOT NULL,
    producer_run_id  TEXT,
    producer_step    TEXT,
    created_at       REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cache_entries (
    key              TEXT PRIMARY KEY,
    step_name        TEXT NOT NULL,
    run_id           TEXT,
    duration_seconds REAL NOT NULL,
    created_at       REAL NOT NULL,
    outputs          INTEGER,
    parts            TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS cache_entries_step_time ON cache_entries (step_name, created_at);
CREATE TABLE IF NOT EXISTS cache_outputs (
    key           TEXT NOT NULL,
    position      INTEGER NOT NULL,
    output_name   TEXT NOT NULL,
    artifact_hash TEXT NOT NULL,
    size          INTEGER NOT NULL,
    type_name     TEXT NOT NULL,
    inline        BLOB,
    PRIMARY KEY (key, position)
);
CREATE INDEX IF NOT EXISTS cache_outputs_hash ON cache_outputs (artifact_hash);
CREATE TABLE IF NOT EXISTS cache_key_parts (
    key        TEXT PRIMARY KEY,
    step_name  TEXT NOT NULL,
    created_at REAL NOT NULL,
    parts      TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS cache_key_parts_step ON cache_key_parts (step_name, created_at);
CREATE TABLE IF NOT EXISTS staged_entries (
    id         INTEGER PRIMARY KEY,
    pid        INTEGER,
    host       TEXT,
    created_at REAL NOT NULL,
    entries    BLOB NOT NULL
);
"""

#: Columns added after a table was first made: (table, column, type). Schema 3 added the writer's
#: process of a run (to show a run whose process is gone as interrupted) and the number of outputs
#: of a cache entry (an entry missing output rows is a miss, not a KeyError); schema 4 the
#: components of an entry's key (JSON, as ``cache_key_parts.parts``; NULL: none recorded there).
#: Schema 5 added ``staged_entries``: cache entries saved in bulk and not merged into the index yet
#: (see ``_staged``).
_ADDED_COLUMNS = (
    ("runs", "pid", "INTEGER"),
    ("runs", "host", "TEXT"),
    ("cache_entries", "outputs", "INTEGER"),
    ("cache_entries", "parts", "TEXT"),
)
#: Indexes a later schema replaced: (step_name, created_at) serves what (step_name) did.
_DROPPED_INDEXES = ("cache_entries_step",)

#: Every table and index of the schema: a store lacking one needs the schema transaction.
_SCHEMA_OBJECTS = frozenset(re.findall(r"CREATE (?:TABLE|INDEX) IF NOT EXISTS (\w+)", _SCHEMA))


def is_locked_error(exc: BaseException) -> bool:
    """True for SQLite's "database is locked" / "busy" errors, which are worth retrying."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _deadline() -> float:
    return float(LOCK_DEADLINE_SECONDS)


def busy_timeout_ms() -> int:
    """The busy timeout of new connections: never longer than the overall lock deadline."""
    return max(1, min(BUSY_TIMEOUT_MS, int(_deadline() * 1000)))


def _gave_up(where: object, waited: float, limit: float) -> StoreError:
    what = f"the flowyml store database {where}" if where is not None else "the flowyml store database"
    return StoreError(
        f"another process holds the write lock of {what}: gave up after waiting {waited:.1f} s "
        f"(the limit is {limit:g} s). Is another flowyml run, or a program with an open write "
        f"transaction on it, stuck?"
    )


async def retry_locked(
    operation: Callable[[], Awaitable[_T]],
    *,
    on_retry: Callable[[], Awaitable[None]] | None = None,
    max_wait: float = 2.0,
    where: object = None,
) -> _T:
    """Run ``operation`` until it does not fail with a locked database, for at most the deadline.

    SQLite's own busy handler already waited ``busy_timeout`` before the error surfaced, so a lock
    held that long means another process is committing a lot; waiting longer is better than losing
    the write, up to :data:`LOCK_DEADLINE_SECONDS` in all. ``on_retry`` runs before each new attempt
    (to roll back a failed transaction). ``where`` (the database path) goes in the error message.

    Raises:
        StoreError: the database was still locked when the deadline passed.
    """
    limit = _deadline()
    start = time.monotonic()
    delay = 0.01
    while True:
        try:
            return await operation()
        except sqlite3.OperationalError as exc:
            if not is_locked_error(exc):
                raise
            waited = time.monotonic() - start
            if waited >= limit:
                raise _gave_up(where, waited, limit) from exc
        if on_retry is not None:
            await on_retry()
        await asyncio.sleep(min(delay * (0.5 + random.random()), limit - waited))
        delay = min(delay * 2, max_wait)


def _touch_private(path: Path) -> None:
    """Create ``path`` owner-only (0o600, whatever the umask) unless it exists; an existing one keeps its mode."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


async def on_thread(conn: aiosqlite.Connection, fn: Callable[[sqlite3.Connection], _T]) -> _T:
    """Run ``fn`` with the raw connection on the connection's own thread, in one hop.

    aiosqlite awaits one thread hop per call; a transaction of ten statements paid ten hops and
    the Python work between them on the event loop. This runs a whole transaction there at once.
    ``Connection._execute`` is aiosqlite's own way of queueing a call on its thread (every public
    method goes through it); the pinned aiosqlite version is covered by the store's tests.
    """
    execute: Callable[[Callable[[], _T]], Awaitable[_T]] = conn._execute
    return await execute(lambda: fn(conn._conn))


@contextlib.contextmanager
def immediate(db: sqlite3.Connection) -> Iterator[None]:
    """One ``BEGIN IMMEDIATE`` transaction: committed at the end, rolled back on any exception."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            if db.in_transaction:
                db.execute("ROLLBACK")
        raise


def checkpoint(db: sqlite3.Connection) -> None:
    """Copy what the WAL holds back into the database, without waiting for readers or writers
    (``PASSIVE``: what they still need stays for the next checkpoint)."""
    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def _migrate_v1(db: sqlite3.Connection) -> None:
    """Schema 1 kept one row per step, output and consumed input; pack them per run (see _packed)."""
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "step_runs" not in tables:
        return
    outputs: dict[tuple[str, str], dict[str, str | None]] = {}
    for run_id, step_name, name, digest in db.execute(
        "SELECT run_id, step_name, output_name, artifact_hash FROM step_outputs"
    ):
        outputs.setdefault((run_id, step_name), {})[name] = digest
    inputs: dict[tuple[str, str], dict[str, list[str]]] = {}
    for run_id, step_name, param, producer, output in db.execute(
        "SELECT run_id, step_name, parameter, producer_step, output_name FROM consumed"
    ):
        inputs.setdefault((run_id, step_name), {})[param] = [producer, output]
    parts: dict[str, _packed.Part] = {}
    for row in db.execute(
        "SELECT run_id, step_name, status, attempts, started_at, ended_at, duration_seconds, cached, "
        "cache_key, time_saved_seconds, error_type, error_message, traceback FROM step_runs ORDER BY seq"
    ):
        key = (row[0], row[1])
        record = StepRecord(
            run_id=row[0],
            step_name=row[1],
            status=row[2],
            attempts=row[3],
            started_at=row[4],
            ended_at=row[5],
            duration_seconds=row[6],
            cached=bool(row[7]),
            cache_key=row[8],
            time_saved_seconds=row[9],
            error_type=row[10],
            error_message=row[11],
            traceback=row[12],
            outputs=outputs.get(key, {}),
            inputs={param: (src[0], src[1]) for param, src in inputs.get(key, {}).items()},
        )
        parts.setdefault(row[0], _packed.Part()).add_record(record)
    db.executemany(
        "INSERT INTO step_records (run_id, steps, times, outputs, hits) VALUES (?, ?, ?, ?, ?)",
        [(run_id, *part.columns()) for run_id, part in parts.items()],
    )
    for table in ("consumed", "step_outputs", "step_runs"):
        db.execute(f"DROP TABLE IF EXISTS {table}")


def _schema_state(db: sqlite3.Connection) -> tuple[int | None, bool]:
    """The schema version recorded (None if none) and whether every table and index is there.

    One read transaction: in WAL mode it never waits for a writer, so opening a store that is up
    to date never touches the write lock.
    """
    db.execute("BEGIN")
    try:
        names = {
            row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'index')")
        }
        row = None
        if "meta" in names:
            row = db.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
    finally:
        db.execute("COMMIT")
    return (None if row is None else int(row[0])), names >= _SCHEMA_OBJECTS


def _ensure_schema(db: sqlite3.Connection) -> str | None:
    """Create or migrate the schema in one ``IMMEDIATE`` transaction; the newer version found, if any."""
    db.execute("BEGIN IMMEDIATE")
    try:
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        row = db.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
        found = None if row is None else int(row[0])
        if found is not None and found > SCHEMA_VERSION:
            db.execute("ROLLBACK")
            return str(found)
        if found is not None and found < 2:
            _migrate_v1(db)
        for table, column, kind in _ADDED_COLUMNS:
            have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        for index in _DROPPED_INDEXES:
            db.execute(f"DROP INDEX IF EXISTS {index}")
        db.execute(
            "INSERT INTO meta (name, value) VALUES ('schema_version', ?) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (str(SCHEMA_VERSION),),
        )
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return None


def _prepare(db: sqlite3.Connection, db_path: Path, create: bool) -> str | None:
    """Set the connection up and bring the schema up to date; returns the version found, if newer.

    With ``create`` False nothing is written: a store whose schema is missing or older is refused.

    Raises:
        StoreError: ``create`` is False and the schema is not this flowyml's, or the write lock
            could not be had within :data:`LOCK_DEADLINE_SECONDS`.
    """
    db.execute(f"PRAGMA busy_timeout = {busy_timeout_ms()}")
    if create and db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        retry_locked_sync(lambda: db.execute("PRAGMA journal_mode = WAL"), where=db_path)
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
    if create:
        db.execute("PRAGMA wal_autocheckpoint = 0")
    version, complete = retry_locked_sync(lambda: _schema_state(db), where=db_path)
    if version is not None and version > SCHEMA_VERSION:
        return str(version)
    if version == SCHEMA_VERSION and complete:
        return None
    if not create:
        if version is None or version == SCHEMA_VERSION:
            raise StoreError(
                f"{db_path} is not a complete flowyml store (its schema is missing parts); "
                "run a pipeline on it to repair it (reading it does not)"
            )
        raise StoreError(
            f"the flowyml store at {db_path.parent} has schema version {version}, older than this "
            f"flowyml's ({SCHEMA_VERSION}); run a pipeline on it to upgrade it (reading it does not)"
        )
    return retry_locked_sync(lambda: _ensure_schema(db), where=db_path)


def retry_locked_sync(operation: Callable[[], _T], *, max_wait: float = 2.0, where: object = None) -> _T:
    """:func:`retry_locked` for code already on the connection's thread (opening the store)."""
    limit = _deadline()
    start = time.monotonic()
    delay = 0.01
    while True:
        try:
            return operation()
        except sqlite3.OperationalError as exc:
            if not is_locked_error(exc):
                raise
            waited = time.monotonic() - start
            if waited >= limit:
                raise _gave_up(where, waited, limit) from exc
        time.sleep(min(delay * (0.5 + random.random()), limit - waited))
        delay = min(delay * 2, max_wait)


def check_files(root: Path) -> None:
    """Refuse a store whose directory, database or artifact folders others could have written.

    Raises:
        StoreError: see :func:`_safety.check_private`.
    """
    check_private(root, "directory", directory=True)
    db_path = root / DB_NAME
    check_private(db_path, "database", directory=False)
    for suffix in ("-wal", "-shm"):
        check_private(db_path.with_name(DB_NAME + suffix), "database", directory=False)
    for folder in ("artifacts", "artifacts/.tmp", "quarantine"):
        check_private(root / folder, "folder", directory=True)


def writable(root: Path) -> bool:
    """True when this process may write the store's directory and database."""
    db_path = root / DB_NAME
    return os.access(root, os.W_OK) and (not db_path.exists() or os.access(db_path, os.W_OK))


async def _open(target: str, *, uri: bool) -> aiosqlite.Connection:
    pending = aiosqlite.connect(target, uri=uri, isolation_level=None, check_same_thread=False)
    # A daemon thread: a store nobody closed must not keep the interpreter from exiting (the
    # registry closes stores at exit; WAL keeps the database consistent if it cannot).
    pending._thread.daemon = True
    return await pending


async def connect(root: Path, *, create: bool = True) -> tuple[aiosqlite.Connection, bool]:
    """Open the store's database and bring its schema up to date; returns it and whether it is read-only.

    With ``create`` False the database must exist and be up to date: opening writes nothing and
    never waits for the write lock (reads need none in WAL mode). A store this process may not
    write (a directory 0o500, files 0o400) is opened read-only, with ``create`` or without: if
    SQLite cannot set up its shared-memory file there, the database is read as immutable.

    Raises:
        StoreError: the database cannot be opened, was made by a newer flowyml, or (``create``
            False, or read-only) is not up to date.
    """
    db_path = root / DB_NAME
    read_only = db_path.exists() and not writable(root)
    if read_only:
        base = f"file:{quote(str(db_path))}?mode=ro"
        try:
            conn = await _open(base, uri=True)
            await on_thread(conn, lambda db: _prepare(db, db_path, False))
        except sqlite3.OperationalError:
            with contextlib.suppress(UnboundLocalError):
                await close(conn)
            conn = await _open(base + "&immutable=1", uri=True)
    elif create:
        try:
            _touch_private(db_path)
        except OSError as exc:
            raise StoreError(f"cannot create the flowyml store database {db_path}: {exc}") from exc
        conn = await _open(str(db_path), uri=False)
    else:
        # mode=rw: an existing database only; a file removed meanwhile is an error, not a new store.
        conn = await _open(f"file:{quote(str(db_path))}?mode=rw", uri=True)
    try:
        newer = await on_thread(conn, lambda db: _prepare(db, db_path, create and not read_only))
        if newer is not None:
            raise StoreError(
                f"the flowyml store at {root} has schema version {newer}, newer than this flowyml "
                f"understands ({SCHEMA_VERSION}). Upgrade flowyml or use another cache_dir."
            )
    except BaseException:
        await close(conn)
        raise
    return conn, read_only


async def close(conn: aiosqlite.Connection) -> None:
    """Close ``conn`` and join aiosqlite's worker thread, so that no thread outlives the store."""
    try:
        await conn.close()
    finally:
        thread = getattr(conn, "_thread", None)
        if thread is not None and thread.is_alive():
            # close() returns once the thread has run its stop sentinel; it exits right after.
            thread.join(timeout=5.0)
