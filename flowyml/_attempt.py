"""One unit's run, through its layers, to one frozen result: the only place a step's fate is decided.

A *unit* is what the scheduler starts when its inputs exist: one node, or an execution group's
chain, run as one call in one worker (:mod:`flowyml._groups`). For a node the layers are, in
this order::

    blocked -> condition -> cache -> hold (resources, concurrency) -> retry -> timeout -> executor -> record

- *blocked*: an upstream step produced nothing, or its ``If`` branch was not chosen: skipped.
- *condition*: ``@when`` / ``@unless`` / ``condition=`` over the arguments; false: skipped.
- *cache*: :meth:`RunHooks.lookup` returns a :class:`Lookup`; a hit's outputs are applied to the
  state here, and the step does not run. A hit held in memory (:meth:`RunHooks.hit`) is settled
  by :meth:`UnitRunner.now` before any coroutine is made: the scheduler then needs no task for it.
- *hold*: the step's resource request and a concurrency slot, held while it runs.
- *retry*: :class:`~flowyml._retry.RetryRun`, the one retry loop.
- *timeout*: each attempt's own, enforced by the executor.
- *executor*: where the body runs (loop, thread, process, cluster).
- *record*: :meth:`UnitRunner.settle` stores the :class:`~flowyml.StepResult`, calls
  :meth:`RunHooks.after` and the failure callback. Every result of a unit that got past its
  blocked check passes there, so a per-step event, log line or span belongs in ``settle``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
import traceback
from array import array
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._conditions import conditions_hold
from ._errors import ConfigError, StepTimeoutError
from ._executors._base import Executor
from ._fallback import watch_fallbacks
from ._graph import MISSING, SLOT, MapSpec, Node, Source
from ._groups import Member, Outcome, coroutine_returned, run_chain
from ._limits import Limit, acquire_all, release_all
from ._log import Watcher, step_failed, step_retrying
from ._remote import RemoteValues
from ._resources import Request, ResourcePool
from ._results import AttemptError, StepResult, StepStatus, _Builder, finished
from ._retry import RetryRun
from ._state import NO_ARGS, NO_KWARGS, RunState
from ._typed import produce, receive

if TYPE_CHECKING:
    from ._map import Items

__all__ = ("CACHE_HIT", "CACHE_OFF_FOR_RUN", "CACHE_OFF_FOR_STEP", "Lookup", "RunHooks", "UnitRunner")

CACHE_HIT = "cache hit"
CACHE_OFF_FOR_RUN = "caching is off for this run"
CACHE_OFF_FOR_STEP = "caching is off for this step (cache=False)"

_perf = time.perf_counter
_now = time.time
_OK = frozenset({StepStatus.SUCCEEDED, StepStatus.CACHED})
_BAD = frozenset({StepStatus.FAILED, StepStatus.TIMED_OUT})
_NOT_STARTED = "the run stopped before the step could start"

FailureCallback = Callable[[Node, StepResult, list[Any]], None]


@dataclass(slots=True)
class Lookup:
    """What a cache look-up decided: the step's key and, on a hit, its outputs.

    Not frozen: one is made per cached step, and a frozen dataclass's ``__init__`` costs a call
    per field; nothing changes one after the look-up returns it."""

    key: str | None
    outputs: dict[str, Any] | None = None
    saved_seconds: float = 0.0
    """How long the step took when its cached outputs were made."""
    reason: str | None = None
    """The step's ``cache_reason``: a hit, a first run, what changed, or why it ran uncached."""


class RunHooks:
    """What the cache and the lineage recorder do around each step; they decide, the runner applies.

    ``lookup`` is only called when :attr:`caching` is true; it returns ``None`` when the step
    cannot be cached this time, and may raise (that fails the step). ``after`` sees every
    result that got past its blocked check, whatever its fate, and must not raise.
    """

    caching: bool = False

    async def lookup(self, node: Node, args: list[Any], kwargs: dict[str, Any]) -> Lookup | None:
        return None

    def hit(self, node: Node, args: list[Any], kwargs: dict[str, Any]) -> Lookup | None:
        """A cache hit decided without waiting (its entry is held in memory), or None: then
        :meth:`lookup` is awaited. Must not raise, and must leave :meth:`lookup` to report a miss."""
        return None

    def key(self, node: Node, args: list[Any], kwargs: dict[str, Any]) -> str | None:
        """Make the step's cache key without a look-up (a step that ran inside a group chain)."""
        return None

    def after(self, node: Node, res: StepResult, args: list[Any], kwargs: dict[str, Any]) -> None:
        return None

    def why(self, node: Node) -> str | None:
        """The ``cache_reason`` decided by the last :meth:`key` of ``node``."""
        return None

    async def ready(self) -> None:
        """Prepare what :meth:`key` needs that takes a wait (called before a chain runs)."""
        return

    # Items of a mapped step (see flowyml._map): keyed by the step's key plus the item's identity.

    def item_base_key(self, node: Node, args: list[Any], kwargs: dict[str, Any], spec: MapSpec) -> str | None:
        """The key of a mapped step's arguments other than its mapped ones; None: items not cached."""
        return None

    async def item_lookup(
        self, node: Node, base: str, args: list[Any], kwargs: dict[str, Any], elements: list[Any]
    ) -> tuple[str | None, Any]:
        """One item's cache key and its cached output (``MISSING`` on a miss)."""
        return None, MISSING

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
        """One item's fate: cache its output, record its lineage. Must not raise."""
        return

    def item_progress(self, node: Node, done: int, failed: int, total: int | None) -> None:
        """Called after each item of a mapped step settles: items done so far (any fate), how many of
        them failed or timed out, and the total (None while a streamed input is still open).

        The call site for run events about items (an ``ItemsProgress`` event).
        """
        return


class UnitRunner:
    """Runs units of one run against its :class:`RunState`; the scheduler only counts."""

    def __init__(
        self,
        state: RunState,
        executors: Sequence[Executor],
        *,
        hooks: RunHooks | None = None,
        resources: ResourcePool | None = None,
        max_concurrency: int | None = None,
        remote: bool = False,
        on_failure: FailureCallback | None = None,
        fail_fast: bool = True,
        run_id: str = "",
        watch: Watcher | None = None,
    ) -> None:
        plan = state.plan
        self.state = state
        self.hooks = hooks
        self.on_failure = on_failure
        self.fail_fast = fail_fast
        self._executors = self.executors = executors
        self.limits: dict[int, Limit] = {}
        """Per node with concurrency= / rate_limit=: the limit of this run."""
        for i in plan.limited:
            s = plan.nodes[i].step
            limit = Limit.for_step(s.name, None if s.map_over else s.concurrency, s.rate_limit)
            if limit is not None:
                self.limits[i] = limit
        self._call_limits: dict[int, list[Limit]] = {
            i: [lim for lim in (self.limits.get(i), plan.nodes[i].step.limit) if lim is not None]
            for i in plan.limited
        }
        """What each call of a limited node takes: this run's limit of it, then its shared one."""
        self.items: dict[int, Items] = {}
        if plan.itemized:  # the machinery of mapped steps loads only in runs that have them
            from ._map import Items, pending_bound

            self.items = {
                i: Items(
                    plan.nodes[i].name,
                    {
                        d: pending_bound(plan.nodes[d].step)
                        for d in plan.nodes[i].streams_to
                        if (i, d) not in plan.unpaced
                    },
                )
                for i in plan.itemized
                if plan.nodes[i].streams_to
            }
        """Per mapped node or stream source with mapped consumers: its items as they come."""
        self.run_id = run_id
        self.watch = watch
        self._tracing = watch.tracing if watch is not None else None
        self._direct = [d and ex.name == "async" for d, ex in zip(plan.direct, executors, strict=True)]
        if self._tracing is not None:  # every body through its executor: each attempt is a span there
            self._direct = [False] * len(plan.nodes)
        self._resources = resources
        self._requests = plan.requests if resources is not None else ()
        self._limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        typed = frozenset(i for i, t in enumerate(plan.typing) if t is not None and t.wraps)
        self.remote = RemoteValues(keep_outputs=not plan.gates, local=typed) if remote else None
        if remote and plan.itemized:
            name = plan.nodes[plan.itemized[0]].name
            raise ConfigError(
                f"step {name!r} is mapped or a stream source, which does not run alongside a Dask "
                "executor yet; run this pipeline without the Dask executor, or map inside the step"
            )
        caching = hooks is not None and hooks.caching
        # The cache_reason of a step that is not looked up: caching off for the run, or the step.
        off = CACHE_OFF_FOR_STEP if caching else CACHE_OFF_FOR_RUN
        self._why = [None if caching and n.step.cache is not False else off for n in plan.nodes]
        # Nodes whose every layer but the call and the record is a no-op in this run.
        self._bare = [
            direct and not n.step.conditions and not (caching and n.step.cache is not False)
            for direct, n in zip(self._direct, plan.nodes, strict=True)
        ]
        if self._requests or self._limit is not None or self.remote is not None:
            self._bare = [False] * len(plan.nodes)
        self._typing = plan.typing
        for i, t in enumerate(self._typing):
            if t is not None:
                self._bare[i] = False
        # When each bare step began (wall clock, and the counter its duration is timed on), by
        # node id: numbers in two arrays, not two float objects held per step in flight.
        size = len(plan.nodes) if any(self._bare) else 0
        self._began = array("d", bytes(8 * size))
        self._t0 = array("d", bytes(8 * size))
        # Nodes a cache hit may settle at once: nothing runs between their blocked check and
        # their look-up (no remote copy, no typed receive, no condition, no items).
        if caching and self.remote is None:
            steps = [n.step for n in plan.nodes]
            self._hits = [
                s.cache is not False and not (s.conditions or s.map_over or s.stream) for s in steps
            ]
            for i, t in enumerate(self._typing):
                if t is not None:
                    self._hits[i] = False
        else:
            self._hits = [False] * len(plan.nodes)
        self._argued: list[tuple[list[Any], dict[str, Any]] | None] = (
            [None] * len(plan.nodes) if any(self._hits) else []
        )
        """The arguments :meth:`now` made for a node it left to :meth:`_layered_node`, which
        takes them instead of making them again (its look-up goes on with the key made of them)."""

    # ------------------------------------------------------------------ one node

    def now(self, node: Node) -> bool | None:
        """The fate of a node served by a cache hit held in memory, recorded as
        :meth:`_layered_node` records a hit, without a coroutine; None when it has to wait."""
        if not self._hits[node.id]:
            return None
        state = self.state
        if state.blocked[node.id] is not None:
            return None
        argued = state.arguments(node)
        args, kwargs = argued
        start = _now()
        t0 = _perf()
        hooks = self.hooks
        found = hooks.hit(node, args, kwargs) if hooks is not None else None
        if found is None or found.outputs is None:
            self._argued[node.id] = argued
            return None
        outputs = found.outputs
        state.apply(node, outputs)
        if self.watch is not None:
            self.watch.started(node.name)
        took = _perf() - t0
        res = _Builder(
            node.name, StepStatus.CACHED, outputs, None, None, 0, start, start + took, took, found.saved_seconds,
            found.key,
        )  # fmt: skip
        res.cache_reason = found.reason
        res.__class__ = StepResult
        return self.settle(node, res, args, kwargs, args, kwargs)

    def node(self, node: Node) -> Coroutine[Any, Any, bool]:
        """Run one node through its layers and record its fate; True when its outputs exist.

        A plain method handing back one of two coroutines, so a step with nothing around its
        call pays for no layer it does not have, nor for a coroutine frame of ours.
        """
        return _Call(self, node, None) if self._bare[node.id] else self._layered_node(node)

    def task(self, node: Node, then: Callable[[Node, bool], object]) -> Coroutine[Any, Any, None] | None:
        """For a node with nothing around its call, what a task of its own runs: its body, recorded
        when it ends, its fate then handed to ``then``; None for any other node."""
        return _Call(self, node, then) if self._bare[node.id] else None

    def _bare_done(self, node: Node, ret: Any, args: list[Any], kwargs: dict[str, Any]) -> bool:
        """Record a bare step whose body returned ``ret``."""
        state = self.state
        try:
            if len(node.output_slots) == 1:
                state.values[node.output_slots[0]] = ret
                produced = {node.output_names[0]: ret}
            else:
                produced = state.put(node, ret)
        except Exception as exc:
            return self._bare_failed(node, StepStatus.FAILED, exc, args, kwargs)
        began = self._began[node.id]
        took = _perf() - self._t0[node.id]
        res = _Builder(node.name, StepStatus.SUCCEEDED, produced, None, None, 1, began, began + took, took)
        res.cache_reason = self._why[node.id]
        res.__class__ = StepResult
        state.results[node.id] = res
        if self.hooks is not None:
            self.hooks.after(node, res, args, kwargs)
        if self.watch is not None:
            self.watch.finished(res)
        return True

    def _bare_failed(
        self,
        node: Node,
        status: StepStatus,
        exc: Exception | None,
        args: list[Any],
        kwargs: dict[str, Any],
    ) -> bool:
        """Record a bare step that raised ``exc`` (FAILED) or was cancelled (CANCELLED, ``exc`` None)."""
        i = node.id
        res = self._result(
            node, status, {}, exc, None, True, self._began[i], self._t0[i], 0.0, None, None, (), self._why[i]
        )
        if exc is not None:
            return self.settle(node, res, args, kwargs, args, kwargs)
        self.state.results[node.id] = res
        if self.hooks is not None:
            self.hooks.after(node, res, args, kwargs)
        if self.watch is not None:
            self.watch.finished(res)
        return False

    async def _layered_node(self, node: Node) -> bool:
        """A step with layers: blocked -> condition -> cache -> hold -> retry -> timeout -> executor -> record."""
        state = self.state
        if state.blocked[node.id] is not None:
            return self._blocked(node)
        argued = self._argued[node.id] if self._argued else None
        if argued is None:
            args, kwargs = state.arguments(node)
        else:
            self._argued[node.id] = None
            args, kwargs = argued
        step = node.step
        if step.map_over or step.stream:
            if self.watch is not None:
                self.watch.started(node.name)
            from ._map import run_mapped, run_source

            if step.map_over:
                return await run_mapped(self, node, args, kwargs)
            return await run_source(self, node, args, kwargs)
        hooks = self.hooks
        cached = hooks is not None and hooks.caching and step.cache is not False
        key_args, key_kwargs = args, kwargs
        keep_remote = False
        status = StepStatus.FAILED
        outputs: dict[str, Any] = {}
        error: BaseException | None = None
        key: str | None = None
        why = self._why[node.id]
        saved = 0.0
        reason: str | None = None
        fallbacks: tuple[str, ...] = ()
        retry: RetryRun | None = None
        started = False
        start: float | None = _now()
        t0 = _perf()
        typed = self._typing[node.id] if self._typing else None
        parents: list[Any] = []
        try:
            if self.remote is not None:
                keep_remote, key_args, key_kwargs = await self.remote.localize(
                    node, self._executors[node.id], args, kwargs, state.values, cached
                )
            if typed is not None:
                remote = self._executors[node.id].is_remote if self.remote is not None else None
                args, kwargs, parents = receive(node.name, typed, args, kwargs, remote)
            if step.conditions and not conditions_hold(step.conditions, args, kwargs):
                status, reason = StepStatus.SKIPPED, "its condition was false"
            else:
                if self.watch is not None:
                    self.watch.started(node.name)
                found = await hooks.lookup(node, key_args, key_kwargs) if cached else None  # type: ignore[union-attr]
                if found is not None:
                    key, why = found.key, found.reason
                if found is not None and found.outputs is not None:
                    outputs, saved, status = found.outputs, found.saved_seconds, StepStatus.CACHED
                    state.apply(node, outputs)
                else:
                    request = self._requests[node.id] if self._requests else ()
                    if step.retry_policy is not None:
                        retry = RetryRun(step.retry_policy, on_retry=self._retrying(node.name))
                    if request or self._limit is not None:
                        async with self._held(request):
                            started = True
                            start, t0 = _now(), _perf()
                            ret, fallbacks = await self._attempts(node, args, kwargs, retry, keep_remote)
                    elif self._direct[node.id]:
                        started = True
                        ret = await step.body(*args, **kwargs)  # nothing to wrap: no executor hop
                    else:
                        started = True
                        ret, fallbacks = await self._attempts(node, args, kwargs, retry, keep_remote)
                    if typed is not None and typed.wraps:
                        ret = produce(node.name, node.output_names, typed, ret, parents)
                    outputs = state.put(node, ret)
                    if keep_remote and cached:
                        outputs = await self.remote.copy_for_cache(node, outputs)  # type: ignore[union-attr]
                    status = StepStatus.SUCCEEDED
        except asyncio.CancelledError:
            if started:
                status = StepStatus.CANCELLED
            else:
                status, reason, start = StepStatus.SKIPPED, _NOT_STARTED, None
            res = self._result(
                node, status, outputs, None, retry, started, start, t0, saved, key, reason, (), why
            )
            state.results[node.id] = res
            if hooks is not None:
                hooks.after(node, res, key_args, key_kwargs)
            if self.watch is not None:
                self.watch.finished(res)
            raise
        except Exception as exc:
            error = exc
            status = StepStatus.TIMED_OUT if isinstance(exc, StepTimeoutError) else StepStatus.FAILED
        res = self._result(
            node, status, outputs, error, retry, started, start, t0, saved, key, reason, fallbacks, why
        )
        return self.settle(node, res, args, kwargs, key_args, key_kwargs)

    @staticmethod
    def _result(
        node: Node,
        status: StepStatus,
        outputs: dict[str, Any],
        error: BaseException | None,
        retry: RetryRun | None,
        started: bool,
        start: float | None,
        t0: float,
        saved: float,
        key: str | None,
        reason: str | None,
        fallbacks: tuple[str, ...],
        why: str | None = None,
    ) -> StepResult:
        duration = _perf() - t0 if start is not None else 0.0
        return finished(
            node.name,
            status,
            outputs if error is None else {},
            error,
            None if error is None else "".join(traceback.format_exception(error)),
            (retry.attempt if retry is not None else 1) if started else 0,
            start,
            None if start is None else start + duration,
            duration,
            saved,
            key,
            reason,
            fallbacks,
            why,
            None,
            () if retry is None or not retry.errors else _attempt_errors(retry.errors),
        )

    async def _attempts(
        self, node: Node, args: list[Any], kwargs: dict[str, Any], retry: RetryRun | None, keep_remote: bool
    ) -> tuple[Any, tuple[str, ...]]:
        """Call the body on its executor, each attempt with its own timeout, retrying through ``retry``.

        Returns the value and the reasons a fallback stood in for the body (empty when none did).
        """
        step = node.step
        executor = self._executors[node.id]
        extra = {"keep_remote": True} if keep_remote else {}
        body = watch_fallbacks(step.body) if step.uses_fallback else step.body
        positional = tuple(args)
        limits = self._call_limits.get(node.id) if self._call_limits else None

        tracing = self._tracing
        carry = not executor.shares_context and not step.is_async

        async def attempt() -> Any:
            try:
                if limits:
                    await acquire_all(limits)  # a slot, then a token: the timeout starts after both
                try:
                    if tracing is None:
                        ret = await executor.run(
                            body, positional, kwargs, timeout=step.timeout, step_name=node.name, **extra
                        )
                    else:
                        number = retry.attempt if retry is not None else 1
                        with tracing.attempt(node.name, number, executor.name, body, carry=carry) as fn:
                            ret = await executor.run(
                                fn, positional, kwargs, timeout=step.timeout, step_name=node.name, **extra
                            )
                finally:
                    if limits:
                        release_all(limits)
            except StepTimeoutError as exc:
                for breaker in step.breakers:
                    breaker.record_failure(exc)
                raise
            if not step.is_async and inspect.iscoroutine(ret if not step.uses_fallback else ret[0]):
                raise coroutine_returned(node.name, ret if not step.uses_fallback else ret[0])
            return ret

        ret = await attempt() if retry is None else await retry.acall(attempt, (), {})
        if step.uses_fallback:
            value, used = ret
            return value, tuple(used)
        return ret, ()

    # ------------------------------------------------------------------ a group chain

    async def chain(self, nodes: Sequence[Node]) -> tuple[list[tuple[Node, bool]], bool]:
        """Run an execution group's chain as one call in one worker; see :mod:`flowyml._groups`.

        Returns each member's fate and whether the chain ran as one unit. When it did not (the
        head is blocked or served from the cache, the look-up failed, or values are remote),
        only the head has run, and the other members follow as ordinary steps.
        """
        head = nodes[0]
        state = self.state
        if state.blocked[head.id] is not None or self.remote is not None:
            return [(head, await self.node(head))], False
        hooks = self.hooks
        watch = self.watch
        args, kwargs = state.arguments(head)
        head_key: str | None = None
        if watch is not None:
            watch.started(head.name)
        if hooks is not None and hooks.caching and head.step.cache is not False:
            start, t0 = _now(), _perf()
            try:
                found = await hooks.lookup(head, args, kwargs)
            except Exception as exc:
                res = self._result(
                    head, StepStatus.FAILED, {}, exc, None, False, start, t0, 0.0, None, None, ()
                )
                return [(head, self.settle(head, res, args, kwargs, args, kwargs))], False
            if found is not None and found.outputs is not None:
                state.apply(head, found.outputs)
                took = _perf() - t0
                res = finished(head.name, StepStatus.CACHED, found.outputs, None, None, 0, start, start + took,
                               took, found.saved_seconds, found.key, cache_reason=found.reason)  # fmt: skip
                return [(head, self.settle(head, res, args, kwargs, args, kwargs))], False
            head_key = found.key if found is not None else None
            head_why = found.reason if found is not None else None
        else:
            head_why = self._why[head.id]
        if hooks is not None:
            await hooks.ready()
        members = [self._member(n, nodes) for n in nodes]
        executor = self._executors[head.id]
        request = _largest(self._requests[n.id] for n in nodes) if self._requests else ()
        started = _now()
        t0 = _perf()
        running = False
        try:
            async with self._held(request):
                running = True
                started, t0 = _now(), _perf()
                if self._tracing is None:
                    outcomes = await executor.run(
                        run_chain, (members,), {}, timeout=None, step_name=head.name
                    )
                else:  # one span for the whole chain, named after its head
                    carry = not executor.shares_context
                    with self._tracing.attempt(head.name, 1, executor.name, run_chain, carry=carry) as fn:
                        outcomes = await executor.run(fn, (members,), {}, timeout=None, step_name=head.name)
        except asyncio.CancelledError:
            for n in nodes:
                if running:
                    res = finished(n.name, StepStatus.CANCELLED, {}, start_time=started)
                else:
                    res = finished(n.name, StepStatus.SKIPPED, {}, skip_reason=_NOT_STARTED)
                state.results[n.id] = res
                if hooks is not None:
                    hooks.after(n, res, args, kwargs)
                if watch is not None:
                    watch.finished(res)
            raise
        except Exception as exc:
            reason = f"upstream step {head.name!r} did not produce its outputs"
            status = StepStatus.TIMED_OUT if isinstance(exc, StepTimeoutError) else StepStatus.FAILED
            failed = Outcome(
                status, {}, exc, "".join(traceback.format_exception(exc)), 0, started, _perf() - t0
            )
            outcomes = [failed] + [Outcome(StepStatus.SKIPPED, {}, skip_reason=reason)] * (len(nodes) - 1)
        done: list[tuple[Node, bool]] = []
        for n, o in zip(nodes, outcomes, strict=True):
            if o.outputs:
                state.apply(n, o.outputs)
            a, kw = state.arguments(n)
            key = head_key if n is head else None
            why = head_why if n is head else self._why[n.id]
            if hooks is not None and n is not head and o.status is StepStatus.SUCCEEDED:
                with contextlib.suppress(Exception):  # a key that cannot be made: just not cached
                    key = hooks.key(n, a, kw)
                    why = hooks.why(n) or why
            start = o.start_time or started
            if watch is not None and n is not head and o.status is not StepStatus.SKIPPED:
                watch.started(n.name)  # members run inside one call: known to have begun only now
            res = finished(n.name, o.status, o.outputs, o.error, o.traceback, o.attempts, start,
                           start + o.duration_seconds, o.duration_seconds, 0.0, key, o.skip_reason,
                           cache_reason=why)  # fmt: skip
            done.append((n, self.settle(n, res, a, kw, a, kw)))
        return done, True

    def _member(self, node: Node, chain: Sequence[Node]) -> Member:
        inside = {slot for n in chain for slot in n.output_slots}
        resolve = self.state.resolve

        def arg(src: Source) -> tuple[str, Any]:
            return ("s", src.slot) if src.kind == SLOT and src.slot in inside else ("v", resolve(src))

        return Member(
            name=node.name,
            body=node.step.body,
            positional=tuple(arg(s) for s in (*node.positional, *node.var_positional)),
            keyword=tuple((k, arg(s)) for k, s in node.keyword),
            output_names=node.output_names,
            output_slots=node.output_slots,
            conditions=node.step.conditions,
            retry=node.step.retry_policy,
            typing=self._typing[node.id] if self._typing else None,
        )

    # ------------------------------------------------------------------ fates

    def settle(
        self,
        node: Node,
        res: StepResult,
        args: list[Any],
        kwargs: dict[str, Any],
        key_args: list[Any],
        key_kwargs: dict[str, Any],
    ) -> bool:
        """Record a finished unit's result (a bare step's success and cancellation are recorded inline)."""
        self.state.results[node.id] = res
        if self.hooks is not None:
            self.hooks.after(node, res, key_args, key_kwargs)
        if self.watch is not None:
            self.watch.finished(res)
        status = res.status
        if status in _OK:
            return True
        if status in _BAD:
            step_failed(self.run_id, res)
        if self.on_failure is not None and status is not StepStatus.SKIPPED:
            self.on_failure(node, res, [*args, *kwargs.values()])
        return False

    def _blocked(self, node: Node) -> bool:
        """A node that cannot run: skipped with its mark, or failed with its If's error."""
        state = self.state
        if self.items:
            self._no_items(node)
        failed = state.gate_errors.get(node.id) if state.gate_errors else None
        if failed is not None:
            tb = "".join(traceback.format_exception(failed))
            res = state.results[node.id] = finished(node.name, StepStatus.FAILED, {}, failed, tb)
            step_failed(self.run_id, res)
        else:
            res = state.results[node.id] = finished(
                node.name, StepStatus.SKIPPED, {}, skip_reason=state.blocked[node.id]
            )
        if self.watch is not None:
            self.watch.finished(res)
        return False

    def _retrying(self, step: str) -> Callable[[int, float, BaseException], None]:
        """What :class:`RetryRun` calls after a failed attempt of ``step`` that will be retried."""
        run_id, watch = self.run_id, self.watch

        def retrying(attempt: int, delay: float, error: BaseException) -> None:
            step_retrying(run_id, step, attempt, delay, error)
            if watch is not None:
                watch.retrying(step, attempt, delay, error)

        return retrying

    def _no_items(self, node: Node) -> None:
        """A node that will not run: its mapped consumers stop waiting for its items, and it for others'."""
        board = self.items.get(node.id)
        if board is not None:
            board.end(False)
        spec = self.state.plan.maps.get(node.id)
        if spec is not None:
            for _at, _name, streamed in spec.places:
                if streamed >= 0:
                    self.items[streamed].leave(node.id)

    @contextlib.asynccontextmanager
    async def _held(self, request: Request) -> AsyncIterator[None]:
        """Hold the step's resources and a concurrency slot; release exactly what was acquired."""
        limit = self._limit
        if request:
            await self._resources.acquire(request)  # type: ignore[union-attr]
        try:
            if limit is not None:
                await limit.acquire()
            try:
                yield
            finally:
                if limit is not None:
                    limit.release()
        finally:
            if request:
                self._resources.release(request)  # type: ignore[union-attr]

    def held(self, node: Node) -> contextlib.AbstractAsyncContextManager[None] | None:
        """What one call of ``node`` holds while it runs (its resources, a run-wide slot), or None."""
        request = self._requests[node.id] if self._requests else ()
        if request or self._limit is not None:
            return self._held(request)
        return None

    async def localize_outputs(self) -> None:
        """Fetch every remote output to the driver; call before the executors close."""
        if self.remote is not None:
            await self.remote.localize_outputs(self.state)


_SPENT: Any = object()
"""What an ended :class:`_Call` holds instead of its body."""


class _Call(Coroutine[Any, Any, Any]):
    """A bare step's call (nothing around it but the record): its body's coroutine, driven directly.

    What a task runs for each waiting bare step (100,000 sleeping steps hold 100,000 of these),
    so it is a small object, not a coroutine frame of ours around the body's: the task's ``send``
    and ``throw`` go straight on to the body, and when the body ends this records its fate.
    Given ``then`` (:meth:`UnitRunner.task`), it hands the fate there and ends with None: a
    failed step is a fate, never an exception the task group would abort on. Without ``then``
    (:meth:`UnitRunner.node`) the fate is its value when awaited.
    """

    __slots__ = ("_args", "_body", "_kwargs", "_node", "_runner", "_then")

    def __init__(self, runner: UnitRunner, node: Node, then: Callable[[Node, bool], object] | None) -> None:
        self._runner = runner
        self._node = node
        self._then = then
        self._body: Coroutine[Any, Any, Any] | None = None

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        error = typ if val is None else val
        if isinstance(error, type):
            error = error()
        return self.send(None, error if tb is None else error.with_traceback(tb))

    def close(self) -> None:
        if self._body is not None and self._body is not _SPENT:
            self._body.close()

    def __await__(self) -> Generator[Any, None, Any]:
        return self  # type: ignore[return-value]

    @property
    def __name__(self) -> str:
        """The step's name, where a task's repr names its coroutine."""
        return self._node.name

    def send(self, value: Any = None, error: BaseException | None = None) -> Any:
        """The task's step (``error``: thrown in), passed on to the body, begun at the first;
        when the body ends, its record."""
        runner, node, body = self._runner, self._node, self._body
        if body is None:
            if error is not None:  # cancelled before it began: no result, the run reports it
                raise error
            state = runner.state
            if state.blocked[node.id] is not None:
                return self._end(runner._blocked(node))
            self._args, self._kwargs = state.arguments(node)
            if runner.watch is not None:
                runner.watch.started(node.name)
            runner._began[node.id] = _now()
            runner._t0[node.id] = _perf()
        elif body is _SPENT:
            raise RuntimeError(f"the call of step {node.name!r} has ended; it cannot be resumed")
        try:
            if body is None:
                body = self._body = node.step.body(*self._args, **self._kwargs)
            return body.send(value) if error is None else body.throw(error)
        except StopIteration as stop:
            ok = runner._bare_done(node, stop.value, self._args, self._kwargs)
        except asyncio.CancelledError:
            runner._bare_failed(node, StepStatus.CANCELLED, None, self._args, self._kwargs)
            raise
        except Exception as exc:
            ok = runner._bare_failed(node, StepStatus.FAILED, exc, self._args, self._kwargs)
        return self._end(ok)

    __next__ = send

    def _end(self, ok: bool) -> Any:
        """The step's end: its fate to ``then``, else the fate as the value of the await.

        The body's finished coroutine and the arguments go now, not when the task does."""
        self._body, self._args, self._kwargs = _SPENT, NO_ARGS, NO_KWARGS
        if self._then is None:
            raise StopIteration(ok)
        self._then(self._node, ok)
        raise StopIteration


def _attempt_errors(errors: tuple[BaseException, ...]) -> tuple[AttemptError, ...]:
    """The retried attempts' errors, numbered from 1, each with its traceback as text."""
    return tuple(
        AttemptError(n, exc, "".join(traceback.format_exception(exc))) for n, exc in enumerate(errors, 1)
    )


def _largest(requests: Iterable[Request]) -> Request:
    """What a chain holds: the largest amount of each kind any member needs (they run one by one)."""
    most: dict[str, float] = {}
    for request in requests:
        for kind, amount in request:
            most[kind] = max(most.get(kind, 0.0), amount)
    return tuple(sorted(most.items()))
