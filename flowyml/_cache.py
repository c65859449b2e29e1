"""The cache and lineage layer of a run: keys, look-ups, single-flight, and records.

It plugs into the unit runner as :class:`~flowyml._attempt.RunHooks`. Before a step runs, its
key is made from what the step really receives (``_hashing`` is the only place keys are made),
the store is asked (from memory when the run preloaded it), and a run that needs a key another
run in this process is computing waits for that value instead of computing it again. The
look-up returns what it found (:class:`~flowyml._attempt.Lookup`); the runner applies it. After a
step, successful outputs are put in the store and every fate is recorded; both only enqueue —
the store's single writer commits them off the hot path. Recording a step that did not fail
appends four items to a list (``Store.record_fate``) and the writer builds its record; what never
changes between runs of a plan (names, inputs) is encoded once per node, in the plan.
"""

from __future__ import annotations

import asyncio
import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ._attempt import Lookup, RunHooks
from ._errors import UncachedStepWarning, UnhashableInputError
from ._graph import Node, Plan
from ._hashing import cache_key, fingerprint_function, hash_value
from ._results import StepResult, StepStatus
from ._step import CachePolicy
from ._store import StepRecord, Store

__all__ = ("StoreHooks",)


_Outcome = Store | None  # the store whose memory holds the value a claim computed, or None
_inflight: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple[Path, str], asyncio.Future[_Outcome]]
]
_inflight = weakref.WeakKeyDictionary()


class StoreHooks(RunHooks):
    """Cache look-ups before each step and cache writes plus lineage records after it."""

    def __init__(self, store: Store, plan: Plan, *, run_id: str, caching: bool, recording: bool) -> None:
        self.store = store
        self.plan = plan
        self.run_id = run_id
        self.caching = caching
        self.recording = recording
        self._keys: dict[int, str] = {}
        self._claims: dict[int, asyncio.Future[_Outcome]] = {}
        self._settled: list[tuple[Path, str]] = []
        self._hit_hashes: dict[int, dict[str, str]] = {}
        self._uncacheable: set[int] = set()
        self._digests: dict[int, str] = {}
        self._hashing: dict[int, asyncio.Future[str]] = {}
        self._hash_pool: ThreadPoolExecutor | None = None
        self._inflight = _inflight.setdefault(asyncio.get_running_loop(), {})
        self._shapes = plan.shapes
        self._fingerprints: dict[int, tuple[Callable[..., Any], str]] = {}
        self._record_fate = store.record_fate

    async def lookup(self, node: Node, args: list[Any], kwargs: dict[str, Any]) -> Lookup | None:
        step = node.step
        if not self.caching or step.cache is False or node.id in self._uncacheable:
            return None
        if not callable(step.cache):
            await self._hash_large_inputs(node, args, kwargs)
        key = self._key(node, args, kwargs)
        if key is None:
            return None
        self._keys[node.id] = key
        store = self.store
        flight = (store.root, key)
        while True:
            entry = await store.lookup(key)
            if entry is not None:
                outputs = await store.load(entry)
                if outputs is not None:
                    if self.recording:
                        self._hit_hashes[node.id] = {o.name: o.artifact_hash for o in entry.outputs}
                    return Lookup(key, outputs, entry.duration_seconds)
            pending = self._inflight.get(flight)
            if pending is None:
                claim: asyncio.Future[_Outcome] = asyncio.get_running_loop().create_future()
                self._inflight[flight] = self._claims[node.id] = claim
                return Lookup(key)
            outcome = await asyncio.shield(pending)
            if outcome is not None:
                # A fresh, hash-checked copy of what the other run cached: never its live objects.
                shared = await outcome.lookup(key, query=False)
                outputs = await store.load(shared) if shared is not None else None
                if shared is not None and outputs is not None:
                    if self.recording:
                        self._hit_hashes[node.id] = {o.name: o.artifact_hash for o in shared.outputs}
                    return Lookup(key, outputs, shared.duration_seconds)
            if self._inflight.get(flight) is pending:
                claim = asyncio.get_running_loop().create_future()
                self._inflight[flight] = self._claims[node.id] = claim
                return Lookup(key)

    def _fingerprint(self, func: Callable[..., Any]) -> str:
        """The code fingerprint of ``func``, made once per run (steps often share a function).

        Not across runs: a closure or global value changed between runs must change the key.
        """
        found = self._fingerprints.get(id(func))
        if found is not None and found[0] is func:
            return found[1]
        fingerprint = fingerprint_function(func)
        self._fingerprints[id(func)] = (func, fingerprint)
        return fingerprint

    def _step_fingerprint(self, node: Node) -> str:
        try:
            return self._fingerprint(node.step.func)
        except UnhashableInputError as exc:
            raise UnhashableInputError(
                f"step {node.name!r} cannot be cached under cache='code_hash': {exc.path} has no "
                "deterministic hash, and closure values, default arguments and global data are part "
                "of the code fingerprint. Use cache='input_hash' or cache=False for this step, "
                "CachePolicy('code_hash', on_unhashable='warn'), or give the object a "
                "__flowyml_hash__ method.",
                step_name=node.name,
                path=exc.path,
            ) from exc

    def check_fingerprints(self) -> None:
        """Make every code fingerprint the run needs now, before any step runs.

        A closure value with no deterministic hash is visible up front, so it is reported up
        front (or, with ``on_unhashable="warn"``, the step will run uncached).

        Raises:
            UnhashableInputError: naming the step and the value's path.
        """
        if not self.caching:
            return
        for node in self.plan.nodes:
            policy = node.step.cache
            strategy = policy.strategy if isinstance(policy, CachePolicy) else policy
            if strategy != "code_hash":
                continue
            try:
                self._step_fingerprint(node)
            except UnhashableInputError as exc:
                if not (isinstance(policy, CachePolicy) and policy.on_unhashable == "warn"):
                    raise
                self._uncacheable.add(node.id)
                warnings.warn(UncachedStepWarning(f"{exc} The step runs without its cache."), stacklevel=3)

    def _key(self, node: Node, args: list[Any], kwargs: dict[str, Any]) -> str | None:
        step = node.step
        strategy: Any = step.cache
        on_unhashable = "raise"
        if isinstance(strategy, CachePolicy):
            strategy, on_unhashable = strategy.strategy, strategy.on_unhashable
        identity = node.identity
        try:
            if callable(strategy):
                user_key = strategy(*args, **kwargs)
                return cache_key(
                    step_identity=identity,
                    fingerprint=None,
                    inputs={"key": user_key},
                    params={},
                    step_name=node.name,
                )
            inputs: dict[str, Any] = {}
            params: dict[str, Any] = {}
            for (label, slot), value in zip(node.labels, [*args, *kwargs.values()], strict=True):
                if slot >= 0:
                    inputs[label] = _Digest(self._slot_digest(node, label, slot, value))
                else:
                    params[label] = value
            fingerprint = self._step_fingerprint(node) if strategy == "code_hash" else None
            return cache_key(
                step_identity=identity,
                fingerprint=fingerprint,
                inputs=inputs,
                params=params,
                step_name=node.name,
            )
        except UnhashableInputError as exc:
            if on_unhashable == "raise":
                raise
            warnings.warn(UncachedStepWarning(f"{exc}; the step runs without its cache"), stacklevel=2)
            return None

    def _slot_digest(self, node: Node, label: str, slot: int, value: Any) -> str:
        """The value hash of one upstream output, made once per run however many steps read it."""
        digest = self._digests.get(slot)
        if digest is None:
            digest = self._digests[slot] = _hash_input(node.name, label, value)
        return digest

    async def _hash_large_inputs(self, node: Node, args: list[Any], kwargs: dict[str, Any]) -> None:
        """Hash big upstream values in a worker thread, so the event loop keeps serving other tasks."""
        for (label, slot), value in zip(node.labels, [*args, *kwargs.values()], strict=True):
            if slot >= 0 and slot not in self._digests and _is_large(value):
                hashing = self._hashing.get(slot)
                if hashing is None:  # steps reading the same value share one hashing thread
                    if self._hash_pool is None:
                        self._hash_pool = ThreadPoolExecutor(1, thread_name_prefix="flowyml-hash")
                    hashing = self._hashing[slot] = asyncio.get_running_loop().run_in_executor(
                        self._hash_pool, _hash_input, node.name, label, value
                    )
                self._digests[slot] = await asyncio.shield(hashing)

    def key(self, node: Node, args: list[Any], kwargs: dict[str, Any]) -> str | None:
        """Make the step's key without looking it up, so that :meth:`after` can cache its outputs."""
        if not self.caching or node.step.cache is False:
            return None
        key = self._key(node, args, kwargs)
        if key is not None:
            self._keys[node.id] = key
        return key

    def after(self, node: Node, res: StepResult, args: list[Any], kwargs: dict[str, Any]) -> None:
        hashes = self._cache_after(node, res) if self.caching else None
        if self.recording:
            if res.error is None:
                # The hot path: four items appended; the writer builds the record when it commits.
                self._record_fate(self.run_id, res, hashes, self._shapes[node.id])
            else:
                self.store.record_step(self.record(node, res, hashes))

    def _cache_after(self, node: Node, res: StepResult) -> dict[str, str] | None:
        """Settle this step's single-flight claim and cache its outputs; their artifact hashes."""
        key = self._keys.pop(node.id, None)
        claim = self._claims.pop(node.id, None)
        ok = res.status is StepStatus.SUCCEEDED and not res.fallback_reasons
        hashes = self._hit_hashes.pop(node.id, None) if self._hit_hashes else None
        try:
            if ok and key is not None:
                hashes = self.store.put(
                    key=key,
                    step_name=node.name,
                    run_id=self.run_id,
                    outputs=res.outputs,
                    duration=res.duration_seconds,
                )
        finally:
            if claim is not None:
                cached = ok and hashes is not None
                claim.set_result(self.store if cached else None)
                if cached:
                    self._settled.append((self.store.root, key or ""))
                else:
                    self._forget((self.store.root, key or ""), claim)
        return hashes

    def _forget(self, flight: tuple[Path, str], claim: asyncio.Future[_Outcome] | None = None) -> None:
        if claim is None or self._inflight.get(flight) is claim:
            self._inflight.pop(flight, None)

    def release(self) -> None:
        """Forget this run's computed values once the store has committed them.

        Until then a concurrent run in this process that needs one of these keys gets the value
        from here: its own store cannot see the entry before the commit.
        """
        for flight in self._settled:
            pending = self._inflight.get(flight)
            if pending is not None and pending.done():
                del self._inflight[flight]
        self._settled.clear()
        if self._hash_pool is not None:
            self._hash_pool.shutdown(wait=True)  # no thread outlives the run
            self._hash_pool = None

    def record(self, node: Node, res: StepResult, hashes: dict[str, str] | None = None) -> StepRecord:
        """The lineage row of one step's fate in this run."""
        err = res.error
        return StepRecord(
            run_id=self.run_id,
            step_name=node.name,
            status=res.status.value,
            attempts=res.attempts,
            started_at=res.start_time,
            ended_at=res.end_time,
            duration_seconds=res.duration_seconds,
            cached=res.status is StepStatus.CACHED,
            cache_key=res.cache_key,
            time_saved_seconds=res.time_saved_seconds,
            error_type=None if err is None else type(err).__qualname__,
            error_message=None if err is None else str(err),
            traceback=res.traceback,
            outputs={n: (hashes or {}).get(n) for n in res.outputs} if res.outputs else {},
            inputs=dict(node.lineage_inputs),
        )


class _Digest:
    """An upstream value in a cache key, by the hash already made of it."""

    __slots__ = ("digest",)

    def __init__(self, digest: str) -> None:
        self.digest = digest

    def __flowyml_hash__(self) -> object:
        return ("digest", self.digest)


def _hash_input(step_name: str, label: str, value: Any) -> str:
    try:
        return hash_value(value, path=label)
    except UnhashableInputError as exc:
        raise UnhashableInputError(
            f"step {step_name!r}, parameter {label!r}: {exc}", step_name=step_name, path=exc.path
        ) from None


def _is_large(value: Any) -> bool:
    """Cheap guess whether hashing ``value`` takes long enough to be worth a worker thread."""
    size = getattr(value, "nbytes", None)
    if isinstance(size, int):
        return size > 1 << 20
    try:
        return len(value) > 20_000
    except TypeError:
        return False
