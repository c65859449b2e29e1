"""The child side of the process executor: a loop that runs one shipped call at a time.

This module is what a worker process imports, so it stays small and imports nothing heavy (the
forkserver preloads it, and every import here is paid by the forkserver once, not by each worker).

Wire format, both directions, over one ``AF_UNIX`` stream socket per worker::

    8-byte big-endian body length | 1-byte kind | body

The parent sends ``CALL`` frames whose body is ``cloudpickle.dumps((fn, args, kwargs))``. The worker
answers each with exactly one frame:

- ``RESULT``: ``cloudpickle.dumps(result)``;
- ``RAISED``: ``pickle.dumps((exception_bytes_or_None, repr, traceback_text, why_not_pickled))``;
- ``BAD_RESULT``: the result could not be pickled; the body is the error text (UTF-8);
- ``BAD_CALL``: the call could not be unpickled here; the body is the error text (UTF-8).

End of stream from the parent means "stop": the worker returns and the process exits with code 0.
A worker that dies answers nothing; the parent sees its process sentinel and reports the crash.
"""

from __future__ import annotations

import pickle
import signal
import socket
import struct
import traceback
from typing import Any, Final

import cloudpickle

__all__ = ("BAD_CALL", "BAD_RESULT", "CALL", "HEADER", "RAISED", "RESULT", "serve")

HEADER: Final = struct.Struct("!QB")
"""Frame header: body length (excluding the header), then the frame kind."""

CALL: Final = 0
RESULT: Final = 1
RAISED: Final = 2
BAD_RESULT: Final = 3
BAD_CALL: Final = 4


def serve(sock: socket.socket) -> None:
    """Answer calls arriving on ``sock`` until the parent closes it.

    SIGINT is ignored: Ctrl-C in a terminal reaches the whole process group, and the parent decides
    what an interrupted run means (it kills the workers it abandons).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A step that starts its own subprocesses must not hand them our end of the socket, or the
    # parent would never see end-of-stream when this worker dies.
    sock.set_inheritable(False)
    sock.setblocking(True)
    with sock:
        while True:
            request = _receive(sock)
            if request is None:
                return
            kind, body = _handle(request)
            del request
            try:
                sock.sendall(HEADER.pack(len(body), kind))
                sock.sendall(body)
            except OSError:  # the parent went away: nobody is waiting for this answer
                return


def _receive(sock: socket.socket) -> bytearray | None:
    """Read one frame body; ``None`` on a clean end of stream (the parent's "stop")."""
    header = _read_exactly(sock, HEADER.size)
    if header is None:
        return None
    length, _kind = HEADER.unpack(header)
    body = _read_exactly(sock, length)
    if body is None:
        return None
    return body


def _read_exactly(sock: socket.socket, size: int) -> bytearray | None:
    """Read exactly ``size`` bytes, or return ``None`` if the stream ends first."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        try:
            count = sock.recv_into(view[received:])
        except ConnectionResetError:
            return None
        if count == 0:
            return None
        received += count
    return buffer


def _handle(request: bytearray) -> tuple[int, bytes]:
    """Run one shipped call and encode what happened as ``(kind, body)``."""
    try:
        fn, args, kwargs = cloudpickle.loads(request)
    except Exception as exc:
        return BAD_CALL, _describe(exc).encode()
    try:
        result: Any = fn(*args, **kwargs)
    except Exception as exc:
        return RAISED, _pack_exception(exc)
    finally:
        del fn, args, kwargs
    try:
        return RESULT, cloudpickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        return BAD_RESULT, _describe(exc).encode()


def _pack_exception(exc: Exception) -> bytes:
    """Encode ``exc`` with its formatted traceback; ``None`` in place of it if it cannot cross."""
    # Drop this module's frame: the traceback starts in the step's own code.
    tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    data: bytes | None
    why = ""
    try:
        data = cloudpickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(data)
    except Exception as problem:
        data, why = None, _describe(problem)
    return pickle.dumps((data, _safe_repr(exc), text, why), protocol=pickle.HIGHEST_PROTOCOL)


def _safe_repr(value: object) -> str:
    """``repr(value)``, or a placeholder when its ``__repr__`` itself fails."""
    try:
        return repr(value)
    except Exception:
        return f"<{type(value).__qualname__} object (repr failed)>"


def _describe(exc: BaseException) -> str:
    """``"TypeError: cannot pickle '_thread.lock' object"`` for an error."""
    return f"{type(exc).__name__}: {exc}"
