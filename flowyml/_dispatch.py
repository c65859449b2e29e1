"""Delivering a run's events to its listeners without ever making a step wait for one.

- A plain-function listener is called on the event loop, in :meth:`Dispatcher.emit`.
- Coroutine-function listeners share one background task that awaits them in order, fed by a
  :class:`Channel`: a bounded queue that, when full, coalesces what can be coalesced and drops
  the least useful events, counting every loss. :meth:`Pipeline.stream` reads its own channel.
- A listener that raises is logged once (``flowyml.events``, ERROR, with the traceback) and
  detached; the run goes on.
- :meth:`Dispatcher.finish` puts :class:`~flowyml.events.RunFinished` last and waits until
  everything that was not dropped has been delivered.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, cast

from .events import Event, ItemsProgress, Listener, RunFinished, RunStarted, StepFinished, StepStarted

__all__ = ("Channel", "Dispatcher", "is_async_listener")

log = logging.getLogger("flowyml.events")

QUEUE_BOUND: Final = 10_000
"""Events a slow consumer may have waiting before the channel starts coalescing and dropping."""

_Slot = list[Event | None]
"""One queued event in a one-element list, so it can be cancelled in place (``slot[0] = None``)."""


class Channel:
    """A bounded FIFO of events from the loop to one consumer; ``put`` never waits.

    Below the bound every event is kept. At the bound:

    - an :class:`ItemsProgress` replaces the queued one of the same step, if any;
    - a :class:`StepFinished` or :class:`RunStarted` makes room by cancelling the same step's
      queued :class:`StepStarted`, else the oldest queued start, retry or item count;
    - anything else that finds no room is dropped.

    :class:`RunFinished` is always kept. :attr:`dropped` counts every event lost either way.
    """

    def __init__(self, bound: int = QUEUE_BOUND) -> None:
        self.bound = bound
        self.dropped = 0
        self._slots: deque[_Slot] = deque()
        self._minor: deque[_Slot] = deque()
        self._starts: dict[str, _Slot] = {}
        self._items: dict[str, _Slot] = {}
        self._live = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None

    def __len__(self) -> int:
        return self._live

    def put(self, event: Event) -> None:
        """Queue ``event`` (or coalesce or drop it, at the bound); wake the consumer."""
        if self._live >= self.bound and not isinstance(event, RunFinished) and not self._make_room(event):
            return
        slot: _Slot = [event]
        self._slots.append(slot)
        self._live += 1
        if isinstance(event, StepStarted):
            self._starts[event.step] = slot
            self._minor.append(slot)
        elif isinstance(event, ItemsProgress):
            self._items[event.step] = slot
            self._minor.append(slot)
        elif not isinstance(event, StepFinished | RunStarted | RunFinished):
            self._minor.append(slot)
        if len(self._minor) > 2 * self.bound + 64:  # forget slots already delivered or cancelled
            self._minor = deque(s for s in self._minor if s[0] is not None)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _make_room(self, event: Event) -> bool:
        """At the bound: True when ``event`` may be queued because something else gave way."""
        if isinstance(event, ItemsProgress):
            slot = self._items.get(event.step)
            if slot is not None and slot[0] is not None:
                slot[0] = event
                self.dropped += 1
                return False
        elif isinstance(event, StepFinished | RunStarted):
            slot = self._starts.get(event.step) if isinstance(event, StepFinished) else None
            if slot is None or slot[0] is None:
                slot = self._oldest_minor()
            if slot is not None:
                self._cancel(slot)
                return True
        self.dropped += 1
        return False

    def _oldest_minor(self) -> _Slot | None:
        minor = self._minor
        while minor:
            slot = minor.popleft()
            if slot[0] is not None:
                return slot
        return None

    def _cancel(self, slot: _Slot) -> None:
        slot[0] = None  # get() skips it
        self._live -= 1
        self.dropped += 1

    def fail(self, error: BaseException) -> None:
        """No more events will come because ``error`` ended the producer: :meth:`get` raises it."""
        self._error = error
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Event:
        """The next event, waiting for one if none is queued.

        Raises:
            BaseException: the error given to :meth:`fail`, once every queued event was taken.
        """
        slots = self._slots
        while True:
            while slots:
                slot = slots.popleft()
                event = slot[0]
                if event is None:
                    continue
                slot[0] = None  # delivered: no longer a candidate for coalescing
                self._live -= 1
                if isinstance(event, StepStarted | ItemsProgress):
                    index = self._starts if isinstance(event, StepStarted) else self._items
                    if index.get(event.step) is slot:
                        del index[event.step]
                return event
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None


def is_async_listener(fn: Callable[..., Any]) -> bool:
    """True for a coroutine function, or an object whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


class Dispatcher:
    """Hands each event of one run to its listeners and channels; see the module docstring."""

    def __init__(
        self, listeners: Sequence[Listener], channels: Sequence[Channel] = (), *, run_id: str
    ) -> None:
        self._run_id = run_id
        self._sync: list[Callable[[Event], None]] = []
        self._async: list[Callable[[Event], Awaitable[None]]] = []
        for fn in listeners:
            if is_async_listener(fn):
                self._async.append(cast(Callable[[Event], Awaitable[None]], fn))
            else:
                self._sync.append(cast(Callable[[Event], None], fn))
        self._queue = Channel() if self._async else None
        self._channels = [*channels, *([self._queue] if self._queue is not None else [])]
        self._task: asyncio.Task[None] | None = None

    @property
    def dropped(self) -> int:
        """Events lost so far by a consumer that fell behind (the largest loss of any one)."""
        return max((c.dropped for c in self._channels), default=0)

    def start(self) -> None:
        """Start the task that awaits the coroutine listeners; call on the run's loop."""
        if self._async and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._deliver(), name="flowyml-events")

    def fast_emit(self) -> Callable[[Event], None]:
        """:meth:`emit`, or a shorter function doing the same for the common single plain listener."""
        if len(self._sync) != 1 or self._channels:
            return self.emit
        sync = self._sync
        fn = sync[0]

        def emit_one(event: Event) -> None:
            if sync:
                try:
                    fn(event)
                except Exception as exc:
                    self._detach(sync, fn, exc)

        return emit_one

    def emit(self, event: Event) -> None:
        """Call the plain listeners now; queue ``event`` for the others."""
        for fn in self._sync:
            try:
                fn(event)
            except Exception as exc:
                self._detach(self._sync, fn, exc)
        for channel in self._channels:
            channel.put(event)

    async def finish(self, event: RunFinished) -> None:
        """Emit the last event and wait until every queued one has been delivered."""
        self.emit(event)
        if self._task is not None:
            await self._task

    def cancel(self) -> None:
        """Stop delivering to the coroutine listeners (the run was cancelled)."""
        if self._task is not None:
            self._task.cancel()

    async def _deliver(self) -> None:
        queue = self._queue
        assert queue is not None
        while True:
            event = await queue.get()
            for fn in list(self._async):
                try:
                    await fn(event)
                except Exception as exc:
                    self._detach(self._async, fn, exc)
            if isinstance(event, RunFinished):
                return

    def _detach(self, group: list[Any], fn: Callable[..., Any], exc: Exception) -> None:
        if fn in group:
            group.remove(fn)
        log.error(
            "event listener %r raised %s: %s; it was detached and gets no further events of this run",
            fn,
            type(exc).__name__,
            exc,
            exc_info=exc,
            extra={"run_id": self._run_id, "step": None},
        )
