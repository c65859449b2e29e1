"""Mapped steps and stream sources: a node made of many items, each with everything a step has.

A mapped node (``map_over=``) is one unit for the scheduler and many *items* here: item *i* calls
the body with element *i* of each mapped input (zipped), through the item's own layers::

    upstream marker -> cache (step key + item identity) -> retry -> limits (slot, token) -> timeout
    -> executor -> record (item result, lineage, the item's place in the output)

A stream source (a generator function step) yields its items one by one. Either kind of node
publishes its items on an :class:`Items` board as they come; a mapped consumer of it is started
by the scheduler when the producer starts (``node.streams_to``) and starts item *i* as soon as
item *i* of every streamed input exists: no barrier between stages. A generator is advanced only
while it is fewer than ``max_pending`` items ahead of each of its mapped consumers. Every other
consumer reads the producer's output slot, which holds the complete list once the producer ends.

Failure: by default the first item failing for good fails the node (with ``fail_fast``, its
other items are cancelled; without, running items finish and no new one starts). With
``map_errors="collect"`` every item runs; failed ones leave an :class:`~flowyml.ItemFailed` in
the list, and a mapped consumer skips such an item and passes the marker on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

from ._errors import CircuitOpenError, StepError, StepTimeoutError
from ._executors._base import Executor
from ._fallback import watch_fallbacks
from ._graph import MISSING, MapSpec, Node
from ._limits import Limit, acquire_all, release_all
from ._log import Watcher
from ._results import ItemFailed, ItemResults, StepResult, StepStatus, finished
from ._retry import RetryRun, _asleep
from ._state import RunState

__all__ = ("Items", "run_mapped", "run_source")

_perf = time.perf_counter
_now = time.time

#: Wait between tries while a half-open breaker's trial call is still out (not counted as an attempt).
HALF_OPEN_POLL: Final = 0.02
#: How many items a generator may run ahead of a mapped consumer without a concurrency limit.
UNLIMITED_PENDING: Final = 1024
_END: Final = -1


class UpstreamFailed(Exception):
    """The producer of a streamed input ended without producing all its items."""


class Items:
    """The items of one mapped node or stream source as they come, for its mapped consumers.

    ``values[i]`` is ``MISSING`` until item *i* exists; ``length`` is known once the producer
    knows how many items there are. Listeners are told each new index, then ``_END``; a
    consumer's count of finished items gives a stream source its room to run ahead.
    """

    __slots__ = ("_room", "_slack", "bounds", "consumed", "length", "listeners", "name", "ok", "values")

    def __init__(self, name: str, bounds: dict[int, int]) -> None:
        self.name = name
        self.values: list[Any] = []
        self.length: int | None = None
        self.ok: bool | None = None
        """None while producing; True once every item exists; False if the producer gave up."""
        self.listeners: list[Callable[[int], None]] = []
        self.bounds = bounds
        """Consumer node id -> max_pending, for each mapped consumer that has not ended."""
        self.consumed = dict.fromkeys(bounds, 0)
        self._room: asyncio.Event | None = None
        self._slack = 1

    # -- producer side
    def expect(self, n: int) -> None:
        if len(self.values) < n:
            self.values.extend([MISSING] * (n - len(self.values)))  # in place: the producer shares it
        self.length = n

    def put(self, index: int, value: Any) -> None:
        _place(self.values, index, value)
        for listen in self.listeners:
            listen(index)

    def append(self, value: Any) -> None:
        self.values.append(value)
        index = len(self.values) - 1
        for listen in self.listeners:
            listen(index)

    def end(self, ok: bool) -> None:
        if self.ok is not None:
            return
        if ok and self.length is None:
            self.length = len(self.values)
        self.ok = ok
        for listen in self.listeners:
            listen(_END)
        self.listeners = []

    def ahead(self, slack: int = 0) -> bool:
        """Whether some consumer is ``max_pending - slack`` items or more behind what was produced."""
        produced = len(self.values)
        consumed = self.consumed
        return any(produced - consumed[c] >= bound - slack for c, bound in self.bounds.items())

    async def room(self) -> None:
        """Wait until every mapped consumer is less than its ``max_pending`` behind.

        The producer is woken once consumers are a quarter of their bound back from it, so it
        produces in runs rather than one wake-up per item.
        """
        while self.bounds and self.ahead():
            self._room = asyncio.Event()
            self._slack = max(1, min(self.bounds.values()) // 4)
            await self._room.wait()
            self._room = None

    # -- consumer side
    def done_one(self, consumer: int) -> None:
        """A consumer finished one item: it may let the producer run on."""
        consumed = self.consumed
        if consumer in consumed:
            consumed[consumer] += 1
            if self._room is not None and not self.ahead(self._slack):
                self._room.set()

    def leave(self, consumer: int) -> None:
        """A consumer ended (any fate): the producer no longer waits for it."""
        self.bounds.pop(consumer, None)
        self.consumed.pop(consumer, None)
        if self._room is not None:
            self._room.set()


def _place(values: list[Any], index: int, value: Any) -> None:
    if index >= len(values):
        values.extend([MISSING] * (index + 1 - len(values)))
    values[index] = value


def pending_bound(step: Any) -> int:
    """``max_pending`` of a mapped step: as given, else four times its concurrency."""
    if step.max_pending is not None:
        return int(step.max_pending)
    window = _window(step)
    return UNLIMITED_PENDING if window is None else 4 * window


def _window(step: Any) -> int | None:
    """How many items of a mapped step run at once in one run (None: no limit)."""
    sizes = [n for n in (step.concurrency, step.limit.concurrency if step.limit else None) if n is not None]
    return min(sizes) if sizes else None


# ---------------------------------------------------------------------------- a mapped node


class MapRunner(Protocol):
    """What items need of the unit runner (:class:`flowyml._attempt.UnitRunner`)."""

    state: RunState
    hooks: Any
    items: dict[int, Items]
    limits: dict[int, Limit]
    executors: Sequence[Executor]
    fail_fast: bool
    watch: Watcher | None

    def held(self, node: Node) -> contextlib.AbstractAsyncContextManager[None] | None: ...

    def settle(
        self,
        node: Node,
        res: StepResult,
        args: list[Any],
        kwargs: dict[str, Any],
        key_args: list[Any],
        key_kwargs: dict[str, Any],
    ) -> bool: ...


class _Mapped:
    """The run of one mapped node: its items' launch, their fates, and its output list."""

    def __init__(
        self, runner: MapRunner, node: Node, spec: MapSpec, args: list[Any], kwargs: dict[str, Any]
    ) -> None:
        step = node.step
        self.runner = runner
        self.node = node
        self.spec = spec
        self.args = args
        self.kwargs = kwargs
        self.collect = step.map_errors == "collect"
        self.results = ItemResults(node.name)
        self.board = runner.items.get(node.id)
        self.out: list[Any] = [] if self.board is None else self.board.values
        self.sources: list[Sequence[Any] | Items] = []
        self.streams: list[Items] = []
        for at, _name, streamed in spec.places:
            if streamed >= 0:
                board = runner.items[streamed]
                self.sources.append(board)
                self.streams.append(board)
            else:
                self.sources.append(args[at] if isinstance(at, int) else kwargs[at])
        self.length: int | None = None
        self.launched = 0
        self.ready: list[int] = []
        self.counts: list[int] = []  # per index: streamed inputs holding it
        self.running: dict[int, asyncio.Task[None]] = {}
        self.window = _window(step)
        self.first_error: tuple[int, BaseException] | None = None
        self.stop: BaseException | None = None
        self.wake = asyncio.Event()
        self.cached = 0
        self.settled = 0
        self.failed = 0
        limits = [lim for lim in (runner.limits.get(node.id), step.limit) if lim is not None]
        self.limits: tuple[Limit, ...] = tuple(limits)
        self.executor: Executor = runner.executors[node.id]
        self.runner_held = runner.held
        self.body = watch_fallbacks(step.body) if step.uses_fallback else step.body
        hooks = runner.hooks
        self.caching = hooks is not None and hooks.caching and step.cache is not False
        self.base_key: str | None = None
        self.fail_fast = runner.fail_fast
        # Nothing around an item's call: await the body right here (the per-item hot path).
        self.direct = (
            step.is_async
            and self.executor.name == "async"
            and step.retry_policy is None
            and step.timeout is None
            and not step.uses_fallback
            and not self.limits
            and runner.held(node) is None
        )

    def _check_lengths(self) -> None:
        """Fix the number of items once every input's length is known; unequal lengths are an error."""
        lengths: list[tuple[str, int]] = []
        for (_at, name, _s), src in zip(self.spec.places, self.sources, strict=True):
            n = src.length if isinstance(src, Items) else len(src)
            if n is not None:
                lengths.append((name, n))
        if len({n for _, n in lengths}) > 1:
            (a, na), (b, nb) = lengths[0], next(x for x in lengths if x[1] != lengths[0][1])
            raise StepError(
                f"step {self.node.name!r} maps over inputs of unequal lengths: {a!r} has {na} items and "
                f"{b!r} has {nb}; map_over zips its inputs, so they must be equally long",
                step_name=self.node.name,
            )
        if len(lengths) == len(self.sources) and self.length is None:
            self.length = lengths[0][1] if lengths else 0
            self.results.grow(self.length)
            if len(self.out) < self.length:
                self.out.extend([MISSING] * (self.length - len(self.out)))
            if self.board is not None and self.board.length is None:
                self.board.expect(self.length)

    def _listen(self, board: Items) -> Callable[[int], None]:
        def on_item(index: int) -> None:
            if index == _END:
                if board.ok is False and self.stop is None:
                    self.stop = UpstreamFailed(board.name)
                else:
                    try:
                        self._check_lengths()
                    except StepError as exc:
                        self.stop = self.stop or exc
                self.wake.set()
                return
            self._arrived(index)

        return on_item

    def _arrived(self, index: int) -> None:
        counts = self.counts
        if index >= len(counts):
            counts.extend([0] * (index + 1 - len(counts)))
        counts[index] += 1
        if counts[index] == len(self.streams):
            if self.length is not None and index >= self.length:
                self.stop = self.stop or StepError(
                    f"step {self.node.name!r} maps over inputs of unequal lengths: an input streamed more "
                    f"than the {self.length} items of the others",
                    step_name=self.node.name,
                )
                self.wake.set()
                return
            self.ready.append(index)
            self.wake.set()

    async def run(self) -> tuple[StepStatus, BaseException | None, str | None]:
        """Launch every item as it becomes ready; the node's status, error and skip reason."""
        runner = self.runner
        if self.caching:
            self.base_key = runner.hooks.item_base_key(self.node, self.args, self.kwargs, self.spec)
        self._check_lengths()
        subscribed: list[tuple[Items, Callable[[int], None]]] = []
        if self.streams:
            for board in self.streams:
                listen = self._listen(board)
                for i, v in enumerate(board.values):
                    if v is not MISSING:
                        listen(i)
                if board.ok is not None:
                    listen(_END)
                else:
                    board.listeners.append(listen)
                    subscribed.append((board, listen))
        else:
            self.ready.extend(range(self.length or 0))
        try:
            await self._launch_all()
        except BaseException:
            for t in self.running.values():
                t.cancel()
            if self.running:
                await asyncio.gather(*self.running.values(), return_exceptions=True)
            raise
        finally:
            for board, listen in subscribed:
                with contextlib.suppress(ValueError):
                    board.listeners.remove(listen)
            for board in self.streams:
                board.leave(self.node.id)
        if isinstance(self.stop, UpstreamFailed):
            return (
                StepStatus.SKIPPED,
                None,
                f"upstream step {self.stop.args[0]!r} did not produce its outputs",
            )
        if self.stop is not None:
            return StepStatus.FAILED, self.stop, None
        if self.first_error is not None and not self.collect:
            _index, exc = self.first_error
            status = StepStatus.TIMED_OUT if isinstance(exc, StepTimeoutError) else StepStatus.FAILED
            return status, exc, None
        if self.length and self.cached == self.length:
            return StepStatus.CACHED, None, None
        return StepStatus.SUCCEEDED, None, None

    async def _launch_all(self) -> None:
        window = self.window
        ready = self.ready
        position = 0
        create_task = asyncio.get_running_loop().create_task
        while True:
            stopping = self.stop is not None or (self.first_error is not None and not self.collect)
            while not stopping and position < len(ready) and (window is None or len(self.running) < window):
                index = ready[position]
                position += 1
                self.running[index] = create_task(self._item(index))
                self.launched += 1
            if position > 4096:
                del ready[:position]
                position = 0
            complete = self.length is not None and self.launched >= self.length
            if not self.running and (stopping or complete):
                return
            self.wake.clear()
            await self.wake.wait()
            if self.first_error is not None and not self.collect and self.fail_fast:
                for t in self.running.values():
                    t.cancel()

    def _item_args(self, index: int) -> tuple[list[Any], dict[str, Any], list[Any]]:
        args = self.args
        kwargs = self.kwargs
        elements = []
        copied_args = copied_kwargs = False
        for (at, _name, _s), src in zip(self.spec.places, self.sources, strict=True):
            value = src.values[index] if isinstance(src, Items) else src[index]
            elements.append(value)
            if isinstance(at, int):
                if not copied_args:
                    args, copied_args = list(args), True
                args[at] = value
            else:
                if not copied_kwargs:
                    kwargs, copied_kwargs = dict(kwargs), True
                kwargs[at] = value
        return args, kwargs, elements

    async def _item(self, index: int) -> None:
        try:
            node = self.node
            runner = self.runner
            hooks = runner.hooks
            args, kwargs, elements = self._item_args(index)
            start = _now()
            t0 = _perf()
            key: str | None = None
            retry: RetryRun | None = None
            error: BaseException | None = None
            value: Any = None
            marker = None
            for e in elements:
                if type(e) is ItemFailed:
                    marker = e
            if marker is not None:
                status, value, attempts = StepStatus.SKIPPED, marker, 0
            else:
                try:
                    found: Any = MISSING
                    if self.caching and self.base_key is not None:
                        key, found = await hooks.item_lookup(node, self.base_key, args, kwargs, elements)
                    if found is not MISSING:
                        value, status, attempts = found, StepStatus.CACHED, 0
                        self.cached += 1
                    elif self.direct:
                        value = await self.body(*args, **kwargs)
                        status, attempts = StepStatus.SUCCEEDED, 1
                    else:
                        step = node.step
                        if step.retry_policy is not None:
                            retry = RetryRun(step.retry_policy)
                        value = await self._attempts(args, kwargs, retry)
                        status, attempts = StepStatus.SUCCEEDED, retry.attempt if retry is not None else 1
                except asyncio.CancelledError:
                    took = _perf() - t0
                    self.results.set(index, StepStatus.CANCELLED, retry.attempt if retry else 1, took)
                    if hooks is not None:
                        hooks.after_item(node, index, StepStatus.CANCELLED, 1, start, took, None, key, None)
                    raise
                except Exception as exc:
                    error = exc
                    status = StepStatus.TIMED_OUT if isinstance(exc, StepTimeoutError) else StepStatus.FAILED
                    attempts = retry.attempt if retry is not None else 1
                    value = ItemFailed(node.name, index, exc)
                    if self.first_error is None:
                        self.first_error = (index, exc)
                        exc.add_note(f"flowyml: item {index} of mapped step {node.name!r}")
            took = _perf() - t0
            if hooks is not None and status is not StepStatus.SKIPPED:
                hooks.after_item(node, index, status, attempts, start, took, error, key, value)
            self.results.set(index, status, attempts, took, error, key)
            _place(self.out, index, value)
            if self.board is not None:
                self.board.put(index, value)
            for board in self.streams:
                board.done_one(node.id)
            self.settled += 1
            if error is not None:
                self.failed += 1
            if hooks is not None:
                hooks.item_progress(node, self.settled, self.failed, self.length)
            watch = self.runner.watch
            if watch is not None:
                watch.items(node.name, self.settled, self.failed, self.length)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a fault in the bookkeeping itself: end the node with it
            self.stop = self.stop or exc
        finally:
            self.running.pop(index, None)
            self.wake.set()

    async def _attempts(self, args: list[Any], kwargs: dict[str, Any], retry: RetryRun | None) -> Any:
        """One item's attempts: each under the limits, with its own timeout, retried through ``retry``.

        A call refused by an open circuit breaker is retried after the breaker's recovery time
        while attempts are left; a refusal while its half-open trial is still out waits for it
        without using an attempt.
        """
        step = self.node.step
        executor = self.executor
        body = self.body
        limits = self.limits
        positional = tuple(args)
        name = self.node.name
        held = self.runner_held
        while True:
            try:
                hold = held(self.node)
                if hold is not None:
                    await hold.__aenter__()
                try:
                    if limits:
                        await acquire_all(limits)
                    try:
                        ret = await executor.run(
                            body, positional, kwargs, timeout=step.timeout, step_name=name
                        )
                    finally:
                        if limits:
                            release_all(limits)
                finally:
                    if hold is not None:
                        await hold.__aexit__(None, None, None)
                return ret[0] if step.uses_fallback else ret
            except CircuitOpenError as exc:
                if retry is None:
                    raise
                if exc.retry_after == 0.0:
                    await _asleep(HALF_OPEN_POLL)
                    continue
                if retry.attempt >= retry.config.max_attempts:
                    retry.failed(exc)  # leaves .attempts and the note
                    raise
                retry.attempt += 1
                await _asleep(max(exc.retry_after, retry.config.delay(retry.attempt - 1)))
            except StepTimeoutError as exc:
                for breaker in step.breakers:
                    breaker.record_failure(exc)
                delay = retry.failed(exc) if retry is not None else None
                if delay is None:
                    raise
                await _asleep(delay)
            except Exception as exc:
                delay = retry.failed(exc) if retry is not None else None
                if delay is None:
                    raise
                await _asleep(delay)


async def run_mapped(runner: MapRunner, node: Node, args: list[Any], kwargs: dict[str, Any]) -> bool:
    """Run a mapped node's items and record its fate; True when its output list exists."""
    spec = runner.state.plan.maps[node.id]
    start = _now()
    t0 = _perf()
    mapped = _Mapped(runner, node, spec, args, kwargs)
    status = StepStatus.FAILED
    error: BaseException | None = None
    reason: str | None = None
    try:
        status, error, reason = await mapped.run()
    except asyncio.CancelledError:
        res = _result(node, StepStatus.CANCELLED, {}, None, start, t0, None, mapped)
        runner.state.results[node.id] = res
        _end(mapped, False)
        raise
    except Exception as exc:
        status, error = StepStatus.FAILED, exc
    ok = status in (StepStatus.SUCCEEDED, StepStatus.CACHED)
    outputs = {}
    if ok:
        outputs = {node.output_names[0]: mapped.out}
        runner.state.apply(node, outputs)
        mapped.results.seal(mapped.out)
    else:
        mapped.results.seal(mapped.out)
    _end(mapped, ok)
    res = _result(node, status, outputs, error, start, t0, reason, mapped)
    return runner.settle(node, res, args, kwargs, args, kwargs)


def _end(mapped: _Mapped, ok: bool) -> None:
    if mapped.board is not None:
        mapped.board.end(ok)


def _result(
    node: Node,
    status: StepStatus,
    outputs: dict[str, Any],
    error: BaseException | None,
    start: float,
    t0: float,
    reason: str | None,
    mapped: _Mapped | None,
) -> StepResult:
    took = _perf() - t0
    attempts = 1
    items = mapped.results if mapped is not None else None
    why = None
    if mapped is not None and mapped.caching and mapped.base_key is not None:
        why = f"{mapped.cached} of {mapped.launched} items from the cache"
    return finished(
        node.name,
        status,
        outputs,
        error,
        None if error is None else "".join(traceback.format_exception(error)),
        attempts,
        start,
        start + took,
        took,
        0.0,
        None,
        reason,
        (),
        cache_reason=why,
        items=items,
    )


# ---------------------------------------------------------------------------- a stream source


def _next(gen: Any) -> tuple[bool, Any]:
    """Advance a plain generator by one item, in a worker thread: ``(False, None)`` at its end."""
    try:
        return True, next(gen)
    except StopIteration:
        return False, None


async def run_source(runner: MapRunner, node: Node, args: list[Any], kwargs: dict[str, Any]) -> bool:
    """Run a generator step, publishing each item as it is yielded; record its fate."""
    step = node.step
    board = runner.items.get(node.id)
    values: list[Any] = board.values if board is not None else []
    start = _now()
    t0 = _perf()
    status = StepStatus.SUCCEEDED
    error: BaseException | None = None
    gen = step.body(*args, **kwargs)
    try:
        async with asyncio.timeout(step.timeout):
            if step.stream == "async":
                while True:
                    if board is not None:
                        await board.room()
                    try:
                        value = await anext(gen)
                    except StopAsyncIteration:
                        break
                    if board is not None:
                        board.append(value)
                    else:
                        values.append(value)
            else:
                executor = runner.executors[node.id]
                while True:
                    if board is not None:
                        await board.room()
                    more, value = await executor.run(_next, (gen,), {}, timeout=None, step_name=node.name)
                    if not more:
                        break
                    if board is not None:
                        board.append(value)
                    else:
                        values.append(value)
    except asyncio.CancelledError:
        await _close(gen)
        if board is not None:
            board.end(False)
        runner.state.results[node.id] = _result(node, StepStatus.CANCELLED, {}, None, start, t0, None, None)
        raise
    except TimeoutError:
        error = StepTimeoutError(node.name, step.timeout or 0.0)
        status = StepStatus.TIMED_OUT
    except Exception as exc:
        error, status = exc, StepStatus.FAILED
    await _close(gen)
    ok = error is None
    outputs: dict[str, Any] = {}
    if ok:
        outputs = {node.output_names[0]: values}
        runner.state.apply(node, outputs)
    if board is not None:
        board.end(ok)
    res = _result(node, status, outputs, error, start, t0, None, None)
    return runner.settle(node, res, args, kwargs, args, kwargs)


async def _close(gen: Any) -> None:
    with contextlib.suppress(Exception):
        if hasattr(gen, "aclose"):
            await gen.aclose()
        else:
            gen.close()
