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
"""

from __future__ import annotations

__all__ = (
    "DB_NAME",
    "SCHEMA_VERSION",
    "close",
    "connect",
    "is_locked_error",
    "retry_locked",
)

import asyncio
import os
import random
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import aiosqlite

from flowyml._errors import StoreError

DB_NAME = "flowyml.db"
SCHEMA_VERSION = 1
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
CREATE TABLE IF NOT EXISTS step_runs (
    run_id             TEXT NOT NULL,
    step_name          TEXT NOT NULL,
    status             TEXT NOT NULL,
    attempts           INTEGER NOT NULL DEFAULT 0,
    started_at         REAL,
    ended_at           REAL,
    duration_seconds   REAL,
    cached             INTEGER NOT NULL DEFAULT 0,
    cache_key          TEXT,
    time_saved_seconds REAL NOT NULL DEFAULT 0,
    error_type         TEXT,
    error_message      TEXT,
    traceback          TEXT,
    seq                INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, step_name)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS step_runs_step ON step_runs (step_name);
CREATE TABLE IF NOT EXISTS step_outputs (
    run_id        TEXT NOT NULL,
    step_name     TEXT NOT NULL,
    output_name   TEXT NOT NULL,
    artifact_hash TEXT,
    PRIMARY KEY (run_id, step_name, output_name)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS step_outputs_name ON step_outputs (output_name);
CREATE TABLE IF NOT EXISTS consumed (
    run_id        TEXT NOT NULL,
    step_name     TEXT NOT NULL,
    parameter     TEXT NOT NULL,
    producer_step TEXT NOT NULL,
    output_name   TEXT NOT NULL,
    artifact_hash TEXT,
    PRIMARY KEY (run_id, step_name, parameter)
) WITHOUT ROWID;
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
        await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        await retry_locked(lambda: conn.execute("PRAGMA journal_mode = WAL"))
        await conn.execute("PRAGMA synchronous = NORMAL")

        async def rollback() -> None:
            if conn.in_transaction:
                await conn.execute("ROLLBACK")

        async def ensure_schema() -> str | None:
            await conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        await conn.execute(statement)
                async with conn.execute("SELECT value FROM meta WHERE name = 'schema_version'") as cur:
                    row = await cur.fetchone()
                if row is None:
                    await conn.execute(
                        "INSERT INTO meta (name, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                    )
                await conn.execute("COMMIT")
            except BaseException:
                await rollback()
                raise
            return None if row is None else str(row[0])

        found = await retry_locked(ensure_schema, on_retry=rollback)
        if found is not None and int(found) > SCHEMA_VERSION:
            raise StoreError(
                f"the flowyml store at {root} has schema version {found}, newer than this flowyml "
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
