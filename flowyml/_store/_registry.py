"""One long-lived :class:`Store` per (process, directory, event loop), shared by every run.

Why: opening a store costs a connection, a thread, the schema check and a cleanup of temporary
files; closing it joins them again. Paid per run, that was most of a small run's cost, and 200
concurrent runs held 200 connections whose writers could not batch with each other. Shared, the
first run on a directory opens the store, every later or concurrent run of any pipeline reuses
it, and its single writer commits the records of every run queued meanwhile in one transaction.

Lifetime: a store lives until :func:`close_stores` (or ``async with`` on it, or its ``aclose``),
or until its event loop shuts down (``asyncio.run`` cancelling the writer makes the store commit
what is queued and close itself, see ``Store._run_writer``), or at interpreter exit. A store
belongs to the loop that opened it: another loop (another thread, a later ``asyncio.run``) gets
its own. A forked child never reuses its parent's stores: the registry is emptied in the child
(without touching the parent's connections) and every entry is checked against the process id.
"""

from __future__ import annotations

__all__ = ("close_stores", "open_store", "settle_shared", "shared_store")

import asyncio
import os
import threading
import weakref
from pathlib import Path

from ._api import Store, resolve_root

_Key = tuple[int, Path]
_stores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[_Key, Store]] = weakref.WeakKeyDictionary()
_opening: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[_Key, asyncio.Future[Store]]] = (
    weakref.WeakKeyDictionary()
)
_lock = threading.Lock()


_roots: dict[tuple[object, str | None, str], Path] = {}


def _root_of(cache_dir: str | os.PathLike[str] | None) -> Path:
    """:func:`resolve_root`, remembered per (argument, ``$FLOWYML_HOME``, working directory).

    Building and normalising the path cost more than the rest of a run's look-up of its store.
    """
    try:
        cwd = os.getcwd()
    except OSError:  # the working directory was removed: do not remember anything
        return resolve_root(cache_dir)
    given = cache_dir if isinstance(cache_dir, str | None) else os.fspath(cache_dir)
    memo = (given, os.environ.get("FLOWYML_HOME"), cwd)
    found = _roots.get(memo)
    if found is None:
        if len(_roots) > 256:
            _roots.clear()
        found = _roots[memo] = resolve_root(cache_dir)
    return found


async def shared_store(cache_dir: str | os.PathLike[str] | None = None) -> Store:
    """The open store of ``cache_dir`` (see :func:`resolve_root`) on this loop, opened on first use.

    Concurrent first uses share one opening. A store closed meanwhile is opened again.

    Raises:
        StoreError: the store cannot be opened (it is then not remembered; the next call tries again).
    """
    loop = asyncio.get_running_loop()
    key = (os.getpid(), _root_of(cache_dir))
    while True:
        with _lock:
            store = _stores.get(loop, {}).get(key)
            if store is not None and not store.closed:
                return store
            pending = _opening.setdefault(loop, {})
            opening = pending.get(key)
            owner = opening is None
            if opening is None:
                opening = pending[key] = loop.create_future()
        if owner:
            return await _open_for(loop, key, opening)
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if opening.cancelled() and (task is None or not task.cancelling()):
                continue  # the run opening it was cancelled, not this one: open it here
            raise


async def _open_for(loop: asyncio.AbstractEventLoop, key: _Key, opening: asyncio.Future[Store]) -> Store:
    """Open the store of ``key`` for every caller waiting on ``opening``, and remember it."""
    try:
        store = await Store.open(key[1])
    except BaseException as exc:
        with _lock:
            _opening.get(loop, {}).pop(key, None)
        if isinstance(exc, asyncio.CancelledError):
            opening.cancel()
        elif not opening.done():
            opening.set_exception(exc)
            opening.exception()  # retrieved: the waiters (if any) got it
        raise
    with _lock:
        _stores.setdefault(loop, {})[key] = store
        _opening.get(loop, {}).pop(key, None)
    store.on_release = _forget
    opening.set_result(store)
    return store


def _forget(store: Store) -> None:
    """A store closed (by anyone): drop it, so a loop that ended is not kept alive by its store."""
    with _lock:
        for loop, by_key in list(_stores.items()):
            for key, found in list(by_key.items()):
                if found is store:
                    del by_key[key]
            if not by_key:
                del _stores[loop]


async def settle_shared(root: Path) -> None:
    """Wait until the shared store of ``root`` on this loop (if open) has committed what is queued.

    Runs leave their lineage to the writer; a reader opened in the same process afterwards
    (``Store.open``) must see it.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    store = _stores.get(loop, {}).get((os.getpid(), root))
    if store is not None and not store.closed:
        await store.settle(store.error_mark())


async def open_store(cache_dir: str | os.PathLike[str] | None = None) -> Store:
    """The store every run in this process uses for ``cache_dir``, opened now if it is not open yet.

    For applications that manage lifetimes: ``async with await flowyml.open_store(dir):`` in an
    ASGI lifespan opens it at startup (a bad store fails the startup, not the first request) and
    closes it at shutdown, with every record committed. Runs find it by their ``cache_dir``.

    Raises:
        StoreError: the store cannot be opened (another user's, writable by others, damaged, ...).
    """
    return await shared_store(cache_dir)


async def close_stores() -> None:
    """Close every store this process opened on the running event loop, committing what is queued.

    For applications that manage lifetimes (an ASGI lifespan's shutdown, the end of a service);
    without it, stores close when their loop shuts down or the interpreter exits.

    Raises:
        StoreError: queued writes of some store could not be committed (every store is closed anyway).
    """
    loop = asyncio.get_running_loop()
    with _lock:
        stores = list(_stores.pop(loop, {}).values())
    pid = os.getpid()
    first: BaseException | None = None
    for store in stores:
        if store.pid != pid:
            continue
        try:
            await store.aclose()
        except Exception as exc:
            first = first or exc
    if first is not None:
        raise first


def _forget_in_child() -> None:
    """After a fork: the parent's stores are not ours to use or close."""
    global _stores, _opening, _lock
    _stores = weakref.WeakKeyDictionary()
    _opening = weakref.WeakKeyDictionary()
    _lock = threading.Lock()


def _close_at_exit() -> None:
    """At interpreter exit: close the stores whose loop is still there but not running.

    A loop still running belongs to a thread that is still alive (exit joins non-daemon threads
    after this): its store is left to it, and closes when that loop ends. Abandoning it here
    lost every record of the runs the thread went on to make.
    """
    pid = os.getpid()
    with _lock:
        everything = [
            (loop, list(by_key.values())) for loop, by_key in _stores.items() if not loop.is_running()
        ]
        for loop, _ in everything:
            del _stores[loop]
    for loop, stores in everything:
        for store in stores:
            if store.pid != pid or store.closed:
                continue
            if not loop.is_closed() and not loop.is_running():
                try:
                    loop.run_until_complete(store.aclose())
                except Exception:  # exit must go on
                    continue
            else:  # its loop is closed
                store.abandon()


os.register_at_fork(after_in_child=_forget_in_child)
_register = getattr(threading, "_register_atexit", None)  # before non-daemon threads are joined
if _register is not None:
    _register(_close_at_exit)
else:  # pragma: no cover - every supported Python has it
    import atexit

    atexit.register(_close_at_exit)
