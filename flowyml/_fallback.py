"""Fallbacks: return a substitute value when a function raises.

:func:`on_failure` is the decorator from the seed page; :class:`FallbackHandler` is the same
behaviour as an object (a decorator, or :meth:`FallbackHandler.call`). Only the listed
``Exception`` types are caught: cancellation, ``KeyboardInterrupt`` and ``SystemExit`` always
propagate.

The fallback is called with the exception if its signature accepts one positional argument,
and with no arguments otherwise; this is decided once, when the handler is made.
"""

from __future__ import annotations

__all__ = ("FallbackHandler", "on_failure", "watch_fallbacks")

import contextvars
import functools
import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ParamSpec, TypeVar, cast

from flowyml._errors import ConfigError
from flowyml._layers import is_async_callable, layer, over_step
from flowyml._retry import ExceptionTypes, exception_types

P = ParamSpec("P")
R = TypeVar("R")


def _takes_exception(fallback: Callable[..., Any]) -> bool:
    """Whether ``fallback`` should receive the exception: it can bind one positional argument."""
    try:
        signature = inspect.signature(fallback)
    except (TypeError, ValueError):  # some builtins have no signature: call them bare
        return False
    try:
        signature.bind(None)
    except TypeError:
        pass
    else:
        return True
    try:
        signature.bind()
    except TypeError:
        raise ConfigError(
            f"fallback {fallback!r} must take no arguments or one (the exception), "
            f"but its signature is {signature}"
        ) from None
    return False


class FallbackHandler:
    """Return ``fallback_func``'s value when the wrapped function raises one of ``fallback_on``.

    Args:
        fallback_func: called with no arguments or with the exception (decided by its
            signature); may be ``async def`` when the protected function is async too.
        fallback_on: the exception types that trigger the fallback.

    The return type of the fallback should match the function's, so typing stays honest.
    """

    __slots__ = ("_pass_exception", "fallback_func", "fallback_on")

    def __init__(self, fallback_func: Callable[..., Any], fallback_on: ExceptionTypes = (Exception,)) -> None:
        if not callable(fallback_func):
            raise ConfigError(f"fallback must be callable, got {fallback_func!r}")
        self.fallback_func = fallback_func
        self.fallback_on = exception_types(fallback_on, "fallback_on")
        self._pass_exception = _takes_exception(fallback_func)

    def __repr__(self) -> str:
        name = getattr(self.fallback_func, "__qualname__", repr(self.fallback_func))
        on = ", ".join(t.__name__ for t in self.fallback_on)
        return f"FallbackHandler({name}, fallback_on=({on}))"

    def __call__(self, func: Callable[P, R]) -> Callable[P, R]:
        """Decorate a sync or async function; the wrapper carries ``__flowyml_fallback__ = self``."""
        stepped = over_step(func, self)
        if stepped is not None:
            return cast(Callable[P, R], stepped)
        self._check(func)
        afunc = cast(Callable[..., Awaitable[Any]], func)
        return layer(
            func, lambda a, k: self._call(func, a, k), lambda a, k: self._acall(afunc, a, k), fallback=self
        )

    def call(self, func: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Call ``func`` with the fallback in place; for an async ``func`` this returns a coroutine."""
        if self._check(func):
            return cast(R, self._acall(cast(Callable[..., Awaitable[Any]], func), args, kwargs))
        return self._call(func, args, kwargs)

    def _check(self, func: Callable[..., Any]) -> bool:
        """Validate ``func`` against the fallback; return whether it is async."""
        if not callable(func):
            raise ConfigError(f"on_failure(...) decorates a function, got {func!r}")
        is_async = inspect.iscoroutinefunction(func)
        if not is_async and inspect.iscoroutinefunction(self.fallback_func):
            raise ConfigError(
                f"the fallback {self.fallback_func!r} is async but {func!r} is not; "
                "use a plain fallback function for a plain function"
            )
        return is_async

    def _fallback(self, exc: Exception) -> Any:
        used = _USED.get()
        if used is not None:
            used.append(f"{type(exc).__name__}: {exc}")
        return self.fallback_func(exc) if self._pass_exception else self.fallback_func()

    def _call(self, func: Callable[..., R], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> R:
        try:
            return func(*args, **kwargs)
        except self.fallback_on as exc:
            return cast(R, self._fallback(exc))

    async def _acall(
        self, func: Callable[..., Awaitable[R]], args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> R:
        try:
            return await func(*args, **kwargs)
        except self.fallback_on as exc:
            result = self._fallback(exc)
            if inspect.isawaitable(result):
                result = await result
            return cast(R, result)


_USED: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("flowyml_fallbacks", default=None)


def watch_fallbacks(body: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a step body so it returns ``(value, reasons)``: whether a fallback stood in for it.

    The engine wraps the body of a step that has an ``on_failure`` layer in this, wherever the
    body runs (loop, thread, process, cluster), so that a fallback value is passed on to the
    step's consumers but never cached as if the step had succeeded. The wrapper is a plain or an
    ``async def`` function like the body, so every executor recognises it for what it is.
    """
    if is_async_callable(body):

        @functools.wraps(body)
        async def watched_async(*args: Any, **kwargs: Any) -> tuple[Any, list[str]]:
            return await _awatch(body, args, kwargs)

        return watched_async

    @functools.wraps(body)
    def watched(*args: Any, **kwargs: Any) -> tuple[Any, list[str]]:
        return _watch(body, args, kwargs)

    return watched


# Module-level, so a wrapper shipped to another process refers to them by name: the ContextVar
# itself cannot be pickled.
def _watch(
    body: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> tuple[Any, list[str]]:
    used: list[str] = []
    token = _USED.set(used)
    try:
        return body(*args, **kwargs), used
    finally:
        _USED.reset(token)


async def _awatch(
    body: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> tuple[Any, list[str]]:
    used: list[str] = []
    token = _USED.set(used)
    try:
        return await body(*args, **kwargs), used
    finally:
        _USED.reset(token)


def on_failure(fallback: Callable[..., Any], *, on: ExceptionTypes = (Exception,)) -> FallbackHandler:
    """Decorator: return ``fallback``'s value when the function raises one of ``on``.

    ``fallback`` takes no arguments or the exception; it may be async for async functions.
    """
    return FallbackHandler(fallback, fallback_on=on)
