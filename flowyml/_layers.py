"""One way to build the decorator layers (retry, fallback, breaker, conditions) for sync and async functions.

Each layer wraps a function in a wrapper of the same kind — an ``async def`` for a coroutine
function, so ``inspect.iscoroutinefunction`` stays true and the engine awaits it on the loop — and
marks the wrapper with exactly its own ``__flowyml_<kind>__`` attribute, which the engine reads to
lift a retry or a condition out of the function, or to find a breaker.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ParamSpec, TypeVar, cast

__all__ = ("is_async_callable", "layer", "over_step", "own_markers")

P = ParamSpec("P")
R = TypeVar("R")

Args = tuple[Any, ...]
Kwargs = Mapping[str, Any]


def layer(
    func: Callable[P, R],
    call: Callable[[Args, Kwargs], Any],
    acall: Callable[[Args, Kwargs], Awaitable[Any]],
    **markers: object,
) -> Callable[P, R]:
    """Wrap ``func`` so calls go through ``call`` (sync) or ``acall`` (async), keeping its signature."""
    wrapper: Callable[..., Any]
    if inspect.iscoroutinefunction(func):

        @functools.wraps(func)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            return await acall(args, kwargs)

        wrapper = async_wrapper
    else:

        @functools.wraps(func)
        def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
            return call(args, kwargs)

        wrapper = sync_wrapper
    own_markers(wrapper, **markers)
    return cast(Callable[P, R], wrapper)


def over_step(func: Any, decorate: Callable[[Callable[..., Any]], Any]) -> Any | None:
    """For a decorator written above ``@step``: the same step with the layer put under it.

    ``@retry(...)`` over ``@step(...)`` then means what ``@step(...)`` over ``@retry(...)``
    means, and keeps the step's outputs, timeout and cache. Returns ``None`` when ``func`` is
    not a step, and the decorator wraps it as usual.
    """
    rewrap = getattr(func, "__flowyml_rewrap__", None)
    return None if rewrap is None else rewrap(decorate)


def own_markers(wrapper: Callable[..., Any], **markers: object) -> None:
    """Give ``wrapper`` exactly its own ``__flowyml_*__`` markers.

    ``functools.wraps`` copies the wrapped function's ``__dict__``, so without this a wrapper
    would also carry the markers of every layer below it, and the engine, which reads a marker as
    "this layer is a retry / a breaker / a condition", would lift or count the wrong layer. The
    markers below stay reachable by walking ``__wrapped__``.
    """
    copied = [key for key in wrapper.__dict__ if key.startswith("__flowyml_") and key.endswith("__")]
    for key in copied:
        del wrapper.__dict__[key]
    for key, value in markers.items():
        wrapper.__dict__[f"__flowyml_{key}__"] = value


def is_async_callable(func: Any) -> bool:
    """True for an ``async def`` function, a partial of one, or an object with an async ``__call__``."""
    while isinstance(func, functools.partial):
        func = func.func
    if inspect.iscoroutinefunction(func):
        return True
    call = getattr(type(func), "__call__", None)  # noqa: B004 - a callable object's method
    return call is not None and not inspect.isroutine(func) and inspect.iscoroutinefunction(call)
