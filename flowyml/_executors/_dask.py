"""Run step bodies on a Dask distributed cluster, from the engine's own event loop.

How it works:

- One ``distributed.Client(asynchronous=True)`` per executor, opened on the running loop at the
  first :meth:`DaskExecutor.run` (not in ``__init__``: the engine's loop does not exist yet when a
  pipeline is defined). The cluster is an address, an existing ``Client`` (used as it is when it is
  asynchronous and on this loop; otherwise a second, asynchronous client is opened to its scheduler),
  or a ``LocalCluster`` the executor starts itself and stops in :meth:`DaskExecutor.aclose`.
  A client or cluster the executor did not create is never closed.
- Each call is one ``client.submit(fn, *args, **kwargs, key=f"{step_name}-{uuid}", pure=False)``:
  no result is ever reused from an earlier call (the engine has its own cache), and the key shows
  the step's name on the dashboard. Arguments that are ``distributed.Future`` objects (the results
  of upstream Dask steps run with ``keep_remote=True``) are passed straight through, so the value
  moves from worker to worker and never through the driver.
- ``distributed`` is imported only when a :class:`DaskExecutor` is built: ``import flowyml`` never
  imports Dask, which is an optional extra (``pip install "flowyml[dask]"``).

How far timeouts and cancellation go (Dask cannot stop a running task):

- A task still waiting on the scheduler or a worker queue is removed and never runs.
- A task already running in a worker thread cannot be interrupted. Its future is cancelled and
  released, the scheduler forgets the key and the worker discards the result, but the worker thread
  keeps running the function until it returns, and meanwhile holds that thread (with
  ``threads_per_worker=1``, the whole worker). Side effects of the function still happen.
- On a timeout the future is cancelled and :class:`~flowyml.errors.StepTimeoutError` is raised.
  The timeout counts from submission, so it includes time spent waiting for a free worker.
- When the awaiting task is cancelled, the future is released at once (synchronously, so a second
  cancellation cannot interrupt it) and ``asyncio.CancelledError`` propagates untouched.
- A worker process that dies while running a task makes the scheduler run it again elsewhere; after
  ``distributed.scheduler.allowed-failures`` deaths (3 by default) the step fails with
  ``distributed.KilledWorker``. A future cancelled by the cluster itself (scheduler restart, lost
  connection) fails the step with ``distributed.FutureCancelledError``, an ``Exception``, so the run
  is not mistaken for a cancelled one.

Why a shared connection task instead of a lock: the first steps of a run all arrive at once and all
need the client. They await one ``asyncio.Task`` that connects (through ``asyncio.shield``), so a
step cancelled while the cluster is starting does not abandon a half-started cluster;
:meth:`DaskExecutor.aclose` waits for that task and then closes what it made. Once connected, the hot
path is an attribute check.
"""

from __future__ import annotations

import asyncio
import inspect
import pickle
import uuid
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .._errors import ConfigError, EventLoopError, SerializationError, StepTimeoutError
from ._base import Executor

if TYPE_CHECKING:
    # distributed annotates its dual sync/async methods for the sync case, or not at all; on an
    # asynchronous client they return awaitables, hence the few ``type: ignore`` comments below.
    from types import TracebackType

    from distributed import Client, Future, LocalCluster

__all__ = ("DaskExecutor",)

_INSTALL_HINT = 'pip install "flowyml[dask]"'

# Errors that mean "this value cannot be (un)pickled", whichever pickler noticed it first.
_PICKLING_ERRORS: tuple[type[Exception], ...] = (
    TypeError,
    pickle.PickleError,
    AttributeError,
    ImportError,
    RecursionError,
)


def _import_distributed() -> ModuleType:
    """Import ``distributed`` at use time, or explain how to install it."""
    try:
        import distributed
    except ImportError as exc:
        raise ConfigError(
            f"DaskExecutor needs Dask distributed, which is not installed: {_INSTALL_HINT}"
        ) from exc
    return distributed


class DaskExecutor(Executor):
    """Runs step bodies on a Dask distributed cluster through an asynchronous client.

    Args:
        address: where the cluster is. A scheduler address such as ``"tcp://10.0.0.5:8786"``;
            an existing ``distributed.Client`` (sync or async; never closed by this executor);
            or ``None`` to start a ``LocalCluster`` on first use and stop it in :meth:`aclose`.
        n_workers: workers of the ``LocalCluster`` this executor starts (default: Dask's choice
            from the CPU count). Only with ``address=None``.
        threads_per_worker: threads per worker of that ``LocalCluster``.
        processes: worker processes (``True``) or threads of this process (``False``).
        **cluster_kwargs: passed on to ``distributed.LocalCluster``. The scheduler's HTTP server
            (always started by Dask) listens on a free loopback port unless you pass
            ``dashboard_address=``.

    Raises:
        ConfigError: Dask is not installed, or cluster options were given with an address or
            client.

    The executor can be used again after :meth:`aclose` (it reconnects, or starts a new
    ``LocalCluster``), which lets one object serve several ``pipeline.run()`` calls, each on its
    own event loop. Within one loop, ``async with DaskExecutor() as ex:`` closes it at the end.
    """

    name = "dask"
    supports_remote = True

    def __init__(
        self,
        address: str | Client | None = None,
        *,
        n_workers: int | None = None,
        threads_per_worker: int = 1,
        processes: bool = True,
        **cluster_kwargs: Any,
    ) -> None:
        self._distributed = _import_distributed()
        if address is not None and not isinstance(address, str | self._distributed.Client):
            raise ConfigError(
                f"DaskExecutor(address={address!r}): pass a scheduler address such as "
                "'tcp://127.0.0.1:8786', a distributed.Client, or None to start a LocalCluster"
            )
        if address is not None and (n_workers is not None or cluster_kwargs):
            given = ", ".join(["n_workers", *cluster_kwargs] if n_workers is not None else cluster_kwargs)
            raise ConfigError(
                f"DaskExecutor: {given} configure the LocalCluster the executor starts itself; "
                "they cannot apply to an existing cluster. Drop them, or pass address=None."
            )
        for option, value in (("n_workers", n_workers), ("threads_per_worker", threads_per_worker)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"DaskExecutor: {option}={value!r} must be a positive integer")
        self._address = address
        self._cluster_options: dict[str, Any] = {
            "n_workers": n_workers,
            "threads_per_worker": threads_per_worker,
            "processes": processes,
            "dashboard_address": "127.0.0.1:0",
            **cluster_kwargs,
        }
        self._client: Client | None = None
        self._cluster: LocalCluster | None = None
        self._owns_client = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connecting: asyncio.Task[Client] | None = None

    # -- connection -------------------------------------------------------------------------

    @property
    def client(self) -> Client | None:
        """The asynchronous client in use, or ``None`` before the first run and after :meth:`aclose`."""
        return self._client

    async def _ensure_client(self) -> Client:
        """Return the client for the running loop, connecting once however many steps ask at once."""
        loop = asyncio.get_running_loop()
        if self._loop is not None and self._loop is not loop:
            raise EventLoopError(
                "this DaskExecutor is connected on another event loop; await executor.aclose() on "
                "that loop before using it on a new one (a pipeline run does this when it ends)"
            )
        if self._client is not None:
            return self._client
        if self._connecting is None:
            self._loop = loop
            self._connecting = loop.create_task(self._connect(), name="flowyml-dask-connect")
            # Mark a failure as seen even if every step that waited for it was cancelled meanwhile.
            self._connecting.add_done_callback(lambda t: t.cancelled() or t.exception())
        return await asyncio.shield(self._connecting)

    async def _connect(self) -> Client:
        d = self._distributed
        address = self._address
        client: Client
        try:
            if address is None:
                cluster = await d.LocalCluster(asynchronous=True, **self._cluster_options)
                self._cluster = cluster
                client = await d.Client(cluster, asynchronous=True, set_as_default=False)
                self._owns_client = True
            elif isinstance(address, str):
                client = await d.Client(address, asynchronous=True, set_as_default=False)
                self._owns_client = True
            elif address.asynchronous and getattr(address.loop, "asyncio_loop", None) is self._loop:
                client = address
                self._owns_client = False
            else:  # a sync client, or an async one on another loop: connect to its scheduler here
                client = await d.Client(
                    address.scheduler.address,
                    asynchronous=True,
                    set_as_default=False,
                    security=address.security,
                )
                self._owns_client = True
        except BaseException:
            self._connecting = None
            if self._cluster is not None:
                cluster, self._cluster = self._cluster, None
                await cluster.close()  # type: ignore[misc]
            if self._client is None:
                self._loop = None
            raise
        self._client = client
        return client

    # -- running ----------------------------------------------------------------------------

    async def run(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        *,
        timeout: float | None,
        step_name: str,
        keep_remote: bool = False,
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` as one Dask task and return its result.

        Args:
            fn: the step body; a plain function runs in a worker thread, an ``async def`` one on
                the worker's event loop.
            args, kwargs: its arguments. ``distributed.Future`` values (also nested in lists,
                tuples and dicts) are replaced by their results on the worker.
            timeout: seconds from submission until the task is cancelled (see the module notes).
            step_name: names the step in errors and starts the task's key.
            keep_remote: return the finished ``distributed.Future`` instead of its value, leaving
                the value on the worker for downstream Dask steps.

        Returns:
            The function's result, or its finished future when ``keep_remote`` is true.

        Raises:
            SerializationError: the function, an argument or the result cannot be pickled.
            StepTimeoutError: the task did not finish within ``timeout``; it was cancelled.
            Exception: whatever ``fn`` raised, as the same type.
        """
        client = self._client
        if client is None or self._loop is not asyncio.get_running_loop():
            client = await self._ensure_client()
        future = self._submit(client, fn, args, kwargs, step_name)
        keep = False
        try:
            if timeout is None:
                result = await self._settle(future, step_name, keep_remote)
            else:
                scope = asyncio.timeout(timeout)
                try:
                    async with scope:
                        result = await self._settle(future, step_name, keep_remote)
                except TimeoutError:
                    if not scope.expired():
                        raise
                    await client.cancel([future], reason="flowyml-timeout")  # type: ignore[no-untyped-call]
                    raise StepTimeoutError(step_name, timeout, executor=self.name) from None
            keep = keep_remote
            return result
        finally:
            if not keep:
                # Drop our reference now rather than at garbage collection: a queued task is removed,
                # a running one is forgotten by the scheduler, a finished one frees worker memory.
                future.release()  # type: ignore[no-untyped-call]

    def _submit(
        self,
        client: Client,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        step_name: str,
    ) -> Future[Any]:
        key = f"{step_name}-{uuid.uuid4().hex}"
        try:
            if _SUBMIT_OPTIONS.isdisjoint(kwargs):
                return client.submit(fn, *args, key=key, pure=False, **kwargs)
            # A parameter named like a submit() option (key=, workers=, priority=...) must not be
            # taken as one: hand the keywords over as data, through dask's own ``apply``.
            if inspect.iscoroutinefunction(fn):
                clash = sorted(_SUBMIT_OPTIONS.intersection(kwargs))
                raise ConfigError(
                    f"step {step_name!r} is an async function with parameters named "
                    f"{', '.join(map(repr, clash))}, like options of distributed's Client.submit; "
                    "Dask can run it only as a plain function. Rename them, or make it a plain def."
                )
            from dask.utils import apply

            return client.submit(apply, fn, list(args), dict(kwargs), key=key, pure=False)
        except _PICKLING_ERRORS as exc:
            error = _submit_error(exc, fn, args, kwargs, step_name)
            if error is exc:
                raise
            raise error from exc

    async def _settle(self, future: Future[Any], step_name: str, keep_remote: bool) -> Any:
        """Wait for ``future``; return its value (or itself), raising the task's own exception."""
        if keep_remote:
            await future.exception()  # type: ignore[no-untyped-call]  # waits without moving the value; None unless it failed
            if future.status != "finished":
                await future  # re-raises the task's exception (or its cancellation) as itself
            return future
        try:
            return await future
        except _PICKLING_ERRORS as exc:
            if future.status != "finished":
                raise  # the task itself raised this
            raise SerializationError(
                f"step {step_name!r}: the result ran fine on the worker but cannot be sent back "
                f"to this process ({type(exc).__name__}: {exc}). Return a picklable value whose type "
                "is importable here, or keep it remote for the next Dask step.",
                step_name=step_name,
            ) from exc

    # -- remote values ----------------------------------------------------------------------

    def is_remote(self, value: Any) -> bool:
        """Tell whether ``value`` is a ``distributed.Future``: a result that lives on the cluster."""
        return isinstance(value, self._distributed.Future)

    async def fetch(self, value: Any, *, step_name: str | None = None) -> Any:
        """Bring a remote value to this process; any other value is returned as it is.

        Raises the producing task's exception if it failed, and :class:`SerializationError` if
        the value cannot be sent back.
        """
        if not self.is_remote(value):
            return value
        if value.client.asynchronous:
            name = step_name if step_name is not None else str(value.key)
            return await self._settle(value, name, keep_remote=False)
        return await asyncio.to_thread(value.result)

    # -- closing ----------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the client and the ``LocalCluster`` this executor opened; leave no worker behind.

        Waits for a connection still being made. A client or cluster that was passed in stays open.
        Safe to call more than once; the executor reconnects if it is used again.
        """
        connecting = self._connecting
        if connecting is not None and self._loop is not asyncio.get_running_loop():
            raise EventLoopError("DaskExecutor.aclose() must run on the event loop the executor connected on")
        if connecting is not None and not connecting.done():
            await asyncio.wait([connecting])
        client, cluster, owns_client = self._client, self._cluster, self._owns_client
        self._client = self._cluster = self._connecting = self._loop = None
        self._owns_client = False
        try:
            if client is not None and owns_client:
                await client.close()  # type: ignore[no-untyped-call]
        finally:
            if cluster is not None:
                await cluster.close()  # type: ignore[misc]

    async def __aenter__(self) -> DaskExecutor:
        await self._ensure_client()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        if self._address is None:
            options = ", ".join(f"{k}={v!r}" for k, v in self._cluster_options.items() if v is not None)
            return f"DaskExecutor(LocalCluster({options}))"
        where = self._address if isinstance(self._address, str) else self._address.scheduler.address
        return f"DaskExecutor({where!r})"


# Keyword names Client.submit takes for itself; a step parameter with one of these names is
# passed through dask.utils.apply instead (see DaskExecutor._submit).
_SUBMIT_OPTIONS = frozenset(
    {
        "key",
        "workers",
        "resources",
        "retries",
        "priority",
        "fifo_timeout",
        "allow_other_workers",
        "actor",
        "actors",
        "pure",
    }
)


def _submit_error(
    exc: Exception,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    step_name: str,
) -> Exception:
    """Name the value that Dask could not pickle, or return ``exc`` if pickling was not the cause."""
    import cloudpickle
    from distributed import Future

    def fails(value: Any) -> BaseException | None:
        if isinstance(value, Future):
            return None
        try:
            cloudpickle.dumps(value)
        except Exception as error:
            return error
        return None

    candidates: list[tuple[str, Any]] = [("the function", fn)]
    candidates += [(f"argument {i + 1} ({_short(a)})", a) for i, a in enumerate(args)]
    candidates += [(f"argument {k!r} ({_short(v)})", v) for k, v in kwargs.items()]
    for what, value in candidates:
        error = fails(value)
        if error is not None:
            return SerializationError(
                f"step {step_name!r}: {what} cannot be pickled to send it to the Dask cluster "
                f"({type(error).__name__}: {error}). Pass a picklable value, or run the step with "
                "executor='thread'.",
                step_name=step_name,
            )
    if "serializ" in str(exc).lower():
        return SerializationError(
            f"step {step_name!r}: the task cannot be pickled to send it to the Dask cluster ({exc})",
            step_name=step_name,
        )
    return exc


def _short(value: Any, limit: int = 60) -> str:
    text = f"{type(value).__name__}: {value!r}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
