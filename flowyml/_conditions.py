"""Conditional steps, as defined: ``@when(pred)`` / ``@unless(pred)``, and ``If`` branches.

Define time only. What an ``If`` condition receives is described here (:class:`ControlContext`,
:class:`StepView`); deciding a gate while a run goes on is :mod:`flowyml._gates`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

from ._assets import Asset, Metrics
from ._errors import ConfigError
from ._layers import layer, over_step
from ._results import StepStatus

if TYPE_CHECKING:
    from ._step import Step

__all__ = ("ControlContext", "If", "StepView", "conditions_hold", "unless", "when")

P = ParamSpec("P")
R = TypeVar("R")
Conditions = tuple[tuple[Callable[..., Any], bool], ...]


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
    if inspect.iscoroutinefunction(predicate):
        raise ConfigError(
            f"{label}() needs a plain predicate, got the async function {predicate!r}; "
            "a condition is checked before the step starts and cannot be awaited"
        )
    conditions = ((predicate, negate),)

    def decorate(func: Callable[P, R]) -> Callable[P, R | None]:
        stepped = over_step(func, decorate)
        if stepped is not None:
            return cast(Callable[P, R | None], stepped)
        afunc = cast(Callable[..., Awaitable[Any]], func)

        def call(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
            return func(*args, **kwargs) if conditions_hold(conditions, list(args), kwargs) else None

        async def acall(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
            return await afunc(*args, **kwargs) if conditions_hold(conditions, list(args), kwargs) else None

        return layer(func, call, acall, condition=(predicate, negate))

    return decorate


def conditions_hold(conditions: Conditions, args: list[Any], kwargs: Mapping[str, Any]) -> bool:
    """True when every ``when`` predicate holds and no ``unless`` predicate does."""
    values = [*args, *kwargs.values()]
    for predicate, negate in conditions:
        n = _arity(predicate)
        if bool(predicate(*(values if n is None else values[:n]))) == negate:
            return False
    return True


def _arity(predicate: Callable[..., Any]) -> int | None:
    """How many positional arguments the predicate takes; None when it takes any number."""
    try:
        return _cached_arity(predicate)
    except TypeError:  # an unhashable callable object
        return _read_arity(predicate)


@functools.lru_cache(maxsize=1024)
def _cached_arity(predicate: Callable[..., Any]) -> int | None:
    return _read_arity(predicate)


def _read_arity(predicate: Callable[..., Any]) -> int | None:
    try:
        params = inspect.signature(predicate).parameters.values()
    except (TypeError, ValueError):
        return None
    n = 0
    for p in params:
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            return None
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            n += 1
    return n


class If:
    """Run ``then_step`` or ``else_step`` depending on upstream results; add with ``add_control_flow``.

    ``condition`` receives a :class:`ControlContext`: ``ctx.steps["evaluate"].outputs["metrics"]``
    and ``ctx.params``. It is evaluated as soon as every step it reads has finished, and only the
    chosen branch runs and appears in the results. Assets are unwrapped for comparison: a
    ``Metrics`` output reads as its dict of values (whose keys are also readable directly from
    ``outputs``), any other asset as its ``data``.
    """

    def __init__(
        self,
        condition: Callable[[ControlContext], Any],
        then_step: Step | Callable[..., Any],
        else_step: Step | Callable[..., Any] | None = None,
        *,
        name: str | None = None,
    ) -> None:
        from ._step import Step, step

        if not callable(condition):
            raise ConfigError(f"If(condition=...) needs a callable, got {condition!r}")
        self.condition = condition
        self.then_step = then_step if isinstance(then_step, Step) else step(then_step)
        self.else_step = (
            None if else_step is None else else_step if isinstance(else_step, Step) else step(else_step)
        )
        if self.else_step is self.then_step:
            raise ConfigError(f"If(...) got the same step {self.then_step.name!r} as then_step and else_step")
        self.name = name or f"If({self.then_step.name}" + (
            f", {self.else_step.name})" if self.else_step else ")"
        )

    def steps(self) -> tuple[Step, ...]:
        return (self.then_step,) if self.else_step is None else (self.then_step, self.else_step)

    def __repr__(self) -> str:
        return self.name


class StepView:
    """What an ``If`` condition sees of one finished step."""

    __slots__ = ("outputs", "status", "success")

    def __init__(self, status: StepStatus, outputs: Mapping[str, Any]) -> None:
        self.status = status
        self.success = status in (StepStatus.SUCCEEDED, StepStatus.CACHED)
        unwrapped: dict[str, Any] = {}
        for name, value in outputs.items():
            if isinstance(value, Metrics):
                for key, metric in value.data.items():
                    unwrapped.setdefault(key, metric)
                unwrapped[name] = dict(value.data)
            elif isinstance(value, Asset):
                unwrapped[name] = value.data
            else:
                unwrapped[name] = value
        self.outputs = unwrapped


class ControlContext:
    """The view an ``If`` condition gets: finished steps by name, and the run's parameters."""

    __slots__ = ("params", "steps")

    def __init__(self, steps: Mapping[str, StepView], params: Mapping[str, Any]) -> None:
        self.steps = steps
        self.params = params
