"""``Pipeline``: a set of steps, planned once, run as often as you like."""

from __future__ import annotations

import asyncio
import logging
import os
import reprlib
import sys
import time
import uuid
import warnings
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import _log
from ._assets import Asset, derive, input_assets
from ._attempt import UnitRunner
from ._catalog import AssetRouter
from ._collector import freeze_heap_once, quiet_full_collections
from ._conditions import If
from ._context import Context
from ._errors import ConfigError, EventLoopError, StoreError, StoreWarning
from ._executors._base import Executor
from ._executors._local import AsyncExecutor, LocalExecutor, ThreadExecutor
from ._gates import NOT_CHOSEN
from ._graph import Node, Plan, build_plan
from ._otel import tracing_for
from ._report import PipelineResult
from ._resources import ResourcePool, parse_capacity
from ._results import StepResult, StepStatus
from ._scheduler import Run
from ._state import RunState
from ._step import Step, step

if TYPE_CHECKING:
    from ._cache import StoreHooks
    from ._cachestore import CacheStore
    from ._dispatch import Channel
    from ._store import Store
    from ._watch import Watch
    from .events import Event, Listener

__all__ = ("Pipeline",)

DEFAULT_MAX_THREADS = 40
#: Runs of this many steps or more have the store hand back SQLite's page cache after them.
_LARGE_RUN = 5_000


class Pipeline:
    """Steps wired by the names they consume and produce, run on an asyncio engine.

    Args:
        name: the pipeline's name, recorded with every run.
        context: parameters injected into steps by name (see :func:`flowyml.context`).
        enable_cache: False turns the cache off for every run of this pipeline.
        cache_dir: where the cache and lineage store lives (default ``$FLOWYML_HOME`` or ``./.flowyml``).
        max_concurrency: at most this many steps run at once (default: no limit).
        max_threads: threads for plain-function steps (default 40).
        max_processes: worker processes for ``executor="process"`` steps (default: CPU count).
        debug: run steps one at a time and report failures in detail (see :meth:`run`).
        lineage: False stops recording runs and steps in the store (the cache still works).
        resources: capacity steps draw from, e.g. ``{"gpu": 1, "memory": "16Gi"}``; a step's
            ``resources=`` of a declared kind is held while it runs. Undeclared kinds are not limited.
        validate_types: False stops checking arguments against parameter annotations (at plan
            time across edges, and when a step receives them). Assets are still unwrapped for
            parameters annotated with their data's type, and returns still routed by annotation.
        routers: where asset outputs' artifacts go: the first router whose ``accepts(asset)``
            is true saves it, the rest stay in the store (:class:`~flowyml.LocalRouter`).
            Every asset output is registered in the store's asset catalogue either way
            (``flowyml assets``, ``Model.load(name)``), unless ``lineage`` is False.

    What a pipeline keeps between its runs: its plan and, from the first run that needs them,
    each cached node's key layout, made in one pass before that run's first step and freed
    with the pipeline or when a step is added (lineage shapes are the plan's, and hold no text). Nothing of a run outlives its
    result; the process-wide store keeps its connection, whose page cache SQLite hands back
    after a run of 5,000 steps or more.
    """

    def __init__(
        self,
        name: str,
        context: Context | Mapping[str, Any] | None = None,
        *,
        enable_cache: bool = True,
        cache_dir: str | os.PathLike[str] | None = None,
        max_concurrency: int | None = None,
        max_threads: int | None = None,
        max_processes: int | None = None,
        debug: bool = False,
        resources: Mapping[str, Any] | None = None,
        lineage: bool = True,
        validate_types: bool = True,
        routers: Iterable[AssetRouter] = (),
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"Pipeline name must be a non-empty string, got {name!r}")
        self.name = name
        self.context = context if isinstance(context, Context) else Context(dict(context or {}))
        self.enable_cache = bool(enable_cache)
        self.lineage = bool(lineage)
        self.validate_types = bool(validate_types)
        self.routers = tuple(routers)
        for router in self.routers:
            if not isinstance(router, AssetRouter):
                raise ConfigError(
                    f"Pipeline routers= takes AssetRouter objects (subclass flowyml.AssetRouter), got {router!r}"
                )
        self.cache_dir = cache_dir
        self.max_concurrency = _positive("max_concurrency", max_concurrency)
        self.max_threads = _positive("max_threads", max_threads) or DEFAULT_MAX_THREADS
        self.max_processes = _positive("max_processes", max_processes)
        self.debug = debug
        self.capacity = parse_capacity(resources)
        self._steps: list[Step] = []
        self._added: set[Step] = set()
        """The steps added, by identity (a Step hashes as an object): no int object per step."""
        self._flows: list[If] = []
        self._plan: Plan | None = None
        self._keys: Any = None
        """How the cache keys of the plan's nodes are made (``_cache.PlanKeys``), kept for its reruns."""
        self._pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ResourcePool] = (
            weakref.WeakKeyDictionary()
        )
        self._threads: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ThreadExecutor] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def steps(self) -> tuple[Step, ...]:
        return tuple(self._steps)

    @property
    def cache_store(self) -> CacheStore | None:
        """The cache of this pipeline's store, read and written by key; None when caching is off."""
        if not self.enable_cache:
            return None
        from ._cachestore import CacheStore

        return CacheStore(self.cache_dir)

    @property
    def runs_dir(self) -> Path:
        """A folder for files about this pipeline's runs (reports, plots), inside its store.

        Created on first access. The runs themselves are recorded in the store's database
        (``flowyml runs``), not here.
        """
        from ._store import resolve_root
        from ._store._artifacts import make_private_dir

        path = resolve_root(self.cache_dir) / "runs"
        make_private_dir(path)
        return path

    def add_step(self, step_: Step | Callable[..., Any]) -> Pipeline:
        """Add a step (a plain function is wrapped with ``@step``); returns the pipeline to chain calls."""
        if not isinstance(step_, Step):
            if not callable(step_):
                raise ConfigError(f"add_step() needs a @step function, got {type(step_).__name__}")
            step_ = step(step_)
        if step_ in self._added:
            raise ConfigError(f"step {step_.name!r} was already added to pipeline {self.name!r}")
        self._added.add(step_)
        self._steps.append(step_)
        self._forget_plan()
        return self

    def add_control_flow(self, flow: If) -> Pipeline:
        """Add an ``If``: its branch steps are added too unless already present."""
        if not isinstance(flow, If):
            raise ConfigError(f"add_control_flow() needs an If(...), got {type(flow).__name__}")
        for s in flow.steps():
            if s not in self._added:
                self.add_step(s)
        for other in self._flows:
            shared = {id(s) for s in other.steps()} & {id(s) for s in flow.steps()}
            if shared:
                raise ConfigError(
                    f"{flow.name} shares a branch step with {other.name}; a step may sit in one If only"
                )
        self._flows.append(flow)
        self._forget_plan()
        return self

    def _forget_plan(self) -> None:
        """A step or flow was added: the next run plans again, and what the old plan kept for
        its runs (key layouts) goes with it rather than until the next run."""
        self._plan = self._keys = None

    def plan(self) -> Plan:
        """The validated DAG, built on first use and reused until a step is added.

        Raises:
            GraphError: a cycle, a missing input, a duplicate output, or (``validate_types``) a
                producer whose return annotation can never fit its consumer's parameter
                (:class:`~flowyml.errors.InputTypeMismatchError`), before anything runs.
        """
        if self._plan is None:
            self._plan = build_plan(
                self._steps, self._flows, capacity=self.capacity, validate_types=self.validate_types
            )
        return self._plan

    def to_mermaid(self) -> str:
        """The pipeline's DAG as Mermaid flowchart text (see ``flowyml._mermaid``)."""
        from ._mermaid import to_mermaid

        return to_mermaid(self.plan(), params=self.context.to_dict())

    def run(
        self,
        context: Context | Mapping[str, Any] | None = None,
        *,
        fail_fast: bool = True,
        debug: bool | None = None,
        run_id: str | None = None,
        executor: Executor | None = None,
        on_event: Listener | None = None,
        progress: bool | None = None,
    ) -> PipelineResult:
        """Run the pipeline to completion and return its result; a failing step does not raise.

        ``context`` overrides apply to this run only. ``fail_fast=False`` lets branches that do
        not depend on a failed step finish. ``debug=True`` runs one step at a time and, when a
        step fails, prints its inputs and traceback and opens ``pdb`` if stdin is a terminal.
        ``executor`` (e.g. ``DaskExecutor(...)``) runs every step that does not name its own.
        Executor objects used by the run are closed when ``run()`` returns, since its event
        loop ends with it; ``arun()`` leaves them open for the caller to close.

        ``on_event`` hears each event of the run (see :mod:`flowyml.events`): a plain function
        is called on the event loop and must be quick; a coroutine function is awaited in a
        background task, in order, never delaying a step. Whatever it was not made to drop is
        delivered before this returns. ``progress=True`` (default: ``FLOWYML_PROGRESS=1``)
        shows a live display on stderr.

        Raises:
            EventLoopError: called inside a running event loop; use ``await pipeline.arun()``.
            GraphError, ConfigError: the pipeline cannot run, before any step starts.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise EventLoopError(
                f"Pipeline.run() was called inside a running event loop; "
                f"use `await pipeline.arun()` there (pipeline {self.name!r})"
            )
        return asyncio.run(
            self.arun(
                context,
                fail_fast=fail_fast,
                debug=debug,
                run_id=run_id,
                executor=executor,
                on_event=on_event,
                progress=progress,
                _close_all=True,
            )
        )

    async def arun(
        self,
        context: Context | Mapping[str, Any] | None = None,
        *,
        fail_fast: bool = True,
        debug: bool | None = None,
        run_id: str | None = None,
        executor: Executor | None = None,
        on_event: Listener | None = None,
        progress: bool | None = None,
        _close_all: bool = False,
        _channels: Sequence[Channel] = (),
    ) -> PipelineResult:
        """Run the pipeline inside the caller's event loop; same contract as :meth:`run`.

        Cancelling the awaiting task cancels every running step and propagates.
        """
        _refuse_worker_import(self.name)
        await _starts(asyncio.get_running_loop()).enter()
        plan = self.plan()
        freeze_heap_once()
        params: dict[str, Any] = {**self.context.to_dict(), **(dict(context) if context else {})}
        plan.check_context(params)
        debug = self.debug if debug is None else debug
        run_id = run_id or uuid.uuid4().hex
        if executor is not None and not isinstance(executor, Executor):
            raise ConfigError(
                f"run(executor=...) needs an executor object such as DaskExecutor(...), got {executor!r}"
            )
        listeners = _listeners(on_event)
        executors = _Executors(self, executor)
        assigned = executors.assign(plan)
        remote = any(ex.supports_remote for ex in set(assigned))
        start = time.time()
        watch = _watch_for(self.name, run_id, listeners, _channels, progress)
        try:
            store, hooks, mark = await self._open_store(plan, run_id, start)
        except BaseException as exc:
            if watch is not None:
                await watch.run_cancelled(None, exc)
            raise
        store_errors: list[StoreError] = []
        run_state = RunState(plan, params)
        state = "cancelled"
        try:
            executors.hold()
            _log.run_started(run_id, self.name, len(plan.nodes))
            if watch is not None:
                await watch.run_started(len(plan.nodes))
            runner = UnitRunner(
                run_state,
                assigned,
                hooks=hooks,
                resources=self._resource_pool() if self.capacity else None,
                max_concurrency=1 if debug else self.max_concurrency,
                remote=remote,
                on_failure=_debug_report if debug else None,
                fail_fast=fail_fast,
                run_id=run_id,
                watch=watch,
            )
            try:
                with quiet_full_collections(len(plan.nodes)):
                    await Run(run_state, runner, fail_fast=fail_fast).execute()
            finally:
                if watch is not None:
                    watch.unannounced(run_state.results)
            await runner.localize_outputs()
            state = _state(r for r in run_state.results if r is not None)
        except BaseException as exc:
            if watch is not None:
                partial = self._result(plan, run_state, run_id, "cancelled", start, params, ())
                await _finish_even_if_cancelled(watch.run_cancelled(partial, exc))
            raise
        finally:
            try:
                await executors.aclose(close_given=_close_all)
            finally:
                if store is not None and hooks is not None:
                    # Awaited in this task: cancelled meanwhile, the run's records are queued already
                    # and the shared store's writer commits them anyway.
                    await self._close_store(
                        store, hooks, run_state, run_id, start, state, mark, store_errors, wait=_close_all
                    )
        result = self._result(
            plan, run_state, run_id, state, start, params, _report_store_errors(self.name, store_errors)
        )
        _log.run_finished(run_id, lambda: _summary_line(result))
        if watch is not None:
            await watch.run_finished(result)
        return result

    def _result(
        self,
        plan: Plan,
        run_state: RunState,
        run_id: str,
        state: str,
        start: float,
        params: dict[str, Any],
        store_errors: tuple[StoreError, ...],
    ) -> PipelineResult:
        results = {
            r.step_name: r for r in run_state.results if r is not None and r.skip_reason is not NOT_CHOSEN
        }
        return PipelineResult(
            run_id=run_id,
            pipeline_name=self.name,
            state=state,
            outputs=run_state.outputs(),
            step_results=results,
            start_time=start,
            end_time=time.time(),
            producers={out: n.name for n in plan.nodes for out in n.output_names},
            plan=plan,
            params=params,
            store_errors=store_errors,
        )

    def stream(
        self,
        context: Context | Mapping[str, Any] | None = None,
        *,
        fail_fast: bool = True,
        run_id: str | None = None,
        executor: Executor | None = None,
        progress: bool | None = None,
    ) -> EventStream:
        """Run the pipeline in the background and iterate its events: ``async with`` it.

        ::

            async with pipeline.stream(context={"lr": 0.1}) as events:
                async for event in events:
                    await websocket.send_json(describe(event))

        The iteration ends after :class:`~flowyml.events.RunFinished`, always the last event
        (its ``result`` is the run's :class:`PipelineResult`). Leaving the block early stops
        the run: running steps are cancelled, as when an ``arun()`` task is. If the run
        cannot start, entering the block raises (a bad graph or context); an error that ends
        it later is raised by the iteration. Events the consumer is too slow for are coalesced
        or dropped beyond a bound, and counted in ``RunFinished.dropped``.
        """
        return EventStream(
            self,
            context,
            {"fail_fast": fail_fast, "run_id": run_id, "executor": executor, "progress": progress},
        )

    async def _open_store(
        self, plan: Plan, run_id: str, start: float
    ) -> tuple[Store | None, StoreHooks | None, int]:
        if not (self.enable_cache or self.lineage):
            return None, None, 0
        from ._cache import PlanKeys, StoreHooks
        from ._store import RunRecord, shared_store

        store = await shared_store(self.cache_dir)  # one per process and directory, kept open
        mark = store.error_mark()
        # What the plan keeps for its runs is made here, in one pass each, not step by step
        # during the run: see PlanKeys.fill.
        if self.enable_cache and (self._keys is None or self._keys.plan is not plan):
            self._keys = PlanKeys(plan).fill()
        hooks = StoreHooks(
            store, plan, run_id=run_id, caching=self.enable_cache, recording=self.lineage, keys=self._keys
        )
        hooks.check_fingerprints()
        if self.enable_cache:
            hooks.view = await store.preload(n.name for n in plan.nodes if n.step.cache is not False)
            await hooks.prepare()
        if self.lineage:
            store.record_run(RunRecord(run_id, self.name, "running", start))
        return store, hooks, mark

    async def _close_store(
        self,
        store: Store,
        hooks: StoreHooks,
        run: RunState,
        run_id: str,
        start: float,
        state: str,
        mark: int,
        errors: list[StoreError],
        *,
        wait: bool,
    ) -> None:
        """Record how the run ended; what could not be written goes in ``errors``.

        ``run()`` (``wait``) returns once every record is committed; ``arun()`` once its cache
        entries are, and leaves its lineage to the shared writer, which commits it within 20 ms
        with the next runs' records (and at the latest when the store closes).
        """
        from ._store import RunRecord

        try:
            if self.lineage:
                results = run.results
                for node, res in zip(hooks.plan.nodes, results, strict=False):
                    if res is not None and res.start_time is None and res.skip_reason is not NOT_CHOSEN:
                        store.record_step(hooks.record(node, res))  # never started: skipped
                end = time.time()
                saved = sum(r.time_saved_seconds for r in results if r is not None)
                store.record_run(RunRecord(run_id, self.name, state, start, end, end - start, saved))
        except StoreError as exc:  # the store was closed under the run: its values still return
            errors.append(exc)
        finally:
            try:
                errors += await store.settle(mark, wait=wait)
            finally:
                hooks.release()
                if len(hooks.plan.nodes) >= _LARGE_RUN:
                    store.hand_back_pages()  # after the run's records, without waiting for it
        if self.lineage:
            errors += await self._register_assets(store, run, run_id)

    async def _register_assets(self, store: Store, run: RunState, run_id: str) -> list[StoreError]:
        """Register every asset output of the run in the store's catalogue, off the loop.

        Returns what failed (a router that could not save an asset), for ``result.store_errors``.
        """
        from ._catalog import Produced, register

        typing = run.plan.typing
        produced: list[Produced] = []
        for node, res in zip(run.plan.nodes, run.results, strict=True):
            if res is None or res.status is not StepStatus.SUCCEEDED:
                continue
            made = [(name, v) for name, v in res.outputs.items() if isinstance(v, Asset)]
            if not made:
                continue
            routed = typing[node.id] if typing else None
            if routed is None or not routed.wraps:
                # Not routed by annotation, so not linked while running: its parents are the
                # assets among its inputs all the same.
                args, kwargs = run.arguments(node)
                inputs = input_assets([*args, *kwargs.values()])
                for _, asset in made:
                    derive(asset, inputs)
            produced += [Produced(asset, run_id, self.name, res.step_name, name) for name, asset in made]
        if not produced:
            return []
        try:
            await asyncio.to_thread(register, store.root, produced, self.routers)
        except StoreError as exc:
            return [exc]
        return []

    def _thread_executor(self) -> ThreadExecutor:
        """The threads of every run of this pipeline on the running loop: ``max_threads`` in all.

        Per run, 200 concurrent runs of a one-step pipeline started 200 threads.
        """
        loop = asyncio.get_running_loop()
        found = self._threads.get(loop)
        if found is None or found.max_threads != self.max_threads:
            found = self._threads[loop] = ThreadExecutor(self.max_threads)
        return found

    def _resource_pool(self) -> ResourcePool:
        """The capacity shared by every run of this pipeline on the running event loop."""
        loop = asyncio.get_running_loop()
        pool = self._pools.get(loop)
        if pool is None:
            pool = self._pools[loop] = ResourcePool(self.capacity)
        return pool

    def __repr__(self) -> str:
        return f"Pipeline({self.name!r}, steps={[s.name for s in self._steps]})"


class EventStream:
    """What :meth:`Pipeline.stream` returns: an async context manager around a running run.

    Entering it checks the pipeline and the context and starts the run as a task; the object it
    gives is an async iterator over the run's events. Leaving it cancels the run if it is still
    going and waits until it has stopped.
    """

    def __init__(
        self, pipeline: Pipeline, context: Context | Mapping[str, Any] | None, options: dict[str, Any]
    ) -> None:
        self._pipeline = pipeline
        self._context = context
        self._options = options
        from ._dispatch import Channel

        self._channel = Channel()
        self._task: asyncio.Task[PipelineResult] | None = None
        self._over = False

    async def __aenter__(self) -> AsyncIterator[Event]:
        if self._task is not None:
            raise ConfigError(
                f"a stream of pipeline {self._pipeline.name!r} can be entered once; call stream() again"
            )
        pipeline = self._pipeline
        pipeline.plan().check_context(
            {**pipeline.context.to_dict(), **(dict(self._context) if self._context else {})}
        )
        self._task = asyncio.get_running_loop().create_task(
            pipeline.arun(self._context, _channels=(self._channel,), **self._options),
            name=f"flowyml-stream-{pipeline.name}",
        )
        self._task.add_done_callback(self._ended)
        return self._events()

    def _ended(self, task: asyncio.Task[PipelineResult]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._channel.fail(task.exception())  # type: ignore[arg-type]

    async def _events(self) -> AsyncIterator[Event]:
        from .events import RunFinished

        while not self._over:
            event = await self._channel.get()
            if isinstance(event, RunFinished):
                self._over = True
            yield event

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        task = self._task
        assert task is not None
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
        if kind is None and not task.cancelled() and task.exception() is not None and not self._over:
            raise task.exception()  # type: ignore[misc]


def _watch_for(
    pipeline: str, run_id: str, listeners: list[Listener], channels: Sequence[Channel], progress: bool | None
) -> Watch | None:
    """What watches this run, or None when nothing does (then nothing of it is even imported)."""
    tracing = tracing_for(pipeline, run_id)
    show = False
    if progress or (progress is None and os.environ.get("FLOWYML_PROGRESS")):
        from ._progress import progress_wanted

        show = progress_wanted(progress)
    if not (listeners or channels or show or tracing is not None or _log.run_log.isEnabledFor(logging.DEBUG)):
        return None
    from ._progress import Progress
    from ._watch import Watch

    return Watch(
        run_id=run_id,
        pipeline=pipeline,
        listeners=listeners,
        channels=channels,
        progress=Progress(pipeline) if show else None,
        tracing=tracing,
    )


def _summary_line(result: PipelineResult) -> str:
    from ._progress import summary_line

    return summary_line(result)


def _listeners(on_event: Listener | None) -> list[Listener]:
    """``on_event=`` as a list of listeners, or a ConfigError saying what it must be."""
    if on_event is None:
        return []
    if not callable(on_event):
        raise ConfigError(
            f"run(on_event=...) needs a function taking one event (plain or async def), got {on_event!r}"
        )
    return [on_event]


class _Starts:
    """Runs started together take turns: each iteration of the event loop starts runs for ~0.5 ms at most.

    asyncio runs every callback that is ready when an iteration begins before it looks at its
    timers and sockets again. 200 ``arun()`` started by one ``gather`` did all their setup (plan
    check, executors, store hooks, the first task) in one iteration, ~10 ms, and the next phase
    of all 200 in the next one, while every other task on the loop (a server's requests, a
    heartbeat) waited. A run starts at once while the current iteration has been busy for less
    than :attr:`BUDGET` (a run starting alone never waits); otherwise it queues, and each
    iteration lets about as many queued runs try as started in the one before, in order.
    """

    BUDGET = 0.0005
    __slots__ = ("_admitted", "_began", "_waiting")

    def __init__(self) -> None:
        self._began: float | None = None
        """When the current iteration began; None while no run starts or waits."""
        self._admitted = 0
        self._waiting: deque[asyncio.Future[None]] = deque()

    async def enter(self) -> None:
        """Return when the calling run may do its setup."""
        if not self._waiting and self._room():
            return
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._waiting.append(fut)
        while True:
            await fut  # cancelled: the future is done, and passed over when its turn comes
            if self._room():
                return
            fut = loop.create_future()
            self._waiting.appendleft(fut)  # still first in line

    def _room(self) -> bool:
        now = time.perf_counter()
        if self._began is None:
            self._began = now
            asyncio.get_running_loop().call_soon(self._next_iteration)  # first thing in the next iteration
        elif now - self._began > self.BUDGET:
            return False
        self._admitted += 1
        return True

    def _next_iteration(self) -> None:
        admitted, self._admitted = self._admitted, 0
        waiting = self._waiting
        if not waiting and not admitted:
            self._began = None
            return
        self._began = time.perf_counter()
        asyncio.get_running_loop().call_soon(self._next_iteration)
        turns = admitted + 1
        while turns and waiting:  # they run in the next iteration
            fut = waiting.popleft()
            if not fut.done():
                fut.set_result(None)
                turns -= 1


_starts_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Starts] = weakref.WeakKeyDictionary()


def _starts(loop: asyncio.AbstractEventLoop) -> _Starts:
    found = _starts_by_loop.get(loop)
    if found is None:
        found = _starts_by_loop[loop] = _Starts()
    return found


class _Executors:
    """The executors of one run, created on first use and closed when the run ends."""

    def __init__(self, pipeline: Pipeline, default: Executor | None = None) -> None:
        self._pipeline = pipeline
        self._default = default
        self._given: dict[int, Executor] = {}
        self._async = AsyncExecutor()
        self._thread: ThreadExecutor | None = None
        self._process: Executor | None = None
        self._by_kind: dict[tuple[int, bool], Executor] = {}
        self._held: list[tuple[ThreadExecutor | LocalExecutor, Any]] = []

    def assign(self, plan: Plan) -> list[Executor]:
        """The executor of every node, in node order; steps of one kind share one executor."""
        by_kind = self._by_kind
        out = []
        for node in plan.nodes:
            s = node.step
            kind = (id(s.executor), s.is_async)
            found = by_kind.get(kind)
            if found is None:
                found = by_kind[kind] = self._make(s)
            out.append(found)
        return out

    def _make(self, s: Step) -> Executor:
        kind = s.executor
        if kind is None and self._default is not None:
            kind = self._default
        if isinstance(kind, Executor):
            self._given[id(kind)] = kind
            return kind
        if kind == "process":
            if self._process is None:
                from ._executors._process import ProcessExecutor

                self._process = ProcessExecutor(self._pipeline.max_processes)
            return self._process
        if s.is_async:
            return self._async
        if self._thread is None:
            self._thread = self._pipeline._thread_executor()
        return self._thread

    def hold(self) -> None:
        """Keep the thread workers of this run's executors until :meth:`aclose` (they are shared)."""
        for ex in {id(ex): ex for ex in self._by_kind.values()}.values():
            if isinstance(ex, ThreadExecutor | LocalExecutor):
                self._held.append((ex, ex.hold()))

    async def aclose(self, *, close_given: bool) -> None:
        """Close the executors this run made, and the ones it was given when ``close_given``.

        The thread executors are shared by the pipeline's runs: each run lets go of them; the
        last one to end stops their threads when the run owns its loop (``run()``, which
        ``close_given`` marks), else they stay warm for the loop's next runs until idle.
        """
        held, self._held = self._held, []
        owned = [ex for ex in (self._process,) if ex is not None]
        try:
            for ex in owned + (list(self._given.values()) if close_given else []):
                await ex.aclose()
        finally:
            for threads, pool in held:
                await threads.release(pool, stop=close_given)


def _refuse_worker_import(name: str) -> None:
    """Refuse to run while a worker process (forkserver, spawn) is importing the user's script.

    Without an ``if __name__ == "__main__":`` guard, every worker started for process steps would
    run the whole pipeline again, and record phantom runs in the store.
    """
    frame = sys._getframe(1)
    while frame is not None and not (
        frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") == "__mp_main__"
    ):
        frame = frame.f_back  # type: ignore[assignment]
    if frame is not None:
        raise ConfigError(
            f"pipeline {name!r} was started while a worker process imported your script; put the code "
            'that runs it under `if __name__ == "__main__":` (process steps start workers that import it)'
        )


def _report_store_errors(name: str, errors: list[StoreError]) -> tuple[StoreError, ...]:
    """Warn once for a run whose writes to the store failed; the errors for ``result.store_errors``."""
    if errors:
        warnings.warn(
            StoreWarning(
                f"pipeline {name!r}: {len(errors)} write(s) to the flowyml store failed; the run's values "
                f"are all here, but what failed is not cached or recorded (see result.store_errors). "
                f"First: {errors[0]}"
            ),
            stacklevel=3,
        )
    return tuple(errors)


def _state(results: Iterable[StepResult]) -> str:
    statuses = {r.status for r in results}
    if statuses & {StepStatus.FAILED, StepStatus.TIMED_OUT}:
        return "failed"
    if StepStatus.CANCELLED in statuses:
        return "cancelled"
    return "completed"


def _positive(option: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"Pipeline {option}={value!r} must be a positive integer, or None for the default")
    return value


def _debug_report(node: Node, res: StepResult, inputs: list[Any]) -> None:
    """Print what a failing step received and why it failed; open pdb when a human is there."""
    print(f"\nflowyml debug: step {node.name!r} {res.status.value}", file=sys.stderr)
    print(f"  inputs:\n{describe_inputs(node, inputs)}", file=sys.stderr)
    if res.traceback:
        print(res.traceback, file=sys.stderr)
    if res.error is not None and sys.stdin is not None and sys.stdin.isatty():
        import pdb

        pdb.post_mortem(res.error.__traceback__)


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


async def _finish_even_if_cancelled(closing: Coroutine[Any, Any, None]) -> None:
    """Await ``closing`` to the end even if this task is cancelled meanwhile, then re-raise."""
    task = asyncio.ensure_future(closing)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError as cancelled:
        try:
            await task
        except Exception as exc:  # the cancellation matters more; keep the close error visible
            cancelled.add_note(f"flowyml: finishing the run's watchers also failed: {exc!r}")
        raise
