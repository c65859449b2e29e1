"""The async core: start every step the moment its last input exists.

One task group per run. Each node carries a counter of inputs still missing; a finishing step
decrements its dependents' counters and starts those that reach zero — the first of them in the
same task (a chain never pays for a new task per link), the rest as new tasks. There are no
level barriers, no task waiting per pending step and no polling.

A step that cannot produce its outputs (failed, skipped by a condition, cancelled) marks its
dependents *blocked*; a blocked node is recorded as skipped when its turn comes, and passes the
mark on. With ``fail_fast`` a failure instead aborts the task group: running steps are
cancelled, and steps that never started are reported as skipped.

Three things ride on the same counters: an ``If`` holds one extra count on each branch step
until its condition can be read (``_evaluate``); an execution group's chain runs as one call when
its head is ready (``_run_chain``, see :mod:`flowyml._groups`); remote values stay on their
cluster between steps (:mod:`flowyml._remote`). What happens around one step — cache look-up,
retries, timeouts, the executor — is in ``_run_node``, :mod:`flowyml._attempt` and the hooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import reprlib
import sys
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any

from ._attempt import run_attempts
from ._conditions import NOT_CHOSEN, ControlContext, NotReady, conditions_hold
from ._errors import StepError, StepTimeoutError
from ._executors._base import Executor
from ._graph import CONTEXT, MISSING, SLOT, Gate, Node, Plan, Source
from ._groups import Member, Outcome, run_chain
from ._log import step_failed, step_retrying
from ._remote import RemoteValues
from ._resources import Request, ResourcePool
from ._results import StepResult, StepStatus, split_outputs
from ._watch import Watch

__all__ = ("Run",)

_perf = time.perf_counter
_now = time.time


class _Abort(Exception):
    """Raised inside the task group by the first failure of a fail-fast run."""


class Run:
    """The state of one execution of a :class:`~flowyml._graph.Plan`."""

    def __init__(
        self,
        plan: Plan,
        *,
        params: Mapping[str, Any],
        executors: Sequence[Executor],
        fail_fast: bool = True,
        max_concurrency: int | None = None,
        on_failure: Callable[[Node, StepResult, list[Any]], None] | None = None,
        hooks: RunHooks | None = None,
        resources: ResourcePool | None = None,
        requests: Sequence[Request] = (),
        remote: bool = False,
        run_id: str = "",
        watch: Watch | None = None,
    ) -> None:
        self.plan = plan
        self.run_id = run_id
        self.watch = watch
        self._tracing = tracing = watch.tracing if watch is not None else None
        self.params = params
        self.fail_fast = fail_fast
        self.values: list[Any] = [MISSING] * len(plan.slot_names)
        self.results: list[StepResult | None] = [None] * len(plan.nodes)
        self.blocked: list[str | None] = [None] * len(plan.nodes)
        self.remaining = [len(n.deps) for n in plan.nodes]
        for gate in plan.gates:
            for i in (*gate.then_ids, *gate.else_ids):
                self.remaining[i] += 1
        self._gate_waiters: dict[int, list[Gate]] = {}
        self._executors = executors
        self._fast = [
            ex.name == "async"
            and n.step.retry is None
            and n.step.timeout is None
            and not n.step.uses_fallback
            and tracing is None
            for n, ex in zip(plan.nodes, self._executors, strict=True)
        ]
        self._gate_errors: dict[int, BaseException] = {}
        self._resources = resources
        self._requests = requests
        self._remote = RemoteValues(keep_outputs=not plan.gates) if remote else None
        self._limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        self._on_failure = on_failure
        self.hooks = hooks
        self._tg: asyncio.TaskGroup | None = None
        self.stopped_by: str | None = None

    async def execute(self) -> None:
        """Run every node; return when all have a fate. Outer cancellation propagates."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for i in self.plan.roots:
                    if self.remaining[i] == 0:
                        tg.create_task(self._drive(self.plan.nodes[i]))
                for gate in self.plan.gates:
                    self._evaluate(gate)
            self._undecided_gates()
        except* _Abort:
            pass
        finally:
            reason = (
                f"the run stopped after step {self.stopped_by!r} failed"
                if self.stopped_by
                else "the run stopped"
            )
            watch = self.watch
            for node in self.plan.nodes:
                if self.results[node.id] is None:
                    res = self.results[node.id] = StepResult(
                        node.name, StepStatus.SKIPPED, skip_reason=reason
                    )
                    if watch is not None:
                        watch.finished(res)

    async def _drive(self, node: Node | None) -> None:
        chains = self.plan.chains
        while node is not None:
            chain = chains.get(node.id) if chains else None
            if chain is None:
                node = self._finish(node, await self._run_node(node))
                continue
            done, grouped = await self._run_chain([self.plan.nodes[i] for i in chain])
            nxt = None
            for member, ok in done:
                nxt = self._finish(member, ok, chain if grouped else (), nxt)
            node = nxt

    def _finish(
        self, node: Node, ok: bool, chain: tuple[int, ...] = (), nxt: Node | None = None
    ) -> Node | None:
        """Count ``node`` done for its dependents: start those now ready, the first in this task."""
        if not ok:
            if self.fail_fast and self.results[node.id].status not in _QUIET:  # type: ignore[union-attr]
                self.stopped_by = node.name
                raise _Abort
            mark = self.blocked[node.id]
            if mark is None or mark is NOT_CHOSEN:
                mark = f"upstream step {node.name!r} did not produce its outputs"
            for d in node.dependents:
                self.blocked[d] = self.blocked[d] or mark
        remaining = self.remaining
        nodes = self.plan.nodes
        for d in node.dependents:
            if chain and d in chain:
                continue
            remaining[d] -= 1
            if remaining[d] == 0:
                if nxt is None:
                    nxt = nodes[d]
                else:
                    self._tg.create_task(self._drive(nodes[d]))  # type: ignore[union-attr]
        if self._gate_waiters:
            for gate in self._gate_waiters.pop(node.id, ()):
                self._evaluate(gate)
        return nxt

    async def _run_chain(self, chain: list[Node]) -> tuple[list[tuple[Node, bool]], bool]:
        """Run an execution group's chain as one call in one worker; see :mod:`flowyml._groups`.

        Returns each member's fate and whether the chain ran as one unit. When it did not (the
        head is blocked or served from the cache, its key cannot be made, or values are remote),
        only the head has run, and the other members follow as ordinary steps.
        """
        head = chain[0]
        if self.blocked[head.id] is not None or self._remote is not None:
            return [(head, await self._run_node(head))], False
        args, kwargs = self._arguments(head)
        hooks = self.hooks
        watch = self.watch
        results = [StepResult(n.name) for n in chain]
        self.results[head.id] = results[0]
        if watch is not None:
            watch.started(head.name)
        if hooks is not None and hooks.caching:
            hit = False
            head_res = results[0]
            head_res.start_time = _now()
            t0 = _perf()
            try:
                hit = await hooks.before(head, head_res, args, kwargs, self.values)
            except Exception as exc:
                self._fail(head_res, exc)
            if hit or head_res.status is not StepStatus.PENDING:
                head_res.duration_seconds = _perf() - t0
                head_res.end_time = head_res.start_time + head_res.duration_seconds
                hooks.after(head, head_res, args, kwargs, self.values)
                if watch is not None:
                    watch.finished(head_res)
                if head_res.status in _BAD:
                    step_failed(self.run_id, head_res)
                return [(head, head_res.status in _OK)], False
            head_res.start_time = None
        for n, r in zip(chain, results, strict=True):
            self.results[n.id] = r
        members = [self._member(n, chain) for n in chain]
        executor = self._executors[head.id]
        request = _largest(self._requests[n.id] for n in chain) if self._requests else ()
        started = _now()
        t0 = _perf()
        running = False
        try:
            async with self._held(request, self._limit):
                running = True
                started = _now()
                t0 = _perf()
                outcomes = await executor.run(run_chain, (members,), {}, timeout=None, step_name=head.name)
        except asyncio.CancelledError:
            for n, r in zip(chain, results, strict=True):
                if running:
                    r.status, r.start_time = StepStatus.CANCELLED, started
                else:
                    r.status, r.skip_reason = (
                        StepStatus.SKIPPED,
                        "the run stopped before the step could start",
                    )
                if hooks is not None:
                    hooks.after(n, r, args, kwargs, self.values)
                if watch is not None:
                    watch.finished(r)
            raise
        except Exception as exc:
            reason = f"upstream step {head.name!r} did not produce its outputs"
            outcomes = [Outcome(StepStatus.SKIPPED, {}, skip_reason=reason)] * len(chain)
            outcomes[0] = Outcome(StepStatus.PENDING, {}, start_time=started, duration_seconds=_perf() - t0)
            self._fail(results[0], exc)
        done: list[tuple[Node, bool]] = []
        for n, r, o in zip(chain, results, outcomes, strict=True):
            if o.status is not StepStatus.PENDING:
                r.status, r.outputs, r.error, r.traceback = o.status, o.outputs, o.error, o.traceback
                r.skip_reason = o.skip_reason
            r.attempts, r.duration_seconds = o.attempts, o.duration_seconds
            r.start_time = o.start_time or started
            r.end_time = r.start_time + r.duration_seconds
            for slot, name in zip(n.output_slots, n.output_names, strict=True):
                if name in r.outputs:
                    self.values[slot] = r.outputs[name]
            a, kw = self._arguments(n)
            if hooks is not None:
                if n is not head and r.status is StepStatus.SUCCEEDED:
                    with contextlib.suppress(Exception):  # a key that cannot be made: just not cached
                        hooks.prepare(n, r, a, kw)
                hooks.after(n, r, a, kw, self.values)
            if watch is not None:
                if n is not head and r.status is not StepStatus.SKIPPED:
                    watch.started(n.name)  # members run inside one call: known to have begun only now
                watch.finished(r)
            if r.status in _BAD:
                step_failed(self.run_id, r)
            ok = r.status in _OK
            if not ok and r.status is not StepStatus.SKIPPED and self._on_failure is not None:
                self._on_failure(n, r, [*a, *kw.values()])
            done.append((n, ok))
        return done, True

    @contextlib.asynccontextmanager
    async def _held(self, request: Request, limit: asyncio.Semaphore | None) -> AsyncIterator[None]:
        """Hold the step's resources and a concurrency slot; release exactly what was acquired."""
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

    def _member(self, node: Node, chain: list[Node]) -> Member:
        inside = {slot for n in chain for slot in n.output_slots}

        def arg(src: Source) -> tuple[str, Any]:
            return ("s", src.slot) if src.kind == SLOT and src.slot in inside else ("v", self._resolve(src))

        return Member(
            name=node.name,
            body=node.step.body,
            positional=tuple(arg(s) for s in (*node.positional, *node.var_positional)),
            keyword=tuple((k, arg(s)) for k, s in node.keyword),
            output_names=node.output_names,
            output_slots=node.output_slots,
            conditions=node.step.conditions,
            retry=node.step.retry,
        )

    def _retrying(self, step: str, attempt: int, delay: float, error: BaseException) -> None:
        """Attempt ``attempt`` of ``step`` failed and will be retried in ``delay`` seconds."""
        step_retrying(self.run_id, step, attempt, delay, error)
        if self.watch is not None:
            self.watch.retrying(step, attempt, delay, error)

    @staticmethod
    def _fail(res: StepResult, exc: BaseException) -> None:
        res.status = StepStatus.TIMED_OUT if isinstance(exc, StepTimeoutError) else StepStatus.FAILED
        res.error = exc
        res.traceback = "".join(traceback.format_exception(exc))

    def _evaluate(self, gate: Gate) -> None:
        """Pick a branch of an ``If`` once everything its condition reads exists."""
        try:
            chosen = bool(gate.condition(ControlContext(self)))
        except NotReady as wait:
            self._gate_waiters.setdefault(wait.node_id, []).append(gate)
            return
        except Exception as exc:
            exc.add_note(f"flowyml: raised by the condition of {gate.name}; neither branch ran")
            for i in (*gate.then_ids, *gate.else_ids):
                self.blocked[i] = self.blocked[i] or f"the condition of {gate.name} raised"
                self._gate_errors[i] = exc
                self._release(i)
            return
        run, drop = (gate.then_ids, gate.else_ids) if chosen else (gate.else_ids, gate.then_ids)
        for i in drop:
            self.blocked[i] = NOT_CHOSEN
            self._release(i)
        for i in run:
            self._release(i)

    def _undecided_gates(self) -> None:
        """Fail the branches of an ``If`` whose condition waited on a step that never finished.

        Called only when every task finished normally: after an abort or a cancellation such
        branches are simply reported as skipped.
        """
        for waited, gates in self._gate_waiters.items():
            for gate in gates:
                error = StepError(
                    f"the condition of {gate.name} reads step {self.plan.nodes[waited].name!r}, which never "
                    "finished; a condition must not read a step that depends on its own branches"
                )
                for i in (*gate.then_ids, *gate.else_ids):
                    if self.results[i] is None:
                        res = self.results[i] = StepResult(self.plan.nodes[i].name)
                        self._fail(res, error)
                        step_failed(self.run_id, res)
                        if self.watch is not None:
                            self.watch.finished(res)

    def _release(self, i: int) -> None:
        self.remaining[i] -= 1
        if self.remaining[i] == 0:
            assert self._tg is not None
            self._tg.create_task(self._drive(self.plan.nodes[i]))

    def _arguments(self, node: Node) -> tuple[list[Any], dict[str, Any]]:
        resolve = self._resolve
        args = [resolve(s) for s in node.positional]
        if node.var_positional:
            args += [resolve(s) for s in node.var_positional]
        kwargs = {k: resolve(s) for k, s in node.keyword} if node.keyword else {}
        return args, kwargs

    def _resolve(self, src: Source) -> Any:
        if src.kind == SLOT:
            return self.values[src.slot]
        if src.kind == CONTEXT:
            value = self.params.get(src.name, MISSING)
            if value is not MISSING:
                return value
        return src.default

    async def _run_node(self, node: Node) -> bool:
        """Run one node through its layers and record its fate; True when its outputs exist."""
        res = StepResult(node.name)
        self.results[node.id] = res
        blocked = self.blocked[node.id]
        if blocked is not None:
            failed = self._gate_errors.get(node.id) if self._gate_errors else None
            if failed is not None:
                self._fail(res, failed)
                step_failed(self.run_id, res)
            else:
                res.status = StepStatus.SKIPPED
                res.skip_reason = blocked
            if self.watch is not None:
                self.watch.finished(res)
            return False
        args, kwargs = self._arguments(node)
        step = node.step
        executor = self._executors[node.id]
        hooks = self.hooks
        cached = hooks is not None and hooks.caching and step.cache is not False
        keep_remote = False
        key_args, key_kwargs = args, kwargs
        request = self._requests[node.id] if self._requests else ()
        limit = self._limit
        watch = self.watch
        started = False
        res.start_time = _now()
        t0 = _perf()
        try:
            if self._remote is not None:
                keep_remote, key_args, key_kwargs = await self._remote.localize(
                    node, executor, args, kwargs, self.values, cached
                )
            if step.conditions and not conditions_hold(step.conditions, args, kwargs):
                res.status = StepStatus.SKIPPED
                res.skip_reason = "its condition was false"
            else:
                if watch is not None:
                    watch.started(node.name)
                if not (cached and await hooks.before(node, res, key_args, key_kwargs, self.values)):  # type: ignore[union-attr]
                    if request or limit is not None:
                        async with self._held(request, limit):
                            started = True
                            res.start_time = _now()
                            t0 = _perf()
                            ret = await run_attempts(
                                node,
                                executor,
                                args,
                                kwargs,
                                res,
                                keep_remote=keep_remote,
                                on_retry=self._retrying,
                                tracing=self._tracing,
                            )
                    elif self._fast[node.id]:
                        started = True
                        res.attempts = 1
                        ret = await step.body(*args, **kwargs)
                    else:
                        started = True
                        ret = await run_attempts(
                            node,
                            executor,
                            args,
                            kwargs,
                            res,
                            keep_remote=keep_remote,
                            on_retry=self._retrying,
                            tracing=self._tracing,
                        )
                    res.outputs = self._store(node, ret)
                    if keep_remote and cached:
                        await self._remote.keep_copy(node, res)  # type: ignore[union-attr]
                    res.status = StepStatus.SUCCEEDED
        except asyncio.CancelledError:
            if started:
                res.status = StepStatus.CANCELLED
            else:
                res.status = StepStatus.SKIPPED
                res.skip_reason = "the run stopped before the step could start"
                res.start_time = None
            raise
        except Exception as exc:
            self._fail(res, exc)
        finally:
            if res.start_time is not None:
                res.duration_seconds = _perf() - t0
                res.end_time = res.start_time + res.duration_seconds
            if hooks is not None:
                hooks.after(node, res, key_args, key_kwargs, self.values)
            if watch is not None:
                watch.finished(res)
        if res.status in _OK:
            return True
        if res.status in _BAD:
            step_failed(self.run_id, res)
        if self._on_failure is not None and res.status is not StepStatus.SKIPPED:
            self._on_failure(node, res, [*args, *kwargs.values()])
        return False

    async def localize_outputs(self) -> None:
        """Fetch every remote output to the driver; call before the executors close."""
        if self._remote is not None:
            await self._remote.localize_outputs(self.values, self.plan.nodes, self.results)

    def _store(self, node: Node, ret: Any) -> dict[str, Any]:
        """Put a return value into the node's output slots, by the rules of DESIGN.md §3."""
        if len(node.output_slots) == 1:
            self.values[node.output_slots[0]] = ret
            return {node.output_names[0]: ret}
        outputs = split_outputs(node.name, node.output_names, ret)
        for slot, name in zip(node.output_slots, node.output_names, strict=True):
            self.values[slot] = outputs[name]
        return outputs

    def outputs(self) -> dict[str, Any]:
        """Every output value produced (or loaded from the cache) in this run, by name."""
        names = self.plan.slot_names
        return {names[i]: v for i, v in enumerate(self.values) if v is not MISSING}


class RunHooks:
    """What the cache and the lineage recorder do around each step; the core stays unaware of them.

    ``before`` is only called when :attr:`caching` is true.

    ``before`` may satisfy the step (a cache hit): it fills the output slots, completes ``res``
    (status ``CACHED``) and returns True; an exception it raises fails the step. ``after`` sees
    every step that got past its blocked check, whatever its fate, and must not raise.
    """

    caching: bool = False

    def prepare(self, node: Node, res: StepResult, args: list[Any], kwargs: dict[str, Any]) -> None:
        """Make the step's cache key without a look-up (a step that ran inside a group chain)."""
        return

    async def before(
        self, node: Node, res: StepResult, args: list[Any], kwargs: dict[str, Any], values: list[Any]
    ) -> bool:
        return False

    def after(
        self, node: Node, res: StepResult, args: list[Any], kwargs: dict[str, Any], values: list[Any]
    ) -> None:
        return None


def _largest(requests: Iterable[Request]) -> Request:
    """What a chain holds: the largest amount of each kind any member needs (they run one by one)."""
    most: dict[str, float] = {}
    for request in requests:
        for kind, amount in request:
            most[kind] = max(most.get(kind, 0.0), amount)
    return tuple(sorted(most.items()))


_QUIET = frozenset({StepStatus.SKIPPED})
_BAD = frozenset({StepStatus.FAILED, StepStatus.TIMED_OUT})
_OK = frozenset({StepStatus.SUCCEEDED, StepStatus.CACHED})


def describe_inputs(node: Node, values: list[Any]) -> str:
    """Each argument of a step by parameter: type, size and a short repr, for the debug report."""
    lines = []
    for (label, _), v in zip(node.labels, values, strict=False):
        try:
            size = f"len={len(v)}"
        except TypeError:
            size = f"{sys.getsizeof(v)} bytes"
        text = reprlib.repr(v)
        lines.append(f"    {label} = {type(v).__name__}({size}) {text}")
    return "\n".join(lines) or "    no inputs"
