"""Conditional steps: ``@when(pred)`` / ``@unless(pred)`` under ``@step``, and ``If`` branches."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from ._errors import ConfigError

__all__ = ("unless", "when")

P = ParamSpec("P")
R = TypeVar("R")


def when(predicate: Callable[..., Any]) -> Callable[[Callable[P, R]], Callable[P, R | None]]:
    """Run the step only when ``predicate`` is true of its arguments; otherwise it is skipped.

    The predicate receives the step's resolved arguments positionally, as many as it takes.
    Steps that need a skipped step's outputs are skipped too. Called directly (outside a
    pipeline), the function returns None when the predicate is false.
    """
    return _conditional(predicate, negate=False, label="when")


def unless(predicate: Callable[..., Any]) -> Callable[[Callable[P, R]], Callable[P, R | None]]:
    """Skip the step when ``predicate`` is true of its arguments; the mirror of :func:`when`."""
    return _conditional(predicate, negate=True, label="unless")


def _conditional(
    predicate: Callable[..., Any], *, negate: bool, label: str
) -> Callable[[Callable[P, R]], Callable[P, R | None]]:
    if not callable(predicate):
        raise ConfigError(f"{label}() needs a callable predicate, got {predicate!r}")

    def decorate(func: Callable[P, R]) -> Callable[P, R | None]:
        from ._scheduler import conditions_hold

        conditions = ((predicate, negate),)
        wrapper: Any
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                if not conditions_hold(conditions, list(args), kwargs):
                    return None
                return await func(*args, **kwargs)

        else:

            @functools.wraps(func)
            def wrapper(*args: P.args, **kwargs: P.kwargs) -> R | None:
                if not conditions_hold(conditions, list(args), kwargs):
                    return None
                return func(*args, **kwargs)

        wrapper.__flowyml_condition__ = (predicate, negate)
        return wrapper  # type: ignore[no-any-return]

    return decorate
