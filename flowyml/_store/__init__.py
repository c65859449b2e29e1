"""The cache and lineage store: SQLite index (aiosqlite, one writer task) plus artifact files.

Layers, bottom up: ``_records`` (frozen values handed out), ``_packed`` (lineage rows packed per
writer batch), ``_db`` (schema, connection, lock retries), ``_artifacts`` (content-addressed
files), ``_api`` (the :class:`Store` the engine and the CLI use), ``_safety`` (what is checked before a
directory, file or row is trusted), ``_registry`` (one shared store per process and directory).
This package only re-exports.
"""

from __future__ import annotations

__all__ = (
    "INLINE_LIMIT",
    "PRELOAD_PER_STEP",
    "RUN_STATES",
    "STATUSES",
    "STEP_STATES",
    "CacheEntry",
    "CacheStats",
    "CacheView",
    "CachedOutput",
    "Lineage",
    "LineageNode",
    "RunDetail",
    "RunRecord",
    "StepCacheStats",
    "StepFate",
    "StepShape",
    "StepRecord",
    "Store",
    "VerifyProblem",
    "VerifyReport",
    "close_stores",
    "open_store",
    "resolve_root",
    "shared_store",
)

from ._api import INLINE_LIMIT, PRELOAD_PER_STEP, CacheView, StepFate, StepShape, Store, resolve_root
from ._records import (
    RUN_STATES,
    STATUSES,
    STEP_STATES,
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
from ._registry import close_stores, open_store, shared_store
