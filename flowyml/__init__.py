"""flowyml: plain Python functions as pipeline steps, run on an asyncio engine.

This module only re-exports. Data flows define -> plan -> run -> record (docs/architecture.md):

- define: ``_step``, ``_retry``, ``_fallback``, ``_breaker``, ``_conditions``, ``_context``,
  ``_assets``, ``_parallel``, ``_layers``, ``_limits``   describing work: ``@step`` and its layers
- plan: ``_graph``, ``_resources``         bind parameters, wire edges, reject bad graphs (pure)
- run: ``_scheduler`` (counters), ``_state``, ``_attempt`` (one unit's layers), ``_gates``,
  ``_map`` (mapped steps, stream sources), ``_groups``, ``_remote``
- record: ``_cache``, ``_cachestore``      cache look-ups and lineage records around each step
- foundation: ``_errors``, ``_results``, ``_executors``, ``_hashing``, ``_store``, ``_catalog``
- ``_pipeline``                            ``Pipeline``: plan once, run many times
"""

import typing as _typing

from . import errors as errors
from ._assets import Asset, AssetMetadata, Dataset, FeatureSet, Metrics, Model
from ._breaker import CircuitBreaker, CircuitState, CircuitStats
from ._catalog import AssetEntry, AssetRouter, LocalRouter, catalog
from ._conditions import ControlContext, If, unless, when
from ._context import Context, context
from ._errors import (
    CircuitOpenError,
    ConfigError,
    CycleError,
    DuplicateOutputError,
    FlowymlError,
    MissingInputError,
    StepTimeoutError,
)
from ._executors._base import Executor
from ._executors._dask import DaskExecutor
from ._executors._local import LocalExecutor
from ._fallback import FallbackHandler, on_failure
from ._limits import Limit
from ._parallel import parallel_map
from ._pipeline import Pipeline
from ._report import PipelineResult
from ._results import AttemptError, ExecutionResult, ItemFailed, ItemResult, StepResult, StepStatus
from ._retry import ExponentialBackoff, RetryConfig, retry
from ._step import CachePolicy, Step, step

__version__ = "0.1.0"

if _typing.TYPE_CHECKING:
    from ._store import Store, close_stores, open_store


def __getattr__(name: str) -> object:
    # The store pulls in aiosqlite; load it only when someone asks for it.
    if name == "Store":
        from ._store import Store

        return Store
    if name == "CacheStore":
        from ._cachestore import CacheStore

        return CacheStore
    if name in ("close_stores", "open_store"):
        from . import _store

        found: object = getattr(_store, name)
        return found
    raise AttributeError(f"module 'flowyml' has no attribute {name!r}")


__all__ = (
    "Asset",
    "AssetEntry",
    "AssetMetadata",
    "AssetRouter",
    "AttemptError",
    "CachePolicy",
    "CacheStore",
    "CircuitBreaker",
    "CircuitOpenError",
    "CircuitState",
    "CircuitStats",
    "ConfigError",
    "Context",
    "ControlContext",
    "CycleError",
    "DaskExecutor",
    "Dataset",
    "DuplicateOutputError",
    "ExecutionResult",
    "Executor",
    "ExponentialBackoff",
    "FallbackHandler",
    "FeatureSet",
    "FlowymlError",
    "If",
    "ItemFailed",
    "ItemResult",
    "Limit",
    "LocalExecutor",
    "LocalRouter",
    "Metrics",
    "MissingInputError",
    "Model",
    "Pipeline",
    "PipelineResult",
    "RetryConfig",
    "Step",
    "StepResult",
    "StepStatus",
    "StepTimeoutError",
    "Store",
    "catalog",
    "close_stores",
    "context",
    "on_failure",
    "open_store",
    "parallel_map",
    "retry",
    "step",
    "unless",
    "when",
)
