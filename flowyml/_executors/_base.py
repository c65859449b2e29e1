"""The one interface every executor implements."""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from typing import Any, ClassVar


class Executor(abc.ABC):
    """Runs step bodies somewhere and enforces their timeouts the way that place allows.

    The engine creates or receives one executor per kind for a run, calls :meth:`run` for each
    step attempt, and :meth:`aclose` once when the run ends (also on failure or cancellation).
    ``run`` must let ``asyncio.CancelledError`` through untouched, and raise
    :class:`flowyml.errors.StepTimeoutError` (naming ``step_name``) when ``timeout`` expires.
    """

    name: ClassVar[str] = "executor"
    supports_remote: ClassVar[bool] = False
    """True when :meth:`run` accepts ``keep_remote=True`` and may return handles to remote values."""
    shares_context: ClassVar[bool] = False
    """True when bodies run in this process in a copy of the caller's ``contextvars`` context.

    When False, a traced run wraps each body so that it restores the step's trace context
    wherever it runs (see :mod:`flowyml._otel`)."""

    @abc.abstractmethod
    async def run(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        *,
        timeout: float | None,
        step_name: str,
    ) -> Any:
        """Call ``fn(*args, **kwargs)`` here and return its result."""

    def is_remote(self, value: Any) -> bool:
        """True when ``value`` is a handle to data that lives where this executor runs steps."""
        return False

    async def fetch(self, value: Any, *, step_name: str | None = None) -> Any:
        """Bring a remote value to the driver; plain values pass through."""
        return value

    async def aclose(self) -> None:  # noqa: B027 - optional hook, most executors hold nothing
        """Release what the executor holds; leave no thread or process behind that it owns."""
