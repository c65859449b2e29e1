"""Run step bodies in a pool of worker processes that a crash, a timeout or a cancellation can't break.

How it works:

- Each worker is a ``multiprocessing`` process with one ``AF_UNIX`` socket to the parent (frame
  format in :mod:`flowyml._executors._worker`). A worker runs one call at a time. The function and
  its arguments go over as a single ``cloudpickle`` payload, so lambdas and closures work and an
  object passed twice arrives as one object.
- The parent never blocks the event loop waiting: the socket is non-blocking and watched with
  ``loop.add_reader`` / ``add_writer``, and the process sentinel is watched with ``add_reader``.
  No thread is involved per step. Only starting a worker goes through a short-lived thread, because
  ``Process.start()`` blocks (the very first start waits for the forkserver to boot and preload).
- A worker that dies mid-step (segfault, ``os._exit``, ``SIGKILL``, the OOM killer) fails only that
  step with :class:`~flowyml.errors.WorkerCrashedError` carrying the exit code (negative: killed by
  that signal). The dead worker is dropped; the next step that needs one starts a new one.
- A step that exceeds its ``timeout``: its worker is killed with ``SIGKILL`` and reaped, then
  :class:`~flowyml.errors.StepTimeoutError` is raised. When the awaiting task is cancelled, its
  worker is killed too (the work is abandoned and the slot freed) and ``CancelledError`` propagates
  untouched; the worker is reaped in the background.
- At most ``max_workers`` calls run at once; the others wait on an ``asyncio.Semaphore`` (FIFO,
  no polling).

Start method: **forkserver**, measured on the development machine (2 cores, Python 3.11), two
workers started together, time until both answered a first message:

=============  =========================  ==================
method         first use in a process     later
=============  =========================  ==================
fork           ~7 ms                      ~2.5 ms
forkserver     ~50 ms (boots the server)  ~6 ms
spawn          ~55 ms                     ~30 ms + imports
=============  =========================  ==================

(Bare processes. A ``ProcessExecutor`` with two workers, first call answered: ~130 ms on first use,
the forkserver importing ``flowyml`` once; then ~15 ms per executor, against ~6 ms for a raw
``fork``-based ``ProcessPoolExecutor``. A call on a warm worker costs ~75 us round trip, about half
of ``ProcessPoolExecutor`` via ``run_in_executor``.)

``fork`` is fastest but unsafe: the engine's process runs threads (aiosqlite, the thread executor),
and forking a process while another thread holds a lock copies that lock held forever. ``spawn``
pays a fresh interpreter plus every import (including re-running ``__main__``'s imports) for each
worker. ``forkserver`` forks clean copies of a single-threaded server that has already imported
``__main__``, ``cloudpickle`` and the worker loop (added to the forkserver's preload list, keeping
what the application put there), so a worker costs a few milliseconds.

The price of forkserver: the forkserver process, and the ``multiprocessing`` resource tracker that
it starts, are children of this process for the rest of its life. Both are shared by every
``multiprocessing`` user in the interpreter, ignore SIGINT, and exit on their own when this
process exits. :meth:`ProcessExecutor.aclose` leaves them running on purpose (another run may be
using them) and leaves no *worker* behind. Workers are not daemonic, so a step can start its own
processes; an ``atexit`` hook kills workers of executors that were never closed, before
``multiprocessing`` joins its children at exit.

Known limitations: POSIX only (``add_reader`` on pipes and sockets; forkserver); pickling the
arguments happens on the event loop thread, so a huge argument holds the loop while it is pickled;
if the parent process is killed with ``SIGKILL``, idle workers exit at once (end of stream) but a
busy worker finishes its current call first.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import inspect
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.util
import os
import pickle
import signal
import socket
import threading
from collections.abc import Callable, Mapping
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from typing import Any, ClassVar, Final

import cloudpickle

from flowyml._errors import (
    ConfigError,
    RemoteStepError,
    SerializationError,
    StepTimeoutError,
    WorkerCrashedError,
)
from flowyml._executors import _worker
from flowyml._executors._base import Executor

__all__ = ("ProcessExecutor", "RemoteTraceback")

_CRASHED: Final = -1
"""Reply kind the parent makes up when a worker died without answering."""

_KILL_WAIT: Final = 10.0
"""Seconds to wait for a ``SIGKILL``-ed worker to be reaped before giving up on it."""

_STOP_GRACE: Final = 2.0
"""Seconds :meth:`ProcessExecutor.aclose` lets idle workers exit on their own before killing them."""

_PRELOAD: Final = ("__main__", "cloudpickle", _worker.__name__)

_LIVE: set[BaseProcess] = set()
"""Every worker process started and not yet reaped, across executors (for the exit hook)."""


def _kill_leftover_workers() -> None:
    """At interpreter exit, kill workers of executors nobody closed.

    Registered after ``multiprocessing.util`` registers its own exit hook, so it runs first: the
    workers are not daemonic and ``multiprocessing`` would otherwise wait for them forever.
    """
    for process in list(_LIVE):
        with contextlib.suppress(Exception):
            process.kill()
            process.join(_KILL_WAIT)


atexit.register(_kill_leftover_workers)


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised in a worker, set as that exception's cause.

    Printing the re-raised exception therefore shows where in the step it really happened.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        super().__init__(text)

    def __str__(self) -> str:
        return f'\n"""\n{self.text}"""'


class ProcessExecutor(Executor):
    """Runs each call in a worker process; crashes, timeouts and cancellations cost one worker.

    Args:
        max_workers: the most calls running at once, and so the most worker processes alive.
            Defaults to ``os.cpu_count()``. Workers start on demand and are reused.

    Raises:
        ConfigError: ``max_workers`` is smaller than 1.
    """

    name: ClassVar[str] = "process"

    def __init__(self, max_workers: int | None = None) -> None:
        if max_workers is None:
            max_workers = os.cpu_count() or 1
        if max_workers < 1:
            raise ConfigError(f"ProcessExecutor(max_workers={max_workers!r}): use 1 or more workers.")
        self.max_workers: Final = max_workers
        self._context: Final = _forkserver_context()
        self._slots = asyncio.Semaphore(max_workers)
        self._idle: list[_Worker] = []
        self._workers: set[_Worker] = set()
        self._starting: set[asyncio.Future[_Worker]] = set()
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._workers)} workers"
        return f"<ProcessExecutor max_workers={self.max_workers} {state}>"

    def worker_pids(self) -> tuple[int, ...]:
        """The PIDs of the worker processes that can take calls, idle or busy, sorted.

        For debugging and tests: a worker being killed or stopped is no longer listed, even before
        its process is reaped.
        """
        return tuple(sorted(worker.pid for worker in self._workers if worker.usable))

    async def run(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        *,
        timeout: float | None,
        step_name: str,
    ) -> Any:
        """Call ``fn(*args, **kwargs)`` in a worker process and return its result.

        Raises:
            SerializationError: the function, an argument or the result cannot be pickled.
            WorkerCrashedError: the worker process died while running the call.
            StepTimeoutError: the call ran past ``timeout``; its worker was killed.
            Exception: whatever ``fn`` raised, rebuilt in this process, caused by a
                :class:`RemoteTraceback`.
        """
        self._check_open()
        payload = _dump_call(fn, args, kwargs, step_name)
        async with self._slots:
            self._check_open()
            worker = await self._checkout()
            kind, body = await self._call(worker, payload, timeout, step_name)
            self._release(worker)
        return _load_reply(kind, body, worker, step_name)

    async def aclose(self) -> None:
        """Stop every worker: idle ones exit on end of stream, busy or stuck ones are killed.

        Returns once every worker has been reaped. Calls still waiting for a worker fail; calls
        running report their worker as crashed.
        """
        self._closed = True
        try:
            if self._starting:
                await asyncio.wait(self._starting)
            workers = list(self._workers)
            for worker in workers:
                if worker.busy:
                    worker.kill("the executor was closed while the step ran")
                else:
                    worker.stop()
            exits = {worker.exited for worker in workers}
            if exits:
                _, late = await asyncio.wait(exits, timeout=_STOP_GRACE)
                for worker in workers:
                    if worker.exited in late:
                        worker.kill()
                if late:
                    await asyncio.wait(late, timeout=_KILL_WAIT)
        finally:
            for worker in list(self._workers):
                worker.kill()
            self._idle.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed; create a new ProcessExecutor for another run.")

    async def _checkout(self) -> _Worker:
        """An idle live worker, or a new one. The caller holds a slot."""
        while self._idle:
            worker = self._idle.pop()
            if worker.usable:
                return worker
        started = self._start_worker()
        try:
            return await asyncio.shield(started)
        except asyncio.CancelledError:
            # The process still starts; whoever comes next can use it.
            started.add_done_callback(self._adopt)
            raise

    def _start_worker(self) -> asyncio.Future[_Worker]:
        """Start a worker process from a short-lived thread, so the event loop never waits for it."""
        loop = asyncio.get_running_loop()
        started: asyncio.Future[_Worker] = loop.create_future()
        self._starting.add(started)
        started.add_done_callback(self._starting.discard)
        parent_end, child_end = socket.socketpair()
        process = self._context.Process(
            target=_worker.serve, args=(child_end,), name="flowyml-process-worker", daemon=False
        )

        def start() -> None:
            try:
                process.start()
                _LIVE.add(process)
            except BaseException as exc:
                parent_end.close()
                with contextlib.suppress(RuntimeError):  # the loop may have closed meanwhile
                    loop.call_soon_threadsafe(_set_exception, started, exc)
            else:
                try:
                    loop.call_soon_threadsafe(self._started, started, process, parent_end)
                except RuntimeError:  # the loop closed while we started: nobody will use it
                    parent_end.close()
                    process.kill()
            finally:
                child_end.close()

        threading.Thread(target=start, name="flowyml-process-start", daemon=True).start()
        return started

    def _started(self, started: asyncio.Future[_Worker], process: BaseProcess, sock: socket.socket) -> None:
        """On the loop: wrap a freshly started process and hand it to whoever waits for it."""
        worker = _Worker(process, sock, on_exit=self._forget)
        self._workers.add(worker)
        if self._closed:
            worker.kill("the executor was closed")
        started.set_result(worker)

    def _adopt(self, started: asyncio.Future[_Worker]) -> None:
        """Keep a worker whose requester was cancelled while it started."""
        if started.cancelled() or started.exception() is not None:
            return
        self._release(started.result())

    def _release(self, worker: _Worker) -> None:
        """Put a worker back for the next call, or stop it if it would exceed ``max_workers``.

        Surplus happens when a call is cancelled while its worker starts: the slot is free again
        before the process it asked for exists.
        """
        if self._closed:
            worker.kill("the executor was closed")
        elif worker.usable:
            if sum(w.usable for w in self._workers) > self.max_workers:
                worker.stop()
            else:
                self._idle.append(worker)

    def _forget(self, worker: _Worker) -> None:
        """Drop a worker that has exited and been reaped."""
        self._workers.discard(worker)
        with contextlib.suppress(ValueError):
            self._idle.remove(worker)

    async def _call(
        self, worker: _Worker, payload: bytes, timeout: float | None, step_name: str
    ) -> tuple[int, bytes]:
        """Send one call to ``worker`` and wait for its reply, its death or the timeout."""
        try:
            async with asyncio.timeout(timeout):
                return await worker.request(payload)
        except TimeoutError:
            worker.kill()
            await asyncio.wait({worker.exited}, timeout=_KILL_WAIT)
            assert timeout is not None  # only a deadline raises TimeoutError here
            raise StepTimeoutError(step_name, timeout, executor=self.name) from None
        except BaseException:
            # Cancelled (or something unexpected): the call is abandoned, so is its worker.
            worker.kill()
            raise


class _Worker:
    """One worker process seen from the event loop: a socket to talk to, a sentinel to watch."""

    def __init__(
        self, process: BaseProcess, sock: socket.socket, *, on_exit: Callable[[_Worker], None]
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._process = process
        self._sock = sock
        self._fd = sock.fileno()
        self._sentinel = process.sentinel
        self._on_exit_callback = on_exit
        assert process.pid is not None
        self.pid: Final[int] = process.pid
        self.exitcode: int | None = None
        self.kill_reason: str | None = None
        self.exited: asyncio.Future[None] = self._loop.create_future()
        self._inbox = bytearray()
        self._outbox: list[memoryview] = []
        self._writing = False
        self._reading = True
        self._stopping = False
        self._reply: asyncio.Future[tuple[int, bytes]] | None = None
        sock.setblocking(False)
        self._loop.add_reader(self._fd, self._on_readable)
        self._loop.add_reader(self._sentinel, self._on_sentinel)

    def __repr__(self) -> str:
        return f"<_Worker pid={self.pid} {'busy' if self.busy else 'idle' if self.alive else 'exited'}>"

    @property
    def alive(self) -> bool:
        """Whether the process has not been seen to exit."""
        return not self.exited.done()

    @property
    def usable(self) -> bool:
        """Whether the worker can take calls: alive, and not being stopped or killed."""
        return self.alive and not self._stopping

    @property
    def busy(self) -> bool:
        """Whether a call is waiting for this worker's reply."""
        return self._reply is not None and not self._reply.done()

    def request(self, payload: bytes) -> asyncio.Future[tuple[int, bytes]]:
        """Send one call; the future gets ``(kind, body)``, with kind ``_CRASHED`` if it dies."""
        reply: asyncio.Future[tuple[int, bytes]] = self._loop.create_future()
        if not self.alive:
            reply.set_result((_CRASHED, b""))
            return reply
        self._reply = reply
        self._outbox = [memoryview(_worker.HEADER.pack(len(payload), _worker.CALL)), memoryview(payload)]
        self._flush()
        return reply

    def stop(self) -> None:
        """Ask the worker to exit: end of stream on its socket."""
        self._stopping = True
        if self.alive:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_WR)

    def kill(self, reason: str | None = None) -> None:
        """``SIGKILL`` the process; its sentinel then reports the exit and it gets reaped.

        ``reason`` says why, for the message of a step that was still waiting on this worker.
        """
        self._stopping = True
        if self.alive:
            if self.kill_reason is None:
                self.kill_reason = reason
            with contextlib.suppress(OSError, ValueError):
                self._process.kill()

    def _flush(self) -> None:
        """Write as much of the outbox as the socket takes; continue when it is writable again."""
        while self._outbox:
            try:
                sent = self._sock.send(self._outbox[0])
            except (BlockingIOError, InterruptedError):
                if not self._writing:
                    self._loop.add_writer(self._fd, self._flush)
                    self._writing = True
                return
            except OSError:  # the worker is gone; its sentinel will say how
                self._outbox.clear()
                break
            head = self._outbox[0] = self._outbox[0][sent:]
            if not head:
                self._outbox.pop(0)
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False

    def _on_readable(self) -> None:
        """Take in whatever the worker wrote and answer the waiting call once a frame is whole."""
        while self._reading:
            try:
                chunk = self._sock.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                chunk = b""
            if not chunk:
                self._loop.remove_reader(self._fd)
                self._reading = False
                break
            self._inbox += chunk
        header_size = _worker.HEADER.size
        while len(self._inbox) >= header_size:
            length, kind = _worker.HEADER.unpack_from(self._inbox)
            end = header_size + length
            if len(self._inbox) < end:
                break
            with memoryview(self._inbox) as view:
                body = bytes(view[header_size:end])
            del self._inbox[:end]
            if self._reply is not None and not self._reply.done():
                self._reply.set_result((kind, body))

    def _on_sentinel(self) -> None:
        """The process has exited: drain its last words, reap it, fail a call still waiting."""
        self._loop.remove_reader(self._sentinel)
        # Everything the worker wrote before dying is already in the socket: read it now, so a
        # reply that raced with the exit (both readable in one loop iteration) is not lost.
        self._on_readable()
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        self._outbox.clear()
        self._sock.close()
        self.exitcode = self._process.exitcode
        with contextlib.suppress(Exception):
            self._process.join(0)
            self._process.close()
        _LIVE.discard(self._process)
        if self._reply is not None and not self._reply.done():
            self._reply.set_result((_CRASHED, b""))
        self.exited.set_result(None)
        self._on_exit_callback(self)


def _forkserver_context() -> ForkServerContext:
    """The forkserver context, with our modules added to what the forkserver preloads."""
    context = multiprocessing.get_context("forkserver")
    assert isinstance(context, ForkServerContext)
    # The preload list is global and has no getter; keep whatever the application asked for.
    current = getattr(multiprocessing.forkserver._forkserver, "_preload_modules", ["__main__"])
    wanted = list(current) + [name for name in _PRELOAD if name not in current]
    if wanted != list(current):
        context.set_forkserver_preload(wanted)
    return context


def _dump_call(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any], step_name: str
) -> bytes:
    """Pickle a call in one payload, or say which value of it cannot be pickled."""
    try:
        return cloudpickle.dumps((fn, args, dict(kwargs)), protocol=pickle.HIGHEST_PROTOCOL)  # type: ignore[no-any-return]
    except Exception as exc:
        what, error = _find_unpicklable(fn, args, kwargs) or ("the function or its arguments", exc)
        raise SerializationError(
            f"step {step_name!r}: {what} cannot be pickled to send it to a worker process "
            f"({type(error).__name__}: {error}). Pass a picklable value, or run the step with "
            "executor='thread'.",
            step_name=step_name,
        ) from exc


def _find_unpicklable(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> tuple[str, Exception] | None:
    """The first of the function and its arguments (named by parameter) that cannot be pickled."""
    candidates: list[tuple[str, object]] = [("the function", fn)]
    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
    except (TypeError, ValueError):
        candidates += [(f"positional argument {index}", value) for index, value in enumerate(args)]
        candidates += [(f"argument {name!r}", value) for name, value in kwargs.items()]
    else:
        candidates += [(f"argument {name!r}", value) for name, value in bound.arguments.items()]
    for label, value in candidates:
        try:
            cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            return label, exc
    return None


def _load_reply(kind: int, body: bytes, worker: _Worker, step_name: str) -> Any:
    """Turn a worker's reply into the call's return value, or raise what it means."""
    if kind == _worker.RESULT:
        try:
            return cloudpickle.loads(body)
        except Exception as exc:
            raise SerializationError(
                f"step {step_name!r}: the result cannot be unpickled in the parent process "
                f"({type(exc).__name__}: {exc}). Return values of types importable here.",
                step_name=step_name,
            ) from exc
    if kind == _worker.RAISED:
        data, text, tb, why = pickle.loads(body)  # our own worker wrote these bytes
        error: BaseException | None = None
        if data is not None:
            try:
                error = cloudpickle.loads(data)
            except Exception as exc:
                why = f"{type(exc).__name__}: {exc}"
        if not isinstance(error, BaseException):
            error = RemoteStepError(
                f"step {step_name!r} raised {text} in its worker process, and that exception "
                f"cannot be pickled back ({why}); its traceback is attached.",
                step_name=step_name,
            )
        raise error from RemoteTraceback(tb)
    if kind == _worker.BAD_RESULT:
        raise SerializationError(
            f"step {step_name!r}: the result cannot be pickled to send it back from the worker "
            f"process ({body.decode(errors='replace')}). Return picklable values, or run the step "
            "with executor='thread'.",
            step_name=step_name,
        )
    if kind == _worker.BAD_CALL:
        raise SerializationError(
            f"step {step_name!r}: the function or its arguments cannot be unpickled in the worker "
            f"process ({body.decode(errors='replace')}). Define them in an importable module.",
            step_name=step_name,
        )
    raise WorkerCrashedError(
        _crash_message(worker, step_name), step_name=step_name, exit_code=worker.exitcode
    )


def _crash_message(worker: _Worker, step_name: str) -> str:
    """Say how a worker died, in words that point at the likely cause."""
    code = worker.exitcode
    if code is None:
        how = "with an unknown exit status"
    elif code < 0:
        try:
            signame = signal.Signals(-code).name
        except ValueError:
            signame = f"signal {-code}"
        how = f"from {signame} (exit code {code})"
        if worker.kill_reason is not None:
            how += f"; flowyml killed it: {worker.kill_reason}"
        elif -code == signal.SIGKILL:
            how += "; something killed it, often the out-of-memory killer: give the step more memory"
        elif -code == signal.SIGSEGV:
            how += "; native code in the step crashed"
    else:
        how = f"with exit code {code}"
        if code == 1:
            how += (
                "; if no step code ran, the worker may have failed to import your script: code that "
                'runs a pipeline must sit under `if __name__ == "__main__":`'
            )
    return (
        f"step {step_name!r}: its worker process (pid {worker.pid}) died {how}. Other steps are "
        "unaffected, and the next process step gets a new worker."
    )


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
