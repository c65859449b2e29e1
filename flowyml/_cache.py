"""The cache and lineage layer of a run: keys, look-ups, single-flight, and records.

It plugs into the unit runner as :class:`~flowyml._attempt.RunHooks`. Before a step runs, its
key is made from what the step really receives (``_hashing`` is the only place keys are made),
the store is asked (from memory when the run preloaded it), and a run that needs a key another
run in this process is computing waits for that value instead of computing it again. The
look-up returns what it found (:class:`~flowyml._attempt.Lookup`) and why the step runs or not
(its ``cache_reason``); the runner applies it.

Keys are chained through producers: an input another step produced is identified by what
produced it -- the artifact hash of the cached (or served) output, else the producer's key and
the output's name -- never by hashing the value again. Only a value whose producer has no key
(``cache=False``, a fallback value, a step that ran uncached) is identified by its content
(:func:`~flowyml._hashing.content_identity`), once per run however many steps read it. A value
that can be identified in no way makes its consumer run uncached, with one warning; a key is
never made from the remaining parts.

Beside each key that missed, its components (the digest of each input, parameter, the step's
code and each helper, closure value and global it reads) are queued to the store's writer, so
that the next miss of the step can say what changed (``"input 'data' changed"``) by comparing
digests, and ``flowyml explain`` can list them. A hit builds none of this. After a
step, successful outputs are put in the store and every fate is recorded; both only enqueue —
the store's single writer commits them off the hot path. Recording a step that did not fail
appends four items to a list (``Store.record_fate``) and the writer builds its record, quoting
what never changes between runs of a plan (names, inputs: the node's ``StepShape``) as it packs it.
"""

from __future__ import annotations

import asyncio
import json
import struct
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, TypeAlias

import xxhash

from ._attempt import CACHE_HIT, Lookup, RunHooks
from ._errors import UncachedStepWarning, UnhashableInputError
from ._graph import MISSING, SLOT, MapSpec, Node, Plan, Source
from ._hashing import (
    KeyLayout,
    content_identity,
    fingerprint_chunk,
    fingerprint_parts,
    identity_chunk,
    key_head,
    key_layout,
    key_of,
    layout_key,
)
from ._results import ItemFailed, StepResult, StepStatus
from ._step import CachePolicy
from ._store import CacheView, StepRecord, Store

__all__ = ("FIRST_RUN", "PlanKeys", "StoreHooks", "changed_parts", "describe_change", "part_name")

FIRST_RUN = "first run of this step"
UNCHANGED_KEY = "no cache entry for an unchanged key"

_KeyParts = dict[str, str]
_Previous = dict[str, tuple[str, str]]
_NOT_YET = object()


_Outcome = Store | None  # the store whose memory holds the value a claim computed, or None
_Flight: TypeAlias = "asyncio.Future[_Outcome] | Store | StoreHooks"
"""A key being computed -- by the run of those hooks, while no one waits for it; else the
future its waiters await -- or computed and held in that store's memory."""
_inflight: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Path, dict[str, _Flight]]]
_inflight = weakref.WeakKeyDictionary()


class StoreHooks(RunHooks):
    """Cache look-ups before each step and cache writes plus lineage records after it."""

    def __init__(
        self,
        store: Store,
        plan: Plan,
        *,
        run_id: str,
        caching: bool,
        recording: bool,
        keys: PlanKeys | None = None,
    ) -> None:
        self.store = store
        self.plan = plan
        self.run_id = run_id
        self.caching = caching
        self.recording = recording
        self.view: CacheView | None = None
        """What the store preloaded for this run (``Store.preload``), set by the pipeline."""
        self._keys: dict[int, str] = {}
        self._claims: set[int] = set()
        """Nodes whose key this run claimed (see ``_flights``)."""
        self._settled: list[str] = []
        self._hit_hashes: dict[int, dict[str, str]] = {}
        self._uncacheable: dict[int, str] = {}
        self._identities: list[bytes | None] = [None] * len(plan.slot_names)
        """Output slot -> what identifies its value (as a key takes it, :func:`identity_chunk`):
        set when its producer's key is known."""
        self._digests: dict[int, bytes | None] = {}
        """Output slot -> content identity of a value whose producer had no key (None: none)."""
        plan_keys = keys if keys is not None and keys.plan is plan else PlanKeys(plan)
        self._layouts = plan_keys.nodes
        self._key_shapes = plan_keys.shapes
        self._hashing: dict[int, asyncio.Future[str | None]] = {}
        self._hash_pool: ThreadPoolExecutor | None = None
        loop = asyncio.get_running_loop()
        self._flights = _inflight.setdefault(loop, {}).setdefault(store.root, {})
        """Key -> the claim of the run in this process that is computing it (single-flight)."""
        self._shapes = plan.shapes
        self._fingerprints: dict[int, tuple[Callable[..., Any], str, _KeyParts, bytes]] = {}
        self._record_fate = store.record_fate
        self._why: dict[int, str] = {}
        self._previous: asyncio.Future[_Previous] | None = None
        """The latest key components of each step of the plan, loaded (one query) at the first
        miss: an all-hit rerun never reads them."""
        self._previous_found = True
        """False once ``_previous`` is known to hold no step's components (a fresh store)."""
        self._waiters: list[asyncio.Future[None]] = []
        """Steps waiting for ``_previous`` (see :meth:`ready`)."""
        self._unsent: dict[int, tuple[str, str, _KeyParts]] = {}
        """Node -> the key, step name and components of a miss, until the step ends: they are
        written in its cache entry's row (one row a put, not two), else on their own."""
        self._made: dict[int, _Made | None] = {}
        """Keys :meth:`hit` made and did not find at once, for :meth:`lookup` to go on with."""

    def hit(self, node: Node, args: list[Any], kwargs: dict[str, Any]) -> Lookup | None:
        """The hit of a step whose entry is held in memory with inline outputs, decided without
        waiting; None leaves the step to :meth:`lookup` (which takes the key made here)."""
        if (
            not self.caching
            or node.step.cache is False
            or (self._uncacheable and node.id in self._uncacheable)
        ):
            return None
        laid = self._layouts[node.id] or self._node_key(node)
        if laid[0] == _BY_FUNCTION:
            return None  # a user's key function runs where its error can fail the step
        try:
            made = self._make(node, laid, args, kwargs, False)
        except Exception:
            return None  # lookup makes it again, and the error fails the step there
        if made is None or made is _HASH_FIRST:
            self._made[node.id] = made
            return None
        key = made[0]
        found = self.store.inline_hit(key, self.view)
        if found is None:
            self._made[node.id] = made
            return None
        self._keys[node.id] = key
        self._hit_hashes[node.id] = found[2]
        return Lookup(key, found[0], found[1], CACHE_HIT)

    async def lookup(self, node: Node, args: list[Any], kwargs: dict[str, Any]) -> Lookup | None:
        step = node.step
        if not self.caching or step.cache is False:
            return None
        uncacheable = self._uncacheable.get(node.id) if self._uncacheable else None
        if uncacheable is not None:
            return Lookup(None, reason=uncacheable)
        made = self._made.pop(node.id, _NOT_MADE) if self._made else _NOT_MADE
        checked = made is not _NOT_MADE and made is not _HASH_FIRST and made is not None
        if made is _NOT_MADE:  # hit() did not try (else ``checked``: it found no inline entry)
            made = self._key(node, args, kwargs, hash_large=False)
        if made is _HASH_FIRST:  # a big value whose producer had no key: hashed off the loop first
            await self._hash_large_inputs(node, args, kwargs)
            made = self._key(node, args, kwargs)
        if made is None:
            return Lookup(None, reason=self._why.pop(node.id, None))
        key = made[0]
        self._keys[node.id] = key
        store = self.store
        flights = self._flights
        hit = None if checked else store.inline_hit(key, self.view)
        if hit is not None:
            self._hit_hashes[node.id] = hit[2]
            return Lookup(key, hit[0], hit[1], CACHE_HIT)
        if store.absent(key, self.view) and key not in flights:
            # Known missing without a query (a fresh store, or a preloaded view that lacks it):
            # claimed at once, and without a coroutine when the previous parts are in.
            flights[key] = self
            self._claims.add(node.id)
            waiter = self._waiter()
            if waiter is not None:
                await waiter
            return Lookup(key, reason=self._miss_now(node, made))
        while True:
            entry = await store.lookup(key, view=self.view)
            if entry is not None:
                outputs = await store.load(entry)
                if outputs is not None:
                    self._hit_hashes[node.id] = {o.name: o.artifact_hash for o in entry.outputs}
                    return Lookup(key, outputs, entry.duration_seconds, CACHE_HIT)
            pending = flights.get(key)
            if pending is None:
                flights[key] = self
                self._claims.add(node.id)
                return Lookup(key, reason=await self._miss(node, made))
            if isinstance(pending, StoreHooks):  # the first to wait makes the future, for all
                pending = flights[key] = asyncio.get_running_loop().create_future()
            outcome = pending if isinstance(pending, Store) else await asyncio.shield(pending)
            if outcome is not None:
                # A fresh, hash-checked copy of what the other run cached: never its live objects.
                # Committed meanwhile, it left the store's memory: then the database has it.
                shared = await outcome.lookup(key, query=not outcome.closed)
                outputs = await store.load(shared) if shared is not None else None
                if shared is not None and outputs is not None:
                    self._hit_hashes[node.id] = {o.name: o.artifact_hash for o in shared.outputs}
                    return Lookup(key, outputs, shared.duration_seconds, CACHE_HIT)
            if flights.get(key) is pending:
                flights[key] = self
                self._claims.add(node.id)
                return Lookup(key, reason=await self._miss(node, made))

    async def _miss(self, node: Node, made: _Made) -> str:
        """Why a step whose key missed runs; queues the key's components to the store's writer."""
        waiter = self._waiter()
        if waiter is not None:
            await waiter
        return self._miss_now(node, made)

    async def ready(self) -> None:
        """Load what the reasons of misses are computed from, once per run (see :meth:`why`)."""
        waiter = self._waiter()
        if waiter is not None:
            await waiter

    async def prepare(self) -> None:
        """Before the run: load the previous parts now when the preloaded view holds nothing the
        run could hit (a first run: every cached step will miss and need them).

        One round trip before the steps start, instead of the load starting at the first miss
        while every step that misses before it lands waits for it: a future, a suspension and a
        wake-up each (at 20,000 steps of a fan-out, all of them). The reasons are the same: they
        are computed from the same rows, which nothing of this run has written yet.
        """
        view = self.view
        if not self.caching or view is None or view.entries:
            return
        if not any(node.step.cache is not False for node in self.plan.nodes):
            return  # no step is looked up: no miss needs them
        try:
            await self.ready()
        except BaseException:
            if self._previous is not None:
                self._previous.cancel()
            raise

    def _waiter(self) -> asyncio.Future[None] | None:
        """What a miss awaits before its reason can be computed (the previous parts loading,
        started at the first miss); None when it can be computed now.

        One plain future per waiter, woken by one callback: thousands of steps missing at once
        wait here, and a shield each would cost two callbacks and a future more. Awaited by the
        step itself, not through a coroutine of its own: each level is resumed at the wake-up.
        """
        previous = self._previous
        if previous is None:
            if not self.caching:
                return None
            previous = self._load_previous()
        if previous.done():
            return None
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return waiter

    def _load_previous(self) -> asyncio.Task[_Previous]:
        names = [n.name for n in self.plan.nodes]
        previous = self._previous = asyncio.get_running_loop().create_task(_latest_parts(self.store, names))
        previous.add_done_callback(self._wake)
        return previous

    def _wake(self, previous: asyncio.Task[_Previous]) -> None:
        if previous.cancelled() or previous.exception() is not None or not previous.result():
            self._previous_found = False  # none to compare with (a fresh store): every miss a first run
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():  # a waiter cancelled meanwhile is left alone
                waiter.set_result(None)

    def _miss_now(self, node: Node, made: _Made) -> str:
        key = made[0]
        parts = self._parts(node, made)
        known = self._latest(node.name) if self._previous_found else None
        if known is None or known[0] != key:
            self._unsent[node.id] = (key, node.name, parts)
        if known is None:
            return FIRST_RUN
        return describe_change(known[1], parts) if known[0] != key else UNCHANGED_KEY

    def _latest(self, step_name: str) -> tuple[str, _KeyParts] | None:
        previous = self._previous
        if previous is None or not previous.done() or previous.cancelled():
            return None
        found = previous.result().get(step_name)
        if found is None:
            return None
        key, parts = found
        return key, _loads_parts(parts) if isinstance(parts, str) else parts

    def _parts(self, node: Node, made: _Made) -> _KeyParts:
        """The components of a key made for ``node``, by name, each a short digest.

        Made from what the key was made of only when it missed: a hit never builds them.
        """
        _key, labels, identities = made
        kind, layout = (self._layouts[node.id] or self._node_key(node))[:2]
        # The step's identity as its layout's head encodes it (after the version, tag and
        # length): ``_short(f"{node.identity}|{strategy}")`` without formatting it again.
        parts: _KeyParts = {"step": _digest(layout[0][_IDENTITY_AT:] + _STRATEGY_TAGS[kind])}
        if len(identities) == 1:
            parts[labels[0]] = _digest(identities[0][8:])  # _short of the identity
        elif identities:
            parts.update(zip(labels, [_digest(chunk[8:]) for chunk in identities], strict=True))
        if kind == _BY_CODE:
            parts.update(self._fingerprints[id(node.step.func)][2])
        return parts

    def why(self, node: Node) -> str | None:
        return self._why.pop(node.id, None)

    def _fingerprint(self, func: Callable[..., Any]) -> str:
        """The code fingerprint of ``func``, made once per run (steps often share a function).

        Not across runs: a closure or global value changed between runs must change the key.
        Its parts are kept beside it, for the reason of a miss.
        """
        found = self._fingerprints.get(id(func))
        if found is not None and found[0] is func:
            return found[1]
        fingerprint, parts = fingerprint_parts(func)
        self._fingerprints[id(func)] = (func, fingerprint, parts, fingerprint_chunk(fingerprint))
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
        fingerprints = self._fingerprints
        for node in self.plan.nodes:
            if node.step.cache is False or self._node_key(node)[0] != _BY_CODE:
                continue
            func = node.step.func
            found = fingerprints.get(id(func))
            if found is not None and found[0] is func:
                continue  # steps often share a function: made once
            policy = node.step.cache
            try:
                self._step_fingerprint(node)
            except UnhashableInputError as exc:
                if not (isinstance(policy, CachePolicy) and policy.on_unhashable == "warn"):
                    raise
                self._uncacheable[node.id] = f"ran uncached: {_code_value(exc.path)} cannot be identified"
                warnings.warn(UncachedStepWarning(f"{exc} The step runs without its cache."), stacklevel=3)

    def _node_key(self, node: Node) -> _NodeKey:
        """How ``node``'s keys are laid out: made at its first key, kept with the plan."""
        made = self._layouts[node.id]
        if made is None:
            made = self._layouts[node.id] = _lay_out(node, self._key_shapes)
        return made

    def _key(
        self, node: Node, args: list[Any], kwargs: dict[str, Any], *, hash_large: bool = True
    ) -> _Made | None:
        """The step's key and what it was made of; None when some value cannot be identified
        (the reason is in ``_why``); with ``hash_large`` false, ``_HASH_FIRST`` instead of
        hashing a big value here (see :meth:`_hash_large_inputs`).

        Inputs are identified by their producers (see the module docstring), parameters by
        their content. Nothing is refused here: what can be refused is refused before the run.
        The fixed parts come encoded from the node's layout: a key is one join and one hash.

        Raises:
            UnhashableInputError: the code fingerprint cannot be made (only when it was not
                checked up front).
        """
        return self._make(node, self._layouts[node.id] or self._node_key(node), args, kwargs, hash_large)

    def _make(
        self, node: Node, laid: _NodeKey, args: list[Any], kwargs: dict[str, Any], hash_large: bool
    ) -> _Made | None:
        """:meth:`_key` with the node's layout at hand (the hot path of every look-up)."""
        kind, layout, positions, slots, labels, fed = laid
        if kind == _BY_FUNCTION:
            policy = node.step.cache
            strategy: Any = policy.strategy if isinstance(policy, CachePolicy) else policy
            user_key = content_identity(strategy(*args, **kwargs))
            if user_key is None:
                self._uncached(node, ["its cache key function's value"])
                return None
            key = key_of(step_identity=node.identity, fingerprint=None, inputs=[("key", user_key)], params=())
            return key, ("key",), (identity_chunk(user_key),)
        if kind == _BY_CODE:
            func = node.step.func
            found = self._fingerprints.get(id(func))
            if found is None or found[0] is not func:
                self._step_fingerprint(node)
                found = self._fingerprints[id(func)]
            fingerprint = found[3]
        else:
            fingerprint = _NO_FINGERPRINT
        if not slots:
            return layout_key(layout, fingerprint, ()), labels, ()
        identities = self._identities
        if fed:  # every argument an output: one pass, and the slow one only for an unknown value
            known = [identities[slot] for slot in slots]
            if None not in known:
                return layout_key(layout, fingerprint, known), labels, known  # type: ignore[arg-type,return-value]
        values = [*args, *kwargs.values()] if kwargs else args
        chunks: list[bytes] = []
        for at, slot in zip(positions, slots, strict=True):
            if slot >= 0:
                found_id = identities[slot]
                if found_id is None:
                    value = values[at]
                    if not hash_large and slot not in self._digests and _is_large(value):
                        return _HASH_FIRST
                    found_id = self._content(slot, value)
            else:
                digest = content_identity(values[at])
                found_id = identity_chunk(digest) if digest is not None else None
            if found_id is None:
                self._unknown(node, args, kwargs)
                return None
            chunks.append(found_id)
        return layout_key(layout, fingerprint, chunks), labels, chunks

    def _unknown(self, node: Node, args: list[Any], kwargs: dict[str, Any]) -> None:
        """Name, in the step's order, each argument that cannot be identified; the step runs uncached."""
        unknown: list[str] = []
        for (label, slot), value in zip(node.labels, [*args, *kwargs.values()], strict=True):
            known = self._content(slot, value) if slot >= 0 else content_identity(value)
            if known is None:
                unknown.append(f"parameter {label!r}")
        self._uncached(node, unknown, args, kwargs)

    def _uncached(
        self,
        node: Node,
        unknown: list[str],
        args: list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
    ) -> None:
        """Note and warn (once) that ``node`` runs uncached because of the values ``unknown`` names."""
        names = " and ".join(unknown)
        self._why[node.id] = f"ran uncached: {names} cannot be identified"
        types = ""
        if args is not None and kwargs is not None:
            named = dict(zip((label for label, _ in node.labels), [*args, *kwargs.values()], strict=True))
            types = (
                " ("
                + ", ".join(
                    f"{label}: {_type_name(named[label])}"
                    for label in named
                    if f"parameter {label!r}" in unknown
                )
                + ")"
            )
        warnings.warn(
            UncachedStepWarning(
                f"step {node.name!r} runs without its cache this time: {names}{types} cannot be "
                "identified (no canonical hash, and it cannot be pickled). Produce the value in a "
                "cached step (its key then identifies it), give its class __flowyml_hash__, or set "
                "cache=False on the step."
            ),
            stacklevel=4,
        )

    def _content(self, slot: int, value: Any) -> bytes | None:
        """The content identity of a value whose producer had no key, made once per run."""
        found = self._digests.get(slot, _NOT_YET)
        if found is _NOT_YET:
            digest = content_identity(value)
            found = self._digests[slot] = identity_chunk(digest) if digest is not None else None
        return found  # type: ignore[return-value]

    async def _hash_large_inputs(self, node: Node, args: list[Any], kwargs: dict[str, Any]) -> None:
        """Identify big keyless upstream values in a worker thread, so the event loop keeps serving."""
        for (_label, slot), value in zip(node.labels, [*args, *kwargs.values()], strict=True):
            if (
                slot >= 0
                and self._identities[slot] is None
                and slot not in self._digests
                and _is_large(value)
            ):
                hashing = self._hashing.get(slot)
                if hashing is None:  # steps reading the same value share one hashing thread
                    if self._hash_pool is None:
                        self._hash_pool = ThreadPoolExecutor(1, thread_name_prefix="flowyml-hash")
                    hashing = self._hashing[slot] = asyncio.get_running_loop().run_in_executor(
                        self._hash_pool, content_identity, value
                    )
                digest = await asyncio.shield(hashing)
                self._digests[slot] = identity_chunk(digest) if digest is not None else None

    def key(self, node: Node, args: list[Any], kwargs: dict[str, Any]) -> str | None:
        """Make the step's key without looking it up, so that :meth:`after` can cache its outputs."""
        if not self.caching or node.step.cache is False:
            return None
        uncacheable = self._uncacheable.get(node.id) if self._uncacheable else None
        if uncacheable is not None:
            self._why[node.id] = uncacheable
            return None
        made = self._key(node, args, kwargs)
        if made is None:
            return None
        self._keys[node.id] = made[0]
        self._why[node.id] = self._miss_now(node, made)
        return made[0]

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
        claimed = node.id in self._claims
        if claimed:
            self._claims.discard(node.id)
        ok = res.status is StepStatus.SUCCEEDED and not res.fallback_reasons
        hashes = self._hit_hashes.pop(node.id, None) if self._hit_hashes else None
        unsent = self._unsent.pop(node.id, None) if self._unsent else None
        try:
            if ok and key is not None:
                hashes = self.store.put(
                    key=key,
                    step_name=node.name,
                    run_id=self.run_id,
                    outputs=res.outputs,
                    duration=res.duration_seconds,
                    parts=unsent[2] if unsent is not None and unsent[0] == key else None,
                )
                if hashes is not None and unsent is not None and unsent[0] == key:
                    unsent = None  # in the entry's row
            if hashes is not None or (ok and key is not None):
                self._identify(node, key, hashes)
        finally:
            if unsent is not None:  # no entry to hold them: the next miss still says what changed
                self.store.put_key_parts(*unsent)
            if claimed and key is not None:  # a claim is only made for a key
                # Held by this run, the key's flight is this run or the future its waiters made.
                cached = ok and hashes is not None
                flights = self._flights
                claim = flights.get(key)
                waited = claim is not self and isinstance(claim, asyncio.Future)
                if waited:
                    claim.set_result(self.store if cached else None)  # type: ignore[union-attr]
                if cached:  # held in the store's memory until it commits: no future kept per step
                    if claim is self or waited:
                        flights[key] = self.store
                    self._settled.append(key)
                elif claim is self or waited:
                    del flights[key]
        return hashes

    def _identify(self, node: Node, key: str | None, hashes: dict[str, str] | None) -> None:
        """Hand on what identifies each output: its artifact hash, else this step's key and its name."""
        identities = self._identities
        if hashes is not None and len(node.output_slots) == 1:  # the common case, without a loop
            digest = hashes.get(node.output_names[0])
            if digest is not None:
                identities[node.output_slots[0]] = (
                    _ARTIFACT + digest.encode() if len(digest) == 32 else _chunk(b"a:" + digest.encode())
                )
                return
        for slot, name in zip(node.output_slots, node.output_names, strict=True):
            digest = hashes.get(name) if hashes is not None else None
            if digest is not None:
                identities[slot] = _chunk(b"a:" + digest.encode())
            elif key is not None:
                identities[slot] = _chunk(
                    b"k:" + xxhash.xxh3_128_hexdigest(f"{key}\x00{name}".encode()).encode()
                )

    def release(self) -> None:
        """Forget this run's computed values once the store has committed them.

        Until then a concurrent run in this process that needs one of these keys gets the value
        from here: its own store cannot see the entry before the commit.
        """
        for unsent in self._unsent.values():  # steps that missed and never ended
            self.store.put_key_parts(*unsent)
        self._unsent.clear()
        flights = self._flights
        for key in self._settled:
            pending = flights.get(key)
            if isinstance(pending, Store) or (isinstance(pending, asyncio.Future) and pending.done()):
                del flights[key]
        self._settled.clear()
        if self._hash_pool is not None:
            self._hash_pool.shutdown(wait=True)  # no thread outlives the run
            self._hash_pool = None
        if self._previous is not None and not self._previous.done():
            self._previous.cancel()

    # ------------------------------------------------------------------ items of a mapped step

    def item_base_key(self, node: Node, args: list[Any], kwargs: dict[str, Any], spec: MapSpec) -> str | None:
        """The key of everything a mapped step's items share: code, identity, unmapped inputs.

        Each item's key adds the item's own elements to it (:meth:`item_lookup`), so a rerun
        after a partial failure finds every item that succeeded, wherever it sits in the list.
        Unmapped inputs are identified as for any step (by their producer, else their content);
        one that cannot be identified leaves the items uncached.
        """
        step = node.step
        if not self.caching or step.cache is False or node.id in self._uncacheable:
            return None
        strategy: Any = step.cache
        if isinstance(strategy, CachePolicy):
            strategy = strategy.strategy
        mapped = {
            at if isinstance(at, int) else len(args) + list(kwargs).index(at) for at, _n, _s in spec.places
        }
        inputs: list[tuple[str, str]] = []
        params: list[tuple[str, str]] = [
            ("items", "by key function" if callable(strategy) else "by elements")
        ]
        if not callable(strategy):
            unknown: list[str] = []
            values = [*args, *kwargs.values()]
            for flat, ((label, slot), value) in enumerate(zip(node.labels, values, strict=True)):
                if flat in mapped:
                    continue
                if slot >= 0:
                    chunk = self._identities[slot] or self._content(slot, value)
                    found = chunk[8:].decode() if chunk is not None else None
                else:
                    found = content_identity(value)
                if found is None:
                    unknown.append(f"parameter {label!r}")
                elif slot >= 0:
                    inputs.append((label, found))
                else:
                    params.append(("param:" + label, found))
            if unknown:
                self._uncached(node, unknown, args, kwargs)
                return None
        fingerprint = self._step_fingerprint(node) if strategy == "code_hash" else None
        return key_of(step_identity=node.identity, fingerprint=fingerprint, inputs=inputs, params=params)

    async def item_lookup(
        self, node: Node, base: str, args: list[Any], kwargs: dict[str, Any], elements: list[Any]
    ) -> tuple[str | None, Any]:
        strategy: Any = node.step.cache
        if isinstance(strategy, CachePolicy):
            strategy = strategy.strategy
        identity = content_identity(strategy(*args, **kwargs) if callable(strategy) else tuple(elements))
        if identity is None:
            return None, MISSING  # this item cannot be identified: it runs uncached
        key = key_of(step_identity=base, fingerprint=None, inputs=[("item", identity)], params=())
        entry = await self.store.lookup(key, view=self.view)
        if entry is not None:
            outputs = await self.store.load(entry)
            if outputs is not None and node.output_names[0] in outputs:
                return key, outputs[node.output_names[0]]
        return key, MISSING

    def after_item(
        self,
        node: Node,
        index: int,
        status: StepStatus,
        attempts: int,
        start: float,
        duration: float,
        error: BaseException | None,
        key: str | None,
        value: Any,
    ) -> None:
        hashes: dict[str, str] | None = None
        name = node.output_names[0]
        if self.caching and key is not None and status is StepStatus.SUCCEEDED:
            try:
                hashes = self.store.put(
                    key=key, step_name=node.name, run_id=self.run_id, outputs={name: value}, duration=duration
                )
            except Exception as exc:  # an output that cannot be stored: the item is just not cached
                warnings.warn(UncachedStepWarning(f"step {node.name!r}, item {index}: {exc}"), stacklevel=2)
        if not self.recording:
            return
        produced = status in (StepStatus.SUCCEEDED, StepStatus.CACHED) and not isinstance(value, ItemFailed)
        if error is None:
            # The hot path, as for a step: the writer builds the row from the fate and the shape.
            fate = _ItemFate(status, {name: None} if produced else {}, attempts, start, duration, key)
            self._record_fate(
                self.run_id, fate, hashes, self._shapes[node.id].renamed(f"{node.name}[{index}]")
            )
            return
        self.store.record_step(
            StepRecord(
                run_id=self.run_id,
                step_name=f"{node.name}[{index}]",
                status=status.value,
                attempts=attempts,
                started_at=start,
                ended_at=start + duration,
                duration_seconds=duration,
                cached=status is StepStatus.CACHED,
                cache_key=key,
                error_type=None if error is None else type(error).__qualname__,
                error_message=None if error is None else str(error),
                outputs={name: (hashes or {}).get(name)} if produced else {},
                inputs=dict(node.lineage_inputs),
            )
        )

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
            cache_reason=res.cache_reason,
        )


_Made = tuple[str, tuple[str, ...], Sequence[bytes]]
"""A key, the component label of each identity it was made of, and those identity chunks."""

_NodeKey = tuple[int, KeyLayout, tuple[int, ...], tuple[int, ...], tuple[str, ...], bool]
"""How one node's keys are made (see :func:`_lay_out`); the last item: every argument is fed
by an output (no context value)."""

_BY_INPUTS, _BY_CODE, _BY_FUNCTION = 0, 1, 2
"""What a node's key is made of besides its identity: its inputs (``input_hash``), its code too
(``code_hash``), or the value of the user's key function."""

_NO_FINGERPRINT = fingerprint_chunk(None)
_IDENTITY_AT: Final = len(key_head(""))
"""Where the step identity starts in a layout's head (:func:`~flowyml._hashing.key_head`)."""
_STRATEGY_TAGS: Final = (b"|input_hash", b"|code_hash", b"|callable")
"""What follows the identity in a key's ``step`` component, by the node's kind."""
_HASH_FIRST: _Made = ("", (), ())  # what _key returns for a big value it is told not to hash
_NOT_MADE: _Made = ("", (), ())  # what lookup finds when hit() made no key for the node


class PlanKeys:
    """How the keys of each node of one plan are made, kept with the plan across its runs.

    Each node's entry is made at its first key and is a plain tuple of bytes, ints and strings
    (which the collector stops tracking): its strategy (``_BY_INPUTS``, ``_BY_CODE`` or
    ``_BY_FUNCTION``), the encoded fixed parts of its keys, then each
    argument's flat position and slot (-1 for a context value) and its component label, in
    the order its key takes them. What changes between runs (the code fingerprint, the
    identities of inputs and parameters) is joined in per key.
    """

    __slots__ = ("nodes", "plan", "shapes")

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.nodes: list[_NodeKey | None] = [None] * len(plan.nodes)
        self.shapes: dict[_Shape, _NodeKey] = {}

    def fill(self) -> PlanKeys:
        """Lay out every cached node now, in one pass, before the run allocates anything.

        Why not at each node's first key: entries made one by one in the middle of a run land
        between the run's short-lived objects, and a few of them keep alive every allocator
        arena the run touched. Laid out in one pass they share a few arenas, and the run's
        memory goes back when it ends (at 20,000 steps, 2.9 KiB a step stayed resident after a
        first cached run, 0.6 after this). Same work, earlier: each entry was made at the first
        run anyway.
        """
        nodes, shapes = self.nodes, self.shapes
        for node in self.plan.nodes:
            if nodes[node.id] is None and node.step.cache is not False:
                nodes[node.id] = _lay_out(node, shapes)
        return self


_Shape = tuple[tuple[str, bool], ...]
"""A node's argument labels, each with whether it is fed by an output slot (not which one)."""


def _lay_out(node: Node, shapes: dict[_Shape, _NodeKey]) -> _NodeKey:
    """``node``'s key layout; ``shapes`` keeps, by :data:`_Shape`, a layout already made for
    another node whose arguments have the same names and kinds: all of it but its head (the step
    identity) and its slots is the same, so only those are made again (most nodes of a plan
    share a few shapes).

    Read from the node's sources in one pass, without making its :attr:`~Node.labels` (which
    only a slow path needs): per node of a shared shape, one shape tuple, the slots and the head.
    """
    policy = node.step.cache
    strategy = policy.strategy if isinstance(policy, CachePolicy) else policy
    kind = _BY_FUNCTION if callable(strategy) else _BY_CODE if strategy == "code_hash" else _BY_INPUTS
    sources = node.sources_in_order()
    if len(sources) == 1:  # the usual step (a chain's): no comprehension frames for one argument
        only = sources[0]
        shape: _Shape = ((only.parameter, only.kind == SLOT),)
    else:
        shape = tuple([(src.parameter, src.kind == SLOT) for src in sources])
    same = shapes.get(shape)
    if same is None:
        same = shapes[shape] = _lay_out_shape(node.identity, shape, sources)
        return (kind, *same[1:])
    _kind, (_head, inputs_header, names, tail), positions, _slots, parts, fed = same
    if len(positions) == 1:
        slots: tuple[int, ...] = (sources[positions[0]].slot if fed else _slots[0],)
    elif fed:
        slots = tuple([sources[at].slot for at in positions])
    else:
        slots = tuple([sources[at].slot if shape[at][1] else -1 for at in positions])
    return kind, (key_head(node.identity), inputs_header, names, tail), positions, slots, parts, fed


def _lay_out_shape(identity: str, shape: _Shape, sources: Sequence[Source]) -> _NodeKey:
    """The layout of the first node of a shape (its kind and slots are the caller's to set)."""
    if not shape:  # a step without arguments: one key per fingerprint
        return (0, key_layout(identity, (), ())[0], (), (), (), True)
    ctx = [at for at, (_label, slot_fed) in enumerate(shape) if not slot_fed]
    if not ctx:  # every argument an output (a fan-in's 100,000): fewer passes
        layout, positions = key_layout(identity, [label for label, _fed in shape], ())
        labels = tuple(["input:" + shape[at][0] for at in positions])
        return (0, layout, positions, tuple([sources[at].slot for at in positions]), labels, True)
    fed = [at for at, (_label, slot_fed) in enumerate(shape) if slot_fed]
    layout, order = key_layout(
        identity, [shape[at][0] for at in fed], ["param:" + shape[at][0] for at in ctx]
    )
    both = fed + ctx
    positions = tuple([both[i] for i in order])
    labels = tuple([("input:" if shape[at][1] else "param:") + shape[at][0] for at in positions])
    slots = tuple([sources[at].slot if shape[at][1] else -1 for at in positions])
    return (0, layout, positions, slots, labels, not ctx)


class _ItemFate:
    """What the store reads of one item that did not fail (see ``StepFate``)."""

    __slots__ = ("attempts", "cache_key", "duration_seconds", "end_time", "outputs", "start_time", "status")

    time_saved_seconds = 0.0
    traceback = None
    cache_reason = None

    def __init__(
        self,
        status: str,
        outputs: dict[str, None],
        attempts: int,
        start: float,
        duration: float,
        key: str | None,
    ) -> None:
        self.status = status
        self.outputs = outputs
        self.attempts = attempts
        self.start_time = start
        self.duration_seconds = duration
        self.end_time = start + duration
        self.cache_key = key


async def _latest_parts(store: Store, step_names: list[str]) -> _Previous:
    """The latest key components of each step; none when they cannot be read (reasons then say
    "first run"), since a reason must never fail or delay a run."""
    try:
        return await store.latest_key_parts(step_names)
    except Exception:
        return {}


def _code_value(path: str | None) -> str:
    """``"mod.f.<closure>.lock"`` -> ``"closure value 'lock'"``: how a refused code value is named."""
    for marker, kind in (
        (".<closure>.", "closure value"),
        (".<global>.", "global"),
        (".<default>.", "default"),
    ):
        if path and marker in path:
            return f"{kind} {path.split(marker, 1)[1]!r}"
    return f"{path or 'a value'} of its code"


def _loads_parts(text: str) -> _KeyParts:
    """Key components as stored (a JSON object); a damaged row reads as none."""
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


_len8 = struct.Struct("<Q").pack
_ARTIFACT: Final = _len8(34) + b"a:"
"""The start of the identity chunk of an output by its artifact hash (an xxh3-128: 32 digits)."""


def _chunk(identity: bytes) -> bytes:
    """:func:`~flowyml._hashing.identity_chunk` of an identity already encoded (the hot path's)."""
    return _len8(len(identity)) + identity


_digest: Final[Callable[[bytes], str]] = xxhash.xxh3_64_hexdigest


def _short(identity: str) -> str:
    """A key component as stored: 16 hex digits, enough to tell that it changed."""
    return str(xxhash.xxh3_64_hexdigest(identity.encode()))


def _type_name(value: object) -> str:
    cls = type(value)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


#: The order in which changed components are named: what the user passed first, code last.
_KINDS = ("step", "input", "param", "key", "code", "closure", "helper", "global")


def part_name(label: str) -> str:
    """How a key component is named to a user: ``"input:data"`` -> ``"input 'data'"``."""
    kind, _, name = label.partition(":")
    if kind == "input":
        return f"input {name!r}"
    if kind == "param":
        return f"context parameter {name!r}"
    if kind == "closure":
        return f"closure value {name!r}"
    if kind == "helper":
        return f"code of helper {name!r}"
    if kind == "global":
        return f"global {name!r}"
    if kind == "code":
        return "code of step"
    if kind == "key":
        return "cache key function's value"
    return "step's identity or cache strategy"


def _order(label: str) -> tuple[int, str]:
    kind = label.partition(":")[0]
    return (_KINDS.index(kind) if kind in _KINDS else len(_KINDS), label)


def changed_parts(old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    """The labels of the components that differ (or exist on one side only), inputs first."""
    labels = sorted(set(old) | set(new), key=_order)
    changed = [label for label in labels if old.get(label) != new.get(label)]
    if "step" in changed:
        return ["step"]  # another strategy or identity: the other parts are not comparable
    return changed


def describe_change(old: Mapping[str, str], new: Mapping[str, str]) -> str:
    """The ``cache_reason`` of a miss: ``"input 'data' changed"``, ``"global 'ARGS' changed"``."""
    names = [part_name(label) for label in changed_parts(old, new)]
    if not names:
        return UNCHANGED_KEY
    if len(names) == 1:
        return f"{names[0]} changed"
    if len(names) <= 3:
        return f"{', '.join(names[:-1])} and {names[-1]} changed"
    return f"{', '.join(names[:2])} and {len(names) - 2} more changed"


def _is_large(value: Any) -> bool:
    """Cheap guess whether hashing ``value`` takes long enough to be worth a worker thread."""
    size = getattr(value, "nbytes", None)
    if isinstance(size, int):
        return size > 1 << 20
    try:
        return len(value) > 20_000
    except TypeError:
        return False
