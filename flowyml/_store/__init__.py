"""The cache and lineage store: SQLite index (aiosqlite, one writer task) plus artifact files.

Layers, bottom up: ``_records`` (frozen values handed out), ``_packed`` (lineage rows packed per
writer batch), ``_db`` (schema, connection, lock retries), ``_artifacts`` (content-addressed
files), ``_api`` (the :class:`Store` the engine and the CLI use). This package only re-exports.
"""

from __future__ import annotations

__all__ = (
    "INLINE_LIMIT",
    "PRELOAD_PER_STEP",
    "STATUSES",
    "CacheEntry",
    "CacheStats",
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
    "resolve_root",
)

from ._api import INLINE_LIMIT, PRELOAD_PER_STEP, StepFate, StepShape, Store, resolve_root
from ._records import (
    STATUSES,
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
