"""What runs ask of CPython's cyclic garbage collector: a frozen startup heap, and few full passes.

Both are process-wide, so both step aside when the application manages collection itself
(collection disabled, a heap it froze already, thresholds it set during a run).
"""

from __future__ import annotations

__all__ = ("QUIET_NODES", "freeze_heap_once", "quiet_full_collections")

import gc
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

#: Runs of plans with at least this many nodes put off full collections while they run.
QUIET_NODES: Final = 10_000
#: The oldest generation's threshold while such runs are in flight (CPython's default is 10), at
#: least; a run of more than ``100 * _NODES_PER_FULL`` nodes raises it to one per that many nodes.
_QUIET_THRESHOLD: Final = 100
#: A cached rerun of a million steps made about 900 young-generation collections: at 100, six
#: full collections walked the whole heap (17 s of its 54 s); at 1,000, none.
_NODES_PER_FULL: Final = 1_000

_heap_frozen = False
_lock = threading.Lock()
_quiet_runs = 0
_saved: tuple[int, int, int] | None = None
_raised = _QUIET_THRESHOLD  # the oldest threshold the runs in flight set


def freeze_heap_once() -> None:
    """Once per process, at its first run: full garbage collections stop walking what exists now.

    What is alive when a process first runs a pipeline (modules, the application's startup
    state, plans) lives on; a full collection walks it every time all the same, and 200 runs in
    flight make CPython start one every few hundred runs: ~10 ms of a held loop (the GIL) on a
    shared 2-core machine for a small heap, proportionally more for an application's. Collected
    once and frozen (``gc.freeze``), it is skipped by later collections, which then walk only the
    objects made since (~2-3 ms here). Left alone when the application manages collection itself
    (collection disabled, or a heap it froze already). ``gc.unfreeze()`` undoes it.
    """
    global _heap_frozen
    if _heap_frozen:
        return
    _heap_frozen = True
    if gc.isenabled() and gc.get_freeze_count() == 0:
        gc.collect()
        gc.freeze()


@contextmanager
def quiet_full_collections(nodes: int) -> Iterator[None]:
    """While a run of ``nodes`` steps is in flight, full collections come ten times less often,
    and past 100,000 steps in proportion to the run's size (see :data:`_NODES_PER_FULL`).

    Every step of a large run leaves objects that survive young collections (its pending task,
    its result), and CPython starts a full collection each time such survivors grow the old
    generation by a quarter: nine of them in a 100,000-step run, each walking every survivor,
    were half its time (9.3 of 17.5 us a step, timed with ``gc.callbacks``). Young collections go
    on as before, so short-lived cycles are still freed at once; what survives them waits for a
    rarer full pass. The thresholds come back when the last such run ends, unless the
    application changed them meanwhile.
    """
    if nodes < QUIET_NODES or not gc.isenabled():
        yield
        return
    global _quiet_runs, _saved, _raised
    wanted = max(_QUIET_THRESHOLD, nodes // _NODES_PER_FULL)
    with _lock:
        first, second, third = gc.get_threshold()
        if _quiet_runs == 0:
            if third < wanted:
                _saved = (first, second, third)
                _raised = wanted
                gc.set_threshold(first, second, wanted)
        elif _saved is not None and third == _raised < wanted:  # a larger run joins: raised further
            _raised = wanted
            gc.set_threshold(first, second, wanted)
        _quiet_runs += 1
    try:
        yield
    finally:
        with _lock:
            _quiet_runs -= 1
            if _quiet_runs == 0 and _saved is not None:
                first, second, _ = _saved
                if gc.get_threshold() == (first, second, _raised):
                    gc.set_threshold(*_saved)
                _saved = None


def _reset_in_child() -> None:
    global _heap_frozen, _quiet_runs, _saved
    if _saved is not None and gc.get_threshold() == (*_saved[:2], _raised):
        gc.set_threshold(*_saved)  # the runs that raised it are the parent's
    _heap_frozen = False
    _quiet_runs = 0
    _saved = None


os.register_at_fork(after_in_child=_reset_in_child)
