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
  several processes sharing a store wait for each other instead of failing.
- ``synchronous=NORMAL`` in WAL mode keeps the database consistent across a process crash; a power
  loss may drop the last commits, which only turns cache hits into misses. Artifact files are
  fsynced before the index row naming them is committed, so a row never names a missing file
  because of a crash.
- Lineage is packed: one ``step_records`` row holds the step runs of one writer batch (see
  ``_packed``). Schema 1 had a row per step, output and consumed input; opening such a store
  converts it once, in the schema transaction.
- Opening runs every pragma and the schema transaction in one call on the connection's thread
  (:func:`on_thread`), not one awaited hop per statement.
"""

from __future__ import annotations

__all__ = (
    "DB_NAME",
    "SCHEMA_VERSION",
    "close",
    "connect",
    "is_locked_error",
    "on_thread",
    "retry_locked",
    "retry_locked_sync",
)

import asyncio
import os
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import aiosqlite

from flowyml._errors import StoreError

from . import _packed
from ._records import StepRecord

DB_NAME = "flowyml.db"
SCHEMA_VERSION = 2
BUSY_TIMEOUT_MS = 30_000

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
    error_message      TEXT
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
    created_at       REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS cache_entries_step ON cache_entries (step_name);
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
"""


def is_locked_error(exc: BaseException) -> bool:
    """True for SQLite's "database is locked" / "busy" errors, which are worth retrying."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    text = str(exc).lower()
    return "locked" in text or "busy" in text


async def retry_locked(
    operation: Callable[[], Awaitable[_T]],
    *,
    on_retry: Callable[[], Awaitable[None]] | None = None,
    max_wait: float = 2.0,
) -> _T:
    """Run ``operation`` until it does not fail with a locked database.

    SQLite's own busy handler already waited ``busy_timeout`` before the error surfaced, so a lock
    held that long means another process is committing a lot; waiting longer is always better than
    losing the write. ``on_retry`` runs before each new attempt (to roll back a failed transaction).
    """
    delay = 0.01
    while True:
        try:
            return await operation()
        except sqlite3.OperationalError as exc:
            if not is_locked_error(exc):
                raise
        if on_retry is not None:
            await on_retry()
        await asyncio.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, max_wait)


def _touch_private(path: Path) -> None:
    """Create ``path`` if needed and make it readable and writable by its owner only."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
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


def _prepare(db: sqlite3.Connection) -> str | None:
    """Set the connection up and bring the schema up to date; returns the version found, if newer."""
    db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    retry_locked_sync(lambda: db.execute("PRAGMA journal_mode = WAL"))
    db.execute("PRAGMA synchronous = NORMAL")

    def ensure_schema() -> str | None:
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

    return retry_locked_sync(ensure_schema)


def retry_locked_sync(operation: Callable[[], _T], *, max_wait: float = 2.0) -> _T:
    """:func:`retry_locked` for code already on the connection's thread (opening the store)."""
    delay = 0.01
    while True:
        try:
            return operation()
        except sqlite3.OperationalError as exc:
            if not is_locked_error(exc):
                raise
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, max_wait)


async def connect(root: Path) -> aiosqlite.Connection:
    """Open (creating if needed) the store's database and bring its schema up to date.

    Raises:
        StoreError: the database cannot be opened, or was made by a newer flowyml.
    """
    db_path = root / DB_NAME
    try:
        _touch_private(db_path)
    except OSError as exc:
        raise StoreError(f"cannot create the flowyml store database {db_path}: {exc}") from exc
    conn = await aiosqlite.connect(db_path, isolation_level=None, check_same_thread=False)
    try:
        newer = await on_thread(conn, _prepare)
        if newer is not None:
            raise StoreError(
                f"the flowyml store at {root} has schema version {newer}, newer than this flowyml "
                f"understands ({SCHEMA_VERSION}). Upgrade flowyml or use another cache_dir."
            )
    except BaseException:
        await close(conn)
        raise
    return conn


async def close(conn: aiosqlite.Connection) -> None:
    """Close ``conn`` and join aiosqlite's worker thread, so that no thread outlives the store."""
    try:
        await conn.close()
    finally:
        thread = getattr(conn, "_thread", None)
        if thread is not None and thread.is_alive():
            # close() returns once the thread has run its stop sentinel; it exits right after.
            thread.join(timeout=5.0)
